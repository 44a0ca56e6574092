"""The journal: group commit of many actors' appends in one transaction.

As Akka Persistence journals do, one writer thread takes every write request that is waiting,
commits them together (one transaction, one fsync), then reports to each requester. Under load
the batches grow by themselves: while one commit runs, the next batch gathers.

A refused batch (a duplicate event id or a taken seq, found by the database's constraints) is
split: the requests that collide are told so, the others are committed again. A batch holding a
value the database refuses for good (`StoreRefused`: NUL in PostgreSQL text, say) is bisected
until the refused requests are found; they are told so, the rest is committed. A database that
is unreachable (`StoreUnavailable`) is retried with backoff; nothing is dropped and nothing is
reported as written before it is. A fenced journal (a fleet's worker, store/fencing.py) whose
batch touches a partition claimed since by another worker tells the requests of that partition
`Fenced` (their actors stop), drops the partition from its fence, and commits the rest.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from store.fencing import Fence, Fenced
from store.recorder import (
    AppendConflict,
    Recorder,
    Snapshot,
    StoredEvent,
    StoreRefused,
    StoreUnavailable,
)

log = structlog.get_logger(__name__)

Done = Callable[[BaseException | None], None]


@dataclass(slots=True)
class WriteRequest:
    """Rows of one requester (one actor), all committed together or not at all.

    `done(None)` is called on the journal thread after the commit; `done(AppendConflict)` with
    only this request's collisions if the database refused them; `done(StoreRefused)` if the
    database can never store this request. It must be quick and must not block: an actor's
    callback only tells its own mailbox.
    """

    events: Sequence[StoredEvent]
    snapshots: Sequence[Snapshot] = ()
    done: Done = field(default=lambda _exc: None)


@dataclass(slots=True)
class JournalStats:
    commits: int = 0
    requests: int = 0
    events: int = 0
    snapshots: int = 0
    conflicts: int = 0
    refused: int = 0  # requests the database refused for good
    retries: int = 0
    fenced: int = 0  # requests refused because their partition moved to another writer


_STOP = object()


class Journal:
    """Group-committing writer over a `Recorder`; thread-safe `write`, one writer thread."""

    def __init__(
        self,
        recorder: Recorder,
        *,
        max_batch_rows: int = 5000,
        linger: float = 0.001,
        max_backoff: float = 5.0,
        fence: Fence | None = None,
    ) -> None:
        self.recorder = recorder
        self.fence = fence  # a fleet's worker: the partitions it holds, checked per batch
        self.max_batch_rows = max_batch_rows
        # After the first request of a batch, wait this long for more (as Kafka's linger.ms):
        # fewer, larger commits and fewer thread wake-ups; it adds at most this to latency.
        self.linger = linger
        self.max_backoff = max_backoff
        self.stats = JournalStats()
        # told every committed group's events, in commit order, on the journal thread after
        # the commit (the query process's feed): must be quick and must not block
        self.on_commit: Callable[[list[StoredEvent]], None] | None = None
        # told each commit's events and seconds (the metrics' histograms), on this thread
        self.on_timing: Callable[[int, float], None] | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._carry: list[WriteRequest] = []
        self.thread = threading.Thread(target=self._run, name="microtune-journal", daemon=True)
        self._closed = False
        self.thread.start()

    def write(self, request: WriteRequest) -> None:
        if self._closed:
            raise RuntimeError("journal is closed")
        self._queue.put(request)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until everything written before this call is committed."""
        done = threading.Event()
        self.write(WriteRequest((), (), lambda _exc: done.set()))
        if not done.wait(timeout):
            raise TimeoutError("journal flush timed out")

    def close(self, timeout: float = 30.0) -> None:
        """Commit what is queued, then stop the writer thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self.thread.join(timeout)

    # ------------------------------------------------------------ writer thread

    def _run(self) -> None:
        stopping = False
        while not stopping or self._carry:
            batch, stopping = self._gather(stopping)
            if batch:
                self._commit(batch)

    def _gather(self, stopping: bool) -> tuple[list[WriteRequest], bool]:
        batch, self._carry = self._carry, []
        rows = sum(len(r.events) + len(r.snapshots) for r in batch)
        block = not batch and not stopping
        while rows < self.max_batch_rows:
            try:
                item = self._queue.get(block=block)
            except queue.Empty:
                break
            if block and self.linger:
                time.sleep(self.linger)
            block = False
            if item is _STOP:
                stopping = True
                continue
            batch.append(item)
            rows += len(item.events) + len(item.snapshots)
        return batch, stopping

    def _commit(self, batch: list[WriteRequest]) -> None:
        backoff = 0.05
        while batch:
            rows = [e for r in batch for e in r.events]
            snaps = [s for r in batch for s in r.snapshots]
            began = time.perf_counter()
            try:
                self.recorder.append(rows, snaps, self.fence)
            except AppendConflict as conflict:
                batch = self._split(batch, conflict)
                continue
            except Fenced as fenced:
                batch = self._fenced(batch, fenced)
                continue
            except StoreRefused as refused:
                if len(batch) == 1:
                    self.stats.refused += 1
                    log.error("journal.refused", error=str(refused),
                              events=len(batch[0].events))
                    self._report(batch[0], refused)
                    return
                half = len(batch) // 2  # bisect: one bad request must not hold the others
                self._commit(batch[:half])
                batch = batch[half:]
                continue
            except StoreUnavailable as exc:
                self.stats.retries += 1
                log.warning("journal.retry", error=str(exc), backoff=backoff,
                            requests=len(batch))
                time.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            if self.on_timing is not None:
                try:
                    self.on_timing(len(rows), time.perf_counter() - began)
                except Exception:  # an observer's bug must not stop the journal
                    log.exception("journal.on_timing_failed")
            self.stats.commits += 1
            self.stats.requests += len(batch)
            self.stats.events += len(rows)
            self.stats.snapshots += len(snaps)
            if self.on_commit is not None and rows:
                try:
                    self.on_commit(rows)
                except Exception:  # an observer's bug must not stop the journal
                    log.exception("journal.on_commit_failed")
            for request in batch:
                self._report(request, None)
            return

    def _split(self, batch: list[WriteRequest], conflict: AppendConflict) -> list[WriteRequest]:
        """Report the colliding requests; return the others to commit again."""
        keep = []
        for request in batch:
            mine_ids = {
                (e.user, e.event_id) for e in request.events
            } & conflict.duplicate_ids
            mine_seqs = {(e.user, e.seq) for e in request.events} & conflict.taken_seqs
            if mine_ids or mine_seqs:
                self.stats.conflicts += 1
                self._report(request, AppendConflict(mine_ids, mine_seqs))
            else:
                keep.append(request)
        if len(keep) == len(batch):  # the constraint fired but nothing matched: commit alone
            first, keep = keep[0], keep[1:]
            self._carry.extend(keep)
            return [first]
        return keep

    def _fenced(self, batch: list[WriteRequest], fenced: Fenced) -> list[WriteRequest]:
        """Report the requests of the lost partitions; return the others to commit again."""
        fence = self.fence
        assert fence is not None
        for partition in fenced.lost:
            fence.epochs.pop(partition, None)
        log.error("journal.fenced", partitions=sorted(fenced.lost), error=str(fenced))
        keep = []
        for request in batch:
            users = {e.user for e in request.events} | {s.user for s in request.snapshots}
            if fence.partitions_of(users) & fenced.lost.keys():
                self.stats.fenced += 1
                self._report(request, fenced)
            else:
                keep.append(request)
        return keep

    @staticmethod
    def _report(request: WriteRequest, exc: BaseException | None) -> None:
        try:
            request.done(exc)
        except Exception:  # a requester's bug must not stop the journal
            log.exception("journal.callback_failed")
