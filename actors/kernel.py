"""The numeric core of one learning update (`actors.learning._learn`), as one compiled kernel.

`learn` is the module docstring of `actors.learning` in one pass over the weights: decay,
prediction, gradient, moments, per-coordinate rate, step bounds and the leaky bucket. Python
issued some twenty small numpy operations per event for it; this is one call. Pure numeric
code: arrays and floats in, new arrays and floats out; inputs are never written.

Determinism is what replay rests on, so the kernel is compiled without fastmath (no
reassociation, no fused multiply-add, no approximate functions) and without parallelism: each
float operation is the IEEE one the numpy version did, in the same order, and its sums are
numpy's pairwise summation (`_sum`), so the results are the numpy version's, bit for bit. The
one exception is kept out: LLVM rewrites pow(0.5, x) as exp2(-x), which can round the other
way, so the caller computes the decay factor with math.pow.

The machine code is cached next to this file (__pycache__, `cache=True`) and recompiled for
another CPU or numba; the explicit signature loads (or compiles) it at import, not at the
first event. Nothing here may recurse: numba's cache crashes on recursive functions (numba
issue #6061).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types

ADAM, RMSPROP, ADAGRAD = 0, 1, 2
OPTIMIZER_CODES = {"adam": ADAM, "rmsprop": RMSPROP, "adagrad": ADAGRAD}

_PW_BLOCKSIZE = 128  # numpy's pairwise summation block (numpy/_core/src/umath/loops_utils.h)

# any float64 vector: read-only (priors, decoded events and snapshots are) or not, any layout
_VEC = types.Array(types.float64, 1, "A", readonly=True, aligned=False)
_F = types.float64
_OUT = types.Array(types.float64, 1, "C")
_SIGNATURE = types.Tuple((_OUT, _OUT, _OUT, _OUT) + (_F,) * 6)(  # see `learn`
    _VEC, _VEC, _VEC, _VEC, _VEC,  # w, m, v, w0, x_item
    *(_F,) * 9,  # t, t_last, decay, y, importance, offset, bucket, b1p, b2p
    types.int64,  # the optimizer's code
    *(_F,) * 10,  # the segment's beta1, beta2, l2, eps, lr, lr_min, lr_max, max_step,
)  # window_budget, window


@njit(cache=True)
def _block(a, lo, n):  # pragma: no cover - compiled
    """numpy's pairwise_sum of a[lo:lo + n] for n <= _PW_BLOCKSIZE: eight running sums."""
    if n < 8:
        res = 0.0
        for i in range(lo, lo + n):
            res += a[i]
        return res
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    i = 8
    end = n - n % 8
    while i < end:
        r0 += a[lo + i]
        r1 += a[lo + i + 1]
        r2 += a[lo + i + 2]
        r3 += a[lo + i + 3]
        r4 += a[lo + i + 4]
        r5 += a[lo + i + 5]
        r6 += a[lo + i + 6]
        r7 += a[lo + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


@njit(cache=True)
def _pairwise(a):  # pragma: no cover - compiled
    """The sum of `a` in numpy's order (`np.add.reduce` on a contiguous float64 array):
    blocks of at most _PW_BLOCKSIZE, halved (at a multiple of 8) and added as a binary tree.
    numpy recurses; this walks the tree with its own stack (see the module docstring)."""
    n = a.shape[0]
    if n <= _PW_BLOCKSIZE:
        return _block(a, 0, n)
    los = np.empty(64, np.int64)  # the path from the root: each node's start, length,
    ns = np.empty(64, np.int64)  # whether its left half is summed, and that sum
    right = np.zeros(64, np.bool_)
    left = np.empty(64)
    los[0], ns[0], depth = 0, n, 0
    while True:
        while ns[depth] > _PW_BLOCKSIZE:  # down the left halves
            half = ns[depth] // 2
            half -= half % 8
            right[depth] = False
            los[depth + 1], ns[depth + 1] = los[depth], half
            depth += 1
        value = _block(a, los[depth], ns[depth])
        while True:  # up, until a node whose right half is still to sum
            depth -= 1
            if depth < 0:
                return value
            if not right[depth]:
                left[depth] = value
                right[depth] = True
                half = ns[depth] // 2
                half -= half % 8
                los[depth + 1], ns[depth + 1] = los[depth] + half, ns[depth] - half
                depth += 1
                break
            value = left[depth] + value


@njit(cache=True)
def _sum(a):  # pragma: no cover - compiled
    # np.add.reduce starts from the identity: 0.0 + the pairwise sum
    return 0.0 + _pairwise(a)


@njit(_F(_VEC, _VEC), cache=True)
def biased_dot(w, x):  # pragma: no cover - compiled
    """w . (1, x): a score with its bias, bit for bit as numpy's
    `(w * np.concatenate(([1.0], x))).sum()` (the same products, numpy's pairwise order), in
    one call instead of three array operations. ValueError for mismatched lengths."""
    n = w.shape[0]
    if x.shape[0] + 1 != n:
        raise ValueError("item features do not match the weights' dimension")
    prod = np.empty(n)
    prod[0] = w[0] * 1.0
    for i in range(1, n):
        prod[i] = w[i] * x[i - 1]
    return _sum(prod)


@njit(_SIGNATURE, cache=True)
def learn(w_in, m_in, v_in, w0, x_item, t, t_last, decay, y, importance, offset, bucket, b1p,
          b2p, optimizer, beta1, beta2, l2, eps, lr, lr_min, lr_max, max_step, window_budget,
          window):  # pragma: no cover - compiled
    """One update; returns (w, m, v, step, p, score, mean rate, b1p, b2p, bucket level).

    An empty `w_in` (any length other than w0's) is the first learning event: it starts at
    the prior with zero moments and no decay. `decay`: the factor f = 0.5 ** (dt / half_life)
    for dt = t - t_last, used when dt > 0 (the caller computes it with math.pow: compiled, LLVM
    turns pow(0.5, x) into exp2(-x), which rounds differently in the last bit now and then).
    `optimizer`: an `OPTIMIZER_CODES` value. The constants are the segment's
    (`SegmentConfig`): beta1 .. window. l2 == 0 skips the pull toward the prior. Raises
    ValueError for mismatched lengths, ZeroDivisionError where the numpy version's Python
    float divisions did.
    """
    n = w0.shape[0]
    if x_item.shape[0] + 1 != n:
        raise ValueError("item features do not match the weights' dimension")
    first = w_in.shape[0] != n
    if not first and (m_in.shape[0] != n or v_in.shape[0] != n):
        raise ValueError("moments do not match the weights' dimension")

    dev = np.empty(n)  # w - w0, decayed
    m = np.empty(n)
    v = np.empty(n)
    if first:  # start at the prior
        f = 1.0
        dt = 0.0
        for i in range(n):
            dev[i] = 0.0
            m[i] = 0.0
            v[i] = 0.0
    else:
        dt = t - t_last
        if dt > 0.0:  # decay toward the prior by event time: w = w0 + f (w - w0)
            f = decay
            for i in range(n):
                dev[i] = (w_in[i] - w0[i]) * f
        else:  # an older event than the newest one seen: no decay, no clock change
            dt = 0.0
            f = 1.0
            for i in range(n):
                dev[i] = w_in[i] - w0[i]
        for i in range(n):
            m[i] = m_in[i]
            v[i] = v_in[i]

    w = np.empty(n)
    x = np.empty(n)
    x[0] = 1.0  # the bias
    for i in range(1, n):
        x[i] = x_item[i - 1]
    prod = np.empty(n)
    for i in range(n):
        w[i] = w0[i] + dev[i]
        prod[i] = w[i] * x[i]
    score = _sum(prod)
    z = offset + score
    if z >= 0:  # sigmoid, as actors.hygiene.sigmoid
        p = 1.0 / (1.0 + math.exp(-z))
    else:
        e = math.exp(z)
        p = e / (1.0 + e)

    gs = importance * (p - y)  # log-loss gradient ...
    g = np.empty(n)
    for i in range(n):
        g[i] = x[i] * gs
    if l2:
        for i in range(n):
            g[i] += l2 * dev[i]  # ... plus L2 toward the prior

    # moments, and the step direction and sqrt(v_hat) per coordinate (in `direction`, `rate`)
    direction = np.empty(n)
    rate = np.empty(n)
    if optimizer == ADAM:
        b1p *= beta1
        b2p *= beta2
        b1 = beta1 if f == 1.0 else beta1 * f  # m = b1 (f m) + (1 - b1) g
        b2 = beta2 if f == 1.0 else beta2 * f  # v = b2 (f v) + (1 - b2) g^2
        omb1 = 1.0 - beta1
        omb2 = 1.0 - beta2
        c1 = 1.0 / (1.0 - b1p)  # bias corrections
        c2 = 1.0 / (1.0 - b2p)
        for i in range(n):
            m[i] = m[i] * b1 + omb1 * g[i]
            v[i] = v[i] * b2 + omb2 * (g[i] * g[i])
            direction[i] = m[i] * c1
            rate[i] = math.sqrt(v[i] * c2)
    elif optimizer == RMSPROP:
        b2p *= beta2
        b2 = beta2 if f == 1.0 else beta2 * f
        omb2 = 1.0 - beta2
        c2 = 1.0 / (1.0 - b2p)
        for i in range(n):
            m[i] = m[i] * f
            v[i] = v[i] * b2 + omb2 * (g[i] * g[i])
            direction[i] = g[i]
            rate[i] = math.sqrt(v[i] * c2)
    else:  # adagrad: v is the (decayed) running sum of squares
        for i in range(n):
            m[i] = m[i] * f
            v[i] = v[i] * f + g[i] * g[i]
            direction[i] = g[i]
            rate[i] = math.sqrt(v[i])

    step = np.empty(n)
    for i in range(n):
        r = lr / (rate[i] + eps)  # per-coordinate rate lr / (sqrt(v_hat) + eps)
        if r < lr_min:  # AdaBound-style bounds (a NaN stays NaN, as with np.maximum)
            r = lr_min
        if r > lr_max:
            r = lr_max
        rate[i] = r
        step[i] = r * direction[i]
        prod[i] = step[i] * step[i]

    # per-event step bound, then the moving-window movement budget (leaky bucket)
    norm = math.sqrt(_sum(prod))
    if norm > max_step:
        s = max_step / norm
        for i in range(n):
            step[i] *= s
        norm = max_step
    level = bucket - dt * (window_budget / window)
    if not level > 0.0:  # Python's max(0.0, level)
        level = 0.0
    room = window_budget - level
    if norm > room:
        if room < 0.0:  # Python's max(room, 0.0)
            room = 0.0
        s = room / norm
        for i in range(n):
            step[i] *= s
        norm = room
    for i in range(n):
        w[i] -= step[i]
    return w, m, v, step, p, score, _sum(rate) / n, b1p, b2p, level + norm
