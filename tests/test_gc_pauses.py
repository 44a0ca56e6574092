"""The collector's pauses are recorded per generation, as the serving path sees them."""

from __future__ import annotations

import gc

from actors import gc_pauses


def test_every_collection_is_timed_per_generation():
    watch = gc_pauses.watch()
    assert gc_pauses.watch() is watch and gc.callbacks.count(watch) == 1  # installed once
    before = watch.to_map()
    garbage = []
    for _ in range(2000):  # cycles, so that there is something to collect
        a: list = []
        a.append(a)
        garbage.append(a)
    del garbage, a
    gc.collect(2)
    gc.collect(0)
    after = watch.to_map()
    assert after["gen2"]["collections"] >= before["gen2"]["collections"] + 1
    assert after["gen0"]["collections"] >= before["gen0"]["collections"] + 1
    assert after["gen2"]["total_s"] > before["gen2"]["total_s"]
    assert after["longest_ms"] >= after["gen2"]["longest_ms"] > 0
