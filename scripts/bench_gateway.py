"""The HTTP gateway's overhead per request, against a direct NATS request, in the same run.

An embedded nats-server, the service (a temp SQLite store, one query process) and
`microtune gateway` as a process of its own, as in production. A client process sends the same
rank requests (20 candidates by id, users spread over 1000) open-loop at a fixed rate
(default 500/s, 10 s each): first straight to `microtune.query.<user>` over NATS, then as
`POST /v1/users/<user>/rank` over HTTP/1.1 keep-alive connections; p50/p95/p99 of each and
the difference is the gateway's cost. Writes bench-results/gateway.json.

    microtune bench gateway [--rate 500] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import nats
import numpy as np
from bench_report import report
from rich.console import Console

from actors import Microtune
from adapters.embedded import EmbeddedNats
from adapters.nats_service import Service, ServiceConfig
from events import TuningConfig

DIM = 16
ITEMS = 200
USERS = 1000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _body(n: int) -> dict:
    rng = np.random.default_rng(n)
    return {"c": [f"i{k}" for k in rng.choice(ITEMS, 20, replace=False).tolist()]}


async def _paced(rate: float, seconds: float, send) -> tuple[list[float], int]:
    """Open loop: request n goes out at start + n / rate whatever the replies do."""
    latencies: list[float] = []
    errors = 0
    tasks = []
    start = time.perf_counter()
    total = int(rate * seconds)

    async def one(n: int) -> None:
        nonlocal errors
        sent = time.perf_counter()
        try:
            await send(n)
            latencies.append(time.perf_counter() - sent)
        except Exception as exc:
            errors += 1
            if errors == 1:
                print(f"first error: {exc!r}", flush=True)

    for n in range(total):
        delay = start + n / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(n)))
    await asyncio.gather(*tasks)
    return latencies, errors


class _Http:
    """A pool of HTTP/1.1 keep-alive connections (asyncio streams: no client library)."""

    def __init__(self, port: int, size: int) -> None:
        self.port, self.size = port, size
        self.free: asyncio.Queue = asyncio.Queue()

    async def open(self) -> None:
        for _ in range(self.size):
            self.free.put_nowait(await asyncio.open_connection("127.0.0.1", self.port))

    async def post(self, path: str, body: bytes) -> bytes:
        reader, writer = await self.free.get()
        try:
            return await self._exchange(reader, writer, path, body)
        except (asyncio.IncompleteReadError, ConnectionError):
            # uvicorn closes a connection idle for 5 s: a client opens another, as any does
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            return await self._exchange(reader, writer, path, body)
        finally:
            self.free.put_nowait((reader, writer))

    @staticmethod
    async def _exchange(reader, writer, path: str, body: bytes) -> bytes:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                     f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                     + body)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        data = await reader.readexactly(length)
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head[:40])
        return data


def client(nats_url: str, http_port: int, rate: float, seconds: float, out) -> None:
    async def main() -> dict:
        nc = await nats.connect(nats_url)
        http = _Http(http_port, 64)
        await http.open()

        async def direct(n: int) -> None:
            body = {"v": 1, **_body(n)}
            reply = await nc.request(f"microtune.query.u{n % USERS}",
                                     msgpack.packb(body), timeout=5)
            if b"\xa1e" in reply.data[:8] or "e" in msgpack.unpackb(reply.data):
                raise RuntimeError("refused")

        async def gateway(n: int) -> None:
            await http.post(f"/v1/users/u{n % USERS}/rank", json.dumps(_body(n)).encode())

        for warm in (direct, gateway):  # connections and caches warm, not measured
            await _paced(rate, 1.0, warm)
        results = {}
        for name, send in (("nats", direct), ("gateway", gateway)):
            lat, errors = await _paced(rate, seconds, send)
            results[name] = {"latencies": lat, "errors": errors}
        await nc.close()
        return results

    out.put(asyncio.run(main()))


async def run(args: argparse.Namespace, console: Console) -> dict:
    with tempfile.TemporaryDirectory() as tmp, EmbeddedNats(Path(tmp) / "nats") as server:
        system = Microtune.open(Path(tmp) / "mt.db", TuningConfig(version=1, dim=DIM))
        service = Service(system, ServiceConfig(query_processes=1))
        await service.start(server.url)
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        rng = np.random.default_rng(0)
        items = [{"i": f"i{k}", "x": rng.normal(size=DIM).round(4).tolist()}
                 for k in range(ITEMS)]
        ack = await js.publish("microtune.content", msgpack.packb({"v": 1, "b": items}))
        for _ in range(100):  # the catalog in the query process before any query
            info = msgpack.unpackb((await nc.request("microtune.info", msgpack.packb(
                {"cs": ack.seq}), timeout=5)).data)
            if info["catalog"]["status"] == "applied":
                break
            await asyncio.sleep(0.1)
        await nc.close()
        port = _free_port()
        gateway = subprocess.Popen(
            [sys.executable, "-m", "adapters.cli", "gateway", "--nats-url", server.url,
             "--port", str(port), "--log-level", "warning"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            gateway.stdout.readline()  # its banner: it is about to listen
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    await asyncio.sleep(0.1)
            console.print(f"{args.rate:g} req/s for {args.seconds:g} s, direct then through "
                          "the gateway ...")
            out = mp.get_context("spawn").Queue()
            proc = mp.get_context("spawn").Process(
                target=client, args=(server.url, port, args.rate, args.seconds, out))
            proc.start()
            res = await asyncio.to_thread(out.get)
            await asyncio.to_thread(proc.join)
        finally:
            gateway.terminate()
            gateway.wait(10)
            await service.stop()
    results: dict = {"rate": args.rate, "seconds": args.seconds, "candidates": 20}
    for name, r in res.items():
        lat = np.array(r["latencies"]) * 1e3
        for pct in (50, 95, 99):
            results[f"{name}_p{pct}_ms"] = round(float(np.percentile(lat, pct)), 3)
        results[f"{name}_errors"] = r["errors"]
    for pct in (50, 99):
        results[f"gateway_overhead_p{pct}_ms"] = round(
            results[f"gateway_p{pct}_ms"] - results[f"nats_p{pct}_ms"], 3)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", default="bench-results/gateway.json")
    args = parser.parse_args()
    console = Console()
    results = asyncio.run(run(args, console))
    report("the HTTP gateway against a direct NATS request, same run", results, args.out,
           console)


if __name__ == "__main__":
    main()
