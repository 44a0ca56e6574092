"""Benchmark of the operators' tools on a large store (default 1M events, 10k users).

Builds a synthetic store (adapters.population.build_store), then measures:
- replay --all: events/s, one process (`replay_all`) and `replay_parallel` (2 processes);
- export (msgpack, jsonl, parquet) with no snapshots (every user replayed from seq 1) and
  after every user has a snapshot (as the service leaves a store): users (rows)/s;
- replay --verify: events/s; peak RSS of this process.

    python scripts/bench_ops.py --users 10000 --events 1000000
"""

from __future__ import annotations

import argparse
import logging
import resource
import tempfile
import time
from pathlib import Path

import structlog
from bench_report import report
from rich.console import Console

from actors.configs import ConfigRegistry
from actors.replay import current_states, replay_all, replay_parallel, verify_snapshots
from actors.state import SNAPSHOT_SCHEMA, encode_state
from adapters.export import export
from adapters.population import build_store
from events import TuningConfig
from store import Snapshot, open_recorder

console = Console()


def timed(label: str, fn):
    start = time.perf_counter()
    with console.status(label):
        result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--out", default="bench-results/ops.json")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    tmp = Path(tempfile.mkdtemp(prefix="microtune-bench-ops-"))
    path = tmp / "big.db"
    results: dict = {"users": args.users, "events": args.events, "dim": args.dim}
    _, elapsed = timed("building the store", lambda: build_store(
        path, users=args.users, events=args.events, dim=args.dim))
    results["build_s"] = round(elapsed, 1)
    recorder = open_recorder(path)
    configs = ConfigRegistry(recorder, TuningConfig(version=1, dim=args.dim))

    events, elapsed = timed("replay --all", lambda: sum(
        s.seq for s in replay_all(recorder, configs)))
    results["replay_all_events_per_s"] = round(events / elapsed)
    summary, elapsed = timed("replay, 2 processes", lambda: replay_parallel(str(path)))
    results["replay_parallel_2_events_per_s"] = round(summary.events / elapsed)

    for fmt in ("msgpack", "jsonl", "parquet"):
        count, elapsed = timed(f"export {fmt}, no snapshots", lambda fmt=fmt: export(
            recorder, configs, tmp / f"all.{fmt}", fmt))
        results[f"export_{fmt}_no_snapshots_rows_per_s"] = round(count / elapsed)

    def snapshot_everyone() -> None:
        batch = []
        for state in current_states(recorder, configs):
            batch.append(Snapshot(state.user, state.seq, SNAPSHOT_SCHEMA, encode_state(state)))
            if len(batch) >= 2000:
                recorder.save_snapshots(batch)
                batch = []
        recorder.save_snapshots(batch)

    timed("snapshots for every user", snapshot_everyone)
    for fmt in ("msgpack", "jsonl", "parquet"):
        count, elapsed = timed(f"export {fmt}, snapshots", lambda fmt=fmt: export(
            recorder, configs, tmp / f"snap.{fmt}", fmt))
        results[f"export_{fmt}_with_snapshots_rows_per_s"] = round(count / elapsed)
        results[f"export_{fmt}_bytes"] = (tmp / f"snap.{fmt}").stat().st_size
    mismatches, elapsed = timed("replay --verify", lambda: list(
        verify_snapshots(recorder, configs)))
    assert not mismatches
    results["verify_events_per_s"] = round(args.events / elapsed)
    results["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    recorder.close()
    report("operators' tools on a large store", results, args.out, console)


if __name__ == "__main__":
    main()
