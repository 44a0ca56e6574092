"""Drift and instability alerts on simulated segments whose behaviour changes at a known event
(adapters/alert_population.py, through microtune's real path: apply, the segment model).

For each seed and scenario (stationary; every taste flips; one genre's taste flips; a config
with 40x the rates; targets that alternate), the segment's traces go through one watch per
detector (Page-Hinkley, ADWIN; actors/alerts/watch.py). Figures per detector: the false-alarm
rate (the fraction of stationary runs with any alert, and of the other runs with one before
the change), the detection rate of the expected kind after the change, and the delay (the
segment's events from the change to the event whose trace raised the alert: median, p90, max).
Longer stationary runs give the false alarms per million learning steps. Writes
bench-results/alerts.json.

    microtune bench alerts [--seeds 50] [--events 6000] [--long-runs 8] [--processes 2]

The detectors' settings were chosen on seeds 100-149 and 200-215; this runs seeds from 0.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import structlog
from bench_report import report
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from scipy.stats import chi2

from actors.alerts import DRIFT, UNSTABLE, AlertSettings, SegmentWatch
from adapters.alert_population import Population, stream

# the detectors compared: the default, ADWIN, and Page-Hinkley with River's default forgetting
DETECTORS = {"page_hinkley": AlertSettings(), "adwin": AlertSettings(detector="adwin"),
             "page_hinkley_alpha_0.9999": AlertSettings(ph_alpha=0.9999)}
EXPECTED = {"flip": DRIFT, "flip_genre": DRIFT, "alternating": DRIFT, "unstable": UNSTABLE}
SCENARIOS = ("stationary", *EXPECTED)


def _run(job: tuple[int, str, int, int]) -> dict:
    """One stream, watched by one watch per detector: its alerts (kind, event index)."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    seed, scenario, events, change = job
    population = Population(seed=seed, events=events, change=change)
    watches = {d: SegmentWatch("default", settings) for d, settings in DETECTORS.items()}
    alerts: dict[str, list] = {d: [] for d in DETECTORS}
    lag = None  # events from the change until a changed event is learned (hygiene's reorder)
    for n, steps in enumerate(stream(population, scenario)):
        if lag is None and any(s.score is not None and int(s.event_id) >= change
                               for s in steps):
            lag = n - change + 1
        for detector, watch in watches.items():
            alerts[detector] += [[a.kind, n, a.suppressed] for a in watch.observe(steps)]
    return {"seed": seed, "scenario": scenario, "events": events, "change": change,
            "steps": watches["page_hinkley"].steps, "alerts": alerts, "lag": lag,
            "detections": {d: {m.kind: m.alerts + m.suppressed for m in w.monitors}
                           for d, w in watches.items()}}


def _quantiles(values: list[int]) -> dict:
    if not values:
        return {"median": None, "p90": None, "max": None}
    return {"median": float(np.median(values)), "p90": float(np.percentile(values, 90)),
            "max": int(max(values))}


