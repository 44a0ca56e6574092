"""The NATS adapter: durable ingest from JetStream, queries by request-reply, the catalog.

Subjects (prefix configurable, default `microtune`):

- `<prefix>.events.<user>`  interaction events, JetStream stream MICROTUNE_EVENTS; the stream
                            stores each as `<prefix>.p.<partition>.<user>` (a subject
                            transform with NATS's own `{{partition(P,1)}}`, P recorded in the
                            store), so that a fleet's worker consumes its partitions alone
                            (adapters/fleet); a single service consumes them all
- `<prefix>.query.<user>`   request-reply content-weight queries (core NATS), answered by
                            the query processes this service starts (adapters.query_process)
- `<prefix>.content`        catalog upserts, JetStream stream MICROTUNE_CONTENT
- `<prefix>.rejected`       every rejected event or query, with the reason and the raw bytes,
                            JetStream stream MICROTUNE_REJECTED (nothing vanishes)
- `<prefix>.info`           request-reply: what a client must know and cannot guess (the
                            feature dimension, versions, subjects, streams, limits) and how
                            far the catalog's upserts are applied (`Service.info`)

The service creates the three streams at start (or updates their subjects).

Ingest is a durable push consumer (a callback per message: the stock `fetch()` loop was
measured capping near 18k msg/s). A message is acked only after its event is committed to
the log and applied, or after its rejection is stored on the rejected stream. `max_ack_pending`
bounds what is unanswered, so a slow store pushes back on the broker instead of growing memory.
Acks and query replies come back from the actor threads through one thread-safe queue that the
event loop drains in batches.

No message stays unsettled for ever, and none is settled early:
- a message waiting on a slow or unavailable store is kept alive by in-progress signals
  (`+WPI`) rather than redelivered, and a redelivery that does come joins the write of the
  first delivery (see `actors.user`), so it is acked only after that commit;
- a message delivered `max_deliver` times (it crashed the service each time, say) is
  dead-lettered: stored on the rejected stream with reason `undeliverable`, then acked;
- a rejection record always fits: raw bytes beyond `Limits.max_payload_bytes` are truncated
  and the record says so and keeps their SHA-256;
- an event naming an item not yet in the catalog waits a grace period (adapters.held).

Admin commands that change users (`rollback`, `forget`, `clear_bot`) or experiments
(`experiment`: start, ramp, stop) need an admin token in the request (`tok`); the audit names
the token. `stats` and `experiments` (the list) are read-only. `clear_bot` is refused on the
events subject.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgpack
import nats
import nats.errors
import nats.js.errors
import structlog
from nats.aio.msg import Msg
from nats.js import api
from nats.js.errors import NotFoundError

from actors import feed, latency
from actors.alerts import Alert
from actors.experiments.definition import DEFAULT_WINDOW, METRICS
from actors.learning import own_weights, settle
from actors.messages import Outcome
from actors.system import Microtune
from adapters import discovery, query_process
from adapters.held import HeldEvents
from adapters.metrics import StoreProbe
from adapters.query_process import QueryProcess, QuerySettings
from adapters.records import record
from events.codec import (
    decode_content,
    decode_event,
)
from events.config import CONFIG_SCHEMA
from events.errors import Reason, Rejected
from events.limits import DEFAULT_LIMITS, Limits
from events.types import SCHEMA_VERSION, Event
from store.recorder import StoreRefused, StoreUnavailable

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class ServiceConfig:
    prefix: str = "microtune"
    events_stream: str = "MICROTUNE_EVENTS"
    content_stream: str = "MICROTUNE_CONTENT"
    rejected_stream: str = "MICROTUNE_REJECTED"
    durable: str = "microtune-ingest"
    # copies of each stream the service creates, on a NATS cluster (3 survives a node's
    # loss); a stream that exists keeps its own
    replicas: int = 1
    max_ack_pending: int = 20_000
    ack_wait: float = 30.0
    duplicate_window: float = 120.0  # JetStream's own dedupe of Nats-Msg-Id headers
    rejected_max_age: float = 30 * 86400.0
    limits: Limits = DEFAULT_LIMITS
    # deliveries of one message at most; the last one dead-letters it (a message that was
    # delivered that often crashed or stalled the service each time)
    max_deliver: int = 10
    # in-progress signals for messages unsettled this long (default: a third of ack_wait),
    # so that a slow store does not cause redeliveries (nor use up max_deliver)
    progress_every: float | None = None
    catalog_grace: float = 10.0  # how long an event waits for its item (adapters.held)
    read_wait: float = 2.0  # a query with `ms` waits at most this long for that seq
    max_held: int = 10_000
    # name -> token: who may rollback, forget, clear_bot (none: those commands are refused)
    admin_tokens: dict[str, str] = field(default_factory=dict)
    # processes that answer queries (adapters/query_process.py), each with its own
    # interpreter lock: a query never waits behind ingest
    query_processes: int = 1
    query_max_users: int = 200_000  # user replicas a query process keeps
    # with query processes, the ingest threads run this many nice steps below them, so that
    # a query gets the CPU before ingest does (Linux; 0 leaves priorities alone)
    ingest_nice: int = 5
    log_level: str = "warning"  # the query processes' logging (to stderr)
    log_json: bool = True


@dataclass(slots=True)
class ServiceStats:
    received: int = 0
    applied: int = 0
    duplicates: int = 0
    failed: int = 0
    rejected: Counter = field(default_factory=Counter)
    content_items: int = 0
    dead_lettered: int = 0  # settled as `undeliverable` after max_deliver deliveries
    dead_letter_failed: int = 0  # could not even be dead-lettered (left to JetStream)
    held: int = 0  # events that waited for their item (the catalog race)
    held_overflow: int = 0  # handed back to JetStream because the hold was full
    progress_signals: int = 0  # in-progress signals sent for slow messages
    admin_refused: int = 0
    moved: int = 0  # handed back: the user's partition moved to another worker (a fleet)

    def to_map(self) -> dict[str, Any]:
        return {
            "received": self.received, "applied": self.applied, "duplicates": self.duplicates,
            "failed": self.failed, "rejected": dict(self.rejected),
            "content_items": self.content_items,
            "dead_lettered": self.dead_lettered,
            "dead_letter_failed": self.dead_letter_failed, "held": self.held,
            "held_overflow": self.held_overflow, "progress_signals": self.progress_signals,
            "admin_refused": self.admin_refused, "moved": self.moved,
        }


YIELD_EVERY = 16  # events handled between two turns given to the rest of the loop
# refused catalog upserts whose reason `<prefix>.info` can still give (by content-stream seq)
CATALOG_REFUSALS_KEPT = 10_000
# kinds only an operator may log: refused on the events subject (`<prefix>.admin.<kind>`)
ADMIN_ONLY_KINDS = frozenset({"clear_bot"})


class Service:
    """Binds a `Microtune` system to a NATS server."""

    def __init__(self, system: Microtune, config: ServiceConfig | None = None) -> None:
        self.system = system
        self.config = config or ServiceConfig()
        self.stats = ServiceStats()
        self.nc: nats.NATS | None = None  # events, catalog, JetStream
        self.qnc: nats.NATS | None = None  # admin requests
        self.js = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subs: list = []
        self._queriers: list[QueryProcess] = []
        self._micro = None  # the NATS service registration (info, admin endpoints)
        self._events_sub = None
        self._closing = False
        # outcomes from actor threads: (msg, outcome), acked or refused by the event loop
        self._answers: collections.deque = collections.deque()
        self._drain_scheduled = False
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        self._tasks: set[asyncio.Task] = set()
        # every event message taken and not yet settled: id(msg) -> [msg, last sign of life]
        self._unsettled: dict[int, Msg] = {}
        # id(msg) -> its last sign of life (monotonic); ints and floats only, so that the
        # collector never scans it (a container per message would cost every collection)
        self._alive: dict[int, float] = {}
        self._held = HeldEvents(self.config.catalog_grace, self.config.max_held)
        self._ticker: asyncio.Task | None = None
        self._dead_letter_sub = None
        p = self.config.prefix
        self.events_subject = f"{p}.events"
        self.partitioned_subject = f"{p}.p"  # `<prefix>.p.<partition>.<user>` in the stream
        self.partitions = system.partitions  # the store's number (events/partitions.py)
        self._user_split = self.partitioned_subject.count(".") + 2  # splits before the user
        self.query_serve_ttl: float | None = None  # a fleet's worker sets it (adapters/fleet)
        self.content_subject = f"{p}.content"
        self.rejected_subject = f"{p}.rejected"
        self.info_subject = f"{p}.info"
        self.qjs = None  # JetStream on the admin connection (`info` reads the content stream)
        # The catalog's floor: every content-stream seq up to it is settled (its items
        # stored and fed to the query processes, or it was refused). Refusals are kept by
        # seq for `info`; the outcome of seqs up to `_catalog_unknown` (settled before this
        # start, or refusals no longer kept) is not known here.
        self.catalog_floor = 0
        self.consumer_pending = 0  # the events consumer's num_pending, sampled by _tick
        self._started = False  # start() finished: consumers bound, query processes serving
        self._store_ok = StoreProbe(system.recorder.probe)
        self._catalog_unknown = 0
        self._catalog_refused: collections.OrderedDict[int, dict] = collections.OrderedDict()

    async def start(self, servers: str | list[str], **connect_options: Any) -> None:
        self._loop = asyncio.get_running_loop()
        self.system.context.watches.publish = self._alert  # actors/alerts, on actor threads
        options = dict(max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                       pending_size=64 * 1024 * 1024, error_cb=self._on_error,
                       disconnected_cb=self._on_disconnected,
                       reconnected_cb=self._on_reconnected, **connect_options)
        options = query_process.connect_options(options)
        self.nc = await nats.connect(servers, name="microtune-ingest", **options)
        # Admin requests get a connection of their own: on the ingest connection a request
        # would wait behind megabytes of event deliveries in the same socket.
        self.qnc = await nats.connect(servers, name="microtune-admin", **options)
        self.js = self.nc.jetstream()
        self.qjs = self.qnc.jetstream(timeout=2.0)
        await self._ensure_streams()
        cfg = self.config
        # what a previous run settled is gone from the work queue (query processes read
        # those items from the store); known before they are spawned, which are told it
        self.catalog_floor = self._catalog_unknown = _settled_floor(
            (await self.js.stream_info(cfg.content_stream)).state)
        # query processes before the first commit: each sees every event through its feed
        # (they get ready while ingest runs; `start` returns once they serve)
        self._spawn_query_processes(servers, connect_options)
        # the catalog first: after a restart, items published before their events are known
        await self._consume_catalog()
        await self.resume_consuming()
        self._dead_letter_sub = await self.nc.subscribe(  # ours are picked by the handler
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.>", cb=self._on_max_deliveries)
        self._ticker = asyncio.create_task(self._tick())
        await self._query_processes_ready()
        # info and admin as endpoints of the NATS service `microtune` (adapters/discovery.py)
        self._micro = await discovery.register(self.qnc, "service", [
            ("info", self.info_subject, self._on_info),
            ("admin", f"{cfg.prefix}.admin.*", self._on_admin)])
        for nc in (self.nc, self.qnc):  # subscriptions on the server before start returns
            await nc.flush()
        self._started = True
        log.info("service.started", servers=servers, prefix=cfg.prefix,
                 max_ack_pending=cfg.max_ack_pending)

    async def _consume_catalog(self) -> None:
        cfg = self.config
        self._subs.append(await self._consume(
            cfg.content_stream, self.content_subject, f"{cfg.durable}-content",
            self._on_content, 1000))

    def _alert(self, alert: Alert) -> None:
        """An alert from a segment's watch (an actor thread): published on
        `<prefix>.alerts.<kind>` by the event loop, msgpack `Alert.to_map`."""
        loop = self._loop
        if loop is None or self._closing:
            return
        subject, body = alert.subject(self.config.prefix), msgpack.packb(
            alert.to_map(), use_bin_type=True)
        loop.call_soon_threadsafe(self._publish_alert, subject, body)

    def _publish_alert(self, subject: str, body: bytes) -> None:
        if self.nc is None or self._closing:
            return
        task = self._loop.create_task(self.nc.publish(subject, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def readiness(self) -> tuple[bool, dict[str, bool]]:
        """What /readyz answers (adapters/metrics.py): every check, and whether all pass."""
        checks = {
            "started": self._started and not self._closing,
            "nats_connected": self.nc is not None and self.nc.is_connected,
            "events_consumer_attached": self._events_sub is not None,
            "catalog_loaded": self._started and bool(self._subs),
            "store_writable": self._store_ok(),
        }
        return all(checks.values()), checks

    async def stop_consuming(self) -> None:
        """Stop taking events (the durable consumer keeps its place); queries go on."""
        if self._events_sub is not None:
            await self._events_sub.unsubscribe()
            self._events_sub = None

    async def resume_consuming(self) -> None:
        if self._events_sub is None:
            cfg = self.config
            # a fleet's consumers (a partition's each) would overlap ours on the work queue;
            # none runs beside us (we hold the store alone), so theirs go, and what they left
            # unacked is delivered to ours
            await self._delete_consumers(lambda name: name.startswith(f"{cfg.durable}-p")
                                         or name == f"{cfg.durable}-stray")
            # everything the stream holds (partitioned, or stored before it was): no filter
            # (two filter subjects were measured at half the rate of one worker's consumers)
            self._events_sub = await self._consume(
                cfg.events_stream, None, cfg.durable, self._on_event, cfg.max_ack_pending)

    async def _delete_consumers(self, doomed) -> None:
        """Delete the events stream's durable consumers whose name `doomed` accepts."""
        stream = self.config.events_stream
        for info in await self.js.consumers_info(stream):
            name = info.name or ""
            if doomed(name):
                with contextlib.suppress(NotFoundError):
                    await self.js.delete_consumer(stream, name)
                log.info("consumer.deleted", stream=stream, consumer=name)

    async def stop(self, timeout: float = 60.0) -> None:
        """Stop consuming, finish what is in flight, ack it, snapshot live users, disconnect."""
        await self.stop_consuming()
        for sub in self._subs:
            await sub.unsubscribe()
        self._subs.clear()
        if self._ticker is not None:
            self._ticker.cancel()
        for _event, msg in self._held.drain():  # JetStream delivers them again later
            self._forget(msg)
            await msg.nak()
        deadline = time.monotonic() + timeout
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self._drain()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._micro is not None:
            await self._micro.stop()
        if self._dead_letter_sub is not None:
            await self._dead_letter_sub.unsubscribe()
        for nc in (self.qnc, self.nc):
            if nc is not None and nc.is_connected:
                await nc.flush(timeout=5)
        await asyncio.to_thread(self.system.close)
        for querier in self._queriers:
            await asyncio.to_thread(querier.stop)
        self._closing = True
        for nc in (self.qnc, self.nc):
            if nc is not None:
                await nc.close()
        log.info("service.stopped", **self.stats.to_map())

    async def _ensure_streams(self) -> None:
        cfg = self.config
        await self._ensure_stream(api.StreamConfig(
            name=cfg.events_stream, subjects=[f"{self.events_subject}.>"],
            retention=api.RetentionPolicy.WORK_QUEUE, storage=api.StorageType.FILE,
            duplicate_window=cfg.duplicate_window, num_replicas=cfg.replicas,
            subject_transform=partition_transform(
                self.events_subject, self.partitioned_subject, self.partitions)))
        await self._ensure_stream(api.StreamConfig(
            name=cfg.content_stream, subjects=[self.content_subject],
            retention=api.RetentionPolicy.WORK_QUEUE, storage=api.StorageType.FILE,
            num_replicas=cfg.replicas))
        await self._ensure_stream(api.StreamConfig(
            name=cfg.rejected_stream, subjects=[self.rejected_subject],
            retention=api.RetentionPolicy.LIMITS, storage=api.StorageType.FILE,
            max_age=cfg.rejected_max_age, num_replicas=cfg.replicas))

    async def _ensure_stream(self, config: api.StreamConfig) -> None:
        await _cluster_retry(lambda: self._ensure_stream_once(config))

    async def _ensure_stream_once(self, config: api.StreamConfig) -> None:
        try:
            info = await self.js.stream_info(config.name)
        except NotFoundError:
            await self.js.add_stream(config)
            log.info("stream.created", stream=config.name, subjects=config.subjects)
            return
        if sorted(info.config.subjects or []) != sorted(config.subjects) or (
                _transform(info.config) != _transform(config)):
            await self.js.update_stream(config)
            log.info("stream.updated", stream=config.name, subjects=config.subjects,
                     transform=_transform(config))

    async def _consume(self, stream: str, subject: str | None, durable: str, cb,
                       max_ack_pending: int):
        """Create or update the durable push consumer, then bind a callback to it."""
        config = api.ConsumerConfig(
            durable_name=durable,
            deliver_subject=f"_MICROTUNE.deliver.{durable}",  # stable across restarts
            filter_subject=subject,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self.config.ack_wait,
            max_deliver=self.config.max_deliver,
            max_ack_pending=max_ack_pending,
            deliver_policy=api.DeliverPolicy.ALL,
        )
        info = await _cluster_retry(lambda: self.js.add_consumer(stream, config))
        return await self.js.subscribe_bind(
            stream=stream, config=info.config, consumer=durable, cb=cb, manual_ack=True,
            pending_msgs_limit=max_ack_pending * 2,
            pending_bytes_limit=max_ack_pending * self.config.limits.max_payload_bytes,
        )

    # ------------------------------------------------------------ query processes

    def _spawn_query_processes(self, servers, options: dict[str, Any]) -> None:
        cfg = self.config
        if not cfg.query_processes:
            return
        store = self.system.recorder.engine.url.render_as_string(hide_password=False)
        for index in range(cfg.query_processes):
            querier = QueryProcess(QuerySettings(
                store=store, servers=servers, config=self.system.configs.current,
                prefix=cfg.prefix, limits=cfg.limits, read_wait=cfg.read_wait,
                max_users=cfg.query_max_users, options=options, log_level=cfg.log_level,
                log_json=cfg.log_json, index=index, fleet_serve_ttl=self.query_serve_ttl))
            self._start(querier)
            self._queriers.append(querier)

    async def _query_processes_ready(self) -> None:
        for querier in self._queriers:
            try:
                await asyncio.to_thread(querier.wait_ready)
            except (RuntimeError, TimeoutError) as exc:  # once more, from a new process
                log.error("query_process.start_failed", index=querier.settings.index,
                          error=str(exc))
                self._respawn(querier)
                await asyncio.to_thread(querier.wait_ready)
        if self._queriers:
            self.system.lower_priority(self.config.ingest_nice)

    def _start(self, querier: QueryProcess) -> None:
        """Spawn the process and feed it at once (it files what comes before it serves)."""
        querier.sender = self.system.open_feed().attach(
            querier.spawn(), name=f"feed-{querier.settings.index}")
        # a change made after the process read the store, before it was attached
        querier.sender.put(feed.EXPERIMENTS, self.system.experiments.encoded())
        query_process.send_floor(querier.sender, self.catalog_floor)  # upserts up to it: read

    def _respawn(self, querier: QueryProcess) -> None:
        self.system.open_feed().detach(querier.sender)
        querier.stop(0)
        self._start(querier)

    async def _watch_query_processes(self) -> None:
        """Take their stats; start again one that died (its replicas rebuild from the
        store as they are asked for)."""
        for querier in self._queriers:
            querier.poll_stats()
            sender = querier.sender
            if sender is not None and sender.gaps != querier.gaps_marked:
                # the dropped backlog may have held the floor: again, behind the gap
                querier.gaps_marked = sender.gaps
                query_process.send_floor(sender, self.catalog_floor)
            if querier.alive() or self._closing:
                continue
            log.error("query_process.died", index=querier.settings.index,
                      exitcode=querier.process.exitcode)
            self._respawn(querier)
            try:
                await asyncio.to_thread(querier.wait_ready)
                log.info("query_process.restarted", index=querier.settings.index)
            except (RuntimeError, TimeoutError) as exc:  # tried again at the next tick
                log.error("query_process.restart_failed", error=str(exc))

    def query_stats(self) -> dict[str, Any]:
        """The query processes' latest reports, summed (gc: per process)."""
        total: Counter = Counter()
        rejected: Counter = Counter()
        gcs = []
        for querier in self._queriers:
            for key, value in querier.stats.items():
                if isinstance(value, int | float):
                    total[key] += value
            rejected.update(querier.stats.get("rejected", {}))
            gcs.append(querier.stats.get("gc"))
        total["latency"] = latency.merged(q.stats.get("latency") for q in self._queriers)
        total["processes"] = sum(q.serving() for q in self._queriers)
        total["restarts"] = sum(max(0, q.started - 1) for q in self._queriers)
        total["feed_gaps"] = sum(q.sender.gaps for q in self._queriers)
        return {**total, "rejected": dict(rejected), "gc": gcs}

    # ------------------------------------------------------------ events

    async def _on_event(self, msg: Msg) -> None:
        self.stats.received += 1
        if self.stats.received % YIELD_EVERY == 0:
            # nats-py's delivery task takes queued messages without suspending while any
            # are queued: thousands in a row. Step aside now and then so that acks and admin
            # requests run (measured without it, when queries were served here: p50 2-3 s).
            await asyncio.sleep(0)
        delivered, stored = ack_info(msg.reply)
        if delivered >= self.config.max_deliver:  # the last delivery JetStream will make
            await self._dead_letter(msg, delivered)
            return
        x = None
        try:
            user = self.subject_user(msg.subject)
            event = decode_event(msg.data, self.config.limits, subject_user=user)
            if event.kind in ADMIN_ONLY_KINDS:
                raise Rejected(Reason.FORBIDDEN, f"'{event.kind}' is an admin command: request "
                               f"{self.config.prefix}.admin.{event.kind} with an admin token",
                               "k")
            # positional: NamedTuple._replace costs microseconds (a dict and a _make)
            event = Event(*event[:12], stored, *event[13:])
            if event.is_interaction and event.x is None:
                x = self.system.catalog.get(event.item)
        except Rejected as rejected:
            await self._reject(msg, rejected)
            return
        self._unsettled[id(msg)] = msg
        self._alive[id(msg)] = time.monotonic()
        if self._held.waiting(user) or (event.is_interaction and event.x is None and x is None):
            # its item may be on its way (content and events are separate streams), or an
            # earlier event of this user waits for one: keep the user's order
            if self._held.hold(event, msg, time.monotonic()):
                self.stats.held += 1
                return
            self.stats.held_overflow += 1
            self._forget(msg)
            await msg.nak(delay=self.config.catalog_grace)
            return
        if x is not None:
            event = Event(*event[:5], x, *event[6:])
        self._track(event, msg)

    def subject_user(self, subject: str) -> str:
        """The user an event's subject names: `<prefix>.p.<partition>.<user>` as the stream
        stores it, or `<prefix>.events.<user>` (stored before the stream was partitioned, or
        not one token: the codec refuses such a user)."""
        if subject.startswith(self.partitioned_subject):
            return subject.split(".", self._user_split)[-1]
        return subject[len(self.events_subject) + 1:]

    def published_subject(self, subject: str) -> str:
        """The subject a publisher used (`<prefix>.events.<user>`) for one the stream stores
        as `<prefix>.p.<partition>.<user>`: what a rejection record names."""
        if subject.startswith(self.partitioned_subject):
            return f"{self.events_subject}.{self.subject_user(subject)}"
        return subject

    def _forget(self, msg: Msg) -> None:
        """The message is settled, or handed back to JetStream: no longer ours to keep alive."""
        key = id(msg)
        self._unsettled.pop(key, None)
        self._alive.pop(key, None)

    def _track(self, event: Event, msg: Msg) -> None:
        with self._in_flight_lock:
            self._in_flight += 1
        self.system.track(event, lambda outcome, m=msg: self._answer((m, outcome)))

    async def _reject(self, msg: Msg, rejected: Rejected, *, ack: bool = True) -> bool:
        """Store the rejection on the rejected stream, then ack the original; False if it
        could not be stored (the original is then left to JetStream)."""
        self.stats.rejected[rejected.reason.value] += 1
        log.warning("message.rejected", subject=msg.subject, reason=rejected.reason.value,
                    detail=rejected.detail, field=rejected.field)
        try:
            await self.js.publish(self.rejected_subject, record(
                self.published_subject(msg.subject), bytes(msg.data), rejected))
        except Exception as exc:  # not stored: leave the original unacked, it comes back
            log.error("rejected.store_failed", error=repr(exc), subject=msg.subject)
            self._forget(msg)  # up to JetStream (and max_deliver) now
            return False
        self._forget(msg)
        if ack:
            await msg.ack()
        return True

    async def _dead_letter(self, msg: Msg, delivered: int) -> Rejected | None:
        """Settle a message that was delivered too often: its record, then the ack; the
        refusal, or None if it could not be recorded."""
        rejected = Rejected(Reason.UNDELIVERABLE,
                            f"delivered {delivered} times without being settled")
        if await self._store_dead_letter(msg.subject, bytes(msg.data), rejected,
                                         deliveries=delivered):
            self._forget(msg)
            await msg.ack()
            return rejected
        return None

    async def _on_max_deliveries(self, advisory: Msg) -> None:
        """JetStream gave up on a message (the service died during its last delivery): fetch
        it from the stream, dead-letter it, delete it. A net under `_dead_letter`."""
        try:
            body = json.loads(advisory.data)
            stream, seq = str(body["stream"]), int(body["stream_seq"])
            cfg = self.config
            if not self._ours(stream, str(body.get("consumer"))):
                return  # another consumer's
            stored = await self.js.get_msg(stream, seq)
        except Exception as exc:  # already gone, or a malformed advisory
            log.warning("dead_letter.advisory_skipped", error=repr(exc))
            return
        rejected = Rejected(Reason.UNDELIVERABLE, "JetStream's max deliveries reached")
        if await self._store_dead_letter(stored.subject, stored.data or b"", rejected,
                                         stream_seq=seq):
            try:
                await self.js.delete_msg(stream, seq)
            except Exception as exc:  # recorded; JetStream delivers it no more anyway
                log.warning("dead_letter.delete_failed", error=repr(exc), stream_seq=seq)
            if stream == cfg.content_stream:
                self._content_settled(seq, refused=rejected)

    def _ours(self, stream: str, consumer: str) -> bool:
        """Is this consumer of that stream one this process takes messages from?"""
        cfg = self.config
        return (stream, consumer) in ((cfg.events_stream, cfg.durable),
                                      (cfg.content_stream, f"{cfg.durable}-content"))

    async def _store_dead_letter(self, subject: str, raw: bytes, rejected: Rejected,
                                 **where: Any) -> bool:
        """Record an undeliverable message on the rejected stream, counted; False if even
        that failed (then it is left to JetStream)."""
        try:
            await self.js.publish(self.rejected_subject, record(
                self.published_subject(subject), raw, rejected))
        except Exception as exc:
            self.stats.dead_letter_failed += 1
            log.error("dead_letter.store_failed", error=repr(exc), subject=subject, **where)
            return False
        self.stats.dead_lettered += 1
        self.stats.rejected[rejected.reason.value] += 1
        log.error("message.dead_lettered", subject=subject, **where)
        return True

    async def _tick(self) -> None:
        """Four times a second: release or refuse held events; keep slow messages alive."""
        cfg = self.config
        every = cfg.progress_every if cfg.progress_every is not None else cfg.ack_wait / 3
        scan_every = min(1.0, every / 2)  # a scan of 20k unsettled messages takes ~1 ms
        next_scan = time.monotonic() + scan_every
        next_lag = 0.0
        while True:
            await asyncio.sleep(0.25)
            try:
                await self._release_held()
                await self._watch_query_processes()
                now = time.monotonic()
                if now >= next_lag and self._events_sub is not None:
                    next_lag = now + 2.0  # consumer lag for the metrics
                    info = await self.qjs.consumer_info(cfg.events_stream, cfg.durable)
                    self.consumer_pending = info.num_pending or 0
                if now < next_scan:
                    continue
                next_scan = now + scan_every
                alive = self._alive
                for key, since in list(alive.items()):
                    if now - since >= every and key in alive:
                        alive[key] = now
                        self.stats.progress_signals += 1
                        await self._unsettled[key].in_progress()
            except Exception as exc:  # never let housekeeping die (a disconnect, say)
                log.warning("service.tick_failed", error=repr(exc))

    async def _release_held(self) -> None:
        if not len(self._held):
            return
        ready, expired = self._held.release(self.system.catalog.get, time.monotonic())
        for event, msg in ready:
            self._track(event, msg)
        for event, msg in expired:
            await self._reject(msg, Rejected(
                Reason.MISSING_FIELD, f"item {event.item!r} is not in the catalog (waited "
                f"{self.config.catalog_grace:g} s) and the event has no 'x'", "x"))

    # ------------------------------------------------------------ admin

    async def _on_admin(self, msg: Msg) -> None:
        """`<prefix>.admin.stats | experiments | rollback | forget | clear_bot | experiment`,
        request-reply, msgpack both ways. All but `stats` and `experiments` change data: they
        need an admin token (`tok`), and the audit names the token. Guard these subjects with
        NATS permissions too."""
        if not msg.reply:
            return
        command = msg.subject.rsplit(".", 1)[-1]
        try:
            handler = _ADMIN.get(command)
            if handler is None:
                raise Rejected(Reason.UNKNOWN_KIND, f"unknown admin command {command!r} "
                               f"(known: {', '.join(_ADMIN)})")
            body = msgpack.unpackb(msg.data, raw=False) if msg.data else {}
            if not isinstance(body, dict):
                raise Rejected(Reason.WRONG_TYPE, "an admin request is a msgpack map")
            if command not in _READ_ONLY:
                body["by"] = self._admin_identity(body)
            answer = await getattr(self, handler)(body)
        except Rejected as rejected:
            answer = rejected.to_wire()
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            answer = Rejected(Reason.MALFORMED, f"bad admin request: {exc}").to_wire()
        except TimeoutError as exc:
            answer = {"e": "timeout", "m": str(exc)}
        await self.qnc.publish(msg.reply, msgpack.packb(answer, use_bin_type=True))

    def _admin_identity(self, body: dict) -> str:
        """Who acts: the name of the admin token in the request (with the `by` it claims, for
        the audit). Refused without a known token."""
        tokens = self.config.admin_tokens
        given = body.get("tok")
        name = None
        if isinstance(given, str):
            for candidate, token in tokens.items():
                if hmac.compare_digest(given.encode(), token.encode()):
                    name = candidate
        if name is None:
            self.stats.admin_refused += 1
            log.warning("admin.refused", configured=bool(tokens))
            if not tokens:
                raise Rejected(Reason.FORBIDDEN, "admin commands are disabled: the service has "
                               "no admin tokens (serve --admin-tokens-file)")
            raise Rejected(Reason.FORBIDDEN, "a valid admin token ('tok') is required "
                           "(MICROTUNE_ADMIN_TOKEN)", "tok")
        claimed = _text(body.get("by"))
        return name if not claimed or claimed == name else f"{name} ({claimed})"

    async def _admin_experiments(self, _body: dict) -> dict:
        """Every experiment's latest definition (read-only: no token)."""
        return {"experiments": [e.to_map() for e in self.system.experiments.all()]}

    async def _admin_experiment(self, body: dict) -> dict:
        """Start, ramp or stop an experiment (`op`), audited with the token's name."""
        op, name = body.get("op"), _text(body.get("name"))
        if not name:
            raise Rejected(Reason.MISSING_FIELD, "'name' (the experiment) is required", "name")
        by, why = body["by"], _text(body.get("why"))
        system = self.system
        if op == "start":
            arms = body.get("arms")
            if not isinstance(arms, list) or not all(
                    isinstance(a, list) and len(a) == 2 and isinstance(a[0], str) for a in arms):
                raise Rejected(Reason.WRONG_TYPE, "'arms' is a list of [name, config] pairs",
                               "arms")
            arms = [tuple(a) for a in arms]  # a map is a [tuning] table: the registry reads it
            metrics = body.get("guardrails", ["dwell", "feedback"])
            if not isinstance(metrics, list) or not set(metrics) <= METRICS.keys():
                raise Rejected(Reason.WRONG_TYPE, f"'guardrails' lists metrics of "
                               f"{sorted(METRICS)}", "guardrails")
            experiment = await asyncio.to_thread(
                system.start_experiment, name, arms, split=body.get("split"),
                control=_text(body.get("control")), traffic=float(body.get("traffic", 1.0)),
                segment=_text(body.get("segment")), primary=body.get("primary", "ctr"),
                guardrails=tuple(metrics), window=float(body.get("window", DEFAULT_WINDOW)),
                by=by, why=why)
        elif op == "ramp":
            experiment = await asyncio.to_thread(
                system.ramp_experiment, name, float(body.get("traffic", 0)), by=by, why=why)
        elif op == "stop":
            experiment = await asyncio.to_thread(system.stop_experiment, name, by=by, why=why)
        else:
            raise Rejected(Reason.UNKNOWN_KIND, f"unknown experiment op {op!r} "
                           "(start, ramp, stop)", "op")
        return {"experiment": experiment.to_map()}

    async def _admin_stats(self, _body: dict) -> dict:
        queries = self.query_stats()
        mine = self.stats.to_map()
        rejected = Counter(mine["rejected"])
        rejected.update(queries.pop("rejected", {}))
        return {**mine, "rejected": dict(rejected), "queries": queries.get("queries", 0),
                "exposures": queries.get("exposures", 0),
                "exposures_failed": queries.get("exposures_failed", 0),
                "experiments_running": [e.name for e in self.system.experiments.running],
                "query_errors": queries.get("errors", 0), "query_processes": queries,
                "held_now": len(self._held),
                "unsettled_now": len(self._unsettled),
                "live_actors": len(self.system.directory),
                "journal_commits": self.system.journal.stats.commits,
                "segment_model_steps": self.system.context.models.steps,
                "alerts": self.system.context.watches.summary(),
                "gc": self.system.gc_pauses.to_map()}

    async def _admin_rollback(self, body: dict) -> dict:
        user = _admin_user(body, self.config.limits)
        to_seq, to_time = body.get("to"), body.get("tt")
        if (to_seq is None) == (to_time is None):
            raise Rejected(Reason.MISSING_FIELD, "give exactly one of 'to' (seq), 'tt' (time)")
        if to_seq is not None and (not isinstance(to_seq, int) or isinstance(to_seq, bool)):
            raise Rejected(Reason.WRONG_TYPE, "'to' must be an integer seq", "to")
        if to_time is not None and not isinstance(to_time, int | float):
            raise Rejected(Reason.WRONG_TYPE, "'tt' must be a time in seconds", "tt")
        outcome = await asyncio.to_thread(
            self.system.rollback, user, to_seq=to_seq, to_time=to_time,
            by=_text(body.get("by")), why=_text(body.get("why")))
        if outcome.error is not None:
            return outcome.error.to_wire()
        return {"status": outcome.status, "seq": outcome.seq}

    async def _admin_forget(self, body: dict) -> dict:
        user = _admin_user(body, self.config.limits)
        return await asyncio.to_thread(self.system.forget, user, by=_text(body.get("by")),
                                       why=_text(body.get("why")))

    async def _admin_clear_bot(self, body: dict) -> dict:
        """Clear a user's bot verdict: a `clear_bot` event in its log, naming who and why."""
        user = _admin_user(body, self.config.limits)
        extra = {k: v for k, v in (("by", body["by"]), ("why", _text(body.get("why"))))
                 if v is not None}
        event = Event(id=f"clear_bot-{uuid.uuid4().hex}", user=user, t=time.time(),
                      kind="clear_bot", extra=extra)
        outcome = await asyncio.to_thread(lambda: self.system.track_many([event])[0])
        if outcome.error is not None:
            return outcome.error.to_wire()
        return {"status": outcome.status, "seq": outcome.seq}

    async def _admin_user(self, body: dict) -> dict:
        """A user's state as a query sees it: its own weights (bias first), seq, config,
        segment, learning steps, session, bot verdict and experiment arm. Personal data: an
        admin token is needed."""
        user = _admin_user(body, self.config.limits)
        state = await asyncio.to_thread(self.system.state, user)
        configs = self.system.configs
        settled = settle(state, configs.get(state.config or None))
        h = settled.hyg
        return {"u": user, "seq": settled.seq, "config": settled.config,
                "segment": settled.segment or "default", "steps": settled.steps,
                "w": own_weights(settled, configs.get(settled.config or None)).tolist(),
                "session": None if h is None else {"number": h.session,
                                                   "start": h.session_start,
                                                   "last": h.session_last},
                "bot": None if h is None or not h.bot else h.bot,
                "arm": None if settled.arm is None else list(settled.arm)}

    # ------------------------------------------------------------ catalog

    async def _on_content(self, msg: Msg) -> None:
        seq = _stream_seq(msg)
        delivered = delivery_count(msg.reply)
        if delivered >= self.config.max_deliver:
            if refused := await self._dead_letter(msg, delivered):
                self._content_settled(seq, refused=refused)
            return
        try:
            items = decode_content(msg.data, self.config.limits)
            dim = self.system.configs.current.dim
            for item, x in items:
                if x.shape[0] != dim:
                    raise Rejected(Reason.DIMENSION,
                                   f"item {item!r} has {x.shape[0]} features, not {dim}", "x")
        except Rejected as rejected:
            if await self._reject(msg, rejected):
                self._content_settled(seq, refused=rejected)
            return
        backoff = 0.05
        while True:  # in order: the next upsert waits for this one
            try:
                await asyncio.to_thread(self.system.catalog.upsert, items)
                break
            except StoreRefused as exc:
                refused = Rejected(Reason.STORE_REFUSED, str(exc))
                if await self._reject(msg, refused):
                    self._content_settled(seq, refused=refused)
                return
            except StoreUnavailable as exc:  # an outage: retry, keeping the message alive
                if self._closing or self._ticker is None or self._ticker.done():
                    return  # stopping: JetStream delivers it again later
                log.warning("catalog.retry", error=str(exc), backoff=backoff)
                await msg.in_progress()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        await self._items_stored(seq, items)
        self.stats.content_items += len(items)
        await msg.ack()
        await self._release_held()  # events that waited for these items

    async def _items_stored(self, seq: int | None, items: list) -> None:
        self._content_settled(seq, items)  # the query processes score with them too

    def _content_settled(self, seq: int | None, items: list | tuple = (),
                         refused: Rejected | None = None) -> None:
        """A content message is settled: its items stored, or it refused (remembered for
        `info`). The floor moves on when it was the next seq; one settled out of order
        (a redelivery) is counted in when `info` reads the stream."""
        if seq is not None and refused is not None:
            self._catalog_refused[seq] = refused.to_wire()
            if len(self._catalog_refused) > CATALOG_REFUSALS_KEPT:
                old, _ = self._catalog_refused.popitem(last=False)
                self._catalog_unknown = max(self._catalog_unknown, old)
        next_one = seq is not None and seq == self.catalog_floor + 1
        self._catalog_advance(seq if next_one else self.catalog_floor, items)

    def _catalog_advance(self, floor: int, items: list | tuple = ()) -> None:
        """Raise the floor to `floor`, and feed the query processes the items with the
        floor behind them (the same pipe, in order: a process that has the floor has every
        upsert up to it)."""
        advanced = floor > self.catalog_floor
        if advanced:
            self.catalog_floor = floor
        feed_ = self.system.feed
        if feed_ is not None and (advanced or items):
            feed_.items([*items, query_process.catalog_mark(self.catalog_floor)])

    # ------------------------------------------------------------ info

    async def _on_info(self, msg: Msg) -> None:
        """`<prefix>.info`, request-reply, msgpack both ways: an empty body or a map with an
        optional `cs` (a content-stream seq, from the PubAck of an upsert). Read-only, no
        token. A bad request is answered `{v, e, m, f?}` (not recorded: it is no event or
        query)."""
        if not msg.reply:
            return
        try:
            body = msgpack.unpackb(msg.data, raw=False) if msg.data else {}
            if not isinstance(body, dict):
                raise Rejected(Reason.WRONG_TYPE, "an info request is empty or a msgpack map")
            asked = body.get("cs")
            if asked is not None and (type(asked) is not int or asked < 0):
                raise Rejected(Reason.WRONG_TYPE, "'cs' is a content-stream seq: an integer "
                               ">= 0 (the PubAck's seq of an upsert)", "cs")
            answer = await self.info(asked)
        except Rejected as rejected:
            answer = {"v": SCHEMA_VERSION, **rejected.to_wire()}
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            answer = {"v": SCHEMA_VERSION,
                      **Rejected(Reason.MALFORMED, f"bad info request: {exc}").to_wire()}
        await self.qnc.publish(msg.reply, msgpack.packb(answer, use_bin_type=True))

    async def info(self, asked: int | None = None) -> dict[str, Any]:
        """What a client needs and would otherwise find by trial: the feature dimension,
        the wire and config versions, the subjects, streams and limits, and how far the
        catalog is applied: `catalog.status` of the upsert at content-stream seq `asked`
        (default: the latest one published)."""
        cfg, p = self.config, self.config.prefix
        current = self.system.configs.current
        last = None
        try:
            state = (await self.qjs.stream_info(cfg.content_stream)).state
            last = state.last_seq
            # gone from the work queue = settled (acked after its items were fed) or purged
            self._catalog_advance(_settled_floor(state))
        except Exception as exc:  # the reply says less (no `last`), but it comes
            log.warning("info.content_stream_unread", error=repr(exc))
        queries = self._queries_floor()
        catalog: dict[str, Any] = {"items": len(self.system.catalog),
                                   "floor": self.catalog_floor, "queries": queries,
                                   "last": last}
        seq = asked if asked is not None else last
        if seq is not None:
            catalog["seq"] = seq
            catalog.update(self._catalog_status(seq, queries))
        limits = cfg.limits
        return {
            "v": SCHEMA_VERSION, "dim": current.dim, "config": current.version,
            "config_schema": CONFIG_SCHEMA, "prefix": p,
            "subjects": {"events": f"{self.events_subject}.<user>",
                         "query": f"{p}.query.<user>", "content": self.content_subject,
                         "rejected": self.rejected_subject, "info": self.info_subject,
                         "admin": f"{p}.admin.<command>"},
            "streams": {"events": cfg.events_stream, "content": cfg.content_stream,
                        "rejected": cfg.rejected_stream},
            "limits": {"payload_bytes": limits.max_payload_bytes,
                       "id_length": limits.max_id_length, "features": limits.max_dimension,
                       "candidates": limits.max_candidates, "top": limits.max_top},
            "read_wait": cfg.read_wait, "catalog_grace": cfg.catalog_grace,
            "query_processes": sum(q.serving() for q in self._queriers),
            "catalog": catalog,
        }

    def _queries_floor(self) -> int | None:
        """The catalog floor every query process has (None: one has not said yet)."""
        if not self._queriers:  # nothing further for the items to reach
            return self.catalog_floor
        for querier in self._queriers:
            querier.poll_stats()  # a floor sent since the last tick
        floors = [q.catalog_floor for q in self._queriers]
        return None if None in floors else min(floors)

    def _catalog_status(self, seq: int, queries: int | None) -> dict[str, Any]:
        refused = self._catalog_refused.get(seq)
        if refused is not None:
            return {"status": "refused", **refused}
        if 0 < seq <= self._catalog_unknown:
            return {"status": "settled"}  # before this start: applied, or refused then
        if queries is not None and seq <= queries:
            return {"status": "applied"}
        return {"status": "pending"}

    # ------------------------------------------------------------ answers from actor threads

    def _answer(self, answer: tuple) -> None:
        """Called on an actor thread: queue the answer, wake the loop once per batch."""
        self._answers.append(answer)
        if not self._drain_scheduled:
            self._drain_scheduled = True
            self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        self._drain_scheduled = False  # before popping: an answer queued later reschedules
        answers = self._answers
        batch = []
        while answers:
            batch.append(answers.popleft())
        if batch:
            task = self._loop.create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[tuple]) -> None:
        # answered: no longer in flight (counted down before the acks, which let JetStream
        # deliver more while this batch yields; `stop` waits for the tasks themselves)
        with self._in_flight_lock:
            self._in_flight -= len(batch)
        for n, (msg, outcome) in enumerate(batch, start=1):
            await self._settle(msg, outcome)
            if n % YIELD_EVERY == 0:  # a commit's acks (hundreds) must not hold up the loop
                await asyncio.sleep(0)

    async def _settle(self, msg: Msg, outcome: Outcome) -> None:
        if outcome.status == "applied":
            self.stats.applied += 1
            self._forget(msg)
            await msg.ack()
        elif outcome.status == "duplicate":
            self.stats.duplicates += 1
            self._forget(msg)
            await msg.ack()
        elif outcome.status == "rejected":
            await self._reject(msg, outcome.error)
        elif outcome.status == "moved":  # the user's partition is another worker's now
            self.stats.moved += 1
            self._forget(msg)
            await msg.nak(delay=0.5)
        else:  # failed (shutting down): let JetStream deliver it again, a bounded number of times
            self.stats.failed += 1
            self._forget(msg)
            delivered = delivery_count(msg.reply)
            if delivered >= self.config.max_deliver - 1:
                await self._dead_letter(msg, delivered)
            else:
                await msg.nak(delay=1.0)

    # ------------------------------------------------------------ connection events

    async def _on_error(self, exc: Exception) -> None:
        log.warning("nats.error", error=repr(exc))

    async def _on_disconnected(self) -> None:
        if self._closing:
            log.info("nats.closed")
        else:
            log.warning("nats.disconnected")

    async def _on_reconnected(self) -> None:
        url = getattr(self.nc.connected_url, "netloc", None)  # None once closing
        log.info("nats.reconnected", url=str(url))


