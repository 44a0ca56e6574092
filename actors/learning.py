"""The pure state transition: `apply(state, event, config) -> state`.

This is the only code that moves a weight. Live traffic, activation and replay all call it, so
replaying the log rebuilds the bit-identical state. It reads nothing but its arguments: no
wall clock (time comes from the events), no randomness, no global mutable state. Arrays in the
input state are never mutated; every update builds new ones.

The update (DESIGN.md section 4), for an event at event time t, item features x (the bias 1.0
is prepended here), engagement target y in [0, 1] and importance a:

  decay     f = 0.5 ** (dt / half_life),  dt = t - t_last (no decay for an older event)
            w = w0 + f (w - w0);  m *= f;  v *= f        old preferences fade toward the prior
  predict   p = sigmoid(w . x)
  gradient  g = a (p - y) x + l2 (w - w0)                 log-loss gradient, L2 toward the prior
  moments   adam:    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
                     direction = m / (1 - b1^n);  v_hat = v / (1 - b2^n)
            rmsprop: v = b2 v + (1 - b2) g^2;  direction = g;  v_hat = v / (1 - b2^n)
            adagrad: v = v + g^2;  direction = g;  v_hat = v
  rate      r = clip(lr / (sqrt(v_hat) + eps), lr_min, lr_max)   per coordinate (AdaBound)
  step      s = r * direction
  bounds    |s|_2 <= max_step;  then a leaky bucket that drains window_budget per window
            seconds caps the movement: |s|_2 <= window_budget - level (level += |s|_2)
  update    w = w - s
"""

from __future__ import annotations

import math

import numpy as np

from actors.state import RECENT_IDS, UserState, id_hash
from events.config import SegmentConfig, TuningConfig
from events.types import INTERACTION_KINDS, Event

_ONE = np.ones(1)


def engagement(event: Event, seg: SegmentConfig) -> tuple[float, float]:
    """The engagement target y in [0, 1] and the importance of one interaction.

    click -> (1, 1); impression (seen, not clicked) -> (0, impression_importance);
    dwell d -> (1 - exp(-d / dwell_scale), 1); scroll depth s -> (s, 1);
    hover h -> (0.5 min(1, h / hover_scale), 0.5); feedback y -> (y, 1).
    """
    kind = event.kind
    if kind == "click":
        return 1.0, 1.0
    if kind == "impression":
        return 0.0, seg.impression_importance
    if kind == "dwell":
        return 1.0 - math.exp(-event.dwell / seg.dwell_scale), 1.0
    if kind == "scroll":
        return event.depth, 1.0
    if kind == "hover":
        return 0.5 * min(1.0, event.hover / seg.hover_scale), 0.5
    if kind == "feedback":
        return event.target, 1.0
    raise ValueError(f"{kind!r} is not an interaction kind")


def sigmoid(z: float) -> float:
    """Numerically stable logistic function."""
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def apply(state: UserState, event: Event, config: TuningConfig) -> UserState:
    """The state after `event`, which must be the user's next logged event (seq + 1).

    Arrays of the input state are never written; in-place operations below act only on
    arrays this call has just created.
    """
    at = 8 * state.recent_pos
    recent = state.recent[:at] + id_hash(event.id) + state.recent[at + 8:]
    recent_pos = (state.recent_pos + 1) % RECENT_IDS
    segment = event.segment or state.segment
    if event.kind not in INTERACTION_KINDS:  # control events: a segment change moves no weight
        return state._replace(seq=state.seq + 1, config=config.version, segment=segment,
                              recent=recent, recent_pos=recent_pos)

    seg = config.segment(segment)
    c = config.constants(segment)
    w0 = config.prior(segment)
    t = event.t
    if state.w.shape[0] != w0.shape[0]:  # first learning event: start at the prior
        dev = np.zeros_like(w0)  # w - w0
        m = v = dev
        f = 1.0
        dt = 0.0
    else:
        dev = state.w - w0
        m, v = state.m, state.v
        dt = t - state.t_last
        if dt > 0.0:  # decay toward the prior by event time: w = w0 + f (w - w0)
            f = math.pow(0.5, dt / seg.half_life)
            dev *= f
        else:  # an older event than the newest one seen: no decay, no clock change
            dt, f = 0.0, 1.0
    w = w0 + dev

    x = np.concatenate((_ONE, event.x))
    y, importance = engagement(event, seg)
    p = sigmoid(float((w * x).sum()))  # not np.dot: BLAS releases the GIL (a convoy)
    g = x * (importance * (p - y))  # log-loss gradient ...
    if seg.l2:
        g += c.l2 * dev  # ... plus L2 toward the prior

    b1p, b2p = state.b1p, state.b2p
    if seg.optimizer == "adam":
        b1p *= seg.beta1
        b2p *= seg.beta2
        m = m * (c.beta1 if f == 1.0 else seg.beta1 * f)  # m = b1 (f m) + (1 - b1) g
        m += c.one_minus_beta1 * g
        v = v * (c.beta2 if f == 1.0 else seg.beta2 * f)  # v = b2 (f v) + (1 - b2) g^2
        v += c.one_minus_beta2 * (g * g)
        direction = m * (1.0 / (1.0 - b1p))  # bias-corrected m_hat
        denom = np.sqrt(v * (1.0 / (1.0 - b2p)))  # sqrt(v_hat)
    elif seg.optimizer == "rmsprop":
        b2p *= seg.beta2
        m = m * f
        v = v * (c.beta2 if f == 1.0 else seg.beta2 * f)
        v += c.one_minus_beta2 * (g * g)
        direction = g
        denom = np.sqrt(v * (1.0 / (1.0 - b2p)))
    else:  # adagrad: v is the (decayed) running sum of squares
        m = m * f
        v = v * f
        v += g * g
        direction = g
        denom = np.sqrt(v)
    denom += c.eps
    rate = np.divide(c.lr, denom, out=denom)  # per-coordinate rate lr / (sqrt(v_hat) + eps)
    np.maximum(rate, c.lr_min, out=rate)  # AdaBound-style bounds
    np.minimum(rate, c.lr_max, out=rate)
    step = rate * direction

    # per-event step bound, then the moving-window movement budget (leaky bucket)
    norm = math.sqrt(float((step * step).sum()))
    if norm > seg.max_step:
        step *= seg.max_step / norm
        norm = seg.max_step
    level = max(0.0, state.bucket - dt * (seg.window_budget / seg.window))
    room = seg.window_budget - level
    if norm > room:
        step *= max(room, 0.0) / norm
        norm = max(room, 0.0)
    w -= step

    return UserState(state.user, state.seq + 1, config.version, segment,
                     max(state.t_last, t), state.steps + 1, b1p, b2p, level + norm,
                     w, m, v, recent, recent_pos)


def predict(state: UserState, x: np.ndarray, config: TuningConfig) -> float:
    """The predicted engagement probability of an item for this user (no update)."""
    w = state.w if state.w.shape[0] else config.prior(state.segment)
    return sigmoid(float((w * np.concatenate((_ONE, x))).sum()))
