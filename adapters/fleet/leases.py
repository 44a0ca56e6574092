"""Partition leases in a NATS KV bucket: at most one owner per partition at any time.

Each worker keeps a key `w.<worker>` (its heartbeat) and one key `p.<n>` per partition it
holds; the bucket's TTL removes any key not rewritten in time, so a dead worker's partitions
come free by themselves. Every write is revision-checked (`create` only if absent, `update`
only from the revision we wrote last), so two workers can never both believe they hold one
partition after a round of `rebalance`; a worker whose renewal fails has lost the partition
(and the store's epoch fences whatever it still tries to write: store/fencing.py).

Who should hold what: the live workers (heartbeat keys), sorted, take the partitions in turn
(partition n -> live[n % len(live)]): an equal share each, the same answer on every worker.
A worker gives up a partition that belongs to another live worker (after the caller has
stopped consuming it and settled what was in flight: `release`), and takes free partitions
that belong to it. Membership changes move more partitions than a consistent hash would; at
16 partitions that is a few seconds of hand-off, and the shares stay exactly even.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import structlog
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.errors import (
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoKeysError,
    NoStreamResponseError,
    NotFoundError,
)
from nats.js.kv import KeyValue

from events.partitions import DEFAULT_PARTITIONS

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class LeaseSettings:
    partitions: int = DEFAULT_PARTITIONS
    ttl: float = 10.0  # a key not rewritten for this long is gone: its partition is free
    bucket: str = "microtune_leases"
    replicas: int = 1  # on a NATS cluster: 3, as the streams

    @property
    def renew_every(self) -> float:
        return self.ttl / 4  # three renewals may fail before the lease is lost


@dataclass
class Plan:
    """What one round of `rebalance` found: partitions taken, lost (a renewal failed: another
    worker holds them now) and to hand off (another live worker should hold them)."""

    gained: set[int] = field(default_factory=set)
    lost: set[int] = field(default_factory=set)
    hand_off: set[int] = field(default_factory=set)


class PartitionLeases:
    def __init__(self, js: JetStreamContext, worker: str,
                 settings: LeaseSettings | None = None) -> None:
        if "." in worker or not worker:
            raise ValueError("a worker id is one NATS token (no dots)")
        self.js = js
        self.worker = worker
        self.settings = settings or LeaseSettings()
        self.held: dict[int, int] = {}  # partition -> revision of our last write
        # a worker's hand-off releases while its lease loop renews: one at a time, or a
        # renewal in flight writes back a partition just released (and its new revision
        # fails the release's revision check, leaving the key for the TTL to remove)
        self._writing = asyncio.Lock()
        self._kv: KeyValue | None = None
        self._heartbeat: int | None = None

    async def start(self) -> None:
        s = self.settings
        try:
            self._kv = await self.js.key_value(s.bucket)
        except (NotFoundError, Exception):  # absent: create it (a concurrent create is fine)
            self._kv = await self.js.create_key_value(KeyValueConfig(
                bucket=s.bucket, ttl=s.ttl, history=1, replicas=s.replicas))
        deadline = asyncio.get_running_loop().time() + 15.0
        while True:  # a bucket just made on a cluster answers once its replicas elect a leader
            try:
                await self._beat()
                return
            except (NoStreamResponseError, NatsTimeoutError):
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.25)

    def owner_of(self, partition: int, live: list[str]) -> str:
        return live[partition % len(live)]

    async def live_workers(self) -> list[str]:
        kv = self._require()
        try:  # all keys (a few dozen): nats-py 2.x's key filters found none here
            keys = await kv.keys()
        except NoKeysError:
            keys = []
        return sorted(k[2:] for k in keys if k.startswith("w."))

    async def rebalance(self) -> Plan:
        """One round: renew what we hold, find who is live, take what is ours and free."""
        async with self._writing:
            return await self._rebalance()

    async def _rebalance(self) -> Plan:
        plan = Plan()
        await self._beat()
        for partition in list(self.held):
            if not await self._renew(partition):
                plan.lost.add(partition)
        live = await self.live_workers()
        if self.worker not in live:  # our heartbeat expired under us (a long pause)
            live = sorted({*live, self.worker})
        for partition in range(self.settings.partitions):
            mine = self.owner_of(partition, live) == self.worker
            if partition in self.held:
                if not mine:
                    plan.hand_off.add(partition)
            elif mine and await self._take(partition):
                plan.gained.add(partition)
        if plan.gained or plan.lost or plan.hand_off:
            log.info("leases.rebalanced", worker=self.worker, live=len(live),
                     held=sorted(self.held), gained=sorted(plan.gained),
                     lost=sorted(plan.lost), hand_off=sorted(plan.hand_off))
        return plan

    async def release(self, partition: int) -> None:
        """Give a partition up (after its consumer stopped and what was in flight settled)."""
        async with self._writing:
            revision = self.held.pop(partition, None)
            if revision is not None:
                with contextlib.suppress(KeyWrongLastSequenceError, KeyNotFoundError):
                    await self._require().delete(f"p.{partition}", last=revision)

    async def stop(self) -> None:
        for partition in list(self.held):
            await self.release(partition)
        if self._heartbeat is not None:
            with contextlib.suppress(Exception):
                await self._require().delete(f"w.{self.worker}")

    # ------------------------------------------------------------ keys

    def _require(self) -> KeyValue:
        if self._kv is None:
            raise RuntimeError("PartitionLeases.start() first")
        return self._kv

    async def _beat(self) -> None:
        self._heartbeat = await self._require().put(f"w.{self.worker}", b"")

    async def _take(self, partition: int) -> bool:
        try:
            self.held[partition] = await self._require().create(
                f"p.{partition}", self.worker.encode())
        except KeyWrongLastSequenceError:  # held by another worker (its key has not expired)
            return False
        return True

    async def _renew(self, partition: int) -> bool:
        try:
            self.held[partition] = await self._require().update(
                f"p.{partition}", self.worker.encode(), last=self.held[partition])
        except (KeyWrongLastSequenceError, KeyNotFoundError):
            # expired and perhaps taken: the partition is not ours any more
            self.held.pop(partition, None)
            log.warning("leases.lost", worker=self.worker, partition=partition)
            return False
        return True


async def run_until(leases: PartitionLeases, stop: asyncio.Event) -> None:
    """Rebalance every `renew_every` seconds until `stop` (a helper for tests and tools that
    hold leases without consuming; a worker runs its own loop to hand off in order)."""
    while not stop.is_set():
        plan = await leases.rebalance()
        for partition in plan.hand_off:
            await leases.release(partition)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), leases.settings.renew_every)
