"""Query processes, through a real NATS server: answers come from replicas of the committed
log, name the exact seq they used, and survive the process's death."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import msgpack
import nats
import numpy as np
from helpers import until

from actors import Microtune
from actors.learning import settle
from actors.ranking import rank
from actors.replay import replay_user
from actors.segment_model import SegmentModels
from adapters import client
from adapters.nats_service import Service, ServiceConfig
from events import SegmentConfig, TuningConfig
from events.types import Candidate, Query

DIM = 4
# no segment model: an answer is then a function of the user's own log prefix alone, which
# the test recomputes by replay
CFG = TuningConfig(version=1, dim=DIM, segments={"default": SegmentConfig(segment_model=False)})
ITEMS = [(f"i{k}", [float(k == j) for j in range(DIM)]) for k in range(DIM)]


def event(user: str, n: int) -> bytes:
    kind = ("click", "impression", "dwell", "hover")[n % 4]
    return msgpack.packb({"v": 1, "id": f"e{n}", "u": user, "t": 1000.0 + 5 * n, "k": kind,
                          "i": f"i{n % DIM}", "x": ITEMS[n % DIM][1], "d": 20.0, "h": 3.0})


async def start(tmp_path, url: str, **config) -> tuple[Microtune, Service]:
    system = Microtune.open(tmp_path / "mt.db", CFG)
    service = Service(system, ServiceConfig(**config))
    await service.start(url)
    return system, service


def test_answers_while_a_backlog_drains_name_the_exact_seq_they_used(server, tmp_path):
    """Every answer given while 4,000 events drain equals the ranking recomputed from the
    user's log up to the seq the answer names: no answer from a state that never was."""
    users = [f"u{k}" for k in range(40)]

    async def scenario():
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        system, service = await start(tmp_path, server.url)
        await service.stop_consuming()  # a backlog first
        for n in range(100):
            for user in users:
                await js.publish(f"microtune.events.{user}", event(user, n))
        await service.resume_consuming()
        answers = []
        while system.journal.stats.events < 4000:
            for user in users[:8]:
                answers.append(await client.rank(nc, user, ITEMS, timeout=5))
            await asyncio.sleep(0.005)
        await until(lambda: service.stats.applied == 4000, what="the backlog applied")
        for user in users[:8]:
            answers.append(await client.rank(nc, user, ITEMS, min_seq=100, timeout=5))
        # the query process keeps every replica it holds up to date in the background, not
        # only the queried ones (each user's log began while it ran: all 40 are replicas)
        await until(lambda: service.query_stats().get("applied", 0) == 4000,
                    what="the query process applying every committed row")
        stats = service.query_stats()
        assert stats["replicas"] == 40 and stats["behind"] == 0 and stats["loop_errors"] == 0
        if sys.platform.startswith("linux"):  # ingest yields the CPU to queries
            base = os.getpriority(os.PRIO_PROCESS, 0)
            for thread in [*system.dispatcher.threads, system.journal.thread]:
                assert os.getpriority(os.PRIO_PROCESS, thread.native_id) == min(19, base + 5)
            assert os.getpriority(os.PRIO_PROCESS, service._queriers[0].process.pid) == base
        await service.stop()
        await nc.close()
        return system, answers

    system, answers = asyncio.run(scenario())
    candidates = tuple(Candidate(item, np.array(x)) for item, x in ITEMS)
    recorder, configs = open_recorder_like(system)
    mid_drain = 0
    for answer in answers:
        state = replay_user(recorder, configs, answer.user, until_seq=answer.seq)
        assert state.seq == answer.seq
        expected = rank(settle(state, CFG), Query(answer.user, candidates), CFG, SegmentModels())
        assert (answer.items, answer.scores, answer.weights) == (
            expected.items, expected.scores, expected.weights), answer
        mid_drain += 0 < answer.seq < 100
    assert mid_drain > 0, "no answer came while the backlog drained"
    assert {a.seq for a in answers[-8:]} == {100}


def open_recorder_like(system: Microtune):
    from actors.configs import ConfigRegistry
    from store import open_recorder

    recorder = open_recorder(system.recorder.engine.url.render_as_string(hide_password=False))
    return recorder, ConfigRegistry(recorder, CFG)


