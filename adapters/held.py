"""Events waiting for their item: the catalog race, resolved by a bounded grace period.

Content upserts and events travel on separate streams, so a publisher that upserts an item
and then tracks a click on it may see the click arrive first. Such an event (no `x`, item not
in the catalog yet) is held here, unacknowledged (JetStream still has it), until the item
arrives or `grace` seconds pass; then it is released, or refused with `missing_field`.

A user's later events wait behind its held one, so a user's events reach its actor in the
order they arrived. Memory is bounded by `max_held` events; beyond it, `hold` says no and the
caller hands the message back to JetStream for a later delivery.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from events.types import Event

Lookup = Callable[[str], np.ndarray | None]


class HeldEvents:
    def __init__(self, grace: float = 10.0, max_held: int = 10_000) -> None:
        self.grace = grace
        self.max_held = max_held
        self._by_user: dict[str, deque[tuple[float, Event, Any]]] = {}
        self.count = 0
        self.held_total = 0  # events ever held (the counters `admin.stats` shows)
        self.released_total = 0
        self.expired_total = 0

    def __len__(self) -> int:
        return self.count

    def waiting(self, user: str) -> bool:
        """Does this user have held events (so that a new one must queue behind them)?"""
        return user in self._by_user

    def hold(self, event: Event, token: Any, now: float) -> bool:
        """Hold `event` (with the caller's `token`, its message) until `now + grace`; False if
        the bound is reached."""
        if self.count >= self.max_held:
            return False
        queue = self._by_user.get(event.user)
        if queue is None:
            queue = self._by_user[event.user] = deque()
        queue.append((now + self.grace, event, token))
        self.count += 1
        self.held_total += 1
        return True

    def release(self, lookup: Lookup, now: float) -> tuple[list, list]:
        """What can go on: (ready, expired). `ready` are (event with its features, token) in
        each user's order; `expired` are (event, token) whose item never came within the grace
        period. A user's queue moves only from its head, so order is kept."""
        ready: list[tuple[Event, Any]] = []
        expired: list[tuple[Event, Any]] = []
        for user in list(self._by_user):
            queue = self._by_user[user]
            while queue:
                deadline, event, token = queue[0]
                x = event.x if event.x is not None or not event.is_interaction else lookup(
                    event.item)
                if x is None and deadline > now:
                    break
                queue.popleft()
                self.count -= 1
                if x is None:
                    expired.append((event, token))
                    self.expired_total += 1
                else:
                    ready.append((event if event.x is not None else event._replace(x=x), token))
                    self.released_total += 1
            if not queue:
                del self._by_user[user]
        return ready, expired

    def drain(self, chosen: Callable[[str], bool] | None = None) -> list[tuple[Event, Any]]:
        """Everything held (at shutdown: handed back to JetStream), or what the users
        `chosen` accepts have held (a fleet's worker giving up their partition)."""
        users = [u for u in self._by_user if chosen is None or chosen(u)]
        out = [(event, token) for u in users for _, event, token in self._by_user.pop(u)]
        self.count -= len(out)
        return out
