"""microtune as a NATS service (adapters/discovery.py): $SRV.PING, $SRV.INFO and $SRV.STATS
answered by the service process (info, admin) and each query process (query), against a real
nats-server, with the endpoints still answering as before."""

from __future__ import annotations

import asyncio
import json

import msgpack
import nats
from helpers import start_service

from events import TuningConfig

CFG = TuningConfig(version=1, dim=2)


async def _gather(nc, subject: str, wait: float = 1.0) -> list[dict]:
    """Every answer to a request on `subject` within `wait` (each instance answers)."""
    inbox = nc.new_inbox()
    got: list[dict] = []

    async def on_reply(msg) -> None:
        got.append(json.loads(msg.data))

    sub = await nc.subscribe(inbox, cb=on_reply)
    await nc.publish(subject, b"", reply=inbox)
    await asyncio.sleep(wait)
    await sub.unsubscribe()
    return got


def test_srv_info_lists_the_query_info_and_admin_endpoints(server, tmp_path):
    async def scenario():
        _system, service = await start_service(tmp_path, server.url, CFG, query_processes=2)
        nc = await nats.connect(server.url)
        try:
            pings = await _gather(nc, "$SRV.PING.microtune")
            assert len(pings) == 3 and {p["name"] for p in pings} == {"microtune"}
            infos = await _gather(nc, "$SRV.INFO.microtune")
            endpoints = {(i["metadata"]["role"], e["name"], e["subject"])
                         for i in infos for e in i["endpoints"]}
            assert endpoints == {("service", "info", "microtune.info"),
                                 ("service", "admin", "microtune.admin.*"),
                                 ("queries", "query", "microtune.query.*")}
            # the endpoints answer as before, and count it
            reply = await nc.request("microtune.info", b"", timeout=5)
            assert msgpack.unpackb(reply.data)["dim"] == 2
            for _ in range(3):
                reply = await nc.request("microtune.query.ann", msgpack.packb(
                    {"v": 1, "c": [["a", [1.0, 0.0]]]}), timeout=5)
                assert msgpack.unpackb(reply.data)["i"] == ["a"]
            stats = await _gather(nc, "$SRV.STATS.microtune")
            served: dict[str, int] = {}
            for s in stats:
                for e in s["endpoints"]:
                    served[e["name"]] = served.get(e["name"], 0) + e["num_requests"]
            assert served["info"] >= 1 and served["query"] >= 3
        finally:
            await service.stop()
            await nc.close()

    asyncio.run(scenario())
