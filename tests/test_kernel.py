"""The compiled learning kernel (actors/kernel.py) against the numpy update it replaced.

`_reference_learn` is a frozen copy of `actors.learning._learn` as it was in numpy (twenty
small array operations per event); the kernel must agree with it on every branch of the rule,
be deterministic and never write its inputs.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from actors import kernel
from actors.hygiene import sigmoid
from actors.learning import Step, _learn
from actors.state import UserState, decode_state, encode_state
from events import SegmentConfig, TuningConfig

D = 16
_ONE = np.ones(1)
_SUM = np.add.reduce


def _reference_learn(state: UserState, event_id: str, kind: str, x_item: np.ndarray, y: float,
                     importance: float, t: float, config: TuningConfig,
                     trace: list[Step] | None, verdict: str = "applied", observed: tuple = (),
                     offset: float = 0.0) -> UserState:
    """actors.learning._learn before the kernel (numpy), verbatim (and the warm-up since)."""
    segment = state.segment
    seg = config.segment(segment)
    c = config.constants(segment)
    w0 = config.prior(segment)
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

    x = np.concatenate((_ONE, x_item))
    score = float(_SUM(w * x))  # not np.dot: BLAS releases the GIL (a convoy)
    p = sigmoid(offset + score)
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
    lr, lr_max = c.lr, c.lr_max
    if seg.warmup:  # a new user's rates, k times higher (learning.py, "rate")
        k = 1.0 + seg.warmup / (1.0 + state.steps / seg.warmup_events)
        lr, lr_max = np.array(seg.lr * k), np.array(seg.lr_max * k)
    rate = np.divide(lr, denom, out=denom)  # per-coordinate rate lr / (sqrt(v_hat) + eps)
    np.maximum(rate, c.lr_min, out=rate)  # AdaBound-style bounds
    np.minimum(rate, lr_max, out=rate)
    step = rate * direction

    # per-event step bound, then the moving-window movement budget (leaky bucket)
    norm = math.sqrt(float(_SUM(step * step)))
    if norm > seg.max_step:
        step *= seg.max_step / norm
        norm = seg.max_step
    level = max(0.0, state.bucket - dt * (seg.window_budget / seg.window))
    room = seg.window_budget - level
    if norm > room:
        step *= max(room, 0.0) / norm
        norm = max(room, 0.0)
    w -= step

    if trace is not None:
        trace.append(Step(event_id, kind, t, verdict, y, importance, p,
                          float(_SUM(rate)) / rate.shape[0], step, observed, x_item, score))
    return UserState(state.user, state.seq, state.config, segment, max(state.t_last, t),
                     state.steps + 1, b1p, b2p, level + norm, w, m, v, state.recent,
                     state.recent_pos, state.hyg)


def _close(a, b) -> bool:
    return bool(np.allclose(a, b, rtol=1e-10, atol=1e-12))


def _frozen(state: UserState) -> list[bytes]:
    return [a.tobytes() for a in (state.w, state.m, state.v)]


def _configs():
    """Every optimizer, with and without L2, with bounds that bind (tight rate bounds, a
    small step bound, a small window budget) and bounds that never do."""
    loose = {"lr_min": 1e-6, "lr_max": 10.0, "max_step": 1e6, "window_budget": 1e6}
    tight = {"lr_min": 0.04, "lr_max": 0.06, "max_step": 0.05, "window_budget": 0.3,
             "window": 600.0}
    for k, (optimizer, l2, bounds) in enumerate(itertools.product(
            ("adam", "rmsprop", "adagrad"), (0.0, 0.03), (loose, tight, {}))):
        rng = np.random.default_rng(k)
        prior = None if k % 2 else list(rng.normal(size=D + 1) * 0.3)
        seg = SegmentConfig(optimizer=optimizer, l2=l2, half_life=3600.0, hygiene=False,
                            prior=prior, **bounds)
        yield TuningConfig(version=1, dim=D, segments={"default": seg})


def test_kernel_agrees_with_the_numpy_update():
    """Random event streams through the new `_learn` and, from the same state each time, the
    numpy reference: decay on (later events) and off (equal or older times), first events,
    every optimizer, L2 or not, bounds hit or not."""
    hits = {"max_step": 0, "bucket": 0, "lr_min": 0, "lr_max": 0, "older": 0, "decay": 0}
    for k, config in enumerate(_configs()):
        seg = config.segment("default")
        rng = np.random.default_rng(100 + k)
        for user in range(4):
            state = UserState(f"u{user}")
            t = 1.0e9
            for n in range(150):
                dt = rng.choice([0.0, -30.0, rng.exponential(300.0), rng.exponential(20000.0)])
                t += dt
                hits["older"] += n > 0 and dt <= 0
                hits["decay"] += n > 0 and dt > 0
                x = rng.normal(size=D) * rng.choice([0.1, 1.0, 5.0])
                if n % 7 == 3:
                    x = rng.normal(size=2 * D)[::2]  # a strided view
                y = float(rng.choice([0.0, 1.0, rng.random()]))
                importance = float(rng.choice([0.2, 1.0, rng.uniform(0, 3)]))
                offset = float(rng.normal()) if n % 3 else 0.0
                new_trace: list[Step] = []
                old_trace: list[Step] = []
                before = _frozen(state)
                new = _learn(state, f"e{n}", "click", x, y, importance, t, config, new_trace,
                             offset=offset)
                old = _reference_learn(state, f"e{n}", "click", x, y, importance, t, config,
                                       old_trace, offset=offset)
                assert _frozen(state) == before  # inputs untouched
                for a, b in ((new.w, old.w), (new.m, old.m), (new.v, old.v)):
                    assert a.shape == b.shape and a.dtype == b.dtype
                    assert _close(a, b)
                assert _close(new.bucket, old.bucket)
                assert (new.b1p, new.b2p) == (old.b1p, old.b2p)
                assert (new.t_last, new.steps) == (old.t_last, old.steps)
                (ns,), (os_,) = new_trace, old_trace
                assert _close(ns.p, os_.p) and _close(ns.score, os_.score)
                assert _close(ns.rate, os_.rate) and _close(ns.step, os_.step)
                assert ns[:6] == os_[:6] and ns.x is x
                assert isinstance(ns.p, float) and isinstance(ns.rate, float)
                step_norm = float(np.linalg.norm(os_.step))
                hits["max_step"] += math.isclose(step_norm, seg.max_step)
                hits["bucket"] += step_norm < seg.max_step * (1 - 1e-9) and math.isclose(
                    old.bucket, seg.window_budget)
                hits["lr_min"] += math.isclose(os_.rate, seg.lr_min)
                warm = 1.0 + seg.warmup / (1.0 + state.steps / seg.warmup_events)
                hits["lr_max"] += math.isclose(os_.rate, seg.lr_max * warm)
                state = new
    assert all(hits.values()), hits  # every branch was exercised


def test_kernel_is_deterministic_and_writes_no_input():
    config = TuningConfig(version=1, dim=D, segments={"default": SegmentConfig(
        optimizer="adam", max_step=0.05, window_budget=0.2, hygiene=False)})
    seg = config.segment("default")
    rng = np.random.default_rng(7)
    state = UserState("u")
    for n in range(5):  # a state with history: moments, a bucket level
        state = _learn(state, f"e{n}", "click", rng.normal(size=D), 1.0, 1.0, 100.0 * n,
                       config, None)
    w, m, v = state.w.copy(), state.m.copy(), state.v.copy()  # writeable inputs
    x = rng.normal(size=D)
    for inputs in ((w, m, v), decode_state(encode_state(state))[9:12]):  # and read-only ones
        frozen = [a.tobytes() for a in (*inputs, x, config.prior("default"))]
        args = (*inputs, config.prior("default"), x, 1000.0, state.t_last, 0.9, 0.0, 1.0,
                0.3, state.bucket, state.b1p, state.b2p, kernel.ADAM, seg.beta1, seg.beta2,
                seg.l2, seg.eps, seg.lr, seg.lr_min, seg.lr_max, seg.max_step,
                seg.window_budget, seg.window)
        first, second = kernel.learn(*args), kernel.learn(*args)
        assert [a.tobytes() for a in (*inputs, x, config.prior("default"))] == frozen
        for a, b in zip(first, second, strict=True):
            if isinstance(a, np.ndarray):
                assert a.tobytes() == b.tobytes() and a is not b
                assert all(a is not i for i in inputs)
            else:
                assert math.copysign(1.0, a) == math.copysign(1.0, b)
                assert a == b or (math.isnan(a) and math.isnan(b))


def test_kernel_sum_is_numpys():
    """The kernel adds as np.add.reduce does (numpy's pairwise order), at any length."""
    rng = np.random.default_rng(3)
    for n in (*range(40), 127, 128, 129, 300, 1000):
        a = rng.normal(size=n) * 10.0 ** rng.uniform(-8, 8, size=n)
        assert kernel._sum(a) == np.add.reduce(a)


def test_kernel_rejects_a_mismatched_item():
    config = TuningConfig(version=1, dim=D, segments={"default": SegmentConfig(hygiene=False)})
    with pytest.raises(ValueError):
        _learn(UserState("u"), "e", "click", np.ones(D + 1), 1.0, 1.0, 1.0, config, None)


def test_biased_dot_is_numpys_bit_for_bit():
    """Scores (`SegmentModels.score`, `predict`) as the numpy expression they replaced, at
    any length and scale, read-only inputs included; a mismatched item is refused."""
    rng = np.random.default_rng(5)
    for n in (*range(0, 40), 127, 128, 129, 300):
        w = rng.normal(size=n + 1) * 10.0 ** rng.uniform(-6, 6, size=n + 1)
        x = rng.normal(size=n) * 10.0 ** rng.uniform(-6, 6, size=n)
        x.flags.writeable = False
        expected = float((w * np.concatenate((_ONE, x))).sum())
        assert kernel.biased_dot(w, x) == expected
    with pytest.raises(ValueError):
        kernel.biased_dot(np.ones(4), np.ones(4))
