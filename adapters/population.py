"""A simulated population with known tastes, for measuring what data hygiene buys.

Humans have a hidden preference vector theta and browse in sessions hours apart: they see
items (impressions), click some with probability sigmoid(theta . x - 1), dwell on what they
clicked for a time that grows with their affinity, and sometimes scroll or hover. On top of
that, the noise hygiene is for:

- tabs left open: some clicks land on an item the user does not care about and are followed
  by a dwell of 2 to 12 hours;
- skewed client clocks: some users' devices are hours off; every event also has a delivery
  delay, a few of them several seconds, so events arrive out of order;
- bots: users that click at machine pace, with near-zero dwell or metronome-regular
  intervals, and scrapers that declare themselves (the `a` flag).

`Population.events()` gives every event in arrival order with `received` set (the service
stamps it from the broker); `agreement()` scores learned weights against a user's true taste.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from actors.learning import sigmoid
from events.types import Event

T0 = 1.7e9


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


@dataclass
class Population:
    humans: int = 100
    bots: int = 10
    sessions: int = 6  # per human
    views: int = 25  # impressions per session
    dim: int = 8
    seed: int = 0
    tab_left_open: float = 0.06  # share of clicks on an unwanted item left open for hours
    skewed_clocks: float = 0.3  # share of humans whose device clock is hours off
    late_delivery: float = 0.05  # share of events delivered 2-4 s late
    items: np.ndarray = field(init=False)
    tastes: dict[str, np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        self.items = rng.normal(size=(400, self.dim))
        self.held_out = rng.normal(size=(200, self.dim))
        self.tastes = {f"human{u}": rng.normal(size=self.dim) * 1.5
                       for u in range(self.humans)}
        self._rng = rng

    def agreement(self, user: str, w: np.ndarray) -> float:
        """Rank agreement (Spearman) on held-out items of learned weights (bias first) with
        the user's true taste."""
        return spearman(self.held_out @ w[1:], self.held_out @ self.tastes[user])

    def events(self) -> list[Event]:
        out: list[Event] = []
        for user, theta in self.tastes.items():
            out.extend(self._human(user, theta))
        for b in range(self.bots):
            out.extend(self._bot(f"bot{b}", b % 3))
        out.sort(key=lambda e: (e.received, e.id))
        return out

    # ------------------------------------------------------------ humans

    def _human(self, user: str, theta: np.ndarray) -> list[Event]:
        rng = self._rng
        skew = rng.choice([-1, 1]) * rng.uniform(2, 9) * 3600 if (
            rng.random() < self.skewed_clocks) else 0.0
        norm = float(np.linalg.norm(theta))
        t = T0 + rng.uniform(0, 3600)
        out: list[Event] = []
        n = 0

        def emit(true_t: float, kind: str, item: int, sid: str, **fields) -> None:
            nonlocal n
            n += 1
            delay = rng.exponential(0.3)
            if rng.random() < self.late_delivery:
                delay += rng.uniform(2, 4)
            out.append(Event(id=f"{user}-{n}", user=user, t=round(true_t + skew, 3),
                             received=round(true_t + delay, 3), kind=kind,
                             item=f"item{item}", x=self.items[item], session=sid, **fields))

        for s in range(self.sessions):
            t += rng.exponential(6 * 3600) + 1800
            sid = f"{user}-s{s}-tab{rng.integers(2)}"
            for _ in range(self.views):
                t += rng.uniform(3, 12)
                item = int(rng.integers(len(self.items)))
                x = self.items[item]
                affinity = float(theta @ x) / norm
                emit(t, "impression", item, sid)
                if rng.random() < self.tab_left_open:  # an unwanted click, the tab left open
                    emit(t + 1.5, "click", item, sid)
                    emit(t + rng.uniform(2, 12) * 3600, "dwell", item, sid,
                         dwell=rng.uniform(2, 12) * 3600)
                    continue
                if rng.random() >= sigmoid(float(theta @ x) - 1.0):
                    if rng.random() < 0.2:
                        emit(t + 1.0, "hover", item, sid,
                             hover=float(np.exp(0.3 * affinity + 0.4 * rng.normal())))
                    continue
                emit(t + rng.uniform(0.5, 2.5), "click", item, sid)
                dwell = float(np.exp(2.5 + 0.7 * affinity + 0.5 * rng.normal()))
                emit(t + 3 + dwell, "dwell", item, sid, dwell=dwell)
                if rng.random() < 0.5:
                    emit(t + 3 + dwell / 2, "scroll", item, sid,
                         depth=sigmoid(affinity + 0.5 * rng.normal()))
                t += dwell
        return out

    # ------------------------------------------------------------ bots

    def _bot(self, user: str, style: int) -> list[Event]:
        """style 0: fast clicker with near-zero dwells; 1: metronome; 2: declared scraper."""
        rng = self._rng
        t = T0 + rng.uniform(0, 3600)
        out = []
        for n in range(300):
            item = int(rng.integers(len(self.items)))
            t += 0.05 if style == 0 else 2.0 if style == 1 else rng.uniform(1, 5)
            kind, fields = ("dwell", {"dwell": 0.02}) if style == 0 and n % 2 else ("click", {})
            out.append(Event(id=f"{user}-{n}", user=user, t=t, received=t + 0.1, kind=kind,
                             item=f"item{item}", x=self.items[item], automated=style == 2,
                             **fields))
        return out


def build_store(path: str | Path, *, users: int, events: int, dim: int = 8,
                seed: int = 0) -> None:
    """A synthetic store of `events` logged clicks and impressions spread over `users`, written
    straight into the log (valid, self-contained logged events with gap-free seqs), for the
    operators' benchmarks and the streaming tests. Much faster than ingest; nothing applied."""
    from actors.configs import ConfigRegistry
    from events.codec import encode_logged_event
    from events.config import TuningConfig
    from store.recorder import StoredEvent, open_recorder

    rng = np.random.default_rng(seed)
    items = rng.normal(size=(256, dim))
    recorder = open_recorder(path)
    try:
        ConfigRegistry(recorder, TuningConfig(version=1, dim=dim))
        per_user = events // users
        batch: list[StoredEvent] = []
        for u in range(users):
            user = f"user{u:06d}"
            t = T0 + u
            for seq in range(1, per_user + 1):
                t += float(rng.exponential(40.0))
                item = int(rng.integers(len(items)))
                event = Event(id=f"{user}-{seq}", user=user, t=t, received=t + 0.2,
                              kind="click" if seq % 3 == 0 else "impression",
                              item=f"item{item}", x=items[item], config=1)
                batch.append(StoredEvent(user, seq, event.id, encode_logged_event(event)))
                if len(batch) >= 20_000:
                    recorder.append(batch)
                    batch = []
        if batch:
            recorder.append(batch)
    finally:
        recorder.close()
