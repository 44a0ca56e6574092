"""Drift and instability alerts, per segment, from the learning steps `apply` traces.

A segment's users learn one step per interaction; the steps a user actor hands its segment
model (`SegmentModels.learn`) are watched here too, two signals per step:

- `drift`: the log loss of the prediction made before the update (`Step.p` against the target
  `Step.y`) beyond the loss the prediction itself expected (its entropy H(p)), weighted by the
  step's importance. A calibrated learner's excess averages 0 whatever its accuracy, early or
  late, so the signal needs no learning curve of its own; it rises when the users' behaviour
  moves away from what was learned, and falls back as the learners follow.
- `unstable`: the log of the step's L2 norm. Updates that overshoot (rates far too high, a
  feedback loop) take steps many times their usual size. The log makes the threshold a ratio,
  the same for every segment whatever its rates.

Each signal feeds a one-sided detector of a rise of its mean: River's Page-Hinkley by default
(a CUSUM: `delta` is the smallest rise worth an alert, `threshold` the evidence it needs), or
ADWIN. Measured on simulated segments (scripts/bench_alerts.py, 50 seeds apart from those the
settings were chosen on), both stay quiet on stationary segments (0 alarms in 534,200 steps),
and Page-Hinkley finds more, sooner: a flip of the population's tastes 100% of the time (delay
median 167 events) against ADWIN's 98% (178); a flip of one genre's taste 68% against 38%;
rates 40x too high in 7 events against 56. ADWIN detects a change either way and says neither
which way nor how much, so its detections need a check of the rise over the next steps.
Page-Hinkley runs without forgetting (alpha 1): with River's default alpha (0.9999) its sum
settles where the noise alone crosses the threshold, and all 8 stationary segments of 30,000
steps raised false alarms.

An alert of a kind is followed by a cool-down of `cooldown` learning steps of the segment in
which further detections of that kind are counted, not raised: one shift gives one alert.
Everything here is a function of the steps in the order given (event times, step counts): no
wall clock, no randomness. Alerts are logged (structlog, `alert.raised`) and returned; the
service publishes them on `<prefix>.alerts.<kind>` (`subject`) and counts them (`Watches`).
"""

from __future__ import annotations

import math
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from actors.learning import Step

log = structlog.get_logger(__name__)

DRIFT, UNSTABLE = "drift", "unstable"
KINDS = (DRIFT, UNSTABLE)
# what each kind's subject carries (README "Alerts"); the service's prefix comes first
SUBJECTS = {
    DRIFT: "alerts.drift",  # the prediction loss of a segment rose: its users' behaviour moved
    UNSTABLE: "alerts.unstable",  # a segment's update norms rose: its learning overshoots
}
RECENT_ALERTS = 20  # the last alerts kept per segment, for `stats`


def subject(kind: str, prefix: str = "microtune") -> str:
    """The NATS subject an alert of `kind` is published on: `<prefix>.alerts.<kind>`."""
    return f"{prefix}.{SUBJECTS[kind]}"


@dataclass(frozen=True)
class AlertSettings:
    """The detectors' settings (one set for every segment), chosen on simulated segments
    (adapters/alert_population.py, seeds apart from the benchmark's: scripts/bench_alerts.py)."""

    detector: str = "page_hinkley"  # or "adwin"
    # drift, on the per-step excess log loss (nats): the smallest rise of its mean worth an
    # alert, and the cumulated excess it takes (Page-Hinkley's delta and lambda)
    loss_delta: float = 0.03
    loss_threshold: float = 30.0
    # unstable, on log |step|: a rise of 0.5 is 1.65x the usual step size
    norm_delta: float = 0.5
    norm_threshold: float = 20.0
    min_steps: int = 100  # a detector's steps (since start or its last detection) before it
    # may fire: a baseline first
    cooldown: int = 5000  # steps of the segment after an alert with no other of its kind
    clip: float = 0.01  # predictions clipped to [clip, 1 - clip]: one confident miss counts at
    # most logit(1 - clip) (4.6 nats), not the unbounded tail that would alarm on its own
    norm_floor: float = 1e-4  # a smaller step counts as this one (log of ~0 is -inf)
    # Page-Hinkley's forgetting of its cumulated sum: none. River's default, 0.9999, raised
    # false alarms in most stationary segments of 30,000 steps (scripts/bench_alerts.py)
    ph_alpha: float = 1.0
    adwin_delta: float = 0.002  # ADWIN's confidence, with detector="adwin"
    adwin_confirm: int = 50  # ADWIN: the steps after a detection whose mean checks the rise

    def __post_init__(self) -> None:
        if self.detector not in DETECTORS:
            raise ValueError(f"detector: one of {sorted(DETECTORS)}, not {self.detector!r}")
        if min(self.loss_delta, self.loss_threshold, self.norm_delta, self.norm_threshold,
               self.clip, self.norm_floor, self.adwin_delta) <= 0 or self.clip >= 0.5:
            raise ValueError("deltas, thresholds, clip (< 0.5) and norm_floor must be > 0")
        if not 0.0 < self.ph_alpha <= 1.0:
            raise ValueError("ph_alpha must be in (0, 1]")
        if min(self.min_steps, self.cooldown, self.adwin_confirm) < 1:
            raise ValueError("min_steps, cooldown and adwin_confirm must be >= 1")


