"""Query processes: content-weight queries answered outside the ingest process.

The service (adapters.nats_service) spends its interpreter lock on ingest: decode, apply,
commit, ack, thousands of times a second. A query answered in that process waits for the lock
behind it (measured: p50 1.5-3.2 s while a backlog drains). So queries are answered here, in
processes of their own, each with its own interpreter lock (command/query separation, as
event-sourced systems do it):

- The service spawns `ServiceConfig.query_processes` of them (default 1) and feeds each the
  events it commits (actors/feed.py); each keeps replicas of users' states by the same `apply`
  (actors/read_model.py) and answers from them, naming the seq it used.
- They subscribe to `<prefix>.query.*` in one queue group: NATS spreads queries among them.
- A query with `ms: N` (read your own writes) is answered once the replica reaches seq N, or
  with `timeout` after `read_wait`. A user with no replica is loaded from the store (snapshot
  and tail) on a worker thread; the event loop goes on serving others meanwhile.
- The service restarts a query process that dies; while none runs, queries time out (NATS has
  no responder), never get a wrong answer.
- A query with `l: true` is an exposure to log: its exposure event is published to the user's
  events subject on JetStream (deduplicated by its ranking id) and the reply, with that id
  (`rid`), goes out only once JetStream has stored it. If it cannot be stored, the reply
  says why (`le`) and carries no `rid`: an id is never handed out for an exposure that is
  not kept.
- Every refused query, whatever the reason (a bad body, a wrong dimension, an item not in
  the catalog, `ms` not reached, the store unreadable), is answered `{v, e, m, f?}`, counted
  by reason and recorded on `<prefix>.rejected`, one rule for all (`_refuse`).
- The catalog's floor: the service marks, behind the items it feeds, the content-stream seq
  up to which every upsert is settled (`CATALOG_MARK`); the process reports the floor it
  has (after a feed gap, only once the catalog is read again), so that `<prefix>.info` can
  say which upserts every query process can use.

A program that starts a `Service` itself must guard its entry point with
`if __name__ == "__main__":`, as any program using `multiprocessing` must: query processes are
spawned (never forked from a process with threads), and a spawned process imports the main
module again.

The event loop does everything in one thread, queries first: the feed's rows are filed in
microseconds, and applied in small turns between queries (`ReadModel.catch_up`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import multiprocessing
import os
import ssl
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import msgpack
import nats
import numpy as np
import structlog
from nats.aio.msg import Msg

from actors import feed, gc_pauses
from actors.configs import ConfigRegistry
from actors.experiments.registry import ExperimentRegistry
from actors.feed import FeedSender
from actors.latency import Latency
from actors.read_model import ReadModel
from actors.segment_model import SegmentModels
from actors.system import behind, not_reached
from actors.user import rebuild
from adapters import discovery
from adapters.client import msg_id
from adapters.logs import configure_logging, nats_callbacks
from adapters.records import record
from events.codec import decode_query, encode_error, encode_event, encode_ranking
from events.config import TuningConfig
from events.errors import Reason, Rejected
from events.exposure import exposure_event, new_rid
from events.limits import Limits
from events.types import Candidate, Query, Ranking
from store.catalog import read_items
from store.recorder import open_recorder

log = structlog.get_logger(__name__)

QUEUE_GROUP = "microtune-queries"
CATCH_UP_ROWS = 16  # rows applied per turn between queries (~40 us each)
# A pseudo-item the service sends in the feed's ITEMS messages: its one "feature" is the
# content-stream seq up to which every catalog upsert is settled, and its items are before
# it in the feed. An item id never holds a NUL (`invalid_id`), so it cannot be a real item;
# the process takes it out of its catalog as soon as a frame is filed.
CATALOG_MARK = "\x00catalog-floor"


def catalog_mark(floor: int) -> tuple[str, np.ndarray]:
    """The catalog's floor as an entry of `Feed.items`, behind the items it covers."""
    return CATALOG_MARK, np.array([float(floor)], dtype="<f8")


