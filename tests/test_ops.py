"""The operators' tools on a store built by the real service path (NATS JetStream -> service
-> actors -> journal -> SQLite), run as `microtune` commands do."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import msgpack
import nats
import numpy as np
import pytest
from helpers import canonical

from actors import Microtune, encode_state
from actors import debug as debugging
from actors.configs import ConfigRegistry
from actors.learning import settle
from actors.replay import current_states, replay_user
from adapters.cli import main
from adapters.embedded import EmbeddedNats
from adapters.nats_service import Service, ServiceConfig
from adapters.population import Population, build_store
from events import SegmentConfig, TuningConfig
from events.codec import event_from_log, event_to_map
from store import open_recorder

ROOT = Path(__file__).resolve().parents[1]
POP = Population(humans=6, bots=1, sessions=2, views=8, dim=4, seed=11)
CFG = TuningConfig(version=1, dim=POP.dim)


async def _publish_all(url: str, events) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    acks = [await js.publish_async(f"microtune.events.{e.user}",
                                   msgpack.packb(event_to_map(e), use_bin_type=True))
            for e in events]
    await asyncio.gather(*acks)
    await nc.close()


def _build(store: Path, nats_dir: Path) -> int:
    """Publish the population's events through a real nats-server to the service; stop it
    (which snapshots every live user). Returns the number of events."""
    events = POP.events()

    async def run() -> None:
        server = EmbeddedNats(nats_dir).start()
        try:
            system = Microtune.open(store, CFG, snapshot_every=10)
            service = Service(system)
            await service.start(server.url)
            await _publish_all(server.url, events)
            while service.stats.applied < len(events):
                await asyncio.sleep(0.05)
            await service.stop()
        finally:
            server.stop()

    asyncio.run(run())
    return len(events)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("built")
    count = _build(base / "mt.db", base / "nats")
    return base / "mt.db", count


@pytest.fixture
def store(built, tmp_path):
    """A private copy of the built store (tests may change it)."""
    path, _ = built
    copy = tmp_path / "mt.db"
    shutil.copy(path, copy)
    return copy


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def opened(path: Path):
    recorder = open_recorder(path)
    return recorder, ConfigRegistry(recorder, CFG)


# ---------------------------------------------------------------- replay


def test_replay_one_user_up_to_a_seq_a_time_and_under_another_config(store, capsys):
    user = "human1"
    recorder, configs = opened(store)
    try:
        full = replay_user(recorder, configs, user, use_snapshots=False)
        at10 = replay_user(recorder, configs, user, until_seq=10, use_snapshots=False)
        tenth = event_from_log(list(recorder.read(user, until_seq=10))[-1].body)
    finally:
        recorder.close()
    code, out, _ = run(capsys, "replay", "--store", store, "--user", user, "--json")
    assert code == 0
    got = json.loads(out)
    assert got["seq"] == full.seq
    assert list(got["weights"].values()) == settle(full, CFG).w.tolist()

    _, out, _ = run(capsys, "replay", "--store", store, "--user", user, "--until-seq", 10,
                    "--json")
    assert json.loads(out)["seq"] == 10
    assert list(json.loads(out)["weights"].values()) == settle(at10, CFG).w.tolist()
    _, out, _ = run(capsys, "replay", "--store", store, "--user", user, "--until-time",
                    tenth.received, "--json")
    assert json.loads(out)["seq"] >= 10  # events received in the same instant come along

    toml = store.parent / "b.toml"
    toml.write_text("[tuning.segments.default]\noptimizer = 'adagrad'\nlr_max = 0.05\n")
    _, out, _ = run(capsys, "replay", "--store", store, "--user", user, "--config", toml,
                    "--json")
    counterfactual = json.loads(out)
    b = TuningConfig(version=2, dim=POP.dim,
                     segments={"default": SegmentConfig(optimizer="adagrad", lr_max=0.05)})
    recorder, configs = opened(store)
    try:
        expected = settle(replay_user(recorder, configs, user, config=b), b)
    finally:
        recorder.close()
    assert list(counterfactual["weights"].values()) == expected.w.tolist()
    assert list(counterfactual["weights"].values()) != got["weights"]
    assert any(abs(v) > 1e-6 for v in counterfactual["weights minus recorded"].values())


def test_replay_verify_passes_then_names_a_deliberately_corrupted_snapshot(store, capsys):
    code, out, _ = run(capsys, "replay", "--store", store, "--all", "--verify", "--json")
    assert code == 0 and json.loads(out)["checked_snapshots"] >= 6
    with sqlite3.connect(store) as db:  # one weight of one snapshot, nudged by 1e-12
        user, seq, raw = db.execute("SELECT user_id, seq, state FROM mt_snapshots "
                                    "WHERE user_id = 'human2' ORDER BY seq DESC").fetchone()
        snap = msgpack.unpackb(raw)
        w = np.frombuffer(snap["w"]).copy()
        w[1] += 1e-12
        snap["w"] = w.tobytes()
        db.execute("UPDATE mt_snapshots SET state = ? WHERE user_id = ? AND seq = ?",
                   (msgpack.packb(snap), user, seq))
    code, out, _ = run(capsys, "replay", "--store", store, "--all", "--verify", "--json")
    assert code == 1
    assert [m["user"] for m in json.loads(out)["mismatches"]] == ["human2"]
    code, _, _ = run(capsys, "replay", "--store", store, "--user", "human2", "--verify")
    assert code == 1
    code, _, _ = run(capsys, "replay", "--store", store, "--user", "human3", "--verify")
    assert code == 0


def test_replay_all_prints_every_user(built, capsys):
    path, count = built
    code, out, err = run(capsys, "replay", "--store", path, "--all", "--json")
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert sum(r["seq"] for r in lines) == count
    assert {r["user"] for r in lines} == {*POP.tastes, "bot0"}
    assert f"{count:,} events" in err


def test_missing_store_is_a_clear_error(tmp_path, capsys):
    code, _, err = run(capsys, "replay", "--store", tmp_path / "nope.db", "--all")
    assert code == 2 and "no store at" in err


# ---------------------------------------------------------------- debug


def test_debug_timeline_json_table_and_plot(built, capsys, tmp_path):
    path, _ = built
    png = tmp_path / "w.png"
    code, out, _ = run(capsys, "debug", "--store", path, "--user", "human0", "--json",
                       "--plot", png)
    assert code == 0
    got = json.loads(out)
    recorder, _ = opened(path)
    try:
        seqs = [r.seq for r in recorder.read("human0")]
    finally:
        recorder.close()
    assert [r["seq"] for r in got["rows"]] == seqs
    verdicts = {r["verdict"] for r in got["rows"]}
    assert "applied" in verdicts and "logged" not in verdicts
    learned = [r for r in got["rows"] if r["change"] is not None]
    assert learned and all(r["p"] is not None and r["rate"] > 0 for r in learned)
    assert all(len(r["moved"]) == 3 for r in learned)
    assert got["summary"]["session"]["number"] >= 2  # two sessions hours apart
    assert set(got["summary"]["recent_window"]) >= {"click", "impression"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    code, out, _ = run(capsys, "debug", "--store", path, "--user", "bot0", "--last", 5)
    assert code == 0 and "bot" in out and "timeline (last 5 of" in out


def test_debug_plot_of_a_human_and_a_bot_names_what_moved_and_warns_nothing(built, capsys,
                                                                            tmp_path, recwarn):
    path, _ = built
    recorder, configs = opened(path)
    try:
        human = debugging.plot_data(debugging.timeline(recorder, configs, "human1"))
        tl = debugging.timeline(recorder, configs, "bot0")
        bot = debugging.plot_data(tl)
    finally:
        recorder.close()
    for user, drawn in (("human1", human), ("bot0", bot)):
        png = tmp_path / f"{user}.png"
        code, _, err = run(capsys, "debug", "--store", path, "--user", user, "--plot", png)
        assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 30_000
        said = " ".join(err.split())  # the console wraps long lines
        assert drawn.title in said
        assert all(f"{d.name}: {d.why}" in said for d in drawn.highlighted)
    assert human.highlighted and human.empty is None
    assert {"impression", "click"} <= {s.label for s in human.events}
    # the fast clicker: its plot says since when and why it is a bot, and marks its events
    assert "marked a bot since" in bot.subtitle and tl.settled.hyg.bot in bot.subtitle
    assert "bot" in {s.label for s in bot.verdicts} and any(m.kind == "bot" for m in bot.marks)
    assert not recwarn.list, [str(w.message) for w in recwarn.list]


# ---------------------------------------------------------------- rollback


def test_rollback_restores_the_state_at_n_is_audited_and_can_be_undone(store, capsys):
    user = "human4"
    recorder, configs = opened(store)
    try:
        before = replay_user(recorder, configs, user)
        at_n = replay_user(recorder, configs, user, until_seq=7, use_snapshots=False)
    finally:
        recorder.close()
    code, _, err = run(capsys, "rollback", "--store", store, "--user", user, "--to-seq", 7,
                       "--why", "TICKET-42", "--by", "alice")
    assert code == 0 and f"--to-seq {before.seq}" in err
    recorder, configs = opened(store)
    try:
        after = replay_user(recorder, configs, user, use_snapshots=False)
        logged = event_from_log(list(recorder.read(user))[-1].body)
    finally:
        recorder.close()
    assert after.seq == before.seq + 1
    same = ("w", "m", "v", "t_last", "steps", "b1p", "b2p", "bucket", "segment", "hyg")
    assert [canonical(getattr(after, f)) for f in same] == [
        canonical(getattr(at_n, f)) for f in same]
    assert logged.kind == "rollback" and logged.to_seq == 7
    assert logged.extra["why"] == "TICKET-42" and logged.extra["by"] == "alice"

    code, _, _ = run(capsys, "rollback", "--store", store, "--user", user, "--to-seq",
                     before.seq)  # undo
    assert code == 0
    recorder, configs = opened(store)
    try:
        undone = replay_user(recorder, configs, user, use_snapshots=False)
    finally:
        recorder.close()
    assert [canonical(getattr(undone, f)) for f in same] == [
        canonical(getattr(before, f)) for f in same]

    code, _, err = run(capsys, "rollback", "--store", store, "--user", user, "--to-seq", 999)
    assert code == 2 and "refused" in err


# ---------------------------------------------------------------- export, import


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "msgpack"])
def test_export_import_round_trip_is_byte_identical(store, capsys, tmp_path, fmt):
    out_path = tmp_path / f"users.{fmt}"
    code, _, _ = run(capsys, "export", "--store", store, "--format", fmt, "--out", out_path)
    assert code == 0
    new_store = tmp_path / "new.db"
    code, _, _ = run(capsys, "import", out_path, "--store", new_store)
    assert code == 0

    def states(path):
        recorder, configs = opened(path)
        try:
            return {s.user: encode_state(s) for s in current_states(recorder, configs)}
        finally:
            recorder.close()

    original, restored = states(store), states(new_store)
    assert len(original) == 7 and original == restored
    # the segment models come along, so the imported store scores as the original did
    models = {}
    for path in (store, new_store):
        recorder, _configs = opened(path)
        models[path] = recorder.segment_models()
        recorder.close()
    assert models[store] and models[store] == models[new_store]
    # and the imported store goes on learning: a new event lands at the next seq
    with Microtune.open(new_store, CFG) as mt:
        before = mt.state("human0")
        e = POP.events()[0]._replace(id="after-import", user="human0", t=2e9, received=None)
        assert mt.track_many([e])[0].seq == before.seq + 1
    code, _, _ = run(capsys, "import", out_path, "--store", new_store)
    assert code == 2  # not into a store that has events


def test_export_only_listed_users(store, capsys, tmp_path):
    users = tmp_path / "users.txt"
    users.write_text("human1\nbot0\n")
    out_path = tmp_path / "some.jsonl"
    run(capsys, "export", "--store", store, "--format", "jsonl", "--users", users,
        "--out", out_path)
    lines = out_path.read_text().splitlines()
    assert json.loads(lines[0])["microtune_export"] == 1
    records = {r["user"]: r for r in map(json.loads, lines[1:])}
    assert sorted(records) == ["bot0", "human1"]
    assert records["bot0"]["bot"] and records["human1"]["bot"] is None
    assert len(records["human1"]["w"]) == POP.dim + 1


# ---------------------------------------------------------------- forget


def _rows_mentioning(path: Path, needle: str) -> list[tuple[str, str]]:
    found = []
    with sqlite3.connect(path) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for row in db.execute(f"SELECT * FROM {table}"):
                for value in row:
                    text = value if isinstance(value, str) else None
                    if isinstance(value, bytes):
                        text = value.decode("latin-1")
                    if text is not None and needle in text:
                        found.append((table, str(row)[:80]))
    return found


def test_forget_leaves_no_row_of_the_user_anywhere(store, capsys):
    assert _rows_mentioning(store, "human3")
    code, _, err = run(capsys, "forget", "--store", store, "--user", "human3", "--why",
                       "GDPR-0042", "--yes")
    assert code == 0 and "audit record 1" in err
    assert _rows_mentioning(store, "human3") == []
    recorder, _ = opened(store)
    try:
        ((_, body),) = recorder.audit_records()
        assert b"human" not in body
        audit = msgpack.unpackb(body)
        assert audit["action"] == "forget" and audit["why"] == "GDPR-0042"
        assert _rows_mentioning(store, "human2")  # the others are untouched
    finally:
        recorder.close()


# ---------------------------------------------------------------- against a running service


def test_rollback_forget_and_stats_through_a_running_service(store, tmp_path, capsys,
                                                             monkeypatch):
    token = "t0ken-of-the-ops-team"

    async def scenario() -> None:
        server = EmbeddedNats(tmp_path / "nats").start()
        system = Microtune.open(store, CFG)
        service = Service(system, ServiceConfig(admin_tokens={"ops-team": token}))
        try:
            await service.start(server.url)
            live = system.state("human5")
            args = ("--nats-url", server.url)
            # without the admin token, or with a wrong one, nothing changes
            monkeypatch.delenv("MICROTUNE_ADMIN_TOKEN", raising=False)
            code = await asyncio.to_thread(main, ["forget", "--user", "human1", "--yes", *args])
            assert code != 0 and len(list(system.recorder.read("human1"))) > 0
            monkeypatch.setenv("MICROTUNE_ADMIN_TOKEN", "a-guess-of-some-length")
            code = await asyncio.to_thread(main, ["forget", "--user", "human1", "--yes", *args])
            assert code != 0 and len(list(system.recorder.read("human1"))) > 0
            assert service.stats.admin_refused == 1  # the first never reached the service
            monkeypatch.setenv("MICROTUNE_ADMIN_TOKEN", token)
            code = await asyncio.to_thread(main, ["rollback", "--user", "human5", "--to-seq",
                                                  "3", *args])
            assert code == 0
            assert system.state("human5").seq == live.seq + 1
            expected = replay_user(system.recorder, system.configs, "human5", until_seq=3)
            assert system.state("human5").w.tobytes() == expected.w.tobytes()
            code = await asyncio.to_thread(main, ["forget", "--user", "human1", "--yes",
                                                  *args])
            assert code == 0
            assert list(system.recorder.read("human1")) == []
            audit = msgpack.unpackb(system.recorder.audit_records()[-1][1])
            assert audit["by"].startswith("ops-team")  # the token's name, not a claim
            code = await asyncio.to_thread(main, ["forget", "--user", "nobody", "--yes",
                                                  "--nats-url", server.url, "--prefix", "x"])
            assert code != 0  # no service answers on that prefix
            capsys.readouterr()
            code = await asyncio.to_thread(main, ["stats", "--store", str(store), "--json",
                                                  *args])
            stats = json.loads(capsys.readouterr().out)
            assert code == 0
            assert stats["service"]["live_actors"] >= 1
            assert stats["store"]["users"] == 6 and stats["audit_records"] == 1
            assert stats["segments"]["default"]["bots"] == 1
            # the segment model checkpointed when the store's builder shut down
            assert stats["segment_models"]["default"]["steps"] > 0
            assert "segment_model_steps" in stats["service"]
            assert "alerts" in stats["service"]
            code = await asyncio.to_thread(main, ["stats", "--store", str(store), *args])
            table = capsys.readouterr().out
            assert code == 0 and "service (live counters)" in table and "alerts" in table
        finally:
            await service.stop()
            server.stop()

    asyncio.run(scenario())


# ---------------------------------------------------------------- streaming


MEASURE = """
import resource, sys
from adapters.cli import main
code = main(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


def _peak_rss_mib(*argv) -> tuple[int, float, str]:
    proc = subprocess.run([sys.executable, "-c", MEASURE, *map(str, argv)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, int(proc.stderr.strip().splitlines()[-1]) / 1024, proc.stderr


@pytest.mark.slow
def test_a_million_event_store_replays_and_exports_in_constant_memory(tmp_path):
    """Peak memory does not grow with the log: 1M events cost no more than 200k (the log's
    bodies alone are ~200 MB, as Python objects ~1 GB; SQLite's page cache is capped at
    64 MiB a connection, which the smaller store does not fill: hence the slack)."""
    peaks = {}
    for events, users in ((200_000, 2_000), (1_000_000, 10_000)):
        path = tmp_path / f"{events}.db"
        build_store(path, users=users, events=events, dim=4)
        code, replay_peak, err = _peak_rss_mib("replay", "--store", path, "--all")
        assert code == 0, err
        assert f"{users:,} users, {events:,} events" in err
        code, export_peak, err = _peak_rss_mib("export", "--store", path, "--format",
                                               "msgpack", "--out", tmp_path / "all.msgpack")
        assert code == 0, err
        peaks[events] = (replay_peak, export_peak)
    (small_replay, small_export), (big_replay, big_export) = peaks[200_000], peaks[1_000_000]
    assert big_replay < small_replay + 48, peaks
    assert big_export < small_export + 48, peaks
