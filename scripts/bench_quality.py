"""Learning quality on MovieLens-100k, microtune side by side with Vowpal Wabbit and River.

Progressive validation (predict, record, then learn) over every rating in time order; see
adapters/quality.py for the protocol. Prints a table, writes bench-results/quality.md (a
markdown report), quality.json and quality.png (rolling AUC over the stream per learner).
Needs the benchmark extras: pip install -e '.[bench]'.

    python scripts/bench_quality.py            # the whole comparison
    python scripts/bench_quality.py --limit 20000 --quick
    python scripts/bench_quality.py --quick --workers 2 3   # also the defaults as a fleet
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from adapters import quality as q
from events.config import SEGMENT_DEFAULTS

console = Console()
WINDOW = 5000  # ratings per point of the rolling AUC
FLEET_BAR = 0.002  # the most AUC a fleet's own segment models may cost against one process


def runs(stream: q.Stream, quick: bool, workers: tuple[int, ...] = ()) -> list:
    dim = len(stream.genres)
    vw_grid = [f"-q ug -l {lr} --power_t {pt} --l2 {l2}"
               for lr in ((0.5,) if quick else (0.25, 0.5, 1.0, 2.0))
               for pt in ((0.5,) if quick else (0.3, 0.5))
               for l2 in ((0.0,) if quick else (0.0, 1e-7))]
    river_lrs = (0.05,) if quick else (0.02, 0.05, 0.1)
    out = [("baseline", lambda: q.global_mean(stream)),
           ("baseline", lambda: q.user_mean(stream)),
           ("baseline", lambda: q.item_mean(stream))]
    out.append(("microtune", lambda: q.microtune(stream, label="defaults")))
    # as a fleet: each worker's segment models learn from its own users only
    out += [("microtune", lambda w=w: q.microtune(stream, workers=w)) for w in workers]
    # as a fleet does it: the workers' models merged (the 0.1 s delta exchange's analogue)
    out += [("microtune", lambda w=w: q.microtune(stream, workers=w, merge_every=1000))
            for w in workers]
    # what each part of the defaults buys (README "Learning quality")
    old = {"optimizer": "adam", "lr": 0.1, "lr_min": 0.01, "lr_max": 0.3, "l2": 1e-4}
    for label, seg in (
        ("defaults without the segment model", {"segment_model": False}),
        ("defaults, l2 1e-4", {"l2": 1e-4}),
        ("defaults, segment_lr 0.1", {"segment_lr": 0.1}),
        ("defaults, hygiene off", {"hygiene": False}),
        ("session-2 defaults (adam lr 0.1 [0.01, 0.3], l2 1e-4), no segment model",
         {**old, "segment_model": False}),
        ("session-2 defaults with the segment model", old),
        ("adagrad lr 0.3, bounds [0.01, 1]",
         {"optimizer": "adagrad", "lr": 0.3, "lr_min": 0.01, "lr_max": 1.0}),
        # what schema 2 changed (chosen on the first half: see its log loss column)
        ("defaults without item effects", {"item_effects": False}),
        ("defaults, item_lr 0.2", {"item_lr": 0.2}),
        ("defaults, item_lr 0.8", {"item_lr": 0.8}),
        # what schema 3 changed: no fading with time, a floor under the segment model's rate,
        # a new user's warm-up
        ("schema-2 defaults (half_life 14 d, segment_half_life 365 d)", SEGMENT_DEFAULTS[2]),
        ("defaults, half_life 14 d", {"half_life": 14 * 86400.0}),
        ("defaults, segment_lr_min 1e-4", {"segment_lr_min": 1e-4}),
        ("defaults without the warm-up", {"warmup": 0.0}),
        ("defaults, warmup 2", {"warmup": 2.0}),
        ("defaults, warmup_events 30", {"warmup_events": 30.0}),
    ):
        out.append(("microtune", lambda seg=seg, label=label: q.microtune(
            stream, q.microtune_config(dim, **seg), label)))
    # the same ratings 10 times as far apart (a 6-year stream): defaults that hold on any
    # stream learn the same from it
    slow = q.stretched(stream, 10.0)
    for label, seg in (("defaults, the stream stretched 10x in time", {}),
                       ("schema-2 defaults, the stream stretched 10x in time",
                        SEGMENT_DEFAULTS[2])):
        out.append(("microtune", lambda seg=seg, label=label: q.microtune(
            slow, q.microtune_config(dim, **seg), label)))
    out += [("vw", lambda a=a: q.vw(stream, a)) for a in vw_grid]
    # VW with an item namespace: its own item effects, the strongest peer here
    out += [("vw", lambda a=a: q.vw(stream, a, items=True))
            for a in (["-q ug -l 1 --power_t 0.3"] if quick else
                      [f"-q ug -l {lr} --power_t {pt}" for lr in (0.5, 1.0, 2.0)
                       for pt in (0.3, 0.5)])]
    out += [("river", lambda lr=lr: q.river_per_user(stream, lr)) for lr in river_lrs]
    out += [("river", lambda lr=lr: q.river_global(stream, lr)) for lr in river_lrs]
    return out


def rolling_auc(result: q.Result) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for end in range(WINDOW, len(result.labels) + 1, WINDOW // 2):
        xs.append(end)
        ys.append(q.auc(result.labels[end - WINDOW:end], result.predictions[end - WINDOW:end]))
    return np.array(xs), np.array(ys)


def plot(results: list[q.Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    for r in results:
        xs, ys = rolling_auc(r)
        ax.plot(xs, ys, label=f"{r.learner}: {r.config}", linewidth=1.4)
    ax.set_xlabel("ratings seen (time order)")
    ax.set_ylabel(f"AUC of the last {WINDOW} predictions")
    ax.set_title("MovieLens-100k, progressive validation (best configuration per learner)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "microtune")
    parser.add_argument("--limit", type=int, help="only the first N ratings")
    parser.add_argument("--quick", action="store_true", help="one configuration per peer")
    parser.add_argument("--out", type=Path, default=Path("bench-results/quality.md"))
    parser.add_argument("--workers", type=int, nargs="+", default=[], metavar="W",
                        help="also the defaults as a fleet of W workers, each with segment "
                             "models of its own (users split by partition as the fleet does)")
    args = parser.parse_args()
    stream = q.load_movielens(args.cache, args.limit)
    console.print(f"{len(stream.ratings):,} ratings, {len(stream.genres)} genres")
    results: list[q.Result] = []
    start = time.perf_counter()
    plan = runs(stream, args.quick, tuple(w for w in args.workers if w > 1))
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("learners", total=len(plan))
        for _name, run in plan:
            results.append(run())
            progress.advance(task)
    elapsed = time.perf_counter() - start

    table = Table(title="MovieLens-100k, progressive validation")
    headers = ("learner", "config", "log loss first half", "AUC", "log loss", "AUC last half",
               "log loss last half", f"AUC, a user's first {q.COLD}", "events/s")
    for h in headers:
        table.add_column(h, justify="left" if h in ("learner", "config") else "right")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in results:
        f = r.figures
        row = (r.learner, r.config, f"{f['log_loss_first_half']:.4f}", f"{f['auc']:.4f}",
               f"{f['log_loss']:.4f}",
               f"{f['auc_last_half']:.4f}", f"{f['log_loss_last_half']:.4f}",
               f"{f['auc_cold']:.4f}", f"{f['events_per_s']:,.0f}")
        table.add_row(*row)
        lines.append("| " + " | ".join(row) + " |")
    console.print(table)

    by_learner: dict[str, list[q.Result]] = {}
    for r in results:
        by_learner.setdefault(r.learner, []).append(r)
    default = next(r for r in results if r.learner == "microtune" and r.config == "defaults")
    bests = [default] + [q.best(rs) for name, rs in by_learner.items() if name != "microtune"]
    verdict = ["microtune defaults against the best Vowpal Wabbit configuration per figure:"]
    for key, higher in (("auc", True), ("auc_last_half", True), ("log_loss", False),
                        ("log_loss_last_half", False)):
        peers = by_learner["vowpal wabbit"]
        vw_best = (max if higher else min)(peers, key=lambda r, k=key: r.figures[k])
        ours, theirs = default.figures[key], vw_best.figures[key]
        ahead = ours > theirs if higher else ours < theirs
        verdict.append(f"- {key}: microtune {ours:.4f}, VW {theirs:.4f} ({vw_best.config}): "
                       f"{'ahead' if ahead else 'BEHIND'} by {abs(ours - theirs):.4f}")
    vw_auc = q.best(by_learner["vowpal wabbit"])
    diff, low, high = q.auc_difference(default, vw_auc, [r.user for r in stream.ratings])
    verdict.append(f"- AUC difference to that VW configuration, 95% interval (paired "
                   f"bootstrap over users): {diff:+.4f} [{low:+.4f}, {high:+.4f}]")
    for fleet in (r for r in results if r.learner == "microtune" and " workers" in r.config):
        diff, low, high = q.auc_difference(fleet, default, [r.user for r in stream.ratings])
        verdict.append(f"- {fleet.config} against one process: AUC {diff:+.4f} "
                       f"[{low:+.4f}, {high:+.4f}], "
                       f"{'within' if diff >= -FLEET_BAR else 'OVER'} the {FLEET_BAR} bar")
    verdict = "\n".join(verdict)
    console.print(verdict)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_suffix(".png")
    plot(bests, png)
    args.out.write_text(
        f"# Learning quality, MovieLens-100k\n\n{time.strftime('%Y-%m-%d')}, "
        f"{platform.machine()}, Python {platform.python_version()}; "
        f"{len(stream.ratings):,} ratings; whole run {elapsed:.0f} s.\n\n"
        + "\n".join(lines) + f"\n\n{verdict}\n\n![rolling AUC]({png.name})\n")
    args.out.with_suffix(".json").write_text(json.dumps(
        [{"learner": r.learner, "config": r.config, **r.figures} for r in results], indent=2))
    console.print(f"written to {args.out}, {png} ({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
