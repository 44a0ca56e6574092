"""Defaults on any stream: a simulated population whose tastes drift on a known schedule,
run on time scales from a minute to a week between a user's events (adapters/drift.py).

For each scenario (stationary, a flip of the population's taste, a flip of half the users'
own), each time scale and each config (today's defaults and the schema-2 defaults, which faded
with time): the excess log loss over the truth before and after the change, the delay (a
drifting user's events) until the error on the drifting genre halves, against the same
learner's cold-start delay, and how far the weights wander when nothing drifts. Writes
bench-results/drift.json, drift.md and drift.png.

    microtune bench drift [--users 200] [--events 200] [--processes 2]
"""

from __future__ import annotations

import argparse
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from bench_report import machine
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from adapters import drift
from events.config import SEGMENT_DEFAULTS, SegmentConfig, TuningConfig

GAPS = {"1 min": 60.0, "1 h": 3600.0, "1 d": 86400.0, "1 wk": 7 * 86400.0}
CONFIGS = {"defaults": {}, "schema-2 defaults": SEGMENT_DEFAULTS[2]}


def _run(job: tuple) -> dict:
    scenario, gap_label, config_label, cold, users, events = job
    world = drift.World(users=users, events_per_user=events, gap=GAPS[gap_label])
    config = TuningConfig(version=1, dim=world.genres,
                          segments={"default": SegmentConfig(**CONFIGS[config_label])})
    o = drift.simulate(world, scenario, config, config_label, cold=cold)
    return {"scenario": scenario, "gap": gap_label, "config": config_label, "cold": cold,
            "excess_before": round(o.excess_before, 5), "excess_after": round(o.excess_after, 5),
            "delay": o.delay, "wander": round(o.wander, 4), "path": o.path.round(4).tolist()}


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    for r in rows:
        if r["scenario"] == "population" and not r["cold"] and r["gap"] in ("1 min", "1 d"):
            style = "-" if r["config"] == "defaults" else "--"
            left.plot(np.convolve(r["path"], np.ones(5) / 5, mode="same"), style,
                      label=f"{r['config']}, a user's events {r['gap']} apart")
    left.axvline(len(rows[0]["path"]) // 2, color="grey", linewidth=0.8)
    left.axhline(0, color="grey", linewidth=0.5)
    left.set_xlabel("a user's events (the population's taste flips halfway)")
    left.set_ylabel("error of predicted log-odds, drifting genre")
    left.set_title("following a flip of the population's taste\n"
                   "(defaults: both time scales give one line)")
    left.legend(fontsize=7)
    width = 0.38
    for i, label in enumerate(CONFIGS):
        values = [next(r["excess_after"] for r in rows if r["scenario"] == "stationary"
                       and r["gap"] == g and r["config"] == label) for g in GAPS]
        right.bar(np.arange(len(GAPS)) + (i - 0.5) * width, values, width, label=label)
    right.set_xticks(np.arange(len(GAPS)), [f"{g} apart" for g in GAPS])
    right.set_ylabel("excess log loss over the truth, second half")
    right.set_title("nothing drifts: the same events on four time scales")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--events", type=int, default=200, help="events per user")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench-results/drift.json"))
    args = parser.parse_args()
    console = Console()
    jobs = [(scenario, gap, config, cold, args.users, args.events)
            for scenario in drift.SCENARIOS for gap in GAPS for config in CONFIGS
            for cold in ((False, True) if scenario != "stationary" else (False,))]
    start = time.perf_counter()
    rows = []
    with Pool(args.processes) as pool, Progress(console=console, transient=True) as progress:
        task = progress.add_task("simulated streams", total=len(jobs))
        for row in pool.imap(_run, jobs):
            rows.append(row)
            progress.advance(task)
    table = Table(title="drifting tastes: excess log loss over the truth, and delays")
    headers = ("scenario", "a user's events", "config", "excess before", "excess after",
               "delay (events)", "cold-start delay", "wander")
    for h in headers:
        table.add_column(h, justify="left" if h in ("scenario", "config") else "right")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        if r["cold"]:
            continue
        cold = next((c["delay"] for c in rows if c["cold"] and c["scenario"] == r["scenario"]
                     and c["gap"] == r["gap"] and c["config"] == r["config"]), None)
        cells = (r["scenario"], f"{r['gap']} apart", r["config"], f"{r['excess_before']:.4f}",
                 f"{r['excess_after']:.4f}", "-" if r["delay"] is None else f"{r['delay']:g}",
                 "-" if cold is None else f"{cold:g}", f"{r['wander']:.3f}")
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    elapsed = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_suffix(".png")
    plot(rows, png)
    m = machine()
    args.out.with_suffix(".md").write_text(
        f"# Drifting tastes on four time scales\n\n{m['date']}, {args.users} users x "
        f"{args.events} events per scenario; {elapsed:.0f} s.\n\n" + "\n".join(lines)
        + f"\n\n![drift]({png.name})\n")
    import json
    args.out.write_text(json.dumps({"machine": m, "users": args.users,
                                    "events_per_user": args.events, "rows": rows}, indent=1))
    console.print(f"written to {args.out}, {png} ({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
