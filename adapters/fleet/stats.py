"""A fleet's counters: each worker's own (`Service` stats), gathered and summed.

`microtune stats --nats-url` asks `<prefix>.admin.stats`, which one worker answers. That
worker asks every worker on `<prefix>.fleet.stats` (itself included), waits for one answer
from each live worker (the lease bucket's heartbeats) or `WAIT` seconds, and answers with
the sums beside each worker's own map. Counters add up; a map of counters (the refusals by
reason) adds key by key; lists of names (the experiments running) are united; anything else
(latency figures, GC pauses, alerts) is only meaningful per worker and stays there.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

WAIT = 2.0  # seconds to wait for the live workers' answers


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def summed(maps: dict[str, dict[str, Any]], live: list[str]) -> dict[str, Any]:
    """The fleet's answer from each worker's stats (`maps`, by worker id); `live`: the
    workers expected to answer (a missing one is named, not guessed)."""
    out: dict[str, Any] = {}
    keys = sorted({key for m in maps.values() for key in m})
    for key in keys:
        values = [m[key] for m in maps.values() if key in m]
        if all(_number(v) for v in values):
            out[key] = sum(values)
        elif all(isinstance(v, dict) and all(_number(x) for x in v.values()) for v in values):
            total: Counter = Counter()
            for v in values:
                total.update(v)
            out[key] = dict(sorted(total.items()))
        elif all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in values):
            out[key] = sorted({x for v in values for x in v})
    out["fleet"] = {"workers": len(maps), "answered": sorted(maps),
                    "missing": sorted(set(live) - set(maps))}
    out["by_worker"] = {name: maps[name] for name in sorted(maps)}
    return out
