"""Ceilings on this machine: what the plainest Python does with microtune's work (DESIGN.md 5, 6).

The targets of DESIGN.md section 6 are ratios of these; `microtune bench nats` prints its
figures beside them. The events and queries are those of `microtune bench nats` (its event
generator and querier, imported): ~205-byte msgpack events, user n % U for the n-th event
(so at the default 300k events over 100k users, one event in three is a user's first).

- null pipeline: a publisher process loads the events stream first; then one consumer process
  (nothing else of microtune) drains it: a durable JetStream push consumer with a callback (as
  adapters/nats_service.py consumes), `msgpack.unpackb`, a row (user, seq, id, body) queued
  for a writer thread that commits whatever is queued as one SQLite transaction (WAL,
  synchronous=FULL, a table shaped like mt_events), then acks the batch's messages. Events/s
  from the first delivery to the last ack, and the consumer process's CPU per event;
- bare responder: a nats-py responder in its own process that decodes a query (100
  candidates with packed float64 features, as adapters.client.rank sends them), scores them
  with numpy (features @ w), sorts and replies; bench_nats's open-loop querier (its own
  process) at each rate (default 1k q/s) records p50/p95/p99;
- replay ceiling: read the null pipeline's rows back in (user, seq) order and
  `msgpack.unpackb` each body (rows/s).

    microtune bench ceiling                                  # about a minute
    microtune bench ceiling --events 30000 --users 10000 --query-seconds 3
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import multiprocessing as mp
import queue
import shutil
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import structlog
from bench_nats import create_events_stream, event, event_items, latency, publish, queries
from bench_report import report
from rich.console import Console

from adapters.embedded import EmbeddedNats
from adapters.nats_service import ServiceConfig

console = Console()

TABLE = """CREATE TABLE IF NOT EXISTS mt_events (
    user_id VARCHAR(128) NOT NULL, seq BIGINT NOT NULL, event_id VARCHAR(128) NOT NULL,
    body BLOB NOT NULL,
    CONSTRAINT mt_events_pk PRIMARY KEY (user_id, seq),
    CONSTRAINT mt_events_event_id_uq UNIQUE (user_id, event_id)
) WITHOUT ROWID"""
CHUNK = 256  # rows per INSERT statement, as store.recorder writes them


def open_db(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA cache_size=-65536")
    conn.execute(TABLE)
    return conn


def insert(cur: sqlite3.Cursor, rows: list[tuple]) -> None:
    for start in range(0, len(rows), CHUNK):
        chunk = rows[start:start + CHUNK]
        cur.execute("INSERT INTO mt_events (user_id, seq, event_id, body) VALUES "
                    + ",".join(["(?, ?, ?, ?)"] * len(chunk)), [v for r in chunk for v in r])


def null_pipeline(url: str, db: str, count: int, config: ServiceConfig, out) -> None:
    """The consumer process: consume, decode, group commit, ack; puts its figures on `out`."""
    import nats
    from nats.js import api

    async def run() -> dict:
        loop = asyncio.get_running_loop()
        nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
        js = nc.jetstream()
        conn = open_db(db)
        queued: collections.deque = collections.deque()  # (row, msg); None: stop
        wake = threading.Event()
        done = asyncio.Event()
        seqs: dict[str, int] = {}
        clock = {"t0": 0.0, "cpu0": 0.0, "acked": 0, "commits": 0}

        def writer() -> None:  # the journal thread: commit whatever is queued, then ack it
            cur = conn.cursor()
            while True:
                wake.wait()
                wake.clear()
                batch = []
                while queued:
                    batch.append(queued.popleft())
                if batch and batch[-1] is None:
                    return
                if not batch:
                    continue
                cur.execute("BEGIN")
                insert(cur, [row for row, _ in batch])
                cur.execute("COMMIT")
                clock["commits"] += 1
                loop.call_soon_threadsafe(ack, [msg for _, msg in batch])

        tasks: set[asyncio.Task] = set()

        def ack(msgs: list) -> None:
            task = loop.create_task(ack_all(msgs))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        async def ack_all(msgs: list) -> None:
            for msg in msgs:
                await msg.ack()
            clock["acked"] += len(msgs)
            if clock["acked"] >= count:
                done.set()

        async def on_event(msg) -> None:
            if not clock["t0"]:
                clock["t0"], clock["cpu0"] = time.perf_counter(), time.process_time()
            body = msgpack.unpackb(msg.data)
            user = body["u"]
            seq = seqs[user] = seqs.get(user, 0) + 1
            queued.append(((user, seq, body["id"], msg.data), msg))
            if not wake.is_set():
                wake.set()

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        info = await js.add_consumer(config.events_stream, api.ConsumerConfig(
            durable_name=config.durable, deliver_subject=f"_CEILING.deliver.{config.durable}",
            filter_subject=f"{config.prefix}.events.>", ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=config.ack_wait, max_deliver=config.max_deliver,
            max_ack_pending=config.max_ack_pending, deliver_policy=api.DeliverPolicy.ALL))
        sub = await js.subscribe_bind(
            stream=config.events_stream, config=info.config, consumer=config.durable,
            cb=on_event, manual_ack=True, pending_msgs_limit=config.max_ack_pending * 2,
            pending_bytes_limit=config.max_ack_pending * config.limits.max_payload_bytes)
        await done.wait()
        await nc.flush()  # the last acks are at the server
        seconds = time.perf_counter() - clock["t0"]
        cpu = time.process_time() - clock["cpu0"]
        await sub.unsubscribe()
        queued.append(None)
        wake.set()
        thread.join()
        rows = conn.execute("SELECT count(*) FROM mt_events").fetchone()[0]
        conn.close()
        await nc.close()
        return {"seconds": seconds, "cpu": cpu, "commits": clock["commits"], "rows": rows}

    out.put(asyncio.run(run()))


def responder(url: str, prefix: str, dim: int, ready, stop, out) -> None:
    """The bare responder: decode, score with numpy, sort, reply; nothing else."""
    import nats

    async def run() -> int:
        nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
        w = np.random.default_rng(3).normal(size=dim)
        answered = 0

        async def on_query(msg) -> None:
            nonlocal answered
            query = msgpack.unpackb(msg.data)
            cands = query["c"]
            ids = [c[0] for c in cands]
            if isinstance(cands[0][1], bytes):  # packed float64, as the client helper sends
                x = np.frombuffer(b"".join(c[1] for c in cands), dtype="<f8")
                x = x.reshape(len(cands), -1)
            else:
                x = np.array([c[1] for c in cands], dtype=float)
            scores = x @ w
            top = np.argsort(-scores)[:query.get("n", len(ids))]
            await nc.publish(msg.reply, msgpack.packb(
                {"v": 1, "i": [ids[i] for i in top], "s": scores[top].tolist()}))
            answered += 1

        await nc.subscribe(f"{prefix}.query.*", cb=on_query, pending_msgs_limit=100_000)
        await nc.flush()
        ready.set()
        await asyncio.to_thread(stop.wait)
        await nc.close()
        return answered

    out.put(asyncio.run(run()))


def replay_ceiling(db: str, limit: int | None) -> tuple[int, float]:
    """Read the log in (user, seq) order and unpack every body: (rows, rows/s), best of 2."""
    sql = "SELECT user_id, seq, event_id, body FROM mt_events ORDER BY user_id, seq"
    if limit:
        sql += f" LIMIT {int(limit)}"
    best = 0.0
    rows = 0
    unpackb = msgpack.unpackb
    for _ in range(2):
        conn = sqlite3.connect(db)
        start = time.perf_counter()
        rows = 0
        for _user, _seq, _id, body in conn.execute(sql):
            unpackb(body)
            rows += 1
        best = max(best, rows / (time.perf_counter() - start))
        conn.close()
    return rows, best


async def result_of(process, out) -> object:
    """What a child process put on `out`; raises if it died without."""
    while True:
        try:
            return await asyncio.to_thread(out.get, True, 1.0)
        except queue.Empty:
            if not process.is_alive():
                raise RuntimeError(f"{process.name} exited with {process.exitcode}") from None


async def main_async(args) -> dict:
    ctx = mp.get_context("spawn")
    tmp = Path(tempfile.mkdtemp(prefix="microtune-bench-ceiling-"))
    server = EmbeddedNats(tmp / "nats").start()
    config = ServiceConfig(max_ack_pending=args.max_ack_pending)
    items = event_items(args.dim)
    sample = range(0, args.events, max(1, args.events // 10_000))
    results: dict = {
        "users": args.users, "events": args.events, "dim": args.dim,
        "first_event_share": round(min(args.users, args.events) / args.events, 3),
        "event_bytes_mean": round(float(np.mean(
            [len(event(n, args.users, items)[1]) for n in sample])), 1),
    }
    try:
        # 1. the null pipeline over a backlog
        await create_events_stream(server.url, config)
        console.print(f"publishing {args.events:,} events for {args.users:,} users ...")
        start = time.perf_counter()
        await publish(server.url, args.users, args.events, args.dim)
        results["publish_seconds"] = round(time.perf_counter() - start, 1)
        db = str(tmp / "ceiling.db")
        out = ctx.Queue()
        consumer = ctx.Process(target=null_pipeline, name="null pipeline",
                               args=(server.url, db, args.events, config, out))
        with console.status("the null pipeline drains the backlog ..."):
            consumer.start()
            res = await result_of(consumer, out)
            await asyncio.to_thread(consumer.join)
        if res["rows"] != args.events:
            raise RuntimeError(f"the null pipeline logged {res['rows']} of {args.events} events")
        results["null_pipeline_events_per_s"] = round(args.events / res["seconds"])
        results["null_pipeline_seconds"] = round(res["seconds"], 1)
        results["null_pipeline_cpu_us_per_event"] = round(res["cpu"] / args.events * 1e6, 1)
        results["null_pipeline_events_per_commit"] = round(args.events / res["commits"], 1)

        # 2. the bare responder, open loop
        ready, stop, answers = ctx.Event(), ctx.Event(), ctx.Queue()
        bare = ctx.Process(target=responder, name="bare responder",
                           args=(server.url, config.prefix, args.dim, ready, stop, answers))
        bare.start()
        if not await asyncio.to_thread(ready.wait, 30):
            raise RuntimeError("the bare responder did not start")
        for rate in args.rates:
            with console.status(f"bare responder at {rate:,.0f} q/s ..."):
                res = await queries(server.url, rate, args.query_seconds, args.dim, args.users)
            latency(results, f"responder_{int(rate)}qps", res)
            results[f"responder_{int(rate)}qps_achieved_rate"] = round(res["achieved_rate"])
        stop.set()
        await result_of(bare, answers)
        await asyncio.to_thread(bare.join)

        # 3. read + decode of the logged rows
        with console.status("reading the log back ..."):
            rows, rate = replay_ceiling(db, args.replay_rows)
        results["replay_rows"] = rows
        results["replay_rows_per_s"] = round(rate)
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--max-ack-pending", type=int, default=ServiceConfig().max_ack_pending)
    parser.add_argument("--rates", type=float, nargs="+", default=[1000.0],
                        help="query rates of the bare responder (q/s, open loop)")
    parser.add_argument("--query-seconds", type=float, default=10.0)
    parser.add_argument("--replay-rows", type=int, default=None,
                        help="rows read back at most (default: all the null pipeline logged)")
    parser.add_argument("--out", default="bench-results/ceiling.json")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    start = time.perf_counter()
    results = asyncio.run(main_async(args))
    results["run_seconds"] = round(time.perf_counter() - start, 1)
    report("ceilings on this machine (DESIGN.md 5, 6)", results, args.out, console)


if __name__ == "__main__":
    main()