@dataclass(frozen=True)
class Alert:
    """One alert: what rose, where, at which step of the segment (`t`: the event time of
    that step, `event_id`: its event), with the detector's figures and a sentence."""

    kind: str
    segment: str
    t: float
    event_id: str
    step: int  # the segment's learning steps watched so far, this one included
    statistics: Mapping[str, float]
    message: str
    suppressed: int = 0  # detections of this kind swallowed by the cool-down before this one

    def subject(self, prefix: str = "microtune") -> str:
        return subject(self.kind, prefix)

    def to_map(self) -> dict[str, Any]:
        """Plain types, for the wire (msgpack or JSON) and `stats`."""
        return {"kind": self.kind, "segment": self.segment, "t": self.t,
                "event_id": self.event_id, "step": self.step,
                "statistics": dict(self.statistics), "message": self.message,
                "suppressed": self.suppressed}


# ---------------------------------------------------------------- detectors of a rise


class RiseDetector(Protocol):
    name: str

    def update(self, x: float) -> dict[str, float] | None:
        """Take one value; the detector's figures when it finds that the mean rose."""


class PageHinkleyRise:
    """River's Page-Hinkley test (`river.drift.PageHinkley`), one-sided (mode "up"): a fall
    of the loss (learning) or of the step sizes (rates settling) is no alert. It resets itself
    after a detection, so the level after a shift becomes the new baseline. Computed here, in
    the very arithmetic of River's (the running mean, the cumulated deviation less delta, its
    minimum; tests/test_alerts.py holds the two to the same detections), because the same sum
    also says where the rise began (the step where it was lowest, the test's own estimate of
    the change point) and the means before and since, which River keeps private; and one
    update costs a quarter of River's object (this runs for every learning step)."""

    name = "page_hinkley"

    def __init__(self, delta: float, threshold: float, min_steps: int,
                 alpha: float = 1.0) -> None:
        # alpha 1 by default: no forgetting (the module docstring says why)
        self.delta, self.threshold, self.alpha = delta, threshold, alpha
        self.min_steps = min_steps
        self._detected = False
        self._reset()

    def _reset(self) -> None:
        self._n, self._total, self._mean = 0, 0.0, 0.0
        self._sum, self._low = 0.0, math.inf
        self._since_n, self._since_total = 0, 0.0  # the values after the lowest sum

    def update(self, x: float) -> dict[str, float] | None:
        if self._detected:  # as River: the update after a detection starts afresh
            self._detected = False
            self._reset()
        self._n += 1
        self._total += x
        self._mean += (x - self._mean) / self._n
        self._sum = self.alpha * self._sum + (x - self._mean) - self.delta
        if self._sum < self._low:
            self._low, self._since_n, self._since_total = self._sum, 0, 0.0
        else:
            self._since_n += 1
            self._since_total += x
        if self._n < self.min_steps or not self._sum - self._low > self.threshold:
            return None
        self._detected = True
        since = max(self._since_n, 1)
        recent = self._since_total / since if self._since_n else x
        before = self._n - self._since_n
        baseline = (self._total - self._since_total) / before if before else self._mean
        return {"baseline": baseline, "recent": recent, "rise": recent - baseline,
                "since": float(self._since_n), "steps": float(self._n),
                "delta": self.delta, "threshold": self.threshold}


