"""Data hygiene: the pure bookkeeping that turns raw events into clean learning signals.

Part of the deterministic state transition (`actors.learning.apply` calls these); nothing here
reads a clock, randomness or shared state. What it needs from outside the user's own state
(the segment's statistics) is logged with the event (`Event.norms`), so replay stays exact.

The rules, in the order an event meets them (README "Data hygiene" has the table):

1. Time alignment. The logged event has the client's time t and the broker's receive time r.
   The user's clock offset is the second smallest of the last SKEW_SAMPLES offsets r - t
   (a low order statistic: delivery delays only add to the offset, and an offline queue
   uploaded late does not look like a skewed clock unless it is longer than the window; the
   second, not the smallest, so that one bogus timestamp does not move it). Offsets within
   `skew_tolerance` are delay, offsets beyond `max_skew` are delayed delivery (backfills):
   neither is corrected. The corrected time tc = t + offset is never later than r.
   A backfill event (`Event.backfill`, wire `bf`) is history the publisher vouches for: its
   time is trusted (only never later than r) and its offset, which measures how late the
   history was sent, not the device's clock, stays out of the estimate.
2. Ordering. Events wait in a buffer until the user's newest time minus `lateness` passes
   them, and leave it in (tc, seq) order. An event older than the last one released is late:
   `late_policy` "apply" learns from it at the release frontier, "drop" ignores it.
   A backfill event at or after the frontier is ordered like any other; one before it is not
   late but history behind the frontier (`actors.learning.apply` says what it does).
3. Sessions, recent windows and the bot heuristics see released events in event-time order.
   Backfill events arrive as fast as they are published: they do not feed the pacing checks.
4. Impressions wait `impression_timeout`; an engagement with the same item cancels them, and
   an impression still waiting then becomes a negative at its deadline.
5. Dwell and hover are tested against the segment's log-statistics (outliers dropped or
   clipped), normalised (y = sigmoid(norm_slope z)), and every importance is damped for a
   user much more active than the segment's median user.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from events.codec import encode_logged_event, event_from_log
from events.config import SegmentConfig
from events.types import ACTION_KINDS, INTERACTION_KINDS, Event

SKEW_SAMPLES = 16  # offsets kept for the clock-skew estimate
SKEW_RANK = 1  # the second smallest
WINDOW_BUCKETS = 5  # a recent window is counted in this many buckets
MAX_IMPRESSIONS = 64  # waiting impressions per user; beyond, the oldest becomes due at once
MAX_PENDING = 256  # events in the reorder buffer; beyond, the oldest is released at once
MAX_SESSION_FRAGMENTS = 16
MIN_SECONDS = 1e-3  # log(0) guard for dwell and hover
IQR_TO_SIGMA = 1.349  # a normal distribution's IQR in standard deviations
MIN_SCALE = 0.05  # log-space scale floor: a segment with identical values still has a scale
REGULAR_ALPHA = 0.1  # weight of a new interval in the running interval mean and variance
COUNTED_KINDS = tuple(INTERACTION_KINDS)  # the recent-window counts, by kind
_F64 = np.dtype("<f8")
_KIND_INDEX = {k: i for i, k in enumerate(COUNTED_KINDS)}
_ACTION_INDEXES = tuple(_KIND_INDEX[k] for k in sorted(ACTION_KINDS))


_FIELDS = (
    "offsets", "t_max", "frontier", "pending", "impressions", "session", "session_start",
    "session_last", "session_events", "session_ids", "bot", "rate_level", "last_action",
    "short_streak", "interval_mean", "interval_var", "intervals", "windows", "late",
    "outliers", "ignored",
)


class Hygiene:
    """A user's hygiene state (part of `UserState`; in snapshots).

    Mutable, so that one `apply` changes it field by field without rebuilding it a dozen
    times; purity is kept by the one rule that `apply` mutates only its own `copy()`. The
    tuple fields are immutable and shared between copies.
    """

    __slots__ = _FIELDS

    def __init__(self) -> None:
        self.offsets: tuple[float, ...] = ()  # the last SKEW_SAMPLES r - t, oldest first
        self.t_max = -1.0  # newest corrected event time admitted
        self.frontier = -1.0  # corrected time of the last released event
        # waiting for release: (tc, seq, event), sorted
        self.pending: tuple[tuple[float, int, Event], ...] = ()
        # waiting impressions: (due, item, x, event id, segment model score), sorted by due
        # (items are unique)
        self.impressions: tuple[tuple[float, str, np.ndarray, str, float], ...] = ()
        self.session = 0  # sessions so far; the current one is number `session`
        self.session_start = -1.0
        self.session_last = -1.0
        self.session_events = 0
        self.session_ids: tuple[str, ...] = ()  # client session ids joined into this session
        self.bot = ""  # the verdict's reason; empty: a human
        self.rate_level = 0.0  # leaky bucket of user actions (drains bot_max_rate per second)
        self.last_action = -1.0
        self.short_streak = 0  # dwell events in a row below bot_short_dwell
        self.interval_mean = 0.0  # running mean and variance of inter-action intervals
        self.interval_var = 0.0
        self.intervals = 0
        self.windows: tuple[tuple[int, tuple[int, ...]], ...] = ()  # (bucket, counts by kind)
        self.late = 0  # events later than the lateness window
        self.outliers = 0
        self.ignored = 0  # events of a marked bot

    def copy(self) -> Hygiene:
        new = _new(Hygiene)
        _copy_fields(self, new)
        return new

    def __repr__(self) -> str:
        return "Hygiene(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in _FIELDS) + ")"

    # ------------------------------------------------------------ 1, 2: time and order

    def align(self, event: Event, seg: SegmentConfig) -> float:
        """The event's corrected time; records its clock offset."""
        t, r = event.t, event.received
        if r is None:  # no receive time (a library caller, an old log): trust the client
            return t
        if event.backfill:  # trusted history; its offset says how late it was sent, no more
            return r if t > r + seg.skew_tolerance else t
        offsets = self.offsets = (*self.offsets[-(SKEW_SAMPLES - 1):], r - t)
        skew = sorted(offsets)[min(SKEW_RANK, len(offsets) - 1)]
        tc = t + skew if seg.skew_tolerance < abs(skew) <= seg.max_skew else t
        if tc > r + seg.skew_tolerance:  # nothing happens after it was received
            tc = r
        return tc

    def skew(self) -> float:
        """The current clock-offset estimate (0 without samples), for the debug view."""
        if not self.offsets:
            return 0.0
        return sorted(self.offsets)[min(SKEW_RANK, len(self.offsets) - 1)]

    def buffer(self, tc: float, seq: int, event: Event) -> None:
        entry = (tc, seq, event)
        pending = self.pending
        if not pending or (tc, seq) >= pending[-1][:2]:  # the common case: in order
            self.pending = (*pending, entry)
        else:
            waiting = list(pending)
            bisect.insort(waiting, entry, key=lambda p: (p[0], p[1]))
            self.pending = tuple(waiting)
        if tc > self.t_max:
            self.t_max = tc

    # ------------------------------------------------------------ 3: sessions, windows, bots

    def observe_session(self, tc: float, event: Event, seg: SegmentConfig) -> None:
        if self.session_last < 0 or tc - self.session_last > seg.session_timeout:
            self.session += 1
            self.session_start = self.session_last = tc
            self.session_events = 1
            self.session_ids = (event.session,) if event.session else ()
            return
        ids = self.session_ids
        if event.session and event.session not in ids and len(ids) < MAX_SESSION_FRAGMENTS:
            self.session_ids = (*ids, event.session)  # a fragment (a tab, a reconnect) joins
        if tc > self.session_last:
            self.session_last = tc
        self.session_events += 1

    def count_window(self, tc: float, kind: str, seg: SegmentConfig) -> None:
        bucket = int(tc // (seg.recent_window / WINDOW_BUCKETS))
        windows = self.windows
        index = _KIND_INDEX[kind]
        if windows and windows[-1][0] == bucket:
            counts = list(windows[-1][1])
            counts[index] += 1
            self.windows = (*windows[:-1], (bucket, tuple(counts)))
            return
        keep = [b for b in windows if b[0] > bucket - WINDOW_BUCKETS]
        counts = [0] * len(COUNTED_KINDS)
        counts[index] = 1
        keep.append((bucket, tuple(counts)))
        keep.sort(key=lambda b: b[0])
        self.windows = tuple(keep)

    def window_counts(self, seg: SegmentConfig, now: float | None = None) -> dict[str, int]:
        """Counts by kind over the recent window ending at `now` (default: the user's newest
        released event), at the window's bucket granularity."""
        if now is None:
            now = self.frontier
        bucket = int(now // (seg.recent_window / WINDOW_BUCKETS))
        totals = [0] * len(COUNTED_KINDS)
        for b, counts in self.windows:
            if bucket - WINDOW_BUCKETS < b <= bucket:
                for i, c in enumerate(counts):
                    totals[i] += c
        return dict(zip(COUNTED_KINDS, totals, strict=True))

    def recent_actions(self) -> int:
        """User actions in the current recent window (at the newest released event)."""
        if not self.windows:
            return 0
        first = self.windows[-1][0] - WINDOW_BUCKETS
        total = 0
        for b, counts in self.windows:
            if b > first:
                for i in _ACTION_INDEXES:
                    total += counts[i]
        return total

    def check_bot(self, tc: float, event: Event, seg: SegmentConfig) -> None:
        """Feed the bot detectors a released event; `bot` becomes the reason on a verdict."""
        if event.automated:
            self.bot = "declared: the publisher flagged the event as automated"
            return
        if event.kind not in ACTION_KINDS:
            return
        if event.backfill:
            self._check_history(event, seg)
            return
        dt = tc - self.last_action if self.last_action >= 0 else None
        level = (max(0.0, self.rate_level - dt * seg.bot_max_rate) if dt is not None
                 else 0.0) + 1.0
        self.rate_level, self.last_action = level, tc
        if event.kind == "dwell":
            self.short_streak = (self.short_streak + 1 if event.dwell < seg.bot_short_dwell
                                 else 0)
        if dt is not None and dt > 0:
            self.intervals += 1
            if self.intervals == 1:
                self.interval_mean, self.interval_var = dt, 0.0
            else:  # exponentially weighted mean and variance
                diff = dt - self.interval_mean
                self.interval_mean += REGULAR_ALPHA * diff
                self.interval_var = (1.0 - REGULAR_ALPHA) * (
                    self.interval_var + REGULAR_ALPHA * diff * diff)
        mean, sd, n = self.interval_mean, math.sqrt(self.interval_var), self.intervals
        if level > seg.bot_burst:
            self.bot = (f"rate: over {seg.bot_max_rate:g} actions/s beyond a burst of "
                        f"{seg.bot_burst:g}")
        elif self.short_streak >= seg.bot_short_dwell_streak:
            self.bot = (f"short dwell: {self.short_streak} dwells under "
                        f"{seg.bot_short_dwell:g} s in a row")
        elif n >= seg.bot_regular_min and sd < seg.bot_regular_cv * mean:
            self.bot = (f"regular intervals: {n} intervals of {mean:.3g} s with "
                        f"std/mean {sd / mean:.3g}")

    def _check_history(self, event: Event, seg: SegmentConfig) -> None:
        """A backfill action: history is published as fast as the importer goes, so its pace
        says nothing about a hand. It feeds neither the rate bucket nor the interval
        statistics, nor `last_action` (live pace is measured between live actions); what the
        events themselves say (a run of sub-human dwells) still counts."""
        if event.kind != "dwell":
            return
        self.short_streak = self.short_streak + 1 if event.dwell < seg.bot_short_dwell else 0
        if self.short_streak >= seg.bot_short_dwell_streak:
            self.bot = (f"short dwell: {self.short_streak} dwells under "
                        f"{seg.bot_short_dwell:g} s in a row")

    def clear_bot(self) -> None:
        """The admin's `clear_bot` event: no verdict, detectors from scratch."""
        self.bot = ""
        self.rate_level, self.short_streak = 0.0, 0
        self.interval_mean, self.interval_var, self.intervals = 0.0, 0.0, 0

    # ------------------------------------------------------------ 4: impressions

    def add_impression(self, tc: float, event: Event, seg: SegmentConfig) -> None:
        """Wait for engagement; an impression of an item already waiting restarts its wait."""
        waiting = [i for i in self.impressions if i[1] != event.item]
        bisect.insort(waiting, (tc + seg.impression_timeout, event.item, event.x, event.id,
                                event.base or 0.0), key=lambda i: (i[0], i[1]))
        self.impressions = tuple(waiting)

    def cancel_impression(self, item: str) -> str | None:
        """An engagement with `item`: its waiting impression is no negative. Returns that
        impression's event id (None if none was waiting)."""
        for i, waiting in enumerate(self.impressions):
            if waiting[1] == item:
                self.impressions = self.impressions[:i] + self.impressions[i + 1:]
                return waiting[3]
        return None


EMPTY = Hygiene()  # never mutated: apply copies it first
_new = object.__new__
# one straight-line function copying every slot: 3x faster than a getattr/setattr loop
_namespace: dict = {}
exec("def _copy_fields(a, b):\n" + "".join(f"    b.{n} = a.{n}\n" for n in _FIELDS), _namespace)
_copy_fields = _namespace["_copy_fields"]


# ---------------------------------------------------------------- 5: outliers, engagement


class Signal(NamedTuple):
    """A released interaction as a learning signal."""

    y: float  # target in [0, 1]
    importance: float
    verdict: str  # "clean", "outlier_clipped", "outlier_dropped"
    observed: tuple[tuple[str, float], ...] = ()  # (statistic, value) for the segment


def sigmoid(z: float) -> float:
    """Numerically stable logistic function."""
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def _dwell_y(d: float, seg: SegmentConfig) -> float:
    return 1.0 - math.exp(-d / seg.dwell_scale)


def _hover_y(h: float, seg: SegmentConfig) -> float:
    return 0.5 * min(1.0, h / seg.hover_scale)


def engagement(event: Event, seg: SegmentConfig) -> tuple[float, float]:
    """The raw engagement target y in [0, 1] and importance of one interaction, with no
    hygiene (a segment with hygiene=False learns from this at once):

    click 1; impression 0 (a weak negative); dwell d: 1 - exp(-d / dwell_scale);
    scroll depth s: s; hover h: 0.5 min(1, h / hover_scale); feedback: its y. The importance
    is the kind's `*_importance`.
    """
    kind = event.kind
    if kind == "click":
        return 1.0, seg.click_importance
    if kind == "impression":
        return 0.0, seg.impression_importance
    if kind == "dwell":
        return _dwell_y(event.dwell, seg), seg.dwell_importance
    if kind == "scroll":
        return event.depth, seg.scroll_importance
    if kind == "hover":
        return _hover_y(event.hover, seg), seg.hover_importance
    if kind == "feedback":
        return event.target, seg.feedback_importance
    raise ValueError(f"{kind!r} is not an interaction kind")


def _duration(value: float, key: str, norms: Mapping | None, cap: float, seg: SegmentConfig,
              curve) -> tuple[float, str, float]:
    """(y, verdict, log value) of a duration (dwell, hover) against the segment's statistics
    of its log: robust z (median, IQR / 1.349) or Tukey fences, then y = sigmoid(slope z).
    Without statistics yet: an absolute cap and the raw curve."""
    lv = math.log(max(value, MIN_SECONDS))
    q = norms.get(key) if norms else None
    if q is None:
        if value <= cap:
            return curve(value, seg), "clean", lv
        return curve(cap, seg), "outlier_clipped", lv
    q1, q2, q3 = q
    iqr = q3 - q1
    sigma = max(iqr / IQR_TO_SIGMA, MIN_SCALE)
    if seg.outlier_rule == "z":
        lo, hi = q2 - seg.outlier_z * sigma, q2 + seg.outlier_z * sigma
    else:
        lo, hi = q1 - seg.outlier_iqr * iqr, q3 + seg.outlier_iqr * iqr
    verdict = "clean"
    clipped = lv
    if not lo <= lv <= hi:
        verdict = "outlier_clipped"
        clipped = min(max(lv, lo), hi)
    if not seg.normalize:
        return curve(math.exp(clipped), seg), verdict, lv
    return sigmoid(seg.norm_slope * (clipped - q2) / sigma), verdict, lv


def signal(event: Event, seg: SegmentConfig, recent: int) -> Signal:
    """The engagement target y in [0, 1] and importance of a released, non-impression event.

    As `engagement`, except: dwell and hover are tested against the segment's statistics
    (outliers clipped to the bound, or dropped) and normalised to sigmoid(norm_slope z); and a
    user action's importance is damped by min(1, segment median / recent) ** freq_power, where
    recent is the user's actions in the recent window (the segment median of the same count).
    """
    kind = event.kind
    observed: tuple[tuple[str, float], ...] = ()
    verdict = "clean"
    if kind == "dwell":
        y, verdict, lv = _duration(event.dwell, "d", event.norms, seg.dwell_max, seg, _dwell_y)
        importance = seg.dwell_importance
        observed = (("d", lv),)
    elif kind == "hover":
        y, verdict, lv = _duration(event.hover, "h", event.norms, seg.hover_max, seg, _hover_y)
        importance = seg.hover_importance
        observed = (("h", lv),)
    else:
        y, importance = engagement(event, seg)
    if verdict == "outlier_clipped" and seg.outlier_action == "drop":
        verdict = "outlier_dropped"
    if kind in ACTION_KINDS and recent > 0:
        observed = (*observed, ("f", math.log(recent)))
        q = event.norms.get("f") if event.norms else None
        if q is not None and seg.freq_power:
            importance *= min(1.0, math.exp(q[1]) / recent) ** seg.freq_power
    return Signal(y, importance, verdict, observed)


# ---------------------------------------------------------------- snapshot form


def to_wire(h: Hygiene) -> list:
    """A msgpack-ready form; floats stay float64, so a round trip is bit-identical."""
    out = [getattr(h, name) for name in _FIELDS]
    out[0] = list(h.offsets)
    out[3] = [[tc, seq, encode_logged_event(e)] for tc, seq, e in h.pending]
    out[4] = [[due, item, np.ascontiguousarray(x, _F64).tobytes(), eid, base]
              for due, item, x, eid, base in h.impressions]
    out[9] = list(h.session_ids)
    out[17] = [[b, list(c)] for b, c in h.windows]
    return out


def from_wire(obj: list) -> Hygiene:
    if len(obj) != len(_FIELDS):
        raise ValueError(f"hygiene state has {len(obj)} fields, not {len(_FIELDS)}")
    h = Hygiene.__new__(Hygiene)
    for name, value in zip(_FIELDS, obj, strict=True):
        setattr(h, name, value)
    h.offsets = tuple(h.offsets)
    h.pending = tuple((tc, seq, event_from_log(body)) for tc, seq, body in h.pending)
    # snapshot schema 2 had no segment model score on waiting impressions
    h.impressions = tuple((due, item, np.frombuffer(x, _F64), eid, *(rest or (0.0,)))
                          for due, item, x, eid, *rest in h.impressions)
    h.session_ids = tuple(h.session_ids)
    h.windows = tuple((b, tuple(c)) for b, c in h.windows)
    return h
