"""Exposures, outcome attribution, assignment and per-arm learning, on a real SQLite store."""

from __future__ import annotations

import multiprocessing as mp
from dataclasses import replace

import numpy as np
import pytest
from helpers import canonical

from actors import Microtune
from actors.experiments import analysis
from actors.experiments.attribution import attribute
from actors.experiments.definition import Experiment, unit
from actors.replay import replay_user
from actors.state import decode_state, encode_state
from events import SegmentConfig, TuningConfig
from events.codec import event_from_log, event_from_map
from events.errors import Rejected
from events.types import EXPOSURE, Arm, Candidate, Event, Exposure, Query

DIM = 3
CFG = TuningConfig(version=1, dim=DIM, segments={"default": SegmentConfig(hygiene=False)})
ITEMS = {f"i{k}": np.eye(DIM)[k % DIM] * (1 + k) for k in range(6)}
CANDIDATES = tuple(Candidate(item, x) for item, x in ITEMS.items())


def shown(rid: str, t: float, *items: str, seq: int = 0) -> tuple[int, Event]:
    exposure = Exposure(items, tuple(1 / len(items) for _ in items), (0.0,) * len(items), 0, 1)
    return seq, Event(id=rid, user="u", t=t, kind=EXPOSURE, rid=rid, exposure=exposure)


def outcome(eid: str, t: float, item: str, kind: str = "click", rid: str | None = None,
            seq: int = 0, **kw) -> tuple[int, Event]:
    return seq, Event(id=eid, user="u", t=t, kind=kind, item=item, rid=rid, **kw)


# ---------------------------------------------------------------- attribution


def test_an_outcome_naming_its_ranking_joins_that_exposure_however_late():
    log = [shown("r1", 100, "a", "b", seq=1), shown("r2", 200, "a", seq=2),
           outcome("c1", 99_000, "a", rid="r1", seq=3),  # a day later, by its rid
           outcome("c2", 250, "b", rid="r9", seq=4),  # a rid the log has not: unmatched
           outcome("c3", 260, "c", rid="r1", seq=5)]  # r1 did not show c: unmatched
    joined = attribute(log, window=1800)
    by_rid = {e.rid: e for e in joined.exposures}
    assert by_rid["r1"].clicks == 1 and by_rid["r2"].clicks == 0
    assert (joined.attributed, joined.by_rid, joined.unmatched, joined.unattributed) == \
        (1, 1, 2, 0)


def test_without_a_rid_the_latest_exposure_of_the_item_within_the_window_takes_it():
    log = [shown("r1", 100, "a", "b", seq=1), shown("r2", 300, "a", seq=2),
           outcome("c1", 350, "a", seq=3),  # r2 is the latest showing a at or before 350
           outcome("c2", 350, "b", seq=4),  # only r1 showed b
           outcome("c3", 300 + 1800, "a", seq=5),  # exactly the window after r2: joins
           outcome("c4", 300 + 1800.5, "a", seq=6),  # past it: unattributed
           outcome("c5", 50, "a", seq=7)]  # before any exposure of a: unattributed
    joined = attribute(log, window=1800)
    by_rid = {e.rid: e for e in joined.exposures}
    assert by_rid["r2"].clicks == 2 and by_rid["r1"].clicks == 1
    assert joined.unattributed == 2


def test_late_and_out_of_order_outcomes_join_by_event_time_not_by_log_order():
    # the click is logged before the exposure it answers (the client sent them out of
    # order), and a dwell arrives long after a newer exposure of another item was logged
    log = [outcome("c1", 130, "a", seq=1),
           shown("r1", 120, "a", seq=2),
           shown("r2", 500, "b", seq=3),
           outcome("d1", 140, "a", kind="dwell", dwell=42.0, seq=4),
           outcome("f1", 150, "a", kind="feedback", target=0.2, seq=5),
           outcome("f2", 145, "a", kind="feedback", target=0.9, seq=6)]  # older: not latest
    joined = attribute(log, window=1800)
    r1 = next(e for e in joined.exposures if e.rid == "r1")
    assert r1.clicks == 1 and r1.dwell == 42.0 and r1.feedbacks == 2
    assert r1.feedback == 0.2  # the latest feedback in event time, not in log order
    # the same log in any order joins the same way
    again = attribute(list(reversed(log)), window=1800)
    assert [(e.rid, e.clicks, e.dwell, e.feedback) for e in again.exposures] == \
        [(e.rid, e.clicks, e.dwell, e.feedback) for e in joined.exposures]


