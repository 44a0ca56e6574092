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


def test_freezing_survivors_hides_them_from_collections_and_refcounting_still_frees_them():
    import weakref

    class Replica:  # a long-lived object of a query process
        pass

    try:
        keep = [Replica() for _ in range(5000)]
        probe = weakref.ref(keep[0])
        before = gc.get_freeze_count()
        gc_pauses.freeze_survivors()
        assert gc.get_freeze_count() >= before + 5000
        tracked = {id(o) for g in range(3) for o in gc.get_objects(generation=g)}
        assert id(keep[0]) not in tracked and id(keep) not in tracked  # no collection scans it
        del keep  # no cycle: freed at once, frozen or not
        assert probe() is None
    finally:
        gc.unfreeze()


def test_a_scheduled_collector_collects_young_generations_on_each_turn_and_no_other_time():
    seen: list[int] = []

    def note(phase, info):
        if phase == "stop":
            seen.append(info["generation"])

    gc.callbacks.append(note)
    try:
        collector = gc_pauses.Scheduled(middle_every=4)
        assert not gc.isenabled()  # no automatic collection, whatever is allocated
        junk = [[i] for i in range(20_000)]
        assert seen == []
        for _ in range(8):
            collector.turn()
        assert seen == [0, 0, 0, 1, 0, 0, 0, 1]
        import weakref

        class Node:
            pass

        node = Node()
        node.me = node  # young cyclic garbage: only a collection frees it
        probe = weakref.ref(node)
        del node, junk
        assert probe() is not None
        collector.turn()
        assert probe() is None
    finally:
        gc.callbacks.remove(note)
        gc.enable()
