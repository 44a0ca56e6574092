"""Nothing lost, nothing doubled: the paths that lost or wedged data, each reproduced.

1. A redelivery of an event whose write has not committed yet is settled by that write's
   outcome, never early (it was acked as a duplicate, then lost on a crash).
2. A request the store can never accept (PostgreSQL refuses NUL in text) is isolated and
   refused with a reason; the rest of the group commit goes on (it wedged all ingest).
3. A rejection record always fits the rejected stream, and no message stays unsettled
   forever (one of ~1 MiB was redelivered every 30 s for ever).
4. Event ids are unique per user, JetStream's dedupe window is stream-wide: the documented
   `Nats-Msg-Id` is user-qualified (two users' "e1" lost one of them).
5. An event naming an item whose catalog upsert is still on its way is held, not refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sqlite3
import threading
import time

import msgpack
import nats
import pytest
from helpers import until

from actors import Microtune
from adapters.nats_service import Service, ServiceConfig
from events import Event, TuningConfig
from events.errors import Reason, Rejected
from store import Journal, StoredEvent, StoreRefused, WriteRequest, open_recorder

DIM = 4
CFG = TuningConfig(version=1, dim=DIM)
X = (1.0, 0.0, 0.0, 0.0)



def body(user: str, event_id: str, t: float, kind: str = "click", item: str = "a",
         x=X, **extra) -> bytes:
    fields = {"v": 1, "id": event_id, "u": user, "t": t, "k": kind, "i": item, **extra}
    if x is not None:
        fields["x"] = list(x)
    return msgpack.packb(fields)



@contextlib.asynccontextmanager
async def serving(url: str, store, **config):
    """A service on `store` and a client (its connection and JetStream context); the service
    stops gracefully after (within 30 s: a stop that hangs fails the test)."""
    system = Microtune.open(store, CFG)
    service = Service(system, ServiceConfig(**config))
    await service.start(url)
    nc = await nats.connect(url)
    try:
        yield system, service, nc, nc.jetstream()
    finally:
        await asyncio.wait_for(service.stop(), 30)
        await nc.close()


class SQLiteLock:
    """Another process's exclusive lock on the store file: the store is unavailable."""

    def __init__(self, path) -> None:
        self.conn = sqlite3.connect(path, timeout=30, isolation_level=None)
        self.conn.execute("BEGIN EXCLUSIVE")

    def release(self) -> None:
        self.conn.execute("ROLLBACK")
        self.conn.close()


# ---------------------------------------------------------------- 1. redelivery mid-commit


async def four_events_behind_a_lock(js, service, path) -> SQLiteLock:
    """ann's first event applied (her actor live), then the store locked, then e0..e3
    published: they wait on the lock. Returns the lock, to release."""
    await js.publish("microtune.events.ann", body("ann", "warm", 1.0))
    await until(lambda: service.stats.applied == 1)
    lock = SQLiteLock(path)
    for i in range(4):
        await js.publish("microtune.events.ann", body("ann", f"e{i}", 10.0 + i))
    return lock


def event(user: str, event_id: str, t: float) -> Event:
    import numpy as np

    return Event(id=event_id, user=user, t=t, kind="click", item="a", x=np.array(X))


def test_a_repeat_of_an_uncommitted_event_waits_for_its_commit(tmp_path):
    path = tmp_path / "mt.db"
    with Microtune.open(path, CFG) as mt:
        mt.track_many([event("ann", "e0", 1.0)])  # the actor is live
        lock = SQLiteLock(path)
        answers: dict[str, list] = {"first": [], "repeat": []}
        mt.track(event("ann", "e1", 2.0), answers["first"].append)
        time.sleep(0.3)  # the write is in the journal, waiting on the lock
        mt.track(event("ann", "e1", 2.0), answers["repeat"].append)  # a redelivery
        time.sleep(0.3)
        assert answers == {"first": [], "repeat": []}, "settled before the commit"
        lock.release()
        deadline = time.monotonic() + 30
        while not (answers["first"] and answers["repeat"]):
            assert time.monotonic() < deadline, answers
            time.sleep(0.02)
        assert answers["first"][0].status == "applied"
        assert answers["repeat"][0].ok
        assert [r.event_id for r in mt.recorder.read("ann")] == ["e0", "e1"]


