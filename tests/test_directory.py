"""Activation and passivation through the directory, with the real store."""

from __future__ import annotations

import threading

import numpy as np

from actors import Microtune, encode_state
from events import Event, TuningConfig

CFG = TuningConfig(version=1, dim=4)


def events_for(users: int, per_user: int, seed: int = 0) -> list[Event]:
    rng = np.random.default_rng(seed)
    return [
        Event(id=f"{u}-{i}", user=f"user{u}", t=1000.0 + 30 * i, kind="click", item="a",
              x=rng.normal(size=4))
        for i in range(per_user)
        for u in range(users)
    ]


def test_live_actors_are_bounded_and_passivated_state_survives(tmp_path):
    with Microtune.open(tmp_path / "mt.db", CFG, max_live=20) as mt:
        outcomes = mt.track_many(events_for(100, 5))
        assert all(o.status == "applied" for o in outcomes)
        assert len(mt.directory) <= 20
        assert mt.directory.passivations >= 80
        # every user's state, passivated or not, equals the replay of its log
        for u in range(100):
            live = mt.state(f"user{u}")
            assert live.seq == 5
            assert encode_state(live) == encode_state(
                mt.replay(f"user{u}", use_snapshots=False)
            )
        # passivation wrote snapshots
        assert mt.recorder.latest_snapshot("user0") is not None


def test_messages_sent_during_passivation_are_not_lost(tmp_path):
    with Microtune.open(tmp_path / "mt.db", CFG, max_live=3) as mt:
        evs = events_for(10, 30, seed=3)
        # many senders at once: activations and passivations interleave
        chunks = [evs[i::4] for i in range(4)]
        results: list = []
        lock = threading.Lock()

        def run(chunk):
            out = mt.track_many(chunk, timeout=60)
            with lock:
                results.extend(out)

        threads = [threading.Thread(target=run, args=(c,)) for c in chunks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(o.status for o in results) == ["applied"] * len(evs)
        assert mt.recorder.count_events() == len(evs)
        for u in range(10):
            assert [r.seq for r in mt.recorder.read(f"user{u}")] == list(range(1, 31))


def test_idle_actors_are_passivated(tmp_path):
    with Microtune.open(tmp_path / "mt.db", CFG, idle_timeout=0.0) as mt:
        mt.track_many(events_for(5, 2))
        assert len(mt.directory) == 5
        assert mt.directory.passivate_idle() == 5
        assert mt.directory.passivate_all(10)
        assert len(mt.directory) == 0
        assert mt.state("user1").seq == 2  # activated again from its snapshot
