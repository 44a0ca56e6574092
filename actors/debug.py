"""A user's timeline for debugging: what every logged event did, replayed with a trace;
and what its plot shows (`plot_data`: adapters/debug_plot.py draws it).

The replay runs the same `apply` as live traffic, from seq 1, and asks it for a trace
(`actors.learning.Step`): so the timeline shows exactly the decisions the live system made.
With data hygiene an event may learn later than it was logged (when a later event releases
it, or at an impression's deadline): its row shows its final verdict and the seq of the event
that released it.
"""

from __future__ import annotations

import math
from collections import Counter
from datetime import UTC, datetime
from typing import Any, NamedTuple

import numpy as np

from actors.configs import ConfigRegistry
from actors.learning import Step, apply, settle
from actors.state import UserState
from events.codec import event_from_log
from events.types import ADMIN_KINDS, EXPOSURE, INTERACTION_KINDS, Event
from store.recorder import Recorder

TOP_MOVES = 3  # features listed per learning step


class Row(NamedTuple):
    seq: int
    event_id: str
    kind: str
    item: str | None
    t: float
    received: float | None
    verdict: str
    y: float | None = None  # target
    importance: float | None = None
    p: float | None = None  # the prediction before the update
    rate: float | None = None  # mean per-coordinate learning rate
    change: float | None = None  # L2 norm of the weight change
    moved: tuple[tuple[str, float], ...] = ()  # (feature, change), largest first
    learned_at: int | None = None  # seq of the event whose arrival made it learn
    session: int | None = None
    late: bool = False  # arrived after the lateness window (learned at the frontier, or dropped)
    note: str | None = None  # an operator's or control event in words ("to seq 7: TICKET-7")

    def to_map(self) -> dict[str, Any]:
        return {k: (list(map(list, v)) if k == "moved" else v)
                for k, v in self._asdict().items()}


class Learning(NamedTuple):
    """One learning step: when it moved the weights and by how much. An event can learn
    more than once (a rollback puts it back in the reorder buffer); its row shows the last."""

    at: int | None  # seq of the arrival that released it (None: only in the query view)
    seq: int  # the event learned from
    kind: str
    item: str | None
    change: float  # L2 norm of the weight change


class Timeline(NamedTuple):
    user: str
    rows: list[Row]
    state: UserState  # after the last event (as logged)
    settled: UserState  # as queries see it (the reorder buffer released)
    history: list[tuple[int, np.ndarray]]  # (seq, weights) after every change
    # the segment's prior when the user first learned: what its first step moved away from
    prior: np.ndarray | None = None
    learning: tuple[Learning, ...] = ()  # every learning step, in log order


def feature_names(dim: int) -> list[str]:
    return ["bias", *(f"x{i}" for i in range(dim))]


def timeline(recorder: Recorder, configs: ConfigRegistry, user: str, *,
             until_seq: int | None = None) -> Timeline:
    state = UserState(user)
    rows: dict[str, Row] = {}
    order: list[str] = []
    history: list[tuple[int, np.ndarray]] = []
    learning: list[Learning] = []
    prior: np.ndarray | None = None
    config = configs.current
    for stored in recorder.read(user, until_seq=until_seq):
        event = event_from_log(stored.body)
        config = configs.get(event.config)
        trace: list[Step] = []
        before = state.w
        state = apply(state, event, config, trace)
        rows[event.id] = Row(stored.seq, event.id, event.kind, event.item, event.t,
                             event.received, "logged", note=_note(event))
        order.append(event.id)
        _record(rows, trace, stored.seq, state, config.dim, learning)
        if state.w is not before:
            if prior is None and event.kind not in ADMIN_KINDS:
                prior = config.prior(state.segment)
            history.append((stored.seq, state.w))
    trace = []
    settled = settle(state, config, trace)
    _record(rows, trace, None, settled, config.dim, learning)
    if prior is None and settled.w is not state.w:
        prior = config.prior(settled.segment)
    return Timeline(user, [rows[i] for i in order], state, settled, history, prior,
                    tuple(learning))