def test_redeliveries_during_a_store_outage_are_acked_only_after_the_commit(server, tmp_path):
    """The issue's repro: a locked store, redeliveries past the ack wait, then a kill."""
    path = tmp_path / "mt.db"

    async def scenario():
        async with serving(server.url, path, ack_wait=1.0, progress_every=60.0) as (
                _system, service, _nc, js):
            lock = await four_events_behind_a_lock(js, service, path)
            await asyncio.sleep(3.5)  # past the 1 s ack wait: JetStream redelivers them
            assert service.stats.received >= 1 + 2 * 4, "the scenario needs redeliveries"
            info = await js.consumer_info("MICROTUNE_EVENTS", "microtune-ingest")
            assert info.num_ack_pending == 4, "a redelivery was settled before its commit"
            stream = await js.stream_info("MICROTUNE_EVENTS")
            assert stream.state.messages == 4  # work queue: acked messages would be gone
            lock.release()
            await until(lambda: service.stats.applied == 5, timeout=40)
            await until(lambda: service._in_flight == 0)

    asyncio.run(scenario())
    recorder = open_recorder(path)
    assert [r.event_id for r in recorder.read("ann")] == ["warm", "e0", "e1", "e2", "e3"]
    recorder.close()


def test_in_progress_signals_keep_a_slow_commit_from_being_redelivered(server, tmp_path):
    """A store outage longer than the ack wait: the messages waiting on it are kept alive
    (+WPI), not redelivered, so they do not use up `max_deliver` on the way."""
    path = tmp_path / "mt.db"

    async def scenario():
        async with serving(server.url, path, ack_wait=1.0, max_deliver=2) as (
                _system, service, _nc, js):
            lock = await four_events_behind_a_lock(js, service, path)
            await asyncio.sleep(4.0)  # four ack waits
            lock.release()
            await until(lambda: service.stats.applied == 5, timeout=40)
            assert service.stats.received == 5, "a message was redelivered"
            assert service.stats.progress_signals >= 4 and service.stats.dead_lettered == 0

    asyncio.run(scenario())


# ---------------------------------------------------------------- 2. a poison request


def test_the_journal_isolates_a_request_the_store_refuses_and_commits_the_rest(store_url):
    """A lone surrogate cannot be encoded by any driver: a request that can never succeed.
    It is refused with the reason; the good requests of the same group commit land."""
    recorder = open_recorder(store_url)
    journal = Journal(recorder, linger=0.05)  # one batch: the poison sits among good rows
    outcomes: dict[str, BaseException | None] = {}
    done = threading.Event()

    def request(user: str, event_id: str) -> WriteRequest:
        def report(exc):
            outcomes[user] = exc
            if len(outcomes) == 5:
                done.set()
        return WriteRequest([StoredEvent(user, 1, event_id, b"body")], (), report)

    for i in range(5):
        journal.write(request(f"u{i}", "bad\ud800" if i == 2 else "e1"))
    assert done.wait(30), f"the journal wedged: {outcomes}"
    assert isinstance(outcomes.pop("u2"), StoreRefused)
    assert outcomes == {f"u{i}": None for i in (0, 1, 3, 4)}
    assert recorder.count_events() == 4 and journal.stats.refused == 1
    journal.close()
    recorder.close()


def test_sqlite_and_postgresql_accept_and_refuse_the_same_ids(store_url):
    """Every id the wire format accepts is stored and read back as it was, on both stores;
    what one backend could not store (NUL, control characters, surrogates) is refused at the
    door with `invalid_id` on both."""
    import random

    from events.codec import decode_event

    rng = random.Random(11)
    tricky = ["e\x00", "\x00", "tab\there", "line\nbreak", "\ud800", "nbsp\u00a0", "bell\x07",
              "ok", "space ok", "é", "日本", "emoji😀", "quote'\"", "back\\slash", "%s", "?"]
    ids = tricky + ["".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0, 0x3000),
                                            rng.randrange(0xD800, 0xE000)]))
                            for _ in range(rng.randrange(1, 12))) for _ in range(150)]
    accepted = []
    for n, text in enumerate(ids):
        raw = msgpack.packb({"v": 1, "id": text, "u": "ann", "t": 1.0 + n, "k": "click",
                             "i": text, "x": list(X)}, unicode_errors="surrogatepass")
        try:
            accepted.append(decode_event(raw))
        except Exception as exc:
            assert getattr(exc, "reason", None) is not None, f"{text!r}: {exc!r}"
            assert not text.isprintable() or exc.reason.value == "oversize"
    assert "e\x00" not in {e.id for e in accepted} and "ok" in {e.id for e in accepted}
    with Microtune.open(store_url, CFG) as mt:
        outcomes = mt.track_many(accepted, timeout=60)
        assert [o.status for o in outcomes].count("applied") == len({e.id for e in accepted})
        logged = [r.event_id for r in mt.recorder.read("ann")]
    first_seen = list(dict.fromkeys(e.id for e in accepted))
    assert logged == first_seen


