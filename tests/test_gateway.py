"""The HTTP gateway (adapters/gateway.py) against a real running service and nats-server:
events in, weights out, errors with the codec's reasons, the catalog, info, admin with a
token, the contract and OpenAPI, and a burst of 1000 requests with no loss."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import uvicorn
from helpers import start_service, until

from adapters.gateway import GatewaySettings, create_app
from events import TuningConfig

CFG = TuningConfig(version=1, dim=2)


def call(method: str, url: str, body=None, headers=None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json",
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


class Gateway:
    """uvicorn serving the gateway on a free loopback port, in a thread of this process."""

    def __init__(self, nats_url: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(create_app(GatewaySettings(nats_url=nats_url)),
                                host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.base = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Gateway:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(20)


def click(n: int, user: str = "ann", **extra) -> dict:
    return {"id": f"e{n}", "u": user, "t": 100.0 + n, "k": "click", "i": "a",
            "x": [1.0, 0.0], **extra}


def test_events_in_weights_out_errors_with_reasons(server, tmp_path):
    async def scenario():
        _system, service = await start_service(tmp_path, server.url, CFG,
                                              admin_tokens={"ops": "s3cret"})
        try:
            with Gateway(server.url) as gw:
                base = gw.base
                status, body = await asyncio.to_thread(call, "POST", f"{base}/v1/events",
                                                       click(0))
                assert status == 202 and body["events"][0]["status"] == "accepted"
                status, body = await asyncio.to_thread(
                    call, "POST", f"{base}/v1/events",
                    {"events": [click(0), click(1), click(2, t=-5.0), {"k": "click"}]})
                assert status == 202 and body["accepted"] == 2
                outcomes = [(o["id"], o["status"], o.get("e")) for o in body["events"]]
                assert outcomes == [("e0", "duplicate", None), ("e1", "accepted", None),
                                    ("e2", "rejected", "out_of_range"),
                                    (None, "rejected", "missing_field")]
                status, body = await asyncio.to_thread(  # one bad event: its reason, 4xx
                    call, "POST", f"{base}/v1/events", click(3, x=[1.0, 0.0, 5.0, "x"]))
                assert status == 422 and body["e"] == "wrong_type" and body["f"] == "x"
                await until(lambda: service.stats.applied == 2)

                status, body = await asyncio.to_thread(
                    call, "PUT", f"{base}/v1/items", {"b": [{"i": "a", "x": [1.0, 0.0]},
                                                           {"i": "b", "x": [0.0, 1.0]}]})
                assert status == 202
                cs = body["cs"]

                async def applied() -> bool:
                    _s, info = await asyncio.to_thread(call, "GET", f"{base}/v1/info?cs={cs}")
                    return info["catalog"]["status"] == "applied"

                for _ in range(100):
                    if await applied():
                        break
                    await asyncio.sleep(0.1)
                status, body = await asyncio.to_thread(call, "GET", f"{base}/v1/info")
                assert status == 200 and body["dim"] == 2
                status, body = await asyncio.to_thread(
                    call, "POST", f"{base}/v1/users/ann/rank", {"c": ["a", "b"], "ms": 2})
                assert status == 200, body
                assert body["i"] == ["a", "b"] and body["q"] >= 2  # she clicked `a`
                assert body["w"][0] > body["w"][1]
                status, body = await asyncio.to_thread(
                    call, "POST", f"{base}/v1/users/ann/rank", {"c": [["a", [1.0]]]})
                assert status == 400 and body["e"] == "dimension"
                status, body = await asyncio.to_thread(
                    call, "POST", f"{base}/v1/users/ann/rank", {"c": ["nope"]})
                assert status == 400 and body["e"] == "missing_field"  # not in the catalog

                status, body = await asyncio.to_thread(call, "POST",
                                                       f"{base}/v1/admin/stats", {})
                assert status == 200 and body["applied"] == 2
                status, body = await asyncio.to_thread(
                    call, "POST", f"{base}/v1/admin/rollback", {"u": "ann", "to": 1})
                assert status == 403 and body["e"] == "forbidden"  # no token
                status, body = await asyncio.to_thread(
                    call, "POST", f"{base}/v1/admin/rollback", {"u": "ann", "to": 1},
                    {"Authorization": "Bearer s3cret"})
                assert status == 200, body

                status, body = await asyncio.to_thread(call, "GET", f"{base}/v1/users/ann")
                assert status == 403  # personal data: a token
                status, body = await asyncio.to_thread(
                    call, "GET", f"{base}/v1/users/ann", None,
                    {"Authorization": "Bearer s3cret"})
                assert status == 200, body
                assert body["u"] == "ann" and body["seq"] == 3 and len(body["w"]) == 3
                assert body["segment"] == "default" and body["bot"] is None
                status, body = await asyncio.to_thread(call, "GET", f"{base}/v1/contract")
                assert "event.schema.json" in body["schemas"]
                status, body = await asyncio.to_thread(call, "GET", f"{base}/openapi.json")
                assert "/v1/events" in body["paths"] and "/v1/users/{user}/rank" in body["paths"]
        finally:
            await service.stop()

    asyncio.run(scenario())


def test_a_burst_of_1000_requests_loses_nothing(server, tmp_path):
    async def scenario():
        _system, service = await start_service(tmp_path, server.url, CFG)
        try:
            with Gateway(server.url) as gw:
                def post(n: int) -> int:
                    return call("POST", f"{gw.base}/v1/events",
                                click(n, user=f"u{n % 50}"))[0]

                with ThreadPoolExecutor(32) as pool:
                    statuses = await asyncio.to_thread(lambda: list(pool.map(post,
                                                                             range(1000))))
                assert statuses.count(202) == 1000
                await until(lambda: service.stats.applied == 1000, timeout=60)
                assert service.stats.duplicates == 0
        finally:
            await service.stop()

    asyncio.run(scenario())
