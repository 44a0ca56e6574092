"""Backfill: history published with `bf: true` is learned at its own (trusted) times.

The contrast this file documents: three hours of a user's events published in one burst
*without* the flag look to data hygiene like a client clock hours behind (the offsets
`received - t` span three hours), so the events are squashed to their receive time, the
burst then paces like hundreds of clicks a second and the user is marked a bot: nothing
learns. The same burst *with* the flag keeps its event times, learns in event-time order and
marks no one.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path

import msgpack
import nats
import numpy as np
import pytest
from helpers import fold, until

from actors import Microtune, encode_state, replay_user
from actors.configs import ConfigRegistry
from actors.debug import timeline
from actors.learning import settle
from actors.replay import seq_at_time
from adapters.backfill import detect_format, prepare, read_records
from adapters.cli import main
from adapters.nats_service import Service, ServiceConfig
from events import Event, SegmentConfig, TuningConfig
from events.codec import decode_event, encode_logged_event, event_from_log, event_to_map
from events.errors import Rejected
from store import open_recorder

DIM = 4
# "live": a segment whose late events are dropped, with a short lateness window so that a
# test publishing in real time sees its frontier move (drops of every kind for `stats`)
CFG = TuningConfig(version=1, dim=DIM, segments={
    "default": SegmentConfig(),
    "live": SegmentConfig(late_policy="drop", lateness=0.5)})
TASTES = {0: np.array([2.0, -2.0, 1.0, -1.0]), 1: np.array([-2.0, 2.0, -1.0, 1.0]),
          2: np.array([1.0, 1.0, -2.0, -2.0])}
T0 = 1.7e9


def history(user: str, taste: np.ndarray, end: float, seed: int, hours: float = 3.0,
            backfill: bool = True) -> list[dict]:
    """`hours` of a human's wire-format events ending at `end`, oldest first: an item shown
    every 15-45 s, clicked (then read for a while) with probability sigmoid(taste . x)."""
    rng = np.random.default_rng(seed)
    out: list[dict] = []
    t, n = end - hours * 3600, 0
    while t < end - 60:
        x = np.eye(DIM)[rng.integers(DIM)]
        base = {"v": 1, "u": user, "i": f"item{n}", "x": x.tolist()}
        if backfill:
            base["bf"] = True
        out.append({**base, "id": f"{n}i", "t": t, "k": "impression"})
        if rng.random() < 1.0 / (1.0 + math.exp(-float(taste @ x))):
            out.append({**base, "id": f"{n}c", "t": t + 3.0, "k": "click"})
            out.append({**base, "id": f"{n}d", "t": t + 8.0, "k": "dwell",
                        "d": float(rng.lognormal(3.0, 0.5))})
        t += float(rng.uniform(15.0, 45.0))
        n += 1
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))



async def running(tmp_path: Path, url: str) -> tuple[Microtune, Service]:
    system = Microtune.open(tmp_path / "mt.db", CFG)
    service = Service(system, ServiceConfig())
    await service.start(url)
    return system, service



async def publish(js, maps: list[dict]) -> None:
    """Publish as a backfill importer does: user-qualified Nats-Msg-Id, every ack awaited."""
    acks = [await js.publish_async(f"microtune.events.{m['u']}", msgpack.packb(m),
                                   headers={"Nats-Msg-Id": f"{m['u']}.{m['id']}"})
            for m in maps]
    for ack in await asyncio.gather(*acks):
        assert not ack.duplicate


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------- end to end, through NATS


def test_a_history_burst_learns_with_the_flag_and_marks_bots_without_it(server, tmp_path,
                                                                         capsys):
    now = time.time()
    flagged = {f"hist{k}": history(f"hist{k}", TASTES[k], now, seed=k) for k in TASTES}
    plain = {f"plain{k}": history(f"plain{k}", TASTES[k], now, seed=k, backfill=False)
             for k in TASTES}
    total = sum(map(len, flagged.values())) + sum(map(len, plain.values())) + 11

    async def live_user(js) -> None:
        """A user with a good clock, in real time: a ten-hour dwell, then one live event 15
        minutes late and the same as history: drops for `stats`, and late against history."""
        def now_event(n: str, kind: str = "click", **more) -> dict:
            return {"v": 1, "id": n, "u": "noisy", "t": time.time(), "k": kind, "i": "a",
                    "x": [1.0, 0, 0, 0], **more}

        await publish(js, [{"v": 1, "id": "seg", "u": "noisy", "t": time.time(),
                            "k": "segment", "g": "live"}])
        for n in range(8):
            await publish(js, [now_event(f"n{n}")] if n != 4 else
                          [now_event("long", "dwell", d=36000.0)])
            await asyncio.sleep(0.3)
        await publish(js, [now_event("late", t=time.time() - 900)])
        await publish(js, [now_event("old", t=time.time() - 900, bf=True)])

    async def scenario() -> None:
        system, service = await running(tmp_path, server.url)
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        try:
            for maps in (*flagged.values(), *plain.values()):
                await publish(js, maps)
            await live_user(js)
            await until(lambda: service.stats.applied == total, timeout=60,
                        what="every event applied")
            assert not service.stats.rejected

            for k, user in enumerate(flagged):
                state = settle(system.state(user), CFG)
                assert state.hyg.bot == ""  # a burst of history is not a bot
                assert state.hyg.skew() == 0.0  # no offsets: history says nothing of clocks
                assert state.hyg.late == 0
                assert state.steps > 200
                assert cosine(state.w[1:], TASTES[k]) > 0.8, state.w
                # sessions follow event time: three hours of 15-45 s gaps are one session
                assert state.hyg.session == 1
            for user in plain:  # the same burst without the flag: as before this change
                state = settle(system.state(user), CFG)
                assert state.hyg.bot.startswith("rate"), state.hyg.bot
                assert state.hyg.skew() > 30  # "a clock behind": times squashed to receipt
                assert state.steps <= 40  # learned from its first actions only
                assert state.hyg.ignored > 300

            # the log is the truth: live state == replay from seq 1, bit for bit
            for user in (*flagged, *plain, "noisy"):
                replayed = replay_user(system.recorder, system.configs, user,
                                       use_snapshots=False)
                assert encode_state(system.state(user)) == encode_state(replayed)
            logged = [event_from_log(r.body) for r in system.recorder.read("hist0")]
            assert all(e.backfill and e.received is not None for e in logged)
        finally:
            await nc.close()
            await service.stop()  # snapshots every live user

    asyncio.run(scenario())

    db = tmp_path / "mt.db"
    recorder = open_recorder(db)
    try:
        rows = {r.event_id: r for r in timeline(recorder, ConfigRegistry(recorder, CFG),
                                                "noisy").rows}
    finally:
        recorder.close()
    assert rows["long"].verdict == "outlier_dropped"
    assert rows["late"].verdict == "late_dropped"  # live and late: the policy drops it
    # history behind the frontier: learned at once, by its own arrival
    assert rows["old"].verdict == "applied" and rows["old"].learned_at == rows["old"].seq

    code, _, err = run(capsys, "replay", "--store", db, "--all", "--verify")
    assert code == 0, err
    code, out, _ = run(capsys, "stats", "--store", db, "--json")
    assert code == 0
    stats = json.loads(out)
    seg, live = stats["segments"]["default"], stats["segments"]["live"]
    assert seg["users"] == 6 and live["users"] == 1
    assert seg["bots"] == 3 and seg["bot_reasons"] == {"rate": 3}
    assert seg["ignored"] > 900
    assert live["late"] == live["late_dropped"] == 1
    assert live["outliers"] == live["outliers_dropped"] == 1
    assert live["bots"] == 0
    assert stats["hygiene"]["bots"] == 3 and stats["hygiene"]["late_dropped"] == 1
    code, out, _ = run(capsys, "stats", "--store", db)
    assert code == 0
    assert "data hygiene" in out and "rate 3" in out and "(all)" in out


def test_import_events_publishes_a_file_as_history(server, tmp_path, capsys):
    now = time.time()
    maps = history("ann", TASTES[0], now, seed=7, hours=1.0, backfill=False)
    lines = [json.dumps(m) for m in maps]
    lines.insert(5, lines[3])  # the same <user>.<id> twice: JetStream's dedupe drops it
    same_id = {**maps[0], "u": "bob"}  # ids are unique per user: bob's "0i" is not ann's
    lines.append(json.dumps(same_id))
    lines += ["not json", json.dumps([1, 2]), json.dumps({**maps[1], "id": "x1", "u": "a.b"}),
              json.dumps({k: v for k, v in maps[2].items() if k != "t"} | {"id": "x2"}), ""]
    path = tmp_path / "history.jsonl"
    path.write_text("\n".join(lines) + "\n")
    published = len(maps) + 1

    async def scenario() -> None:
        system, service = await running(tmp_path, server.url)
        try:
            code = await asyncio.to_thread(main, ["import-events", str(path), "--nats-url",
                                                  server.url, "--json"])
            report = json.loads(capsys.readouterr().out)
            assert code == 1  # some records were refused
            assert report["published"] == published
            assert report["duplicates"] == 1
            assert report["refused"] == {"malformed": 2, "invalid_id": 1, "missing_field": 1}
            assert report["failed"] == {}
            assert report["records"] == len(lines) - 1  # the blank line is no record
            assert {e["reason"] for e in report["examples"]} == {"malformed", "invalid_id",
                                                                 "missing_field"}
            await until(lambda: service.stats.applied == published, timeout=60, what="the import")
            logged = [event_from_log(r.body) for r in system.recorder.read("ann")]
            assert len(logged) == len(maps) and all(e.backfill for e in logged)
            state = settle(system.state("ann"), CFG)
            assert state.hyg.bot == "" and state.steps > 50
            assert cosine(state.w[1:], TASTES[0]) > 0.7
            assert len(list(system.recorder.read("bob"))) == 1

            # the same events again, as a msgpack stream with packed features: all
            # duplicates within JetStream's window, nothing published twice
            again = tmp_path / "again.msgpack"
            with again.open("wb") as f:
                for m in maps:
                    f.write(msgpack.packb({**m, "x": np.asarray(m["x"], "<f8").tobytes()}))
            code = await asyncio.to_thread(main, ["import-events", str(again), "--nats-url",
                                                  server.url, "--json"])
            report = json.loads(capsys.readouterr().out)
            assert code == 0
            assert report["published"] == 0 and report["duplicates"] == len(maps)
            # no service on that prefix: a clear error before anything is sent
            code = await asyncio.to_thread(main, ["import-events", str(again), "--nats-url",
                                                  server.url, "--prefix", "nobody"])
            assert code == 2
            assert "no JetStream stream" in capsys.readouterr().err
        finally:
            await service.stop()

    asyncio.run(scenario())


def test_import_events_needs_a_password_from_the_environment_or_a_file(tmp_path, capsys,
                                                                       monkeypatch):
    path = tmp_path / "h.jsonl"
    path.write_text("")
    monkeypatch.delenv("MICROTUNE_NATS_PASSWORD", raising=False)
    code, _, err = run(capsys, "import-events", path, "--nats-url", "nats://127.0.0.1:1",
                       "--nats-user", "svc")
    assert code == 2 and "MICROTUNE_NATS_PASSWORD" in err


# ---------------------------------------------------------------- hygiene, in process


def ev(n: int | str, t: float, kind: str = "click", **fields) -> Event:
    return Event(id=str(n), user="u", t=t, kind=kind, item=fields.pop("item", "a"),
                 x=np.eye(DIM)[0], **fields)


def test_history_behind_the_frontier_is_neither_late_nor_dropped_and_keeps_its_time():
    cfg = TuningConfig(version=1, dim=DIM,
                       segments={"default": SegmentConfig(late_policy="drop")})
    live = [ev(i, T0 + 30 * i, received=T0 + 30 * i + 0.2) for i in range(6)]
    state, _ = fold(live, cfg)
    frontier, session, windows = state.hyg.frontier, state.hyg.session_events, state.hyg.windows
    old = [ev(f"h{i}", T0 - 3600 + 40 * i, received=T0 + 200, backfill=True, item="b")
           for i in range(5)]
    after, trace = fold(old, cfg, state)
    learned = {s.event_id: s.t for s in trace if s.verdict == "applied"}
    assert learned == {f"h{i}": T0 - 3600 + 40 * i for i in range(5)}  # own times, at once
    h = after.hyg
    assert h.late == 0 and h.frontier == frontier
    assert h.offsets == state.hyg.offsets  # nothing learned about the device's clock
    assert h.session_events == session and h.windows == windows  # the present is unchanged
    assert after.t_last == state.t_last  # an older event: no decay, the clock stays
    # the same events without the flag: late, and dropped by this segment's policy
    unflagged, trace = fold([e._replace(backfill=False) for e in old], cfg, state)
    assert unflagged.hyg.late == 5
    assert [s.verdict for s in trace] == ["late_dropped"] * 5


def test_a_history_burst_is_not_paced_but_what_it_says_still_counts():
    cfg = TuningConfig(version=1, dim=DIM)
    # 100 clicks received within a second, one every 20 s of event time: no pacing at all
    burst = [ev(i, T0 + 20 * i, received=T0 + 3000 + 0.01 * i, backfill=True)
             for i in range(100)]
    state, _ = fold(burst, cfg)
    assert settle(state, cfg).hyg.bot == ""
    assert state.hyg.last_action == -1.0 and state.hyg.intervals == 0  # not paced
    # even clicks 20 ms apart in event time: the flag means "do not judge the pace" ...
    fast = [ev(i, T0 + 0.02 * i, received=T0 + 10, backfill=True) for i in range(100)]
    assert settle(fold(fast, cfg)[0], cfg).hyg.bot == ""
    # ... but sub-human dwells and a declared automaton are what the events say
    shorts = [ev(i, T0 + 20 * i, "dwell", dwell=0.02, received=T0 + 3000, backfill=True)
              for i in range(10)]
    assert settle(fold(shorts, cfg)[0], cfg).hyg.bot.startswith("short dwell")
    declared = [ev(1, T0, received=T0 + 3000, backfill=True, automated=True)]
    assert settle(fold(declared, cfg)[0], cfg).hyg.bot.startswith("declared")


def test_history_engaged_later_in_the_same_burst_is_no_negative():
    cfg = TuningConfig(version=1, dim=DIM)
    live = [ev(i, T0 + 30 * i, received=T0 + 30 * i) for i in range(4)]
    state, _ = fold(live, cfg)
    old = [ev("imp", T0 - 600, "impression", item="z", received=T0 + 100, backfill=True),
           ev("clk", T0 - 597, "click", item="z", received=T0 + 100, backfill=True),
           ev("imp2", T0 - 500, "impression", item="y", received=T0 + 100, backfill=True)]
    state, trace = fold(old, cfg, state)
    state, more = fold([ev(9, T0 + 200, received=T0 + 200)], cfg, state)
    verdicts = {s.event_id: s.verdict for s in trace + more}
    assert verdicts["imp"] == "impression_engaged"
    assert verdicts["imp2"] == "impression_negative"  # at the next release, at its deadline
    assert [s.t for s in more if s.event_id == "imp2"] == [T0 - 470]


def test_a_flagged_event_in_the_future_is_placed_at_its_receipt():
    cfg = TuningConfig(version=1, dim=DIM)
    _, trace = fold([ev(1, T0 + 3600, received=T0, backfill=True)], cfg)
    assert trace[0].t == T0


# ---------------------------------------------------------------- wire format


def test_bf_on_the_wire_is_a_bool_logged_and_replayed():
    body = msgpack.packb({"v": 1, "id": "e", "u": "ann", "t": 5.0, "k": "click", "i": "a",
                          "x": [1.0, 0, 0, 0], "bf": True})
    event = decode_event(body)
    assert event.backfill and "bf" not in event.extra
    assert event_from_log(encode_logged_event(event)).backfill
    assert event_to_map(event)["bf"] is True
    assert "bf" not in event_to_map(event._replace(backfill=False))  # old encodings unchanged
    assert not event_from_log(encode_logged_event(event._replace(backfill=False))).backfill
    with pytest.raises(Rejected) as refused:
        decode_event(msgpack.packb({**msgpack.unpackb(body), "bf": 1}))
    assert refused.value.reason.value == "wrong_type" and refused.value.field == "bf"


def test_prepare_sets_the_flag_and_the_user_qualified_message_id():
    user, msg_id, payload = prepare({"v": 1, "id": "e7", "u": "ann", "t": 5, "k": "click",
                                     "i": "a", "x": [1, 0, 0, 0], "bf": False, "z": 1})
    assert (user, msg_id) == ("ann", "ann.e7")
    assert msgpack.unpackb(payload)["bf"] is True and decode_event(payload).extra == {"z": 1}


def test_records_are_read_from_json_lines_or_msgpack_and_broken_input_is_named(tmp_path):
    good = {"v": 1, "id": "e", "u": "ann", "t": 5, "k": "click", "i": "a"}
    stream = tmp_path / "events.bin"  # no telling suffix: the content decides
    stream.write_bytes(msgpack.packb(good) * 2 + msgpack.packb(good)[:-3])
    assert detect_format(stream) == "msgpack"
    with stream.open("rb") as f:
        records = [r for r, _ in read_records(f, "msgpack")]
    assert records[:2] == [good, good]
    assert isinstance(records[2], Rejected) and "truncated" in records[2].detail
    lines = tmp_path / "events.txt"
    lines.write_text(json.dumps(good) + "\n{oops\n")
    assert detect_format(lines) == "jsonl"
    with lines.open("rb") as f:
        (first, _), (second, _) = read_records(f, "jsonl")
    assert first == good and second.reason.value == "malformed"


# ---------------------------------------------------------------- replay by event time


def test_replay_until_time_by_event_time_slices_a_backfill(tmp_path, capsys):
    db = tmp_path / "mt.db"
    imported = T0 + 86400  # the whole history arrives within one second, a day later
    old = [ev(i, T0 + 60 * i, received=imported + 0.001 * i, backfill=True,
              item="ab"[i % 2]) for i in range(12)]
    live = [ev(f"l{i}", imported + 30 * i, received=imported + 30 * i + 0.1)
            for i in range(3)]
    with Microtune.open(db, CFG) as mt:
        assert all(o.status == "applied" for o in mt.track_many([*old, *live]))
    cut = T0 + 60 * 4.5  # after the fifth history event
    recorder = open_recorder(db)
    try:
        configs = ConfigRegistry(recorder, CFG)
        assert seq_at_time(recorder, "u", cut, "event") == 5
        assert seq_at_time(recorder, "u", cut) == 0  # by receipt the history is one instant
        assert seq_at_time(recorder, "u", imported + 0.05, "received") == 12
        expected = settle(replay_user(recorder, configs, "u", until_seq=5), CFG)
        with pytest.raises(ValueError):
            seq_at_time(recorder, "u", cut, "wall")
    finally:
        recorder.close()
    code, out, _ = run(capsys, "replay", "--store", db, "--user", "u", "--until-time", cut,
                       "--time-basis", "event", "--json")
    assert code == 0
    got = json.loads(out)
    assert got["seq"] == 5 and list(got["weights"].values()) == expected.w.tolist()
    code, _, err = run(capsys, "replay", "--store", db, "--user", "u", "--until-time", cut)
    assert code == 2 and "no events" in err  # received basis (the default): nothing before
    with pytest.raises(SystemExit):
        main(["replay", "--store", str(db), "--user", "u", "--time-basis", "event"])
