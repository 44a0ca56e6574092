"""Drift and instability alerts (actors/alerts): detectors on the learning steps of a segment,
checked on simulated segments with a known change, run through microtune's real path
(adapters/alert_population.py; the figures over 50 seeds: `microtune bench alerts`)."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from structlog.testing import capture_logs

from actors.alerts import DRIFT, UNSTABLE, Alert, AlertSettings, SegmentWatch, Watches, subject
from actors.alerts.watch import AdwinRise, LossSignal, PageHinkleyRise
from actors.learning import Step
from adapters.alert_population import Population, stream

# The bound asserted on a flip of the population's tastes, in the segment's events after it:
# over the benchmark's 50 seeds the delay's median is 167, its p90 275, its max 463. It
# includes the wait for changed events to be learned: hygiene releases an event at its
# user's next one (the first changed event learns about 13 events after the flip, a typical
# one about 100 later, with 100 users).
FLIP_DELAY = 500
UNSTABLE_DELAY = 20  # events after a config with 40x the rates (benchmark: 7 to 9)


def _watch(scenario: str, seed: int, **settings) -> tuple[list[tuple[int, Alert]], int]:
    """The alerts of one simulated segment, each with the index of the event whose trace
    raised it; and the event at which the scenario changes."""
    population = Population(seed=seed)
    watch = SegmentWatch("default", AlertSettings(**settings))
    alerts = [(n, a) for n, steps in enumerate(stream(population, scenario))
              for a in watch.observe(steps)]
    return alerts, population.change


def _step(p: float, y: float, norm: float = 0.1, importance: float = 1.0, t: float = 0.0,
          event_id: str = "e") -> Step:
    return Step(event_id, "feedback", t, "applied", y, importance, p, 0.05,
                np.array([norm, 0.0]), (), np.zeros(1), 0.0, None)


# ------------------------------------------------------------------ on a simulated segment


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_flip_of_the_populations_tastes_raises_one_drift_alert_soon_after(seed):
    alerts, change = _watch("flip", seed)
    assert [a.kind for _n, a in alerts] == [DRIFT]  # one shift, one alert; nothing before
    n, alert = alerts[0]
    assert change <= n < change + FLIP_DELAY
    assert alert.segment == "default" and alert.statistics["rise"] > 0.05
    assert alert.t >= Population().t_change - 200 * Population().gap  # an event near the flip


@pytest.mark.parametrize("seed", [0, 1])
def test_a_stationary_population_raises_nothing(seed):
    alerts, _change = _watch("stationary", seed)
    assert alerts == []


def test_rates_far_too_high_raise_unstable_at_once():
    alerts, change = _watch("unstable", 0)
    unstable = [(n, a) for n, a in alerts if a.kind == UNSTABLE]
    assert len(unstable) == 1
    n, alert = unstable[0]
    assert change <= n < change + UNSTABLE_DELAY
    assert math.exp(alert.statistics["rise"]) > 5  # steps many times their usual size
    assert all(n >= change for n, _a in alerts)
    # the loss rises too (the updates overshoot): at most one drift alert per cool-down
    assert sum(a.kind == DRIFT for _n, a in alerts) <= 1


def test_the_same_steps_give_the_same_alerts():
    first, _ = _watch("alternating", 3)
    again, _ = _watch("alternating", 3)
    assert [a.to_map() for _n, a in first] == [a.to_map() for _n, a in again]
    assert [a.kind for _n, a in first] == [DRIFT]  # targets that flip every event: drift


# ------------------------------------------------------------------ the parts


def test_the_loss_signal_is_the_loss_beyond_the_predictions_own_entropy():
    signal = LossSignal(clip=0.01)
    p, y = 0.8, 0.0
    loss = -math.log(1 - p)
    entropy = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert signal(_step(p, y)) == pytest.approx(loss - entropy)
    # calibrated predictions: the excess averages 0, however confident
    rng = np.random.default_rng(0)
    signal = LossSignal(clip=0.01)
    ps = rng.uniform(0.05, 0.95, 20_000)
    excess = [signal(_step(q, float(rng.random() < q))) for q in ps]
    assert abs(np.mean(excess)) < 0.02
    # importance weights relative to the segment's mean importance; no weight, no value
    signal = LossSignal(clip=0.01)
    assert signal(_step(0.5, 1.0, importance=0.0)) is None
    signal(_step(0.8, 0.0, importance=0.2))
    assert signal(_step(0.8, 0.0, importance=1.0)) == pytest.approx(
        1.0 / 0.6 * (loss - entropy))


def test_page_hinkley_rises_only():
    rng = np.random.default_rng(1)
    falling = PageHinkleyRise(0.03, 30.0, 100)
    assert not any(falling.update(x) for x in np.r_[rng.normal(1.0, 0.4, 2000),
                                                    rng.normal(0.2, 0.4, 2000)])
    rising = PageHinkleyRise(0.03, 30.0, 100)
    fired = [i for i, x in enumerate(np.r_[rng.normal(0.0, 0.4, 2000),
                                           rng.normal(0.3, 0.4, 2000)])
             if rising.update(float(x))]
    assert fired and 2000 < fired[0] < 2300


def test_adwin_counts_only_a_rise_checked_over_the_next_steps():
    rng = np.random.default_rng(2)
    falling = AdwinRise(0.002, 0.03, 100, 50)
    assert not any(falling.update(float(x)) for x in np.r_[rng.normal(1.0, 0.4, 2000),
                                                           rng.normal(0.2, 0.4, 2000)])
    rising = AdwinRise(0.002, 0.03, 100, 50)
    fired = [(i, f) for i, x in enumerate(np.r_[rng.normal(0.0, 0.4, 2000),
                                                rng.normal(0.3, 0.4, 2000)])
             if (f := rising.update(float(x)))]
    assert fired and 2050 <= fired[0][0] < 2300 and fired[0][1]["rise"] > 0.2


def test_a_cool_down_turns_repeated_detections_into_one_alert():
    watch = SegmentWatch("s", AlertSettings(cooldown=1000))
    levels = [(300, 0.5), (900, 0.2), (1400, 0.05), (3000, 0.01)]  # y = 1: a worse p each time
    steps, start = [], 0
    for end, p in levels:
        steps += [_step(p, 1.0, event_id=str(i)) for i in range(start, end)]
        start = end
    alerts = watch.observe(steps)
    # three jumps: the first alerts, the second is swallowed (within 1,000 steps), the third
    # comes after the cool-down
    assert [a.kind for a in alerts] == [DRIFT, DRIFT]
    assert 300 < alerts[0].step < 400 and 1400 < alerts[1].step < 1500
    drift = watch.monitors[0]
    assert drift.suppressed == 1 and alerts[1].suppressed == 1 and alerts[0].suppressed == 0
    assert watch.summary()["drift"] == {"alerts": 2, "suppressed": drift.suppressed}


def test_only_learning_steps_count():
    watch = SegmentWatch("s")
    pending = Step("e", "click", 0.0, "pending")  # no score: not learned (yet)
    frozen = _step(0.5, 1.0, norm=0.0)  # a segment without micro-adjustment: no step
    assert watch.observe([pending] * 500 + [frozen] * 10) == []
    assert watch.steps == 10


def test_alerts_are_logged_published_counted_and_summarised():
    published: list[Alert] = []
    watches = Watches(AlertSettings(cooldown=10_000), publish=published.append)
    steady = [_step(0.5, 1.0, norm=0.1, t=float(i), event_id=str(i)) for i in range(500)]
    wild = [_step(0.5, 1.0, norm=8.0, t=float(i), event_id=str(i)) for i in range(500, 600)]
    with capture_logs() as logs:
        threads = [threading.Thread(target=watches.observe, args=(seg, steady))
                   for seg in ("a", "b")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        alerts = watches.observe("a", wild)
    assert [a.kind for a in alerts] == [UNSTABLE] and published == alerts
    alert = alerts[0]
    assert alert.segment == "a" and 500 <= alert.t < 600 and alert.event_id == str(int(alert.t))
    assert alert.subject() == "microtune.alerts.unstable" == subject(UNSTABLE)
    assert alert.subject("shop") == "shop.alerts.unstable"
    assert "grew" in alert.message and alert.to_map()["statistics"]["rise"] > 3
    assert watches.counts == {("a", UNSTABLE): 1}
    assert watches.totals() == {("a", DRIFT): (0, 0), ("a", UNSTABLE): (1, 0),
                                ("b", DRIFT): (0, 0), ("b", UNSTABLE): (0, 0)}
    raised = [e for e in logs if e["event"] == "alert.raised"]
    assert len(raised) == 1 and raised[0]["segment"] == "a" and raised[0]["kind"] == UNSTABLE
    summary = watches.summary()
    assert summary["a"]["steps"] == 600 and summary["b"]["unstable"]["alerts"] == 0
    assert summary["a"]["recent"][0]["kind"] == UNSTABLE


def test_settings_are_checked():
    with pytest.raises(ValueError, match="detector"):
        AlertSettings(detector="kswin")
    with pytest.raises(ValueError):
        AlertSettings(clip=0.5)
    with pytest.raises(ValueError):
        AlertSettings(cooldown=0)
    with pytest.raises(ValueError, match="ph_alpha"):
        AlertSettings(ph_alpha=0.0)


def test_the_page_hinkley_rise_detects_exactly_where_rivers_does():
    """Computed inline for speed, it must stay River's test: the same detections, step by
    step, on streams with rises, falls and noise (alpha 1 and River's default)."""
    from river import drift

    rng = np.random.default_rng(3)
    for alpha in (1.0, 0.9999):
        for trial in range(5):
            xs = np.concatenate([rng.normal(0, 1, 2000), rng.normal(0.8 * trial, 1, 2000),
                                 rng.normal(-0.5, 2, 2000)])
            river = drift.PageHinkley(min_instances=100, delta=0.03, threshold=30.0,
                                      alpha=alpha, mode="up")
            ours = PageHinkleyRise(0.03, 30.0, 100, alpha)
            for n, x in enumerate(xs.tolist()):
                river.update(x)
                assert (ours.update(x) is not None) == river.drift_detected, (alpha, trial, n)
