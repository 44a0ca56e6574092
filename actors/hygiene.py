"""Data hygiene: the pure bookkeeping that turns raw events into clean learning signals.

Part of the deterministic state transition (`actors.learning.apply` calls these); nothing here
reads a clock, randomness or shared state. What it needs from outside the user's own state
(the segment's statistics) is logged with the event (`Event.norms`), so replay stays exact.

The rules, in the order an event meets them (README "Data hygiene" has the table):

1. Time alignment. The logged event has the client's time t and the broker's receive time r.
   The user's clock offset is the lower quartile of the last SKEW_SAMPLES offsets r - t (a
   low quantile: delivery delays only add to the offset; a quartile, not the minimum, so that
   one bogus timestamp does not move it). Offsets within `skew_tolerance` are delay, offsets
   beyond `max_skew` are delayed delivery (offline queues, backfills): neither is corrected.
   The corrected time tc = t + offset is never later than r.
2. Ordering. Events wait in a buffer until the user's newest time minus `lateness` passes
   them, and leave it in (tc, seq) order. An event older than the last one released is late:
   `late_policy` "apply" learns from it at the release frontier, "drop" ignores it.
3. Sessions, recent windows and the bot heuristics see released events in event-time order.
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

SKEW_SAMPLES = 9  # offsets kept for the clock-skew estimate
SKEW_RANK = 2  # the third smallest of nine: the lower quartile
WINDOW_BUCKETS = 5  # a recent window is counted in this many buckets
MAX_IMPRESSIONS = 64  # waiting impressions per user; beyond, the oldest becomes due at once
MAX_SESSION_FRAGMENTS = 16
MIN_SECONDS = 1e-3  # log(0) guard for dwell and hover
IQR_TO_SIGMA = 1.349  # a normal distribution's IQR in standard deviations
MIN_SCALE = 0.05  # log-space scale floor: a segment with identical values still has a scale
REGULAR_ALPHA = 0.1  # weight of a new interval in the running interval mean and variance
COUNTED_KINDS = tuple(INTERACTION_KINDS)  # the recent-window counts, by kind
_F64 = np.dtype("<f8")
_KIND_INDEX = {k: i for i, k in enumerate(COUNTED_KINDS)}
_ACTION_INDEXES = tuple(_KIND_INDEX[k] for k in sorted(ACTION_KINDS))


class Hygiene(NamedTuple):
    """A user's hygiene state (part of `UserState`; in snapshots)."""

    offsets: tuple[float, ...] = ()  # the last SKEW_SAMPLES r - t, oldest first
    t_max: float = -1.0  # newest corrected event time admitted
    frontier: float = -1.0  # corrected time of the last released event
    # waiting for release: (tc, seq, event), sorted
    pending: tuple[tuple[float, int, Event], ...] = ()
    # waiting impressions: (due, item, x, event id), sorted by due (items are unique)
    impressions: tuple[tuple[float, str, np.ndarray, str], ...] = ()
    session: int = 0  # sessions so far; the current one is number `session`
    session_start: float = -1.0
    session_last: float = -1.0
    session_events: int = 0
    session_ids: tuple[str, ...] = ()  # client session ids joined into this session
    bot: str = ""  # the verdict's reason; empty: a human
    rate_level: float = 0.0  # leaky bucket of user actions (drains bot_max_rate per second)
    last_action: float = -1.0
    short_streak: int = 0  # dwell events in a row below bot_short_dwell
    interval_mean: float = 0.0  # running mean and variance of inter-action intervals
    interval_var: float = 0.0
    intervals: int = 0
    windows: tuple[tuple[int, tuple[int, ...]], ...] = ()  # (bucket, counts by kind)
    late: int = 0  # events later than the lateness window
    outliers: int = 0
    ignored: int = 0  # events of a marked bot


EMPTY = Hygiene()


# ---------------------------------------------------------------- 1, 2: time and order


def corrected_time(h: Hygiene, event: Event, seg: SegmentConfig) -> tuple[float, Hygiene]:
    """The event's corrected time, and the state with its offset recorded."""
    t, r = event.t, event.received
    if r is None:  # no receive time (a library caller, an old log): trust the client
        return t, h
    offsets = (*h.offsets[-(SKEW_SAMPLES - 1):], r - t)
    h = h._replace(offsets=offsets)
    skew = sorted(offsets)[min(SKEW_RANK, len(offsets) - 1)]
    tc = t + skew if seg.skew_tolerance < abs(skew) <= seg.max_skew else t
    if tc > r + seg.skew_tolerance:  # nothing happens after it was received
        tc = r
    return tc, h


def skew(h: Hygiene) -> float:
    """The current clock-offset estimate (0 without samples), for the debug view."""
    if not h.offsets:
        return 0.0
    return sorted(h.offsets)[min(SKEW_RANK, len(h.offsets) - 1)]


def buffer(h: Hygiene, tc: float, seq: int, event: Event) -> Hygiene:
    pending = list(h.pending)
    bisect.insort(pending, (tc, seq, event), key=lambda p: (p[0], p[1]))
    return h._replace(pending=tuple(pending), t_max=max(h.t_max, tc))


