"""The feed: what the write side tells its query processes, after each commit.

Queries are served by processes of their own (adapters/query_process.py), so that a query never
waits for the interpreter lock behind ingest. Each keeps replicas of users' states, rebuilt by
the same `apply` from the committed log, as an event-sourced read model is built from its
events. This module carries the log to them: the journal hands every committed group of events
to `Feed.rows` (store.journal.Journal.on_commit), and one sender thread per query process
writes them to its pipe as one frame. Only committed events travel, in commit order.

The write side never waits for a reader: a sender's backlog is bounded (`max_rows`); past it,
the backlog is dropped and a `GAP` frame sent instead, after which the reader drops its
replicas and rebuilds them from the store on demand (the store is the truth, the feed a
shortcut). A frame is a msgpack array of messages `[kind, payload]`:

- `ROWS`: `[[user, seq, event_id, body], ...]` committed events, in commit order
- `GAP`: events were dropped
- `FORGET`: a user erased (its replica must go)
- `ITEMS`: `[[item, features bytes], ...]` catalog upserts, once stored
- `MODELS`: `{segment: encoded state}` the segment models (sent when they moved, at most
  every `models_every` seconds: queries add them to the user's own weights)
- `EXPERIMENTS`: `[encoded definition, ...]` every experiment's latest version, after a change
- `ITEM_EFFECTS`: `[full, {segment: {item: bias}}]` the segment models' item effects learned
  since the last frame (`full`: all of them, replacing what the reader has)
- `PARTITIONS`: `[count, [partition, ...]]` a fleet's worker tells its query processes which
  partitions of the users it holds, again at every renewal of its leases (adapters/fleet):
  they answer the queries of those partitions only, and only while told so

After a `GAP` the reader reads the store again for what the dropped messages carried (the
catalog's items, the experiments) as well as for its replicas.
"""

from __future__ import annotations

import collections
import threading
from multiprocessing.connection import Connection
from typing import Any

import msgpack
import numpy as np
import structlog

from actors.segment_model import SegmentModels
from store.recorder import StoredEvent

log = structlog.get_logger(__name__)

ROWS, GAP, FORGET, ITEMS, MODELS, EXPERIMENTS = "r", "g", "f", "i", "m", "x"
ITEM_EFFECTS, PARTITIONS = "e", "p"

_F64 = np.dtype("<f8")


class FeedSender:
    """One query process's feed: a bounded backlog and the thread that writes it out."""

    def __init__(self, conn: Connection, models: SegmentModels, *, max_rows: int = 500_000,
                 models_every: float = 0.1, name: str = "feed") -> None:
        self.conn = conn
        self._models = models
        self._max_rows = max_rows
        self._models_every = models_every
        self._backlog: collections.deque = collections.deque()
        self._partitions: list | None = None  # the newest PARTITIONS, not yet sent
        self._rows = 0  # rows in the backlog
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self.gaps = 0  # backlogs dropped (stats)
        self.broken = False  # the pipe failed: the reader is gone
        self._thread = threading.Thread(target=self._run, name=f"microtune-{name}", daemon=True)
        self._thread.start()

    def put(self, kind: str, payload: Any, rows: int = 0) -> None:
        """Queue a message (behind what waits)."""
        if self.broken:
            return
        with self._lock:
            if rows and self._rows + rows > self._max_rows:
                # the reader cannot keep up: drop the backlog, tell it so
                self._backlog.clear()
                self._backlog.append((GAP, None))
                self._rows = 0
                self.gaps += 1
                return
            self._backlog.append((kind, payload))
            self._rows += rows
        self._wake.set()

    def put_partitions(self, payload: list) -> None:
        """A fleet's worker's partitions: ahead of whatever waits (the query process stops
        answering them if they do not come in time), and only the newest (a worker handing
        off several partitions tells after each: an older one read last would keep a
        handed-off partition answered). Not part of the backlog, so a dropped backlog keeps
        it."""
        if self.broken:
            return
        with self._lock:
            self._partitions = payload
        self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(5.0)

    def _run(self) -> None:
        sent_steps = -1
        item_cursor = 0
        while not self._closed:
            self._wake.wait(self._models_every)
            self._wake.clear()
            with self._lock:
                messages, self._backlog = list(self._backlog), collections.deque()
                self._rows = 0
                if self._partitions is not None:
                    messages.insert(0, (PARTITIONS, self._partitions))
                    self._partitions = None
            steps = self._models.changes
            if steps != sent_steps:  # before the rows: queries score with the newest
                sent_steps = steps
                messages.insert(0, (MODELS, self._models.dump()))
                item_cursor, changed = self._models.item_changes(item_cursor)
                if changed is None:  # this reader fell behind the change log: all of them
                    messages.insert(1, (ITEM_EFFECTS, [True, self._models.dump_items()]))
                elif changed:
                    messages.insert(1, (ITEM_EFFECTS, [False, changed]))
            if not messages:
                continue
            try:
                self.conn.send_bytes(msgpack.packb(messages, use_bin_type=True))
            except (OSError, ValueError) as exc:  # the reader died or closed its end
                self.broken = True
                log.warning("feed.broken", error=repr(exc))
                return


class Feed:
    """Fan-out to every query process's sender; what the system calls."""

    def __init__(self, models: SegmentModels) -> None:
        self.models = models
        self.senders: list[FeedSender] = []

    def attach(self, conn: Connection, **kw: Any) -> FeedSender:
        sender = FeedSender(conn, self.models, **kw)
        self.senders = [*self.senders, sender]  # replaced, not mutated: readers iterate
        return sender

    def detach(self, sender: FeedSender) -> None:
        self.senders = [s for s in self.senders if s is not sender]
        sender.close()

    def rows(self, rows: list[StoredEvent]) -> None:
        for sender in self.senders:
            sender.put(ROWS, rows, len(rows))

    def forget(self, user: str) -> None:
        for sender in self.senders:
            sender.put(FORGET, user)

    def items(self, items: list[tuple[str, np.ndarray]]) -> None:
        payload = [(item, np.ascontiguousarray(x, _F64).tobytes()) for item, x in items]
        for sender in self.senders:
            sender.put(ITEMS, payload, len(payload))

    def experiments(self, definitions: list[bytes]) -> None:
        """Every experiment's latest definition, after a change (start, ramp, stop)."""
        for sender in self.senders:
            sender.put(EXPERIMENTS, definitions)

    def partitions(self, count: int, held: list[int]) -> None:
        for sender in self.senders:
            sender.put_partitions([count, sorted(held)])

    def close(self) -> None:
        for sender in self.senders:
            sender.close()
        self.senders = []


def decode_frame(data: bytes) -> list[tuple[str, Any]]:
    return msgpack.unpackb(data, raw=False, use_list=True)