def _note(event: Event) -> str | None:
    why = event.extra.get("why")
    because = f": {why}" if why else ""
    if event.kind == "rollback":
        return f"to seq {event.to_seq}{because}"
    if event.kind == "restore":
        return f"imported state{because}"
    if event.kind == "segment":
        return f"to segment {event.segment}"
    if event.kind == "clear_bot":
        return f"bot verdict cleared{because}"
    return None


def _record(rows: dict[str, Row], trace: list[Step], seq: int | None, state: UserState,
            dim: int, learning: list[Learning]) -> None:
    session = state.hyg.session if state.hyg is not None else None
    names = feature_names(dim)
    for step in trace:
        row = rows.get(step.event_id)
        if row is None:
            continue
        update: dict[str, Any] = {"verdict": step.verdict, "session": session}
        if step.verdict in ("late", "late_dropped"):  # its final verdict may be another
            update["late"] = True
        if step.verdict not in ("pending", "impression_pending"):
            update["learned_at"] = seq
        if step.step is not None:
            moved = -step.step  # w moves by -step
            top = np.argsort(-np.abs(moved))[:TOP_MOVES]
            update.update(y=step.y, importance=step.importance, p=step.p, rate=step.rate,
                          change=float(np.linalg.norm(moved)),
                          moved=tuple((names[i], float(moved[i])) for i in top))
            learning.append(Learning(seq, row.seq, row.kind, row.item, update["change"]))
        rows[step.event_id] = row._replace(**update)


def summary(tl: Timeline, configs: ConfigRegistry) -> dict[str, Any]:
    """The user's state in words and numbers, for the header of the debug view."""
    s = tl.settled
    config = configs.get(s.config or None)
    seg = config.segment(s.segment)
    out: dict[str, Any] = {
        "user": tl.user, "seq": s.seq, "config": s.config, "segment": s.segment,
        "learning_steps": s.steps,
        "weights": dict(zip(feature_names(config.dim), s.w.tolist(), strict=False)),
    }
    h = s.hyg
    if h is not None:
        out.update(
            session={"number": h.session, "start": h.session_start, "last": h.session_last,
                     "events": h.session_events, "client_ids": list(h.session_ids)},
            bot=h.bot or None, clock_skew_s=h.skew(), late=h.late, outliers=h.outliers,
            ignored_as_bot=h.ignored, waiting_impressions=len(h.impressions),
            recent_window=h.window_counts(seg),
        )
    return out


# ---------------------------------------------------------------- what the plot shows
# Chosen here from the timeline and drawn by adapters/debug_plot.py, so that tests (and any
# other view) can check what the plot says without reading pixels.

HIGHLIGHT = 6  # dimensions drawn in colour, largest total movement first; the others grey
MIN_SHARE = 0.02  # ... and only those that moved at least this share of the largest
USER_KINDS = (*INTERACTION_KINDS, EXPOSURE)  # what the user did or was shown: the strip rows
VERDICT_GROUPS = ("late", "outlier", "bot")  # hygiene verdicts marked, in this order


class Dimension(NamedTuple):
    name: str
    index: int  # column of `PlotData.weights`
    movement: float  # total |change| over every learning step (a rollback's jump excluded)
    net: float  # latest value minus where it started (the prior)
    why: str  # in words: its rank, movement and largest single step, and what made it


class Series(NamedTuple):
    """Events drawn as markers: where (the user's clock time) and which (their seqs)."""

    label: str  # an event kind ("click") or a verdict group ("late", "outlier", "bot")
    t: tuple[float, ...]
    seq: tuple[int, ...]  # the events' own seqs
    detail: str = ""  # e.g. "6 dropped" for outliers


class Mark(NamedTuple):
    """One event drawn as a line across the plot: an operator's or a control event."""

    kind: str  # rollback, restore, segment, clear_bot, or "bot" (the verdict)
    t: float
    seq: int
    label: str


class Learned(NamedTuple):
    """One learning step: when it moved the weights (the arrival that released it) and by
    how much."""

    t: float
    seq: int  # the seq of that arrival; the last seq for the query view's steps
    event_seq: int  # the event learned from
    kind: str
    change: float  # |Δw|