class AdwinRise:
    """River's ADWIN, which finds a change of the mean either way, and says neither which way
    nor how much (it drops its oldest buckets, then resets at the next value). So a detection
    opens a check: the mean of the next `confirm` values against the window's mean before it;
    only a rise of at least `min_rise` raises an alert (the learning curve's fall does not)."""

    name = "adwin"

    def __init__(self, delta: float, min_rise: float, min_steps: int, confirm: int) -> None:
        from river import drift  # here: importing it takes half a second (scipy.stats)

        self.delta, self.min_rise, self.confirm = delta, min_rise, confirm
        # clock 1: test at every step, not every 32nd (a 0-31 step delay for nothing here)
        self._adwin = drift.ADWIN(delta=delta, clock=1, grace_period=min_steps)
        self._check: list[float] | None = None  # [baseline, width, sum, count] after a detection

    def update(self, x: float) -> dict[str, float] | None:
        before, width = self._adwin.estimation, self._adwin.width
        self._adwin.update(x)
        check = self._check
        if check is None:
            if self._adwin.drift_detected:
                self._check = [before, float(width), 0.0, 0.0]
            return None
        check[2] += x
        check[3] += 1
        if check[3] < self.confirm:
            return None
        self._check = None
        recent = check[2] / check[3]
        if recent - check[0] < self.min_rise:
            return None
        return {"baseline": check[0], "recent": recent, "rise": recent - check[0],
                "since": check[3], "steps": check[1], "delta": self.delta,
                "min_rise": self.min_rise}


DETECTORS = {PageHinkleyRise.name: PageHinkleyRise, AdwinRise.name: AdwinRise}


def _detector(settings: AlertSettings, delta: float, threshold: float) -> RiseDetector:
    if settings.detector == AdwinRise.name:  # ADWIN has no threshold: delta is its floor
        return AdwinRise(settings.adwin_delta, delta, settings.min_steps,
                         settings.adwin_confirm)
    return PageHinkleyRise(delta, threshold, settings.min_steps, settings.ph_alpha)


# ---------------------------------------------------------------- signals


class LossSignal:
    """A step's log loss beyond its prediction's entropy (what the prediction expected to
    lose), weighted by its importance over the segment's mean importance: the signal's mean is
    the importance-weighted mean excess, in nats whatever the segment's importances
    (impressions at 0.2 would otherwise shrink every figure fivefold)."""

    def __init__(self, clip: float) -> None:
        self.lo, self.hi = clip, 1.0 - clip
        self._n = 0
        self._mean_importance = 0.0

    def __call__(self, step: Step) -> float | None:
        a = step.importance
        if step.p is None or step.y is None or not a or a <= 0.0:
            return None
        self._n += 1
        self._mean_importance += (a - self._mean_importance) / self._n
        p = min(max(step.p, self.lo), self.hi)
        y = step.y  # in [0, 1]: a soft target's cross-entropy
        lp, lq = math.log(p), math.log(1.0 - p)
        excess = (p - y) * (lp - lq)  # -(y lp + (1 - y) lq) + (p lp + (1 - p) lq)
        return a / self._mean_importance * excess


class StepNormSignal:
    """log |step|: a step that moved no weight (a segment without micro-adjustment) is
    skipped; tiny ones count as `floor`."""

    def __init__(self, floor: float) -> None:
        self.floor = floor

    def __call__(self, step: Step) -> float | None:
        s = step.step
        if s is None:
            return None
        norm = math.sqrt(float(s @ s))
        if norm == 0.0:
            return None
        return math.log(max(norm, self.floor))


# ---------------------------------------------------------------- one kind, one segment


@dataclass
class Monitor:
    """One signal, one detector, one cool-down: the alerts of one kind in one segment."""

    kind: str
    signal: Callable[[Step], float | None]
    detector: RiseDetector
    cooldown: int
    describe: Callable[[dict[str, float]], str]
    alerts: int = 0
    suppressed: int = 0  # all time
    # the segment's step count before which a detection is swallowed; swallowed since the
    # last alert
    _quiet_until: int = field(default=0, init=False, repr=False)
    _swallowed: int = field(default=0, init=False, repr=False)

    def observe(self, step: Step, n: int) -> dict[str, Any] | None:
        """The alert's figures and message if this step raises one."""
        x = self.signal(step)
        if x is None:
            return None
        stats = self.detector.update(x)
        if stats is None:
            return None
        if n < self._quiet_until:
            self.suppressed += 1
            self._swallowed += 1
            return None
        self.alerts += 1
        self._quiet_until = n + self.cooldown
        swallowed, self._swallowed = self._swallowed, 0
        stats["value"] = x
        return {"statistics": stats, "message": self.describe(stats), "suppressed": swallowed}


