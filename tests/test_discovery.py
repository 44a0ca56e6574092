"""`microtune.info`: what a client learns without trial, through a real NATS server. The
feature dimension, the versions, the subjects and streams, and how far the catalog is
applied: an upsert the info calls `applied` is usable by a query at once, in every query
process; a refused one is `refused` with its reason."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import msgpack
import nats
import numpy as np
import pytest
from helpers import start_service, until

from actors import Microtune
from adapters import client
from adapters.embedded import free_port
from events import TuningConfig
from events.config import CONFIG_SCHEMA
from events.errors import Rejected

ROOT = Path(__file__).resolve().parents[1]
DIM = 5  # not the serve default (16): the info must say what this service uses
CFG = TuningConfig(version=1, dim=DIM)


async def info(nc, body: dict | None = None, subject: str = "microtune.info") -> dict:
    reply = await nc.request(subject, msgpack.packb(body) if body is not None else b"",
                             timeout=5)
    return msgpack.unpackb(reply.data, raw=False)


async def upsert(js, items: dict[str, list[float]]) -> int:
    """One catalog message, as any client publishes it; its content-stream seq."""
    ack = await js.publish("microtune.content", msgpack.packb(
        {"v": 1, "b": [{"i": i, "x": x} for i, x in items.items()]}))
    return ack.seq


async def status(nc, seq: int) -> dict:
    """Ask until the upsert at `seq` is no longer pending (how a client waits)."""
    for _ in range(500):
        catalog = (await info(nc, {"cs": seq}))["catalog"]
        if catalog["status"] != "pending":
            return catalog
        await asyncio.sleep(0.01)
    raise AssertionError(f"upsert {seq} still pending: {catalog}")


def vector(k: int) -> list[float]:
    return [float(k % DIM == j) + 0.01 * k for j in range(DIM)]


async def start(tmp_path, url: str, **config):
    return await start_service(tmp_path, url, CFG, **config)


def test_info_tells_the_dimension_versions_names_and_limits(server, tmp_path):
    async def scenario():
        _system, service = await start(tmp_path, server.url)
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        got = await info(nc)
        assert got["v"] == 1 and got["dim"] == DIM and got["config"] == 1
        assert got["config_schema"] == CONFIG_SCHEMA and got["prefix"] == "microtune"
        assert got["subjects"] == {
            "events": "microtune.events.<user>", "query": "microtune.query.<user>",
            "content": "microtune.content", "rejected": "microtune.rejected",
            "info": "microtune.info", "admin": "microtune.admin.<command>"}
        for role, name in got["streams"].items():  # the streams the service created
            stream = await js.stream_info(name)
            assert stream.config.subjects == [got["subjects"][role].replace("<user>", ">")]
        assert got["limits"] == {"payload_bytes": 65536, "id_length": 128, "features": 256,
                                 "candidates": 1000, "top": 1000}
        assert got["read_wait"] == 2.0 and got["catalog_grace"] == 10.0
        assert got["query_processes"] == 1
        # nothing published yet: nothing pending (once the query process has said so)
        assert await status(nc, 0) == {"items": 0, "floor": 0, "queries": 0, "last": 0,
                                       "seq": 0, "status": "applied"}
        # the dimension it names is the one events are checked against
        assert (await client.rank(nc, "ann", [("a", [1.0] * got["dim"])])).items == ("a",)
        with pytest.raises(Rejected) as refused:
            await client.rank(nc, "ann", [("a", [1.0] * (got["dim"] + 1))])
        assert refused.value.reason.value == "dimension"

        # a bad request is answered with the reason, and the service goes on
        for bad, field in ((msgpack.packb([1, 2]), None), (msgpack.packb({"cs": "x"}), "cs"),
                           (b"\xc1", None)):
            reply = msgpack.unpackb((await nc.request("microtune.info", bad, timeout=5)).data)
            assert reply["v"] == 1 and reply["e"] in ("wrong_type", "malformed")
            assert reply.get("f") == field
        assert (await info(nc))["dim"] == DIM
        await nc.close()
        await service.stop()

    asyncio.run(scenario())


def test_an_upsert_info_calls_applied_is_usable_by_every_query_process_at_once(
        server, tmp_path):
    """With two query processes sharing the queries, an item is asked for by id (no
    features) right after the info says its upsert is applied: never `missing_field`."""
    async def scenario():
        system, service = await start(tmp_path, server.url, query_processes=2)
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        for k in range(15):
            seq = await upsert(js, {f"item-{k}": vector(k)})
            catalog = await status(nc, seq)
            assert catalog["status"] == "applied" and catalog["seq"] == seq
            assert catalog["queries"] >= seq and catalog["floor"] >= seq
            assert catalog["items"] == k + 1
            for _ in range(4):  # whichever query process answers
                ranking = await client.rank(nc, f"user-{k}", [f"item-{k}"])
                assert ranking.items == (f"item-{k}",)
        # without `cs`: the latest upsert published
        latest = await upsert(js, {"late": vector(1), "later": vector(2)})
        catalog = await status(nc, latest)
        got = (await info(nc))["catalog"]
        assert got["seq"] == got["last"] == latest and got["status"] == "applied"
        assert got["items"] == 17 == len(system.catalog)

        # a refused upsert says why, at once
        bad = await upsert(js, {"short": [1.0, 2.0]})
        catalog = await status(nc, bad)
        assert catalog["status"] == "refused" and catalog["e"] == "dimension"
        assert catalog["f"] == "x" and "2 features, not 5" in catalog["m"]
        good = await upsert(js, {"after": vector(3)})  # and the next one is applied
        assert (await status(nc, good))["status"] == "applied"
        assert (await status(nc, bad))["status"] == "refused"  # still remembered
        assert (await info(nc, {"cs": good + 100}))["catalog"]["status"] == "pending"
        await nc.close()
        await service.stop()

    asyncio.run(scenario())


def test_after_a_restart_older_upserts_are_settled_and_new_ones_applied(server, tmp_path):
    async def scenario():
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        _system, service = await start(tmp_path, server.url)
        refused = await upsert(js, {"short": [1.0]})
        applied = await upsert(js, {"a": vector(0)})
        assert (await status(nc, applied))["status"] == "applied"
        await service.stop()
        # published while no service runs: applied after the restart, in order
        waiting = await upsert(js, {"b": vector(1)})
        _system, service = await start(tmp_path, server.url)
        assert (await status(nc, waiting))["status"] == "applied"
        # what the previous run settled: done, its outcome no longer known here
        for seq in (refused, applied):
            assert (await status(nc, seq))["status"] == "settled"
        assert (await client.rank(nc, "ann", ["a", "b"])).seq == 0  # both in the catalog
        await nc.close()
        await service.stop()

    asyncio.run(scenario())


def test_a_query_process_reports_its_floor_only_once_a_gap_is_read_again(tmp_path):
    """A feed gap drops the backlog, items and floor included: the process reads the catalog
    from the store again, and reports a floor it got meanwhile only after that read (the
    query process's own code, on a real store and a real pipe; no NATS needed)."""
    import multiprocessing

    from actors import feed, gc_pauses
    from actors.configs import ConfigRegistry
    from actors.experiments.registry import ExperimentRegistry
    from actors.read_model import ReadModel
    from actors.segment_model import SegmentModels
    from adapters.query_process import CATALOG_MARK, QueryServer, QuerySettings, catalog_mark
    from store.catalog import read_items

    system = Microtune.open(tmp_path / "mt.db", CFG)
    system.catalog.upsert([("stored", np.array(vector(1)))])  # dropped from the feed
    url = system.recorder.engine.url.render_as_string(hide_password=False)
    here, there = multiprocessing.Pipe()

    def frame(*messages) -> bytes:
        return msgpack.packb([list(m) for m in messages], use_bin_type=True)

    def mark(floor: int) -> list:
        name, x = catalog_mark(floor)
        return [name, x.tobytes()]

    def reported() -> list:
        out = []
        while here.poll(0):
            message = msgpack.unpackb(here.recv_bytes())
            if "catalog" in message:
                out.append(message["catalog"])
        return out

    async def scenario():
        server = QueryServer(QuerySettings(store=url, servers="", config=CFG), there)
        server.loop = asyncio.get_running_loop()
        server._stopped = asyncio.Event()
        server.recorder = system.recorder
        server.model = ReadModel(ConfigRegistry(system.recorder, CFG), SegmentModels(), {},
                                 experiments=ExperimentRegistry(system.recorder))
        server._gaps_seen = 0
        server.collector = gc_pauses.Scheduled()
        server._on_frame(frame((feed.ITEMS, [["fed", np.array(vector(2)).tobytes()],
                                             mark(1)])))
        assert reported() == [1] and server.catalog_floor == 1
        assert CATALOG_MARK not in server.model.catalog and "fed" in server.model.catalog
        server._on_frame(frame((feed.GAP, None), (feed.ITEMS, [mark(2)])))
        assert reported() == [] and server.catalog_floor == 1  # the read is in flight
        await asyncio.gather(*server._waiting)
        assert reported() == [2] and server.catalog_floor == 2
        assert set(server.model.catalog) == {"fed", "stored"} == set(read_items(
            system.recorder)) | {"fed"}

    try:
        asyncio.run(scenario())
    finally:
        system.close()


# ---------------------------------------------------------------- roles, as shipped


@pytest.fixture
def served(tmp_path):
    """`microtune serve` with no NATS URL: the embedded server and its roles, as shipped."""
    data = tmp_path / "data"
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "adapters.cli", "serve", "--data-dir", str(data), "--dim",
         str(DIM), "--embedded-port", str(port), "--log-level", "warning"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    banner = [proc.stdout.readline()]
    while banner[-1] and "stop with Ctrl-C" not in banner[-1]:
        banner.append(proc.stdout.readline())
    assert "microtune is serving" in banner[0], banner
    yield f"nats://127.0.0.1:{port}", data / "auth"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def login(auth: Path, role: str) -> dict[str, str]:
    values = dict(line.split("=", 1) for line in (auth / f"{role}.env").read_text().splitlines())
    return {"user": values["MICROTUNE_NATS_USER"], "password": values["MICROTUNE_NATS_PASSWORD"]}


def test_every_role_may_ask_for_info_on_the_embedded_default(served):
    url, auth = served

    async def scenario():
        for role in ("publisher", "querier", "catalog", "admin"):
            nc = await nats.connect(url, allow_reconnect=False, **login(auth, role))
            got = await info(nc)
            assert got["dim"] == DIM and got["v"] == 1, role
            await nc.close()
        # the catalog role publishes an upsert and learns, by itself, that it is applied
        nc = await nats.connect(url, allow_reconnect=False, **login(auth, "catalog"))
        seq = await upsert(nc.jetstream(), {"a": vector(0)})
        assert (await status(nc, seq))["status"] == "applied"
        await nc.close()
        querier = await nats.connect(url, allow_reconnect=False, **login(auth, "querier"))
        assert (await client.rank(querier, "ann", ["a"])).items == ("a",)
        await querier.close()

    asyncio.run(scenario())


def test_the_query_processes_report_their_catalog_in_their_stats(server, tmp_path):
    async def scenario():
        _system, service = await start(tmp_path, server.url)
        nc = await nats.connect(server.url)
        seq = await upsert(nc.jetstream(), {"a": vector(0), "b": vector(1)})
        await status(nc, seq)
        await until(lambda: service.query_stats().get("catalog_items") == 2,
                    what="the query process's report")
        assert service.query_stats()["catalog_floor"] == seq
        assert service.stats.content_items == 2
        await nc.close()
        await service.stop()

    asyncio.run(scenario())
