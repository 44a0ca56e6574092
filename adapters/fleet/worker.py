"""A fleet's worker: the service (adapters/nats_service.py) on the partitions it holds.

Users are split into P partitions (events/partitions.py; P is recorded in the store). The
events stream stores `<prefix>.events.<user>` as `<prefix>.p.<partition>.<user>`, and each
partition has a durable consumer of its own, `<durable>-p<n>`. A worker consumes the
partitions it holds a lease on (adapters/fleet/leases.py, NATS KV with a TTL) and nothing else:

- **Gaining** a partition: claim it in the store (its epoch goes up: a former owner's writes
  are refused from now on, store/fencing.py), learn the users others created in it, tell the
  query processes to answer its queries, then consume it.
- **Handing it off** (another worker joined, or this one stops): stop consuming it, give
  held events back to JetStream, wait for what is in flight to settle, stop answering its
  queries, passivate its users (a snapshot each), then release the lease. Lease renewals go
  on meanwhile (a hand-off runs aside).
- **Losing** it (a renewal failed: this worker was paused or cut off past the TTL, and
  another may hold it): stop consuming and answering it at once and drop its users without
  writing; whatever was in flight is refused by the store and handed back (`moved`).

Queries reach the owner in one hop: the server maps `<prefix>.query.<user>` to
`<prefix>.q.<partition>.<user>` (`query_mapping`; the embedded server is configured with it),
and each worker's query processes subscribe to the partitions it holds, only while it keeps
saying so (adapters/query_process.py). During a hand-off a partition has no responder for a
moment; clients retry on "no responders" (adapters/client.py).

One worker, the holder of partition 0, also consumes the catalog (the content stream is a
work queue): it stores each upsert and then publishes the items on `<prefix>.fleet.items`
(stream MICROTUNE_FLEET), which every worker follows from its start to keep its catalog and
its query processes' current. It also drains `<prefix>.events.>` subjects the transform does
not partition (stored before the stream was partitioned: published again, to their partition;
not one token: refused as the service refuses them).

Admin commands about one user (rollback, forget, clear_bot, user) are forwarded to the
owner of the user's partition on `<prefix>.fleet.admin.<partition>.<command>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgpack
import numpy as np
import structlog
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import api

from actors.system import Microtune
from adapters.fleet import stats as fleet_stats
from adapters.fleet.leases import LeaseSettings, PartitionLeases
from adapters.nats_service import Service, ServiceConfig
from events.errors import Reason, Rejected
from events.partitions import partition_of

log = structlog.get_logger(__name__)

# admin commands about one user: the owner of its partition runs them
USER_COMMANDS = frozenset({"rollback", "forget", "clear_bot", "user"})
_F64 = np.dtype("<f8")


@dataclass(frozen=True)
class FleetSettings:
    worker: str  # this worker's id: one NATS token, unique in the fleet
    lease_ttl: float = 10.0  # a dead worker's partitions move after this long
    bucket: str = "microtune_leases"
    handoff_timeout: float = 30.0  # how long a hand-off waits for in-flight events
    # how often a worker sends the others what its segment models learned (a delta): the
    # quality harness loses 0.0003 AUC merging every 1,000 ratings, 0.0031 every 10,000
    exchange_every: float = 0.1
    fleet_stream: str = "MICROTUNE_FLEET"


def query_mapping(prefix: str, partitions: int) -> dict[str, str]:
    """The server's subject mapping that takes a query to its partition's owner."""
    return {f"{prefix}.query.*":
            f"{prefix}.q.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}"}


class Worker(Service):
    """One worker of a fleet: a `Service` whose events come from the partitions it holds."""

    def __init__(self, system: Microtune, config: ServiceConfig | None,
                 fleet: FleetSettings) -> None:
        if system.fence is None:
            raise ValueError("a fleet's worker writes through a fence: Microtune(fleet=True)")
        super().__init__(system, config)
        self.fleet = fleet
        self.born = time.time()  # before the catalog was read: items since then are followed
        self.query_serve_ttl = fleet.lease_ttl / 2
        self.leases: PartitionLeases | None = None
        self.serving: set[int] = set()  # partitions consumed and answered here
        self._partition_subs: dict[int, Any] = {}
        self._admin_subs: dict[int, Any] = {}
        self._catalog_subs: list = []  # the content and stray consumers (partition 0's)
        self._handing_off: dict[int, asyncio.Task] = {}
        self._lease_loop: asyncio.Task | None = None
        self._items_sub = None
        self._changed_sub = None
        self._released_sub = None
        self._rebalancing = asyncio.Lock()
        self._exchange_task: asyncio.Task | None = None
        self.deltas_sent = self.deltas_added = 0
        p = self.config.prefix
        self.fleet_subject = f"{p}.fleet"

    # ------------------------------------------------------------ lifecycle

    async def resume_consuming(self) -> None:
        """Join the fleet: leases, then the partitions this worker should hold."""
        if self.leases is not None:
            return
        cfg = self.config
        # a single service's consumer would overlap ours on the work queue; none runs
        # beside a fleet (the store's lease is shared by workers or held by one service)
        await self._delete_consumers(lambda name: name == cfg.durable)
        await self._ensure_fleet_stream()
        self._items_sub = await self.js.subscribe(
            f"{self.fleet_subject}.items", cb=self._on_items, ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.BY_START_TIME,
            config=api.ConsumerConfig(opt_start_time=_iso(self.born - 5.0)))
        self._changed_sub = await self.qnc.subscribe(f"{self.fleet_subject}.changed",
                                                     cb=self._on_changed)
        self._released_sub = await self.qnc.subscribe(f"{self.fleet_subject}.released",
                                                      cb=self._on_released)
        await self.qnc.subscribe(f"{self.fleet_subject}.stats", cb=self._on_fleet_stats)
        await self._take_fleet_models()
        self.system.context.models.start_sharing()
        await self.qnc.subscribe(f"{self.fleet_subject}.models", cb=self._on_models)
        await self.qnc.subscribe(f"{self.fleet_subject}.models.full",
                                 queue="microtune-fleet-models", cb=self._on_models_full)
        self._exchange_task = asyncio.create_task(self._exchange())
        self.leases = PartitionLeases(self.js, self.fleet.worker, LeaseSettings(
            partitions=self.partitions, ttl=self.fleet.lease_ttl, bucket=self.fleet.bucket,
            replicas=self.config.replicas))
        await self.leases.start()
        await self._rebalance()  # before `start` returns: ready means serving
        self._lease_loop = asyncio.create_task(self._renewals())

    async def stop_consuming(self) -> None:
        """Leave the fleet: every partition handed off, the leases released."""
        if self._lease_loop is not None:
            self._lease_loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lease_loop
            self._lease_loop = None
        if self.leases is None:
            return
        for task in list(self._handing_off.values()):
            with contextlib.suppress(Exception):
                await task
        await asyncio.gather(*(self._hand_off(n) for n in sorted(self.leases.held)),
                             return_exceptions=True)
        if self._exchange_task is not None:
            self._exchange_task.cancel()
            await self._send_delta()  # the last of what this worker learned
        if self._items_sub is not None:
            with contextlib.suppress(Exception):
                await self._items_sub.unsubscribe()
        await self.leases.stop()
        self.leases = None

    def readiness(self) -> tuple[bool, dict[str, bool]]:
        _ready, checks = super().readiness()
        checks["events_consumer_attached"] = self.leases is not None
        # the catalog is partition 0's holder's to consume; every worker follows its items
        checks["catalog_loaded"] = checks["started"] and self._items_sub is not None
        return all(checks.values()), checks

    async def _consume_catalog(self) -> None:
        """Partition 0's holder consumes the catalog (`_consume_partition`)."""

    # ------------------------------------------------------------ leases

    async def _renewals(self) -> None:
        while True:
            await asyncio.sleep(self.leases.settings.renew_every)
            try:
                await self._rebalance()
            except Exception as exc:  # the next round tries again (renewals have slack)
                log.error("fleet.rebalance_failed", worker=self.fleet.worker, error=repr(exc))
            await self._catch_up_changes()

    async def _catch_up_changes(self) -> None:
        """Read experiments and configs again: a `changed` notice is core NATS, lost if this
        worker was disconnected when it went out; this bounds how long a worker ranks by a
        stale experiment to one renewal interval (a quarter of the lease TTL)."""
        try:
            if await asyncio.to_thread(self.system.reload_experiments):
                log.info("fleet.changes_caught_up", worker=self.fleet.worker)
        except Exception as exc:  # the store is down: the next round
            log.warning("fleet.reload_failed", error=repr(exc))

    async def _on_released(self, _msg: Msg) -> None:
        if self.leases is None or self._lease_loop is None:
            return
        try:
            await self._rebalance()
        except Exception as exc:  # the renewal round tries again
            log.warning("fleet.rebalance_failed", error=repr(exc))

    async def _rebalance(self) -> None:
        async with self._rebalancing:  # one round at a time (renewals, a release notice)
            await self._rebalance_once()

    async def _rebalance_once(self) -> None:
        plan = await self.leases.rebalance()
        for partition in sorted(plan.lost):
            await self._lose(partition)
        for partition in sorted(plan.hand_off - self._handing_off.keys()):
            self._handing_off[partition] = asyncio.create_task(self._hand_off(partition))
        gained = await self._claim(sorted(plan.gained))
        if gained:  # their queries answered here before their events are applied here
            self._tell_query_processes()
            if not await self._query_processes_until(
                    lambda serving: gained <= serving, time.monotonic() + 5.0):
                log.warning("fleet.queries_not_served", partitions=sorted(gained))
        for partition in sorted(gained):
            await self._consume_partition(partition)
        self._tell_query_processes()

    def _tell_query_processes(self) -> None:
        """Again at every renewal: they answer a partition only while told so."""
        if self.system.feed is not None:
            self.system.feed.partitions(self.partitions, sorted(self.serving))

    async def _claim(self, partitions: list[int]) -> set[int]:
        """Claim partitions in the store (each one's epoch goes up), then learn their users;
        the ones claimed. One the store did not take is released (the store is down: another
        worker, or a later round, takes it)."""
        epochs: dict[int, int] = {}
        for partition in partitions:
            try:
                epochs[partition] = await asyncio.to_thread(
                    self.system.recorder.claim, partition, self.fleet.worker,
                    self.partitions, time.time())
            except Exception as exc:
                log.error("fleet.claim_failed", partition=partition, error=repr(exc))
                await self.leases.release(partition)
        if not epochs:
            return set()
        try:
            await asyncio.to_thread(self.system.take_partitions, epochs)
        except Exception as exc:
            log.error("fleet.claim_failed", partitions=sorted(epochs), error=repr(exc))
            for partition in epochs:
                await self.leases.release(partition)
            return set()
        self.serving.update(epochs)
        return set(epochs)

    async def _consume_partition(self, partition: int) -> None:
        cfg = self.config
        self._admin_subs[partition] = await self.qnc.subscribe(
            f"{self.fleet_subject}.admin.{partition}.*", cb=self._on_admin)
        if partition == 0:
            await self._take_catalog()
        self._partition_subs[partition] = await self._consume(
            cfg.events_stream, f"{self.partitioned_subject}.{partition}.*",
            f"{cfg.durable}-p{partition}", self._on_event,
            max(100, cfg.max_ack_pending // self.partitions))
        log.info("fleet.partition_gained", worker=self.fleet.worker, partition=partition)

    async def _take_catalog(self) -> None:
        cfg = self.config
        self._catalog_subs = [
            await self._consume(cfg.content_stream, self.content_subject,
                                f"{cfg.durable}-content", self._on_content, 1000),
            await self._consume(cfg.events_stream, f"{self.events_subject}.>",
                                f"{cfg.durable}-stray", self._on_stray, 1000)]

    async def _stop_partition(self, partition: int) -> None:
        """Stop taking its events (the durable consumer keeps its place) and its admin."""
        for subs in (self._partition_subs, self._admin_subs):
            sub = subs.pop(partition, None)
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        if partition == 0:
            for sub in self._catalog_subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            self._catalog_subs = []
        # events held for their item go back to JetStream, for whoever consumes next
        for _event, msg in self._held.drain(self._chooser(partition)):
            self._forget(msg)
            with contextlib.suppress(Exception):
                await msg.nak()

    async def _hand_off(self, partition: int) -> None:
        try:
            await self._stop_partition(partition)
            deadline = time.monotonic() + self.fleet.handoff_timeout
            while self._in_flight_of(partition) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            self._drain()
            # its users' snapshots while queries are still answered here: nothing changes
            # them any more, and the next owner cannot start before the release
            await asyncio.to_thread(self.system.give_up_partitions, {partition},
                                    timeout=max(1.0, deadline - time.monotonic()))
            self.serving.discard(partition)
            self._tell_query_processes()
            await self._query_processes_until(lambda serving: partition not in serving,
                                              deadline + 5.0)
            if self.leases is not None:
                await self.leases.release(partition)
                # the next owner looks now, not at its next renewal
                await self.qnc.publish(f"{self.fleet_subject}.released",
                                       str(partition).encode())
            log.info("fleet.partition_handed_off", worker=self.fleet.worker,
                     partition=partition)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a task of its own: say so (its lease expires by the TTL)
            log.error("fleet.hand_off_failed", worker=self.fleet.worker, partition=partition,
                      error=repr(exc))
        finally:
            self._handing_off.pop(partition, None)

    async def _lose(self, partition: int) -> None:
        log.warning("fleet.partition_lost", worker=self.fleet.worker, partition=partition)
        task = self._handing_off.pop(partition, None)
        if task is not None:
            task.cancel()
        await self._stop_partition(partition)
        self.serving.discard(partition)
        self._tell_query_processes()
        await asyncio.to_thread(self.system.give_up_partitions, {partition}, snapshot=False)

    def _in_flight_of(self, partition: int) -> bool:
        """Is a message of the partition still unsettled here? (stops at the first)"""
        return any(self._partition_of_subject(msg.subject) == partition
                   for msg in list(self._unsettled.values()))

    def _partition_of_subject(self, subject: str) -> int | None:
        if not subject.startswith(self.partitioned_subject):
            return None
        return int(subject.split(".", self._user_split)[-2])

    def _chooser(self, partition: int):
        count = self.partitions
        return lambda user: partition_of(user, count) == partition

    async def _query_processes_until(self, agree, deadline: float) -> bool:
        """Wait until the partitions every running query process confirms answering (on
        its pipe) satisfy `agree`; False at the deadline. (A gain waits a little: lease
        renewals wait with it.)"""
        while True:
            for querier in self._queriers:
                querier.poll_stats()
            if all(agree(q.serving_partitions) for q in self._queriers if q.serving()):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)

    # ------------------------------------------------------------ the catalog

    async def _ensure_fleet_stream(self) -> None:
        await self._ensure_stream(api.StreamConfig(
            name=self.fleet.fleet_stream, subjects=[f"{self.fleet_subject}.items"],
            retention=api.RetentionPolicy.LIMITS, storage=api.StorageType.FILE,
            max_age=7 * 86400.0, num_replicas=self.config.replicas))

    async def _items_stored(self, seq: int | None, items: list) -> None:
        """Tell every worker (before the upsert is acked: a failure here redelivers it)."""
        body = msgpack.packb({"w": self.fleet.worker, "s": seq, "i": [
            (item, np.ascontiguousarray(x, _F64).tobytes()) for item, x in items]},
            use_bin_type=True)
        await self.js.publish(f"{self.fleet_subject}.items", body)
        await super()._items_stored(seq, items)

    async def _on_items(self, msg: Msg) -> None:
        """Items a worker stored: into this worker's catalog and its query processes."""
        try:
            body = msgpack.unpackb(msg.data, raw=False)
            if body["w"] == self.fleet.worker and body["s"] is not None:
                return  # ours: settled when stored
            items = [(item, np.frombuffer(raw, _F64)) for item, raw in body["i"]]
        except Exception as exc:  # not ours to write: skip it, loudly
            log.error("fleet.items_unreadable", error=repr(exc))
            return
        self.system.catalog.cache(items)
        self._content_settled(body["s"], items)
        await self._release_held()

    async def _on_stray(self, msg: Msg) -> None:
        """`<prefix>.events.<...>` the transform left alone: stored before the stream was
        partitioned (published again, to its partition), or not one token (refused)."""
        user = self.subject_user(msg.subject)
        if "." in user or not user:
            await self._on_event(msg)  # the service's own refusal, recorded
            return
        headers = {k: v for k, v in (msg.headers or {}).items() if k != "Nats-Msg-Id"}
        try:  # (without its id: the broker may still remember it, and drop the copy)
            await self.js.publish(f"{self.events_subject}.{user}", msg.data,
                                  headers=headers or None)
        except Exception as exc:  # not moved: it comes back
            log.warning("fleet.stray_not_moved", error=repr(exc))
            return
        await msg.ack()

    # ------------------------------------------------------------ admin

    async def _on_admin(self, msg: Msg) -> None:
        """A command about one user runs on the owner of its partition."""
        command = msg.subject.rsplit(".", 1)[-1]
        if msg.reply and command in USER_COMMANDS and msg.subject.startswith(
                f"{self.config.prefix}.admin."):
            user = _user_of(msg.data)
            if user is not None:
                partition = partition_of(user, self.partitions)
                if partition not in self.serving:
                    await self._forward(msg, partition, command)
                    return
        await super()._on_admin(msg)

    async def _forward(self, msg: Msg, partition: int, command: str) -> None:
        subject = f"{self.fleet_subject}.admin.{partition}.{command}"
        deadline = time.monotonic() + 30.0
        while True:
            try:
                reply = await self.qnc.request(subject, msg.data, timeout=60.0)
                await self.qnc.publish(msg.reply, reply.data)
                return
            except NoRespondersError:  # a hand-off: the next owner comes within a lease
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            except NatsTimeout:
                break
        answer = Rejected(Reason.TIMEOUT, f"no owner of partition {partition} answered")
        await self.qnc.publish(msg.reply, msgpack.packb(answer.to_wire(), use_bin_type=True))

    # ------------------------------------------------------------ segment models

    async def _exchange(self) -> None:
        while True:
            await asyncio.sleep(self.fleet.exchange_every)
            try:
                await self._send_delta()
            except Exception as exc:  # lost learning of one interval, not history
                log.warning("fleet.delta_not_sent", error=repr(exc))

    async def _send_delta(self) -> None:
        """What this worker's segment models learned since the last call, to the others
        (core NATS: a delta lost in a disconnection is a moment of shared learning lost,
        never a user's exactness: each logged event carries the score it was learned with)."""
        delta = await asyncio.to_thread(self.system.context.models.take_delta)
        if delta and self.qnc is not None and self.qnc.is_connected:
            await self.qnc.publish(f"{self.fleet_subject}.models", msgpack.packb(
                {"w": self.fleet.worker, "d": delta}, use_bin_type=True))
            self.deltas_sent += 1

    async def _take_fleet_models(self) -> None:
        """Start from a running worker's segment models (what the whole fleet has learned),
        not from the store's checkpoint, which is up to 30 s behind them, or absent: once
        joined, only the deltas from now on are added here. Learning that crosses the
        request (one exchange interval of deltas) may count twice or not at all. The first
        worker finds nobody to ask."""
        try:
            reply = await self.qnc.request(f"{self.fleet_subject}.models.full", b"",
                                           timeout=5.0)
            saved = msgpack.unpackb(reply.data, raw=False)
        except NoRespondersError:
            return
        except Exception as exc:  # the store's checkpoint it is, then
            log.warning("fleet.models_not_taken", error=repr(exc))
            return
        await asyncio.to_thread(self.system.context.models.load, saved)
        log.info("fleet.models_taken", segments=sorted(saved))

    async def _on_models_full(self, msg: Msg) -> None:
        """A joining worker asks for the models: weights and item effects, or the weights
        alone when the item effects would not fit in one message."""
        models = self.system.context.models
        try:
            body = msgpack.packb(await asyncio.to_thread(models.checkpoint), use_bin_type=True)
            if len(body) > self.qnc.max_payload:
                body = msgpack.packb(models.dump(), use_bin_type=True)
            await self.qnc.publish(msg.reply, body)
        except Exception as exc:
            log.warning("fleet.models_not_given", error=repr(exc))

    async def _on_models(self, msg: Msg) -> None:
        try:
            body = msgpack.unpackb(msg.data, raw=False)
            if body["w"] == self.fleet.worker:
                return
            max_items = self.system.configs.current.segment("default").max_items
            await asyncio.to_thread(self.system.context.models.add_delta, body["d"],
                                    max_items)
            self.deltas_added += 1
        except Exception as exc:
            log.warning("fleet.delta_unreadable", error=repr(exc))

    async def _admin_stats(self, body: dict) -> dict:
        """The fleet's counters (adapters/fleet/stats.py): every live worker's, summed."""
        live = [self.fleet.worker]
        if self.leases is not None:
            with contextlib.suppress(Exception):
                live = await self.leases.live_workers()
        inbox = self.qnc.new_inbox()
        sub = await self.qnc.subscribe(inbox)
        answers: dict[str, dict] = {}
        try:
            await self.qnc.publish(f"{self.fleet_subject}.stats", b"", reply=inbox)
            deadline = time.monotonic() + fleet_stats.WAIT
            while set(live) - answers.keys():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    msg = await sub.next_msg(timeout=remaining)
                except NatsTimeout:
                    break
                with contextlib.suppress(Exception):
                    answer = msgpack.unpackb(msg.data, raw=False)
                    answers[answer["fleet_worker"]["worker"]] = answer
        finally:
            await sub.unsubscribe()
        return fleet_stats.summed(answers, live)

    async def _on_fleet_stats(self, msg: Msg) -> None:
        """This worker's own counters, for the worker that gathers the fleet's."""
        if not msg.reply:
            return
        try:
            mine = {**await Service._admin_stats(self, {}), "fleet_worker": self.fleet_stats()}
            await self.qnc.publish(msg.reply, msgpack.packb(mine, use_bin_type=True))
        except Exception as exc:  # the asker names this worker as missing
            log.warning("fleet.stats_not_given", error=repr(exc))

    async def _admin_experiment(self, body: dict) -> dict:
        """Start, ramp or stop an experiment, then tell every worker to read it."""
        answer = await super()._admin_experiment(body)
        await self.qnc.publish(f"{self.fleet_subject}.changed", self.fleet.worker.encode())
        return answer

    async def _on_changed(self, msg: Msg) -> None:
        if msg.data.decode(errors="replace") == self.fleet.worker:
            return  # ours: applied already
        try:
            await asyncio.to_thread(self.system.reload_experiments)
        except Exception as exc:  # the store is down: the next change, or a restart
            log.error("fleet.reload_failed", error=repr(exc))

    def _ours(self, stream: str, consumer: str) -> bool:
        cfg = self.config
        if stream == cfg.events_stream:
            return consumer in {f"{cfg.durable}-p{n}" for n in self.serving} or (
                consumer == f"{cfg.durable}-stray" and 0 in self.serving)
        return stream == cfg.content_stream and 0 in self.serving and (
            consumer == f"{cfg.durable}-content")

    def fleet_stats(self) -> dict[str, Any]:
        return {"worker": self.fleet.worker, "partitions": self.partitions,
                "serving": sorted(self.serving),
                "handing_off": sorted(self._handing_off),
                "deltas_sent": self.deltas_sent, "deltas_added": self.deltas_added}


def _user_of(data: bytes) -> str | None:
    with contextlib.suppress(Exception):
        body = msgpack.unpackb(data, raw=False)
        user = body.get("u") if isinstance(body, dict) else None
        if isinstance(user, str):
            return user
    return None


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")