def figures(rows: list[dict], long_rows: list[dict], detector: str) -> dict:
    out: dict = {}
    stationary = [r for r in rows if r["scenario"] == "stationary"]
    out["false_alarm_rate"] = sum(bool(r["alerts"][detector]) for r in stationary) / max(
        len(stationary), 1)
    changed = [r for r in rows if r["scenario"] != "stationary"]
    out["alarm_before_change_rate"] = sum(
        any(n < r["change"] for _k, n, _s in r["alerts"][detector]) for r in changed) / max(
        len(changed), 1)
    # every stationary step (short and long runs): the false alarms per million steps, with
    # a one-sided 95% upper bound (Poisson; 3 per `steps` when there were none)
    quiet = stationary + long_rows
    steps = sum(r["steps"] for r in quiet)
    count = sum(len(r["alerts"][detector]) for r in quiet)
    out["stationary_steps"] = steps
    out["false_alarms"] = count
    out["false_alarms_per_million_steps"] = round(count / max(steps, 1) * 1e6, 2)
    out["false_alarms_per_million_steps_95_upper"] = round(
        chi2.ppf(0.95, 2 * (count + 1)) / 2 / max(steps, 1) * 1e6, 2)
    if long_rows:
        steps = sum(r["steps"] for r in long_rows)
        count = sum(len(r["alerts"][detector]) for r in long_rows)
        out["long_stationary"] = {
            "runs": len(long_rows), "steps": steps, "runs_with_alert": sum(
                bool(r["alerts"][detector]) for r in long_rows),
            "alerts_per_million_steps": round(count / steps * 1e6, 2)}
    lags = [r["lag"] for r in changed if r["lag"] is not None]
    out["learning_lag_events"] = _quantiles(lags)  # part of every delay: no detector sees a
    # change before a changed event is learned
    for scenario, kind in EXPECTED.items():
        runs = [r for r in rows if r["scenario"] == scenario]
        delays = []
        for r in runs:
            after = [n - r["change"] + 1 for k, n, _s in r["alerts"][detector]
                     if k == kind and n >= r["change"]]
            if after:
                delays.append(after[0])
        other = DRIFT if kind == UNSTABLE else UNSTABLE
        out[scenario] = {
            "kind": kind, "runs": len(runs), "detection_rate": len(delays) / max(len(runs), 1),
            "delay_events": _quantiles(delays),
            # one shift, one alert: alerts of the expected kind per detected run, and the
            # detections the cool-down swallowed
            "alerts_per_detected_run": round(sum(
                sum(k == kind for k, _n, _s in r["alerts"][detector]) for r in runs)
                / max(len(delays), 1), 2),
            "detections_per_run": round(sum(r["detections"][detector][kind] for r in runs)
                                        / max(len(runs), 1), 2),
            f"{other}_alert_rate": sum(any(k == other for k, _n, _s in r["alerts"][detector])
                                       for r in runs) / max(len(runs), 1),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--events", type=int, default=6000, help="the segment's events per run")
    parser.add_argument("--long-runs", type=int, default=8,
                        help="stationary runs of 5x the events (false alarms per step)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench-results/alerts.json"))
    args = parser.parse_args()
    console = Console()
    change = args.events // 2
    jobs = [(seed, scenario, args.events, change) for seed in range(args.seeds)
            for scenario in SCENARIOS]
    long_jobs = [(1000 + seed, "stationary", 5 * args.events, 5 * args.events)
                 for seed in range(args.long_runs)]
    start = time.perf_counter()
    rows, long_rows = [], []
    with Pool(args.processes) as pool, Progress(console=console, transient=True) as progress:
        task = progress.add_task("simulated segments", total=len(jobs) + len(long_jobs))
        for row in pool.imap_unordered(_run, long_jobs + jobs):
            (long_rows if row["events"] > args.events else rows).append(row)
            progress.advance(task)
    elapsed = time.perf_counter() - start
    by_detector = {d: figures(rows, long_rows, d) for d in DETECTORS}
    table = Table(title=f"alerts: {args.seeds} seeds x {args.events} events, change at {change}")
    for h in ("detector", "scenario", "kind", "detected", "delay med/p90/max", "alerts/run",
              "other kind"):
        table.add_column(h, justify="left" if h in ("detector", "scenario", "kind") else "right")
    for d, f in by_detector.items():
        long = f.get("long_stationary")
        table.add_row(d, "stationary", "any", f"false alarms {f['false_alarm_rate']:.0%}",
                      "" if long is None else f"long: {long['runs_with_alert']}/{long['runs']}")
        for scenario in EXPECTED:
            s = f[scenario]
            q = s["delay_events"]
            other = next(v for k, v in s.items() if k.endswith("_alert_rate"))
            table.add_row(d, scenario, s["kind"], f"{s['detection_rate']:.0%}",
                          "/".join("-" if q[k] is None else f"{q[k]:g}"
                                   for k in ("median", "p90", "max")),
                          f"{s['alerts_per_detected_run']:g}", f"{other:.0%}")
    console.print(table)
    results = {
        "seeds": args.seeds, "events": args.events, "change": change,
        "long_runs": args.long_runs, "long_events": 5 * args.events,
        "seconds": round(elapsed, 1),
        "settings": {d: asdict(settings) for d, settings in DETECTORS.items()},
        "detectors": by_detector,
        # every run's alerts, [kind, event index, detections swallowed before it]
        "runs": {scenario: sorted(({k: r[k] for k in ("seed", "events", "steps", "alerts")}
                                   for r in rows + long_rows if r["scenario"] == scenario),
                                  key=lambda r: (r["events"], r["seed"]))
                 for scenario in SCENARIOS},
    }
    summary = {f"{d} false alarms": (
        f"{f['false_alarm_rate']:.0%} of runs; {f['false_alarms']} in "
        f"{f['stationary_steps']:,} steps (95% bound "
        f"{f['false_alarms_per_million_steps_95_upper']:g} per million)")
        for d, f in by_detector.items()}
    for d, f in by_detector.items():
        q = f["flip"]["delay_events"]
        summary[f"{d} taste flip detected"] = (
            f"{f['flip']['detection_rate']:.0%}, delay median {q['median']} p90 {q['p90']}")
    report("alerts on simulated segments", {**summary, **results}, args.out, console)
    console.print(f"{elapsed:.0f} s")


if __name__ == "__main__":
    main()
