"""Snapshots are pruned where they are written: each user keeps its latest few, enough for
activation, export, verify and rollback (which replays from the log where none is left)."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import select

from actors import Microtune, encode_state, replay_user
from adapters.cli import main
from events import Event, TuningConfig
from store import Snapshot, open_recorder
from store.schema import snapshots

CFG = TuningConfig(version=1, dim=3)


def snapshot_seqs(recorder, user: str) -> list[int]:
    with recorder.engine.connect() as conn:
        return list(conn.execute(select(snapshots.c.seq).where(snapshots.c.user_id == user)
                                 .order_by(snapshots.c.seq)).scalars())


def test_each_write_keeps_the_latest_three_per_user(store_url):
    recorder = open_recorder(store_url)
    try:
        assert recorder.keep_snapshots == 3
        for seq in range(1, 7):
            recorder.save_snapshots([Snapshot("bob", seq, 1, b"s%d" % seq)])
            assert snapshot_seqs(recorder, "bob") == list(range(max(1, seq - 2), seq + 1))
        recorder.save_snapshots([Snapshot("ann", 1, 1, b"a1")])
        # two of one user in one batch, with another user's: counted after the insert
        recorder.save_snapshots([Snapshot("bob", 7, 1, b"s7"), Snapshot("bob", 8, 1, b"s8"),
                                 Snapshot("ann", 2, 1, b"a2")])
        assert snapshot_seqs(recorder, "bob") == [6, 7, 8]
        assert snapshot_seqs(recorder, "ann") == [1, 2]
        assert recorder.latest_snapshot("bob").state == b"s8"
        assert recorder.latest_snapshot("bob", max_seq=5) is None  # replays from seq 1
        recorder.keep_snapshots = 0  # pruning off: every snapshot stays
        recorder.save_snapshots([Snapshot("bob", 9, 1, b"s9"), Snapshot("bob", 10, 1, b"s10")])
        assert snapshot_seqs(recorder, "bob") == [6, 7, 8, 9, 10]
    finally:
        recorder.close()


def _events(user: str, count: int, seed: int) -> list[Event]:
    rng = np.random.default_rng(seed)
    kinds = ("click", "impression", "dwell")
    return [Event(id=f"{user}-{i}", user=user, t=1_700_000_000.0 + 37 * i,
                  kind=kinds[i % 3], item=f"i{i % 5}", x=rng.normal(size=3),
                  dwell=12.0 if i % 3 == 2 else None)
            for i in range(count)]


def test_pruned_snapshots_still_give_every_state_rollback_and_verify(store_url, capsys):
    users = {"amy": _events("amy", 40, 1), "bob": _events("bob", 25, 2)}
    with Microtune.open(store_url, CFG, snapshot_every=3) as mt:
        for i in range(40):  # one event at a time: a snapshot every 3 events
            batch = [evs[i] for evs in users.values() if i < len(evs)]
            assert all(o.ok for o in mt.track_many(batch))
        mt.passivate_all()  # and one more each on the way out
        for user, evs in users.items():
            seqs = snapshot_seqs(mt.recorder, user)
            assert len(seqs) == 3 and seqs[-1] == len(evs), seqs
            assert seqs[0] > 3  # many were written; the old ones went
        # a rollback to before the oldest kept snapshot replays from seq 1; to a kept one
        # it starts there: both give the state the log gives at that seq
        for to_seq in (5, snapshot_seqs(mt.recorder, "amy")[0]):
            expected = replay_user(mt.recorder, mt.configs, "amy", until_seq=to_seq,
                                   use_snapshots=False)
            outcome = mt.rollback("amy", to_seq=to_seq, why="test")
            assert outcome.status == "applied"
            live = mt.state("amy")
            assert live.w.tobytes() == expected.w.tobytes()
            assert live.steps == expected.steps and live.t_last == expected.t_last
        for user in users:
            live = encode_state(mt.state(user))
            assert live == encode_state(replay_user(mt.recorder, mt.configs, user))
            assert live == encode_state(
                replay_user(mt.recorder, mt.configs, user, use_snapshots=False))
    capsys.readouterr()
    assert main(["replay", "--all", "--verify", "--store", store_url]) == 0
    assert "ok: the latest snapshots of 2 users" in capsys.readouterr().err


@pytest.mark.parametrize("keep", [1, 5])
def test_the_number_kept_is_a_setting(tmp_path, keep):
    recorder = open_recorder(tmp_path / "mt.db")
    recorder.keep_snapshots = keep
    try:
        for seq in range(1, 9):
            recorder.save_snapshots([Snapshot("bob", seq, 1, b"s")])
        assert snapshot_seqs(recorder, "bob") == list(range(9 - keep, 9))
    finally:
        recorder.close()