class PlotData(NamedTuple):
    user: str
    title: str  # what the plot shows, or why no weight moved
    subtitle: str  # the log in one line: events, span, sessions, steps, rollbacks, bot
    empty: str | None  # why no weight moved (None: some did)
    names: tuple[str, ...]  # feature names, bias first
    # the weights as a step line: where they started (seq 0, the prior, at the first event),
    # then after every change, and the query view's last (at the last seq) if it differs
    times: np.ndarray  # clock time of each point (float64, seconds since the epoch)
    seqs: np.ndarray
    weights: np.ndarray  # (points, features); NaN where the user had no weights
    highlighted: tuple[Dimension, ...]
    faded: tuple[str, ...]  # moved, less than the highlighted ones: drawn grey
    still: tuple[str, ...]  # never moved
    events: tuple[Series, ...]  # per user kind present, in USER_KINDS order
    verdicts: tuple[Series, ...]  # per verdict group present, in VERDICT_GROUPS order
    marks: tuple[Mark, ...]  # rollbacks, restores, control events, the bot verdict
    learned: tuple[Learned, ...]
    row_times: np.ndarray  # clock time of every logged event (the axis covers them all)
    row_seqs: np.ndarray


def clock(rows: list[Row]) -> np.ndarray:
    """Where each logged event sits on the user's event-time axis: the newest event time
    logged so far. So the axis follows the log: an event logged out of time order (late, or
    history sent after newer events) sits where it arrived, which is when it moved the
    weights. An event time after its receive time counts as the receive time (as hygiene
    takes it). Operators' and control events carry the operator's wall clock, not the user's
    time: they sit at the user's time so far."""
    times = np.full(len(rows), np.nan)
    newest = -math.inf
    for i, row in enumerate(rows):
        if row.kind in USER_KINDS:
            t = row.t if row.received is None else min(row.t, row.received)
            newest = max(newest, t)
        if newest > -math.inf:
            times[i] = newest
    known = ~np.isnan(times)
    if not known.any():  # only operators' events: their own times are all there is
        return np.maximum.accumulate(np.array([r.t for r in rows], dtype=float))
    times[~known] = times[known][0]  # operators' events before the first user event
    return times


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _bot_since(tl: Timeline, at: dict[int, float]) -> Mark | None:
    """When the user was marked a bot: the release of the first event judged a bot's after
    the last `clear_bot`."""
    hyg = tl.settled.hyg
    if hyg is None or not hyg.bot:
        return None
    cleared = max((r.seq for r in tl.rows if r.kind == "clear_bot"), default=0)
    first = next((r for r in tl.rows if r.verdict == "bot" and r.seq > cleared), None)
    if first is None:
        return None
    seq = first.learned_at if first.learned_at is not None else tl.rows[-1].seq
    return Mark("bot", at[seq], seq, f"marked a bot: {hyg.bot}")


def _why_still(tl: Timeline) -> str:
    """Why a user's weights never moved, for the plot's title."""
    hyg = tl.settled.hyg
    if hyg is not None and hyg.bot:
        since = _bot_since(tl, dict(zip([r.seq for r in tl.rows], clock(tl.rows),
                                        strict=True)))
        when = f"since {_when(since.t)} (seq {since.seq}), " if since else ""
        return f"marked a bot: {hyg.bot}; {when}its {hyg.ignored} events are ignored"
    if not tl.rows:
        return "its log is empty"
    verdicts = {r.verdict for r in tl.rows if r.kind in INTERACTION_KINDS}
    if not verdicts:
        return "none of its events learns (exposures and control events move no weight)"
    if verdicts & {"pending", "impression_pending"} and not any(
            r.change is not None for r in tl.rows):
        return ("no event of it has learned yet: they wait in the lateness window or for an "
                "impression's deadline")
    if verdicts <= {"late_dropped", "outlier_dropped"}:
        return "hygiene dropped every event of it (late, outliers)"
    if any(r.change == 0.0 for r in tl.rows):
        return "its segment makes no micro-adjustment (personal = false)"
    return "no event of it has learned yet (waiting in the lateness window, or none learns)"


