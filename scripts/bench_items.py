"""Item effects under a catalog of 1M items: memory, time, and what the LRU bound forgets.

A stream of `feedback` events goes through microtune's real path, as a user actor runs it
(adapters/quality.py `microtune()`): the segment model stamps each event (`stamp`, item bias
included), `apply` learns the user's weights with a trace, `SegmentModels.learn` takes the
model's side of those `Step`s, item effects included. Items are drawn from a catalog of 1M
with a Zipf popularity (p(k) ~ 1 / k), each with 16 random features, by 100k users.

Two settings, each in a fresh (forked) process: the default `max_items` (200k: the LRU
evicts) and `max_items` = the catalog (everything kept). In the first, a second segment model
with `item_effects` off learns from the very same `Step`s, so the learn time of item effects
is isolated (it does not depend on `max_items`). Per setting: learn, stamp and apply time per
event, the hit rate (events whose item was already in the table; a forgotten item learns
again from zero), evictions, items held, the ranking lookup (`item_biases` of 100
candidates), `checkpoint` / `load` / `dump_items`, and memory: the stream's RSS growth, and
the table's own bytes per item (tracemalloc and RSS of its `load` in a fresh process, and a
`sys.getsizeof` sum) and what it adds to a full garbage collection. Then the same table
figures for a full table of 1M items (a checkpoint of 1M entries, restored with `load`, the
path of a restart). The collector is set as the service's ingest process sets it
(`actors.runtime.tune_gc`).

    microtune bench items [--events 2000000] [--out bench-results/items.json]
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import traceback
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import msgpack
import numpy as np
import structlog
from bench_report import report
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from actors.item_effects import ItemEffects
from actors.learning import apply
from actors.runtime import tune_gc
from actors.segment_model import ITEMS_SUFFIX, SegmentModels
from actors.state import UserState
from events.config import SegmentConfig, TuningConfig
from events.types import Event

SEGMENT = "default"
DIM = 16
CANDIDATES = 100  # a query's candidates, for the ranking lookup
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    """Resident memory of this process, bytes (psutil if installed, else /proc)."""
    try:
        import psutil
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE
    return psutil.Process().memory_info().rss


def config(max_items: int, item_effects: bool = True) -> TuningConfig:
    return TuningConfig(version=1, dim=DIM, segments={SEGMENT: SegmentConfig(
        item_effects=item_effects, max_items=max_items)})


class GcClock:
    """Wall time spent in the cyclic collector (a `gc.callbacks` hook)."""

    def __init__(self) -> None:
        self.seconds, self.full, self.longest_full, self._at = 0.0, 0, 0.0, 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._at = time.perf_counter()
            return
        took = time.perf_counter() - self._at
        self.seconds += took
        if info["generation"] == 2:
            self.full += 1
            self.longest_full = max(self.longest_full, took)


class World:
    """The catalog and the stream (built once, inherited by the forked processes)."""

    def __init__(self, catalog: int, users: int, events: int, exponent: float, seed: int):
        rng = np.random.default_rng(seed)
        self.catalog, self.users = catalog, users
        self.x = rng.normal(0.0, 1.0 / math.sqrt(DIM), (catalog, DIM))  # |x| about 1
        popularity = 1.0 / np.arange(1, catalog + 1) ** exponent
        cdf = np.cumsum(popularity / popularity.sum())
        self.items = np.minimum(np.searchsorted(cdf, rng.random(events)), catalog - 1)
        self.user = rng.integers(users, size=events)
        # outcomes: an appeal per item beyond its features, a taste shared by everyone
        appeal = rng.normal(0.0, 1.0, catalog)
        taste = rng.normal(0.0, 1.0, DIM)
        logit = appeal[self.items] + (self.x[self.items] @ taste) - 0.5
        self.y = (rng.random(events) < 1.0 / (1.0 + np.exp(-logit))).astype(float)
        self.rng = rng


def in_child(fn: Callable[..., dict], *args) -> dict:
    """`fn(*args)` in a forked process: its memory figures start from a clean heap."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.SimpleQueue()

    def run() -> None:
        try:
            queue.put(("ok", fn(*args)))
        except BaseException:
            queue.put(("error", traceback.format_exc()))

    process = ctx.Process(target=run)
    process.start()
    status, value = queue.get()
    process.join()
    if status != "ok":
        raise RuntimeError(f"child process failed:\n{value}")
    return value


