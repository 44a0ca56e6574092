"""Fencing: the store refuses a batch from a writer whose partition lease has moved on.

In a fleet, a worker owns partitions of the users (events/partitions.py) through leases; each
claim of a partition raises its epoch in the store (`Recorder.claim`). A worker's journal
carries a `Fence`, the partitions it holds with the epoch of each claim, and every batch is
checked inside its own transaction against the store's epochs (`Recorder.append`): a
partition claimed since by another worker (a newer epoch), or never held, fails the batch
with `Fenced` and writes nothing of it. So even a worker that was paused past its lease and
resumes cannot append to a partition that moved: the store, not the lease's timing, keeps one
writer per user.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from events.partitions import partition_of


class Fenced(Exception):
    """A fenced batch touched partitions this writer does not hold (now): nothing of it was
    written. `lost`: partition -> the store's epoch for it (None: never claimed)."""

    def __init__(self, lost: dict[int, int | None], held: dict[int, int]) -> None:
        self.lost = lost
        detail = ", ".join(f"{p} (store epoch {e}, this writer's {held.get(p)})"
                           for p, e in sorted(lost.items()))
        super().__init__(f"fenced: partitions {detail} are not this writer's")


@dataclass
class Fence:
    """The partitions a writer holds: how many there are, and its epoch for each it holds."""

    partitions: int
    epochs: dict[int, int] = field(default_factory=dict)

    def partitions_of(self, users: Iterable[str]) -> set[int]:
        return {partition_of(user, self.partitions) for user in users}
