"""Off-policy estimators: what another policy would have earned, from a log with propensities.

The log holds slates: at each position k of an exposure i, the item shown a_ik, the
probability the logging policy had of showing it there (p_ik, logged with the exposure) and
the reward r_ik (1 if the user clicked it: actors/experiments/attribution.py). The target
policy B ranks the same candidates from the user's state under B; pi_ik is its probability of
showing a_ik at k (for a greedy B: 1 if its slate has a_ik at k, else 0), and b_ik its item at
k. The value of a policy is its expected clicks per slate, V = E[sum_k r_k] (the item-position
model: a click on an item at a position depends on that item and position, not on the rest of
the slate). With importance weights w_ik = pi_ik / p_ik:

- IPS:   V = mean_i sum_k w_ik r_ik. Unbiased where p > 0 wherever pi > 0; its variance grows
  with the weights (a target far from the logging policy).
- SNIPS: V = sum_i sum_k w_ik r_ik / (sum_i sum_k w_ik / K): IPS divided by the weights'
  own mean (1 in expectation). Slightly biased, far less variable when weights are large.
- DR:    V = mean_i sum_k [rhat(b_ik, k) + w_ik (r_ik - rhat(a_ik, k))], with rhat a model of
  the reward: per item and position, the click rate shrunk toward the position's mean
  (rhat = (clicks + m c_k) / (shows + m), m = SHRINK). Unbiased whichever the model (the
  propensities are known); the better the model, the smaller the variance. The model is
  cross-fitted: fitted on the other half of the exposures (split by ranking id), so no
  exposure's own reward enters its own baseline.

Intervals treat the user as the unit, like the experiment report: each estimate is a ratio of
per-user sums (contributions / slates, or / weights for SNIPS), with the delta method's
variance (statistics.ratio_interval), since one user's slates are not independent.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from actors.experiments import statistics as st

SHRINK = 10.0  # pseudo-shows of the position's mean in the reward model


class LoggedSlate(NamedTuple):
    unit: str  # the user
    key: str  # the ranking id: which half of the cross-fitting it is in
    shown: tuple[str, ...]  # a_k
    propensities: tuple[float, ...]  # p_k
    rewards: tuple[float, ...]  # r_k
    target_probs: tuple[float, ...]  # pi_k: the target's probability of a_k at k
    target_items: tuple[str, ...]  # b_k: the target's slate (a greedy target)


@dataclass(frozen=True, slots=True)
class Estimate:
    method: str
    value: st.Interval  # expected clicks per slate
    slates: int
    units: int


def estimate(slates: Sequence[LoggedSlate], alpha: float = 0.05) -> dict[str, Estimate]:
    """IPS, SNIPS and DR estimates of the target's value, and the logging policy's own
    (the log's mean clicks per slate), each with its interval."""
    by_unit: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(slates):
        by_unit[s.unit].append(i)
    units = list(by_unit)
    weights = [np.array(s.target_probs) / np.array(s.propensities) for s in slates]
    rewards = [np.array(s.rewards, dtype=float) for s in slates]
    ips = np.array([float(w @ r) for w, r in zip(weights, rewards, strict=True)])
    k = max((len(s.shown) for s in slates), default=1)
    mass = np.array([w.sum() / k for w in weights])
    models = _reward_models(slates)
    dr = np.array([_dr_term(s, w, r, models[_fold(s.key) ^ 1])
                   for s, w, r in zip(slates, weights, rewards, strict=True)])
    logged = np.array([r.sum() for r in rewards])
    ones = np.ones(len(slates))

    def per_unit(values: np.ndarray) -> np.ndarray:
        return np.array([values[by_unit[u]].sum() for u in units])

    out = {}
    for method, num, den in (("ips", ips, ones), ("snips", ips, mass), ("dr", dr, ones),
                             ("logged", logged, ones)):
        out[method] = Estimate(method, st.ratio_interval(per_unit(num), per_unit(den), alpha),
                               len(slates), len(units))
    return out


def _fold(key: str) -> int:
    return hashlib.blake2b(key.encode(), digest_size=1).digest()[0] & 1


def _reward_models(slates: Sequence[LoggedSlate]) -> list[dict]:
    """Per fold: (item, position) -> (clicks, shows), and position -> mean reward."""
    models = []
    for fold in (0, 1):
        cells: dict[tuple[str, int], list[float]] = defaultdict(lambda: [0.0, 0.0])
        positions: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for s in slates:
            if _fold(s.key) != fold:
                continue
            for k, (item, r) in enumerate(zip(s.shown, s.rewards, strict=True)):
                cells[(item, k)][0] += r
                cells[(item, k)][1] += 1
                positions[k][0] += r
                positions[k][1] += 1
        models.append({"cells": cells, "positions": {k: c / n for k, (c, n) in
                                                     positions.items()}})
    return models


def _rhat(model: dict, item: str, k: int) -> float:
    base = model["positions"].get(k, 0.0)
    clicks, shows = model["cells"].get((item, k), (0.0, 0.0))
    return (clicks + SHRINK * base) / (shows + SHRINK)


def _dr_term(s: LoggedSlate, w: np.ndarray, r: np.ndarray, model: dict) -> float:
    direct = sum(_rhat(model, b, k) for k, b in enumerate(s.target_items))
    correction = sum(w[k] * (r[k] - _rhat(model, a, k)) for k, a in enumerate(s.shown))
    return direct + correction