def test_a_poison_event_on_postgresql_is_refused_and_ingest_goes_on(server, pg_url):
    async def scenario():
        async with serving(server.url, pg_url) as (_system, service, _nc, js):
            await js.publish("microtune.events.ann", body("ann", "e\x00vil", 1.0))
            for i in range(20):
                await js.publish(f"microtune.events.u{i % 4}", body(f"u{i % 4}", f"e{i}", 2.0 + i))
            await until(lambda: service.stats.applied == 20, what="the good events")
            assert service.stats.rejected == {"invalid_id": 1}

    asyncio.run(scenario())


# ---------------------------------------------------------------- 3. never unsettled


def test_a_rejection_record_always_fits_and_the_message_is_settled(server, tmp_path):
    async def scenario():
        async with serving(server.url, tmp_path / "mt.db") as (_system, service, nc, js):
            raw = body("ann", "huge", 1.0, pad="x" * 1_048_400)
            assert 1_048_000 < len(raw) <= nc.max_payload, len(raw)  # fits NATS's 1 MiB
            await js.publish("microtune.events.ann", raw)
            await until(lambda: service.stats.rejected["oversize"] == 1, what="the rejection")
            await until(lambda: not service._unsettled, what="settlement")
            stream = await js.stream_info("MICROTUNE_EVENTS")
            assert stream.state.messages == 0, "the message was never acked"
            sub = await js.pull_subscribe("microtune.rejected", durable="reader")
            (msg,) = await sub.fetch(1, timeout=5)
            record = msgpack.unpackb(msg.data)
            assert record["e"] == "oversize" and record["rt"] is True and record["n"] == len(raw)
            assert record["raw"] == raw[: len(record["raw"])]
            assert record["sha256"] == hashlib.sha256(raw).hexdigest()

    asyncio.run(scenario())


def test_a_message_delivered_max_deliver_times_is_dead_lettered(server, tmp_path):
    """A message whose every delivery lapses (here: the store is locked and in-progress
    signals are off, as if the service hung) is settled at its last delivery: recorded on the
    rejected stream as `undeliverable`, then acked; it never waits for ever."""
    path = tmp_path / "mt.db"

    async def scenario():
        async with serving(server.url, path, ack_wait=1.0, max_deliver=3,
                           progress_every=3600.0) as (_system, service, _nc, js):
            await js.publish("microtune.events.ann", body("ann", "warm", 1.0))
            await until(lambda: service.stats.applied == 1)
            lock = SQLiteLock(path)
            await js.publish("microtune.events.ann", body("ann", "stuck", 2.0))
            await until(lambda: service.stats.dead_lettered == 1, timeout=15, what="dead letter")
            stream = await js.stream_info("MICROTUNE_EVENTS")
            assert stream.state.messages == 0
            sub = await js.pull_subscribe("microtune.rejected", durable="reader")
            (msg,) = await sub.fetch(1, timeout=5)
            record = msgpack.unpackb(msg.data)
            assert record["e"] == "undeliverable" and record["raw"] == body("ann", "stuck", 2.0)
            lock.release()

    asyncio.run(scenario())


def test_a_message_jetstream_gave_up_on_is_dead_lettered_from_the_stream(server, tmp_path):
    """The net under the last delivery: when the service died during each delivery of a
    message (here: a bare subscriber takes the deliveries and never answers), JetStream gives
    up on it after `max_deliver` and says so in an advisory; the service fetches the message
    from the stream, records it as `undeliverable` and deletes it: nothing stays for ever."""

    async def scenario():
        async with serving(server.url, tmp_path / "mt.db", ack_wait=1.0, max_deliver=2) as (
                _system, service, nc, js):
            await service.stop_consuming()
            deliveries: list = []

            async def crashing(msg):
                deliveries.append(msg)

            await nc.subscribe("_MICROTUNE.deliver.microtune-ingest", cb=crashing)
            await nc.flush()  # on the server before anything is delivered
            raw = body("ann", "crasher", 1.0)
            await js.publish("microtune.events.ann", raw)
            # the catalog's consumer too: its deliveries die the same way
            await service._subs.pop(0).unsubscribe()
            await nc.subscribe("_MICROTUNE.deliver.microtune-ingest-content", cb=crashing)
            await nc.flush()  # on the server before anything is delivered
            item = msgpack.packb({"v": 1, "i": "a", "x": list(X)})
            await js.publish("microtune.content", item)
            await until(lambda: service.stats.dead_lettered == 2, timeout=20, what="the advisory")
            assert len(deliveries) == 4
            for name in ("MICROTUNE_EVENTS", "MICROTUNE_CONTENT"):
                assert (await js.stream_info(name)).state.messages == 0
            sub = await js.pull_subscribe("microtune.rejected", durable="reader")
            records = [msgpack.unpackb(m.data) for m in await sub.fetch(2, timeout=5)]
            assert {r["e"] for r in records} == {"undeliverable"}
            assert {r["raw"] for r in records} == {raw, item}

    asyncio.run(scenario())


