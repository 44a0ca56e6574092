"""End-to-end benchmark through NATS: durable ingest, RSS over time, query latency.

- ingest: a publisher process loads the events stream (N events over U users), then the
  service (this process: embedded nats-server; SQLite, or PostgreSQL with --store) consumes,
  commits, applies and acks them; events/s from resuming the consumer to the last applied
  event, and the service's RSS sampled every second (plotted to bench-results/nats.png);
  --backlog publishes before the service starts (events/s from its start);
- queries: a client process sends requests open-loop at fixed rates (default 500, 1000,
  5000/s), each with 100 candidates carrying their features (packed float64, as the client
  helper sends them; --list-features for lists of numbers), and records p50/p95/p99; first
  with ingest idle, then while a fresh batch of events (--during-ingest) is ingested;
- beside the ceilings: with bench-results/ceiling.json (`microtune bench ceiling`), each
  figure beside its ceiling on this machine, the ratio and its target (DESIGN.md section 6).

    microtune bench nats                      # 100k users, 600k events, SQLite
    microtune bench nats --store postgresql+psycopg://postgres@127.0.0.1/test --out \
        bench-results/nats-pg.json            # in a schema of its own, dropped after
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing as mp
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import msgpack
import numpy as np
import structlog
from bench_report import report
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from actors import Microtune
from adapters.embedded import EmbeddedNats
from adapters.nats_service import Service, ServiceConfig
from events import TuningConfig

console = Console()


def event_items(dim: int) -> list[list[float]]:
    """The 1000 items the events name, with their features (the same every run)."""
    return np.random.default_rng(1).normal(size=(1000, dim)).round(4).tolist()


def event(n: int, users: int, items: list[list[float]]) -> tuple[str, bytes]:
    """The benchmark's n-th event: (subject, msgpack body; 194-210 bytes at dim 16, the id
    growing with n). Its user is n % users, so the first `users` events are each their user's
    first."""
    u = n % users
    body = msgpack.packb({"v": 1, "id": f"e{n}", "u": f"user{u}", "t": 1.7e9 + n * 0.01,
                          "k": "click" if n % 4 == 0 else "impression",
                          "i": f"item{n % 1000}", "x": items[n % 1000]})
    return f"microtune.events.user{u}", body


def publisher(url: str, users: int, events: int, dim: int, first: int = 0) -> None:
    import nats

    async def run():
        nc = await nats.connect(url)
        js = nc.jetstream()
        items = event_items(dim)
        pending = []
        for n in range(first, first + events):
            pending.append(await js.publish_async(*event(n, users, items)))
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
        await nc.close()

    asyncio.run(run())


async def create_events_stream(url: str, config: ServiceConfig) -> None:
    """The events stream as the service creates it (so that a backlog can wait in it before
    the service starts); the service finds it and leaves it as it is."""
    import nats
    from nats.js import api

    nc = await nats.connect(url)
    await nc.jetstream().add_stream(api.StreamConfig(
        name=config.events_stream, subjects=[f"{config.prefix}.events.>"],
        retention=api.RetentionPolicy.WORK_QUEUE, storage=api.StorageType.FILE,
        duplicate_window=config.duplicate_window))
    await nc.close()


def querier(url: str, rate: float, seconds: float, dim: int, users: int, out,
            lists: bool = False) -> None:
    import nats

    async def run():
        nc = await nats.connect(url)
        rng = np.random.default_rng(2)
        # features as the client helper sends them (packed float64), or as lists of numbers
        cands = [[f"c{i}", x.tolist() if lists else x.tobytes()]
                 for i, x in enumerate(rng.normal(size=(100, dim)).round(4))]
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


class RssSampler:
    """RSS of this process (the service) once a second, with the events applied so far."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.samples: list[tuple[float, float, int]] = []  # (seconds, MiB, applied)
        self._stop = threading.Event()
        self._start = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.wait(1.0):
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * page / 2**20
            self.samples.append((time.perf_counter() - self._start, rss,
                                 self.service.stats.applied))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


async def publish(url: str, users: int, events: int, dim: int, first: int = 0) -> None:
    pub = mp.get_context("spawn").Process(target=publisher,
                                          args=(url, users, events, dim, first))
    pub.start()
    await asyncio.to_thread(pub.join)


async def queries(url: str, rate: float, seconds: float, dim: int, users: int,
                  lists: bool = False) -> dict:
    out = mp.get_context("spawn").Queue()
    q = mp.get_context("spawn").Process(target=querier,
                                        args=(url, rate, seconds, dim, users, out, lists))
    q.start()
    res = await asyncio.to_thread(out.get)
    await asyncio.to_thread(q.join)
    return res


def latency(results: dict, key: str, res: dict) -> None:
    lat = np.array(res["latencies"]) * 1e3
    for pct in (50, 95, 99):
        results[f"{key}_p{pct}_ms"] = round(float(np.percentile(lat, pct)), 3)
    results[f"{key}_errors"] = res["errors"]


