"""Benchmark of the event-sourced core (in process: actors + journal + SQLite).

Prints and saves (bench-results/core.json) the figures of DESIGN.md section 6 that the core
alone determines:

- ingest: events/s through user actors + group-commit journal + apply, with N users, first
  while the users are activated (cold), then with every user live (warm); at most
  `--in-flight` events unanswered at any time, as max-ack-pending would allow;
- memory per live user actor (RSS growth divided by live users);
- full replay events/s (`replay_all` over the whole log, and in 2 processes);
- activation latency of a passivated user (latest snapshot + a 2-event tail), p50/p99.

    python scripts/bench_core.py --users 100000 --events 600000
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import random
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import structlog
from bench_report import report
from rich.console import Console
from rich.progress import Progress

from actors import Microtune, encode_state, replay_all, replay_user
from actors.messages import Inspect
from actors.replay import replay_parallel
from actors.state import SNAPSHOT_SCHEMA
from actors.user import rebuild
from events import Candidate, Event, Query, TuningConfig
from store import Snapshot

console = Console()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Gate:
    """Flow control as a pull consumer does it: at most `limit` events unanswered; the feeder
    sleeps until half of them are answered, then refills in bulk (one wake-up per refill, not
    one per completed event)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.sent = 0
        self.done = 0
        self.failed = 0
        self.lock = threading.Lock()
        self.room = threading.Event()

    def callback(self, outcome) -> None:
        with self.lock:
            self.done += 1
            if not outcome.ok:
                self.failed += 1
            if self.sent - self.done <= self.limit // 2:
                self.room.set()

    def wait_for_room(self) -> int:
        """Block until there is room; returns how many may be sent now."""
        while True:
            with self.lock:
                free = self.limit - (self.sent - self.done)
                if free > self.limit // 2:
                    return free
                self.room.clear()
            self.room.wait(1.0)


def make_events(users: int, count: int, dim: int, seed: int = 1) -> list[Event]:
    rng = np.random.default_rng(seed)
    items = rng.normal(size=(1000, dim))
    kinds = ["click", "impression", "impression", "dwell", "scroll"]
    user_ids = rng.integers(0, users, size=count)
    item_ids = rng.integers(0, len(items), size=count)
    out = []
    t0 = 1.7e9
    for n in range(count):
        kind = kinds[n % len(kinds)]
        extra = {"dwell": 12.0} if kind == "dwell" else {"depth": 0.6} if kind == "scroll" else {}
        out.append(Event(id=f"e{n}", user=f"user{user_ids[n]}", t=t0 + n * 0.01, kind=kind,
                         item=f"item{item_ids[n]}", x=items[item_ids[n]], config=1, **extra))
    return out