def send_floor(sender: FeedSender, floor: int) -> None:
    """The catalog's floor to one query process only (one that starts, or lost a backlog)."""
    sender.put(feed.ITEMS, [(CATALOG_MARK, catalog_mark(floor)[1].tobytes())], 1)


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """TLS settings that can cross to a spawned process (an `SSLContext` cannot)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca)
        if self.cert:
            ctx.load_cert_chain(self.cert, self.key)
        return ctx


def connect_options(options: dict[str, Any]) -> dict[str, Any]:
    """nats.connect options with `TlsFiles` made into an `SSLContext`."""
    tls = options.get("tls")
    return {**options, "tls": tls.context()} if isinstance(tls, TlsFiles) else options


@dataclass(frozen=True, slots=True)
class QuerySettings:
    store: str  # the store's URL, password included (never logged)
    servers: str | list[str]
    config: TuningConfig  # the service's current config (the store has it too)
    prefix: str = "microtune"
    limits: Limits = field(default_factory=Limits)
    read_wait: float = 2.0
    max_users: int = 200_000
    options: dict[str, Any] = field(default_factory=dict)  # nats.connect options
    log_level: str = "warning"
    log_json: bool = True
    index: int = 0
    # a fleet's worker's query process: it answers `<prefix>.q.<partition>.<user>` (the
    # server maps `<prefix>.query.<user>` there) for the partitions its worker holds, and
    # only while the worker says so again within this many seconds (half a lease's TTL: a
    # paused worker's partitions are no longer answered here before another can take them)
    fleet_serve_ttl: float | None = None


# ---------------------------------------------------------------- the service's side


class QueryProcess:
    """One query process, seen from the service: spawn, feed, watch, stop."""

    def __init__(self, settings: QuerySettings) -> None:
        self.settings = settings
        self.process: multiprocessing.process.BaseProcess | None = None
        self.conn: Connection | None = None
        self.stats: dict[str, Any] = {}  # the process's latest report
        self.sender: FeedSender | None = None  # the service's feed to it
        self.started = 0
        self.ready = False  # subscribed: it answers queries
        self.stage = "spawned"  # the last start-up step it reported
        self.failed: str | None = None  # why it could not start
        # the catalog's floor this process reported (None: not yet, since it started)
        self.catalog_floor: int | None = None
        self.gaps_marked = 0  # the feed's gaps after which the floor was sent again
        self._reading = threading.Lock()

    def spawn(self) -> Connection:
        """Start the process; returns the service's end of its pipe (feed it at once: the
        process files what arrives before it serves)."""
        ctx = multiprocessing.get_context("spawn")  # never fork a process with threads
        here, there = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=main, args=(self.settings, there), daemon=True,
                                   name=f"microtune-query-{self.settings.index}")
        self.process.start()
        there.close()
        self.conn = here
        self.started += 1
        self.ready = False
        self.stage = "spawned"
        self.failed = None
        self.catalog_floor = None
        self.serving_partitions = frozenset()
        self.gaps_marked = 0
        return here

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the process serves queries (its subscription is on the server)."""
        deadline = time.monotonic() + timeout
        while not self.ready and time.monotonic() < deadline:
            self._take(0.05)
            if self.failed is not None:
                raise RuntimeError(f"query process failed to start: {self.failed}")
            if not self.ready and not self.alive():
                raise RuntimeError(f"query process exited with code {self.process.exitcode}")
        if not self.ready:
            raise TimeoutError(f"query process {self.process.pid} not ready within "
                               f"{timeout} s (its last step: {self.stage})")

    def _take(self, wait: float = 0.0) -> None:
        """Read what the process sent: start-up steps, ready, a failure, stats. One reader
        at a time (the service's loop polls stats while a worker thread waits for ready):
        two readers of one pipe split its messages, and one took the other's "ready"."""
        conn = self.conn
        if conn is None:
            return
        with contextlib.suppress(EOFError, OSError):
            conn.poll(wait)  # waits without the lock: the loop's poll must never wait for it
        if not self._reading.acquire(blocking=False):
            return  # the other reader takes what came, for both
        try:
            with contextlib.suppress(EOFError, OSError):
                while conn.poll(0):
                    message = msgpack.unpackb(conn.recv_bytes(), raw=False)
                    if "stats" in message:
                        self.stats = message["stats"]
                    elif "catalog" in message:
                        self.catalog_floor = message["catalog"]
                    elif "partitions" in message:
                        self.serving_partitions = frozenset(message["partitions"])
                    elif message.get("ready"):
                        self.ready = True
                    elif "failed" in message:
                        self.failed = message["failed"]
                    else:
                        self.stage = message.get("stage", self.stage)
        finally:
            self._reading.release()

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def serving(self) -> bool:
        return self.ready and self.alive()

    def poll_stats(self) -> None:
        """Take the reports the process sent (once a second)."""
        self._take()

    def stop(self, timeout: float = 10.0) -> None:
        if self.conn is not None:
            self.conn.close()  # the process sees the end of its feed and exits
        if self.process is not None:
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(timeout)