def test_a_backlog_waiting_at_start_reaches_the_query_process_while_it_starts(server, tmp_path):
    """Events commit from the service's first moment; the query process, still starting,
    gets them through its feed and applies them in the background, with no error."""
    users = [f"b{k}" for k in range(300)]

    async def scenario():
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        _system, service = await start(tmp_path, server.url)  # creates the streams
        await service.stop()
        for n in range(10):
            for user in users:
                await js.publish(f"microtune.events.{user}", event(user, n))
        _system, service = await start(tmp_path, server.url)
        await until(lambda: service.stats.applied == 3000, what="the backlog applied")
        await until(lambda: service.query_stats().get("rows", 0) > 0
                    and service.query_stats().get("behind") == 0, what="the replicas caught up")
        stats = service.query_stats()
        assert stats["loop_errors"] == 0
        for user in users[::30]:  # replicas or loads, every answer is at seq 10
            assert (await client.rank(nc, user, ITEMS, min_seq=10, timeout=5)).seq == 10
        await service.stop()
        await nc.close()

    asyncio.run(scenario())


def test_a_query_process_that_dies_is_replaced_and_a_forgotten_user_is_not_served(
        server, tmp_path):
    async def scenario():
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        system, service = await start(tmp_path, server.url)
        for n in range(5):
            await js.publish("microtune.events.ann", event("ann", n))
        assert (await client.rank(nc, "ann", ITEMS, min_seq=5)).seq == 5

        (querier,) = service._queriers
        os.kill(querier.process.pid, signal.SIGKILL)
        await until(lambda: service.query_stats()["restarts"] == 1 and querier.serving(),
                    what="the query process restarted")
        for n in range(5, 8):
            await js.publish("microtune.events.ann", event("ann", n))
        assert (await client.rank(nc, "ann", ITEMS, min_seq=8)).seq == 8

        await asyncio.to_thread(system.forget, "ann", by="test")

        async def forgotten() -> bool:
            return (await client.rank(nc, "ann", ITEMS)).seq == 0

        for _ in range(100):  # the forget travels the feed after the store's delete
            if await forgotten():
                break
            await asyncio.sleep(0.02)
        assert await forgotten()
        # the replacement reports once a second (its own count: since it started)
        await until(lambda: service.query_stats().get("queries", 0) >= 2,
                    what="the query process's report")
        stats = await service._admin_stats({})
        assert stats["query_processes"]["processes"] == 1 and stats["queries"] >= 2
        await service.stop()
        await nc.close()

    asyncio.run(scenario())


def test_two_query_processes_share_the_queries_and_agree(server, tmp_path):
    async def scenario():
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        _system, service = await start(tmp_path, server.url, query_processes=2)
        for n in range(6):
            await js.publish("microtune.events.ann", event("ann", n))
        answers = [await client.rank(nc, "ann", ITEMS, min_seq=6) for _ in range(40)]
        assert {(a.seq, a.items, a.scores) for a in answers} == {
            (answers[0].seq, answers[0].items, answers[0].scores)}  # one state, whoever answers
        await until(lambda: all(q.stats.get("queries", 0) > 0 for q in service._queriers),
                    what="both query processes answering (a NATS queue group)")
        assert service.query_stats()["processes"] == 2
        await service.stop()
        await nc.close()

    asyncio.run(scenario())


def test_tls_settings_cross_to_a_spawned_process_as_files():
    """An SSLContext cannot be pickled to a spawned query process; `TlsFiles` can, and each
    process makes its own context from them."""
    import pickle
    import ssl

    from adapters.query_process import TlsFiles, connect_options

    files = TlsFiles(ca=None)
    options = pickle.loads(pickle.dumps({"tls": files, "user": "service"}))
    made = connect_options(options)
    assert isinstance(made["tls"], ssl.SSLContext) and made["user"] == "service"
    assert connect_options({"user": "x"}) == {"user": "x"}


def test_a_query_waiting_for_its_seq_or_a_load_does_not_hold_up_the_others(server, tmp_path):
    """nats-py runs a subscription's callbacks one after another: a query that waits (for its
    `ms`, or for its user to be loaded) must wait aside, not in that line."""
    import pytest

    from events.errors import Reason, Rejected

    async def scenario():
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        _system, service = await start(tmp_path, server.url, read_wait=1.5)
        await js.publish("microtune.events.ann", event("ann", 0))
        assert (await client.rank(nc, "ann", ITEMS, min_seq=1)).seq == 1
        waiting = asyncio.create_task(client.rank(nc, "ann", ITEMS, min_seq=99, timeout=5))
        await asyncio.sleep(0.1)  # its request is in the query process
        assert (await client.rank(nc, "bob", ITEMS, timeout=5)).seq == 0
        assert not waiting.done()  # bob was answered while ann's query still waits
        with pytest.raises(Rejected) as info:
            await waiting
        assert info.value.reason is Reason.TIMEOUT
        await service.stop()
        await nc.close()

    asyncio.run(scenario())


