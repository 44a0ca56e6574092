"""A latency histogram: counts per bucket, cheap to fill on a hot path, summed across
processes, and read as a Prometheus histogram (adapters/metrics.py).

Used for query latency (each query process, from a query's arrival to its reply, reported
every second with its stats) and for activation latency (the service: loading a user's
snapshot and tail when its actor starts)."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Mapping
from typing import Any

# seconds: 100 µs to 5 s, the range a query or an activation lives in
BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
          1.0, 2.5, 5.0)


class Latency:
    """Thread-safe: activations are observed on every dispatcher thread."""

    __slots__ = ("_lock", "count", "counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BOUNDS) + 1)  # the last: above every bound
        self.total = 0.0
        self.count = 0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(BOUNDS, seconds)] += 1
            self.total += seconds
            self.count += 1

    def to_map(self) -> dict[str, Any]:
        with self._lock:
            return {"counts": list(self.counts), "sum": self.total, "count": self.count}


def merged(maps: Iterable[Mapping[str, Any] | None]) -> dict[str, Any]:
    """Several processes' `to_map`s, summed."""
    out = Latency().to_map()
    for m in maps:
        if not m:
            continue
        out["counts"] = [a + b for a, b in zip(out["counts"], m["counts"], strict=True)]
        out["sum"] += m["sum"]
        out["count"] += m["count"]
    return out


def buckets(m: Mapping[str, Any]) -> list[tuple[str, float]]:
    """Prometheus buckets: cumulative counts by upper bound, then +Inf."""
    out, running = [], 0
    for bound, n in zip((*BOUNDS, float("inf")), m["counts"], strict=True):
        running += n
        out.append(("+Inf" if bound == float("inf") else repr(bound), running))
    return out