def feed(mt: Microtune, events: list[Event], in_flight: int, label: str) -> float:
    gate = Gate(in_flight)
    cpu0 = time.process_time()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(label, total=len(events))
        start = time.perf_counter()
        n = 0
        while n < len(events):
            chunk = events[n : n + gate.wait_for_room()]
            with gate.lock:
                gate.sent += len(chunk)
            for event in chunk:
                mt.track(event, gate.callback)
            n += len(chunk)
            progress.update(task, completed=gate.done)
        while gate.done < len(events):
            time.sleep(0.001)
        elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    console.print(f"{label}: {cpu / len(events) * 1e6:.1f} us CPU per event "
                  f"({cpu / elapsed:.0%} of one core)")
    if gate.failed:
        raise SystemExit(f"{gate.failed} events failed in {label}")
    return len(events) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=600_000, help="warm-phase events")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--in-flight", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--store", help="SQLAlchemy URL or SQLite path (default: a temp file)")
    parser.add_argument("--out", default="bench-results/core.json")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    tmp = tempfile.mkdtemp(prefix="microtune-bench-")
    store = args.store or str(Path(tmp) / "bench.db")
    config = TuningConfig(version=1, dim=args.dim)
    results: dict[str, float | int | str] = {"users": args.users, "dim": args.dim,
                                             "store": "sqlite" if "://" not in store else store}

    # one event per user (activations), then the warm phase over the same users
    console.print(f"generating {args.users + args.events:,} events ...")
    first = [
        Event(id=f"first{u}", user=f"user{u}", t=1.6e9, kind="impression", item="item0",
              x=np.zeros(args.dim), config=1)
        for u in range(args.users)
    ]
    warm = make_events(args.users, args.events, args.dim)
    gc.collect()

    mt = Microtune.open(store, config, workers=args.workers, max_live=args.users + 1)
    rss0 = rss_bytes()
    results["cold_events_per_s"] = round(feed(mt, first, args.in_flight, "cold (activating)"))
    gc.collect()
    results["live_actors"] = len(mt.directory)
    results["bytes_per_live_actor"] = round((rss_bytes() - rss0) / len(mt.directory))
    results["warm_events_per_s"] = round(feed(mt, warm, args.in_flight, "warm"))
    # queries in process (no NATS): 100 candidates for a live user, one at a time
    rng = np.random.default_rng(5)
    candidates = tuple(Candidate(f"c{i}", x) for i, x in enumerate(rng.normal(size=(100,
                                                                                args.dim))))
    lat = []
    for u in rng.integers(args.users, size=3000):
        t0 = time.perf_counter()
        mt.rank(Query(f"user{u}", candidates))
        lat.append(time.perf_counter() - t0)
    results["query_in_process_p50_ms"] = round(float(np.percentile(lat, 50)) * 1e3, 3)
    results["query_in_process_p99_ms"] = round(float(np.percentile(lat, 99)) * 1e3, 3)
    stats = mt.journal.stats
    results["journal_commits"] = stats.commits
    results["events_per_commit"] = round(stats.events / max(1, stats.commits), 1)
    mt.close(snapshot=False)  # as after a crash: users come back from the log

    # activation: a snapshot two events behind the head, then the tail
    mt = Microtune.open(store, config, workers=args.workers)
    sample = random.Random(3).sample(range(args.users), min(2000, args.users))
    half = len(sample) // 2
    snaps = []
    for u in sample:
        user = f"user{u}"
        head = mt.recorder.last_seq(user)
        state = replay_user(mt.recorder, mt.configs, user, until_seq=max(0, head - 2))
        snaps.append(Snapshot(user, state.seq, SNAPSHOT_SCHEMA, encode_state(state)))
    mt.recorder.save_snapshots(snaps)
    lat_rebuild, lat_first_answer = [], []
    for u in sample[:half]:
        t0 = time.perf_counter()
        rebuild(mt.recorder, mt.configs, f"user{u}")
        lat_rebuild.append(time.perf_counter() - t0)
    for u in sample[half:]:
        done = threading.Event()
        t0 = time.perf_counter()
        mt.directory.tell(f"user{u}", Inspect(lambda _s, d=done: d.set()))
        done.wait(10)
        lat_first_answer.append(time.perf_counter() - t0)
    for name, lat in (("activation", lat_rebuild), ("activation_first_answer", lat_first_answer)):
        results[f"{name}_p50_ms"] = round(float(np.percentile(lat, 50)) * 1e3, 3)
        results[f"{name}_p99_ms"] = round(float(np.percentile(lat, 99)) * 1e3, 3)

    # full replay
    total = mt.recorder.count_events()
    start = time.perf_counter()
    users = sum(1 for _ in replay_all(mt.recorder, mt.configs))
    results["replay_events"] = total
    results["replay_events_per_s"] = round(total / (time.perf_counter() - start))
    assert users == args.users
    mt.close(snapshot=False)
    start = time.perf_counter()
    summary = replay_parallel(store, workers=2)
    results["replay_2_processes_events_per_s"] = round(
        summary.events / (time.perf_counter() - start))
    assert summary.events == total

    report("microtune core benchmark", results, args.out, console)

if __name__ == "__main__":
    main()