# ---------------------------------------------------------------- 3: sessions, windows, bots


def observe_session(h: Hygiene, tc: float, event: Event, seg: SegmentConfig) -> Hygiene:
    if h.session_last < 0 or tc - h.session_last > seg.session_timeout:
        ids = (event.session,) if event.session else ()
        return h._replace(session=h.session + 1, session_start=tc, session_last=tc,
                          session_events=1, session_ids=ids)
    ids = h.session_ids
    if event.session and event.session not in ids and len(ids) < MAX_SESSION_FRAGMENTS:
        ids = (*ids, event.session)  # a fragment (another tab, a reconnect) joins
    return h._replace(session_last=max(h.session_last, tc),
                      session_events=h.session_events + 1, session_ids=ids)


def count_window(h: Hygiene, tc: float, kind: str, seg: SegmentConfig) -> Hygiene:
    bucket = int(tc // (seg.recent_window / WINDOW_BUCKETS))
    keep = [b for b in h.windows if b[0] > bucket - WINDOW_BUCKETS]
    index = _KIND_INDEX[kind]
    if keep and keep[-1][0] == bucket:
        counts = list(keep[-1][1])
        counts[index] += 1
        keep[-1] = (bucket, tuple(counts))
    else:
        counts = [0] * len(COUNTED_KINDS)
        counts[index] = 1
        keep.append((bucket, tuple(counts)))
    return h._replace(windows=tuple(keep))


def window_counts(h: Hygiene, seg: SegmentConfig, now: float | None = None) -> dict[str, int]:
    """Counts by kind over the recent window ending at `now` (default: the user's newest
    released event), at the window's bucket granularity."""
    if now is None:
        now = h.frontier
    bucket = int(now // (seg.recent_window / WINDOW_BUCKETS))
    totals = [0] * len(COUNTED_KINDS)
    for b, counts in h.windows:
        if bucket - WINDOW_BUCKETS < b <= bucket:
            for i, c in enumerate(counts):
                totals[i] += c
    return dict(zip(COUNTED_KINDS, totals, strict=True))


def recent_actions(h: Hygiene) -> int:
    """User actions in the current recent window (at the newest released event)."""
    if not h.windows:
        return 0
    last = h.windows[-1][0]
    return sum(counts[i] for b, counts in h.windows if b > last - WINDOW_BUCKETS
               for i in _ACTION_INDEXES)


def check_bot(h: Hygiene, tc: float, event: Event, seg: SegmentConfig) -> Hygiene:
    """Update the bot detectors with a released event; set `bot` to the reason on a verdict."""
    if event.automated:
        return h._replace(bot="declared: the publisher flagged the event as automated")
    if event.kind not in ACTION_KINDS:
        return h
    dt = tc - h.last_action if h.last_action >= 0 else None
    level = (max(0.0, h.rate_level - dt * seg.bot_max_rate) if dt is not None else 0.0) + 1.0
    streak = h.short_streak
    if event.kind == "dwell":
        streak = streak + 1 if event.dwell < seg.bot_short_dwell else 0
    mean, var, n = h.interval_mean, h.interval_var, h.intervals
    if dt is not None and dt > 0:
        n += 1
        if n == 1:
            mean, var = dt, 0.0
        else:  # exponentially weighted mean and variance
            diff = dt - mean
            mean += REGULAR_ALPHA * diff
            var = (1.0 - REGULAR_ALPHA) * (var + REGULAR_ALPHA * diff * diff)
    h = h._replace(rate_level=level, last_action=tc, short_streak=streak,
                   interval_mean=mean, interval_var=var, intervals=n)
    if level > seg.bot_burst:
        return h._replace(bot=f"rate: over {seg.bot_max_rate:g} actions/s beyond a burst of "
                              f"{seg.bot_burst:g}")
    if streak >= seg.bot_short_dwell_streak:
        return h._replace(bot=f"short dwell: {streak} dwells under {seg.bot_short_dwell:g} s "
                              "in a row")
    if n >= seg.bot_regular_min and math.sqrt(var) < seg.bot_regular_cv * mean:
        return h._replace(bot=f"regular intervals: {n} intervals of {mean:.3g} s with "
                              f"std/mean {math.sqrt(var) / mean:.3g}")
    return h


def clear_bot(h: Hygiene) -> Hygiene:
    """The admin's `clear_bot` event: no verdict, detectors from scratch."""
    return h._replace(bot="", rate_level=0.0, short_streak=0, interval_mean=0.0,
                      interval_var=0.0, intervals=0)


# ---------------------------------------------------------------- 4: impressions


def add_impression(h: Hygiene, tc: float, event: Event, seg: SegmentConfig) -> Hygiene:
    """Wait for engagement; an impression of an item already waiting restarts its wait."""
    waiting = [i for i in h.impressions if i[1] != event.item]
    bisect.insort(waiting, (tc + seg.impression_timeout, event.item, event.x, event.id),
                  key=lambda i: (i[0], i[1]))
    return h._replace(impressions=tuple(waiting))


def cancel_impression(h: Hygiene, item: str) -> tuple[Hygiene, bool]:
    """An engagement with `item`: its waiting impression is no negative."""
    waiting = tuple(i for i in h.impressions if i[1] != item)
    if len(waiting) == len(h.impressions):
        return h, False
    return h._replace(impressions=waiting), True


# ---------------------------------------------------------------- 5: outliers, engagement


class Signal(NamedTuple):
    """A released interaction as a learning signal."""

    y: float  # target in [0, 1]
    importance: float
    verdict: str  # "clean", "outlier_clipped", "outlier_dropped"
    observed: tuple[tuple[str, float], ...] = ()  # (statistic, value) for the segment


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def _duration(value: float, key: str, norms: Mapping | None, cap: float, scale: float,
              seg: SegmentConfig, fallback) -> tuple[float, str]:
    """(y, verdict) for a duration (dwell, hover) against the segment's log-statistics."""
    q = norms.get(key) if norms else None
    lv = math.log(max(value, MIN_SECONDS))
    if q is None:  # the segment has no statistics yet: an absolute cap, the fixed curve
        if value <= cap:
            return fallback(value), "clean"
        return fallback(cap), "outlier_clipped"
    q1, q2, q3 = q
    iqr = q3 - q1
    sigma = max(iqr / IQR_TO_SIGMA, MIN_SCALE)
    if seg.outlier_rule == "z":
        lo, hi = q2 - seg.outlier_z * sigma, q2 + seg.outlier_z * sigma
    else:
        lo, hi = q1 - seg.outlier_iqr * iqr, q3 + seg.outlier_iqr * iqr
    verdict = "clean"
    if not lo <= lv <= hi:
        verdict = "outlier_clipped"
        lv = min(max(lv, lo), hi)
    if not seg.normalize:
        return fallback(math.exp(lv)), verdict
    return _sigmoid(seg.norm_slope * (lv - q2) / sigma), verdict


def signal(event: Event, seg: SegmentConfig, recent: int) -> Signal:
    """The engagement target y in [0, 1] and importance of a released, non-impression event.

    click 1; dwell and hover sigmoid(norm_slope z) of the log duration against the segment's
    statistics (without them: 1 - exp(-d / dwell_scale), 0.5 min(1, h / hover_scale));
    scroll depth; feedback its y. Outliers (dwell, hover) are clipped to the bound or dropped.
    Importance: the kind's weight, times min(1, median / recent) ** freq_power, where recent is
    the user's actions in the recent window and median the segment's.
    """
    kind = event.kind
    observed: tuple[tuple[str, float], ...] = ()
    verdict = "clean"
    if kind == "click":
        y, importance = 1.0, seg.click_importance
    elif kind == "dwell":
        y, verdict = _duration(event.dwell, "d", event.norms, seg.dwell_max, seg.dwell_scale,
                               seg, lambda d: 1.0 - math.exp(-d / seg.dwell_scale))
        importance = seg.dwell_importance
        observed = (("d", math.log(max(event.dwell, MIN_SECONDS))),)
    elif kind == "hover":
        y, verdict = _duration(event.hover, "h", event.norms, seg.hover_max, seg.hover_scale,
                               seg, lambda h: 0.5 * min(1.0, h / seg.hover_scale))
        importance = seg.hover_importance
        observed = (("h", math.log(max(event.hover, MIN_SECONDS))),)
    elif kind == "scroll":
        y, importance = event.depth, seg.scroll_importance
    elif kind == "feedback":
        y, importance = event.target, seg.feedback_importance
    else:
        raise ValueError(f"{kind!r} is not an engagement kind")
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
    return [
        list(h.offsets), h.t_max, h.frontier,
        [[tc, seq, encode_logged_event(e)] for tc, seq, e in h.pending],
        [[due, item, np.ascontiguousarray(x, _F64).tobytes(), eid]
         for due, item, x, eid in h.impressions],
        h.session, h.session_start, h.session_last, h.session_events, list(h.session_ids),
        h.bot, h.rate_level, h.last_action, h.short_streak,
        h.interval_mean, h.interval_var, h.intervals,
        [[b, list(c)] for b, c in h.windows],
        h.late, h.outliers, h.ignored,
    ]


def from_wire(obj: list) -> Hygiene:
    (offsets, t_max, frontier, pending, impressions, session, session_start, session_last,
     session_events, session_ids, bot, rate_level, last_action, short_streak, interval_mean,
     interval_var, intervals, windows, late, outliers, ignored) = obj
    return Hygiene(
        tuple(offsets), t_max, frontier,
        tuple((tc, seq, event_from_log(body)) for tc, seq, body in pending),
        tuple((due, item, np.frombuffer(x, _F64), eid) for due, item, x, eid in impressions),
        session, session_start, session_last, session_events, tuple(session_ids),
        bot, rate_level, last_action, short_streak, interval_mean, interval_var, intervals,
        tuple((b, tuple(c)) for b, c in windows), late, outliers, ignored,
    )