def test_a_query_process_start_is_seen_while_its_stats_are_polled(server, tmp_path):
    """The service's loop polls a query process's stats while a worker thread waits for it to
    be ready: two readers of one pipe. A message read by the one is not lost to the other
    (the loop once took the "ready", and the service waited out its start timeout)."""
    import time

    from adapters.query_process import QueryProcess, QuerySettings

    system = Microtune.open(tmp_path / "mt.db", CFG)
    url = system.recorder.engine.url.render_as_string(hide_password=False)
    querier = QueryProcess(QuerySettings(store=url, servers=server.url, config=CFG))
    querier.spawn()
    try:
        deadline = time.monotonic() + 30
        while not querier.ready and time.monotonic() < deadline:
            querier.poll_stats()  # as the service's tick does, while the process starts
            time.sleep(0.01)
        querier.wait_ready(timeout=1)  # what the poll read counts for the waiter too
        assert querier.serving()
    finally:
        querier.stop()
        system.close()


def test_every_refused_query_is_answered_counted_and_recorded_alike(server, tmp_path):
    """Whatever refuses a query (its bytes, its dimension, an item not in the catalog, its
    `ms` not reached), the requester gets `{v, e, m, f?}`, the stats count the reason and
    `microtune.rejected` keeps the record: one rule (a dimension error once had none)."""
    import hashlib
    import time

    async def scenario():
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        _system, service = await start(tmp_path, server.url, read_wait=0.3)
        await js.publish("microtune.events.ann", event("ann", 0))
        assert (await client.rank(nc, "ann", ITEMS, min_seq=1)).seq == 1
        x = ITEMS[0][1]
        bad = {  # reason -> (body, the field at fault)
            "malformed": (b"\xc1\x00", None),
            "dimension": (msgpack.packb({"v": 1, "c": [["a", [1.0, 0.0]]]}), "c"),
            "missing_field": (msgpack.packb({"v": 1, "c": ["not-in-the-catalog"]}), "c"),
            "timeout": (msgpack.packb({"v": 1, "c": [["a", x]], "ms": 99}), "ms"),
            "oversize": (msgpack.packb({"v": 1, "c": [["a", x]], "pad": "p" * 70_000}), None),
        }
        sent = time.time()
        for reason, (body, field) in bad.items():
            reply = msgpack.unpackb((await nc.request(
                "microtune.query.ann", body, timeout=5)).data)
            assert reply["v"] == 1 and reply["e"] == reason and reply["m"], reply
            assert reply.get("f") == field, reply
            assert set(reply) <= {"v", "e", "m", "f"}

        sub = await js.pull_subscribe("microtune.rejected", durable="test-queries")
        records = {}
        for m in await sub.fetch(len(bad), timeout=5):
            record = msgpack.unpackb(m.data, raw=False)
            records[record["e"]] = record
        assert set(records) == set(bad)
        for reason, (body, field) in bad.items():
            record = records[reason]
            assert record["v"] == 1 and record["s"] == "microtune.query.ann"
            assert record.get("f") == field and record["m"]
            assert record["n"] == len(body) and sent - 1 <= record["at"] <= time.time() + 1
            if len(body) <= 65536:
                assert record["raw"] == body and "rt" not in record and "sha256" not in record
        big = records["oversize"]
        assert big["rt"] is True and big["raw"] == bad["oversize"][0][:65536]
        assert big["sha256"] == hashlib.sha256(bad["oversize"][0]).hexdigest()

        # counted by reason where operators look (the query process reports each second)
        def counted() -> dict:
            return service.query_stats()["rejected"]
        await until(lambda: counted() == dict.fromkeys(bad, 1), what="the counts reported")
        stats = await service._admin_stats({})
        assert all(stats["rejected"][reason] == 1 for reason in bad)
        assert stats["query_errors"] == len(bad)
        await service.stop()
        await nc.close()

    asyncio.run(scenario())
