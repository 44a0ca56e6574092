"""Data hygiene: each rule on a crafted stream, and what hygiene buys on a noisy population."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import fold

from actors import Microtune, encode_state
from actors.hygiene import MAX_PENDING, Hygiene, engagement, signal
from actors.learning import Step, apply, settle
from actors.segment_stats import MIN_SAMPLES, SegmentStats
from actors.state import UserState, decode_state
from adapters.population import Population
from events import Candidate, Event, Query, SegmentConfig, TuningConfig
from events.codec import event_from_log

D = 4
T0 = 1.7e9
X = {name: np.eye(D)[i] for i, name in enumerate("abcd")}


def config(**seg) -> TuningConfig:
    return TuningConfig(version=1, dim=D, segments={"default": SegmentConfig(**seg)})


def ev(n: int | str, t: float, kind: str = "click", item: str = "a", **fields) -> Event:
    return Event(id=str(n), user="u", t=t, kind=kind, item=item, x=X[item], **fields)


def verdicts(trace: list[Step], verdict: str) -> list[str]:
    return [s.event_id for s in trace if s.verdict == verdict]


# ---------------------------------------------------------------- time alignment, order


def test_a_skewed_clock_is_corrected_from_receive_times():
    cfg = config()
    skew = -3 * 3600.0  # the device is three hours behind
    events = [ev(i, T0 + 10 * i + skew, received=T0 + 10 * i + 0.2) for i in range(12)]
    state, trace = fold(events, cfg)
    assert state.hyg.skew() == pytest.approx(-skew + 0.2)
    applied = {s.event_id: s.t for s in trace if s.verdict == "applied"}
    # from the second sample on, the estimate is the device offset: times are the broker's
    for i in range(2, 10):
        assert applied[str(i)] == pytest.approx(T0 + 10 * i + 0.2)
    # the same user with a correct clock: same weights up to float rounding of the times
    fair, _ = fold([ev(i, T0 + 10 * i + 0.2, received=T0 + 10 * i + 0.2) for i in range(12)],
                   cfg)
    assert np.allclose(settle(state, cfg).w, settle(fair, cfg).w, atol=1e-12)


def test_small_offsets_are_delay_and_one_bad_timestamp_does_not_move_the_estimate():
    cfg = config()
    events = [ev(i, T0 + 10 * i, received=T0 + 10 * i + 0.5) for i in range(9)]
    events[4] = ev(4, T0 + 40 - 7200, received=T0 + 40.5)  # one event stamped 2 h early
    state, trace = fold(events, cfg)
    assert state.hyg.skew() == pytest.approx(0.5)
    times = {s.event_id: s.t for s in trace if s.verdict in ("pending", "late")}
    assert times["3"] == T0 + 30  # within skew_tolerance: the client's time stands
    assert times["4"] == T0 + 40 - 7200  # the bogus one is not "corrected" into place ...
    assert "4" in verdicts(trace, "late")  # ... it is older than the frontier: late


def test_events_within_the_lateness_window_are_applied_in_event_time_order():
    cfg = config()
    in_order = [ev(i, T0 + i, item="abcd"[i % 4]) for i in range(40)]
    shuffled = list(in_order)
    rng = np.random.default_rng(3)
    for i in range(0, 40, 4):  # shuffle within blocks of 4 s (< lateness 5 s)
        block = shuffled[i:i + 4]
        rng.shuffle(block)
        shuffled[i:i + 4] = block
    assert [e.id for e in shuffled] != [e.id for e in in_order]
    a, trace = fold(shuffled, cfg)
    b, _ = fold(in_order, cfg)
    assert settle(a, cfg).w.tobytes() == settle(b, cfg).w.tobytes()
    assert a.hyg.late == 0
    learned = [s.event_id for s in trace if s.verdict == "applied"]
    assert learned == sorted(learned, key=int)


@pytest.mark.parametrize("policy", ["apply", "drop"])
def test_an_event_later_than_the_window_follows_the_late_policy(policy):
    cfg = config(late_policy=policy)
    events = [ev(i, T0 + 10 * i, item="a") for i in range(10)]
    events.append(ev("late", T0 + 5, item="b"))  # 90 s late
    state, trace = fold(events, cfg)
    assert state.hyg.late == 1
    steps = trace + settle_trace(state, cfg)
    learned = [s.event_id for s in steps if s.y is not None]
    if policy == "drop":
        assert verdicts(trace, "late_dropped") == ["late"]
        assert "late" not in learned
    else:
        assert verdicts(trace, "late") == ["late"]
        assert "late" in learned


def settle_trace(state: UserState, cfg: TuningConfig) -> list[Step]:
    trace: list[Step] = []
    settle(state, cfg, trace)
    return trace


def test_a_late_event_applied_under_policy_apply_learns_at_the_frontier():
    cfg = config(late_policy="apply")
    events = [ev(i, T0 + 10 * i) for i in range(10)]
    events.append(ev("late", T0 + 5, item="b"))
    state, trace = fold(events, cfg)
    steps = trace + settle_trace(state, cfg)
    (learned,) = [s for s in steps if s.event_id == "late" and s.y is not None]
    assert learned.t == T0 + 80  # the frontier when it arrived: the last released event


def test_the_reorder_buffer_is_bounded_when_event_time_stands_still():
    cfg = config()
    state, trace = fold([ev(i, T0, "feedback", item="abcd"[i % 4], target=1.0)
                         for i in range(300)], cfg)  # feedback: not paced like a bot
    assert len(state.hyg.pending) == MAX_PENDING
    assert len(verdicts(trace, "applied")) == 300 - MAX_PENDING
    assert [s.event_id for s in trace if s.verdict == "applied"][:3] == ["0", "1", "2"]


# ---------------------------------------------------------------- sessions


def test_a_three_hour_gap_starts_a_new_session_and_tabs_join_one():
    cfg = config()
    events = [ev(1, T0, session="tab1"), ev(2, T0 + 60, session="tab2"),
              ev(3, T0 + 120, session="tab1"),
              ev(4, T0 + 120 + 3 * 3600, session="tab3"), ev(5, T0 + 125 + 3 * 3600)]
    state, _ = fold(events, cfg)
    h = settle(state, cfg).hyg
    assert h.session == 2
    assert h.session_start == T0 + 120 + 3 * 3600
    assert h.session_events == 2
    first, _ = fold(events[:3], cfg)
    first = settle(first, cfg).hyg
    assert first.session == 1 and first.session_ids == ("tab1", "tab2")
    assert first.session_events == 3


# ---------------------------------------------------------------- bots


def test_a_click_burst_marks_a_bot_whose_events_move_nothing_until_cleared():
    cfg = config()
    rng = np.random.default_rng(2)
    human, _ = fold([ev(i, T0 + 20 * i + rng.uniform(0, 9), item="abcd"[i % 4])
                     for i in range(20)], cfg)
    human = settle(human, cfg)
    assert human.hyg.bot == ""
    burst = [ev(f"b{i}", T0 + 400 + 0.05 * i, item="b") for i in range(100)]
    state, trace = fold(burst, cfg, human)
    trace += settle_trace(state, cfg)
    state = settle(state, cfg)
    assert state.hyg.bot.startswith("rate")
    assert len(verdicts(trace, "bot")) > 50  # marked within 40 clicks of the burst
    w_marked = state.w
    more, _ = fold([ev(f"c{i}", T0 + 1000 + 30 * i, item="c") for i in range(10)], cfg, state)
    assert settle(more, cfg).w.tobytes() == w_marked.tobytes()  # nothing moved
    assert settle(more, cfg).hyg.ignored >= 10
    cleared, _ = fold([Event(id="admin1", user="u", t=T0 + 2000, kind="clear_bot"),
                       *[ev(f"d{i}", T0 + 2000 + 30 * i, item="d") for i in range(10)]],
                      cfg, more)
    cleared = settle(cleared, cfg)
    assert cleared.hyg.bot == ""
    assert cleared.w.tobytes() != w_marked.tobytes()


def test_short_dwell_streak_regular_intervals_and_declared_automation():
    cfg = config()
    shorts, _ = fold([ev(i, T0 + 3 * i, "dwell", dwell=0.03) for i in range(10)], cfg)
    assert settle(shorts, cfg).hyg.bot.startswith("short dwell")
    metronome, _ = fold([ev(i, T0 + 7.0 * i, item="abcd"[i % 4]) for i in range(30)], cfg)
    assert settle(metronome, cfg).hyg.bot.startswith("regular intervals")
    rng = np.random.default_rng(0)
    human, _ = fold([ev(i, T0 + 7.0 * i + rng.uniform(-3, 3), item="abcd"[i % 4])
                     for i in range(30)], cfg)
    assert settle(human, cfg).hyg.bot == ""
    declared, _ = fold([ev(1, T0), ev(2, T0 + 30, automated=True)], cfg)
    assert settle(declared, cfg).hyg.bot.startswith("declared")


# ---------------------------------------------------------------- impressions, outliers


def test_an_impression_is_a_negative_only_if_not_engaged_before_its_timeout():
    cfg = config(impression_timeout=30.0)
    events = [ev(1, T0, "impression", item="a"), ev(2, T0 + 3, "impression", item="b"),
              ev(3, T0 + 10, "click", item="a"), ev(4, T0 + 100, "click", item="c")]
    state, trace = fold(events, cfg)
    steps = trace + settle_trace(state, cfg)
    assert verdicts(steps, "impression_negative") == ["2"]
    (neg,) = [s for s in steps if s.verdict == "impression_negative"]
    assert neg.t == T0 + 33 and neg.y == 0.0  # at its deadline, in event time
    assert "1" not in verdicts(steps, "impression_negative")


def test_a_ten_hour_dwell_is_an_outlier_with_and_without_segment_statistics():
    ten_hours = 36000.0
    for action in ("drop", "clip"):
        cfg = config(outlier_action=action)
        state, trace = fold([ev(1, T0, "dwell", dwell=ten_hours), ev(2, T0 + 60)], cfg)
        assert state.hyg.outliers == 1
        assert verdicts(trace, f"outlier_{'dropped' if action == 'drop' else 'clipped'}") == [
            "1"]
    seg = SegmentConfig()
    norms = {"d": (math.log(5.0), math.log(12.0), math.log(30.0))}  # typical dwells
    long = signal(ev(1, T0, "dwell", dwell=ten_hours, norms=norms), seg, 1)
    assert long.verdict == "outlier_dropped"
    typical = signal(ev(2, T0, "dwell", dwell=12.0, norms=norms), seg, 1)
    assert typical.verdict == "clean" and typical.y == pytest.approx(0.5)
    fences = SegmentConfig(outlier_rule="iqr", outlier_action="clip")
    clipped = signal(ev(3, T0, "dwell", dwell=ten_hours, norms=norms), fences, 1)
    assert clipped.verdict == "outlier_clipped" and 0.5 < clipped.y < 1.0


def test_normalization_makes_segments_comparable():
    seg = SegmentConfig()
    news = {"d": (math.log(5.0), math.log(10.0), math.log(20.0))}  # short reads
    video = {"d": (math.log(60.0), math.log(120.0), math.log(240.0))}  # long watches
    at_median = [signal(ev(1, T0, "dwell", dwell=d, norms=n), seg, 1).y
                 for d, n in ((10.0, news), (120.0, video))]
    assert at_median == [pytest.approx(0.5), pytest.approx(0.5)]
    raw = [engagement(ev(1, T0, "dwell", dwell=d), seg)[0] for d in (10.0, 120.0)]
    assert raw[1] - raw[0] > 0.5  # without normalization the segments are not comparable


def test_a_very_active_user_counts_less_per_action():
    seg = SegmentConfig(freq_power=0.5)
    norms = {"f": (0.0, math.log(4.0), math.log(8.0))}  # the median user: 4 actions
    calm = signal(ev(1, T0, norms=norms), seg, 4).importance
    busy = signal(ev(1, T0, norms=norms), seg, 64).importance
    assert calm == seg.click_importance
    assert busy == pytest.approx(seg.click_importance * (4 / 64) ** 0.5)


# ---------------------------------------------------------------- windows, statistics


def test_recent_window_counts_in_state_and_in_query_replies(tmp_path):
    cfg = config(recent_window=300.0)
    events = [ev(1, T0, "impression"), ev(2, T0 + 10), ev(3, T0 + 20, "dwell", dwell=30.0),
              ev(4, T0 + 400), ev(5, T0 + 410, "scroll", depth=0.5)]
    with Microtune.open(tmp_path / "mt.db", cfg) as mt:
        assert all(o.status == "applied" for o in mt.track_many(events))
        ranking = mt.rank(Query("u", (Candidate("a", X["a"]),), windows=True))
        assert ranking.windows["click"] == 1  # only the one 400 s in: the first is too old
        assert ranking.windows["scroll"] == 1
        assert ranking.windows["dwell"] == 0
        assert mt.rank(Query("u", (Candidate("a", X["a"]),))).windows is None


def test_segment_statistics_are_stamped_on_logged_events_and_replay_uses_them(tmp_path):
    cfg = config()
    rng = np.random.default_rng(1)
    events = [Event(id=f"{u}-{i}", user=f"user{u}", t=T0 + 40 * i + u, kind="dwell",
                    item="a", x=X["a"], dwell=float(np.exp(rng.normal(2.5, 0.5))))
              for i in range(12) for u in range(20)]
    with Microtune.open(tmp_path / "mt.db", cfg) as mt:
        mt.track_many(events)
        logged = [event_from_log(row.body) for u in range(20)
                  for row in mt.recorder.read(f"user{u}")]
        stamped = [e for e in logged if e.norms]
        assert stamped, "after MIN_SAMPLES dwells the segment has figures"
        q1, q2, q3 = stamped[-1].norms["d"]
        assert q1 < q2 < q3 and abs(q2 - 2.5) < 0.3
        for u in range(20):
            assert encode_state(mt.state(f"user{u}")) == encode_state(
                mt.replay(f"user{u}", use_snapshots=False))


def test_segment_statistics_need_enough_samples_and_ignore_bots():
    stats = SegmentStats()
    dwell = ev(1, T0, "dwell", dwell=10.0)
    for _ in range(MIN_SAMPLES + 200):
        stats.stamp("default", dwell, 0, observe=False)
    assert stats.figures("default", "d") is None
    stamped = [stats.stamp("news", dwell, 0) for _ in range(MIN_SAMPLES + 200)]
    assert stamped[0] is None  # no figures before MIN_SAMPLES
    assert stamped[-1]["d"] == pytest.approx((math.log(10.0),) * 3)
    assert stats.figures("news", "d") == pytest.approx((math.log(10.0),) * 3)


def test_the_hygiene_state_survives_a_snapshot_bit_for_bit():
    cfg = config()
    events = [ev(1, T0, "impression", item="b", session="s1", received=T0 + 0.3),
              ev(2, T0 + 2, "click", received=T0 + 2.2), ev(3, T0 + 1, "hover", hover=2.0),
              ev(4, T0 + 3, "dwell", dwell=8.0, norms={"d": (1.0, 2.0, 3.0)}),
              ev(5, T0 + 9, "impression", item="c"), ev(6, T0 + 12, "scroll", depth=0.4)]
    state, _ = fold(events, cfg)
    assert state.hyg.pending and state.hyg.impressions
    again = decode_state(encode_state(state))
    assert isinstance(again.hyg, Hygiene)
    assert encode_state(again) == encode_state(state)
    more = ev(5, T0 + 60)
    assert encode_state(apply(again, more, cfg)) == encode_state(apply(state, more, cfg))


# ---------------------------------------------------------------- what it buys


def test_hygiene_brings_humans_closer_to_their_true_taste_on_a_noisy_population(tmp_path):
    """Humans with tabs left open for hours, skewed clocks and late deliveries, plus bots:
    the learned weights of the humans agree better with their true taste with hygiene on."""
    pop = Population(humans=40, bots=6, seed=5)
    events = pop.events()
    means = {}
    for on in (False, True):
        cfg = TuningConfig(version=1, dim=pop.dim,
                           segments={"default": SegmentConfig(hygiene=on)})
        with Microtune.open(tmp_path / f"mt-{on}.db", cfg) as mt:
            assert all(o.ok for o in mt.track_many(events, timeout=300))
            states = {u: settle(mt.state(u), cfg) for u in pop.tastes}
            means[on] = float(np.mean([pop.agreement(u, mt.context.models.total(s, cfg))
                                       for u, s in states.items()]))
            if on:
                assert not any(s.hyg.bot for s in states.values()), "no human marked"
                bots = [mt.state(f"bot{b}").hyg.bot for b in range(pop.bots)]
                assert all(bots), bots
    assert means[True] > means[False] + 0.1, means


def test_a_bots_debug_plot_says_why_it_is_empty_and_warns_nothing(tmp_path):
    import warnings

    import numpy as np

    from actors import Microtune
    from actors.debug import plot_data, timeline
    from adapters.debug_plot import write
    from events import Event, TuningConfig

    with Microtune.open(tmp_path / "mt.db", TuningConfig(version=1, dim=2)) as mt:
        mt.track_many([Event(id=f"e{n}", user="crawler", t=100.0 + 10 * n, kind="click",
                             item="a", x=np.ones(2), automated=True) for n in range(3)])
        tl = timeline(mt.recorder, mt.configs, "crawler")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # matplotlib's "no artists with labels" included
            write(plot_data(tl), str(tmp_path / "crawler.png"))
    assert (tmp_path / "crawler.png").stat().st_size > 5000
    from actors.debug import _why_still

    assert _why_still(tl).startswith("marked a bot: declared")
