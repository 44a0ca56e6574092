"""Fencing (store/fencing.py): a batch from a writer whose partition was claimed since is
refused by the store itself, on SQLite and PostgreSQL; the journal tells exactly the
requests of the lost partitions and commits the others."""

from __future__ import annotations

import threading

import pytest

from events.partitions import partition_of
from store import Journal, WriteRequest, open_recorder
from store.fencing import Fence, Fenced
from store.recorder import StoredEvent

P = 4


def _users_by_partition() -> dict[int, str]:
    found: dict[int, str] = {}
    n = 0
    while len(found) < P:
        found.setdefault(partition_of(f"user{n}", P), f"user{n}")
        n += 1
    return found


USERS = _users_by_partition()


def _row(user: str, seq: int) -> StoredEvent:
    return StoredEvent(user, seq, f"{user}-e{seq}", b"\x80")


def test_claims_raise_the_epoch_and_the_partition_count_is_fixed(store_url):
    recorder = open_recorder(store_url)
    try:
        assert recorder.claim(0, "worker-a", P, now=1.0) == 1
        assert recorder.claim(0, "worker-b", P, now=2.0) == 2
        assert recorder.claim(3, "worker-a", P, now=3.0) == 1
        assert recorder.partition_leases() == {0: (2, "worker-b", 2.0),
                                               3: (1, "worker-a", 3.0)}
        with pytest.raises(ValueError, match="split into 4 partitions"):
            recorder.claim(0, "worker-c", 8, now=4.0)
        with pytest.raises(ValueError, match="not in"):
            recorder.claim(4, "worker-c", P, now=4.0)
    finally:
        recorder.close()


def test_a_stale_epoch_is_refused_and_writes_nothing(store_url):
    recorder = open_recorder(store_url)
    try:
        epochs = {p: recorder.claim(p, "old", P, now=1.0) for p in range(P)}
        old = Fence(P, dict(epochs))
        recorder.append([_row(USERS[0], 1), _row(USERS[1], 1)], fence=old)
        recorder.claim(1, "new", P, now=2.0)  # partition 1 moves on
        with pytest.raises(Fenced) as refused:
            recorder.append([_row(USERS[0], 2), _row(USERS[1], 2)], fence=old)
        assert refused.value.lost == {1: 2}
        assert recorder.last_seq(USERS[0]) == 1 and recorder.last_seq(USERS[1]) == 1
        recorder.append([_row(USERS[0], 2)], fence=old)  # its other partitions still write
        assert recorder.last_seq(USERS[0]) == 2
        with pytest.raises(Fenced):  # a partition never held
            recorder.append([_row(USERS[2], 1)], fence=Fence(P, {0: epochs[0]}))
        recorder.append([_row(USERS[1], 2)], fence=Fence(P, {1: 2}))  # the new owner writes
        assert recorder.last_seq(USERS[1]) == 2
        recorder.append([_row(USERS[3], 1)])  # unfenced: one process, as today
    finally:
        recorder.close()


def test_the_journal_tells_the_lost_partitions_requests_and_commits_the_rest(store_url):
    recorder = open_recorder(store_url)
    try:
        fence = Fence(P, {p: recorder.claim(p, "old", P, now=1.0) for p in range(P)})
        recorder.claim(2, "new", P, now=2.0)
        journal = Journal(recorder, fence=fence)
        outcomes: dict[str, BaseException | None] = {}
        done = threading.Event()

        def told(user: str):
            def callback(exc: BaseException | None) -> None:
                outcomes[user] = exc
                if len(outcomes) == P:
                    done.set()
            return callback

        for user in USERS.values():
            journal.write(WriteRequest([_row(user, 1)], (), told(user)))
        assert done.wait(30)
        journal.close()
        assert isinstance(outcomes[USERS[2]], Fenced)
        assert all(outcomes[USERS[p]] is None for p in (0, 1, 3))
        assert recorder.last_seq(USERS[2]) == 0
        assert all(recorder.last_seq(USERS[p]) == 1 for p in (0, 1, 3))
        assert 2 not in fence.epochs  # the journal's fence no longer claims it
    finally:
        recorder.close()