def _points(tl: Timeline, at: dict[int, float]
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The weights after every change, and the query view's at the end if it differs; and
    which points are an operator's jump (a rollback or restore: it undoes or replaces, it
    does not learn)."""
    admin = {r.seq for r in tl.rows if r.kind in ADMIN_KINDS}
    points = [(q, w, q in admin) for q, w in tl.history]
    if tl.rows and tl.settled.w is not tl.state.w and tl.settled.w.shape[0]:
        points.append((tl.rows[-1].seq, tl.settled.w, False))
    width = max((w.shape[0] for _, w, _ in points), default=0)
    weights = np.full((len(points), width), np.nan)
    for i, (_, w, _) in enumerate(points):
        if w.shape[0] == width:  # else none (a rollback to before the first step): NaN
            weights[i] = w
    seqs = np.array([q for q, _, _ in points], dtype=np.int64)
    jumps = np.array([j for _, _, j in points], dtype=bool)
    return np.array([at[q] for q in seqs.tolist()], dtype=float), seqs, weights, jumps


def _movement(prior: np.ndarray | None, weights: np.ndarray, jumps: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per point the change it learned (NaN for a jump), the total per feature, and where
    each feature started: the prior, or what an operator's first event put in place."""
    width = weights.shape[1]
    start = prior if prior is not None and prior.shape[0] == width else np.zeros(width)
    if jumps.size and jumps[0] and not np.isnan(weights[0]).any():
        start = weights[0]
    deltas = np.full_like(weights, np.nan)
    previous = start
    for i, w in enumerate(weights):
        if np.isnan(w).any():  # no weights (rolled back to before the first step)
            previous = start
            continue
        if not jumps[i]:
            deltas[i] = w - previous
        previous = w
    return deltas, np.nan_to_num(np.abs(deltas)).sum(axis=0), start


def _choose(names: tuple[str, ...], tl: Timeline, seqs: np.ndarray, weights: np.ndarray,
            jumps: np.ndarray
            ) -> tuple[tuple[Dimension, ...], tuple[str, ...], tuple[str, ...], np.ndarray]:
    """The features to highlight (and why), those drawn grey, those that never moved, and
    where the weights started."""
    if not weights.size:
        return (), (), names, np.zeros(0)
    deltas, total, start = _movement(tl.prior, weights, jumps)
    last = tl.rows[-1].seq if tl.rows else 0
    learned_at: dict[int, list[Learning]] = {}
    for step in tl.learning:
        learned_at.setdefault(last if step.at is None else step.at, []).append(step)
    order = [int(i) for i in np.argsort(-total, kind="stable") if total[i] > 0]
    top = [i for i in order[:HIGHLIGHT] if total[i] >= MIN_SHARE * total[order[0]]]
    latest = next((w for w in weights[::-1] if not np.isnan(w).any()), start)
    ranks = ("largest", "2nd largest", "3rd largest", *(f"{n}th largest" for n in range(4, 10)))
    chosen = []
    for rank, i in enumerate(top):
        biggest = int(np.argmax(np.where(np.isnan(deltas[:, i]), -1.0,
                                         np.abs(deltas[:, i]))))
        by = learned_at.get(int(seqs[biggest]), [])
        what = _events_in_words(by)
        why = (f"{ranks[rank]} total movement ({total[i]:.3g}, net "
               f"{latest[i] - start[i]:+.3g}); largest step {deltas[biggest, i]:+.3g} at "
               f"seq {seqs[biggest]}, from {what}")
        chosen.append(Dimension(names[i], i, float(total[i]),
                                float(latest[i] - start[i]), why))
    faded = tuple(names[i] for i in order if i not in top)
    still = tuple(n for i, n in enumerate(names) if total[i] <= 0)
    return tuple(chosen), faded, still, start


def _events_in_words(steps: list[Learning]) -> str:
    if len(steps) <= 2:
        return ", ".join(f"{s.kind} {s.item} (seq {s.seq})" if s.item else s.kind
                         for s in steps) or "decay"
    counts = Counter(s.kind for s in steps)
    return f"{len(steps)} events at once: " + ", ".join(
        _count(n, kind) for kind, n in counts.most_common())


