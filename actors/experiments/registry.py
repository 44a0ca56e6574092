"""The experiments of one store: their recorded definitions, and which config a user's
events and rankings are stamped with.

Per-arm learning: a user in an arm learns only under that arm's tuning config. The service
stamps each of the user's events with the arm's config version (as it stamps the current
version otherwise), and `apply` learns under the version logged with the event, so the user's
state is exactly a replay under its arm. An arm's config is a config version of its own,
labelled with the experiment and arm (actors/configs.py: never the current one), or the
current version as it was when the experiment started.

Only one running experiment may cover a user: two would each ask for their own config.
Starting one that overlaps a running one (the same segment, or either covering all) is
refused. Names are never reused: an experiment's logged assignments name it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import structlog

from actors.configs import ConfigRegistry
from actors.experiments.definition import DEFAULT_WINDOW, Experiment
from actors.state import UserState
from events.config import TuningConfig
from events.errors import Reason, Rejected
from events.types import Arm
from store.recorder import Recorder

log = structlog.get_logger(__name__)

CURRENT = "current"  # an arm spec: the current config version, as it is
NO_ADJUST = "no-adjust"  # an arm spec: the current config without micro-adjustment


class ExperimentRegistry:
    """The latest version of every experiment. Readers (dispatcher threads, the query loop)
    see immutable values replaced in one assignment; changes take a lock."""

    def __init__(self, recorder: Recorder | None = None) -> None:
        self._recorder = recorder
        self._lock = threading.Lock()
        self._latest: dict[str, Experiment] = {}
        self.running: tuple[Experiment, ...] = ()
        if recorder is not None:
            self.refresh()

    # ------------------------------------------------------------ reading

    def refresh(self) -> None:
        """Read the store again (a query process, a report)."""
        assert self._recorder is not None
        self.load(Experiment.decode(body) for _n, _v, body in self._recorder.experiments())

    def load(self, experiments: Iterable[Experiment]) -> None:
        latest = dict(self._latest)
        for e in experiments:
            if e.name not in latest or latest[e.name].version <= e.version:
                latest[e.name] = e
        self._publish(latest)

    def _publish(self, latest: dict[str, Experiment]) -> None:
        self._latest = latest
        self.running = tuple(e for e in latest.values() if e.running)

    def get(self, name: str) -> Experiment:
        try:
            return self._latest[name]
        except KeyError:
            raise Rejected(Reason.UNKNOWN_KIND, f"no experiment named {name!r}") from None

    def all(self) -> list[Experiment]:
        return sorted(self._latest.values(), key=lambda e: (e.start, e.name))

    def encoded(self) -> list[bytes]:
        """Every latest definition (what the feed sends a query process)."""
        return [e.encode() for e in self._latest.values()]

    # ------------------------------------------------------------ stamping

    def active(self, arm: Arm | None) -> Experiment | None:
        """The experiment of a logged assignment, if it still runs."""
        if arm is None:
            return None
        e = self._latest.get(arm.experiment)
        return e if e is not None and e.running else None

    def arm_for(self, user: str, arm: Arm | None, segment: str | None,
                enrol: bool) -> tuple[int | None, Arm | None]:
        """The config version the user's next event (or ranking) goes by, and its arm:
        the arm of a running experiment the user is in (`arm`: its logged assignment); or,
        with `enrol` (an exposure, which is where assignment happens), the arm a running
        experiment assigns it now; else (None, None): the current config."""
        running = self.running
        if not running:
            return None, None
        e = self.active(arm)
        if e is not None:
            return e.config_of(arm.name), arm
        if enrol:
            for e in running:
                new = e.assign(user, segment)
                if new is not None:
                    return e.config_of(new.name), new
        return None, None

    def ranking_config(self, state: UserState, configs: ConfigRegistry, enrol: bool,
                       last: TuningConfig | None = None) -> tuple[TuningConfig, Arm | None]:
        """The config a query ranks this user by, and its arm: its arm's, or the config of
        its last event (`last`, if the caller has it), unless that was an arm's of an
        experiment that has stopped since (then the current one)."""
        version, arm = self.arm_for(state.user, state.arm, state.segment, enrol)
        if version is not None:
            return configs.get_fresh(version), arm
        config = last or configs.get_fresh(state.config or None)
        if config.label is not None:  # an arm's config, its experiment over
            config = configs.current
        return config, None

    # ------------------------------------------------------------ changes

    def start(self, name: str, arms: list[tuple[str, Any]], configs: ConfigRegistry, *,
              split: list[float] | None = None, control: str | None = None,
              traffic: float = 1.0, segment: str | None = None, primary: str = "ctr",
              guardrails: tuple[str, ...] = ("dwell", "feedback"),
              window: float = DEFAULT_WINDOW, by: str | None = None, why: str | None = None,
              at: float | None = None) -> Experiment:
        """Record a new experiment and start it. `arms`: (name, spec) pairs, where a spec is
        "current", "no-adjust", a config version (int), a `TuningConfig` or a [tuning] table
        as a map (recorded as a labelled version). The first arm is the control unless
        `control` names another; `split` defaults to equal shares."""
        at = time.time() if at is None else at
        with self._lock:
            if name in self._latest:
                raise Rejected(Reason.OUT_OF_RANGE, f"an experiment named {name!r} exists "
                               "(names are never reused: their logged assignments name them)")
            for other in self.running:
                if other.segment is None or segment is None or other.segment == segment:
                    raise Rejected(Reason.OUT_OF_RANGE, f"experiment {other.name!r} is running "
                                   f"on the same users (segment {other.segment or 'all'}); "
                                   "stop it first")
            if len(arms) < 2:  # before the split divides by their number
                raise Rejected(Reason.OUT_OF_RANGE, f"experiment {name!r}: it needs two or "
                               "more arms with distinct names")
            shares = split or [1.0 / len(arms)] * len(arms)
            draft = Experiment(name=name, version=1, arms=tuple((a, 1) for a, _ in arms),
                               split=tuple(shares), control=control or arms[0][0], start=at,
                               traffic=traffic, segment=segment, primary=primary,
                               guardrails=tuple(guardrails), window=window)  # validates
            versions = tuple((arm, _config_version(configs, name, arm, spec))
                             for arm, spec in arms)
            experiment = replace(draft, arms=versions, audit=_audit("start", at, by, why))
            self._save(experiment)
        log.warning("experiment.started", experiment=name, arms=dict(versions), by=by)
        return experiment

    def ramp(self, name: str, traffic: float, *, by: str | None = None,
             why: str | None = None, at: float | None = None) -> Experiment:
        at = time.time() if at is None else at
        with self._lock:
            e = self.get(name)
            if not e.running:
                raise Rejected(Reason.OUT_OF_RANGE, f"experiment {name!r} has stopped")
            changed = e.ramped(traffic, _audit("ramp", at, by, why, traffic=traffic))
            self._save(changed)
        log.warning("experiment.ramped", experiment=name, traffic=traffic, by=by)
        return changed

    def stop(self, name: str, *, by: str | None = None, why: str | None = None,
             at: float | None = None) -> Experiment:
        at = time.time() if at is None else at
        with self._lock:
            e = self.get(name)
            if not e.running:
                raise Rejected(Reason.OUT_OF_RANGE, f"experiment {name!r} has stopped already")
            changed = e.stopped(at, _audit("stop", at, by, why))
            self._save(changed)
        log.warning("experiment.stopped", experiment=name, by=by)
        return changed

    def _save(self, e: Experiment) -> None:
        # the version names who, when and why: the table is its own audit trail
        if self._recorder is not None and not self._recorder.save_experiment(
                e.name, e.version, e.encode()):
            raise Rejected(Reason.OUT_OF_RANGE, f"experiment {e.name!r} version {e.version} "
                           "was recorded meanwhile by another writer")
        self._publish({**self._latest, e.name: e})


def _audit(action: str, at: float, by: str | None, why: str | None, **more: Any) -> dict:
    return {"action": action, "at": at, "by": by, "why": why, **more}


def _config_version(configs: ConfigRegistry, experiment: str, arm: str, spec: Any) -> int:
    label = f"experiment {experiment} arm {arm}"
    if spec == CURRENT:
        return configs.current.version
    if spec == NO_ADJUST:
        current = configs.current
        segments = {k: replace(v, personal=False) for k, v in current.segments.items()}
        return configs.register(replace(current, segments=segments), label).version
    if isinstance(spec, dict):  # a [tuning] table, from a file or an admin request
        spec = TuningConfig.from_map({"version": 1, "dim": configs.current.dim, **spec})
    if isinstance(spec, TuningConfig):
        return configs.register(spec, label).version
    if isinstance(spec, int) and not isinstance(spec, bool):
        return configs.get(spec).version  # refused if unknown
    raise Rejected(Reason.WRONG_TYPE, f"arm {arm!r}: a config is {CURRENT!r}, {NO_ADJUST!r}, "
                   "a version number or a tuning config")
