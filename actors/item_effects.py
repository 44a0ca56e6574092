"""One segment's item effects: a bias per item, in flat arrays (actors/segment_model.py).

Per item: its bias, the running sum of its squared gradients (Adagrad) and the event time of
its last update, each in a float64 array at the item's slot (`index`: item -> slot). Measured
against the first version's OrderedDict of three-float lists (`microtune bench items`): a
third of the memory per item, and nothing for the garbage collector to walk (a dict of str to
int holds no tracked containers), where a million lists added 170 ms to every full collection.

At most `max_items` are kept: a new item beyond that first drops the least recently learned
1% (at least one) at once, by their last-learned stamp, so that a full table pays one
partial sort per 1% of its size instead of a search per new item.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import msgpack
import numpy as np

EVICT_SHARE = 0.01
_FORMAT = 2  # the checkpoint: [2, items, bias, sums, times] (a map item -> list before)


class ItemEffects:
    __slots__ = ("bias", "free", "index", "items", "stamp", "sums", "times", "touched")

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.items: list[str | None] = []  # slot -> item (None: free)
        self.free: list[int] = []
        self.bias = np.zeros(0)
        self.sums = np.zeros(0)
        self.times = np.zeros(0)
        self.touched = np.zeros(0, dtype=np.int64)  # when each slot was last learned
        self.stamp = 0

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, item: object) -> bool:
        return item in self.index

    def get(self, item: str | None) -> float | None:
        slot = None if item is None else self.index.get(item)
        return None if slot is None else float(self.bias[slot])

    def biases(self, items: Sequence[str]) -> np.ndarray:
        """The candidates' biases (0 for an item never learned)."""
        get = self.index.get
        slots = np.fromiter((get(i, -1) for i in items), dtype=np.int64, count=len(items))
        known = slots >= 0
        out = np.zeros(len(items))
        out[known] = self.bias[slots[known]]
        return out

    def fade(self, item: str, t: float, half_life: float, max_items: int) -> tuple[int, float]:
        """An item about to learn at event time t: its slot (a new one for a new item) and its
        bias, faded toward 0 since its last update. Marks it the most recently learned."""
        slot = self.index.get(item)
        if slot is None:
            slot = self._allocate(item, max_items)
            self.times[slot] = t
            bias = 0.0
        else:
            bias = float(self.bias[slot])
            last = float(self.times[slot])
            if t > last:
                bias *= math.pow(0.5, (t - last) / half_life)
                self.times[slot] = t
        self.stamp += 1
        self.touched[slot] = self.stamp
        return slot, bias

    def step(self, slot: int, bias: float, gradient: float, rate: float) -> None:
        """Adagrad on the (faded) bias: b -= rate / sqrt(G) g, G += g^2."""
        total = float(self.sums[slot]) + gradient * gradient
        self.sums[slot] = total
        self.bias[slot] = bias - rate / math.sqrt(total) * gradient if total > 0.0 else bias

    def set(self, item: str, bias: float, max_items: int | None = None) -> None:
        """A bias from the feed (a query process keeps biases only)."""
        slot = self.index.get(item)
        if slot is None:
            slot = self._allocate(item, max_items)
            self.sums[slot] = 0.0
            self.times[slot] = -math.inf
        self.bias[slot] = bias

    def clear(self) -> None:
        self.__init__()

    def as_map(self) -> dict[str, float]:
        return {item: b for item, b in zip(self.items, self.bias.tolist(), strict=False)
                if item is not None}

    # ------------------------------------------------------------ slots

    def _allocate(self, item: str, max_items: int | None) -> int:
        if max_items is not None and len(self.index) >= max_items:
            self._evict(max(1, int(len(self.index) * EVICT_SHARE)))
        if self.free:
            slot = self.free.pop()
            self.items[slot] = item
        else:
            slot = len(self.items)
            if slot == self.bias.shape[0]:
                self._grow(max(64, slot + slot // 2))
            self.items.append(item)
        self.index[item] = slot
        self.bias[slot] = 0.0
        self.sums[slot] = 0.0
        return slot

    def _grow(self, size: int) -> None:
        for name in ("bias", "sums", "times", "touched"):
            old = getattr(self, name)
            new = np.zeros(size, dtype=old.dtype)
            new[:old.shape[0]] = old
            setattr(self, name, new)

    def _evict(self, count: int) -> None:
        live = np.fromiter(self.index.values(), dtype=np.int64, count=len(self.index))
        if count < live.shape[0]:
            live = live[np.argpartition(self.touched[live], count - 1)[:count]]
        for slot in live.tolist():
            del self.index[self.items[slot]]
            self.items[slot] = None
            self.free.append(slot)

    # ------------------------------------------------------------ checkpoints

    def snapshot(self) -> tuple:
        """What `encode` needs, copied (cheap: a list and four arrays) so that a caller can
        encode outside its lock."""
        n = len(self.items)
        return (list(self.items), self.bias[:n].copy(), self.sums[:n].copy(),
                self.times[:n].copy(), self.touched[:n].copy())

    @staticmethod
    def encode(snapshot: tuple) -> bytes:
        """[2, items, bias, sums, times], least recently learned first, float64 bytes."""
        items, bias, sums, times, touched = snapshot
        live = np.array([i for i, item in enumerate(items) if item is not None], np.int64)
        order = live[np.argsort(touched[live], kind="stable")] if live.size else live
        return msgpack.packb(
            [_FORMAT, [items[i] for i in order.tolist()], bias[order].tobytes(),
             sums[order].tobytes(), times[order].tobytes()], use_bin_type=True)

    @classmethod
    def decode(cls, raw: bytes) -> ItemEffects:
        """A checkpoint row: this format, or the first one (a map item -> [bias, sum, t],
        least recently learned first)."""
        body = msgpack.unpackb(raw, raw=False)
        table = cls()
        if isinstance(body, dict):
            rows: Iterable = ((item, e[0], e[1], e[2]) for item, e in body.items())
        elif isinstance(body, list) and body and body[0] == _FORMAT:
            _v, items, bias, sums, times = body
            rows = zip(items, np.frombuffer(bias).tolist(), np.frombuffer(sums).tolist(),
                       np.frombuffer(times).tolist(), strict=True)
        else:
            raise ValueError("not an item-effects checkpoint")
        for item, b, s, t in rows:
            slot = table._allocate(str(item), None)
            table.bias[slot], table.sums[slot], table.times[slot] = b, s, t
            table.stamp += 1
            table.touched[slot] = table.stamp
        return table
