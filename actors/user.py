"""The user actor: one per live user, the single writer of that user's log and state.

Persist, then apply (as Akka Persistence does): an event is checked (dimension, repeat),
given the next seq, written through the journal (group commit), and applied only after the
commit. While one write is in flight, newer events wait in a buffer and go out together in the
next write, so a busy user costs one journal request per commit, not one per event.

A repeated event id is dropped: the last `RECENT_IDS` ids are in the state (rebuilt by replay);
an older repeat is refused by the log's (user, event id) key, and the actor drops it then.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from actors import ranking
from actors.alerts import Watches
from actors.configs import ConfigRegistry
from actors.experiments.registry import ExperimentRegistry
from actors.latency import Latency
from actors.learning import apply
from actors.messages import (
    DUPLICATE,
    Inspect,
    Outcome,
    Passivate,
    Rank,
    SnapshotWritten,
    Track,
    Written,
)
from actors.replay import replay_user, seq_at_time
from actors.runtime import Dispatcher, PooledActor
from actors.segment_model import SegmentModels
from actors.segment_quality import SegmentQuality
from actors.segment_stats import SegmentStats
from actors.state import SNAPSHOT_SCHEMA, SnapshotError, UserState, decode_state, encode_state
from actors.state import id_hash as _id_hash
from events.codec import encode_logged_event, event_from_log
from events.errors import Reason, Rejected
from events.types import EXPOSURE, Arm, Event, Query, Ranking
from store.fencing import Fenced
from store.journal import Journal, WriteRequest
from store.recorder import AppendConflict, Recorder, Snapshot, StoredEvent, StoreRefused

if TYPE_CHECKING:
    from collections.abc import Callable

    from events.config import TuningConfig

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class UserContext:
    """What every user actor shares (read-only for them)."""

    recorder: Recorder
    journal: Journal
    configs: ConfigRegistry
    snapshot_every: int = 1000  # events between periodic snapshots
    stats: SegmentStats = field(default_factory=SegmentStats)  # stamped on events (hygiene)
    models: SegmentModels = field(default_factory=SegmentModels)  # scores stamped on events
    on_stopped: Callable[[str], None] = lambda _user: None  # the directory's hook
    # user -> its actor once its state is loaded: queries read that state directly (see
    # `UserActor.rank_now`) instead of queueing behind ingest in the dispatcher
    readable: dict[str, UserActor] = field(default_factory=dict)
    # users the store has a log of (None: unknown, ask the store): the store's single writer
    # (see store/lease.py) knows them all, so a new user's activation reads nothing
    known: set[str] | None = None
    # the experiments: which arm's config a user's events are stamped with (per-arm learning)
    experiments: ExperimentRegistry = field(default_factory=ExperimentRegistry)
    # per segment, drift and instability detectors on the learning steps (actors/alerts)
    watches: Watches = field(default_factory=Watches)
    # per segment, how well it learns (log loss, AUC, step norms, hygiene drops): /metrics
    quality: SegmentQuality = field(default_factory=SegmentQuality)
    # how long loading a user's snapshot and tail takes when its actor starts (/metrics)
    activation: Latency = field(default_factory=Latency)


def rebuild(recorder: Recorder, configs: ConfigRegistry, user: str) -> tuple[UserState, int]:
    """The user's state from the latest snapshot and the events after it.

    Returns the state and the seq of the snapshot used (0 if none). An undecodable snapshot
    is logged and ignored: full replay from the log.
    """
    snap, tail = recorder.load(user)
    state, snap_seq = UserState(user), 0
    if snap is not None:
        try:
            state, snap_seq = decode_state(snap.state), snap.seq
        except SnapshotError as exc:
            log.warning("snapshot.undecodable", user_id=user, seq=snap.seq, error=str(exc))
            tail = list(recorder.read(user))
    for row in tail:
        event = event_from_log(row.body)
        state = apply(state, event, configs.get_fresh(event.config))
    return state, snap_seq


class UserActor(PooledActor):
    def __init__(self, dispatcher: Dispatcher, user: str, ctx: UserContext) -> None:
        super().__init__(dispatcher)
        self.user = user
        self.ctx = ctx
        self.state = UserState(user)
        self.snap_seq = 0
        self._buffer: list[tuple[Event, Callable[[Outcome], None]]] | None = None
        self._inflight: list[tuple[Event, Callable[[Outcome], None]]] | None = None
        # ids buffered or in flight -> the callbacks of their repeats (redeliveries), which
        # are settled by the outcome of the write they join, never before it commits
        # (an empty tuple until one joins: no container per event for the collector to scan)
        self._pending: dict[str, tuple[Callable[[Outcome], None], ...]] | None = None
        self._isolate = 0  # writes left to send one event at a time (see `_refused`)
        self._passivating = False
        self._snapshot_on_stop = True
        self._snapshotting = False
        self._view = ranking.View()  # what queries see (a cache, by seq)
        # the experiment arm of the newest exposure sent to the journal, before the state
        # has it: the events behind it go by its arm's config too
        self._arm: Arm | None = None

    # ------------------------------------------------------------ lifecycle

    def on_start(self) -> None:
        known = self.ctx.known
        if known is None or self.user in known:
            began = time.perf_counter()
            self.state, self.snap_seq = rebuild(self.ctx.recorder, self.ctx.configs, self.user)
            self.ctx.activation.observe(time.perf_counter() - began)
        # else a user with no history: the empty state. Were the set wrong, the first write
        # would collide with the log's seqs, and `_resolve_conflict` rebuilds from the store.
        self.ctx.readable[self.user] = self

    def on_stop(self) -> None:
        self._unreadable()
        self.ctx.on_stopped(self.user)

    def on_failure(self, *_exc_info: Any) -> None:
        self._unreadable()
        self.ctx.on_stopped(self.user)

    def _unreadable(self) -> None:
        if self.ctx.readable.get(self.user) is self:
            del self.ctx.readable[self.user]

    def _actor_loop_teardown(self) -> None:
        # Fail (rather than silently drop) the callbacks of messages that arrive too late.
        inbox = self.actor_inbox
        while not inbox.empty():
            message = inbox.get().message
            if isinstance(message, Track):
                message.done(Outcome("failed"))
            elif isinstance(message, Rank | Inspect):
                message.done(Rejected(Reason.OUT_OF_RANGE, "user actor stopped; retry"))
        super()._actor_loop_teardown()

    # ------------------------------------------------------------ messages

    def _handle_receive(self, message: Any) -> Any:
        # Our own messages by type first (one dict lookup); pykka's (stop, proxy calls) after.
        handler = _HANDLERS.get(type(message))
        if handler is None:
            return super()._handle_receive(message)
        return handler(self, message)

    def on_receive(self, message: Any) -> Any:
        log.warning("user_actor.unknown_message", user_id=self.user, message=repr(message))

    def _on_track(self, message: Track) -> None:
        self._track(message.event, message.done)

    def _on_written(self, message: Written) -> None:
        self._written(message.error)

    def _on_rank(self, message: Rank) -> None:
        message.done(self._rank(message.query))

    def _on_snapshot_written(self, message: SnapshotWritten) -> None:
        self._snapshot_written(message.seq, message.error)

    def _on_passivate(self, message: Passivate) -> None:
        self._passivating = True
        self._snapshot_on_stop = message.snapshot
        self._maybe_finish_passivation()

    def _on_inspect(self, message: Inspect) -> None:
        message.done(self.state)

    def _track(self, event: Event, done: Callable[[Outcome], None]) -> None:
        try:
            config = self.ctx.configs.get(event.config)
            if self.ctx.experiments.running:  # per-arm learning: stamp the arm's config
                config, event = self._stamp_arm(event, config)
            if event.is_interaction:
                if event.x is None:
                    raise Rejected(
                        Reason.MISSING_FIELD, f"no features for item {event.item!r}", "x"
                    )
                if event.x.shape[0] != config.dim:
                    raise Rejected(
                        Reason.DIMENSION,
                        f"'x' has {event.x.shape[0]} features; the config has dim {config.dim}",
                        "x",
                    )
        except Rejected as rejected:
            log.info("event.rejected", user_id=self.user, event_id=event.id,
                     reason=rejected.reason.value, detail=rejected.detail)
            done(Outcome("rejected", error=rejected))
            return
        if event.user != self.user:
            done(Outcome("rejected", error=Rejected(Reason.INVALID_ID, "wrong user", "u")))
            return
        if self._pending is not None and event.id in self._pending:
            # a repeat of an event not yet committed (JetStream redelivers after its ack
            # wait while a commit is slow): it is settled by that write's outcome
            log.debug("event.repeat_joins_write", user_id=self.user, event_id=event.id)
            self._pending[event.id] += (done,)
            return
        if self.state.has_seen(_id_hash(event.id)):
            log.debug("event.duplicate", user_id=self.user, event_id=event.id)
            done(DUPLICATE)
            return
        if event.kind == "rollback":
            try:
                event = self._stamp_rollback(event)
            except Rejected as rejected:
                log.info("rollback.rejected", user_id=self.user, event_id=event.id,
                         detail=rejected.detail)
                done(Outcome("rejected", error=rejected))
                return
            except Exception as exc:  # the store failed the replay: answer, stay alive
                log.error("rollback.failed", user_id=self.user, event_id=event.id,
                          error=repr(exc))
                done(Outcome("failed"))
                return
        norms, base = event.norms, event.base
        if event.is_interaction:
            segment = event.segment or self.state.segment or "default"
            if norms is None and config.segment(segment).hygiene:  # what apply compares with
                h = self.state.hyg
                norms = self.ctx.stats.stamp(
                    segment, event, h.recent_actions() if h is not None else 0,
                    observe=h is None or not h.bot)  # a bot's signals would skew them
            if base is None:
                base = self.ctx.models.stamp(segment, event.x, config, event.item)
        if event.config is None or norms is not event.norms or base is not event.base:
            # positional: NamedTuple._replace costs microseconds (a dict and a _make)
            event = Event(*event[:11], config.version, *event[12:15], norms, base, *event[17:])
        if self._pending is None:
            self._pending, self._buffer = {}, []
        self._pending[event.id] = ()
        self._buffer.append((event, done))
        if self._inflight is None:
            self._flush()

    def _stamp_arm(self, event: Event, config: TuningConfig) -> tuple[TuningConfig, Event]:
        """The config of the user's experiment arm, if it is in one (or, on an exposure, is
        enrolled now); an exposure also gets the arm, which logs the assignment."""
        exposure = event.kind == EXPOSURE
        arm = self._arm or self.state.arm
        version, arm = self.ctx.experiments.arm_for(
            self.user, arm, event.segment or self.state.segment, exposure)
        if version is None:
            return config, event
        if exposure:
            self._arm = arm
            event = event._replace(arm=arm)
        return self.ctx.configs.get(version), event

    def _stamp_rollback(self, event: Event) -> Event:
        """Put the state at the target seq on the rollback event, so that `apply` (and every
        replay) restores it from the log alone. The target comes from `to_seq`, or from a time
        (`extra["tt"]`: the last event received, or timed, at or before it)."""
        to_seq = event.to_seq
        if to_seq is None:
            to_time = event.extra.get("tt")
            if not isinstance(to_time, int | float):
                raise Rejected(Reason.MISSING_FIELD, "a rollback needs 'to' (seq) or 'tt'", "to")
            to_seq = seq_at_time(self.ctx.recorder, self.user, float(to_time))
        if not 0 <= to_seq <= self.state.seq:
            raise Rejected(Reason.OUT_OF_RANGE,
                           f"rollback to seq {to_seq}: the log has seqs 1..{self.state.seq}",
                           "to")
        target = replay_user(self.ctx.recorder, self.ctx.configs, self.user, until_seq=to_seq)
        log.warning("rollback", user_id=self.user, event_id=event.id, seq=self.state.seq + 1,
                    to_seq=to_seq, by=event.extra.get("by"), why=event.extra.get("why"))
        return event._replace(to_seq=to_seq, restored=encode_state(target))

    def _flush(self) -> None:
        if self._isolate:  # after a refused write: one event per write finds the culprit
            self._isolate -= 1
            batch, self._buffer = self._buffer[:1], self._buffer[1:]
        else:
            batch, self._buffer = self._buffer, []
        base = self.state.seq
        rows = [
            StoredEvent(self.user, base + i, event.id, encode_logged_event(event))
            for i, (event, _) in enumerate(batch, start=1)
        ]
        self._inflight = batch
        tell = self.actor_ref.tell
        self.ctx.journal.write(WriteRequest(
            rows, (), lambda exc: tell(_WRITTEN_OK if exc is None else Written(exc))))

    def _written(self, error: BaseException | None) -> None:
        batch, self._inflight = self._inflight, None
        assert batch is not None
        if error is None:
            if self.ctx.known is not None and self.state.seq == 0:
                self.ctx.known.add(self.user)  # its log exists now
            configs, models = self.ctx.configs, self.ctx.models
            steps: list = []  # what apply learned: the segment model takes its side of it
            for event, done in batch:
                config = configs.get(event.config)
                before, self.state = self.state, apply(self.state, event, config, steps)
                self._view.advance(before, event, self.state, config)
                if steps:
                    segment = self.state.segment or "default"
                    models.learn(segment, steps, config)
                    self.ctx.watches.observe(segment, steps)
                    self.ctx.quality.observe(segment, steps)
                    steps.clear()
                # no per-event log: 30k/s is noise
                self._settle(event, done, Outcome("applied", self.state.seq), DUPLICATE)
            if self.state.seq - self.snap_seq >= self.ctx.snapshot_every:
                self._snapshot()
        elif isinstance(error, AppendConflict):
            self._resolve_conflict(batch, error)
        elif isinstance(error, StoreRefused):
            self._refused(batch, error)
        elif isinstance(error, Fenced):
            self._moved(batch, error)
            return
        else:
            log.error("journal.write_failed", user_id=self.user, error=repr(error))
            failed = Outcome("failed")
            for event, done in batch:
                self._settle(event, done, failed, failed)
        if self._buffer:
            self._flush()
        else:
            self._maybe_finish_passivation()

    def _moved(self, batch: list, error: Fenced) -> None:
        """The user's partition moved to another worker of the fleet (store/fencing.py): the
        store wrote nothing of the batch. Every event waiting here is answered `moved` (its
        message goes back to JetStream, for the new owner) and the actor stops without a
        snapshot: its state may be behind the log from now on."""
        log.warning("user_actor.fenced", user_id=self.user, seq=self.state.seq,
                    error=str(error))
        moved = Outcome("moved")
        for event, done in [*batch, *(self._buffer or ())]:
            self._settle(event, done, moved, moved)
        self._buffer = []
        self._passivating = True
        self._snapshot_on_stop = False
        self._maybe_finish_passivation()

    def _settle(self, event: Event, done: Callable[[Outcome], None], outcome: Outcome,
                repeats: Outcome) -> None:
        """Answer an event and every repeat that joined its write."""
        joined = self._pending.pop(event.id, ())
        done(outcome)
        for repeat in joined:
            repeat(repeats)

    def _refused(self, batch: list, error: StoreRefused) -> None:
        """The store refused the write for good (retrying cannot help). One event: refuse it
        with the store's reason. Several: write them again one by one to find which."""
        if len(batch) > 1:
            log.warning("journal.refused_batch", user_id=self.user, events=len(batch),
                        error=str(error))
            self._isolate = len(batch)
            self._buffer = batch + self._buffer
            return
        ((event, done),) = batch
        log.error("event.refused_by_store", user_id=self.user, event_id=event.id,
                  seq=self.state.seq + 1, error=str(error))
        refused = Outcome("rejected", error=Rejected(
            Reason.STORE_REFUSED, f"the store refused the event: {error}"))
        self._settle(event, done, refused, refused)

    def _resolve_conflict(self, batch: list, conflict: AppendConflict) -> None:
        if conflict.taken_seqs:  # another writer appended to this log: catch up first
            log.warning("user_actor.stale", user_id=self.user, seq=self.state.seq)
            self.state, self.snap_seq = rebuild(self.ctx.recorder, self.ctx.configs, self.user)
            self._arm = None  # the log's assignment is the state's
        keep = []
        for event, done in batch:
            if (self.user, event.id) in conflict.duplicate_ids or self.state.has_seen(
                _id_hash(event.id)
            ):
                log.info("event.duplicate", user_id=self.user, event_id=event.id)
                self._settle(event, done, DUPLICATE, DUPLICATE)
            else:
                keep.append((event, done))
        self._buffer = keep + self._buffer

    # ------------------------------------------------------------ snapshots, passivation

    def _snapshot(self) -> None:
        if self._snapshotting or self.state.seq == self.snap_seq:
            return
        self._snapshotting = True
        seq = self.state.seq
        snap = Snapshot(self.user, seq, SNAPSHOT_SCHEMA, encode_state(self.state))
        tell = self.actor_ref.tell
        self.ctx.journal.write(
            WriteRequest((), (snap,), lambda exc: tell(SnapshotWritten(seq, exc)))
        )

    def _snapshot_written(self, seq: int, error: BaseException | None) -> None:
        self._snapshotting = False
        if error is None:
            self.snap_seq = max(self.snap_seq, seq)
        else:
            log.warning("snapshot.failed", user_id=self.user, seq=seq, error=repr(error))
        self._maybe_finish_passivation()

    def _maybe_finish_passivation(self) -> None:
        if not self._passivating or self._inflight is not None or self._buffer:
            return
        if self.state.seq != self.snap_seq and self._snapshot_on_stop:
            self._snapshot()
        if not self._snapshotting:
            self._stop()

    # ------------------------------------------------------------ queries

    def rank_now(self, query: Query) -> Ranking | Rejected:
        """Answer a query on the caller's thread. Safe beside the actor's own turns: it only
        reads `self.state`, an immutable value that the actor replaces in one assignment,
        and the settled view is a cache of a pure function of it. So a query never waits
        behind the events queued for the dispatcher; it sees every applied event."""
        return self._rank(query)

    def _rank(self, query: Query) -> Ranking | Rejected:
        ctx = self.ctx  # the state is read once: the actor may replace it meanwhile
        return ranking.answer(self.state, self._view, query, ctx.configs, ctx.experiments,
                              ctx.models)


_WRITTEN_OK = Written(None)
assert Event._fields[11:17] == ("config", "received", "session", "automated", "norms", "base")
_HANDLERS = {
    Track: UserActor._on_track,
    Written: UserActor._on_written,
    Rank: UserActor._on_rank,
    SnapshotWritten: UserActor._on_snapshot_written,
    Passivate: UserActor._on_passivate,
    Inspect: UserActor._on_inspect,
}
