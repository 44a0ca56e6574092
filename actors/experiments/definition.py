"""An experiment's definition, and the deterministic assignment of users to its arms.

An experiment compares arms, each a tuning-config version, on the users it enrols (the unit
is the user). Its definition is recorded append-only: starting, ramping and stopping each
write a new version (`Experiment.version`), with who, when and why (actors/experiments/
registry.py). Nothing about it lives outside the store and the logs.

Assignment (`Experiment.assign`) is a pure function of the experiment's salt and the user id:

    enrolled  <=>  unit(salt, "traffic", user) < traffic
    arm       =    the first arm whose cumulative share exceeds unit(salt, "arm", user)

where unit(...) maps the first 8 bytes of a BLAKE2b digest to [0, 1). The two draws are
independent, so ramping `traffic` up enrols more users without moving anyone between arms,
and the same user lands in the same arm in every process, after every restart and in every
replay. The service logs the assignment on the user's first exposure (events.types.Arm on
the exposure event, then in the user's state), and it sticks: a later ramp down does not
take an enrolled user out, and a user's arm never changes while the experiment runs.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack

from events.errors import Reason, Rejected
from events.types import Arm

# the metrics a report computes from exposures and the outcomes joined to them
# (actors/experiments/attribution.py): name -> what it measures
METRICS: dict[str, str] = {
    "ctr": "click-through per exposure (exposures with a click / exposures)",
    "dwell": "dwell seconds per exposure",
    "feedback": "mean explicit feedback y of the exposures that got some",
    "scroll": "mean scroll depth of the exposures that got some",
}
STATUSES = ("running", "stopped")
DEFAULT_WINDOW = 1800.0  # seconds of event time an outcome without a rid may follow its exposure


def unit(*parts: str) -> float:
    """A uniform number in [0, 1) from the parts, the same on every machine."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


@dataclass(frozen=True, slots=True)
class Experiment:
    name: str
    version: int
    arms: tuple[tuple[str, int], ...]  # (arm name, config version), in split order
    split: tuple[float, ...]  # each arm's share of the enrolled users; sums to 1
    control: str  # the arm the others are compared with
    start: float  # when it started (seconds since the epoch)
    traffic: float = 1.0  # the share of eligible users enrolled (ramped by new versions)
    segment: str | None = None  # enrol only users of this segment (None: everyone)
    primary: str = "ctr"
    guardrails: tuple[str, ...] = ("dwell", "feedback")
    window: float = DEFAULT_WINDOW  # attribution window of outcomes without a rid
    status: str = "running"
    stop: float | None = None
    salt: str = ""  # the assignment's seed; empty: the name
    # the change this version records: who, why, what (start, ramp, stop), when
    audit: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        _validate(self)

    # ------------------------------------------------------------ assignment

    @property
    def running(self) -> bool:
        return self.status == "running"

    def covers(self, segment: str | None) -> bool:
        return self.segment is None or self.segment == (segment or "default")

    def assign(self, user: str, segment: str | None = None) -> Arm | None:
        """The arm this user is in, or None if the experiment does not enrol it (not
        running, another segment, or outside the traffic share)."""
        if not self.running or not self.covers(segment):
            return None
        salt = self.salt or self.name
        if unit(salt, "traffic", user) >= self.traffic:
            return None
        u, cumulative = unit(salt, "arm", user), 0.0
        for (arm, _config), share in zip(self.arms, self.split, strict=True):
            cumulative += share
            if u < cumulative:
                return Arm(self.name, arm, self.version)
        return Arm(self.name, self.arms[-1][0], self.version)  # rounding at the top

    def config_of(self, arm: str) -> int | None:
        return dict(self.arms).get(arm)

    @property
    def shares(self) -> dict[str, float]:
        return {arm: share for (arm, _), share in zip(self.arms, self.split, strict=True)}

    # ------------------------------------------------------------ changes

    def ramped(self, traffic: float, audit: dict[str, Any]) -> Experiment:
        return replace(self, version=self.version + 1, traffic=traffic, audit=audit)

    def stopped(self, at: float, audit: dict[str, Any]) -> Experiment:
        return replace(self, version=self.version + 1, status="stopped", stop=at, audit=audit)

    # ------------------------------------------------------------ encoding

    def to_map(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version,
                "arms": [list(a) for a in self.arms], "split": list(self.split),
                "control": self.control, "start": self.start, "traffic": self.traffic,
                "segment": self.segment, "primary": self.primary,
                "guardrails": list(self.guardrails), "window": self.window,
                "status": self.status, "stop": self.stop, "salt": self.salt,
                "audit": self.audit}

    def encode(self) -> bytes:
        return msgpack.packb(self.to_map(), use_bin_type=True)

    @classmethod
    def from_map(cls, obj: dict[str, Any]) -> Experiment:
        try:
            return cls(name=obj["name"], version=int(obj["version"]),
                       arms=tuple((str(a), int(c)) for a, c in obj["arms"]),
                       split=tuple(float(s) for s in obj["split"]), control=obj["control"],
                       start=float(obj["start"]), traffic=float(obj.get("traffic", 1.0)),
                       segment=obj.get("segment"), primary=obj.get("primary", "ctr"),
                       guardrails=tuple(obj.get("guardrails", ())),
                       window=float(obj.get("window", DEFAULT_WINDOW)),
                       status=obj.get("status", "running"), stop=obj.get("stop"),
                       salt=obj.get("salt", ""), audit=dict(obj.get("audit") or {}))
        except Rejected:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise Rejected(Reason.MALFORMED, f"invalid experiment definition: {exc}") from None

    @classmethod
    def decode(cls, raw: bytes) -> Experiment:
        return cls.from_map(msgpack.unpackb(raw, raw=False))


def _validate(e: Experiment) -> None:
    def bad(msg: str) -> Rejected:
        return Rejected(Reason.OUT_OF_RANGE, f"experiment {e.name!r}: {msg}")

    if not e.name or not e.name.isprintable() or len(e.name) > 128:
        raise bad("the name must be printable text of 1 to 128 characters")
    names = [a for a, _ in e.arms]
    if len(names) < 2 or len(set(names)) != len(names):
        raise bad("it needs two or more arms with distinct names")
    if len(e.split) != len(names):
        raise bad("give one share per arm")
    if not all(math.isfinite(s) and s > 0 for s in e.split) or abs(sum(e.split) - 1) > 1e-9:
        raise bad(f"the shares must be positive and sum to 1 (they sum to {sum(e.split):g})")
    if e.control not in names:
        raise bad(f"the control arm {e.control!r} is not one of the arms {names}")
    if not 0 < e.traffic <= 1:
        raise bad("traffic must be in (0, 1]")
    for metric in (e.primary, *e.guardrails):
        if metric not in METRICS:
            raise bad(f"unknown metric {metric!r} (known: {', '.join(METRICS)})")
    if not (math.isfinite(e.window) and e.window > 0):
        raise bad("the attribution window must be > 0 seconds")
    if e.status not in STATUSES:
        raise bad(f"status must be one of {STATUSES}")
