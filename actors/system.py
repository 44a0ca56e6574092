"""The application: store, journal, dispatcher, directory and user actors, wired together.

A thin layer, as in the `eventsourcing` library: it owns the parts and offers the operations
(track, rank, state, replay); the adapters (NATS, command line) sit on top of it.

    with Microtune.open("microtune.db", TuningConfig(version=1, dim=8)) as mt:
        mt.track_many([Event(id="e1", user="alice", t=1.7e9, kind="click", item="a",
                             x=np.ones(8))])
        ranking = mt.rank(Query("alice", (Candidate("a", np.ones(8)),)))
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import msgpack
import structlog

from actors import gc_pauses, runtime
from actors.configs import ConfigRegistry
from actors.directory import Directory
from actors.experiments.registry import ExperimentRegistry
from actors.feed import Feed
from actors.messages import Inspect, Outcome, Rank, Track
from actors.replay import replay_user
from actors.runtime import Dispatcher
from actors.state import UserState
from actors.user import UserActor, UserContext
from events.config import TuningConfig
from events.errors import Reason, Rejected
from events.exposure import exposure_event, new_rid
from events.partitions import DEFAULT_PARTITIONS, partition_of
from events.types import Event, Query, Ranking
from store import lease
from store.catalog import Catalog
from store.fencing import Fence
from store.journal import Journal
from store.recorder import Recorder, open_recorder

log = structlog.get_logger(__name__)

DEFAULT_CONFIG = TuningConfig(version=1, dim=16)


class _Waiter:
    """Collects callbacks' answers for the blocking convenience calls."""

    def __init__(self, count: int) -> None:
        self.results: list[Any] = [None] * count
        self._left = count
        self._cond = threading.Condition()

    def callback(self, index: int) -> Callable[[Any], None]:
        def done(result: Any) -> None:
            with self._cond:
                self.results[index] = result
                self._left -= 1
                if self._left == 0:
                    self._cond.notify_all()

        return done

    def wait(self, timeout: float) -> list[Any]:
        with self._cond:
            if not self._cond.wait_for(lambda: self._left == 0, timeout):
                raise TimeoutError(f"{self._left} answers still missing after {timeout}s")
        return self.results


def behind(query: Query, answer: Ranking | Rejected) -> bool:
    """Is `answer` from a state older than the seq the query asked to read (`min_seq`)?"""
    return (query.min_seq is not None and isinstance(answer, Ranking)
            and answer.seq < query.min_seq)


def not_reached(query: Query, answer: Ranking, waited: float) -> Rejected:
    """The refusal of a query whose `min_seq` was not reached within `waited` seconds."""
    return Rejected(Reason.TIMEOUT, f"seq {query.min_seq} not reached within {waited:g} s "
                    f"(the state is at {answer.seq})", "ms")


