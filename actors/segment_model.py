"""The segment model: one small model per segment, learned jointly with its users' own.

A user's weights learn what sets that user apart. What a segment's users share (the genres
most of them like, how often anyone clicks at all) is learned once, here, from all of them:
the structure of Vowpal Wabbit's `-q ug` (shared terms plus per-user terms), split so that
every user's state stays a pure function of that user's log.

- At ingest the user actor stamps on each interaction the model's score of its item,
  b = w_s . x (`Event.base`, logged like the item features), and `apply` learns the user's
  weights on p = sigmoid(b + w_u . x). Replay reads b from the log, whatever the model is now.
- After applying, the actor hands this model the learning steps `apply` took (features,
  target, importance and the user's own score w_u . x), and the model takes its side of the
  same joint step: p = sigmoid(w_s . x + w_u . x). The update is `learning.learn_segment`, the
  same code as the user's, with the segment's `segment_lr` (Adagrad) and
  `segment_half_life`.
- A query scores each candidate by w_s . x + w_u . x.

This model is not the truth of anything: it is learned from the logs and checkpointed
(`Recorder.save_segment_models`) by the service every 30 s and on shutdown. A crash loses its
last seconds of learning, never a user's exactness, since what each user learned with is in
that user's log.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import numpy as np
import structlog

from actors.learning import Step, learn_segment, own_weights
from actors.state import SnapshotError, UserState, decode_state, encode_state
from events.config import SegmentConfig, TuningConfig

log = structlog.get_logger(__name__)

_ONE = np.ones(1)


def model_config(config: TuningConfig, segment: str) -> TuningConfig:
    """The segment model's own learning settings, from the segment's config: Adagrad (its
    rates fall as the population's evidence grows, and never exceed `segment_lr`), a light L2
    (the users' shrinkage is for their own parts), no movement budget (thousands of users move
    it), no hygiene (its input has been through the users' own)."""
    seg = config.segment(segment)
    own = SegmentConfig(optimizer="adagrad", lr=seg.segment_lr,
                        lr_min=min(1e-4, seg.segment_lr),
                        lr_max=seg.segment_lr,  # a careful start: never above the base rate
                        half_life=seg.segment_half_life, l2=1e-4, window_budget=1e9,
                        hygiene=False, segment_model=False)
    return TuningConfig(version=config.version, dim=config.dim, segments={"default": own})


class SegmentModels:
    """The segment models of one service. Thread-safe: users of one segment may run on
    different dispatcher workers, and queries read on their callers' threads. A reader sees
    an immutable state (replaced in one assignment), so scoring takes no lock."""

    def __init__(self) -> None:
        self._states: dict[str, UserState] = {}
        self._configs: dict[tuple[int, str], TuningConfig] = {}
        self._lock = threading.Lock()
        self.steps = 0  # learned since start (stats)

    # ------------------------------------------------------------ reading

    def weights(self, segment: str, dim: int) -> np.ndarray | None:
        """The model's weights (bias first), None if it has not learned at that dimension."""
        state = self._states.get(segment)
        if state is None or state.w.shape[0] != dim + 1:
            return None
        return state.w

    def total(self, state: UserState, config: TuningConfig) -> np.ndarray:
        """The weights a query scores a user's candidates with: the user's own (the prior
        before any learning) plus its segment model's, when the segment uses one."""
        segment = state.segment or "default"
        w = own_weights(state, config)
        if config.segment(segment).segment_model:
            shared = self.weights(segment, config.dim)
            if shared is not None:
                return w + shared
        return w

    def score(self, segment: str, x: np.ndarray) -> float:
        w = self.weights(segment, x.shape[0])
        return 0.0 if w is None else float((w * np.concatenate((_ONE, x))).sum())

    def stamp(self, segment: str, x: np.ndarray, config: TuningConfig) -> float | None:
        """The score an interaction is logged with (`Event.base`): None where the segment
        has no segment model. The user actor and the quality harness both stamp with this."""
        return self.score(segment, x) if config.segment(segment).segment_model else None

    # ------------------------------------------------------------ learning

    def learn(self, segment: str, steps: Iterable[Step], config: TuningConfig) -> None:
        """Take the model's side of the user's learning steps (a trace from `apply`; only
        learning steps carry the user's score)."""
        learned = [step for step in steps if step.score is not None]
        if not learned or not config.segment(segment).segment_model:
            return
        key = (config.version, segment)
        own = self._configs.get(key)
        if own is None:
            own = self._configs[key] = model_config(config, segment)
        with self._lock:
            state = self._states.get(segment) or UserState(f"segment:{segment}")
            for step in learned:
                state = learn_segment(state, step, own)
            self._states[segment] = state
            self.steps += len(learned)

    # ------------------------------------------------------------ checkpoints

    def dump(self) -> dict[str, bytes]:
        with self._lock:
            return {name: encode_state(state) for name, state in self._states.items()}

    def load(self, saved: dict[str, bytes]) -> None:
        """Restore checkpoints; an undecodable one is logged and starts from zero."""
        with self._lock:
            for name, raw in saved.items():
                try:
                    self._states[name] = decode_state(raw)
                except SnapshotError as exc:
                    log.warning("segment_model.undecodable", segment=name, error=str(exc))

    def summary(self) -> dict[str, dict]:
        """Per segment: steps learned (all time) and the weights, for stats."""
        return {name: {"steps": s.steps, "w": [round(float(v), 4) for v in s.w]}
                for name, s in sorted(self._states.items())}