def timed(fn: Callable[[], object], repeat: int = 1) -> tuple[float, object]:
    """Median seconds of `repeat` calls, and the last result."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def getsizeof_per_item(table: ItemEffects) -> float:
    """sys.getsizeof estimate of one item: its key, its share of the index and the slot list,
    its slot number (an int object above 256) and its four array cells."""
    keys = [k for k in table.items if k is not None]
    sample = keys[:: max(1, len(keys) // 20_000)]
    own = sum(sys.getsizeof(k) for k in sample) / len(sample) + sys.getsizeof(1000)
    arrays = table.bias.nbytes + table.sums.nbytes + table.times.nbytes + table.touched.nbytes
    shared = sys.getsizeof(table.index) + sys.getsizeof(table.items) + arrays
    return own + shared / len(keys)


def table_ops(models: SegmentModels, catalog: int, rng: np.random.Generator) -> dict:
    """The costs that depend on the size of the table: ranking lookup, checkpoint, load,
    dump for the feed."""
    ids = [[f"i{k}" for k in rng.integers(catalog, size=CANDIDATES)] for _ in range(2000)]
    times = []
    for candidates in ids:
        start = time.perf_counter()
        models.item_biases(SEGMENT, candidates)
        times.append(time.perf_counter() - start)
    table = models._items[SEGMENT]
    known = sum(k in table for c in ids for k in c) / (len(ids) * CANDIDATES)
    reps = 3 if len(table) < 300_000 else 1  # seconds each at 1M items
    checkpoint_s, saved = timed(models.checkpoint, reps)
    load_s, _ = timed(lambda: SegmentModels().load(saved), reps)
    dump_s, _ = timed(models.dump_items, reps)
    return {
        "item_biases_100_us": round(statistics.median(times) * 1e6, 1),
        "candidates_known": round(known, 3),
        "checkpoint_s": round(checkpoint_s, 3),
        "checkpoint_bytes": sum(len(v) for v in saved.values()),
        "load_s": round(load_s, 3),
        "dump_items_s": round(dump_s, 3),
        "getsizeof_bytes_per_item": round(getsizeof_per_item(table)),
    }


def stream(world: World, max_items: int, baseline: bool, checkpoint_path: str,
           console: Console) -> dict:
    """The stream through the real path, timed part by part (in a forked process)."""
    cfg = config(max_items)
    base_cfg = config(max_items, item_effects=False)
    models, base = SegmentModels(), SegmentModels()
    states: dict[str, UserState] = {}
    steps: list = []
    t_stamp = t_apply = t_learn = t_stamp_base = t_learn_base = 0.0
    learned = hits = inserts = 0
    clock = time.perf_counter
    n_events = len(world.items)
    items, users, ys, xs = world.items.tolist(), world.user.tolist(), world.y.tolist(), world.x
    gc.collect()
    collector = GcClock()
    gc.callbacks.append(collector)
    rss_start = rss()
    cpu = time.process_time()
    wall = clock()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"max_items {max_items:,}", total=n_events)
        for n in range(n_events):
            k, user = items[n], f"u{users[n]}"
            item, x = f"i{k}", xs[k]
            state = states.get(user) or UserState(user)
            a = clock()
            stamped = models.stamp(SEGMENT, x, cfg, item)
            b = clock()
            event = Event(id=str(n), user=user, t=n * 0.01, kind="feedback", item=item, x=x,
                          target=ys[n], config=1, base=stamped)
            states[user] = apply(state, event, cfg, steps)
            c = clock()
            table = models._items.get(SEGMENT) or ItemEffects()
            batch = set()
            for step in steps:
                if step.score is not None and step.item is not None:
                    learned += 1
                    if step.item in table:
                        hits += 1
                    elif step.item not in batch:
                        inserts += 1
                    batch.add(step.item)
            d = clock()
            models.learn(SEGMENT, steps, cfg)
            e = clock()
            t_stamp += b - a
            t_apply += c - b
            t_learn += e - d
            if baseline:  # the same steps, learned without item effects
                f = clock()
                base.stamp(SEGMENT, x, base_cfg, item)
                g = clock()
                base.learn(SEGMENT, steps, base_cfg)
                t_stamp_base += g - f
                t_learn_base += clock() - g
            steps.clear()
            if n % 20_000 == 0:
                progress.update(task, completed=n)
    wall = clock() - wall
    cpu = time.process_time() - cpu
    gc.callbacks.remove(collector)
    gc.collect()
    rss_end = rss()
    table = models._items[SEGMENT]
    us = 1e6 / n_events
    out = {
        "max_items": max_items,
        "events": n_events,
        "learned_steps": learned,
        "distinct_items_in_stream": len(set(items)),
        "items_held": len(table),
        "evictions": inserts - len(table),
        "hit_rate": round(hits / learned, 4),
        "stream_seconds": round(wall, 1),
        # below 1 when other processes took the CPU: every time above is wall time
        "stream_cpu_share": round(cpu / wall, 2),
        "stream_gc_seconds": round(collector.seconds, 1),
        "stream_full_collections": collector.full,
        "longest_full_collection_ms": round(collector.longest_full * 1e3, 1),
        "learn_us_per_event": round(t_learn * us, 2),
        "learn_us_per_step": round(t_learn * 1e6 / learned, 2),
        "stamp_us_per_event": round(t_stamp * us, 2),
        "apply_us_per_event": round(t_apply * us, 2),
        "stream_rss_growth_mb": round((rss_end - rss_start) / 2**20, 1),
    }
    if baseline:
        out["learn_us_per_event_no_item_effects"] = round(t_learn_base * us, 2)
        out["learn_us_per_step_no_item_effects"] = round(t_learn_base * 1e6 / learned, 2)
        out["stamp_us_per_event_no_item_effects"] = round(t_stamp_base * us, 2)
    out.update(table_ops(models, world.catalog, world.rng))
    with open(checkpoint_path, "wb") as f:
        f.write(msgpack.packb(models.checkpoint(), use_bin_type=True))
    return out


def full_table(catalog: int, checkpoint_path: str, seed: int) -> dict:
    """A checkpoint of a full table: every catalog item, with learned-looking values."""
    rng = np.random.default_rng(seed)
    bias, g = rng.normal(0.0, 0.5, catalog).tolist(), rng.exponential(3.0, catalog).tolist()
    t = np.sort(rng.uniform(0.0, 3e4, catalog)).tolist()
    table = ItemEffects()  # least recently learned first, as a checkpoint keeps them
    for k in rng.permutation(catalog).tolist():
        slot, _ = table.fade(f"i{k}", t[k], math.inf, catalog)
        table.bias[slot], table.sums[slot] = bias[k], g[k]
    saved = {f"{SEGMENT}{ITEMS_SUFFIX}": ItemEffects.encode(table.snapshot())}
    with open(checkpoint_path, "wb") as f:
        f.write(msgpack.packb(saved, use_bin_type=True))
    return {"items_held": catalog}


def table_memory(checkpoint_path: str, trace: bool) -> dict:
    """The table's memory, restored with `load` in a fresh process: RSS growth (what the
    process grows by, fragmentation included) and what it adds to a full collection, or with
    `trace` the bytes Python holds."""
    with open(checkpoint_path, "rb") as f:
        saved = msgpack.unpackb(f.read(), raw=False)
    gc.collect()
    before = rss()
    collect_before = min(timed(gc.collect)[0] for _ in range(5))
    if trace:
        tracemalloc.start()
    models = SegmentModels()
    models.load(saved)
    del saved
    gc.collect()
    held = len(models._items[SEGMENT])
    if trace:
        traced = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        return {"tracemalloc_bytes_per_item": round(traced / held),
                "tracemalloc_mb": round(traced / 2**20, 1)}
    grown = rss() - before
    # a full collection scans every entry's list (the fastest of 5: noise only adds)
    collect_after = min(timed(gc.collect)[0] for _ in range(5))
    return {"rss_bytes_per_item": round(grown / held), "rss_mb": round(grown / 2**20, 1),
            "full_collection_ms_added": round((collect_after - collect_before) * 1e3, 1)}


def table_ops_of(checkpoint_path: str, catalog: int, seed: int) -> dict:
    with open(checkpoint_path, "rb") as f:
        saved = msgpack.unpackb(f.read(), raw=False)
    models = SegmentModels()
    models.load(saved)
    return table_ops(models, catalog, np.random.default_rng(seed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--catalog", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--exponent", type=float, default=1.0, help="Zipf exponent")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench-results/items.json"))
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    console = Console()
    tune_gc()  # the collector's settings of the service's ingest process (for every child)
    start = time.perf_counter()
    with console.status(f"drawing {args.events:,} events over {args.catalog:,} items ..."):
        world = World(args.catalog, args.users, args.events, args.exponent, args.seed)
    default_max = SegmentConfig().max_items
    settings = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, max_items, baseline in (("lru", default_max, True),
                                           ("all", args.catalog, False)):
            path = str(Path(tmp) / f"{label}.ckpt")
            figures = in_child(stream, world, max_items, baseline, path, console)
            with console.status(f"max_items {max_items:,}: the table's memory ..."):
                for trace in (False, True):
                    figures.update(in_child(table_memory, path, trace))
            settings[label] = figures
            console.print(f"max_items {max_items:,}: {figures['stream_seconds']} s, hit rate "
                          f"{figures['hit_rate']}, {figures['items_held']:,} items held")
        with console.status(f"a full table of {args.catalog:,} items ..."):
            path = str(Path(tmp) / "full.ckpt")
            full = in_child(full_table, args.catalog, path, args.seed)
            for trace in (False, True):
                full.update(in_child(table_memory, path, trace))
            full.update(in_child(table_ops_of, path, args.catalog, args.seed))
            settings["full"] = full
    lru, everything = settings["lru"], settings["all"]
    table = Table(title=f"item effects: {args.events:,} events, catalog {args.catalog:,} "
                        f"(Zipf {args.exponent:g}), {args.users:,} users")
    table.add_column("figure")
    columns = {"lru": f"max_items {default_max:,}", "all": f"max_items {args.catalog:,}",
               "full": f"full table ({args.catalog:,})"}
    for label in columns.values():
        table.add_column(label, justify="right")
    keys = list(dict.fromkeys(k for s in settings.values() for k in s))
    for key in keys:
        table.add_row(key, *(f"{v:,}" if isinstance(v := settings[c].get(key, ""), int)
                             else str(v) for c in columns))
    console.print(table)
    results = {
        "events": args.events, "catalog": args.catalog, "users": args.users,
        "zipf_exponent": args.exponent, "dim": DIM,
        "item_learn_us_per_event": round(lru["learn_us_per_event"]
                                         - lru["learn_us_per_event_no_item_effects"], 2),
        "hit_rate_lru": lru["hit_rate"], "hit_rate_all": everything["hit_rate"],
        "bytes_per_item_tracemalloc": settings["full"]["tracemalloc_bytes_per_item"],
        "bytes_per_item_rss": settings["full"]["rss_bytes_per_item"],
        "full_table_rss_mb": settings["full"]["rss_mb"],
        "full_table_checkpoint_mb": round(settings["full"]["checkpoint_bytes"] / 2**20, 1),
        "full_table_checkpoint_s": settings["full"]["checkpoint_s"],
        "full_table_load_s": settings["full"]["load_s"],
        "full_table_gc_ms_added": settings["full"]["full_collection_ms_added"],
        "total_seconds": round(time.perf_counter() - start, 1),
        "settings": settings,
    }
    report("item effects under a catalog of 1M items", results, args.out, console)


if __name__ == "__main__":
    main()
