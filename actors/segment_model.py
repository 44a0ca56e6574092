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

Item effects (`SegmentConfig.item_effects`): what a segment's users share about an item itself,
its appeal beyond its features, is a bias b_i per item, learned with the same joint step: p =
sigmoid(w_s . x + b_i + w_u . x), b_i -= item_lr / sqrt(G_i) * a (p - y), G_i the item's running
sum of squared gradients (Adagrad), decayed toward 0 with `segment_half_life` in event time
between its updates. It is part of the stamped score b (so a user's state stays a function of
its log) and of a query's scores; an item never learned about scores by its features alone.
At most `max_items` items are kept per segment: the least recently learned go first.

In a fleet (adapters/fleet) each worker learns from its own users' steps, and the workers
exchange what they learned every fraction of a second (`take_delta`, `add_delta`): each adds
the others' changes to its own, as one process would have summed them (weights, Adagrad sums,
item biases and sums; step counts add up, times take the latest). Measured in the quality
harness: 2 workers lose 0.0075 AUC on MovieLens-100k without it, 0.0003 merging every 1,000
ratings (`bench quality --workers`).

This model is not the truth of anything: it is learned from the logs and checkpointed
(`Recorder.save_segment_models`) by the service every 30 s and on shutdown. A crash loses its
last seconds of learning, never a user's exactness, since what each user learned with is in
that user's log.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

import msgpack
import numpy as np
import structlog

from actors.item_effects import ItemEffects
from actors.kernel import biased_dot
from actors.learning import Step, learn_segment, own_weights, sigmoid
from actors.state import SnapshotError, UserState, decode_state, encode_state
from events.config import SegmentConfig, TuningConfig

log = structlog.get_logger(__name__)

ITEMS_SUFFIX = "\x1fitems"  # a checkpoint row of a segment's item effects
_ITEM_LOG_MAX = 100_000  # changes kept for the feed's readers (each reads every 0.1 s) before a
# reader behind it takes a full dump: about 6 MB of (segment, item) pairs at most


def _added(state: UserState | None, change: dict, segment: str) -> UserState:
    """`state` plus another process's change of a segment model's weights and sums."""
    if state is None:
        state = UserState(f"segment:{segment}")
    fields = {}
    for name in ("w", "m", "v"):
        d = np.frombuffer(change[name], "<f8")
        now = getattr(state, name)
        fields[name] = d.copy() if now.shape != d.shape else now + d
    return state._replace(steps=state.steps + change["steps"],
                          t_last=max(state.t_last, change["t"]), **fields)


def model_config(config: TuningConfig, segment: str) -> TuningConfig:
    """The segment model's own learning settings, from the segment's config: Adagrad (its
    rates fall as the population's evidence grows, and never exceed `segment_lr`), a light L2
    (the users' shrinkage is for their own parts), no movement budget (thousands of users move
    it), no hygiene (its input has been through the users' own). Its rate falls with the
    evidence down to `segment_lr_min`: a floor, so that it still follows a change after
    millions of events."""
    seg = config.segment(segment)
    own = SegmentConfig(optimizer="adagrad", lr=seg.segment_lr,
                        lr_min=min(seg.segment_lr_min, seg.segment_lr),
                        lr_max=seg.segment_lr,  # a careful start: never above the base rate
                        half_life=seg.segment_half_life, l2=1e-4, window_budget=1e9, warmup=0.0,
                        hygiene=False, segment_model=False)
    return TuningConfig(version=config.version, dim=config.dim, segments={"default": own})


