"""Tuning configuration: versioned, stored append-only, referenced by every logged event.

A `TuningConfig` version holds the feature dimension and one `SegmentConfig` per segment
(`default` always present). Replay uses the version recorded with each event, or, for a
counterfactual, another config given on request.

A stored config names the schema of its encoding (`schema`). A field missing from a stored
body takes the default it had at that schema (`SEGMENT_DEFAULTS`), never today's default, so
that a change of defaults cannot silently change how an old version learns.
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
EXPLORE_POLICIES = ("none", "epsilon", "thompson")  # actors/exploration.py
CENTURY = 100 * 365 * 86400.0
_NON_NUMERIC = frozenset(
    {"optimizer", "prior", "hygiene", "late_policy", "outlier_rule", "outlier_action",
     "normalize", "segment_model", "personal", "log_exposures", "explore",
     "adaptive_bounds", "item_effects"}
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
    # a new user's rates start (1 + warmup) times higher and settle as it learns: the boost
    # halves by its `warmup_events`-th learning event (schema 3; cold start, README "Defaults
    # on any stream")
    warmup: float = 1.0
    warmup_events: float = 10.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    # time fades preferences toward the prior w0 with this half-life (event time). Schema 3:
    # a century, i.e. time alone fades nothing and new evidence does, through the bounded
    # rates. A shorter one makes a result depend on the calendar span of the stream and did
    # not follow drift faster (README "Defaults on any stream"); set one to let an absent
    # user's tastes fade (from 14 days at schema 1)
    half_life: float = CENTURY
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
    # the segment model's and item effects' fading with time (schema 3: a century, as
    # `half_life`; schema 2: a year; schema 1: 60 days)
    segment_half_life: float = CENTURY
    # the floor of the segment model's Adagrad rate: what lets it follow a population whose
    # tastes change after millions of events (schema 3, from 1e-4)
    segment_lr_min: float = 0.001
    # the micro-adjustment itself: false freezes the users' own weights (they rank by the
    # segment model and the prior alone, and still teach the segment model): the control arm
    # of an experiment that asks "does the micro-adjustment help?" (README "Measuring the
    # effect")
    personal: bool = True
    # log every ranking of this segment's users as an exposure, as if each query said `l`
    log_exposures: bool = False
    # exploration of logged rankings (actors/exploration.py): "none", "epsilon" (a random
    # slate with probability `epsilon`) or "thompson" (weights sampled around the user's,
    # spread `explore_scale` shrinking with evidence; propensities from `explore_samples`
    # draws). An exploring segment logs every ranking, with its candidates.
    explore: str = "none"
    epsilon: float = 0.05
    explore_scale: float = 0.5
    explore_samples: int = 200
    # scale each user's max_step and window_budget by the steadiness of its updates
    # (actors/learning.py, "Adaptive bounds"); off: the bounds as set
    adaptive_bounds: bool = False
    # item effects (actors/segment_model.py): the segment model also learns a bias per item,
    # its appeal beyond its features (Adagrad at `item_lr`; at most `max_items` items, the
    # least recently learned forgotten first), stamped with the rest of its score
    item_effects: bool = True  # schema 2 (README "Learning quality")
    item_lr: float = 0.4
    max_items: int = 200_000


# The encoding's schema. Changing a SegmentConfig default needs a new schema: bump
# CONFIG_SCHEMA and add its row below; earlier rows are never edited, except that a new field
# gets, in every earlier row, the value that keeps the old behaviour (what a body of that
# schema, which cannot name the field, meant). A new field whose default is that value
# (`personal`, `log_exposures`, the exploration settings) needs no new schema.
# tests/test_config_schema.py checks that the current row equals the dataclass's defaults.
CONFIG_SCHEMA = 3
# Bodies written before the `schema` key existed (they hold every field of their time).
LEGACY_SCHEMA = 1
SEGMENT_DEFAULTS: dict[int, dict[str, Any]] = {
    1: {
        "optimizer": "rmsprop", "lr": 0.05, "lr_min": 0.01, "lr_max": 0.12, "warmup": 0.0,
        "warmup_events": 10.0, "beta1": 0.9,
        "beta2": 0.999, "eps": 1e-08, "half_life": 1209600.0, "l2": 0.03, "max_step": 1.0,
        "window": 3600.0, "window_budget": 10.0, "impression_importance": 0.2,
        "click_importance": 1.0, "dwell_importance": 1.0, "scroll_importance": 1.0,
        "hover_importance": 0.5, "feedback_importance": 1.0, "dwell_scale": 30.0,
        "hover_scale": 5.0, "prior": None, "hygiene": True, "lateness": 5.0,
        "late_policy": "apply", "skew_tolerance": 2.0, "max_skew": 86400.0,
        "session_timeout": 1800.0, "impression_timeout": 30.0, "bot_max_rate": 5.0,
        "bot_burst": 30.0, "bot_short_dwell": 0.1, "bot_short_dwell_streak": 8,
        "bot_regular_cv": 0.05, "bot_regular_min": 20, "outlier_rule": "z", "outlier_z": 3.5,
        "outlier_iqr": 3.0, "outlier_action": "drop", "dwell_max": 7200.0, "hover_max": 120.0,
        "normalize": True, "norm_slope": 1.0, "freq_power": 0.5, "recent_window": 300.0,
        "segment_model": True, "segment_lr": 0.02, "segment_half_life": 5184000.0,
        "segment_lr_min": 1e-4,
        "personal": True, "log_exposures": False, "explore": "none", "epsilon": 0.05,
        "explore_scale": 0.5, "explore_samples": 200, "adaptive_bounds": False,
        "item_effects": False, "item_lr": 0.4, "max_items": 200_000,
    },
    # item effects on, and the segment model's half-life a year: chosen on the first half of
    # MovieLens-100k (log loss 0.6134 -> 0.5745 there), reported on the second (README)
    2: {},
}
SEGMENT_DEFAULTS[2] = {**SEGMENT_DEFAULTS[1], "item_effects": True,
                       "segment_half_life": 365 * 86400.0}
# a new user's rates doubled at first (warmup 1, halved by its 10th event: first-half log loss
# 0.5743 -> 0.5732, a user's first 10 ratings AUC 0.6863 -> 0.6963); no fading with time (a
# century), and a floor under the segment model's rate: chosen so that
# the same events give the same result whatever calendar they span (MovieLens-100k stretched
# 10x and 40x in time, a simulated population active every minute or every week) and so that
# the segment model follows a flip of the population's tastes (scripts/bench_drift.py); first
# half of MovieLens-100k log loss 0.5745 -> 0.5743, README "Defaults on any stream"
SEGMENT_DEFAULTS[3] = {**SEGMENT_DEFAULTS[2], "half_life": CENTURY,
                       "segment_half_life": CENTURY, "segment_lr_min": 0.001,
                       "warmup": 1.0, "warmup_events": 10.0}


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
    # what this version is for when it is not the service's own: an experiment arm's config
    # ("experiment <name> arm <arm>") is labelled, and never becomes the current config
    label: str | None = None
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
        """The stored form: every field, and the schema whose defaults fill absent ones."""
        body = {
            "schema": CONFIG_SCHEMA,
            "version": self.version,
            "dim": self.dim,
            "segments": {k: asdict(v) for k, v in self.segments.items()},
        }
        if self.label is not None:  # only when set: an unlabelled body encodes as it did
            body["label"] = self.label
        return body

    def encode(self) -> bytes:
        return msgpack.packb(self.to_map(), use_bin_type=True)

    @classmethod
    def from_map(cls, obj: dict[str, Any], *, stored: bool = False) -> TuningConfig:
        """Build from a plain map; raises `Rejected`. Absent fields take the defaults of the
        map's `schema`; without one, a map someone writes now (a TOML file: `stored=False`)
        means today's defaults, a stored one (a row, an export: `stored=True`) was written
        before schemas were named: `LEGACY_SCHEMA`."""
        try:
            schema = int(obj.get("schema", LEGACY_SCHEMA if stored else CONFIG_SCHEMA))
            defaults = SEGMENT_DEFAULTS.get(schema)
            if defaults is None:
                raise Rejected(Reason.UNKNOWN_CONFIG, f"config schema {schema} is unknown here "
                               f"(this version knows {sorted(SEGMENT_DEFAULTS)})")
            known = {f.name for f in fields(SegmentConfig)}
            segments = {}
            for name, body in dict(obj.get("segments") or {"default": {}}).items():
                unknown = set(body) - known
                if unknown:
                    raise Rejected(
                        Reason.UNKNOWN_CONFIG, f"segment {name!r}: unknown keys {sorted(unknown)}"
                    )
                body = {**defaults, **body}  # the schema's defaults, not the dataclass's
                missing = known - body.keys()
                if missing:  # never a dataclass default in silence
                    raise Rejected(Reason.UNKNOWN_CONFIG, f"config schema {schema} records no "
                                   f"default for {sorted(missing)} (SEGMENT_DEFAULTS)")
                if body.get("prior") is not None:
                    body["prior"] = tuple(float(p) for p in body["prior"])
                segments[name] = SegmentConfig(**body)
            label = obj.get("label")
            return cls(version=int(obj["version"]), dim=int(obj["dim"]), segments=segments,
                       label=None if label is None else str(label))
        except Rejected:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise Rejected(Reason.UNKNOWN_CONFIG, f"invalid tuning config: {exc}") from None

    @classmethod
    def decode(cls, raw: bytes) -> TuningConfig:
        """A stored config (see `from_map`, `stored=True`)."""
        return cls.from_map(msgpack.unpackb(raw, raw=False), stored=True)


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
                             ("explore", EXPLORE_POLICIES),
                             ("outlier_rule", OUTLIER_RULES),
                             ("outlier_action", OUTLIER_ACTIONS)):
            if getattr(s, key) not in allowed:
                raise bad(f"segment {name!r}: {key} must be one of {allowed}")
        if not all(isinstance(b, bool)
                   for b in (s.hygiene, s.normalize, s.segment_model, s.personal,
                             s.log_exposures, s.adaptive_bounds, s.item_effects)):
            raise bad(f"segment {name!r}: hygiene, normalize, segment_model, personal, "
                      "log_exposures are true or false")
        if min(s.session_timeout, s.recent_window, s.dwell_max, s.hover_max) <= 0:
            raise bad(f"segment {name!r}: session_timeout, recent_window, *_max > 0")
        if not (isinstance(s.max_items, int) and s.max_items >= 1 and s.item_lr > 0):
            raise bad(f"segment {name!r}: max_items an integer >= 1, item_lr > 0")
        if not (s.epsilon <= 1 and isinstance(s.explore_samples, int)
                and 1 <= s.explore_samples <= 10_000):
            raise bad(f"segment {name!r}: epsilon in [0, 1], explore_samples in [1, 10000]")
        if not 0 < s.lr_min <= s.lr_max:
            raise bad(f"segment {name!r}: need 0 < lr_min <= lr_max")
        if not (0 <= s.beta1 < 1 and 0 <= s.beta2 < 1):
            raise bad(f"segment {name!r}: betas must be in [0, 1)")
        if min(s.lr, s.eps, s.half_life, s.max_step, s.window, s.window_budget,
               s.segment_lr, s.segment_half_life, s.segment_lr_min, s.warmup_events) <= 0:
            raise bad(f"segment {name!r}: lr, eps, half_life, max_step, window, budget, "
                      "segment_lr, segment_lr_min, segment_half_life > 0")
        if s.prior is not None and len(s.prior) != cfg.dim + 1:
            raise bad(f"segment {name!r}: prior needs dim + 1 = {cfg.dim + 1} entries")