def _series(rows: list[Row], at: dict[int, float]
            ) -> tuple[tuple[Series, ...], tuple[Series, ...]]:
    """Events by kind, and by hygiene verdict, each at its arrival: a verdict's marker sits
    under its event (an outlier's or a bot's verdict is reached a little later, when the
    lateness window releases the event; the bot's shading starts there)."""
    kinds: dict[str, list[Row]] = {}
    groups: dict[str, list[Row]] = {}
    for r in rows:
        if r.kind in USER_KINDS:
            kinds.setdefault(r.kind, []).append(r)
        if r.late:
            groups.setdefault("late", []).append(r)
        if r.verdict.startswith("outlier"):
            groups.setdefault("outlier", []).append(r)
        if r.verdict == "bot":
            groups.setdefault("bot", []).append(r)

    def series(label: str, of: list[Row], detail: str = "") -> Series:
        return Series(label, tuple(at[r.seq] for r in of), tuple(r.seq for r in of), detail)

    def dropped(of: list[Row]) -> str:
        n = sum(r.verdict.endswith("dropped") for r in of)
        return f"{n} dropped" if n else ""

    events = tuple(series(k, kinds[k]) for k in USER_KINDS if k in kinds)
    verdicts = tuple(series(g, groups[g], "" if g == "bot" else dropped(groups[g]))
                     for g in VERDICT_GROUPS if g in groups)
    return events, verdicts


def plot_data(tl: Timeline) -> PlotData:
    """What `microtune debug --plot` draws: the dimensions that moved most (and why), the
    events, verdicts and operators' actions as markers on the user's event-time axis, and a
    title that says what moved the weights or why none moved."""
    row_times = clock(tl.rows)
    row_seqs = np.array([r.seq for r in tl.rows], dtype=np.int64)
    at = dict(zip(row_seqs.tolist(), row_times.tolist(), strict=True))
    times, seqs, weights, jumps = _points(tl, at)
    names = tuple(feature_names(weights.shape[1] - 1)) if weights.shape[1] else ()
    highlighted, faded, still, start = _choose(names, tl, seqs, weights, jumps)
    if highlighted and not jumps[0]:  # the line starts where the weights did, at the start
        times = np.concatenate(([row_times[0]], times))
        seqs = np.concatenate(([0], seqs))
        weights = np.vstack((start, weights))
    events, verdicts = _series(tl.rows, at)
    marks = [Mark(r.kind, at[r.seq], r.seq, f"{r.kind} {r.note}" if r.note else r.kind)
             for r in tl.rows if r.kind not in USER_KINDS]
    bot = _bot_since(tl, at)
    if bot is not None:
        marks.append(bot)
    last = int(row_seqs[-1]) if row_seqs.size else 0
    learned = tuple(Learned(at[s.at if s.at is not None else last],
                            s.at if s.at is not None else last, s.seq, s.kind, s.change)
                    for s in tl.learning)

    moved = bool(highlighted)
    empty = None if moved else _why_still(tl)
    title = (f"user {tl.user}: what moved its weights, and when" if moved
             else f"user {tl.user}: no weight has moved: {empty}")
    parts = []
    if tl.rows:
        hyg = tl.settled.hyg
        sessions = f" in {_count(hyg.session, 'session')}" if hyg and hyg.session else ""
        parts.append(f"{_count(len(tl.rows), 'event')} from {_when(float(row_times[0]))} to "
                     f"{_when(float(row_times[-1]))}{sessions}")
        steps = [s for s in tl.learning if s.change]  # a frozen segment's move nothing
        parts.append(_count(len(steps), "learning step"))
        waiting = sum(s.at is None for s in steps)
        if waiting:  # drawn at the last event: a query releases them (`settle`)
            parts.append(f"{waiting} of them only in the query view (events still in the "
                         "lateness window)")
        rollbacks = sum(r.kind == "rollback" for r in tl.rows)
        if rollbacks:
            parts.append(_count(rollbacks, "rollback"))
        if bot is not None and moved:  # an empty plot's title says it already
            parts.append(f"marked a bot since {_when(bot.t)} (seq {bot.seq}): "
                         f"{tl.settled.hyg.bot}")
    return PlotData(tl.user, title, " · ".join(parts), empty, names, times, seqs, weights,
                    highlighted, faded, still, events, verdicts, tuple(marks), learned,
                    row_times, row_seqs)