# ---------------------------------------------------------------- the process


def main(settings: QuerySettings, conn: Connection) -> None:
    """The query process's entry point."""
    configure_logging(settings.log_level, json=settings.log_json)  # to stderr
    try:
        asyncio.run(QueryServer(settings, conn).run())
    except Exception as exc:
        log.exception("query_process.failed")
        with contextlib.suppress(OSError):
            conn.send_bytes(msgpack.packb({"failed": repr(exc)}))
        raise SystemExit(1) from exc


@dataclass(slots=True)
class QueryStats:
    queries: int = 0
    errors: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    waited: int = 0  # queries that waited for their `ms`
    exposures: int = 0  # exposures logged (stored by JetStream)
    exposures_failed: int = 0  # exposures asked for that could not be stored
    loads_failed: int = 0
    loop_errors: int = 0  # callbacks or tasks of the event loop that raised


class QueryServer:
    def __init__(self, settings: QuerySettings, conn: Connection) -> None:
        self.settings = settings
        self.conn = conn
        self.stats = QueryStats()
        self.subject = f"{settings.prefix}.query"
        self.fleet_subject = f"{settings.prefix}.q"  # `.<partition>.<user>` (a fleet)
        self._partition_subs: dict[int, Any] = {}
        self._told = 0.0  # when the worker last named its partitions (monotonic)
        self._serving_task: asyncio.Task | None = None
        self._serving_logged: list[int] = []
        self.rejected_subject = f"{settings.prefix}.rejected"
        self.events_subject = f"{settings.prefix}.events"
        self._loads: dict[str, asyncio.Task] = {}
        self._waiting: set[asyncio.Task] = set()  # answers that wait for a load or a seq
        self._catching_up = False
        self._stopped: asyncio.Event | None = None
        self.catalog_floor: int | None = None  # every upsert up to it is in the catalog
        self._rereads = 0  # catalog reads after a feed gap, in flight
        self._floor_waiting: int | None = None  # a floor received while the catalog is read

    async def run(self) -> None:
        s = self.settings
        loop = self.loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._on_loop_error)
        self._stopped = asyncio.Event()
        self._send({"stage": "opening the store"})
        self.recorder = open_recorder(s.store, upgrade=False)
        configs = ConfigRegistry(self.recorder, s.config)
        models = SegmentModels()
        models.load(self.recorder.segment_models())
        self.model = ReadModel(configs, models, read_items(self.recorder),
                               max_users=s.max_users,
                               experiments=ExperimentRegistry(self.recorder))
        self._gaps_seen = 0
        # everything loaded so far (modules, catalog, models) out of the collector's sight
        # before the first query: a full collection then would pause it (53 ms measured)
        gc.collect()
        gc.freeze()
        self.collector = gc_pauses.Scheduled()  # collections on our schedule (see there)
        self.latency = Latency()  # arrival to reply, reported with the stats
        self.gc = gc_pauses.watch()  # the serving path's pauses, from here on
        threading.Thread(target=self._receive, name="microtune-feed", daemon=True).start()
        self._send({"stage": "connecting to NATS"})
        self.nc = await nats.connect(s.servers, name=f"microtune-queries-{s.index}",
                                     max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                                     **nats_callbacks(), **connect_options(s.options))
        self.js = self.nc.jetstream()
        # the query endpoint of the NATS service `microtune` (adapters/discovery.py), in the
        # query processes' queue group; a fleet's subscribes per partition (`_serve`)
        self.micro = None
        if s.fleet_serve_ttl is None:
            self.micro = await discovery.register(self.nc, "queries", [
                ("query", f"{self.subject}.*", self._on_query)], queue_group=QUEUE_GROUP)
            # on a server with a fleet's query mapping (adapters/fleet), queries arrive as
            # `<prefix>.q.<partition>.<user>`: a single service answers them all
            await self.nc.subscribe(f"{self.fleet_subject}.*.*", queue=QUEUE_GROUP,
                                    cb=self._on_query)
        self._send({"stage": "subscribing"})
        self._serve_partitions()  # what the worker said before we were connected
        await self.nc.flush()
        self._send({"ready": True})
        log.info("query_process.ready", index=s.index)
        reporter = loop.create_task(self._report())
        expiry = None if s.fleet_serve_ttl is None else loop.create_task(self._expire())
        await self._stopped.wait()
        reporter.cancel()
        if expiry is not None:
            expiry.cancel()
        if self._waiting:  # answered within read_wait (a load may fail first)
            await asyncio.wait(self._waiting, timeout=s.read_wait + 1)
        if self.nc.is_connected:
            await self.nc.drain()
        else:  # the server is gone (a killed supervisor took it): nothing left to drain
            await self.nc.close()
        self.recorder.close()

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """A callback or task failed: counted (`loop_errors` in the stats) and logged."""
        self.stats.loop_errors += 1
        log.error("query_process.loop_error", message=context.get("message"),
                  error=repr(context.get("exception")))

    # ------------------------------------------------------------ the feed

    def _receive(self) -> None:
        """The feed thread: hand each frame to the loop (it waits in `recv`, without the
        interpreter lock, most of the time)."""
        call = self.loop.call_soon_threadsafe
        while True:
            try:
                data = self.conn.recv_bytes()
            except (EOFError, OSError):  # the service closed the feed, or died: stop too
                call(self._stopped.set)
                return
            call(self._on_frame, data)

    def _on_frame(self, data: bytes) -> None:
        self.model.on_frame(data)
        if self.model.stats.gaps != self._gaps_seen:  # what the dropped backlog carried
            self._gaps_seen = self.model.stats.gaps
            self._rereads += 1  # before the floor below: it waits for this read
            task = self.loop.create_task(self._reread())
            self._waiting.add(task)
            task.add_done_callback(self._waiting.discard)
        if self.model.partition_frames:  # a fleet's worker named its partitions (again)
            self.model.partition_frames = 0
            self._told = time.monotonic()
            self._serve_partitions()
        mark = self.model.catalog.pop(CATALOG_MARK, None)  # never an item to queries
        if mark is not None:
            self._floor(int(mark[0]))
        self.collector.turn()
        if not self._catching_up:
            self._catching_up = True
            self.loop.call_soon(self._catch_up)

    def _catch_up(self) -> None:
        # a small turn, then the back of the queue: queries that came meanwhile go first
        more = self.model.catch_up(CATCH_UP_ROWS)
        self.collector.turn()
        if more:
            self.loop.call_soon(self._catch_up)
        else:
            self._catching_up = False

    async def _reread(self) -> None:
        """After a feed gap: the catalog's items and the experiments, from the store."""
        try:
            items = await asyncio.to_thread(read_items, self.recorder)
            await asyncio.to_thread(self.model.experiments.refresh)
        except Exception as exc:  # the next gap, or a restart, tries again
            log.warning("query_process.reread_failed", error=repr(exc))
            return  # the floor waits: upserts the gap dropped may be missing still
        finally:
            self._rereads -= 1
        self.model.catalog.update(items)
        if not self._rereads and self._floor_waiting is not None:
            floor, self._floor_waiting = self._floor_waiting, None
            self._floor(floor)

    def _floor(self, floor: int) -> None:
        """The service's catalog floor reached this process: report it, unless the catalog
        is being read again after a gap (the dropped backlog may have held its items)."""
        if self._rereads:
            self._floor_waiting = max(floor, self._floor_waiting or 0)
            return
        if floor != self.catalog_floor:
            self.catalog_floor = floor
            self._send({"catalog": floor})  # at once: `<prefix>.info` waits for no report

    # ------------------------------------------------------------ a fleet's partitions

    def _serve_partitions(self) -> None:
        if self.settings.fleet_serve_ttl is None or getattr(self, "nc", None) is None:
            return  # (not connected yet: `run` calls again once it is)
        if self._serving_task is None or self._serving_task.done():
            self._serving_task = self.loop.create_task(self._resubscribe())

    async def _resubscribe(self) -> None:
        """Subscribe to the partitions the worker holds, unsubscribe from the others (until
        they agree: the worker may speak again meanwhile), then tell the worker."""
        while True:
            held = self._held()
            current = frozenset(self._partition_subs)
            if held == current:
                break
            for partition in current - held:
                await self._partition_subs.pop(partition).unsubscribe()
            for partition in held - current:
                self._partition_subs[partition] = await self.nc.subscribe(
                    f"{self.fleet_subject}.{partition}.*", queue=QUEUE_GROUP,
                    cb=self._on_query)
            await self.nc.flush()
        self._serving_task = None
        serving = sorted(self._partition_subs)
        self._send({"partitions": serving})
        if serving != self._serving_logged:
            self._serving_logged = serving
            log.info("query_process.partitions", index=self.settings.index, partitions=serving)

    def _held(self) -> frozenset[int]:
        """What the worker holds, as it last said, if it said so recently enough."""
        ttl = self.settings.fleet_serve_ttl
        if self.model.partitions is None or ttl is None or \
                time.monotonic() - self._told > ttl:
            return frozenset()
        return self.model.partitions[1]

    async def _expire(self) -> None:
        """A worker that stopped speaking (paused, or its feed is stuck) holds nothing here."""
        ttl = self.settings.fleet_serve_ttl
        while True:
            await asyncio.sleep(ttl / 8)
            if self._partition_subs and not self._held():
                log.warning("query_process.partitions_expired", index=self.settings.index)
                self.model.drop(lambda _user: True)
                self._serve_partitions()

    def _send(self, message: dict) -> None:
        try:
            self.conn.send_bytes(msgpack.packb(message, use_bin_type=True))
        except OSError:
            self._stopped.set()

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.collector.second()  # no full collection pauses (see gc_pauses)
            m = self.model.stats
            self._send({"stats": {
                "queries": self.stats.queries, "errors": self.stats.errors,
                "rejected": dict(self.stats.rejected), "waited": self.stats.waited,
                "exposures": self.stats.exposures,
                "exposures_failed": self.stats.exposures_failed,
                "loads_failed": self.stats.loads_failed, "replicas": len(self.model),
                "loop_errors": self.stats.loop_errors, "behind": self.model.behind,
                "rows": m.rows, "applied": m.applied, "loads": m.loads, "gaps": m.gaps,
                "holes": m.holes, "evicted": m.evicted,
                "catalog_items": len(self.model.catalog), "catalog_floor": self.catalog_floor,
                "cpu_s": round(time.process_time(), 2), "rss_mib": _rss_mib(),
                "latency": self.latency.to_map(),
                "gc": self.gc.to_map()}})

    # ------------------------------------------------------------ queries

    async def _on_query(self, msg: Msg) -> None:
        self.stats.queries += 1
        began = time.perf_counter()
        try:
            subject = msg.subject
            user = subject[len(self.subject) + 1:] if subject.startswith(self.subject) \
                else subject.rsplit(".", 1)[-1]  # a fleet's `<prefix>.q.<partition>.<user>`
            query = decode_query(msg.data, self.settings.limits, subject_user=user)
            if query.matrix is None and any(c.x is None for c in query.candidates):
                query = query._replace(candidates=tuple(self._resolve(c)
                                                        for c in query.candidates))
        except Rejected as rejected:
            await self._refuse(msg, rejected)
            return
        if not msg.reply:  # nobody waits for an answer: a well-formed query is not ranked
            return
        answer = self.model.rank(query)
        if answer is None or behind(query, answer) or query.log or (
                isinstance(answer, Ranking) and answer.log):
            # nats-py runs this subscription's callbacks one after another: a query that
            # waits (for a load, a seq, or JetStream to store its exposure) must wait aside,
            # or every query behind it waits too
            task = self.loop.create_task(self._answer_later(query, answer, msg, began))
            self._waiting.add(task)
            task.add_done_callback(self._waiting.discard)
            return
        await self._reply(msg, answer, began)

    async def _answer_later(self, query: Query, answer: Ranking | Rejected | None,
                            msg: Msg, began: float) -> None:
        answer = await self._awaited(query, answer)
        if isinstance(answer, Ranking) and answer.log:
            answer = await self._logged(query, answer)
        await self._reply(msg, answer, began)

    async def _reply(self, msg: Msg, answer: Ranking | Rejected, began: float) -> None:
        if isinstance(answer, Rejected):  # refused while ranking: as a bad body is
            await self._refuse(msg, answer)
        else:
            await self.nc.publish(msg.reply, encode_ranking(answer))
            self.latency.observe(time.perf_counter() - began)

    async def _logged(self, query: Query, ranking: Ranking) -> Ranking:
        """Store the ranking's exposure on the events stream, then name it in the reply."""
        rid = ranking.rid or new_rid()
        body = encode_event(exposure_event(query, ranking, rid, time.time()))
        if len(body) > self.settings.limits.max_payload_bytes:  # ingest would refuse it
            self.stats.exposures_failed += 1
            return dataclasses.replace(ranking, rid=None, log_error=(
                f"the exposure ({len(body)} bytes with its candidates) exceeds the "
                f"{self.settings.limits.max_payload_bytes}-byte limit; fewer candidates"))
        try:
            await self.js.publish(f"{self.events_subject}.{query.user}", body,
                                  timeout=self.settings.read_wait,
                                  headers={"Nats-Msg-Id": msg_id(query.user, rid)})
        except Exception as exc:  # no stream, a timeout, a disconnect: say so, rank anyway
            self.stats.exposures_failed += 1
            log.warning("exposure.not_logged", user_id=query.user, event_id=rid,
                        error=repr(exc))
            return dataclasses.replace(ranking, rid=None, log_error="the exposure could not be "
                                       f"stored ({type(exc).__name__}); retry to log it")
        self.stats.exposures += 1
        return dataclasses.replace(ranking, rid=rid)

    async def _awaited(self, query: Query, answer: Ranking | Rejected | None):
        """Load the user from the store if it has no replica; with `ms`, wait (bounded)
        until the replica reaches that seq."""
        deadline = time.monotonic() + self.settings.read_wait
        if answer is None:
            try:
                await self._load(query.user)
            except Exception as exc:
                self.stats.loads_failed += 1
                log.warning("query.load_failed", user_id=query.user, error=repr(exc))
                return Rejected(Reason.UNAVAILABLE, "the store could not be read; retry")
            answer = self.model.rank(query)
            if answer is None:  # dropped again at once (a hole): the store is the answer
                await self._load(query.user)
                answer = self.model.rank(query)
        if query.min_seq is not None:
            self.stats.waited += 1
        while behind(query, answer) and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
            answer = self.model.rank(query) or answer
        if behind(query, answer):
            answer = not_reached(query, answer, self.settings.read_wait)
        return answer or Rejected(Reason.UNAVAILABLE, "the user could not be loaded; retry")

    async def _load(self, user: str) -> None:
        task = self._loads.get(user)
        if task is None:
            task = self._loads[user] = self.loop.create_task(self._do_load(user))
        await asyncio.shield(task)

    async def _do_load(self, user: str) -> None:
        self.model.begin_load(user)
        try:
            state, _ = await asyncio.to_thread(rebuild, self.recorder, self.model.configs, user)
        except BaseException:
            self.model.abandon_load(user)
            raise
        finally:
            del self._loads[user]
        self.model.stats.loads += 1
        self.model.finish_load(user, state)

    def _resolve(self, candidate: Candidate) -> Candidate:
        if candidate.x is not None:
            return candidate
        x = self.model.catalog.get(candidate.item)
        if x is None:
            raise Rejected(Reason.MISSING_FIELD,
                           f"item {candidate.item!r} is not in the catalog; send its features",
                           "c")
        return candidate._replace(x=x)

    async def _refuse(self, msg: Msg, rejected: Rejected) -> None:
        """Every refused query alike: the error to the requester, counted by reason, and its
        record on `<prefix>.rejected` (core NATS, no ack awaited: a query is not retried by
        JetStream, and the requester has its answer either way)."""
        self.stats.errors += 1
        reason = rejected.reason.value
        self.stats.rejected[reason] = self.stats.rejected.get(reason, 0) + 1
        if msg.reply:
            await self.nc.publish(msg.reply, encode_error(rejected))
        subject = msg.subject  # as the client asked: a fleet's server mapped it to q.<n>.<user>
        if not subject.startswith(self.subject):
            subject = f"{self.subject}.{subject.rsplit('.', 1)[-1]}"
        await self.nc.publish(self.rejected_subject, record(subject, bytes(msg.data), rejected))


def _rss_mib() -> int:
    """This process's resident memory (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 2**20
    except (OSError, ValueError):
        return 0