# command -> the method that runs it, looked up on the instance: a fleet's worker
# overrides some (stats summed over the fleet, experiment changes announced)
_ADMIN = {command: f"_admin_{command}" for command in (
    "stats", "user", "rollback", "forget", "clear_bot", "experiment", "experiments")}
_READ_ONLY = frozenset({"stats", "experiments"})  # no admin token needed


async def _cluster_retry(call, patience: float = 30.0):
    """A JetStream API call, again while a cluster does not answer it (a stream's leader
    being elected after a node's loss, or streams made by several workers at once)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return await call()
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError,
                nats.js.errors.ServiceUnavailableError) as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("jetstream.retry", error=repr(exc))
            await asyncio.sleep(0.5)


def partition_transform(source: str, partitioned: str, partitions: int) -> api.SubjectTransform:
    """`<source>.<user>` stored as `<partitioned>.<partition>.<user>`, the partition computed
    by the server (events.partitions.partition_of computes the same)."""
    return api.SubjectTransform(
        src=f"{source}.*",
        dest=f"{partitioned}.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}")


def _transform(config: api.StreamConfig) -> tuple | None:
    t = config.subject_transform
    return None if t is None else (t.src, t.dest)


def _admin_user(body: dict, limits: Limits) -> str:
    user = body.get("u")
    if not isinstance(user, str) or not user or len(user) > limits.max_id_length:
        raise Rejected(Reason.MISSING_FIELD, "'u' (the user) is required", "u")
    return user


def _text(value: Any) -> str | None:
    return None if value is None else str(value)[:500]


def ack_info(reply: str | None) -> tuple[int, float | None]:
    """From a JetStream message's ack subject, split once: how many times it has been
    delivered (1 the first time), and when the broker stored it (seconds: the receive time
    hygiene aligns client clocks with; it stays the same on redelivery)."""
    if not reply:
        return 1, None
    tokens = reply.split(".")
    v1 = len(tokens) == 9  # v1 and v2 ack subjects
    try:
        delivered = int(tokens[4 if v1 else Msg.Ack.NumDelivered])
    except (IndexError, ValueError):
        delivered = 1
    try:
        stored = int(tokens[7 if v1 else Msg.Ack.Timestamp]) / 1e9
    except (IndexError, ValueError):
        stored = None
    return delivered, stored


def delivery_count(reply: str | None) -> int:
    return ack_info(reply)[0]


def _stream_seq(msg: Msg) -> int | None:
    """A JetStream message's seq in its stream (None for a plain NATS message)."""
    try:
        return msg.metadata.sequence.stream
    except Exception:  # not a JetStream delivery: nats-py's NotJSMessageError, or garbage
        return None


def _settled_floor(state: api.StreamState) -> int:
    """The seq up to which a work-queue stream holds nothing: every message up to it was
    acked (settled) or removed."""
    return state.last_seq if not state.messages else max(0, state.first_seq - 1)


assert Event._fields[5] == "x" and Event._fields[12] == "received"  # positional rebuilds above
