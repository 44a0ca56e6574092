"""Running per-segment statistics that data hygiene compares a user's signals against.

These are shared across users, so `apply` must not read them: the user actor asks for the
current figures when it accepts an event and stamps them on the event (`Event.norms`) before
it is logged, as the item features are. Replay then uses the logged figures and stays exact,
whatever the statistics are today.

Each statistic keeps the last `WINDOW` observations of a log value (log dwell seconds, log
hover seconds, log of the user's actions in the recent window) in a ring, and every `EVERY`
observations recomputes its quartiles (q1, median, q3): a sliding-window quantile estimate,
robust to the outliers it is there to catch. Until `MIN_SAMPLES` observations arrive there
are no figures and hygiene falls back to its absolute caps. The statistics start empty at
every start of the process (they re-fill within a few hundred events of each kind).
"""

from __future__ import annotations

import math
import threading

import numpy as np

from actors.hygiene import MIN_SECONDS
from events.types import ACTION_KINDS, Event

WINDOW = 2048
EVERY = 128
MIN_SAMPLES = 100


class _Quartiles:
    __slots__ = ("count", "figures", "ring")

    def __init__(self) -> None:
        self.ring = np.empty(WINDOW)
        self.count = 0
        self.figures: tuple[float, float, float] | None = None

    def observe(self, value: float) -> None:
        self.ring[self.count % WINDOW] = value
        self.count += 1
        if self.count % EVERY == 0 and self.count >= MIN_SAMPLES:
            q1, q2, q3 = np.quantile(self.ring[: min(self.count, WINDOW)], (0.25, 0.5, 0.75))
            self.figures = (float(q1), float(q2), float(q3))


class SegmentStats:
    """Quartiles of log dwell ("d"), log hover ("h") and log recent activity ("f") per
    segment. Thread-safe: user actors of one segment may run on different workers."""

    def __init__(self) -> None:
        self._stats: dict[tuple[str, str], _Quartiles] = {}
        self._lock = threading.Lock()

    def figures(self, segment: str, key: str) -> tuple[float, float, float] | None:
        stat = self._stats.get((segment, key))
        return None if stat is None else stat.figures

    def stamp(self, segment: str, event: Event, recent_actions: int, *,
              observe: bool = True) -> dict | None:
        """The figures this event's signal needs, then (if `observe`: not for a user marked
        as a bot) count the event into them.

        `recent_actions`: the user's actions in the recent window before this event.
        """
        kind = event.kind
        values: list[tuple[str, float]] = []
        if kind == "dwell":
            values.append(("d", math.log(max(event.dwell, MIN_SECONDS))))
        elif kind == "hover":
            values.append(("h", math.log(max(event.hover, MIN_SECONDS))))
        if kind in ACTION_KINDS:
            values.append(("f", math.log(recent_actions + 1)))
        if not values:
            return None
        norms = {}
        with self._lock:
            for key, value in values:
                stat = self._stats.get((segment, key))
                if stat is None:
                    stat = self._stats[(segment, key)] = _Quartiles()
                if stat.figures is not None:
                    norms[key] = stat.figures
                if observe:
                    stat.observe(value)
        return norms or None