def test_ties_in_time_go_to_the_exposure_logged_last():
    log = [shown("r1", 100, "a", seq=1), shown("r2", 100, "a", seq=2),
           outcome("c1", 100, "a", seq=3)]
    joined = attribute(log, window=10)
    assert [(e.rid, e.clicks) for e in joined.exposures] == [("r1", 0), ("r2", 1)]


# ---------------------------------------------------------------- the wire


def test_an_exposure_decodes_with_its_ranking_and_a_publishers_arm_is_ignored():
    body = {"v": 1, "id": "r1", "u": "ann", "t": 5.0, "k": "exposure",
            "sh": [["a", 0.75, 1.5], ["b", 0.25, 0.4]], "rq": 7, "rc": 2,
            "xa": ["x", "treatment", 1]}  # only the service stamps the arm
    event = event_from_map(body)
    assert event.rid == "r1" and event.arm is None
    assert event.exposure == Exposure(("a", "b"), (0.75, 0.25), (1.5, 0.4), 7, 2)
    for bad in ({"sh": []}, {"sh": [["a", 2.0, 0.0]]}, {"sh": [["a", 0.5]]},
                {"rid": "other"}, {"pp": [0.5, 0.5, 0.1]}, {"rq": -1}):
        with pytest.raises(Rejected):
            event_from_map({**body, **bad})


# ---------------------------------------------------------------- assignment


def _experiment(**kw) -> Experiment:
    defaults = dict(name="exp", version=1, arms=(("control", 2), ("b", 1)), split=(0.5, 0.5),
                    control="control", start=0.0)
    return Experiment(**{**defaults, **kw})


def _assign_all(users: list[str]) -> list:
    e = _experiment()
    return [e.assign(u) for u in users]


def test_assignment_is_deterministic_balanced_and_the_same_in_another_process():
    users = [f"user-{k}" for k in range(20_000)]
    arms = _assign_all(users)
    counts = {"control": 0, "b": 0}
    for arm in arms:
        counts[arm.name] += 1
    # binomial(20000, 0.5): sd 70.7; within 4 sd
    assert abs(counts["control"] - 10_000) < 4 * 70.7
    uneven = _experiment(split=(0.2, 0.8))
    share = sum(uneven.assign(u).name == "control" for u in users) / len(users)
    assert abs(share - 0.2) < 4 * (0.2 * 0.8 / len(users)) ** 0.5
    # a fresh interpreter (spawned: no shared state, another hash seed) agrees
    with mp.get_context("spawn").Pool(1) as pool:
        assert pool.apply(_assign_all, (users[:2000],)) == arms[:2000]


def test_ramping_up_enrols_more_users_and_moves_no_one_between_arms():
    users = [f"user-{k}" for k in range(5000)]
    low, high = _experiment(traffic=0.3), _experiment(traffic=0.6)
    before = {u: low.assign(u) for u in users}
    after = {u: high.assign(u) for u in users}
    enrolled = [u for u, a in before.items() if a is not None]
    assert abs(len(enrolled) / len(users) - 0.3) < 0.03
    assert all(after[u] is not None and after[u].name == before[u].name for u in enrolled)
    assert abs(sum(a is not None for a in after.values()) / len(users) - 0.6) < 0.03
    # the two draws are independent: the arm split holds within the enrolled
    share = sum(before[u].name == "control" for u in enrolled) / len(enrolled)
    assert abs(share - 0.5) < 0.05
    assert unit("a", "b") == unit("a", "b") != unit("a", "c")


# ---------------------------------------------------------------- the system


def _show(mt: Microtune, user: str, t: float):
    return mt.rank(Query(user, CANDIDATES, top=3, log=True, t=t))


def _click(mt: Microtune, user: str, n: int, t: float, item: str, rid: str | None = None):
    (outcome,) = mt.track_many([Event(id=f"{user}-c{n}", user=user, t=t, kind="click",
                                      item=item, x=ITEMS[item], rid=rid)])
    assert outcome.status == "applied", outcome


