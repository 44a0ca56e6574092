"""Calibration by replay on MovieLens-100k: tune on the first half, report on the second.

The protocol cannot overfit the half it reports on:
1. the first half of the stream (in time order) goes through microtune's real path into a
   store (one `feedback` event per rating, y = 1 for 4 or 5 stars, genres as features);
2. `calibrate` replays that store's users under every point of the grid and picks the point
   with the lowest progressive-validation log loss on those logged outcomes;
3. the winner and the defaults then run over the whole stream with progressive validation
   (adapters/quality.py), and the figures of the second half, which calibration never saw,
   are compared.

    microtune bench calibrate [--processes 2] [--out bench-results/calibrate.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_report import report
from rich.console import Console

from actors import Microtune
from actors.calibration import calibrate, points
from adapters import quality as q
from events.config import CENTURY, TuningConfig
from events.types import Event

GRID = {"half_life": [86400.0, 14 * 86400.0, 60 * 86400.0, 365 * 86400.0, 3650 * 86400.0,
                      CENTURY],  # the default: no fading with time
        "lr": [0.02, 0.05, 0.1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "microtune")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench-results/calibrate.json"))
    args = parser.parse_args()
    console = Console()
    stream = q.load_movielens(args.cache)
    half = len(stream.ratings) // 2
    dim = len(stream.genres)
    defaults = TuningConfig(version=1, dim=dim)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        store = str(Path(tmp) / "first-half.db")
        with Microtune.open(store, defaults) as mt:
            events = [Event(id=f"r{n}", user=r.user, t=r.t, kind="feedback", item=r.item,
                            x=r.x, target=r.y) for n, r in enumerate(stream.ratings[:half])]
            outcomes = mt.track_many(events, timeout=600)
            assert {o.status for o in outcomes} == {"applied"}
            users = sorted({r.user for r in stream.ratings[:half]})
        candidates = points(defaults, "default", GRID)
        with console.status(f"calibrating on {half:,} ratings of {len(users)} users, "
                            f"{len(candidates)} grid points ..."):
            scores = calibrate(store, users, [c for _, c in candidates], "default",
                               processes=args.processes)
    calibrated = time.perf_counter() - start
    ranked = sorted(zip(candidates, scores, strict=True), key=lambda cs: cs[1].log_loss)
    (params, winner), score = ranked[0]
    results = {"first_half_ratings": half, "grid_points": len(candidates),
               "calibration_seconds": round(calibrated, 1), "winner": params,
               "winner_first_half_log_loss": round(score.log_loss, 5),
               "winner_first_half_auc": round(score.auc, 4)}
    default_score = next(s for (p, _), s in zip(candidates, scores, strict=True)
                         if p == {"half_life": defaults.segments["default"].half_life,
                                  "lr": defaults.segments["default"].lr})
    results["defaults_first_half_log_loss"] = round(default_score.log_loss, 5)
    results["grid"] = {f"{p['half_life'] / 86400:g}d lr {p['lr']:g}": round(s.log_loss, 5)
                       for (p, _), s in ranked}
    for label, config in (("defaults", defaults), ("calibrated", winner)):
        f = q.microtune(stream, config, label).figures
        for key in ("auc_last_half", "log_loss_last_half", "auc", "log_loss"):
            results[f"{label}_{key}"] = round(f[key], 4)
    results["second_half_auc_gain"] = round(
        results["calibrated_auc_last_half"] - results["defaults_auc_last_half"], 4)
    results["second_half_log_loss_gain"] = round(
        results["defaults_log_loss_last_half"] - results["calibrated_log_loss_last_half"], 4)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report("calibration by replay, MovieLens-100k: tuned on the first half, reported on the "
           "second", results, args.out, console)
    assert np.isfinite(results["calibrated_auc_last_half"])


if __name__ == "__main__":
    main()
