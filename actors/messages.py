"""Messages to user actors and the outcomes they report.

Every message that expects an answer carries a `done` callback instead of a future: the actor
calls it on a dispatcher thread, and the callback only hands the answer over (to an asyncio
loop, a waiting thread, a NATS ack). It must not block.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from events.errors import Rejected
from events.types import Event, Query


class Outcome(NamedTuple):
    """What became of one tracked event."""

    # "moved": the user's partition belongs to another worker of the fleet now (nothing
    # written; the message is the new owner's)
    status: str  # "applied" | "duplicate" | "rejected" | "failed" | "moved"
    seq: int = 0  # the event's seq when applied
    error: Rejected | None = None

    @property
    def ok(self) -> bool:
        """Applied now or before (a repeat): the publisher may ack."""
        return self.status in ("applied", "duplicate")


DUPLICATE = Outcome("duplicate")


class Track(NamedTuple):
    event: Event
    done: Callable[[Outcome], None]


class Rank(NamedTuple):
    query: Query
    done: Callable[[Any], None]  # a Ranking or a Rejected


class Written(NamedTuple):
    """From the journal thread: the actor's in-flight write finished."""

    error: BaseException | None


class SnapshotWritten(NamedTuple):
    seq: int
    error: BaseException | None


class Passivate(NamedTuple):
    """Finish in-flight writes, write a snapshot (if the state moved since the last one) and
    stop. `snapshot=False`: stop without one (the user is about to be erased)."""

    snapshot: bool = True


class Inspect(NamedTuple):
    done: Callable[[Any], None]  # receives the current UserState
