"""Which exposure an outcome answers: the join of a user's outcomes to its exposures.

A pure function of one user's log (its events in seq order), so every number of a report can
be rebuilt from the log. The rule, in event time:

1. An outcome (click, dwell, scroll, hover, feedback) that names a ranking id (`rid`) answers
   that exposure, however late it comes, if the exposure is in the user's log and showed the
   item. A rid the log does not have, or whose exposure did not show the item, is counted as
   `unmatched` and joins nothing (it never falls back to the window rule: the caller said
   which ranking it meant).
2. An outcome without a rid answers the latest exposure that showed its item at or before the
   outcome's event time, and no more than `window` seconds before it. Ties in time go to the
   exposure logged last. Order in the log does not matter: an outcome logged before its
   exposure (sent out of order) is joined all the same, and a late one within the window too.
3. Otherwise the outcome is `unattributed`.

An exposure's outcome per metric: `clicked` (any click), `dwell` (the sum of its dwell
seconds), `feedback` (the latest explicit y in event time, with its count), `scroll` (the
deepest scroll), and which items were clicked (off-policy evaluation's rewards).
Impressions are not outcomes: they say an item was seen, not what was done.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field

from events.types import EXPOSURE, OUTCOME_KINDS, Arm, Event, Exposure


@dataclass(slots=True)
class ExposureOutcome:
    """One exposure and what it led to."""

    rid: str
    seq: int  # its place in the user's log
    t: float  # when it was shown (event time)
    arm: Arm | None
    items: tuple[str, ...]
    clicks: int = 0
    dwell: float = 0.0
    dwells: int = 0
    feedback: float | None = None  # the latest y (event time)
    feedback_t: float = float("-inf")
    feedbacks: int = 0
    scroll: float | None = None  # the deepest
    clicked_items: frozenset[str] = frozenset()  # which of its items got a click
    logged: Exposure | None = None  # the logged ranking (candidates and propensities too)

    @property
    def clicked(self) -> bool:
        return self.clicks > 0


@dataclass(slots=True)
class Attribution:
    exposures: list[ExposureOutcome] = field(default_factory=list)
    attributed: int = 0  # outcomes joined to an exposure
    by_rid: int = 0  # of which by their rid
    unmatched: int = 0  # named a rid this log has not (or one that did not show the item)
    unattributed: int = 0  # no rid, and no exposure of the item within the window


def attribute(events: Iterable[tuple[int, Event]], window: float) -> Attribution:
    """Join one user's outcomes to its exposures. `events`: (seq, event) in any order."""
    exposures: dict[str, ExposureOutcome] = {}
    outcomes: list[tuple[int, Event]] = []
    for seq, event in events:
        if event.kind == EXPOSURE and event.exposure is not None:
            exposures[event.rid or event.id] = ExposureOutcome(
                event.rid or event.id, seq, event.t, event.arm, event.exposure.items,
                logged=event.exposure)
        elif event.kind in OUTCOME_KINDS:
            outcomes.append((seq, event))
    result = Attribution(sorted(exposures.values(), key=lambda e: (e.t, e.seq)))
    # per item: its exposures' times and the exposures, in (time, seq) order
    shown: dict[str, tuple[list[float], list[ExposureOutcome]]] = {}
    for exposure in result.exposures:
        for item in exposure.items:
            times, which = shown.setdefault(item, ([], []))
            times.append(exposure.t)
            which.append(exposure)
    for _seq, event in outcomes:
        target = None
        if event.rid is not None:
            target = exposures.get(event.rid)
            if target is None or event.item not in target.items:
                result.unmatched += 1
                continue
            result.by_rid += 1
        else:
            times, which = shown.get(event.item, ((), ()))
            at = bisect.bisect_right(times, event.t) - 1  # the latest shown at or before t
            if at >= 0 and event.t - times[at] <= window:
                target = which[at]
        if target is None:
            result.unattributed += 1
            continue
        result.attributed += 1
        _record(target, event)
    return result


def _record(exposure: ExposureOutcome, event: Event) -> None:
    kind = event.kind
    if kind == "click":
        exposure.clicks += 1
        exposure.clicked_items = exposure.clicked_items | {event.item}
    elif kind == "dwell":
        exposure.dwell += event.dwell or 0.0
        exposure.dwells += 1
    elif kind == "feedback":
        exposure.feedbacks += 1
        if event.t >= exposure.feedback_t:
            exposure.feedback, exposure.feedback_t = event.target, event.t
    elif kind == "scroll" and event.depth is not None:
        exposure.scroll = max(exposure.scroll or 0.0, event.depth)