async def ingest(service: Service, count: int, label: str, *, url: str | None = None) -> float:
    """Resume consuming (or start the service, given its server's `url`) and wait until `count`
    more events are applied; events/s."""
    target = service.stats.applied + service.stats.duplicates + count
    start = time.perf_counter()
    if url is not None:
        await service.start(url)  # consumes at once
    await service.resume_consuming()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(label, total=count)
        while service.stats.applied + service.stats.duplicates < target:
            progress.update(task, completed=count - (target - service.stats.applied
                                                      - service.stats.duplicates))
            await asyncio.sleep(0.2)
    elapsed = time.perf_counter() - start
    await service.stop_consuming()
    return count / elapsed


async def main_async(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="microtune-bench-nats-"))
    server = EmbeddedNats(tmp / "nats").start()
    store = args.store or str(tmp / "bench.db")
    backend = store.split(":")[0] if "://" in store else "sqlite"
    scratch = None
    if backend.startswith("postgresql"):  # a schema of its own: reruns never collide
        store, scratch = scratch_schema(store)
    results: dict = {"users": args.users, "events": args.events, "dim": args.dim,
                     "store": backend,
                     "query_features": "lists" if args.list_features else "packed float64"}
    config = ServiceConfig(max_ack_pending=args.max_ack_pending)
    if args.backlog:  # the events wait in the stream before the service exists
        results["ingest_from"] = "backlog published before the service started"
        await create_events_stream(server.url, config)
        console.print(f"publishing {args.events:,} events for {args.users:,} users ...")
        await publish(server.url, args.users, args.events, args.dim)
    system = Microtune.open(store, TuningConfig(version=1, dim=args.dim),
                            max_live=args.users + 1)
    service = Service(system, config)
    if not args.backlog:
        results["ingest_from"] = "backlog published while the consumer was paused"
        await service.start(server.url)  # creates the streams
        await service.stop_consuming()
        console.print(f"publishing {args.events:,} events for {args.users:,} users ...")
        await publish(server.url, args.users, args.events, args.dim)

    # 1. durable ingest alone, RSS sampled
    sampler = RssSampler(service)
    cpu0 = time.process_time()
    results["ingest_events_per_s"] = round(await ingest(
        service, args.events, "ingest", url=server.url if args.backlog else None))
    sampler.stop()
    results["ingest_seconds"] = round(sampler.samples[-1][0] if sampler.samples else 0, 1)
    results["ingest_cpu_us_per_event"] = round(
        (time.process_time() - cpu0) / args.events * 1e6, 1)
    results["journal_events_per_commit"] = round(
        system.journal.stats.events / max(1, system.journal.stats.commits), 1)
    if sampler.samples:
        rss = [mib for _, mib, _ in sampler.samples]
        results["rss_start_mib"] = round(rss[0])
        results["rss_peak_mib"] = round(max(rss))
        results["rss_end_mib"] = round(rss[-1])

    # 2. queries with ingest idle
    for rate in args.rates:
        res = await queries(server.url, rate, args.query_seconds, args.dim, args.users,
                            args.list_features)
        latency(results, f"query_{int(rate)}qps_idle", res)

    # 3. queries while ingest runs (a fresh batch of events each time)
    if args.during_ingest:
        first = args.events
        for rate in args.rates:
            await publish(server.url, args.users, args.during_ingest, args.dim, first)
            first += args.during_ingest
            task = asyncio.create_task(
                ingest(service, args.during_ingest, f"ingest + {int(rate)} q/s"))
            res = await queries(server.url, rate, args.query_seconds, args.dim, args.users,
                                args.list_features)
            results[f"ingest_events_per_s_with_{int(rate)}qps"] = round(await task)
            latency(results, f"query_{int(rate)}qps_ingesting", res)

    # the collector's pauses over the whole run (actors.gc_pauses): in the query processes
    # (the serving path) and in the ingest process
    await asyncio.sleep(1.2)  # the query processes' last report
    served = service.query_stats()
    serving = [p for p in served["gc"] if p]
    results["gc_longest_pause_ms"] = max((p["longest_ms"] for p in serving), default=None)
    results["gc_pauses_over_10ms"] = sum(p["over_10ms"] for p in serving)
    results["gc_query_processes"] = serving
    results["gc_ingest"] = system.gc_pauses.to_map()
    results["query_process_cpu_s"] = round(served.get("cpu_s", 0.0), 1)
    results["query_process_rows_applied"] = served.get("applied", 0)
    results["query_process_rss_mib"] = served.get("rss_mib")
    await service.stop()
    server.stop()
    if scratch is not None:
        scratch()
    if sampler.samples:
        plot_rss(sampler.samples, Path(args.out).with_suffix(".png"), backend)
    return results


def scratch_schema(url: str) -> tuple[str, Callable[[], None]]:
    """The URL with its search_path set to a new schema, and the call that drops it."""
    import psycopg

    schema = f"mt_bench_{uuid.uuid4().hex[:10]}"
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")

    def drop() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")

    return f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}", drop


