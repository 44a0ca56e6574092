"""Tuning configuration: versioned, stored append-only, referenced by every logged event.

A `TuningConfig` version holds the feature dimension and one `SegmentConfig` per segment
(`default` always present). Replay uses the version recorded with each event, or, for a
counterfactual, another config given on request.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, NamedTuple

import msgpack
import numpy as np

from events.errors import Reason, Rejected

OPTIMIZERS = ("adam", "rmsprop", "adagrad")


@dataclass(frozen=True, slots=True)
class SegmentConfig:
    """How one segment's users learn. Times are event-time seconds.

    Learning-rate bounds follow the seed guide's ordering: the more responsive a segment, the
    tighter its bounds (see README "Tuning").
    """

    optimizer: str = "adam"
    lr: float = 0.1  # base rate; the per-coordinate rate is lr / (sqrt(v_hat) + eps)
    lr_min: float = 0.01  # AdaBound-style bounds on the per-coordinate rate
    lr_max: float = 0.3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    half_life: float = 14 * 86400.0  # preferences fade toward the prior w0 with this half-life
    l2: float = 1e-4  # pull toward w0 in the gradient
    max_step: float = 1.0  # bound on the L2 norm of one event's step
    window: float = 3600.0  # moving-window movement budget: at most `window_budget` ...
    window_budget: float = 10.0  # ... of L2 movement per `window` seconds (leaky bucket)
    # engagement signal -> (target y, importance); issue 4 refines these
    impression_importance: float = 0.2  # an impression is a weak negative
    dwell_scale: float = 30.0  # y = 1 - exp(-dwell / dwell_scale)
    hover_scale: float = 5.0  # y = 0.5 * min(1, hover / hover_scale)
    prior: tuple[float, ...] | None = None  # w0, bias first; None = zeros


class Constants(NamedTuple):
    """A segment's constants as 0-d arrays: numpy multiplies an array by a 0-d array markedly
    faster than by a Python float, and `apply` does so a dozen times per event."""

    beta1: np.ndarray
    one_minus_beta1: np.ndarray
    beta2: np.ndarray
    one_minus_beta2: np.ndarray
    l2: np.ndarray
    eps: np.ndarray
    lr: np.ndarray
    lr_min: np.ndarray
    lr_max: np.ndarray


def _constants(s: SegmentConfig) -> Constants:
    return Constants(*(np.array(float(c)) for c in (
        s.beta1, 1.0 - s.beta1, s.beta2, 1.0 - s.beta2, s.l2, s.eps, s.lr, s.lr_min, s.lr_max)))


@dataclass(frozen=True, slots=True)
class TuningConfig:
    version: int
    dim: int  # item feature dimension; the model adds a bias term, so weights have dim + 1
    segments: dict[str, SegmentConfig] = field(
        default_factory=lambda: {"default": SegmentConfig()}
    )
    _priors: dict[str, np.ndarray] = field(init=False, repr=False, compare=False)
    _constants: dict[str, Constants] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _validate(self)
        priors = {}
        for name, seg in self.segments.items():
            w0 = np.zeros(self.dim + 1) if seg.prior is None else np.array(seg.prior, float)
            w0.flags.writeable = False
            priors[name] = w0
        object.__setattr__(self, "_priors", priors)
        object.__setattr__(
            self, "_constants", {k: _constants(v) for k, v in self.segments.items()}
        )

    def segment(self, name: str | None) -> SegmentConfig:
        return self.segments.get(name or "default") or self.segments["default"]

    def prior(self, name: str | None) -> np.ndarray:
        """The segment's prior weights w0 (cold start), read-only."""
        return self._priors.get(name or "default", self._priors["default"])

    def constants(self, name: str | None) -> Constants:
        return self._constants.get(name or "default", self._constants["default"])

    def with_version(self, version: int) -> TuningConfig:
        return replace(self, version=version)

    def to_map(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "dim": self.dim,
            "segments": {k: asdict(v) for k, v in self.segments.items()},
        }

    def encode(self) -> bytes:
        return msgpack.packb(self.to_map(), use_bin_type=True)

    @classmethod
    def from_map(cls, obj: dict[str, Any]) -> TuningConfig:
        """Build from a plain map (a TOML file, a stored row); raises `Rejected`."""
        try:
            known = {f.name for f in fields(SegmentConfig)}
            segments = {}
            for name, body in dict(obj.get("segments") or {"default": {}}).items():
                unknown = set(body) - known
                if unknown:
                    raise Rejected(
                        Reason.UNKNOWN_CONFIG, f"segment {name!r}: unknown keys {sorted(unknown)}"
                    )
                if body.get("prior") is not None:
                    body = {**body, "prior": tuple(float(p) for p in body["prior"])}
                segments[name] = SegmentConfig(**body)
            return cls(version=int(obj["version"]), dim=int(obj["dim"]), segments=segments)
        except Rejected:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise Rejected(Reason.UNKNOWN_CONFIG, f"invalid tuning config: {exc}") from None

    @classmethod
    def decode(cls, raw: bytes) -> TuningConfig:
        return cls.from_map(msgpack.unpackb(raw, raw=False))


def _validate(cfg: TuningConfig) -> None:
    def bad(msg: str) -> Rejected:
        return Rejected(Reason.OUT_OF_RANGE, f"tuning config v{cfg.version}: {msg}")

    if cfg.version < 1:
        raise bad("version must be >= 1")
    if not 1 <= cfg.dim <= 4096:
        raise bad("dim must be in [1, 4096]")
    if "default" not in cfg.segments:
        raise bad("a 'default' segment is required")
    for name, s in cfg.segments.items():
        nums = [getattr(s, f.name) for f in fields(s) if f.name not in ("optimizer", "prior")]
        if not all(isinstance(n, int | float) and math.isfinite(n) for n in nums):
            raise bad(f"segment {name!r}: every number must be finite")
        if s.optimizer not in OPTIMIZERS:
            raise bad(f"segment {name!r}: optimizer must be one of {OPTIMIZERS}")
        if not 0 < s.lr_min <= s.lr_max:
            raise bad(f"segment {name!r}: need 0 < lr_min <= lr_max")
        if not (0 <= s.beta1 < 1 and 0 <= s.beta2 < 1):
            raise bad(f"segment {name!r}: betas must be in [0, 1)")
        if min(s.lr, s.eps, s.half_life, s.max_step, s.window, s.window_budget) <= 0:
            raise bad(f"segment {name!r}: lr, eps, half_life, max_step, window, budget > 0")
        if s.prior is not None and len(s.prior) != cfg.dim + 1:
            raise bad(f"segment {name!r}: prior needs dim + 1 = {cfg.dim + 1} entries")
