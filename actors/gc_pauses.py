"""How long the cyclic garbage collector stops this process: every collection timed.

A collection holds the GIL for its whole length, so a query waits as long as it runs: the
serving path's pauses are the collector's. `watch()` adds a `gc.callbacks` hook (once per
process; about a microsecond per collection) that keeps, per generation, the number of
collections, their total and their longest time, and how many took over 10 ms (the target:
none). `microtune.admin.stats` and `microtune bench nats` report them.

Times are the collecting thread's CPU time: the collector's own work. Wall time also counts
the moments the operating system ran another process instead (on a busy 2-core machine, tens
of milliseconds), which no collector setting changes; the longest wall time is kept beside
(`longest_wall_ms`).
"""

from __future__ import annotations

import gc
import threading
import time
from typing import Any

SLOW = 0.010  # seconds: a pause longer than this is counted as slow


class GcPauses:
    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.total = [0.0, 0.0, 0.0]
        self.longest = [0.0, 0.0, 0.0]
        self.slow = 0
        self.longest_wall = 0.0
        self._started = threading.local()

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        now, cpu = time.perf_counter(), time.thread_time()
        if phase == "start":
            self._started.at = (now, cpu)
            return
        started = getattr(self._started, "at", None)
        if started is None:
            return
        self.longest_wall = max(self.longest_wall, now - started[0])
        pause, generation = cpu - started[1], info["generation"]
        self.count[generation] += 1
        self.total[generation] += pause
        self.longest[generation] = max(self.longest[generation], pause)
        self.slow += pause > SLOW

    def to_map(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            f"gen{g}": {"collections": self.count[g], "total_s": round(self.total[g], 3),
                        "longest_ms": round(self.longest[g] * 1e3, 2)}
            for g in range(3)}
        out["over_10ms"] = self.slow
        out["longest_ms"] = round(max(self.longest) * 1e3, 2)
        out["longest_wall_ms"] = round(self.longest_wall * 1e3, 2)
        return out


_watch: GcPauses | None = None
_lock = threading.Lock()


def watch() -> GcPauses:
    """The process's pause recorder, installed on first use."""
    global _watch
    with _lock:
        if _watch is None:
            _watch = GcPauses()
            gc.callbacks.append(_watch)
        return _watch


class Scheduled:
    """The collector of a process that serves queries, run on its own schedule.

    CPython starts a young collection when allocations minus deallocations pass a threshold.
    A read model replaces each user's state as events apply: the old objects it frees offset
    the new ones it makes, so the count stays low while the young generation grows, and a
    collection finally came with 10-30 thousand objects to scan (9-16 ms, measured in a query
    process). So automatic collection is off, and the owner calls:

    - `turn()` after each small unit of work (a few rows applied, a frame filed): a
      young collection, and every `middle_every` turns one of the middle generation too, so
      each scans only what that unit made;
    - `second()` once a second: `freeze_survivors`, so no full collection ever rescans the
      replicas.
    Young cyclic garbage is still collected, within a turn or a second.
    """

    def __init__(self, middle_every: int = 8) -> None:
        self.middle_every = middle_every
        self._turns = 0
        gc.disable()

    def turn(self) -> None:
        self._turns += 1
        gc.collect(1 if self._turns % self.middle_every == 0 else 0)

    def second(self) -> None:
        freeze_survivors()


def freeze_survivors() -> None:
    """Collect the young generations, then move every surviving object out of the
    collector's sight (`gc.freeze`).

    A full collection scans every tracked object: with tens of thousands of user replicas in
    a query process, that was a 125 ms pause (bench nats, 20k users) and grows with the users.
    Called once a second, this leaves each collection only what was allocated since. Frozen
    objects are still freed by reference counting; what is given up is collecting a
    *reference cycle* among objects that were alive at a freeze and die later. A query
    process's long-lived objects (replicas: tuples, arrays, slotted classes with no
    back-references; its connection) form none, so nothing is held that would otherwise be
    freed. Not for the ingest process: its actors (pykka refs <-> actors) become cyclic
    garbage when they stop. (`gc.get_freeze_count()` walks every frozen object: 15 ms a call
    in a query process, so it is not asked here.)
    """
    gc.collect(1)
    gc.freeze()