def test_exposures_are_logged_with_their_arm_and_assignment_survives_a_restart(tmp_path):
    store = tmp_path / "mt.db"
    with Microtune.open(store, CFG) as mt:
        mt.start_experiment("adj", [("control", "no-adjust"), ("b", "current")], by="ops")
        first = {u: _show(mt, u, 1000.0) for u in ("ann", "bob", "cyd", "dan", "eve")}
        for user, ranking in first.items():
            assert ranking.rid and ranking.log_error is None
            assert ranking.arm == mt.experiments.get("adj").assign(user)
            logged = [event_from_log(r.body) for r in mt.recorder.read(user)]
            assert [e.kind for e in logged] == [EXPOSURE]
            assert logged[0].rid == ranking.rid and logged[0].arm == ranking.arm
            assert logged[0].exposure.items == ranking.items
            assert logged[0].exposure.seq == 0 and mt.state(user).arm == ranking.arm
    with Microtune.open(store, CFG) as mt:  # a restart: the same arms, from the log
        for user, ranking in first.items():
            assert mt.state(user).arm == ranking.arm
            again = _show(mt, user, 2000.0)
            assert again.arm == ranking.arm
            assert event_from_log(list(mt.recorder.read(user))[-1].body).arm == ranking.arm
        assert mt.experiments.get("adj").running
        with pytest.raises(Rejected, match="never reused"):
            mt.start_experiment("adj", [("a", "current"), ("b", "current")])
        with pytest.raises(Rejected, match="running on the same users"):
            mt.start_experiment("other", [("a", "current"), ("b", "current")])
        ((name, version, body),) = mt.recorder.experiments()  # its own audit trail
        audit = Experiment.decode(body).audit
        assert (name, version, audit["action"], audit["by"]) == ("adj", 1, "start", "ops")


def test_each_arm_learns_by_its_own_config_exactly_as_a_replay_under_it(tmp_path):
    """A user in arm B ends with exactly the state a replay of its log under B's config gives
    (bit for bit), and never B's under another's rules: the control arm's users keep the
    prior (no micro-adjustment), the fast arm's move further than the slow arm's."""
    fast = TuningConfig(version=1, dim=DIM, segments={"default": SegmentConfig(
        hygiene=False, lr=0.2, lr_min=0.05, lr_max=0.4)})
    with Microtune.open(tmp_path / "mt.db", CFG) as mt:
        mt.start_experiment("rates", [("control", "no-adjust"), ("slow", "current"),
                                      ("fast", fast)])
        users = [f"u{k}" for k in range(30)]
        t = 1000.0
        for n in range(6):
            for user in users:
                ranking = _show(mt, user, t)
                _click(mt, user, n, t + 3, ranking.items[n % 3],
                       rid=ranking.rid if n % 2 else None)
                t += 10
        exp = mt.experiments.get("rates")
        arm_configs = {arm: mt.configs.get(v) for arm, v in exp.arms}
        assert arm_configs["fast"].label == "experiment rates arm fast"
        assert mt.configs.current.version == 1  # an arm's config never becomes current
        seen = set()
        distance = {"slow": [], "fast": []}
        for user in users:
            state = mt.state(user)
            arm = state.arm.name
            seen.add(arm)
            under_arm = replay_user(mt.recorder, mt.configs, user,
                                    config=arm_configs[arm], use_snapshots=False)
            assert encode_state(state) == encode_state(under_arm)
            assert canonical(state) == canonical(under_arm)
            assert state.config == arm_configs[arm].version
            if arm == "control":
                assert state.w.shape[0] == 0  # the prior: never adjusted
            else:
                distance[arm].append(float(np.abs(state.w).sum()))
                other = "slow" if arm == "fast" else "fast"
                elsewhere = replay_user(mt.recorder, mt.configs, user,
                                        config=arm_configs[other], use_snapshots=False)
                assert encode_state(elsewhere) != encode_state(state)
        assert seen == {"control", "slow", "fast"}
        assert np.mean(distance["fast"]) > np.mean(distance["slow"])

        users_sums = analysis.collect(mt.recorder, exp)
        report = analysis.report(exp, users_sums)
        assert sum(a["users"] for a in report["arms"]) == 30
        assert sum(a["exposures"] for a in report["arms"]) == 180
        ctr = {a["name"]: a["metrics"]["ctr"]["estimate"] for a in report["arms"]}
        assert all(v == 1.0 for v in ctr.values())  # every exposure got its click
        assert report["srm"]["p_value"] is not None


def test_after_a_stop_users_go_back_to_the_current_config(tmp_path):
    with Microtune.open(tmp_path / "mt.db", CFG) as mt:
        mt.start_experiment("short", [("control", "no-adjust"), ("b", "current")])
        users = [f"u{k}" for k in range(12)]
        for user in users:
            _show(mt, user, 1000.0)
        control = [u for u in users if mt.state(u).arm.name == "control"]
        assert control
        user = control[0]
        assert mt.state(user).config != 1
        mt.stop_experiment("short", by="ops", why="done")
        ranking = _show(mt, user, 2000.0)
        assert ranking.arm is None and ranking.config == 1
        _click(mt, user, 0, 2001.0, ranking.items[0])
        state = mt.state(user)
        assert state.config == 1 and state.w.shape[0] == DIM + 1  # it learns again
        assert state.arm == Arm("short", "control", 1)  # the assignment stays in the log
        # the snapshot carries the assignment
        assert decode_state(encode_state(state)).arm == state.arm
        with pytest.raises(Rejected, match="stopped already"):
            mt.stop_experiment("short")


