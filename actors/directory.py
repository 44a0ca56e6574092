"""The directory: which user actors are live; activation on first use, passivation when idle.

A user's actor is created on the first message for that user (it rebuilds its state from the
latest snapshot and the events after it before handling anything). The directory bounds how
many actors are live (least recently used first out) and passivates actors idle for longer
than `idle_timeout`: a passivated actor writes a snapshot and stops, and costs only that.

While an actor passivates, messages for its user wait here; once it has stopped they go to a
fresh actor. So there is never more than one actor, and one writer, per user.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import structlog
from pykka import ActorRef

from actors.messages import Passivate

log = structlog.get_logger(__name__)


class Directory:
    def __init__(
        self,
        factory: Callable[[str], ActorRef],
        *,
        max_live: int = 200_000,
        idle_timeout: float = 600.0,
    ) -> None:
        self._factory = factory
        self.max_live = max_live
        self.idle_timeout = idle_timeout
        self._lock = threading.Lock()
        self._live: OrderedDict[str, ActorRef] = OrderedDict()  # least recently used first
        self._passivating: dict[str, list[Any]] = {}  # user -> messages held meanwhile
        self._suspended: set[str] = set()  # held until `resume`, even after the actor stopped
        self._stopped_suspended: set[str] = set()
        self._all_stopped = threading.Condition(self._lock)
        self.activations = 0
        self.passivations = 0

    def __len__(self) -> int:
        return len(self._live)

    def tell(self, user: str, message: Any) -> None:
        """Deliver `message` to the user's actor, activating it if needed."""
        now = time.monotonic()
        with self._lock:
            waiting = self._passivating.get(user)
            if waiting is not None:
                waiting.append(message)
                return
            ref = self._live.get(user)
            if ref is None:
                ref = self._activate(user)
            else:
                self._live.move_to_end(user)
            ref.actor_inbox.touched = now
            ref.tell(message)

    def touch(self, user: str) -> None:
        """Mark a live user as used now (a query answered without a message)."""
        ref = self._live.get(user)
        if ref is not None:
            ref.actor_inbox.touched = time.monotonic()

    def _activate(self, user: str) -> ActorRef:
        over = len(self._live) + 1 - self.max_live
        if over > 0:  # evict a little more than needed, so that eviction is not per message
            self._passivate_lru(over + self.max_live // 100)
        ref = self._factory(user)
        self._live[user] = ref
        self.activations += 1
        return ref

    def _passivate_lru(self, count: int) -> None:
        for _ in range(min(count, len(self._live))):
            user, ref = self._live.popitem(last=False)
            self._passivating[user] = []
            ref.tell(Passivate())

    def stopped(self, user: str) -> None:
        """Called by a user actor when it has stopped (passivated or failed)."""
        with self._lock:
            if user in self._suspended:  # messages wait for `resume`
                self._stopped_suspended.add(user)
                self._all_stopped.notify_all()
                return
            waiting = self._passivating.pop(user, None)
            if waiting is None:  # stopped without being asked (a failure)
                self._live.pop(user, None)
            else:
                self.passivations += 1
            if waiting:
                ref = self._activate(user)
                for message in waiting:
                    ref.tell(message)
            self._all_stopped.notify_all()  # (cheap: passivations are not the hot path)

    def passivate_where(self, chosen: Callable[[str], bool], timeout: float = 60.0, *,
                        snapshot: bool = True) -> bool:
        """Passivate the live actors of the users `chosen` accepts and wait until they have
        stopped (a fleet's worker giving up a partition; `snapshot=False`: one it lost, whose
        writes the store refuses now). Messages for them meanwhile go to fresh actors."""
        with self._lock:
            doomed = [user for user in self._live if chosen(user)]
            for user in doomed:
                ref = self._live.pop(user)
                self._passivating[user] = []
                ref.tell(Passivate(snapshot=snapshot))
            return self._all_stopped.wait_for(
                lambda: not any(user in self._passivating for user in doomed), timeout)

    def suspend(self, user: str, timeout: float = 60.0) -> bool:
        """Stop the user's actor WITHOUT a snapshot (after its in-flight writes) and hold every
        message for the user until `resume`: nothing of the user is written meanwhile (an
        erasure runs in between). False if the actor did not stop in time."""
        with self._lock:
            if not self._all_stopped.wait_for(lambda: user not in self._passivating, timeout):
                return False
            self._passivating[user] = []
            self._suspended.add(user)
            ref = self._live.pop(user, None)
            if ref is None:
                return True
            ref.tell(Passivate(snapshot=False))
            return self._all_stopped.wait_for(lambda: user in self._stopped_suspended, timeout)

    def resume(self, user: str) -> None:
        """Deliver what was held for a suspended user (to a fresh actor)."""
        with self._lock:
            self._suspended.discard(user)
            self._stopped_suspended.discard(user)
            waiting = self._passivating.pop(user, [])
            if waiting:
                ref = self._activate(user)
                for message in waiting:
                    ref.tell(message)
            if not self._live and not self._passivating:
                self._all_stopped.notify_all()

    def passivate_idle(self) -> int:
        """Passivate actors idle for longer than `idle_timeout`; returns how many."""
        deadline = time.monotonic() - self.idle_timeout
        count = 0
        with self._lock:
            for ref in self._live.values():
                if ref.actor_inbox.touched > deadline:
                    break  # the rest are more recently used
                count += 1
            self._passivate_lru(count)
        return count

    def passivate_all(self, timeout: float = 60.0) -> bool:
        """Passivate every live actor and wait until all have stopped (a clean shutdown)."""
        with self._lock:
            self._passivate_lru(len(self._live))
            return self._all_stopped.wait_for(
                lambda: not self._live and not self._passivating, timeout
            )