def _loss_message(s: dict[str, float]) -> str:
    return (f"prediction loss beyond what the predictions expected rose from "
            f"{s['baseline']:+.3f} to {s['recent']:+.3f} nats per step, since about "
            f"{s['since']:.0f} steps ago: the segment's behaviour moved away from what its "
            "models learned")


def _norm_message(s: dict[str, float]) -> str:
    return (f"update norms grew {math.exp(s['rise']):.1f}x since about {s['since']:.0f} "
            f"steps ago (typical step {math.exp(s['recent']):.3g}, was "
            f"{math.exp(s['baseline']):.3g}): learning overshoots; check the segment's rates "
            "and step bounds")


class SegmentWatch:
    """The alerts of one segment: give it the traces `apply` made (as `SegmentModels.learn`
    receives them), in order; it returns the alerts they raise. Not thread-safe on its own
    (`Watches` holds the lock)."""

    def __init__(self, segment: str, settings: AlertSettings | None = None) -> None:
        self.segment = segment
        s = self.settings = settings or AlertSettings()
        self.steps = 0  # learning steps watched
        self.monitors = (
            Monitor(DRIFT, LossSignal(s.clip), _detector(s, s.loss_delta, s.loss_threshold),
                    s.cooldown, _loss_message),
            Monitor(UNSTABLE, StepNormSignal(s.norm_floor),
                    _detector(s, s.norm_delta, s.norm_threshold), s.cooldown, _norm_message),
        )
        self.recent: deque[Alert] = deque(maxlen=RECENT_ALERTS)

    def observe(self, steps: Iterable[Step]) -> list[Alert]:
        alerts: list[Alert] = []
        for step in steps:
            if step.score is None:  # not a learning step (pending, bot, exposure, ...)
                continue
            self.steps += 1
            for monitor in self.monitors:
                raised = monitor.observe(step, self.steps)
                if raised is None:
                    continue
                alert = Alert(monitor.kind, self.segment, step.t, step.event_id, self.steps,
                              **raised)
                log.warning("alert.raised", kind=alert.kind, segment=alert.segment,
                            t=alert.t, event_id=alert.event_id, step=alert.step,
                            suppressed=alert.suppressed,
                            **{k: round(v, 4) for k, v in alert.statistics.items()})
                self.recent.append(alert)
                alerts.append(alert)
        return alerts

    def summary(self) -> dict[str, Any]:
        return {"steps": self.steps,
                **{m.kind: {"alerts": m.alerts, "suppressed": m.suppressed} for m in
                   self.monitors},
                "recent": [a.to_map() for a in self.recent]}


# ---------------------------------------------------------------- a service's watches


@dataclass
class Watches:
    """The watches of one service, one per segment, created on a segment's first step.
    Thread-safe: users of one segment run on different dispatcher workers. `publish`, when
    given, is called with each alert (under the lock, on the caller's thread: hand it to the
    event loop, do not block). `counts` and `suppressed`: per (segment, kind), for metrics."""

    settings: AlertSettings = field(default_factory=AlertSettings)
    publish: Callable[[Alert], None] | None = None
    counts: Counter = field(default_factory=Counter)
    suppressed: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._watches: dict[str, SegmentWatch] = {}
        self._lock = threading.Lock()

    def observe(self, segment: str, steps: Iterable[Step]) -> list[Alert]:
        """Watch a user's trace (call it where `SegmentModels.learn` is called, with the same
        segment and steps)."""
        with self._lock:
            watch = self._watches.get(segment)
            if watch is None:
                watch = self._watches[segment] = SegmentWatch(segment, self.settings)
            alerts = watch.observe(steps)
            for m in watch.monitors:
                self.suppressed[segment, m.kind] = m.suppressed
            for alert in alerts:
                self.counts[segment, alert.kind] += 1
                if self.publish is not None:
                    self.publish(alert)
            return alerts

    def totals(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(segment, kind) -> (alerts raised, detections suppressed), a copy taken under the
        lock: for a metrics scrape on another thread."""
        with self._lock:
            return {key: (self.counts[key], self.suppressed[key])
                    for key in sorted(self.counts.keys() | self.suppressed.keys())}

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per segment: steps watched, alerts and suppressed detections per kind, the last
        alerts (for `stats`)."""
        with self._lock:
            return {name: w.summary() for name, w in sorted(self._watches.items())}
