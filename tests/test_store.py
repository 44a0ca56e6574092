"""The log on SQLite and PostgreSQL: order, uniqueness, atomic batches, streaming, journal."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from actors import Microtune, encode_state, replay_user
from actors.configs import ConfigRegistry
from events import Event, TuningConfig, encode_logged_event
from store import AppendConflict, Journal, Snapshot, StoredEvent, WriteRequest, open_recorder

CFG = TuningConfig(version=1, dim=3)


def row(user: str, seq: int, event_id: str | None = None) -> StoredEvent:
    return StoredEvent(user, seq, event_id or f"{user}-{seq}", f"body {user} {seq}".encode())


@pytest.fixture
def recorder(store_url):
    rec = open_recorder(store_url)
    yield rec
    rec.close()


def test_reads_are_ordered_by_seq_whatever_the_insert_order(recorder):
    recorder.append([row("bob", 3), row("bob", 1), row("alice", 2), row("alice", 1)])
    recorder.append([row("bob", 2)])
    assert [r.seq for r in recorder.read("bob")] == [1, 2, 3]
    assert [r.seq for r in recorder.read("bob", after_seq=1, until_seq=2)] == [2]
    assert [(r.user, r.seq) for r in recorder.read_all()] == [
        ("alice", 1), ("alice", 2), ("bob", 1), ("bob", 2), ("bob", 3)
    ]
    assert recorder.last_seq("bob") == 3 and recorder.last_seq("nobody") == 0
    assert list(recorder.users()) == ["alice", "bob"]


def test_event_ids_are_unique_per_user_and_a_refused_batch_writes_nothing(recorder):
    recorder.append([row("bob", 1, "e1")])
    recorder.append([row("alice", 1, "e1")])  # same id, other user: fine
    with pytest.raises(AppendConflict) as info:
        recorder.append([row("carol", 1), row("bob", 2, "e1")])
    assert info.value.duplicate_ids == {("bob", "e1")}
    assert recorder.last_seq("carol") == 0  # the whole batch was rolled back
    with pytest.raises(AppendConflict) as info:
        recorder.append([row("bob", 1, "other")])
    assert info.value.taken_seqs == {("bob", 1)}
    assert recorder.count_events() == 2


def test_snapshots_latest_and_bounded(recorder):
    recorder.save_snapshots([Snapshot("bob", 5, 1, b"five"), Snapshot("bob", 9, 1, b"nine")])
    recorder.save_snapshots([Snapshot("bob", 9, 1, b"again")])  # same seq: kept as it was
    assert recorder.latest_snapshot("bob").state == b"nine"
    assert recorder.latest_snapshot("bob", max_seq=8).state == b"five"
    assert recorder.latest_snapshot("carol") is None


def test_config_versions_are_append_only(recorder):
    assert recorder.save_config(1, b"one")
    assert recorder.save_config(1, b"one")  # idempotent
    assert not recorder.save_config(1, b"changed")  # never replaced
    assert recorder.configs() == {1: b"one"}


def test_journal_commits_many_requests_in_one_transaction(recorder):
    journal = Journal(recorder)
    done = threading.Semaphore(0)
    errors = []

    def cb(exc):
        errors.append(exc)
        done.release()

    # hold the writer busy so that the requests gather into one batch
    gate = threading.Event()
    journal.write(WriteRequest((), (), lambda _exc: gate.wait(5)))
    for i in range(200):
        journal.write(WriteRequest([row(f"user{i}", 1)], (), cb))
    gate.set()
    for _ in range(200):
        assert done.acquire(timeout=10)
    journal.close()
    assert errors == [None] * 200
    assert recorder.count_events() == 200
    assert journal.stats.commits <= 3  # the gate request, then one or two group commits


def test_journal_splits_a_batch_around_a_duplicate(recorder):
    recorder.append([row("bob", 1, "dup")])
    journal = Journal(recorder)
    results = {}
    gate = threading.Event()
    finished = threading.Semaphore(0)
    journal.write(WriteRequest((), (), lambda _exc: gate.wait(5)))
    for user, r in [("alice", row("alice", 1)), ("bob", row("bob", 2, "dup")),
                    ("carol", row("carol", 1))]:
        journal.write(WriteRequest([r], (), lambda exc, u=user: (
            results.__setitem__(u, exc), finished.release())))
    gate.set()
    for _ in range(3):
        assert finished.acquire(timeout=10)
    journal.close()
    assert results["alice"] is None and results["carol"] is None
    assert isinstance(results["bob"], AppendConflict)
    assert results["bob"].duplicate_ids == {("bob", "dup")}
    assert recorder.count_events() == 3


def test_crash_between_append_and_apply_recovers_the_committed_state(store_url):
    """Events committed to the log but never applied (the process died in between) are part
    of the state after a restart, exactly as a replay of the log gives it."""
    rng = np.random.default_rng(7)
    events = [
        Event(id=f"e{i}", user="bob", t=1000.0 + 60 * i, kind="click", item="a",
              x=rng.normal(size=3), config=1)
        for i in range(12)
    ]
    with Microtune.open(store_url, CFG) as mt:
        assert all(o.ok for o in mt.track_many(events[:8]))
    # what a crashed process leaves behind: the journal committed, the actor never applied
    recorder = open_recorder(store_url)
    recorder.append([
        StoredEvent("bob", 9 + i, e.id, encode_logged_event(e)) for i, e in enumerate(events[8:])
    ])
    recorder.close()
    with Microtune.open(store_url, CFG) as mt:
        live = mt.state("bob")
        assert live.seq == 12
        replayed = replay_user(mt.recorder, mt.configs, "bob", use_snapshots=False)
        assert encode_state(live) == encode_state(replayed)
        # a redelivery of a committed event is recognised as a repeat
        assert mt.track_many([events[10]])[0].status == "duplicate"


def test_config_registry_reloads_history_and_refuses_dimension_change(store_url):
    rec = open_recorder(store_url)
    reg = ConfigRegistry(rec, CFG)
    v2 = reg.add(TuningConfig(version=1, dim=3, segments=CFG.segments))
    assert v2.version == 2 and reg.current.version == 2
    with pytest.raises(Exception, match="dimension"):
        reg.add(TuningConfig(version=1, dim=4))
    again = ConfigRegistry(rec, CFG)
    assert sorted(again.versions()) == [1, 2] and again.current.version == 2
    rec.close()


def test_journal_survives_a_dropped_database_connection(pg_url):
    """The server kills the journal's connection: the next commit fails, is retried on a new
    connection, and every requester hears back once, with its rows written once."""
    import psycopg
    from conftest import PG_URL

    recorder = open_recorder(pg_url)
    journal = Journal(recorder)
    journal.write(WriteRequest([row("ann", 1)]))
    journal.flush()
    writer_pid = recorder._writer.driver_connection.info.backend_pid
    dsn = PG_URL.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", (writer_pid,)).fetchone()[0]
    outcomes = []
    finished = threading.Semaphore(0)
    for seq in (2, 3):
        journal.write(WriteRequest([row("ann", seq)], (), lambda exc: (
            outcomes.append(exc), finished.release())))
    for _ in range(2):
        assert finished.acquire(timeout=30)
    journal.close()
    assert outcomes == [None, None]
    assert journal.stats.retries >= 1
    assert [r.seq for r in recorder.read("ann")] == [1, 2, 3]
    recorder.close()


def test_scan_is_one_point_in_time_in_code_point_order(recorder):
    # "B" < "a" < "ä" in code points; a locale collation would say otherwise
    users = ["a", "B", "ä", "zed"]
    recorder.append([row(u, s) for u in users for s in (1, 2, 3)])
    recorder.save_snapshots([Snapshot("a", 2, 1, b"snap-a-2"), Snapshot("a", 1, 1, b"old"),
                             Snapshot("zed", 3, 1, b"snap-zed-3")])
    scan = recorder.scan()
    first = next(scan)
    # a writer goes on meanwhile: the scan does not see it
    recorder.append([row("B", 4), row("new", 1)])
    entries = [first, *scan]
    assert [e.user for e in entries] == sorted(users)
    by_user = {e.user: e for e in entries}
    assert by_user["a"].snapshot.state == b"snap-a-2"
    assert [r.seq for r in by_user["a"].events] == [3]  # only after the snapshot
    assert by_user["zed"].events == [] and by_user["zed"].snapshot.seq == 3
    assert [r.seq for r in by_user["B"].events] == [1, 2, 3]
    full = {e.user: e for e in recorder.scan(full=True)}
    assert [r.seq for r in full["a"].events] == [1, 2, 3]
    assert [r.seq for r in full["B"].events] == [1, 2, 3, 4]  # a new scan sees it


def test_forget_deletes_only_that_user_and_keeps_an_audit_record(recorder):
    recorder.append([row(u, s) for u in ("ann", "bob") for s in (1, 2)])
    recorder.save_snapshots([Snapshot("ann", 2, 1, b"s"), Snapshot("bob", 2, 1, b"s")])
    assert recorder.forget("ann", b"audit") == (2, 1, 1)
    assert list(recorder.read("ann")) == [] and recorder.latest_snapshot("ann") is None
    assert [r.seq for r in recorder.read("bob")] == [1, 2]
    assert recorder.audit_records() == [(1, b"audit")]
    assert recorder.counts()["users"] == 1