def plot_rss(samples: list, path: Path, backend: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s[0] for s in samples]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(t, [s[1] for s in samples], color="tab:blue")
    ax.set_xlabel("seconds of ingest")
    ax.set_ylabel("service RSS (MiB)", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(t, [s[2] for s in samples], color="tab:orange")
    ax2.set_ylabel("events applied", color="tab:orange")
    ax.set_title(f"durable ingest through NATS ({backend})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def beside_ceiling(results: dict, path: Path) -> dict | None:
    """Each figure beside its ceiling (`microtune bench ceiling`, measured on this machine) and
    the ratio, with the target of DESIGN.md section 6 where there is one; None without a
    ceilings file."""
    if not path.exists():
        console.print(f"no ceilings at {path}: `microtune bench ceiling` measures them")
        return None
    ceiling = json.loads(path.read_text())
    rows: dict[str, dict] = {}

    def add(name: str, ours, theirs, target: str | None = None) -> None:
        if ours is None or theirs is None or not theirs:
            return
        ratio = ours / theirs
        row = {"microtune": ours, "ceiling": theirs, "ratio": round(ratio, 2)}
        if target is not None:  # ">= 0.5" or "<= 3"
            op, bound = target.split()
            row["target"] = target
            row["met"] = ratio >= float(bound) if op == ">=" else ratio <= float(bound)
        rows[name] = row

    add("ingest events/s (ceiling: the null pipeline)", results.get("ingest_events_per_s"),
        ceiling.get("null_pipeline_events_per_s"), ">= 0.5")
    add("CPU µs per event (ceiling: the null pipeline)", results.get("ingest_cpu_us_per_event"),
        ceiling.get("null_pipeline_cpu_us_per_event"))
    for rate in sorted({int(k.split("_")[1][:-3]) for k in ceiling if k.startswith("responder_")
                        and k.endswith("_p50_ms")}):
        for pct, target in (("p50", "<= 1.5"), ("p95", None), ("p99", "<= 3")):
            add(f"query {rate} q/s idle {pct} ms (ceiling: the bare responder)",
                results.get(f"query_{rate}qps_idle_{pct}_ms"),
                ceiling.get(f"responder_{rate}qps_{pct}_ms"), target)
    for key in results:  # the query tail while a backlog drains, against microtune's own idle
        if key.startswith("query_") and key.endswith("_ingesting_p99_ms"):
            rate = key.split("_")[1]
            add(f"query {rate[:-3]} q/s p99 ms while ingesting (against microtune idle)",
                results[key], results.get(f"query_{rate}_idle_p99_ms"), "<= 3")
    add("full replay events/s (ceiling: read + decode)", results.get("replay_events_per_s"),
        ceiling.get("replay_rows_per_s"), ">= 0.5")

    measured = ceiling.get("machine", {})
    return {"file": str(path), "measured": measured.get("date"),
            "events": ceiling.get("events"), "users": ceiling.get("users"), "figures": rows}


def show_beside(beside: dict) -> None:
    table = Table(title=f"beside the ceilings ({beside['file']}: {beside['events']:,} events "
                        f"over {beside['users']:,} users, {beside['measured']})")
    for column in ("figure", "microtune", "ceiling", "ratio", "target"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    for name, row in beside["figures"].items():
        target = row.get("target", "-")
        if "met" in row:
            verdict = "[green]met[/]" if row["met"] else "[red]missed[/]"
            target = f"{target} {verdict}"
        table.add_row(name, f"{row['microtune']:,}", f"{row['ceiling']:,}",
                      f"{row['ratio']:.2f}x", target)
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=600_000)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--max-ack-pending", type=int, default=20_000)
    parser.add_argument("--rates", type=float, nargs="+", default=[500.0, 1000.0, 5000.0])
    parser.add_argument("--query-seconds", type=float, default=10.0)
    parser.add_argument("--during-ingest", type=int, default=100_000,
                        help="events ingested while each query rate runs (0: skip)")
    parser.add_argument("--store", help="SQLAlchemy URL (PostgreSQL); default: a temp SQLite")
    parser.add_argument("--list-features", action="store_true",
                        help="queries carry features as lists of numbers, not packed float64")
    parser.add_argument("--backlog", action="store_true",
                        help="publish the events before the service starts, which then "
                             "drains them (default: publish while its consumer is paused)")
    parser.add_argument("--ceiling", default="bench-results/ceiling.json", type=Path,
                        help="figures of `microtune bench ceiling` to print ours beside")
    parser.add_argument("--out", default="bench-results/nats.json")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    results = asyncio.run(main_async(args))
    title = f"microtune end-to-end benchmark (NATS + {results['store']})"
    if results["store"] != "sqlite":  # the ceilings are SQLite's
        console.print("the ceilings were measured on SQLite: no ratios for another store")
    elif (beside := beside_ceiling(results, args.ceiling)) is not None:
        results["vs_ceiling"] = beside
    report(title, results, args.out, console)
    if "vs_ceiling" in results:
        show_beside(results["vs_ceiling"])

if __name__ == "__main__":
    main()
