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
LATE_POLICIES = ("apply", "drop")
OUTLIER_RULES = ("z", "iqr")
OUTLIER_ACTIONS = ("drop", "clip")
_NON_NUMERIC = frozenset(
    {"optimizer", "prior", "hygiene", "late_policy", "outlier_rule", "outlier_action",
     "normalize", "segment_model"}
)


@dataclass(frozen=True, slots=True)
class SegmentConfig:
    """How one segment's users learn. Times are event-time seconds.

    Learning-rate bounds follow the seed guide's ordering: the more responsive a segment, the
    tighter its bounds (see README "Tuning").
    """

    # defaults chosen on MovieLens-100k (scripts/bench_quality.py; README "Learning quality")
    optimizer: str = "rmsprop"
    lr: float = 0.05  # base rate; the per-coordinate rate is lr / (sqrt(v_hat) + eps)
    lr_min: float = 0.01  # AdaBound-style bounds on the per-coordinate rate
    lr_max: float = 0.12
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    half_life: float = 14 * 86400.0  # preferences fade toward the prior w0 with this half-life
    l2: float = 0.03  # pull toward w0 in the gradient: what users share is the segment's
    max_step: float = 1.0  # bound on the L2 norm of one event's step
    window: float = 3600.0  # moving-window movement budget: at most `window_budget` ...
    window_budget: float = 10.0  # ... of L2 movement per `window` seconds (leaky bucket)
    # engagement signal -> (target y, importance); see actors/hygiene.py and README
    impression_importance: float = 0.2  # an impression not clicked in time is a weak negative
    click_importance: float = 1.0
    dwell_importance: float = 1.0
    scroll_importance: float = 1.0
    hover_importance: float = 0.5
    feedback_importance: float = 1.0
    dwell_scale: float = 30.0  # without segment statistics: y = 1 - exp(-dwell / dwell_scale)
    hover_scale: float = 5.0  # without segment statistics: y = 0.5 min(1, hover / hover_scale)
    prior: tuple[float, ...] | None = None  # w0, bias first; None = zeros
    # data hygiene (README "Data hygiene"); hygiene=False learns from every event at once, raw
    hygiene: bool = True
    lateness: float = 5.0  # events out of order by up to this (event time) are reordered
    late_policy: str = "apply"  # an event later than that: "apply" at the frontier, or "drop"
    skew_tolerance: float = 2.0  # a clock offset within this is delivery delay, not skew
    max_skew: float = 86400.0  # a larger offset is delayed delivery (offline queue, backfill)
    session_timeout: float = 1800.0  # a longer gap starts a new session
    impression_timeout: float = 30.0  # an impression not engaged within this is a negative
    bot_max_rate: float = 5.0  # user actions per second sustained ...
    bot_burst: float = 30.0  # ... beyond a burst of this many marks a bot
    bot_short_dwell: float = 0.1  # dwell (seconds) below this ...
    bot_short_dwell_streak: int = 8  # ... this many times in a row marks a bot
    bot_regular_cv: float = 0.05  # inter-action intervals this regular (std / mean) ...
    bot_regular_min: int = 20  # ... after at least this many intervals mark a bot
    outlier_rule: str = "z"  # "z": robust z-score of the log value; "iqr": Tukey fences
    outlier_z: float = 3.5  # |z| beyond this is an outlier (Iglewicz-Hoaglin)
    outlier_iqr: float = 3.0  # fences at q1 - k IQR and q3 + k IQR (log space)
    outlier_action: str = "drop"  # or "clip" to the bound
    dwell_max: float = 7200.0  # until the segment has statistics: longer dwell is an outlier
    hover_max: float = 120.0  # likewise for hover
    normalize: bool = True  # dwell/hover y = sigmoid(norm_slope z) against segment statistics
    norm_slope: float = 1.0
    freq_power: float = 0.5  # importance *= min(1, segment median / user's count) ** power
    recent_window: float = 300.0  # the recent-window counts cover this many seconds
    # the segment model (actors/segment_model.py): one shared model per segment, learned
    # jointly with its users' own; a user's score of an item = segment score + own score
    segment_model: bool = True
    # its rate (Adagrad: lr / sqrt(sum of squared gradients), at most lr). Slow on purpose:
    # where users share little, a fast shared model drowns their own (README "Segment model")
    segment_lr: float = 0.02
    segment_half_life: float = 60 * 86400.0  # population tastes fade slower than a user's


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
        nums = [getattr(s, f.name) for f in fields(s) if f.name not in _NON_NUMERIC]
        if not all(isinstance(n, int | float) and math.isfinite(n) and n >= 0 for n in nums):
            raise bad(f"segment {name!r}: every number must be finite and >= 0")
        for key, allowed in (("optimizer", OPTIMIZERS), ("late_policy", LATE_POLICIES),
                             ("outlier_rule", OUTLIER_RULES),
                             ("outlier_action", OUTLIER_ACTIONS)):
            if getattr(s, key) not in allowed:
                raise bad(f"segment {name!r}: {key} must be one of {allowed}")
        if not all(isinstance(b, bool) for b in (s.hygiene, s.normalize, s.segment_model)):
            raise bad(f"segment {name!r}: hygiene, normalize, segment_model are true or false")
        if min(s.session_timeout, s.recent_window, s.dwell_max, s.hover_max) <= 0:
            raise bad(f"segment {name!r}: session_timeout, recent_window, *_max > 0")
        if not 0 < s.lr_min <= s.lr_max:
            raise bad(f"segment {name!r}: need 0 < lr_min <= lr_max")
        if not (0 <= s.beta1 < 1 and 0 <= s.beta2 < 1):
            raise bad(f"segment {name!r}: betas must be in [0, 1)")
        if min(s.lr, s.eps, s.half_life, s.max_step, s.window, s.window_budget,
               s.segment_lr, s.segment_half_life) <= 0:
            raise bad(f"segment {name!r}: lr, eps, half_life, max_step, window, budget, "
                      "segment_lr, segment_half_life > 0")
        if s.prior is not None and len(s.prior) != cfg.dim + 1:
            raise bad(f"segment {name!r}: prior needs dim + 1 = {cfg.dim + 1} entries")
