"""Calibration by replay: which tuning of a segment predicts its users' logged outcomes best.

Each grid point is the current config with some of the segment's settings replaced (learning
rate and its bounds, half-life, L2, step bound, window budget). Every recorded user of the
segment is replayed under each point from seq 1 with the same `apply` the service runs, and
scored by progressive validation: each learning step's prediction is made before that step
learns (`Step.p`), so every outcome is predicted from the past alone, as it was live. Scores:
the importance-weighted log loss (the objective the update itself descends) and the AUC of
predictions against outcomes y >= 0.5, both over every learning step of the segment's users.

Work is split over processes by ranges of users; each process reads its users' logs once and
replays them under every point. Only steps taken while the user was in the segment count.

The seed's rule, that more responsive segments get tighter rate bounds, is kept as an order:
a segment's responsiveness is the median, over its users, of their interaction events per
active day (`responsiveness`), and a grid point whose `lr_max` would give a segment wider
bounds than a less responsive segment has (or narrower than a more responsive one) is left
out (`ordered`). One segment alone is never constrained.

A grid that varies the segment model (`segment_lr`, `segment_half_life`) needs more: a user's
replay reads the segment model's score logged with each event (that is what keeps a user's
state a function of its own log), so it cannot tell what another segment model would have
done. Such a grid is scored by a joint replay (`score_joint`): every user's events in the
order the broker received them, in one process, each interaction's segment-model score
stamped anew by a segment model that learns along, as the service does live. Every point of
that grid, the current config included, is scored the same way, so they compare fairly.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing as mp
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from actors.learning import Step, apply
from actors.state import UserState
from events.codec import event_from_log
from events.config import TuningConfig
from events.errors import Reason, Rejected
from events.types import INTERACTION_KINDS
from store.recorder import StoredEvent, by_user, open_recorder

# what a grid may vary (SegmentConfig fields); the rest stay as the current config has them
TUNABLE = ("lr", "lr_min", "lr_max", "half_life", "l2", "max_step", "window_budget", "beta2",
           "optimizer", "segment_lr", "segment_half_life")
# settings of the segment model: a grid that varies them needs the joint replay
JOINT = frozenset({"segment_lr", "segment_half_life"})
MAX_POINTS = 256
BINS = 1000  # AUC from histograms of predictions, so that processes can add them up
_EPS = 1e-7


@dataclass(slots=True)
class Score:
    """Progressive-validation totals of one grid point (addable across processes)."""

    loss: float = 0.0  # importance-weighted log loss, summed
    weight: float = 0.0  # importance, summed
    steps: int = 0
    users: int = 0
    positives: np.ndarray = field(default_factory=lambda: np.zeros(BINS))
    negatives: np.ndarray = field(default_factory=lambda: np.zeros(BINS))

    def add(self, other: Score) -> None:
        self.loss += other.loss
        self.weight += other.weight
        self.steps += other.steps
        self.users += other.users
        self.positives += other.positives
        self.negatives += other.negatives

    @property
    def log_loss(self) -> float:
        return self.loss / self.weight if self.weight else math.nan

    @property
    def auc(self) -> float:
        """P(a positive's prediction > a negative's), ties counted half, from the bins."""
        pos, neg = self.positives, self.negatives
        if not pos.sum() or not neg.sum():
            return math.nan
        below = np.cumsum(neg) - neg  # negatives in lower bins
        return float((pos * (below + 0.5 * neg)).sum() / (pos.sum() * neg.sum()))


def points(base: TuningConfig, segment: str, grid: dict[str, list]) -> list[
        tuple[dict, TuningConfig]]:
    """Every combination of the grid's values, as (the values, the config). Refused:
    an unknown setting, an empty list, or more than MAX_POINTS combinations."""
    unknown = set(grid) - set(TUNABLE)
    if unknown:
        raise Rejected(Reason.UNKNOWN_CONFIG, f"the grid may vary {', '.join(TUNABLE)}; "
                       f"not {', '.join(sorted(unknown))}")
    if not grid or any(not isinstance(v, list) or not v for v in grid.values()):
        raise Rejected(Reason.WRONG_TYPE, "each grid setting is a non-empty list of values")
    names = sorted(grid)
    combos = list(itertools.product(*(grid[n] for n in names)))
    if len(combos) > MAX_POINTS:
        raise Rejected(Reason.OVERSIZE, f"{len(combos)} grid points; at most {MAX_POINTS}")
    seg = base.segment(segment)
    out = []
    for values in combos:
        params = dict(zip(names, values, strict=True))
        changed = replace(seg, **params)  # validated with the config below
        config = replace(base, segments={**base.segments, segment: changed}, label=None)
        out.append((params, config))
    return out


def score_user(rows: list[StoredEvent], configs: list[TuningConfig],
               segment: str, since: float | None = None) -> list[Score]:
    """One user's progressive-validation totals under each config; with `since`, only the
    steps learned at or after that event time count (the states still learn from the whole
    log: the latest window is scored, not replayed alone)."""
    events = [event_from_log(r.body) for r in rows]
    scores = []
    for config in configs:
        score, state, trace = Score(), UserState(rows[0].user), []
        counted = False
        for event in events:
            inside = (event.segment or state.segment) == segment
            state = apply(state, event, config, trace if inside else None)
            if trace:
                counted |= _record(score, trace if since is None else
                                   [step for step in trace if step.t >= since])
                trace.clear()
        score.users = int(counted)
        scores.append(score)
    return scores


def _record(score: Score, trace: list[Step]) -> bool:
    learned = False
    for step in trace:
        if step.p is None or step.y is None or step.importance is None:
            continue
        p = min(max(step.p, _EPS), 1 - _EPS)
        score.loss += step.importance * -(step.y * math.log(p) + (1 - step.y) * math.log(1 - p))
        score.weight += step.importance
        score.steps += 1
        b = min(int(p * BINS), BINS - 1)
        if step.y >= 0.5:
            score.positives[b] += 1
        else:
            score.negatives[b] += 1
        learned = True
    return learned


def _score_range(store: str, encoded: list[bytes], segment: str, lo: str | None,
                 hi: str | None, since: float | None = None) -> list[Score]:
    """A worker: the users in [lo, hi) under every config."""
    configs = [TuningConfig.decode(raw) for raw in encoded]
    totals = [Score() for _ in configs]
    recorder = open_recorder(store, upgrade=False)
    try:
        for rows in by_user(recorder.read_all(from_user=lo, to_user=hi)):
            for total, score in zip(totals, score_user(rows, configs, segment, since),
                                    strict=True):
                total.add(score)
    finally:
        recorder.close()
    return totals


def score_joint(rows: Iterable[StoredEvent], configs: list[TuningConfig], segment: str,
                since: float | None = None) -> list[Score]:
    """Every config's totals by a joint replay: all users' events in the broker's receive
    order (event time where none), the segment model learning along and stamping anew."""
    from actors.segment_model import SegmentModels

    events = []
    for row in rows:
        event = event_from_log(row.body)
        at = event.received if event.received is not None else event.t
        events.append((at, row.user, row.seq, event))
    events.sort(key=lambda e: e[:3])
    scores = []
    for config in configs:
        score, states, models, trace, counted = Score(), {}, SegmentModels(), [], set()
        for _at, user, _seq, event in events:
            state = states.get(user) or UserState(user)
            name = event.segment or state.segment or "default"
            if event.is_interaction and event.x is not None:
                event = event._replace(base=models.stamp(name, event.x, config))
            state = states[user] = apply(state, event, config, trace)
            if trace:
                if name == segment and _record(score, trace if since is None else
                                               [s for s in trace if s.t >= since]):
                    counted.add(user)
                models.learn(state.segment or "default", trace, config)
                trace.clear()
        score.users = len(counted)
        scores.append(score)
    return scores


def calibrate(store: str, users: list[str], configs: list[TuningConfig], segment: str, *,
              processes: int = 1, since: float | None = None,
              joint: bool = False) -> list[Score]:
    """Every config's totals over the users (sorted), in `processes` ranges of users; with
    `joint`, by one joint replay of every user (see `score_joint`)."""
    if joint:
        recorder = open_recorder(store, upgrade=False)
        try:
            return score_joint(recorder.read_all(), configs, segment, since)
        finally:
            recorder.close()
    encoded = [c.encode() for c in configs]
    if processes <= 1 or len(users) < 2:
        return _score_range(store, encoded, segment, None, None, since)
    cuts = [users[len(users) * k // processes] for k in range(1, processes)]
    ranges = list(zip([None, *cuts], [*cuts, None], strict=True))
    totals = [Score() for _ in configs]
    with ProcessPoolExecutor(processes, mp_context=mp.get_context("spawn")) as pool:
        for part in pool.map(_score_range, *zip(*[(store, encoded, segment, lo, hi, since)
                                                   for lo, hi in ranges], strict=True)):
            for total, score in zip(totals, part, strict=True):
                total.add(score)
    return totals


# ---------------------------------------------------------------- responsiveness


def responsiveness(rows: Iterable[StoredEvent]) -> dict[str, float]:
    """Per segment, how responsive its users are: the median, over its users, of their
    interaction events per active day (days, in event time, with at least one). A segment
    whose users send many signals a day reacts to what it is shown more than one whose
    users send a few; the seed's rule gives it tighter rate bounds (`ordered`)."""
    per_user: dict[tuple[str, str], dict[int, int]] = {}
    for user_rows in by_user(rows):
        segment = "default"
        for row in user_rows:
            event = event_from_log(row.body)
            if event.segment is not None:
                segment = event.segment
            if event.kind in INTERACTION_KINDS:
                days = per_user.setdefault((segment, row.user), {})
                day = int(event.t // 86400)
                days[day] = days.get(day, 0) + 1
    rates: dict[str, list[float]] = {}
    for (segment, _user), days in per_user.items():
        rates.setdefault(segment, []).append(sum(days.values()) / len(days))
    return {segment: float(np.median(r)) for segment, r in rates.items()}


def ordered(segment: str, lr_max: float, config: TuningConfig,
            measured: dict[str, float]) -> bool:
    """Does giving `segment` this `lr_max` keep the seed's order: a more responsive segment
    never has wider rate bounds (a higher lr_max) than a less responsive one, nor a less
    responsive one narrower bounds than a more responsive one (the other segments as the
    config has them)?"""
    mine = measured.get(segment)
    if mine is None:
        return True
    for other, theirs in measured.items():
        if other == segment or other not in config.segments:
            continue
        their_max = config.segments[other].lr_max
        if (mine > theirs and lr_max > their_max) or (mine < theirs and lr_max < their_max):
            return False
    return True