class Microtune:
    def __init__(
        self,
        recorder: Recorder,
        config: TuningConfig = DEFAULT_CONFIG,
        *,
        workers: int = 1,
        max_live: int = 200_000,
        idle_timeout: float = 600.0,
        snapshot_every: int = 1000,
        max_batch_rows: int = 5000,
        tune_gc: bool = True,
        fleet: bool = False,
        partitions: int = DEFAULT_PARTITIONS,
    ) -> None:
        if tune_gc:  # process-wide; see actors.runtime.tune_gc
            runtime.tune_gc()
        self.gc_pauses = gc_pauses.watch()  # process-wide: what the collector costs queries
        # The store's single writer for as long as this lives (store/lease.py): a second one,
        # in this process or another, is refused with the holder's pid, host and start time.
        # A fleet's worker (`fleet`) shares the store with the other workers, writing through
        # a fence (the partitions it holds): the store refuses its writes to any other.
        self.lease = lease.acquire(recorder.engine.url, shared=fleet)
        try:
            self.recorder = recorder
            # how many partitions the users are split into: the store's, recorded by the
            # first writer (`partitions` for a new store); the events stream is split by it
            self.partitions = recorder.partitions(partitions)
            self.fence = fence = Fence(self.partitions) if fleet else None
            self.configs = ConfigRegistry(recorder, config)
            self.catalog = Catalog(recorder)
            self.journal = Journal(recorder, max_batch_rows=max_batch_rows, fence=fence)
            self.dispatcher = Dispatcher(workers=workers)
            self.context = UserContext(recorder, self.journal, self.configs, snapshot_every)
            self.context.models.load(recorder.segment_models())
            self.experiments = self.context.experiments = ExperimentRegistry(recorder)
            # who has a log: activating anyone else reads nothing (one pass over the users
            # at start; ~60 bytes a user)
            self.context.known = set(recorder.users())
            self.directory = Directory(
                lambda user: UserActor.start(self.dispatcher, user, self.context),
                max_live=max_live,
                idle_timeout=idle_timeout,
            )
        except BaseException:
            self.lease.release()
            raise
        self.context.on_stopped = self.directory.stopped
        self.feed: Feed | None = None  # to query processes, once one is attached
        self._closed = False

    @classmethod
    def open(cls, store: str | Path, config: TuningConfig = DEFAULT_CONFIG, **kw: Any):
        """Open (or create) a store by SQLAlchemy URL or SQLite path. Raises
        `store.lease.LeaseHeld` if another writer holds it."""
        recorder = open_recorder(store)
        try:
            return cls(recorder, config, **kw)
        except BaseException:
            recorder.close()
            raise

    def __enter__(self) -> Microtune:
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------ asynchronous core

    def track(self, event: Event, done: Callable[[Outcome], None]) -> None:
        """Hand an event to its user's actor; `done(Outcome)` once committed and applied."""
        self.directory.tell(event.user, Track(event, done))

    def rank_now(self, query: Query) -> Ranking | Rejected | None:
        """The answer at once, on this thread, if the user is live (`UserActor.rank_now`);
        None if it is not (then `rank_async` activates it)."""
        actor = self.context.readable.get(query.user)
        if actor is None:
            return None
        self.directory.touch(query.user)
        return actor.rank_now(query)

    def rank_async(self, query: Query, done: Callable[[Ranking | Rejected], None]) -> None:
        """Rank for a live user at once, on this thread; otherwise through the user's actor,
        which activates it."""
        answer = self.rank_now(query)
        if answer is None:
            self.directory.tell(query.user, Rank(query, done))
        else:
            done(answer)

    def open_feed(self) -> Feed:
        """The feed of committed events to query processes (actors/feed.py)."""
        if self.feed is None:
            self.feed = Feed(self.context.models)
            self.journal.on_commit = self.feed.rows
        return self.feed

    def lower_priority(self, nice: int) -> list[int]:
        """Give the ingest threads (the dispatcher's workers and the journal's writer) an
        operating-system priority `nice` steps below the rest of the process, so that on a
        busy machine the processes that answer queries get the CPU first (Linux: threads have
        their own nice value; raising one needs no privilege). Returns the threads' ids it
        changed; elsewhere, or if refused, nothing changes."""
        if nice <= 0 or not sys.platform.startswith("linux"):
            return []
        base = os.getpriority(os.PRIO_PROCESS, 0)
        changed = []
        for thread in [*self.dispatcher.threads, self.journal.thread]:
            try:
                os.setpriority(os.PRIO_PROCESS, thread.native_id, min(19, base + nice))
                changed.append(thread.native_id)
            except (OSError, TypeError) as exc:  # TypeError: a thread not started yet
                log.warning("ingest.priority_unchanged", error=repr(exc))
        return changed

    # ------------------------------------------------------------ blocking conveniences

    def track_many(self, events: Iterable[Event], timeout: float = 60.0) -> list[Outcome]:
        events = list(events)
        waiter = _Waiter(len(events))
        for i, event in enumerate(events):
            self.track(event, waiter.callback(i))
        return waiter.wait(timeout)

    def rank(self, query: Query, timeout: float = 10.0) -> Ranking:
        """Rank, blocking; with `query.min_seq`, from a state at that seq or later (waiting
        up to `timeout`, then `Rejected` with reason `timeout`)."""
        deadline = time.monotonic() + timeout
        waiter = _Waiter(1)
        self.rank_async(query, waiter.callback(0))
        (result,) = waiter.wait(timeout)
        while behind(query, result) and time.monotonic() < deadline:
            time.sleep(0.001)
            result = self.rank_now(query) or result
        if behind(query, result):
            result = not_reached(query, result, timeout)
        if isinstance(result, Rejected):
            raise result
        if result.log:  # asked for, or the segment logs every ranking
            result = self.log_exposure(query, result, timeout)
        return result

    def log_exposure(self, query: Query, ranking: Ranking, timeout: float = 10.0) -> Ranking:
        """Append the exposure of `ranking` to the user's log (README "Measuring the
        effect"): the ranking with its id (`rid`) once committed, or with `log_error`."""
        rid = ranking.rid or new_rid()
        (outcome,) = self.track_many([exposure_event(query, ranking, rid, time.time())],
                                     timeout)
        if outcome.status in ("applied", "duplicate"):  # a retry of a logged query: kept once
            return dataclasses.replace(ranking, rid=rid)
        why = outcome.error.detail if outcome.error is not None else outcome.status
        return dataclasses.replace(ranking, rid=None,
                                   log_error=f"the exposure was not logged: {why}")

    # ------------------------------------------------------------ experiments

    def start_experiment(self, name: str, arms: list[tuple[str, Any]], **kw: Any):
        """Start an experiment (actors/experiments/registry.py: `ExperimentRegistry.start`)."""
        experiment = self.experiments.start(name, arms, self.configs, **kw)
        self._experiments_changed()
        return experiment

    def ramp_experiment(self, name: str, traffic: float, **kw: Any):
        experiment = self.experiments.ramp(name, traffic, **kw)
        self._experiments_changed()
        return experiment

    def stop_experiment(self, name: str, **kw: Any):
        experiment = self.experiments.stop(name, **kw)
        self._experiments_changed()
        return experiment

    def reload_experiments(self) -> bool:
        """Read the configs and experiments again: another writer (a fleet's worker) may
        have changed them in the store. True (and the query processes told) if it did."""
        before = (self.configs.current.version, self.experiments.encoded())
        self.configs.refresh()
        self.experiments.refresh()
        if before == (self.configs.current.version, self.experiments.encoded()):
            return False
        self._experiments_changed()
        return True

    def _experiments_changed(self) -> None:
        if self.feed is not None:  # query processes rank by the arms too
            self.feed.experiments(self.experiments.encoded())

    def state(self, user: str, timeout: float = 10.0) -> UserState:
        """The live state of a user (activating it if needed)."""
        waiter = _Waiter(1)
        self.directory.tell(user, Inspect(waiter.callback(0)))
        (result,) = waiter.wait(timeout)
        if isinstance(result, Rejected):
            raise result
        return result

    def rollback(self, user: str, *, to_seq: int | None = None, to_time: float | None = None,
                 event_id: str | None = None, by: str | None = None, why: str | None = None,
                 t: float | None = None, timeout: float = 60.0) -> Outcome:
        """Append a rollback event: the user's state becomes the replayed state at `to_seq`
        (or at the log prefix up to `to_time`). An event like any other: in the log with who
        and why (the audit), replayed, and itself undone by a rollback to the seq before it."""
        extra = {k: v for k, v in (("by", by), ("why", why), ("tt", to_time)) if v is not None}
        now = time.time()  # an operator's action: its time is when it is made
        event = Event(id=event_id or f"rollback-{uuid.uuid4().hex}", user=user,
                      t=now if t is None else t, kind="rollback", to_seq=to_seq, extra=extra)
        (outcome,) = self.track_many([event], timeout)
        return outcome

    def forget(self, user: str, *, by: str | None = None, why: str | None = None,
               timeout: float = 60.0) -> dict[str, Any]:
        """Erase a user (privacy law): stop its actor without a snapshot, delete every event
        and snapshot, and record an audit entry that names no user. Messages for the user that
        arrive meanwhile are held and then start a new, empty history."""
        if not self.directory.suspend(user, timeout):
            raise TimeoutError(f"the actor of the user did not stop within {timeout}s")
        try:
            at = time.time()
            audit = {"action": "forget", "at": at, "by": by, "why": why}
            self.context.known.discard(user)
            n_events, n_snaps, audit_id = self.recorder.forget(
                user, msgpack.packb(audit, use_bin_type=True))
            if self.feed is not None:  # query processes drop their replica, before any
                self.feed.forget(user)  # event of a new history reaches them
        finally:
            self.directory.resume(user)
        log.warning("user.forgotten", audit_id=audit_id, events=n_events, snapshots=n_snaps)
        return {**audit, "audit_id": audit_id, "events": n_events, "snapshots": n_snaps}

    def replay(self, user: str, **kw: Any) -> UserState:
        """Rebuild a user's state from the log (see actors.replay.replay_user)."""
        return replay_user(self.recorder, self.configs, user, **kw)

    # ------------------------------------------------------------ lifecycle

    def checkpoint(self) -> None:
        """Save the segment models (the service does so every 30 s and on shutdown)."""
        try:
            self.recorder.save_segment_models(self.context.models.checkpoint())
        except Exception as exc:  # a cache: the next checkpoint tries again
            log.warning("segment_model.checkpoint_failed", error=repr(exc))

    # ------------------------------------------------------------ a fleet's partitions

    def take_partitions(self, epochs: dict[int, int]) -> None:
        """Write the users of these partitions from now on, with the epochs of our claims
        (the store refuses an older one). Users another worker created meanwhile are learned
        from the store first (one pass over the users, however many partitions): an actor
        activated for one must read its log."""
        fence = self._require_fence()
        users = [u for u in self.recorder.users() if self._partition(u) in epochs]
        if self.context.known is not None:
            self.context.known.update(users)
        fence.epochs.update(epochs)

    def give_up_partitions(self, partitions: set[int], *, snapshot: bool = True,
                           timeout: float = 60.0) -> bool:
        """Stop the live actors of `partitions` (after a snapshot, unless the partitions are
        already lost: then the store would refuse it) and stop writing them."""
        fence = self._require_fence()
        stopped = self.directory.passivate_where(
            lambda user: self._partition(user) in partitions, timeout, snapshot=snapshot)
        if snapshot:
            self.journal.flush(timeout)
        for partition in partitions:
            fence.epochs.pop(partition, None)
        return stopped

    def _partition(self, user: str) -> int:
        return partition_of(user, self._require_fence().partitions)

    def _require_fence(self) -> Fence:
        if self.fence is None:
            raise RuntimeError("not a fleet's worker: this system holds the whole store")
        return self.fence

    def passivate_all(self, timeout: float = 120.0) -> bool:
        return self.directory.passivate_all(timeout)

    def close(self, timeout: float = 120.0, *, snapshot: bool = True) -> None:
        """Finish in-flight work, snapshot live actors (unless told not to), stop everything.

        `snapshot=False` leaves the store as a crash after the last commit would: the next
        start activates users from older snapshots plus the events after them.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if snapshot and not self.directory.passivate_all(timeout):
                log.warning("shutdown.passivation_timeout", live=len(self.directory))
            self.journal.close(timeout)
            if self.feed is not None:
                self.feed.close()
            if snapshot:
                self.checkpoint()
            self.dispatcher.shutdown()
            self.recorder.close()
        finally:  # only once the last write is done may another writer start
            self.lease.release()
