"""How well each segment learns, as the service runs: what /metrics reports per segment.

Fed with every user's `apply` trace (the user actor, beside the segment model and the alerts):
- the log loss of predictions made before learning (an exponential average over about
  `HORIZON` learning steps) and their AUC over the last `WINDOW` learning steps with a
  binary target (y of 0 or 1; graded targets such as dwell only count in the loss);
- the mean L2 norm of the learning steps (the same average);
- how many events hygiene kept out: a bot's, and outliers (dropped or clipped).

Thread-safe: a segment's users run on different dispatcher threads; a scrape reads a copy.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from actors.learning import Step

HORIZON = 1000  # steps the averages mostly cover (alpha = 1 / HORIZON)
WINDOW = 2000  # binary outcomes the AUC is computed on
_CLIP = 1e-7


@dataclass
class _Segment:
    steps: int = 0
    log_loss: float = math.nan
    step_norm: float = math.nan
    bots: int = 0
    outliers: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=WINDOW))  # (p, y)


class SegmentQuality:
    def __init__(self) -> None:
        self._segments: dict[str, _Segment] = {}
        self._lock = threading.Lock()

    def observe(self, segment: str, steps: Iterable[Step]) -> None:
        alpha = 1.0 / HORIZON
        with self._lock:
            s = self._segments.get(segment)
            if s is None:
                s = self._segments[segment] = _Segment()
            for step in steps:
                verdict = step.verdict
                if verdict == "bot":
                    s.bots += 1
                elif verdict.startswith("outlier"):
                    s.outliers += 1
                if step.p is None or step.y is None or step.step is None:
                    continue  # not a learning step
                p = min(max(step.p, _CLIP), 1.0 - _CLIP)
                loss = -(step.y * math.log(p) + (1.0 - step.y) * math.log(1.0 - p))
                norm = math.sqrt(float(step.step @ step.step))
                if s.steps == 0:
                    s.log_loss, s.step_norm = loss, norm
                else:
                    s.log_loss += alpha * (loss - s.log_loss)
                    s.step_norm += alpha * (norm - s.step_norm)
                s.steps += 1
                if step.y in (0.0, 1.0):
                    s.recent.append((step.p, step.y))

    def snapshot(self) -> dict[str, dict[str, float]]:
        """Per segment: steps, log_loss, auc (NaN without both outcomes), step_norm, bots,
        outliers."""
        with self._lock:
            copies = {name: (s.steps, s.log_loss, s.step_norm, s.bots, s.outliers,
                             list(s.recent)) for name, s in self._segments.items()}
        return {name: {"steps": steps, "log_loss": loss, "auc": _recent_auc(recent),
                       "step_norm": norm, "bots": bots, "outliers": outliers}
                for name, (steps, loss, norm, bots, outliers, recent) in copies.items()}


def _recent_auc(pairs: list[tuple[float, float]]) -> float:
    if not pairs:
        return math.nan
    values = np.array(pairs)
    return auc(values[:, 1], values[:, 0])


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties averaged); NaN without both outcomes.
    The quality harness (adapters/quality.py) scores with this one too."""
    _values, inverse, counts = np.unique(p, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = ((ends - counts + 1 + ends) / 2)[inverse]  # the average rank of each tie group
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if not n_pos or not n_neg:
        return float("nan")
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