def test_an_unknown_arm_config_or_bad_split_is_refused_before_anything_is_recorded(tmp_path):
    with Microtune.open(tmp_path / "mt.db", CFG) as mt:
        for arms, kw in (([("a", "current"), ("b", 99)], {}),
                         ([("a", "current"), ("b", "current")], {"split": [0.7, 0.7]}),
                         ([("a", "current")], {}), ([], {}),
                         ([("a", "current"), ("b", "current")], {"primary": "revenue"})):
            with pytest.raises(Rejected):
                mt.start_experiment("bad", arms, **kw)
        assert mt.experiments.all() == [] and mt.recorder.experiments() == []
        wrong_dim = replace(CFG, dim=DIM + 1, segments={"default": SegmentConfig()})
        with pytest.raises(Rejected):
            mt.start_experiment("bad", [("a", "current"), ("b", wrong_dim)])


def test_a_segment_can_log_every_ranking_without_being_asked(tmp_path):
    cfg = TuningConfig(version=1, dim=DIM, segments={
        "default": SegmentConfig(hygiene=False),
        "news": SegmentConfig(hygiene=False, log_exposures=True)})
    with Microtune.open(tmp_path / "mt.db", cfg) as mt:
        (joined,) = mt.track_many([Event(id="g", user="ann", t=1.0, kind="segment",
                                         segment="news")])
        assert joined.status == "applied"
        logged = mt.rank(Query("ann", CANDIDATES, top=2))  # no `l`: the segment logs it
        quiet = mt.rank(Query("bob", CANDIDATES, top=2))  # the default segment does not
        assert logged.rid is not None and quiet.rid is None
        kinds = [event_from_log(r.body).kind for r in mt.recorder.read("ann")]
        assert kinds == ["segment", EXPOSURE] and list(mt.recorder.read("bob")) == []


def test_bots_are_left_out_of_the_metrics_and_counted_in_the_sample_ratio(tmp_path):
    cfg = TuningConfig(version=1, dim=DIM)  # data hygiene on: it marks bots
    with Microtune.open(tmp_path / "mt.db", cfg) as mt:
        mt.start_experiment("bots", [("control", "no-adjust"), ("b", "current")])
        users = [f"u{k}" for k in range(20)]
        for user in users:
            ranking = _show(mt, user, 1000.0)
            declared = user == "u0"  # the publisher flags its traffic as automated
            outcomes = mt.track_many([
                Event(id=f"{user}-c{n}", user=user, t=1003.0 + 20 * n, kind="click",
                      item=ranking.items[0], x=ITEMS[ranking.items[0]], rid=ranking.rid,
                      automated=declared) for n in range(3)])
            assert {o.status for o in outcomes} == {"applied"}
        exp = mt.experiments.get("bots")
        users_sums = analysis.collect(mt.recorder, exp, mt.configs)
        assert [u.bot.split(":")[0] for u in users_sums if u.bot] == ["declared"]
        report = analysis.report(exp, users_sums)
        bot_arm = exp.assign("u0").name
        arms = {a["name"]: a for a in report["arms"]}
        assert arms[bot_arm]["bots"] == 1
        assert sum(a["users"] for a in arms.values()) == 19  # the bot's exposures left out
        assert sum(report["srm"]["observed"].values()) == 20  # the assignment check: all
        # without the verdicts (no configs) every user counts
        plain = analysis.report(exp, analysis.collect(mt.recorder, exp))
        assert sum(a["users"] for a in plain["arms"]) == 20


def test_a_retried_logged_query_with_its_rid_is_one_exposure(tmp_path):
    with Microtune.open(tmp_path / "mt.db", CFG) as mt:
        first = mt.rank(Query("ann", CANDIDATES, top=2, log=True, t=10.0, rid="page-1"))
        again = mt.rank(Query("ann", CANDIDATES, top=2, log=True, t=10.0, rid="page-1"))
        assert first.rid == again.rid == "page-1" and again.log_error is None
        kinds = [event_from_log(r.body).kind for r in mt.recorder.read("ann")]
        assert kinds == [EXPOSURE]
