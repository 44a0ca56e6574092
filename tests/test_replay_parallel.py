"""Parallel replay (processes over user ranges) rebuilds exactly what sequential replay does."""

from __future__ import annotations

import numpy as np

from actors import Microtune, replay_all
from actors.replay import replay_parallel, summarize
from events import Event, SegmentConfig, TuningConfig

CFG = TuningConfig(version=1, dim=3)


def test_parallel_replay_equals_sequential_replay(tmp_path):
    store = str(tmp_path / "mt.db")
    rng = np.random.default_rng(5)
    with Microtune.open(store, CFG) as mt:
        mt.track_many([
            Event(id=f"e{i}", user=f"user{i % 37}", t=1000.0 + 7 * i,
                  kind="click" if i % 3 else "impression", item="a", x=rng.normal(size=3))
            for i in range(1500)
        ])
        sequential = summarize(replay_all(mt.recorder, mt.configs))
        other = TuningConfig(version=1, dim=3,
                             segments={"default": SegmentConfig(optimizer="adagrad")})
        counterfactual = summarize(replay_all(mt.recorder, mt.configs, config=other))
    parallel = replay_parallel(store, workers=3)
    assert parallel == sequential
    assert (parallel.users, parallel.events) == (37, 1500)
    assert replay_parallel(store, workers=2, config=other) == counterfactual
    assert counterfactual.digest != sequential.digest