class SegmentModels:
    """The segment models of one service. Thread-safe: users of one segment may run on
    different dispatcher workers, and queries read on their callers' threads. A reader sees
    an immutable state (replaced in one assignment), so scoring takes no lock."""

    def __init__(self) -> None:
        self._states: dict[str, UserState] = {}
        # segment -> its item effects (actors/item_effects.py)
        self._items: dict[str, ItemEffects] = {}
        self._item_log: list[tuple[str, str]] = []  # (segment, item) learned, for the feed
        self._item_log_base = 0  # how many entries were trimmed from its front
        self._configs: dict[tuple[int, str], TuningConfig] = {}
        self._lock = threading.Lock()
        self.steps = 0  # learned since start (stats)
        self.changes = 0  # steps learned here plus changes added from a fleet's others
        # a fleet's exchange: the states at the last `take_delta` (or as remote changes
        # moved them), and each item learned since, with its bias and sum before
        self._base: dict[str, UserState] = {}
        self._item_base: dict[tuple[str, str], tuple[float, float]] = {}
        self.sharing = False  # kept only when a fleet's worker exchanges deltas

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
        return 0.0 if w is None else biased_dot(w, x)

    def item_bias(self, segment: str, item: str | None) -> float:
        items = self._items.get(segment)
        bias = None if items is None else items.get(item)
        return 0.0 if bias is None else bias

    def item_biases(self, segment: str, items: Sequence[str]) -> np.ndarray | None:
        """The candidates' item effects (0 for an unknown item), None if none are known."""
        known = self._items.get(segment)
        if not known:
            return None
        return known.biases(items)

    def stamp(self, segment: str, x: np.ndarray, config: TuningConfig,
              item: str | None = None) -> float | None:
        """The score an interaction is logged with (`Event.base`): None where the segment
        has no segment model; with item effects, the item's bias included. The user actor and
        the quality harness both stamp with this."""
        seg = config.segment(segment)
        if not seg.segment_model:
            return None
        if seg.item_effects:
            return self.score(segment, x) + self.item_bias(segment, item)
        return self.score(segment, x)

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
        seg = config.segment(segment)
        with self._lock:
            state = self._states.get(segment) or UserState(f"segment:{segment}")
            for step in learned:
                if seg.item_effects and step.item is not None:
                    bias = self._learn_item(segment, step, state, seg)
                    # the joint prediction (positional: _replace costs microseconds)
                    step = Step(*step[:11], step.score + bias, step.item)
                state = learn_segment(state, step, own)
            self._states[segment] = state
            self.steps += len(learned)
            self.changes += len(learned)

    def _learn_item(self, segment: str, step: Step, state: UserState,
                    seg: SegmentConfig) -> float:
        """The item's side of the joint step (under the lock); returns its bias before it."""
        items = self._items.get(segment)
        if items is None:
            items = self._items[segment] = ItemEffects()
        if self.sharing and (segment, step.item) not in self._item_base:
            slot = items.index.get(step.item)
            self._item_base[(segment, step.item)] = (0.0, 0.0) if slot is None else (
                float(items.bias[slot]), float(items.sums[slot]))
        slot, bias = items.fade(step.item, step.t, seg.segment_half_life, seg.max_items)
        w = state.w
        shared = 0.0 if w.shape[0] != step.x.shape[0] + 1 else float(
            w[0] + w[1:] @ step.x)
        g = step.importance * (sigmoid(shared + bias + step.score) - step.y)
        items.step(slot, bias, g, seg.item_lr)
        self._item_log.append((segment, step.item))
        if len(self._item_log) > _ITEM_LOG_MAX:  # bounded: a reader behind it takes a dump
            self._item_log_base += len(self._item_log)
            self._item_log = []
        return bias

    def item_changes(self, cursor: int) -> tuple[int, dict[str, dict[str, float]] | None]:
        """The item effects learned since `cursor` (a position in the change log), and the
        new cursor; None for the changes when the log no longer reaches back that far (then
        the caller takes `dump_items`)."""
        with self._lock:
            end = self._item_log_base + len(self._item_log)
            if cursor < self._item_log_base:
                return end, None
            changed: dict[str, dict[str, float]] = {}
            for segment, item in self._item_log[cursor - self._item_log_base:]:
                items = self._items.get(segment)
                bias = None if items is None else items.get(item)
                if bias is not None:
                    changed.setdefault(segment, {})[item] = bias
            return end, changed

    def dump_items(self) -> dict[str, dict[str, float]]:
        with self._lock:
            return {segment: items.as_map() for segment, items in self._items.items()}

    def load_items(self, biases: dict[str, dict[str, float]], *, replace: bool = False) -> None:
        """Item effects from the feed (a query process: biases only) or a checkpoint."""
        with self._lock:
            for segment, items in biases.items():
                known = self._items.get(segment)
                if known is None:
                    known = self._items[segment] = ItemEffects()
                if replace:
                    known.clear()
                for item, bias in items.items():
                    known.set(item, bias)

    # ------------------------------------------------------------ a fleet's exchange

    def start_sharing(self) -> None:
        """From now on, keep what `take_delta` needs (what was loaded is nobody's change)."""
        with self._lock:
            self.sharing = True
            self._base = dict(self._states)
            self._item_base = {}

    def take_delta(self) -> dict[str, dict]:
        """What this process learned since the last call (its own steps only: changes added
        from others are not sent back), msgpack-ready; {} if nothing."""
        with self._lock:
            if not self.sharing:
                raise RuntimeError("start_sharing() first")
            out: dict[str, dict] = {}
            for segment, state in self._states.items():
                base = self._base.get(segment)
                if base is state or state.w.shape[0] == 0:
                    continue
                delta: dict = {"steps": state.steps - (base.steps if base else 0),
                               "t": state.t_last}
                for name in ("w", "m", "v"):
                    now = getattr(state, name)
                    before = None if base is None else getattr(base, name)
                    change = now if before is None or before.shape != now.shape else (
                        now - before)
                    delta[name] = np.ascontiguousarray(change, "<f8").tobytes()
                out[segment] = delta
            self._base = dict(self._states)
            for (segment, item), (bias0, sum0) in self._item_base.items():
                items = self._items.get(segment)
                slot = None if items is None else items.index.get(item)
                if slot is None:
                    continue  # evicted meanwhile
                out.setdefault(segment, {}).setdefault("items", []).append(
                    [item, float(items.bias[slot]) - bias0, float(items.sums[slot]) - sum0,
                     float(items.times[slot])])
            self._item_base = {}
            return out

    def add_delta(self, delta: dict[str, dict], max_items: int | None = None) -> None:
        """Add another process's `take_delta` to these models (and to the bases, so that it
        is not sent on as this process's own learning)."""
        with self._lock:
            self.changes += 1
            for segment, change in delta.items():
                if "w" in change:
                    state, base = self._states.get(segment), self._base.get(segment)
                    self._states[segment] = _added(state, change, segment)
                    # nothing learned here since the last take: nothing of ours to send
                    self._base[segment] = self._states[segment] if base is state else _added(
                        base, change, segment)
                rows = change.get("items")
                if rows:
                    items = self._items.get(segment)
                    if items is None:
                        items = self._items[segment] = ItemEffects()
                    for item, d_bias, d_sum, t in rows:
                        slot = items.index.get(item)
                        if slot is None:
                            items.set(item, 0.0, max_items)
                            slot = items.index[item]
                            items.times[slot] = t
                        items.bias[slot] += d_bias
                        items.sums[slot] += d_sum
                        items.times[slot] = max(float(items.times[slot]), t)
                        key = (segment, item)
                        if key in self._item_base:
                            bias0, sum0 = self._item_base[key]
                            self._item_base[key] = (bias0 + d_bias, sum0 + d_sum)
                        self._item_log.append(key)  # the query processes hear of it

    # ------------------------------------------------------------ checkpoints

    def dump(self) -> dict[str, bytes]:
        """The models' weights (what the feed sends every 0.1 s: small)."""
        with self._lock:
            return {name: encode_state(state) for name, state in self._states.items()}

    def checkpoint(self) -> dict[str, bytes]:
        """Weights and item effects (with their Adagrad sums and times), for the store."""
        out = self.dump()
        with self._lock:  # copies only: encoding 1M items takes ~0.5 s, outside the lock
            copies = {segment: items.snapshot() for segment, items in self._items.items()}
        for segment, copy in copies.items():
            out[f"{segment}{ITEMS_SUFFIX}"] = ItemEffects.encode(copy)
        return out

    def load(self, saved: dict[str, bytes]) -> None:
        """Restore checkpoints; an undecodable one is logged and starts from zero."""
        with self._lock:
            self.changes += 1  # the feed sends the query processes the loaded models
            for name, raw in saved.items():
                try:
                    if name.endswith(ITEMS_SUFFIX):
                        self._items[name[:-len(ITEMS_SUFFIX)]] = ItemEffects.decode(raw)
                        # no change log reaches back past a load: readers take all of them
                        self._item_log_base += len(self._item_log) + 1
                        self._item_log = []
                    else:
                        self._states[name] = decode_state(raw)
                except (SnapshotError, ValueError, TypeError, msgpack.UnpackException) as exc:
                    log.warning("segment_model.undecodable", segment=name, error=str(exc))

    def summary(self) -> dict[str, dict]:
        """Per segment: steps learned (all time) and the weights, for stats."""
        return {name: {"steps": s.steps, "w": [round(float(v), 4) for v in s.w]}
                for name, s in sorted(self._states.items())}
