"""The defaults hold on any time scale and follow drift (adapters/drift.py: a simulated
population with a known truth; figures in `microtune bench drift`)."""

from __future__ import annotations

import pytest

from adapters import drift
from events.config import SEGMENT_DEFAULTS, SegmentConfig, TuningConfig

WEEK = 7 * 86400.0


def _run(scenario: str, gap: float, segment: dict | None = None, cold: bool = False):
    world = drift.World(users=80, events_per_user=200, gap=gap)
    config = TuningConfig(version=1, dim=world.genres,
                          segments={"default": SegmentConfig(**(segment or {}))})
    return drift.simulate(world, scenario, config, "test", cold=cold)


def test_the_same_events_learn_the_same_whatever_their_calendar_span():
    minute, week = _run("stationary", 60.0), _run("stationary", WEEK)
    assert week.excess_after == pytest.approx(minute.excess_after, rel=0.01)
    assert minute.excess_after < 0.8 * minute.excess_before  # and it learned something
    # the schema-2 defaults faded with time: the week-apart stream learned worse
    old = _run("stationary", WEEK, SEGMENT_DEFAULTS[2])
    assert old.excess_after > 1.2 * week.excess_after


def test_a_flip_of_the_populations_taste_is_followed():
    after = _run("population", 3600.0)
    cold = _run("population", 3600.0, cold=True)
    half = len(after.path) // 2
    jump = after.path[half:half + 3].mean()
    assert jump > 1.5  # the flip is visible: predicted log-odds far too high
    assert after.delay is not None and cold.delay is not None
    assert after.delay <= 3 * cold.delay  # unlearning costs at most 3x learning afresh
    assert abs(after.path[-10:].mean()) < jump / 3
