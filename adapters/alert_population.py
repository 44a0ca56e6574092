"""A segment with a known truth whose behaviour changes at a known event, run through
microtune's real path, for the alert detectors' tests and benchmark (scripts/bench_alerts.py).

Truth, as in adapters/drift.py: a segment taste theta (a bias and one weight per genre), each
user's own deviation, an appeal per item; a user rates a random item and y ~ Bernoulli(
sigmoid(theta . x + delta_u . x + b_i)). Unlike there, the change happens at one event of the
segment's stream (all users at once), so a detector's delay is a count of the segment's
events after it. Each event goes the way a user actor takes it (as adapters/quality.py
`microtune()` runs it): the segment model's score stamped, `apply` with a trace, the segment
model learning from that trace; the trace is what an alert watch receives.

Scenarios, from the change on:
- `stationary`: nothing changes.
- `flip`: the population's tastes flip: every genre's weight changes sign (theta -> -theta,
  the bias aside; the users' own deviations stay).
- `flip_genre`: only the taste of genre 0 flips, every user's (the population's and the user's
  own part), as in adapters/drift.py's `population`: a quarter of the items change, and the
  learners follow within a few hundred events.
- `unstable`: a new config version with rates 40x as high (and step bounds to match): every
  update overshoots.
- `alternating`: every user's target is the opposite of its previous one (a broken producer).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from actors.learning import Step, apply
from actors.segment_model import SegmentModels
from actors.state import UserState
from events.config import SegmentConfig, TuningConfig
from events.types import Event

SCENARIOS = ("stationary", "flip", "flip_genre", "unstable", "alternating")
T0 = 1.6e9
SEGMENT = "default"
# the `unstable` scenario's config: 40x the default rates, step bounds that let them through
UNSTABLE = {"lr": 2.0, "lr_max": 5.0, "lr_min": 0.4, "max_step": 20.0, "window_budget": 1e6}


@dataclass(frozen=True)
class Population:
    """The truth of one simulated segment stream."""

    users: int = 100
    events: int = 6000  # the segment's events in the stream
    change: int = 3000  # the event at which the scenario changes
    genres: int = 8
    items: int = 300
    taste: float = 1.5  # the population's taste of genre 0 (after a flip: -taste)
    gap: float = 30.0  # seconds between two events of the segment
    seed: int = 0

    @property
    def t_change(self) -> float:
        return T0 + self.change * self.gap


def config(dim: int, version: int = 1, **segment: float) -> TuningConfig:
    return TuningConfig(version=version, dim=dim,
                        segments={SEGMENT: SegmentConfig(**segment)})


def stream(population: Population, scenario: str,
           base: TuningConfig | None = None) -> Iterator[list[Step]]:
    """The trace `apply` gives for each event of the segment, in order (after the segment
    model has learned from it). With hygiene on, an event learns when the user's next one
    releases it, so a learning step's `t` may be an earlier event's."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}: one of {SCENARIOS}")
    pop = population
    rng = np.random.default_rng(pop.seed)
    theta = np.concatenate(([-0.3], rng.normal(0.0, 0.8, pop.genres)))
    theta[1] = pop.taste
    delta = rng.normal(0.0, 0.6, (pop.users, pop.genres + 1))
    delta[:, 0] *= 0.5
    x = np.zeros((pop.items, pop.genres))
    for i in range(pop.items):
        x[i, rng.choice(pop.genres, size=rng.integers(1, 4), replace=False)] = 1.0
    appeal = rng.normal(0.0, 0.5, pop.items)
    who = rng.integers(pop.users, size=pop.events)
    picks = rng.integers(pop.items, size=pop.events)
    draws = rng.random(pop.events)
    before = base or config(pop.genres)
    after = before
    if scenario == "unstable":
        after = config(pop.genres, before.version + 1, **UNSTABLE)
    models = SegmentModels()
    states: dict[int, UserState] = {}
    last_y: dict[int, float] = {}
    for n in range(pop.events):
        changed = n >= pop.change
        u, item = int(who[n]), int(picks[n])
        true_w = theta + delta[u]
        if changed and scenario == "flip":
            true_w = np.concatenate(([true_w[0]], delta[u, 1:] - theta[1:]))
        elif changed and scenario == "flip_genre":
            true_w = true_w.copy()
            true_w[1] = -true_w[1]
        xi = x[item]
        p_true = _sigmoid(float(true_w[0] + true_w[1:] @ xi) + appeal[item])
        y = 1.0 if draws[n] < p_true else 0.0
        if changed and scenario == "alternating" and u in last_y:
            y = 1.0 - last_y[u]
        last_y[u] = y
        cfg = after if changed else before
        state = states.get(u) or UserState(f"u{u}")
        stamp = models.stamp(SEGMENT, xi, cfg, str(item))
        event = Event(id=str(n), user=state.user, t=T0 + n * pop.gap, kind="feedback",
                      item=str(item), x=xi, target=y, config=cfg.version, base=stamp)
        steps: list[Step] = []
        states[u] = apply(state, event, cfg, steps)
        models.learn(SEGMENT, steps, cfg)
        yield steps


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))
