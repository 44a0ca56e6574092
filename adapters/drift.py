"""A population whose tastes drift on a known schedule: does the learner follow drift, and stay
put without it, whatever the calendar span of the stream?

Truth: a segment taste theta (a bias and one weight per genre), each user's own deviation
delta_u, and an appeal b_i per item. A user rates random items; y ~ Bernoulli(sigmoid(theta . x
+ delta_u . x + b_i)). Each user's events are `gap` seconds apart on average (exponential
gaps), so the same stream can span hours or decades: a default that depends on the calendar
span gives different answers on the same events.

Scenarios:
- `stationary`: nothing changes. The learned weights must stay put in the second half.
- `population`: halfway through every user's events, the segment's taste of genre 0 flips
  (theta_0 -> -theta_0).
- `personal`: halfway through, half the users flip their own taste of genre 1.

Figures, from microtune's real path (`apply`, `predict`, the segment model, as the quality
harness runs it): the excess log loss over the truth, KL(p_true || p_hat), per phase; the
learned total weight of the drifting genre (segment + own), averaged over the drifting users,
after each of their events; the delay (a drifting user's events after the change) until that
weight crosses halfway to its new truth; and, as the delay to expect, the events the same
learner needs from a cold start to get halfway to the same truth. Following a change should
not take much longer than learning from nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from actors.learning import apply, predict
from actors.segment_model import SegmentModels
from actors.state import UserState
from events.config import TuningConfig
from events.types import Event

SCENARIOS = ("stationary", "population", "personal")
T0 = 1.6e9


@dataclass(frozen=True)
class World:
    """The truth of one simulated stream."""

    users: int = 200
    events_per_user: int = 200
    genres: int = 8
    items: int = 400
    flip: float = 1.5  # the drifting genre's weight before the change (after: -flip)
    gap: float = 3600.0  # mean seconds between two events of a user
    seed: int = 0


@dataclass
class Outcome:
    scenario: str
    gap: float
    config: str
    excess_before: float  # mean KL(p_true || p_hat) over the first half of the stream
    excess_after: float  # ... over the second half
    path: np.ndarray  # per event number of a drifting user: the mean error of its predicted
    # log-odds of items of the drifting genre (learned minus true)
    delay: float | None  # events after the change until that error halves (None: never)
    wander: float  # stationary: RMS change of the users' total weights over the second half


def _truth(world: World, rng: np.random.Generator):
    theta = np.concatenate(([-0.3], rng.normal(0.0, 0.8, world.genres)))
    theta[1] = world.flip  # genre 0: the one that flips in `population`
    delta = rng.normal(0.0, 0.6, (world.users, world.genres + 1))
    delta[:, 0] *= 0.5
    delta[:, 2] = world.flip  # genre 1: every user's own taste, which flips in `personal`
    x = np.zeros((world.items, world.genres))
    for i in range(world.items):
        x[i, rng.choice(world.genres, size=rng.integers(1, 4), replace=False)] = 1.0
    appeal = rng.normal(0.0, 0.5, world.items)
    return theta, delta, x, appeal


def _schedule(world: World, rng: np.random.Generator) -> list[tuple[float, int, int]]:
    """(time, user, the user's event number) for every event, in time order."""
    rows = []
    for u in range(world.users):
        start = T0 + rng.random() * world.gap
        times = start + np.cumsum(rng.exponential(world.gap, world.events_per_user))
        rows += [(float(t), u, k) for k, t in enumerate(times)]
    rows.sort()
    return rows


def simulate(world: World, scenario: str, config: TuningConfig, label: str,
             *, cold: bool = False) -> Outcome:
    """One stream under `config`. `cold`: the drifting users start in the changed world (the
    reference delay: learning the new truth from nothing)."""
    rng = np.random.default_rng(world.seed)
    theta, delta, x, appeal = _truth(world, rng)
    schedule = _schedule(world, rng)
    half = world.events_per_user // 2
    coord = 1 if scenario != "personal" else 2  # the drifting weight (bias first)
    drifting = (np.ones(world.users, bool) if scenario != "personal"
                else np.arange(world.users) % 2 == 0)
    picks = rng.integers(world.items, size=len(schedule))
    draws = rng.random(len(schedule))
    models = SegmentModels()
    states: dict[int, UserState] = {}
    steps: list = []
    kl_before, kl_after = [], []
    err_sum = np.zeros(world.events_per_user)
    err_n = np.zeros(world.events_per_user)
    snapshots: dict[int, np.ndarray] = {}
    for n, (t, u, k) in enumerate(schedule):
        changed = scenario != "stationary" and drifting[u] and (cold or k >= half)
        true_w = theta + delta[u]
        if changed:
            true_w = true_w.copy()
            true_w[coord] = -true_w[coord]
        item = int(picks[n])
        xi = x[item]
        p_true = _sigmoid(true_w[0] + true_w[1:] @ xi + appeal[item])
        y = 1.0 if draws[n] < p_true else 0.0
        user = f"u{u}"
        state = states.get(u) or UserState(user)
        base = models.stamp("default", xi, config, str(item))
        p_hat = min(max(predict(state, xi, config, base or 0.0), 1e-7), 1 - 1e-7)
        kl = (p_true * math.log(p_true / p_hat)
              + (1 - p_true) * math.log((1 - p_true) / (1 - p_hat)))
        (kl_after if k >= half else kl_before).append(kl)
        event = Event(id=str(n), user=user, t=t, kind="feedback", item=str(item), x=xi,
                      target=y, config=config.version, base=base)
        state = states[u] = apply(state, event, config, steps)
        models.learn("default", steps, config)
        steps.clear()
        if drifting[u] and xi[coord - 1]:  # an item of the drifting genre
            err_sum[k] += math.log(p_hat / (1 - p_hat)) - math.log(p_true / (1 - p_true))
            err_n[k] += 1
        if k == half - 1 or k == world.events_per_user - 1:
            total = _total(state, models, config)
            if total is not None:
                snapshots.setdefault(k, np.zeros((world.users, world.genres + 1)))[u] = total
    path = err_sum / np.maximum(err_n, 1)
    start = 0 if cold else half
    delay = None
    if scenario != "stationary":
        smooth = np.convolve(path, np.ones(5) / 5, mode="same")  # a few users per point
        jump = smooth[start + 2]
        for j in range(start + 2, world.events_per_user):
            if abs(smooth[j]) <= abs(jump) / 2:
                delay = float(j - start)
                break
    moved = snapshots[world.events_per_user - 1] - snapshots[half - 1]
    wander = float(np.sqrt((moved[:, 1:] ** 2).mean()))
    return Outcome(scenario, world.gap, label, float(np.mean(kl_before)),
                   float(np.mean(kl_after)), path, delay, wander)


def _total(state: UserState, models: SegmentModels, config: TuningConfig) -> np.ndarray | None:
    if state.w.shape[0] == 0:
        return None
    return models.total(state, config)


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))
