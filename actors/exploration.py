"""Exploration: which slate a logged ranking shows, and the propensity of each shown item.

A segment explores (`SegmentConfig.explore`) so that its log can tell what another config
would have earned (off-policy evaluation): items a greedy ranking never shows get shown now
and then, with a known probability. Policies, for N candidates and a slate of n:

- `none`: greedy, best score first; every propensity is 1.
- `epsilon`: with probability epsilon a uniformly random ordered choice of n of the N
  candidates, else the greedy slate. The probability that item i is shown at position k is
  exactly (1 - epsilon) [greedy slate has i at k] + epsilon / N.
- `thompson`: scores from weights sampled around the user's: w~ = w + s * z, z ~ N(0, I),
  s_j = explore_scale / sqrt(1 + v_j), where v is the optimizer's running sum (or average)
  of squared gradients, the evidence each coordinate has seen (no evidence: the prior's
  spread, `explore_scale`). Items by sampled score. The probability of the shown item at
  position k has no closed form; it is estimated by `explore_samples` further draws from
  the same seeded generator, counting the shown draw too: (hits + 1) / (samples + 1), so it
  is never 0 (an unbiased estimate would be, for a rare slate, and IPS divides by it).

Randomness comes from a generator seeded from the ranking id (`seed_of(rid)`), which the log
keeps (the exposure's id), never from the clock: ranking the logged candidates again from the
user's state at the logged seq reproduces the slate and its propensities bit for bit.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np

POLICIES = ("none", "epsilon", "thompson")


def seed_of(rid: str) -> int:
    return int.from_bytes(hashlib.blake2b(rid.encode(), digest_size=8).digest(), "big")


class Slate(NamedTuple):
    order: np.ndarray  # candidate indices shown, in order
    propensities: tuple[float, ...]  # of each shown item at its position


def greedy(scores: np.ndarray, n: int) -> np.ndarray:
    return np.argsort(-scores, kind="stable")[:n]


def choose(policy: str, scores: np.ndarray, n: int, rid: str, *, epsilon: float = 0.0,
           features: np.ndarray | None = None, weights: np.ndarray | None = None,
           spread: np.ndarray | None = None, samples: int = 0,
           offsets: np.ndarray | None = None) -> Slate:
    """The slate shown. `scores`: every candidate's score; `features` (N x d, without the
    bias), `weights` (d + 1, bias first), `spread` (s, d + 1) and the candidates' item effects
    (`offsets`, not sampled) for Thompson sampling."""
    best = greedy(scores, n)
    if policy == "none":
        return Slate(best, (1.0,) * len(best))
    rng = np.random.default_rng(seed_of(rid))
    if policy == "epsilon":
        big_n = len(scores)
        order = rng.permutation(big_n)[:n] if rng.random() < epsilon else best
        return Slate(order, tuple((1.0 - epsilon) * float(order[k] == best[k]) + epsilon / big_n
                                  for k in range(len(order))))
    if policy == "thompson":
        assert features is not None and weights is not None and spread is not None
        draws = weights + spread * rng.standard_normal((samples + 1, weights.shape[0]))
        sampled = draws[:, 1:] @ features.T + draws[:, :1]  # (samples + 1) x N
        if offsets is not None:
            sampled = sampled + offsets
        orders = np.argsort(-sampled, axis=1, kind="stable")[:, :n]
        order = orders[0]
        hits = (orders == order).sum(axis=0)  # draws with the shown item at each position
        return Slate(order, tuple(float(h) / (samples + 1) for h in hits))
    raise ValueError(f"unknown exploration policy {policy!r} (known: {POLICIES})")


def spread(v: np.ndarray, dim: int, scale: float) -> np.ndarray:
    """Thompson's per-coordinate spread from the optimizer's squared-gradient evidence."""
    if v.shape[0] != dim + 1:  # nothing learned yet: the prior's spread
        return np.full(dim + 1, scale)
    return scale / np.sqrt(1.0 + v)


def reproduce(state, exposure, rid: str, config) -> Slate:
    """The slate a logged exposure's draw gives again, from the user's state at the seq it
    was ranked at (`exposure.seq`) under its config (`exposure.config`): what replay checks,
    and what off-policy evaluation re-ranks under another config."""
    from actors.learning import own_weights, settle

    settled = settle(state, config)
    own = own_weights(settled, config)
    w = own if exposure.shared is None else own + np.frombuffer(exposure.shared, "<f8")
    features = np.frombuffer(exposure.features, "<f8").reshape(len(exposure.candidates), -1)
    scores = features @ w[1:] + w[0]
    offsets = None
    if exposure.offsets is not None:  # the segment model's item effects it ranked with
        offsets = np.frombuffer(exposure.offsets, "<f8")
        scores = scores + offsets
    seg = config.segment(settled.segment)
    return choose(seg.explore, scores, len(exposure.items), rid, epsilon=seg.epsilon,
                  features=features, weights=w,
                  spread=spread(settled.v, config.dim, seg.explore_scale),
                  samples=seg.explore_samples, offsets=offsets)