# ---------------------------------------------------------------- 4. ids are per user


def test_two_users_with_the_same_event_id_both_count(server, tmp_path):
    from adapters import client

    async def scenario():
        async with serving(server.url, tmp_path / "mt.db") as (system, service, _nc, js):
            first = await client.track(js, "ann", id="e1", t=1.0, kind="click", item="a", x=X)
            second = await client.track(js, "bob", id="e1", t=1.0, kind="click", item="a", x=X)
            again = await client.track(js, "bob", id="e1", t=1.0, kind="click", item="a", x=X)
            assert [bool(a.duplicate) for a in (first, second, again)] == [False, False, True]
            await until(lambda: service.stats.applied == 2, what="both users' e1")
            assert [r.event_id for r in system.recorder.read("ann")] == ["e1"]
            assert [r.event_id for r in system.recorder.read("bob")] == ["e1"]

    asyncio.run(scenario())


# ---------------------------------------------------------------- 5. the catalog race


def test_an_event_whose_item_is_on_its_way_waits_for_it_in_order(server, tmp_path):
    from adapters import client

    async def scenario():
        async with serving(server.url, tmp_path / "mt.db", catalog_grace=2.0) as (
                system, service, _nc, js):
            await client.track(js, "ann", id="e1", t=1.0, kind="click", item="new")
            await client.track(js, "ann", id="e2", t=2.0, kind="click", item="a", x=X)
            await client.track(js, "bob", id="e1", t=1.0, kind="click", item="never")
            await asyncio.sleep(0.3)
            assert service.stats.applied == 0 and service.stats.held == 3  # e2 waits behind e1
            await client.upsert_items(js, {"new": [0.0, 1.0, 0.0, 0.0]})
            await until(lambda: service.stats.applied == 2, what="ann's events")
            assert [r.event_id for r in system.recorder.read("ann")] == ["e1", "e2"]
            await until(lambda: service.stats.rejected["missing_field"] == 1, timeout=10,
                        what="bob's event refused after the grace period")
            assert system.recorder.last_seq("bob") == 0
            await until(lambda: not service._unsettled, what="settlement")

    asyncio.run(scenario())


# ---------------------------------------------------------------- reading one's own writes


def test_a_query_can_wait_for_its_own_write(server, tmp_path):
    """`ms`: answer from a state at that seq or later. A publisher that saw seq q in a reply
    and then published one event asks for q + 1 and gets it, without retrying; a seq never
    reached is answered `timeout` after the service's bound."""
    from adapters import client

    async def scenario():
        async with serving(server.url, tmp_path / "mt.db", read_wait=0.5) as (
                _system, _service, nc, js):
            first = await client.rank(nc, "ann", [("a", X)])
            assert first.seq == 0
            for n in range(1, 4):
                await client.track(js, "ann", id=f"e{n}", t=float(n), kind="click", item="a",
                                   x=X)
                ranking = await client.rank(nc, "ann", [("a", X)], min_seq=n)
                assert ranking.seq >= n
            with pytest.raises(Rejected) as info:
                await client.rank(nc, "ann", [("a", X)], min_seq=99)
            assert info.value.reason is Reason.TIMEOUT and info.value.field == "ms"
            with pytest.raises(Rejected) as info:  # a new user is activated, then waited for
                await client.rank(nc, "bob", [("a", X)], min_seq=1)
            assert info.value.reason is Reason.TIMEOUT

    asyncio.run(scenario())


def test_in_process_rank_reads_its_own_writes(tmp_path):
    import numpy as np

    from events import Candidate, Query

    with Microtune.open(tmp_path / "mt.db", CFG) as mt:
        done: list = []
        mt.track(event("ann", "e1", 1.0), done.append)
        ranking = mt.rank(Query("ann", (Candidate("a", np.array(X)),), min_seq=1))
        assert ranking.seq == 1
        with pytest.raises(Rejected) as info:
            mt.rank(Query("ann", (Candidate("a", np.array(X)),), min_seq=5), timeout=0.2)
        assert info.value.reason is Reason.TIMEOUT
