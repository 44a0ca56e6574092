"""`microtune experiment start | ramp | stop | list | report`.

Start, ramp and stop change what users learn by: through a running service (`--nats-url`,
`<prefix>.admin.experiment`, which needs the admin token), or offline on the store (which
takes the store's lease, so it is refused while a service runs). `list` and `report` only
read; `report` reads the store (safe while the service writes) and computes every number from
the log (actors/experiments/analysis.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.table import Table

from actors.experiments import analysis
from actors.experiments.definition import DEFAULT_WINDOW, METRICS, Experiment
from actors.experiments.registry import CURRENT, NO_ADJUST, ExperimentRegistry
from adapters import experiment_report
from adapters.ops import (
    OperatorError,
    _admin,
    _jsonable,
    _parser,
    _service_args,
    console,
    open_store,
    out,
)
from events.errors import Rejected


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="microtune experiment",
                                     description="Experiments: does the micro-adjustment "
                                                 "help? (README \"Measuring the effect\")")
    sub = parser.add_subparsers(dest="op", required=True)
    start = _sub(sub, "start", "Start an experiment (its definition is recorded, audited).")
    start.add_argument("name")
    start.add_argument("--arm", action="append", required=True, metavar="NAME=CONFIG",
                       help=f"an arm and its tuning config: {CURRENT!r} (the current config), "
                            f"{NO_ADJUST!r} (the current config without micro-adjustment: "
                            "segment model and prior only), a config version number, or a "
                            "TOML file (a [tuning] table); give two or more, the first is "
                            "the control unless --control says otherwise")
    start.add_argument("--split", help="the arms' shares of users, e.g. 0.5,0.5 (default: "
                                       "equal)")
    start.add_argument("--control", help="the arm the others are compared with")
    start.add_argument("--traffic", type=float, default=1.0,
                       help="the share of eligible users enrolled (ramp it up later)")
    start.add_argument("--segment", help="enrol only this segment's users (default: all)")
    start.add_argument("--primary", default="ctr", choices=sorted(METRICS))
    start.add_argument("--guardrail", action="append", choices=sorted(METRICS),
                       help="a guardrail metric (repeat; default: dwell and feedback)")
    start.add_argument("--window", type=float, default=DEFAULT_WINDOW,
                       help="seconds an outcome without a rid may follow its exposure")
    ramp = _sub(sub, "ramp", "Change the share of eligible users enrolled (enrolled users "
                             "stay in their arm).")
    ramp.add_argument("name")
    ramp.add_argument("--traffic", type=float, required=True)
    stop = _sub(sub, "stop", "Stop an experiment: its users go back to the current config.")
    stop.add_argument("name")
    listing = _sub(sub, "list", "Every experiment, its arms and status.")
    listing.add_argument("--json", action="store_true")
    report = _sub(sub, "report", "The experiment's results, from the log: a table, and an "
                                 "HTML page with plots.")
    report.add_argument("name")
    report.add_argument("--html", type=Path, help="where to write the page (default: "
                                                  "experiment-<name>.html)")
    report.add_argument("--json", action="store_true", help="print the report as JSON")
    report.add_argument("--alpha", type=float, default=0.05)
    args = parser.parse_args(argv)
    try:
        return {"start": _start, "ramp": _ramp, "stop": _stop, "list": _list,
                "report": _report}[args.op](args)
    except Rejected as exc:
        raise OperatorError(f"refused: {exc.detail}") from None


def _sub(sub, name: str, description: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, description=description, help=description)
    # the common options (--store, --nats-url, --prefix) as every operators' command has them
    base = _parser(f"experiment {name}", description)
    _service_args(base)
    for action in base._actions:
        if action.option_strings and action.dest != "help":
            p._add_action(action)
    if name in ("start", "ramp", "stop"):
        p.add_argument("--why", help="the reason, kept in the audit (a ticket reference)")
        p.add_argument("--by", default=os.environ.get("USER"), help="who (kept in the audit)")
    return p


# ---------------------------------------------------------------- changes


def _arms(specs: list[str]) -> list[tuple[str, Any]]:
    arms = []
    for spec in specs:
        name, sep, config = spec.partition("=")
        if not sep or not name or not config:
            raise OperatorError(f"--arm {spec!r}: give NAME=CONFIG")
        if config in (CURRENT, NO_ADJUST):
            arms.append((name, config))
        elif config.isdigit():
            arms.append((name, int(config)))
        else:
            path = Path(config)
            if not path.exists():
                raise OperatorError(f"--arm {spec!r}: {config} is neither {CURRENT!r}, "
                                    f"{NO_ADJUST!r}, a version number nor a file")
            with path.open("rb") as f:
                values = tomllib.load(f)
            arms.append((name, values.get("tuning", values)))  # a map: the service builds it
    return arms


def _start(args: argparse.Namespace) -> int:
    split = None if args.split is None else [float(s) for s in args.split.split(",")]
    body = {"name": args.name, "arms": [list(a) for a in _arms(args.arm)], "split": split,
            "control": args.control, "traffic": args.traffic, "segment": args.segment,
            "primary": args.primary, "guardrails": args.guardrail or ["dwell", "feedback"],
            "window": args.window}
    experiment = _change(args, "start", body)
    arms = ", ".join(f"{a} (config v{v})" for a, v in experiment.arms)
    console.print(f"experiment {experiment.name} started: {arms}; control "
                  f"{experiment.control}; {experiment.traffic:.0%} of "
                  f"{'segment ' + experiment.segment if experiment.segment else 'all'} users")
    return 0


def _ramp(args: argparse.Namespace) -> int:
    experiment = _change(args, "ramp", {"name": args.name, "traffic": args.traffic})
    console.print(f"experiment {experiment.name}: traffic {experiment.traffic:.0%} "
                  f"(version {experiment.version})")
    return 0


def _stop(args: argparse.Namespace) -> int:
    experiment = _change(args, "stop", {"name": args.name})
    console.print(f"experiment {experiment.name} stopped (version {experiment.version}); "
                  f"report: microtune experiment report {experiment.name}")
    return 0


def _change(args: argparse.Namespace, op: str, body: dict) -> Experiment:
    body = {**body, "op": op, "by": args.by, "why": args.why}
    if args.nats_url:
        answer = asyncio.run(_admin(args.nats_url, args.prefix, "experiment", body))
        return Experiment.from_map(answer["experiment"])
    from actors.system import Microtune

    with Microtune.open(args.store) as mt:
        if op == "start":
            return mt.start_experiment(
                args.name, [tuple(a) for a in body["arms"]], split=body["split"],
                control=body["control"],
                traffic=body["traffic"], segment=body["segment"], primary=body["primary"],
                guardrails=tuple(body["guardrails"]), window=body["window"], by=args.by,
                why=args.why)
        if op == "ramp":
            return mt.ramp_experiment(args.name, args.traffic, by=args.by, why=args.why)
        return mt.stop_experiment(args.name, by=args.by, why=args.why)


# ---------------------------------------------------------------- reading


def _list(args: argparse.Namespace) -> int:
    if args.nats_url:
        answer = asyncio.run(_admin(args.nats_url, args.prefix, "experiments", {}))
        experiments = [Experiment.from_map(e) for e in answer["experiments"]]
    else:
        recorder, _configs = open_store(args.store)
        experiments = ExperimentRegistry(recorder).all()
        recorder.close()
    if args.json:
        print(json.dumps([e.to_map() for e in experiments], default=_jsonable))
        return 0
    table = Table(title="experiments")
    for column in ("name", "status", "arms (config)", "split", "traffic", "segment",
                   "primary", "started", "stopped", "version"):
        table.add_column(column)
    for e in experiments:
        table.add_row(e.name, e.status, ", ".join(f"{a} (v{v})" for a, v in e.arms),
                      "/".join(f"{s:g}" for s in e.split), f"{e.traffic:.0%}",
                      e.segment or "all", e.primary, _when(e.start), _when(e.stop),
                      str(e.version))
    out.print(table if experiments else "no experiments yet")
    return 0


def _report(args: argparse.Namespace) -> int:
    recorder, configs = open_store(args.store)
    try:
        experiment = ExperimentRegistry(recorder).get(args.name)
        with console.status(f"reading the log for experiment {args.name} ..."):
            users = analysis.collect(recorder, experiment, configs)
    finally:
        recorder.close()
    report = analysis.report(experiment, users, alpha=args.alpha, generated_at=time.time())
    if args.json:
        print(json.dumps(report, default=_jsonable))
        return 0
    experiment_report.print_report(report, out)
    html = experiment_report.write_html(report, args.html or Path(f"experiment-{args.name}.html"))
    console.print(f"the report with its plots: {html}")
    return 0


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M UTC")
