"""Adaptive bounds: a user's step bound and window budget scale with the steadiness of its
updates (actors/learning.py), in the pure apply."""

from __future__ import annotations

import math

import numpy as np
from helpers import fold

from actors.learning import BOUND_FLOOR, STABILITY_MIN, bound_scale, steadiness
from events import Event, SegmentConfig, TuningConfig

DIM = 3
X = np.array([1.0, 0.5, -0.5])


def _config(adaptive: bool) -> TuningConfig:
    return TuningConfig(version=1, dim=DIM, segments={"default": SegmentConfig(
        hygiene=False, adaptive_bounds=adaptive, max_step=0.05, lr=0.5, lr_min=0.1,
        lr_max=1.0)})


def _events(targets) -> list[Event]:
    return [Event(id=f"e{n}", user="u", t=1000.0 + 60 * n, kind="feedback", item="a", x=X,
                  target=y) for n, y in enumerate(targets)]


def test_the_scale_follows_the_consistency_of_the_steps_directions():
    assert bound_scale(None) == 1.0
    steady = None
    for _ in range(STABILITY_MIN):
        steady = steadiness(steady, np.array([0.1, 0.2, 0.0]))
    assert math.isclose(bound_scale(steady), 1.0)  # the same step every time
    erratic = None
    for n in range(40):  # steps that take back what the last one did
        erratic = steadiness(erratic, np.array([0.1, 0.2, 0.0]) * (1 if n % 2 else -1))
    mean_step, mean_norm, count = erratic
    consistency = math.sqrt(float(mean_step @ mean_step)) / mean_norm
    assert count == 40 and consistency < 0.1
    assert bound_scale(erratic) == BOUND_FLOOR + (1 - BOUND_FLOOR) * consistency < 0.35
    assert bound_scale((np.zeros(3), 1.0, 50)) == BOUND_FLOOR  # never below the floor
    assert bound_scale((np.ones(3), 1.0, STABILITY_MIN - 1)) == 1.0  # too few updates yet


def test_an_erratic_user_moves_less_per_event_than_the_bound_and_a_steady_one_does_not():
    rng = np.random.default_rng(3)
    erratic_targets = [float(rng.random() < 0.5) for _ in range(60)]  # conflicting signals
    steady_targets = [1.0] * 60
    for targets in (erratic_targets, steady_targets):
        state, trace = fold(_events(targets), _config(True))
        norms = [float(np.linalg.norm(s.step)) for s in trace if s.step is not None]
        # replay the stability alongside: each step stays within its own scaled bound
        steps = [s.step for s in trace if s.step is not None]
        stability = None
        for norm, step in zip(norms, steps, strict=True):
            assert norm <= 0.05 * bound_scale(stability) + 1e-12
            stability = steadiness(stability, step)
        assert state.stability[0].tobytes() == stability[0].tobytes()  # exactly that
        assert state.stability[1:] == stability[1:]
    erratic, _ = fold(_events(erratic_targets), _config(True))
    steady, _ = fold(_events(steady_targets), _config(True))
    assert bound_scale(erratic.stability) < bound_scale(steady.stability)


def test_off_by_default_and_then_nothing_changes():
    targets = [1.0, 0.0] * 20
    off, _ = fold(_events(targets), _config(False))
    assert off.stability is None
    on, _ = fold(_events(targets), _config(True))
    assert on.stability is not None and not np.array_equal(on.w, off.w)
