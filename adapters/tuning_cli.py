"""`microtune evaluate` and `microtune calibrate`: tuning from the evidence in the log.

Both only read the store (safe while the service writes) and replay users with the same
`apply` the service runs; `calibrate --apply` records the winner as a new config version,
which takes the store's lease (refused while a service runs: stop it, apply, start it with
the same settings in its [tuning] table).
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

from rich.table import Table

from actors.configs import ConfigRegistry
from actors.experiments.definition import DEFAULT_WINDOW
from adapters.ops import OperatorError, _parser, _time, console, open_store, out
from events.config import TuningConfig

# ---------------------------------------------------------------- off-policy evaluation


def evaluate(argv: list[str]) -> int:
    """`microtune evaluate --config B.toml`: what config B would have earned on the explored
    exposures in the log (IPS, SNIPS, DR with intervals), by replaying each user under B."""
    from actors.experiments import evaluation, offpolicy

    parser = _parser("evaluate", "Off-policy evaluation: what a tuning config would have "
                                 "earned on the log's explored exposures (README \"Tuning "
                                 "from evidence\").")
    parser.add_argument("--config", required=True,
                        help="a TOML file with a [tuning] table, or a config version number")
    parser.add_argument("--segment", help="only this segment's users")
    parser.add_argument("--window", type=float, default=DEFAULT_WINDOW,
                        help="attribution window of outcomes without a rid (seconds)")
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    recorder, configs = open_store(args.store)
    try:
        target = _target(args.config, configs)
        with console.status("replaying the users with explored exposures ..."):
            slates = evaluation.logged_slates(recorder, target, segment=args.segment,
                                              window=args.window)
    finally:
        recorder.close()
    if not slates:
        raise OperatorError("no explored exposures in the log: set `explore` on a segment "
                            "(README \"Tuning from evidence\") and serve some traffic first")
    estimates = offpolicy.estimate(slates, alpha=args.alpha)
    if args.json:
        print(json.dumps({k: {"estimate": v.value.estimate, "low": v.value.low,
                              "high": v.value.high, "slates": v.slates, "users": v.units}
                          for k, v in estimates.items()}))
        return 0
    table = Table(title=f"config {args.config}: expected clicks per slate, "
                        f"{1 - args.alpha:.0%} intervals")
    for column in ("estimator", "value", "interval", "vs the log"):
        table.add_column(column, justify="left" if column == "estimator" else "right")
    logged = estimates["logged"].value.estimate
    names = {"logged": "the log (what was served)", "ips": "IPS", "snips": "self-normalised IPS",
             "dr": "doubly robust"}
    for key in ("logged", "ips", "snips", "dr"):
        v = estimates[key].value
        table.add_row(names[key], f"{v.estimate:.4f}", f"[{v.low:.4f}, {v.high:.4f}]",
                      "" if key == "logged" else f"{(v.estimate - logged) / logged:+.1%}"
                      if logged else "")
    one = estimates["ips"]
    table.caption = f"{one.slates:,} explored slates of {one.units:,} users"
    out.print(table)
    return 0


def _target(spec: str, configs: ConfigRegistry) -> TuningConfig:
    if spec.isdigit():
        return configs.get(int(spec))
    path = Path(spec)
    if not path.exists():
        raise OperatorError(f"--config {spec}: neither a version number nor a file")
    with path.open("rb") as f:
        values = tomllib.load(f)
    body = values.get("tuning", values)
    return TuningConfig.from_map({"version": 1, "dim": configs.current.dim, **body})


# ---------------------------------------------------------------- calibration by replay


def calibrate(argv: list[str]) -> int:
    """`microtune calibrate --segment S --grid grid.toml`: each grid point scored by
    progressive validation on the segment's logged outcomes (actors/calibration.py)."""
    from actors import calibration

    parser = _parser("calibrate", "Replay a segment's users under each point of a grid and "
                                  "score each by progressive validation on their logged "
                                  "outcomes (README \"Tuning from evidence\").")
    parser.add_argument("--segment", default="default")
    parser.add_argument("--grid", type=Path, required=True,
                        help="a TOML file with a [grid] table: setting = [values, ...] "
                             f"(settings: {', '.join(calibration.TUNABLE)})")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                        help="processes replaying ranges of users")
    parser.add_argument("--plot", type=Path, default=Path("calibrate.png"),
                        help="where to draw the scores")
    parser.add_argument("--since", type=_time,
                        help="score only what was learned at or after this event time "
                             "(seconds or ISO 8601): the latest window of the log")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--apply", action="store_true",
                        help="record the winner as the new current config version (takes "
                             "the store's lease: refused while a service runs)")
    action.add_argument("--propose", metavar="EXPERIMENT",
                        help="start an experiment with the current config (control) against "
                             "the winner (calibrated), so that the change is itself "
                             "measured; through --nats-url, or offline on the store")
    parser.add_argument("--nats-url", default=os.environ.get("MICROTUNE_NATS_URL"),
                        help="the running service, for --propose (needs the admin token)")
    parser.add_argument("--prefix", default=os.environ.get("MICROTUNE_PREFIX", "microtune"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with args.grid.open("rb") as f:
        grid = tomllib.load(f).get("grid")
    if not isinstance(grid, dict):
        raise OperatorError(f"{args.grid}: no [grid] table")
    recorder, configs = open_store(args.store)
    try:
        current = configs.current
        users = list(recorder.users())
        with console.status("measuring the segments' responsiveness ..."):
            measured = calibration.responsiveness(recorder.read_all())
    finally:
        recorder.close()
    candidates = calibration.points(current, args.segment, grid)
    kept = [(p, c) for p, c in candidates if calibration.ordered(
        args.segment, c.segments[args.segment].lr_max, current, measured)]
    if measured:
        console.print("responsiveness (median interaction events per active day): " + ", ".join(
            f"{k} {v:.3g}" for k, v in sorted(measured.items())))
    if len(kept) < len(candidates):
        console.print(f"{len(candidates) - len(kept)} grid points left out: their lr_max would "
                      "give a more responsive segment wider rate bounds than a less "
                      "responsive one (README \"Tuning\")")
    if not kept:
        raise OperatorError("no grid point keeps the segments' order of rate bounds")
    candidates = kept
    all_configs = [current] + [c for _, c in candidates]
    joint = bool(calibration.JOINT & set(grid))  # the segment model varies: one replay
    with console.status(f"replaying {len(users):,} users under {len(all_configs)} configs "
                        + ("jointly (the segment model varies)" if joint else
                           f"in {args.processes} processes") + " ..."):
        scores = calibration.calibrate(args.store, users, all_configs, args.segment,
                                       processes=args.processes, since=args.since,
                                       joint=joint)
    rows = [({"config": f"v{current.version} (current)"}, scores[0], True)]
    rows += [(params, score, False) for (params, _), score in zip(candidates, scores[1:],
                                                                   strict=True)]
    rows.sort(key=lambda r: (r[1].log_loss if r[1].weight else float("inf")))
    best_params, _best, best_is_current = rows[0]
    if args.json:
        print(json.dumps([{"params": p, "log_loss": s.log_loss, "auc": s.auc,
                           "steps": s.steps, "users": s.users, "current": c}
                          for p, s, c in rows]))
    else:
        _calibration_table(rows, args.segment)
        _calibration_plot(rows, args.plot, args.segment)
        console.print(f"the scores drawn: {args.plot}")
    if args.apply and not best_is_current:
        from actors.system import Microtune

        winner = next(c for p, c in candidates if p == best_params)
        with Microtune.open(args.store) as mt:
            added = mt.configs.add(winner)
        console.print(f"recorded as config version {added.version} (current); put the same "
                      f"settings in serve's [tuning] table, which it adopts at every start")
    elif args.propose and not best_is_current:
        winner = next(c for p, c in candidates if p == best_params)
        _propose(args, winner, best_params)
    elif args.apply or args.propose:
        console.print("the current config scores best: nothing recorded")
    return 0


def _propose(args, winner: TuningConfig, params: dict) -> None:
    """Start an experiment: the current config against the calibrated one, 50/50."""
    segment = winner.segments[args.segment]
    body = {"op": "start", "name": args.propose,
            "arms": [["control", "current"],
                     ["calibrated", {"segments": {k: {**_plain(v)} for k, v in
                                                  winner.segments.items()}}]],
            "segment": args.segment,
            "by": os.environ.get("USER"), "why": f"calibrate: {_label(params)}"}
    if args.nats_url:
        import asyncio

        from adapters.ops import _admin

        asyncio.run(_admin(args.nats_url, args.prefix, "experiment", body))
    else:
        from actors.system import Microtune

        with Microtune.open(args.store) as mt:
            mt.start_experiment(args.propose, [("control", "current"),
                                               ("calibrated", winner)],
                                segment=body["segment"], by=body["by"], why=body["why"])
    console.print(f"experiment {args.propose} started: the current config against "
                  f"{_label(params)} (half_life {segment.half_life:g} s); read it with "
                  f"microtune experiment report {args.propose}")


def _plain(segment) -> dict:
    from dataclasses import asdict

    body = asdict(segment)
    if body.get("prior") is not None:
        body["prior"] = list(body["prior"])
    return body


def _label(params: dict) -> str:
    return ", ".join(f"{k}={_value(k, v)}" for k, v in params.items())


def _value(key: str, value) -> str:
    if key == "half_life" and isinstance(value, int | float):  # seconds, as a person reads
        for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
            if value >= size:
                return f"{value / size:g}{unit}"
        return f"{value:g}s"
    return f"{value:g}" if isinstance(value, int | float) else str(value)


def _calibration_table(rows: list, segment: str) -> None:
    table = Table(title=f"segment {segment}: progressive validation on the logged outcomes "
                        "(lower log loss is better)")
    for column in ("rank", "settings", "log loss", "AUC", "learning steps", "users"):
        table.add_column(column, justify="left" if column == "settings" else "right")
    for rank, (params, score, current) in enumerate(rows, start=1):
        style = "bold" if rank == 1 else ("cyan" if current else None)
        table.add_row(str(rank), _label(params), f"{score.log_loss:.5f}", f"{score.auc:.4f}",
                      f"{score.steps:,}", f"{score.users:,}", style=style)
    out.print(table)


def _calibration_plot(rows: list, path: Path, segment: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    shown = rows[:30]
    fig = Figure(figsize=(9, 0.32 * len(shown) + 1.6))
    ax = fig.subplots()
    losses = [s.log_loss for _, s, _ in shown]
    colors = ["#0072B2" if not current else "#E69F00" for _, _, current in shown]
    ax.barh(range(len(shown)), losses, color=colors)
    ax.set_yticks(range(len(shown)), [_label(p) for p, _, _ in shown], fontsize=8)
    ax.invert_yaxis()
    low, high = min(losses), max(losses)
    ax.set_xlim(low - 0.1 * (high - low or 1e-3), high + 0.05 * (high - low or 1e-3))
    ax.set_xlabel("log loss of predictions made before each learning step (lower is better)")
    ax.set_title(f"calibration of segment {segment}: best first "
                 f"(orange: the current config)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
