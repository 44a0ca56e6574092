"""The pure state transition: `apply(state, event, config) -> state`.

This is the only code that moves a weight. Live traffic, activation and replay all call it, so
replaying the log rebuilds the bit-identical state. It reads nothing but its arguments: no
wall clock (time comes from the events), no randomness, no global mutable state. Arrays in the
input state are never mutated; every update builds new ones.

The update (DESIGN.md section 4), for an event at event time t, item features x (the bias 1.0
is prepended here), engagement target y in [0, 1] and importance a:

  decay     f = 0.5 ** (dt / half_life),  dt = t - t_last (no decay for an older event)
            w = w0 + f (w - w0);  m *= f;  v *= f        old preferences fade toward the prior
  predict   p = sigmoid(b + w . x)   b: the segment model's score of the item, stamped on
                                     the logged event at ingest (0 without a segment model)
  gradient  g = a (p - y) x + l2 (w - w0)                 log-loss gradient, L2 toward the prior
  moments   adam:    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
                     direction = m / (1 - b1^n);  v_hat = v / (1 - b2^n)
            rmsprop: v = b2 v + (1 - b2) g^2;  direction = g;  v_hat = v / (1 - b2^n)
            adagrad: v = v + g^2;  direction = g;  v_hat = v
  rate      r = clip(k lr / (sqrt(v_hat) + eps), lr_min, k lr_max)  per coordinate (AdaBound)
            k = 1 + warmup / (1 + n / warmup_events), n the user's learning steps so far:
            a new user's rates start higher and settle as its evidence grows
  step      s = r * direction
  bounds    |s|_2 <= max_step;  then a leaky bucket that drains window_budget per window
            seconds caps the movement: |s|_2 <= window_budget - level (level += |s|_2)
  update    w = w - s
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from actors import hygiene
from actors.hygiene import engagement, sigmoid
from actors.kernel import ADAGRAD, OPTIMIZER_CODES, biased_dot, learn
from actors.state import RECENT_IDS, UserState, decode_state, id_hash
from events.config import SegmentConfig, TuningConfig
from events.types import ADMIN_KINDS, EXPOSURE, INTERACTION_KINDS, Event


class Step(NamedTuple):
    """What `apply` did with one event (or one impression's deadline), when asked to trace.

    `verdict`: applied, pending (waiting for the lateness window), late, late_dropped, bot,
    outlier_clipped, outlier_dropped, impression_pending, impression_engaged (a later
    engagement cancelled it), impression_negative, control, rollback, restore.
    For a learning step also the target y, importance, the prediction before the update, the
    mean per-coordinate rate and the step taken (w moved by -step, decay aside), the item
    features and the user's own score w . x before the update (what the segment model learns
    from: actors/segment_model.py).
    """

    event_id: str
    kind: str
    t: float
    verdict: str
    y: float | None = None
    importance: float | None = None
    p: float | None = None
    rate: float | None = None
    step: np.ndarray | None = None
    observed: tuple[tuple[str, float], ...] = ()  # (segment statistic, value)
    x: np.ndarray | None = None
    score: float | None = None
    item: str | None = None  # the item learned about (the segment model's item effects)


def apply(
    state: UserState, event: Event, config: TuningConfig, trace: list[Step] | None = None
) -> UserState:
    """The state after `event`, which must be the user's next logged event (seq + 1).

    With hygiene on (the segment's default), an interaction waits in the user's reorder
    buffer, and this call learns from whatever the event releases (README "Data hygiene").
    Released events learn under `config`, the config of the event that releases them. Arrays
    of the input state are never written; in-place operations below act only on arrays this
    call has just created. `trace`, when given, receives a `Step` per decision.
    """
    if event.kind in ADMIN_KINDS:
        return _restore(state, event, config, trace)
    # positional construction: NamedTuple._replace costs microseconds on this hot path
    (user, seq, _config, segment, t_last, steps, b1p, b2p, bucket, w, m, v, recent, pos,
     hyg, arm, stability) = state
    at = 8 * pos
    state = UserState(user, seq + 1, config.version, event.segment or segment, t_last, steps,
                      b1p, b2p, bucket, w, m, v,
                      recent[:at] + id_hash(event.id) + recent[at + 8:],
                      (pos + 1) % RECENT_IDS, hyg, event.arm or arm, stability)
    if event.kind not in INTERACTION_KINDS:  # control events and exposures move no weight
        if trace is not None:
            trace.append(Step(event.id, event.kind, event.t,
                              "exposure" if event.kind == EXPOSURE else "control"))
        if event.kind == "clear_bot" and state.hyg is not None:
            h = state.hyg.copy()
            h.clear_bot()
            return _with_hygiene(state, h)
        return state
    seg = config.segment(state.segment)
    if not seg.hygiene:  # raw: every event learns at once, at its own time
        y, importance = engagement(event, seg)
        return _learn(state, event.id, event.kind, event.x, y, importance, event.t, config,
                      trace, offset=_base(event, seg), item=event.item)

    h = (state.hyg or hygiene.EMPTY).copy()  # this call's own: mutated below, nowhere else
    tc = h.align(event, seg)
    if tc < h.frontier and event.backfill:
        return _history(state, h, tc, event, config, trace)
    if tc < h.frontier:  # later than the lateness window
        h.late += 1
        if seg.late_policy == "drop":
            if trace is not None:
                trace.append(Step(event.id, event.kind, tc, "late_dropped"))
            return _with_hygiene(state, h)
        if trace is not None:
            trace.append(Step(event.id, event.kind, tc, "late"))
        tc = h.frontier
    elif trace is not None:
        trace.append(Step(event.id, event.kind, tc, "pending"))
    h.buffer(tc, state.seq, event)
    watermark = h.t_max - seg.lateness
    return _release(state, h, config, watermark, watermark, trace)


def _history(state: UserState, h: hygiene.Hygiene, tc: float, event: Event,
             config: TuningConfig, trace: list[Step] | None) -> UserState:
    """A backfill event older than what the user has already learned (its frontier).

    A backfill at or after the frontier (a newcomer's history, or history newer than anything
    learned) goes through the reorder buffer like any event and learns in event-time order,
    with its sessions and recent windows. This one cannot: the state is a fold of the log and
    the events after it are learned already. It is not *late* either: lateness is about live
    delivery, while the publisher vouches for this time, so it is neither counted late nor
    dropped by `late_policy`, nor moved to the frontier. It learns at once at its own time
    (an older event: no decay, the user's clock stays), in the order the history is sent, so
    publish history oldest first. It joins no session and no recent window: both describe
    the present. Its impressions wait as any do: an engagement with the item later in the
    same history cancels them; the user's next release makes the rest negatives at their
    deadlines (this call releases nothing, so a burst of history can cancel its own).
    Caveat: behind the frontier the movement budget does not drain (the clock stands), so
    such history moves the weights by at most what is left of the window's budget.
    """
    state = _released(state, h, tc, event, config, trace, history=True)
    return _with_hygiene(state, h)


def _restore(state: UserState, event: Event, config: TuningConfig,
             trace: list[Step] | None) -> UserState:
    """`restore` (the first event of an imported user): the exported state, as it was.
    `rollback`: the state at `to_seq`, carried by the event, as this user's next state; only
    the seq, the config version and the dedupe ring go on (ids seen since stay seen)."""
    target = decode_state(event.restored)
    if trace is not None:
        trace.append(Step(event.id, event.kind, event.t, event.kind))
    if event.kind == "restore":
        return target
    at = 8 * state.recent_pos
    # the experiment assignment stays: a rollback restores what was learned, and the user is
    # in the same arm whatever its weights
    return UserState(state.user, state.seq + 1, config.version, target.segment, target.t_last,
                     target.steps, target.b1p, target.b2p, target.bucket, target.w, target.m,
                     target.v, state.recent[:at] + id_hash(event.id) + state.recent[at + 8:],
                     (state.recent_pos + 1) % RECENT_IDS, target.hyg, state.arm,
                     target.stability)


def settle(state: UserState, config: TuningConfig,
           trace: list[Step] | None = None) -> UserState:
    """The state with every buffered event released (impressions still wait for their
    deadline): what a query answers with. Not a logged transition; nothing stores it."""
    if state.hyg is None or not state.hyg.pending:
        return state
    h = state.hyg.copy()
    return _release(state, h, config, math.inf,
                    h.t_max - config.segment(state.segment).lateness, trace)


def settle_after(settled: UserState, state: UserState, event: Event, new: UserState,
                 config: TuningConfig) -> UserState:
    """`settle(new, config)`, where `new = apply(state, event, config)` and `settled =
    settle(state, config)`: what a query sees after one more event, computed from what it saw
    before. The buffered events were learned when `settled` was made; an interaction that
    arrives in order (after everything buffered, not late, no impression waiting) learns on
    top of it, one step instead of the whole reorder buffer again. Any other event settles
    from scratch. Bit-identical either way (tests/test_settle.py)."""
    h, before = new.hyg, state.hyg
    if (before is not None and h is not None and settled.hyg is not None
            and event.kind in INTERACTION_KINDS and event.kind != "impression"
            and not event.backfill and settled.seq == state.seq
            and new.segment == state.segment and config.segment(new.segment).hygiene
            and not settled.hyg.impressions and h.late == before.late
            and h.pending and h.pending[-1][2] is event):
        one = _settle_one(settled, event, new, config)
        return settle(apply(settled, event, config), config) if one is None else one
    return settle(new, config)


def _settle_one(settled: UserState, event: Event, new: UserState,
                config: TuningConfig) -> UserState | None:
    """`settle(apply(settled, event, config), config)` for `settle_after`'s in-order
    interaction, without the buffer's round trip: with nothing pending or waiting in
    `settled`, the event is buffered and released at once, alone. The seq, config, segment,
    dedupe ring and arm are `new`'s (`settled` has the state's, which `settle` never changes).
    None if the event is late for `settled` (behind its frontier): the general path."""
    if settled.hyg.pending:  # (settle leaves events only behind waiting impressions)
        return None
    h = settled.hyg.copy()
    tc = h.align(event, config.segment(new.segment))
    if tc < h.frontier:
        return None
    if tc > h.t_max:
        h.t_max = tc
    # built with `h` itself: _released mutates it and every state it returns carries it
    state = UserState(new.user, new.seq, new.config, new.segment, settled.t_last,
                      settled.steps, settled.b1p, settled.b2p, settled.bucket, settled.w,
                      settled.m, settled.v, new.recent, new.recent_pos, h, new.arm,
                      settled.stability)
    return _released(state, h, tc, event, config, None)


def _release(state: UserState, h: hygiene.Hygiene, config: TuningConfig, events_until: float,
             due_until: float, trace: list[Step] | None) -> UserState:
    """Release buffered events and due impressions in event-time order (events first);
    `h` is the caller's own copy, which ends up in the returned state."""
    while True:
        forced = len(h.pending) > hygiene.MAX_PENDING  # a clock that never advances
        if h.pending and (h.pending[0][0] <= events_until or forced) and (
                forced or not h.impressions or h.pending[0][0] <= h.impressions[0][0]):
            tc, _seq, event = h.pending[0]
            h.pending = h.pending[1:]
            state = _released(state, h, tc, event, config, trace)
        elif h.impressions and h.impressions[0][0] <= due_until:
            due, item, x, event_id, base = h.impressions[0]
            h.impressions = h.impressions[1:]
            state = _impression_negative(state, event_id, x, base, due, config, trace, item)
        else:
            return _with_hygiene(state, h)


def _impression_negative(state: UserState, event_id: str, x: np.ndarray, base: float,
                         t: float, config: TuningConfig, trace: list[Step] | None,
                         item: str | None = None) -> UserState:
    seg = config.segment(state.segment)
    return _learn(state, event_id, "impression", x, 0.0, seg.impression_importance, t, config,
                  trace, "impression_negative", offset=base if seg.segment_model else 0.0,
                  item=item)


def _released(state: UserState, h: hygiene.Hygiene, tc: float, event: Event,
              config: TuningConfig, trace: list[Step] | None,
              history: bool = False) -> UserState:
    """One event leaves the buffer: sessions, windows, bots, impressions, outliers, learning.
    Mutates `h` (the caller's own copy); returns the state, learned or not. `history`: a
    backfill behind the frontier (`_history`), which skips sessions and windows."""
    seg = config.segment(state.segment)
    if not history:
        h.observe_session(tc, event, seg)
        h.count_window(tc, event.kind, seg)
    if not h.bot:
        h.check_bot(tc, event, seg)
    if tc > h.frontier:
        h.frontier = tc
    if h.bot:  # logged, counted, never learned from
        h.ignored += 1
        h.impressions = ()
        if trace is not None:
            trace.append(Step(event.id, event.kind, tc, "bot"))
        return state
    if event.kind == "impression":
        h.add_impression(tc, event, seg)
        if trace is not None:
            trace.append(Step(event.id, event.kind, tc, "impression_pending"))
        if len(h.impressions) > hygiene.MAX_IMPRESSIONS:  # bounded: the oldest is due now
            _due, item, x, event_id, base = h.impressions[0]
            h.impressions = h.impressions[1:]
            state = _impression_negative(state, event_id, x, base, tc, config, trace, item)
        return state
    engaged = h.cancel_impression(event.item)
    if engaged is not None and trace is not None:
        trace.append(Step(engaged, "impression", tc, "impression_engaged"))
    sig = hygiene.signal(event, seg, h.recent_actions())
    if sig.verdict != "clean":
        h.outliers += 1
    if sig.verdict == "outlier_dropped":
        if trace is not None:
            trace.append(Step(event.id, event.kind, tc, sig.verdict, observed=sig.observed))
        return state
    verdict = "applied" if sig.verdict == "clean" else sig.verdict
    return _learn(state, event.id, event.kind, event.x, sig.y, sig.importance, tc, config,
                  trace, verdict, sig.observed, _base(event, seg), event.item)


def _base(event: Event, seg: SegmentConfig) -> float:
    """The segment model's score stamped on the event, when the segment uses one (a
    counterfactual config without it replays the user's model alone)."""
    return event.base if seg.segment_model and event.base is not None else 0.0


def _learn(state: UserState, event_id: str, kind: str, x_item: np.ndarray, y: float,
           importance: float, t: float, config: TuningConfig, trace: list[Step] | None,
           verdict: str = "applied", observed: tuple = (), offset: float = 0.0,
           item: str | None = None) -> UserState:
    """One learning update (the module docstring's formulas) at event time t: one call of the
    compiled kernel (actors/kernel.py), which allocates the new arrays and writes no input.
    The constants are the segment's own floats (`config.constants` holds the same values as
    0-d arrays, for numpy)."""
    segment = state.segment
    seg = config.segment(segment)
    if not seg.personal:
        return _frozen(state, event_id, kind, x_item, y, importance, t, config, trace, verdict,
                       observed, offset, item)
    t_last = state.t_last
    dt = t - t_last  # the decay, for the kernel to apply when dt > 0 (and not a first event)
    f = math.pow(0.5, dt / seg.half_life) if dt > 0.0 else 1.0
    max_step, budget = seg.max_step, seg.window_budget
    lr, lr_max = seg.lr, seg.lr_max
    if seg.warmup:  # a newcomer's first events count for more (module docstring, "rate")
        k = 1.0 + seg.warmup / (1.0 + state.steps / seg.warmup_events)
        lr, lr_max = lr * k, lr_max * k
    adaptive = seg.adaptive_bounds
    if adaptive:
        scale = bound_scale(state.stability)
        max_step, budget = max_step * scale, budget * scale
    # a w of another length than the prior's (empty) is the first learning event
    w, m, v, step, p, score, rate, b1p, b2p, bucket = learn(
        state.w, state.m, state.v, config.prior(segment), x_item, t, t_last, f, y,
        importance, offset, state.bucket, state.b1p, state.b2p,
        OPTIMIZER_CODES.get(seg.optimizer, ADAGRAD), seg.beta1, seg.beta2, seg.l2, seg.eps,
        lr, seg.lr_min, lr_max, max_step, budget, seg.window)
    stability = steadiness(state.stability, step) if adaptive else state.stability
    if trace is not None:
        trace.append(Step(event_id, kind, t, verdict, y, importance, p, rate, step, observed,
                          x_item, score, item))
    return UserState(state.user, state.seq, state.config, segment, max(t_last, t),
                     state.steps + 1, b1p, b2p, bucket, w, m, v, state.recent,
                     state.recent_pos, state.hyg, state.arm, stability)


# Adaptive bounds (`SegmentConfig.adaptive_bounds`): a user's step bound and window budget
# scale with how steady its updates have been. Running means, over about STABILITY_EVENTS
# updates (exponential weights alpha = 2 / (STABILITY_EVENTS + 1)), of the step vector
# (mean_step) and of its norm (mean_norm) give the consistency c = |mean_step| / mean_norm in
# [0, 1]: 1 when every update pushed the same way, near 0 when they cancel out. After
# STABILITY_MIN updates both bounds are multiplied by BOUND_FLOOR + (1 - BOUND_FLOOR) c.
# Steady users (signals that keep confirming each other) keep the full bounds; erratic ones
# (conflicting signals, a noisy or shifting user) move less per event.
STABILITY_EVENTS = 50
STABILITY_MIN = 10
BOUND_FLOOR = 0.25


def bound_scale(stability: tuple[np.ndarray, float, int] | None) -> float:
    if stability is None or stability[2] < STABILITY_MIN or stability[1] <= 0.0:
        return 1.0
    mean_step, mean_norm, _n = stability
    consistency = min(1.0, math.sqrt(float(mean_step @ mean_step)) / mean_norm)
    return BOUND_FLOOR + (1.0 - BOUND_FLOOR) * consistency


def steadiness(stability: tuple[np.ndarray, float, int] | None,
               step: np.ndarray) -> tuple[np.ndarray, float, int]:
    norm = math.sqrt(float(step @ step))
    alpha = 2.0 / (STABILITY_EVENTS + 1)
    if stability is None or stability[0].shape != step.shape:  # both means start at 0, so
        return (alpha * step, alpha * norm, 1)  # their ratio is not biased by the start
    mean_step, mean_norm, n = stability
    return (mean_step + alpha * (step - mean_step), mean_norm + alpha * (norm - mean_norm),
            n + 1)


def _frozen(state: UserState, event_id: str, kind: str, x_item: np.ndarray, y: float,
            importance: float, t: float, config: TuningConfig, trace: list[Step] | None,
            verdict: str, observed: tuple, offset: float, item: str | None) -> UserState:
    """A learning event under a segment without micro-adjustment (`personal = false`): the
    user's weights, moments and clock stay as they are (so when adjustment resumes, the decay
    covers the whole pause). The step is still traced with the prior's score, so that the
    segment model learns from this user as it ranks it: by the prior."""
    if trace is not None:
        w0 = config.prior(state.segment)
        score = float(w0[0] + w0[1:] @ x_item)
        trace.append(Step(event_id, kind, t, verdict, y, importance,
                          sigmoid(offset + score), 0.0, np.zeros_like(w0), observed, x_item,
                          score, item))
    return state


def learn_segment(state: UserState, step: Step, config: TuningConfig) -> UserState:
    """The segment model's side of one of a user's learning steps (actors/segment_model.py):
    the same update as the user's, on p = sigmoid(w_s . x + the user's own score), under the
    segment model's own config (`segment_model.model_config`)."""
    return _learn(state, step.event_id, step.kind, step.x, step.y, step.importance, step.t,
                  config, None, offset=step.score)


def _with_hygiene(state: UserState, h: hygiene.Hygiene) -> UserState:
    return UserState(*state[:14], h, state.arm, state.stability)


def own_weights(state: UserState, config: TuningConfig) -> np.ndarray:
    """The user's own part of every score: its weights, or the prior before it has learned
    anything or where the segment makes no micro-adjustment (`personal = false`)."""
    if state.w.shape[0] and config.segment(state.segment).personal:
        return state.w
    return config.prior(state.segment)


def predict(state: UserState, x: np.ndarray, config: TuningConfig, base: float = 0.0) -> float:
    """The predicted engagement probability of an item for this user (no update; buffered
    events count, as `settle` releases them). `base`: the segment model's score of the item."""
    state = settle(state, config)
    w = own_weights(state, config)
    return sigmoid(base + biased_dot(w, x))
