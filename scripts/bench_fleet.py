"""Durable ingest of a fleet: one service, then 1, 2, 3 workers, in the same run.

For each setup: an embedded nats-server with the fleet's query mapping, a fresh store, the
events stream created as the service creates it (partitioned), a backlog of `--events`
events for `--users` users published into it, then the processes started (`serve`, or
`serve --worker-id` per worker, each with its query process). The rate is taken while the
backlog drains, between 10% and 90% of it committed (start-up and hand-offs out of the
window as far as they can be). Ratios against one worker of the same run. SQLite by default;
`--store postgresql://...` for PostgreSQL (a fresh schema is not made: give an empty
database). Writes bench-results/fleet.json.

    microtune bench fleet [--events 40000] [--users 4000] [--workers 1 2 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import nats
from bench_report import report
from nats.js import api
from rich.console import Console

from adapters.client import msg_id
from adapters.embedded import EmbeddedNats
from adapters.fleet.supervisor import fleet_server_config
from adapters.nats_service import partition_transform
from store.recorder import open_recorder

ROOT = Path(__file__).resolve().parents[1]
DIM = 16


def _config(tmp: Path) -> Path:
    config = tmp / "fleet.conf"
    text = fleet_server_config(Path("none"), "microtune", 16).split("\n", 1)[1]
    config.write_text(text)  # the mapping alone: no users on this server
    return config


async def _backlog(url: str, events: int, users: int) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(api.StreamConfig(
        name="MICROTUNE_EVENTS", subjects=["microtune.events.>"],
        retention=api.RetentionPolicy.WORK_QUEUE, storage=api.StorageType.FILE,
        duplicate_window=120.0,
        subject_transform=partition_transform("microtune.events", "microtune.p", 16)))
    pending = []
    for n in range(events):
        user = f"u{n % users}"
        body = msgpack.packb({"v": 1, "id": f"e{n}", "u": user, "t": 1.7e9 + n, "k": "click",
                              "i": f"i{n % 100}", "x": [float((n * 7 + k) % 5) / 5
                                                         for k in range(DIM)]})
        pending.append(js.publish(f"microtune.events.{user}", body,
                                  headers={"Nats-Msg-Id": msg_id(user, f"e{n}")}))
        if len(pending) == 500:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)
    await nc.close()


def _count(store: str) -> int:
    try:
        recorder = open_recorder(store, upgrade=False)
    except Exception:  # not created yet
        return 0
    try:
        return recorder.count_events()
    except Exception:  # not created yet
        return 0
    finally:
        recorder.close()


def _run(setup: str, workers: int, args: argparse.Namespace, console: Console) -> dict:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        store = args.store or str(tmp / "mt.db")
        with EmbeddedNats(tmp / "nats", config=_config(tmp)) as server:
            asyncio.run(_backlog(server.url, args.events, args.users))
            env = {**os.environ, "MICROTUNE_METRICS_PORT": "0"}
            base = [sys.executable, "-m", "adapters.cli", "serve", "--nats-url", server.url,
                    "--store", store, "--dim", str(DIM), "--log-level", "error"]
            names = [None] if setup == "service" else [f"w{i}" for i in range(workers)]
            processes = [subprocess.Popen(
                base + ([] if name is None else ["--worker-id", name]), cwd=ROOT, env=env,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for name in names]
            low, high = 0.1 * args.events, 0.9 * args.events
            t_low = t_high = None
            deadline = time.monotonic() + args.timeout
            try:
                while time.monotonic() < deadline:
                    count = _count(store)
                    now = time.monotonic()
                    if t_low is None and count >= low:
                        t_low = now
                    if count >= high:
                        t_high = now
                        break
                    time.sleep(0.1)
            finally:
                for process in processes:
                    process.terminate()
                for process in processes:
                    process.wait(120)
        rate = None if t_low is None or t_high is None else (high - low) / (t_high - t_low)
        console.print(f"{setup}: {rate and round(rate):,} events/s")
        return {"setup": setup, "workers": workers, "events_per_s": rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=40_000)
    parser.add_argument("--users", type=int, default=4_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--store", default=None)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--out", default="bench-results/fleet.json")
    args = parser.parse_args()
    console = Console()
    runs = [_run("service", 1, args, console)]
    runs += [_run(f"{n} worker{'s' if n > 1 else ''}", n, args, console) for n in args.workers]
    one = next((r["events_per_s"] for r in runs if r["setup"] == "1 worker"), None)
    for r in runs:
        r["vs_one_worker"] = None if not one or not r["events_per_s"] else (
            r["events_per_s"] / one)
    figures: dict = {"events": args.events, "users": args.users,
                     "store": "postgresql" if args.store else "sqlite"}
    for r in runs:
        figures[f"{r['setup']}: events/s"] = r["events_per_s"] and round(r["events_per_s"])
        if r["vs_one_worker"]:
            figures[f"{r['setup']}: x one worker"] = round(r["vs_one_worker"], 2)
    figures["runs"] = {r["setup"]: r for r in runs}
    report("durable ingest: one service and a fleet of workers, same run", figures,
           args.out, console)


if __name__ == "__main__":
    main()
