"""End-to-end benchmark through NATS: durable ingest and query latency.

- ingest: a publisher process loads the events stream (N events over U users), then the
  service (this process: embedded nats-server, SQLite) consumes, commits, applies and acks
  them; events/s is measured from the first ack to the last applied event;
- queries: a client process sends requests open-loop at a fixed rate (default 1000/s), each
  with 100 candidates carrying their features, and records latency p50/p95/p99.

    python scripts/bench_nats.py --users 100000 --events 300000
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import numpy as np
import structlog
from bench_report import report
from rich.console import Console
from rich.progress import Progress

from actors import Microtune
from adapters.embedded import EmbeddedNats
from adapters.nats_service import Service, ServiceConfig
from events import TuningConfig

console = Console()


def publisher(url: str, users: int, events: int, dim: int) -> None:
    import msgpack
    import nats

    async def run():
        nc = await nats.connect(url)
        js = nc.jetstream()
        rng = np.random.default_rng(1)
        items = rng.normal(size=(1000, dim)).round(4).tolist()
        pending = []
        for n in range(events):
            u = n % users
            body = msgpack.packb({"v": 1, "id": f"e{n}", "u": f"user{u}", "t": 1.7e9 + n * 0.01,
                                  "k": "click" if n % 4 == 0 else "impression",
                                  "i": f"item{n % 1000}", "x": items[n % 1000]})
            pending.append(await js.publish_async(f"microtune.events.user{u}", body))
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
        await nc.close()

    asyncio.run(run())


def querier(url: str, rate: float, seconds: float, dim: int, users: int, out) -> None:
    import msgpack
    import nats

    async def run():
        nc = await nats.connect(url)
        rng = np.random.default_rng(2)
        cands = [[f"c{i}", rng.normal(size=dim).round(4).tolist()] for i in range(100)]
        latencies: list[float] = []
        errors = 0

        async def one(n: int) -> None:
            nonlocal errors
            body = msgpack.packb({"v": 1, "c": cands, "n": 10})
            t0 = time.perf_counter()
            try:
                await nc.request(f"microtune.query.user{n % users}", body, timeout=5)
                latencies.append(time.perf_counter() - t0)
            except Exception:
                errors += 1

        tasks = []
        start = time.perf_counter()
        n = 0
        while (now := time.perf_counter()) - start < seconds:
            due = start + n / rate
            if now < due:
                await asyncio.sleep(due - now)
            tasks.append(asyncio.create_task(one(n)))  # open loop: never wait for replies
            n += 1
        await asyncio.gather(*tasks)
        out.put({"sent": n, "errors": errors, "latencies": latencies,
                 "achieved_rate": n / seconds})
        await nc.close()

    asyncio.run(run())


async def main_async(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="microtune-bench-nats-"))
    server = EmbeddedNats(tmp / "nats").start()
    results: dict = {"users": args.users, "events": args.events, "dim": args.dim}
    system = Microtune.open(tmp / "bench.db", TuningConfig(version=1, dim=args.dim),
                            max_live=args.users + 1)
    service = Service(system, ServiceConfig(max_ack_pending=args.max_ack_pending))
    await service.start(server.url)  # creates the streams
    await service.stop_consuming()

    console.print(f"publishing {args.events:,} events for {args.users:,} users ...")
    pub = mp.get_context("spawn").Process(
        target=publisher, args=(server.url, args.users, args.events, args.dim))
    pub.start()
    await asyncio.to_thread(pub.join)

    start = time.perf_counter()
    cpu0 = time.process_time()
    await service.resume_consuming()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("ingest", total=args.events)
        while service.stats.applied + service.stats.duplicates < args.events:
            progress.update(task, completed=service.stats.applied)
            await asyncio.sleep(0.2)
    elapsed = time.perf_counter() - start
    results["ingest_events_per_s"] = round(args.events / elapsed)
    results["ingest_cpu_us_per_event"] = round(
        (time.process_time() - cpu0) / args.events * 1e6, 1)
    results["journal_events_per_commit"] = round(
        system.journal.stats.events / max(1, system.journal.stats.commits), 1)

    for rate in args.rates:
        out = mp.get_context("spawn").Queue()
        q = mp.get_context("spawn").Process(
            target=querier, args=(server.url, rate, args.query_seconds, args.dim, args.users, out))
        q.start()
        res = await asyncio.to_thread(out.get)
        await asyncio.to_thread(q.join)
        lat = np.array(res["latencies"]) * 1e3
        key = f"query_{int(rate)}qps"
        results[f"{key}_p50_ms"] = round(float(np.percentile(lat, 50)), 3)
        results[f"{key}_p95_ms"] = round(float(np.percentile(lat, 95)), 3)
        results[f"{key}_p99_ms"] = round(float(np.percentile(lat, 99)), 3)
        results[f"{key}_errors"] = res["errors"]
    await service.stop()
    server.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--max-ack-pending", type=int, default=20_000)
    parser.add_argument("--rates", type=float, nargs="+", default=[1000.0])
    parser.add_argument("--query-seconds", type=float, default=10.0)
    parser.add_argument("--out", default="bench-results/nats.json")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    results = asyncio.run(main_async(args))
    report("microtune end-to-end benchmark (NATS + SQLite)", results, args.out, console)

if __name__ == "__main__":
    main()
