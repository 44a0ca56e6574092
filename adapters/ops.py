"""The operators' commands: replay, debug, rollback, export, import, forget, stats.

They work offline against the store (safe while the service writes: SQLite WAL, PostgreSQL),
and the ones that change a user (rollback, forget) or read live counters (stats) can go
through a running service instead (`--nats-url`: `<prefix>.admin.*` requests), which is the
way to change a user while the service serves it: its actor is the user's single writer.
The ones that write offline (rollback, forget, import) take the store's lease
(store/lease.py), so they refuse, naming the holder, while the service runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import tomllib
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import structlog
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import create_engine

from actors import debug as debugging
from actors.configs import ConfigRegistry
from actors.learning import settle
from actors.replay import (
    TIME_BASES,
    check_snapshot,
    current_states,
    replay_all,
    replay_user,
    verify_snapshots,
)
from actors.segment_model import SegmentModels
from adapters import debug_plot
from adapters.logs import configure_logging
from events.config import TuningConfig
from events.errors import Rejected
from store import lease
from store import migrate as schema
from store.recorder import Recorder, open_recorder, store_url

DEFAULT_STORE = "microtune-data/microtune.db"
console = Console(stderr=True)  # progress and messages; stdout is for tables and --json
out = Console() if sys.stdout.isatty() else Console(width=140)  # a file or pipe: wide


class OperatorError(Exception):
    """A problem to report in one line (exit status 2)."""


# ---------------------------------------------------------------- plumbing


def _parser(name: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"microtune {name}", description=description)
    parser.add_argument("--store", default=os.environ.get("MICROTUNE_STORE", DEFAULT_STORE),
                        help="store URL or SQLite path [env MICROTUNE_STORE; default "
                             f"{DEFAULT_STORE}, where `microtune serve` keeps it]")
    return parser


def _service_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nats-url", default=os.environ.get("MICROTUNE_NATS_URL"),
                        help="ask the running service at this NATS URL instead of the store "
                             "[env MICROTUNE_NATS_URL]")
    parser.add_argument("--prefix", default=os.environ.get("MICROTUNE_PREFIX", "microtune"))


def open_store(url: str, *, create: bool = False) -> tuple[Recorder, ConfigRegistry]:
    """The recorder and config history of an existing store (an error if there is none)."""
    if "://" not in url and not create and not Path(url).exists():
        raise OperatorError(f"no store at {url} (give --store)")
    recorder = open_recorder(url, upgrade=create)
    if not recorder.configs() and not create:
        recorder.close()
        raise OperatorError(f"{url} holds no microtune data")
    return recorder, ConfigRegistry(recorder, TuningConfig(version=1, dim=1))


def _time(value: str) -> float:
    """Seconds since the epoch, or an ISO 8601 date-time (UTC unless it says otherwise)."""
    try:
        return float(value)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither seconds nor ISO 8601") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True)


def _json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"not JSON: {type(value).__name__}")


async def _quiet(_exc: Exception) -> None:
    """nats-py logs every failed attempt with a traceback; the command reports it once."""


async def _admin(url: str, prefix: str, command: str, body: dict) -> dict:
    import nats
    from nats import errors

    from adapters.auth import admin_token, client_options

    subject = f"{prefix}.admin.{command}"
    token = admin_token()
    if command != "stats":
        if token is None:
            raise OperatorError("this needs the admin token: set MICROTUNE_ADMIN_TOKEN or "
                                "MICROTUNE_ADMIN_TOKEN_FILE (`microtune serve` wrote it to "
                                "<data dir>/auth/admin.env: `set -a; . microtune-data/auth/"
                                "admin.env; set +a`)")
        body = {**body, "tok": token}
    try:
        nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=1,
                                allow_reconnect=False, error_cb=_quiet, **client_options())
    except (OSError, errors.Error) as exc:
        raise OperatorError(f"cannot reach NATS at {url}: {exc or type(exc).__name__}") from None
    try:
        reply = await nc.request(subject, msgpack.packb(body, use_bin_type=True), timeout=120)
    except errors.NoRespondersError:
        raise OperatorError(f"no microtune service answers on {subject} at {url}") from None
    except errors.TimeoutError:
        raise OperatorError(f"no answer on {subject} within 120 s") from None
    finally:
        await nc.close()
    answer = msgpack.unpackb(reply.data, raw=False)
    if "e" in answer:
        raise OperatorError(f"the service refused: {answer['e']}: {answer.get('m')}")
    return answer


def _state_table(title: str, summary: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for key, value in summary.items():
        if key in ("weights", "weights minus recorded"):
            value = "  ".join(f"{k} {v:+.4f}" for k, v in value.items())
        elif isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        table.add_row(key, str(value))
    return table


# ---------------------------------------------------------------- replay


def replay(argv: list[str]) -> int:
    parser = _parser("replay", "Rebuild state from the log; optionally under another tuning "
                               "(a counterfactual), or check snapshots against the log.")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--user")
    who.add_argument("--all", action="store_true")
    until = parser.add_mutually_exclusive_group()
    until.add_argument("--until-seq", type=int)
    until.add_argument("--until-time", type=_time,
                       help="seconds or ISO 8601: the log up to the first event that happened "
                            "later (by --time-basis)")
    parser.add_argument("--time-basis", choices=TIME_BASES,
                        help="what 'happened' means for --until-time: 'received' (the default: "
                             "the broker's receive time, else the event time) or 'event' (the "
                             "event's own time, which slices a backfill)")
    parser.add_argument("--config", type=Path,
                        help="TOML file whose [tuning] table replaces the recorded tuning")
    parser.add_argument("--verify", action="store_true",
                        help="compare the latest snapshots with a replay from seq 1; exit 1 "
                             "naming every user whose snapshot differs")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.verify and (args.config or args.until_seq is not None or args.until_time):
        parser.error("--verify checks the recorded history: no --config or --until-*")
    if args.all and (args.until_seq is not None or args.until_time):
        parser.error("--until-seq/--until-time go with --user")
    if args.time_basis is not None and args.until_time is None:
        parser.error("--time-basis goes with --until-time")
    recorder, configs = open_store(args.store)
    try:
        override = _counterfactual(args.config, configs) if args.config else None
        if args.verify:
            return _verify(recorder, configs, args.user, args.json)
        if args.user:
            return _replay_one(recorder, configs, args, override)
        return _replay_all(recorder, configs, override, args.json)
    finally:
        recorder.close()


def _counterfactual(path: Path, configs: ConfigRegistry) -> TuningConfig:
    with path.open("rb") as f:
        values = tomllib.load(f)
    body = values.get("tuning", values)
    current = configs.current
    try:
        return TuningConfig.from_map({"version": max(configs.versions()) + 1,
                                      "dim": current.dim, **body})
    except Rejected as exc:
        raise OperatorError(f"{path}: {exc.detail}") from None


def _replay_one(recorder, configs, args, override) -> int:
    basis = args.time_basis or "received"
    state = replay_user(recorder, configs, args.user, until_seq=args.until_seq,
                        until_time=args.until_time, config=override, time_basis=basis)
    if state.seq == 0:
        raise OperatorError(f"user {args.user!r} has no events (up to that point)")
    summary = _describe(state, override or configs.get(state.config or None))
    if override is not None:
        recorded = replay_user(recorder, configs, args.user, until_seq=args.until_seq,
                               until_time=args.until_time, time_basis=basis)
        recorded = settle(recorded, configs.get(recorded.config or None))
        change = settle(state, override).w - recorded.w
        summary["counterfactual"] = "under the --config tuning, not the recorded one"
        summary["weights minus recorded"] = dict(zip(
            debugging.feature_names(configs.current.dim), change.tolist(), strict=True))
    if args.json:
        _json(summary)
    else:
        out.print(_state_table(f"user {args.user} replayed", summary))
    return 0


def _describe(state, config: TuningConfig) -> dict[str, Any]:
    state = settle(state, config)
    summary: dict[str, Any] = {"seq": state.seq, "config": state.config,
                               "segment": state.segment, "learning steps": state.steps}
    if state.hyg is not None:
        summary.update(session=state.hyg.session, bot=state.hyg.bot or "no")
    summary["weights"] = dict(zip(debugging.feature_names(config.dim), state.w.tolist(),
                                  strict=False))
    return summary


def _replay_all(recorder, configs, override, as_json: bool) -> int:
    total = recorder.count_events()
    users = events = 0
    start = time.perf_counter()
    with _progress() as progress:
        task = progress.add_task("replay", total=total)
        for state in replay_all(recorder, configs, config=override):
            users += 1
            events += state.seq
            if as_json:
                _json({"user": state.user, "seq": state.seq, "segment": state.segment,
                       "w": state.w.tolist()})
            if users % 200 == 0:
                progress.update(task, completed=events)
    elapsed = time.perf_counter() - start
    console.print(f"replayed {users:,} users, {events:,} events in {elapsed:.1f} s "
                  f"({events / max(elapsed, 1e-9):,.0f} events/s)"
                  + (" under the --config tuning" if override else ""))
    return 0


def _verify(recorder, configs, user: str | None, as_json: bool) -> int:
    mismatches = []
    checked = 0
    if user is not None:
        snap = recorder.latest_snapshot(user)
        if snap is None:
            raise OperatorError(f"user {user!r} has no snapshot to verify")
        checked = 1
        mismatch = check_snapshot(snap, recorder.read(user, until_seq=snap.seq), configs)
        if mismatch is not None:
            mismatches.append(tuple(mismatch))
    else:
        with _progress() as progress:
            task = progress.add_task("verify", total=recorder.count_events())

            def advance(entry) -> None:
                nonlocal checked
                checked += entry.snapshot is not None
                progress.advance(task, len(entry.events))

            for m in verify_snapshots(recorder, configs, advance):
                mismatches.append(tuple(m))
    if as_json:
        _json({"checked_snapshots": checked,
               "mismatches": [{"user": u, "seq": q, "reason": r} for u, q, r in mismatches]})
    elif mismatches:
        table = Table(title="snapshots that differ from the log")
        for column in ("user", "snapshot seq", "reason"):
            table.add_column(column)
        for u, q, r in mismatches:
            table.add_row(u, str(q), r)
        out.print(table)
    else:
        console.print(f"ok: the latest snapshots of {checked:,} users equal the replay of "
                      "their logs")
    return 1 if mismatches else 0


# ---------------------------------------------------------------- debug


def debug(argv: list[str]) -> int:
    parser = _parser("debug", "A user's timeline: what every logged event did.")
    parser.add_argument("--user", required=True)
    parser.add_argument("--json", action="store_true", help="the summary and every row")
    parser.add_argument("--plot", metavar="PNG", help="write the weights over time to PNG")
    parser.add_argument("--last", type=int, default=50, help="rows shown in the table")
    args = parser.parse_args(argv)
    recorder, configs = open_store(args.store)
    try:
        tl = debugging.timeline(recorder, configs, args.user)
    finally:
        recorder.close()
    if not tl.rows:
        raise OperatorError(f"user {args.user!r} has no events")
    summary = debugging.summary(tl, configs)
    if args.plot:
        drawn = debugging.plot_data(tl)
        debug_plot.write(drawn, args.plot)
        console.print(f"plot: {args.plot}: {drawn.title}", highlight=False)
        for d in drawn.highlighted:  # what the coloured lines are, in words
            console.print(f"  {d.name}: {d.why}", style="dim", highlight=False)
    if args.json:
        _json({"summary": summary, "rows": [r.to_map() for r in tl.rows]})
        return 0
    out.print(_state_table(f"user {args.user}", summary))
    out.print(_timeline_table(tl.rows[-args.last:], len(tl.rows)))
    return 0


def _timeline_table(rows: list, total: int) -> Table:
    table = Table(title=f"timeline (last {len(rows)} of {total} events; times UTC)",
                  caption="p: prediction before the update; |Δw|: size of the change; "
                          "learned at: seq of the event that released it (blank: only in "
                          "the query view yet)")
    for column, justify in (("seq", "right"), ("time", "left"), ("kind", "left"),
                            ("item", "left"), ("verdict", "left"), ("y", "right"),
                            ("p", "right"), ("rate", "right"), ("|Δw|", "right"),
                            ("moved most", "left"), ("learned at", "right")):
        table.add_column(column, justify=justify, no_wrap=column != "moved most",
                         overflow="ellipsis" if column == "item" else "fold")

    def num(value, spec=".3f"):
        return "" if value is None else format(value, spec)

    for r in rows:
        when = datetime.fromtimestamp(r.t, UTC).strftime("%H:%M:%S")
        moved = " ".join(f"{name}{delta:+.2g}" for name, delta in r.moved[:2])
        style = {"bot": "red", "outlier_dropped": "yellow", "late_dropped": "yellow",
                 "rollback": "magenta"}.get(r.verdict)
        table.add_row(str(r.seq), when, r.kind, r.item or "", r.verdict, num(r.y, ".2f"),
                      num(r.p, ".2f"), num(r.rate, ".3f"), num(r.change, ".3f"), moved,
                      "" if r.learned_at is None else str(r.learned_at), style=style)
    return table


# ---------------------------------------------------------------- rollback, forget


def rollback(argv: list[str]) -> int:
    parser = _parser("rollback", "Append a rollback event: the user's state becomes the "
                                 "replayed state at an earlier point (audited, undoable).")
    _service_args(parser)
    parser.add_argument("--user", required=True)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--to-seq", type=int)
    target.add_argument("--to-time", type=_time, help="seconds or ISO 8601")
    parser.add_argument("--why", help="the reason, kept in the log (a ticket reference)")
    parser.add_argument("--by", default=os.environ.get("USER"), help="who (kept in the log)")
    args = parser.parse_args(argv)
    if args.nats_url:
        answer = asyncio.run(_admin(args.nats_url, args.prefix, "rollback", {
            "u": args.user, "to": args.to_seq, "tt": args.to_time, "by": args.by,
            "why": args.why}))
        seq = answer["seq"]
    else:
        from actors.system import Microtune

        with Microtune.open(args.store) as mt:
            outcome = mt.rollback(args.user, to_seq=args.to_seq, to_time=args.to_time,
                                  by=args.by, why=args.why)
        if outcome.error is not None:
            raise OperatorError(f"refused: {outcome.error.detail}")
        seq = outcome.seq
    target_text = (f"seq {args.to_seq}" if args.to_seq is not None
                   else f"time {args.to_time}")
    console.print(f"user {args.user}: rolled back to {target_text} by the event at seq {seq}"
                  f" (undo: microtune rollback --user {args.user} --to-seq {seq - 1})")
    return 0


def forget(argv: list[str]) -> int:
    parser = _parser("forget", "Erase a user (privacy law): every event and snapshot, with an "
                               "audit record that names no one.")
    _service_args(parser)
    parser.add_argument("--user", required=True)
    parser.add_argument("--why", help="reason for the audit record (a ticket reference; no "
                                      "personal data)")
    parser.add_argument("--by", default=os.environ.get("USER"))
    parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    args = parser.parse_args(argv)
    if not args.nats_url and (held := lease.refusal(args.store)):
        raise OperatorError(held)  # before asking: it could not be done now
    if not args.yes:
        if not sys.stdin.isatty():  # a script, a pipe: nobody to ask
            raise OperatorError("no terminal to confirm the erasure on: nothing erased; pass "
                                "--yes to erase without asking")
        try:
            answer = input(f"Erase every event and snapshot of user {args.user!r}? "
                           "This cannot be undone. [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            console.print("nothing erased")
            return 1
    if args.nats_url:
        result = asyncio.run(_admin(args.nats_url, args.prefix, "forget",
                                    {"u": args.user, "by": args.by, "why": args.why}))
    else:
        from actors.system import Microtune

        with Microtune.open(args.store) as mt:
            result = mt.forget(args.user, by=args.by, why=args.why)
    console.print(f"erased {result['events']} events and {result['snapshots']} snapshots; "
                  f"audit record {result['audit_id']}")
    return 0


# ---------------------------------------------------------------- export, import


def export(argv: list[str]) -> int:
    from adapters import export as exporting

    parser = _parser("export", "A consistent point-in-time snapshot of every user's state.")
    parser.add_argument("--format", choices=exporting.FORMATS, required=True)
    parser.add_argument("--users", type=Path, help="a file of user ids, one a line")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    users = None
    if args.users:
        users = {line.strip() for line in args.users.read_text().splitlines() if line.strip()}
    recorder, configs = open_store(args.store)
    start = time.perf_counter()
    try:
        total = len(users) if users is not None else recorder.counts()["users"]
        with _progress() as progress:
            task = progress.add_task("export", total=total)
            count = exporting.export(recorder, configs, args.out, args.format, users=users,
                                     progress=lambda: progress.advance(task))
    finally:
        recorder.close()
    elapsed = time.perf_counter() - start
    console.print(f"exported {count:,} users to {args.out} in {elapsed:.1f} s "
                  f"({count / max(elapsed, 1e-9):,.0f} users/s)")
    return 0


def import_(argv: list[str]) -> int:
    from adapters import export as exporting

    parser = _parser("import", "Restore an export into a new, empty store.")
    parser.add_argument("path", type=Path)
    parser.add_argument("--format", choices=exporting.FORMATS)
    args = parser.parse_args(argv)
    with lease.acquire(args.store):  # a writer: not beside a running service
        recorder = open_recorder(args.store)
        try:
            with _progress() as progress:
                task = progress.add_task("import", total=None)
                count = exporting.import_(recorder, args.path, args.format,
                                          progress=lambda: progress.advance(task))
        except ValueError as exc:
            raise OperatorError(str(exc)) from None
        finally:
            recorder.close()
    console.print(f"imported {count:,} users into {args.store}")
    return 0


# ---------------------------------------------------------------- migrate


def migrate(argv: list[str]) -> int:
    """`microtune migrate`: bring the store's tables to this version's schema revision."""
    parser = _parser("migrate", "Create or upgrade the store's tables (schema revisions; on "
                     "PostgreSQL run it as the store's owner). Exit 0: at this version's "
                     "revision; with --check, 1: behind it.")
    parser.add_argument("--check", action="store_true",
                        help="only say where the store is; change nothing")
    parser.add_argument("--history", action="store_true", help="list the revisions")
    args = parser.parse_args(argv)
    if args.history:
        for revision, doc in schema.revisions():
            console.print(f"{revision}{' (newest)' if revision == schema.HEAD else ''}  {doc}")
        return 0
    if args.check and "://" not in args.store and not Path(args.store).exists():
        raise OperatorError(f"no store at {args.store} (give --store)")
    engine = create_engine(store_url(args.store))
    try:
        if args.check:
            revision = schema.current(engine)
            if revision is not None and revision not in dict(schema.revisions()):
                raise schema.StoreTooNew(revision)
            behind = revision != schema.HEAD
            console.print(f"{args.store}: schema revision {revision or 'none (no tables)'}; "
                          f"this microtune's is {schema.HEAD}"
                          + ("; run `microtune migrate` to upgrade" if behind else ""))
            return 1 if behind else 0
        with lease.acquire(args.store):  # not beside a running service, which reads them
            before, after = schema.migrate(engine)
    finally:
        engine.dispose()
    console.print(f"{args.store}: schema revision {before or 'none'} -> {after}"
                  if before != after else f"{args.store}: already at revision {after}")
    return 0


# ---------------------------------------------------------------- stats


def stats(argv: list[str]) -> int:
    parser = _parser("stats", "Users, events, snapshots, per-segment summaries (bot verdicts "
                              "and hygiene drops included); with --nats-url also the running "
                              "service's counters.")
    _service_args(parser)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {}
    if args.nats_url:
        result["service"] = asyncio.run(_admin(args.nats_url, args.prefix, "stats", {}))
    recorder, configs = open_store(args.store)
    try:
        result["store"] = recorder.counts()
        result["audit_records"] = len(recorder.audit_records())
        result["segments"] = _segments(recorder, configs)
        result["hygiene"] = _hygiene_totals(result["segments"])
        models = SegmentModels()
        models.load(recorder.segment_models())
        result["segment_models"] = models.summary()
    finally:
        recorder.close()
    if args.json:
        _json(result)
        return 0
    store = Table(title="store", show_header=False)
    for key, value in {**result["store"], "audit records": result["audit_records"]}.items():
        store.add_row(key, f"{value:,}")
    out.print(store)
    segments = Table(title="segments (current states)")
    for column in ("segment", "users", "bots", "events", "learning steps", "mean |w - w0|"):
        segments.add_column(column, justify="left" if column == "segment" else "right")
    for name, s in result["segments"].items():
        segments.add_row(name, f"{s['users']:,}", f"{s['bots']:,}", f"{s['events']:,}",
                         f"{s['learning_steps']:,}", f"{s['mean_distance_from_prior']:.4f}")
    out.print(segments)
    out.print(_hygiene_table(result["segments"], result["hygiene"]))
    if result["segment_models"]:
        shared = Table(title="segment models (last checkpoint)")
        for column in ("segment", "learning steps", "weights (bias first)"):
            shared.add_column(column, justify="right" if column == "learning steps" else "left")
        for name, m in result["segment_models"].items():
            shared.add_row(name, f"{m['steps']:,}", " ".join(f"{v:+.3f}" for v in m["w"]))
        out.print(shared)
    if "service" in result:
        svc = result["service"]
        live = Table(title="service (live counters)", show_header=False)
        for key, value in svc.items():
            if key != "by_worker":
                live.add_row(key, _cell(value))
        out.print(live)
        if svc.get("by_worker"):  # a fleet: the sums above, each worker's share here
            out.print(_workers_table(svc["by_worker"]))
    return 0


WORKER_COLUMNS = ("received", "applied", "duplicates", "moved", "live_actors",
                  "journal_commits", "queries")


def _workers_table(workers: dict[str, dict]) -> Table:
    table = Table(title="workers (a fleet)")
    for column in ("worker", "partitions", *WORKER_COLUMNS):
        table.add_column(column, justify="left" if column == "worker" else "right")
    for name, w in workers.items():
        serving = (w.get("fleet_worker") or {}).get("serving", [])
        table.add_row(name, _cell(len(serving)), *(_cell(w.get(c, "-")) for c in WORKER_COLUMNS))
    return table


def _cell(value: Any) -> str:
    """A live counter for the table: numbers with separators, lists and maps compact (the
    alerts per segment, the query processes' figures, the experiments running)."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int | float):
        return f"{value:,}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_cell(v)}" for k, v in value.items()) or "-"
    if isinstance(value, list | tuple):
        return ", ".join(_cell(v) for v in value) or "-"
    return str(value)


HYGIENE_COUNTS = ("bots", "ignored", "late", "late_dropped", "outliers", "outliers_dropped",
                  "waiting")


def _segments(recorder: Recorder, configs: ConfigRegistry) -> dict[str, dict]:
    """Per segment (each user's current one): users, events, learning, and data hygiene's
    verdicts and drops summed over users' states.

    Hygiene is read from the state as a query sees it (`settle`: events still in the
    lateness window released), as `replay` and `debug` show it: a bot verdict reached by
    events that wait there is already in force. `waiting` counts those events. A user's
    counters cover its whole history; `late_dropped` / `outliers_dropped` apply the
    segment's current `late_policy` / `outlier_action` to them (a late event is otherwise
    learned at the frontier, an outlier clipped)."""
    sums: dict[str, Counter] = defaultdict(Counter)
    reasons: dict[str, Counter] = defaultdict(Counter)
    distance: dict[str, float] = defaultdict(float)
    with _progress() as progress:
        task = progress.add_task("users", total=recorder.counts()["users"])
        for state in current_states(recorder, configs):
            s = sums[state.segment]
            s["users"] += 1
            s["events"] += state.seq
            s["learning_steps"] += state.steps
            if state.hyg is not None:
                config = configs.get(state.config or None)
                waiting = len(state.hyg.pending)
                state = settle(state, config)
                _count_hygiene(s, reasons[state.segment], state.hyg,
                               config.segment(state.segment), waiting)
            if state.w.shape[0]:
                w0 = configs.get(state.config or None).prior(state.segment)
                distance[state.segment] += float(np.linalg.norm(state.w - w0))
            progress.advance(task)
    return {name: {**{k: s[k] for k in ("users", "events", "learning_steps")},
                   **{k: s[k] for k in HYGIENE_COUNTS},
                   "bot_reasons": dict(sorted(reasons[name].items())),
                   "mean_distance_from_prior": distance[name] / max(s["users"], 1)}
            for name, s in sorted(sums.items())}


def _count_hygiene(s: Counter, reasons: Counter, h, seg, waiting: int) -> None:
    if h.bot:
        s["bots"] += 1
        reasons[h.bot.split(":", 1)[0]] += 1  # "rate", "short dwell", "declared", ...
    s["ignored"] += h.ignored  # events of a marked bot: logged, never learned from
    s["late"] += h.late
    s["late_dropped"] += h.late if seg.late_policy == "drop" else 0
    s["outliers"] += h.outliers
    s["outliers_dropped"] += h.outliers if seg.outlier_action == "drop" else 0
    s["waiting"] += waiting


def _hygiene_totals(segments: dict[str, dict]) -> dict[str, Any]:
    totals: dict[str, Any] = {k: sum(s[k] for s in segments.values()) for k in HYGIENE_COUNTS}
    reasons: Counter = Counter()
    for s in segments.values():
        reasons.update(s["bot_reasons"])
    totals["bot_reasons"] = dict(sorted(reasons.items()))
    return totals


def _hygiene_table(segments: dict[str, dict], totals: dict[str, Any]) -> Table:
    table = Table(title="data hygiene (current states, as queries see them)",
                  caption="ignored: events of marked bots; late / outliers: dropped / "
                          "counted (by the segment's late_policy / outlier_action); waiting: "
                          "in the lateness window")
    for column in ("segment", "bots", "bot verdicts", "ignored", "late", "outliers",
                   "waiting"):
        table.add_column(column, justify="left" if column in ("segment", "bot verdicts")
                         else "right")
    rows = list(segments.items())
    if len(rows) > 1:
        rows.append(("(all)", totals))
    for name, s in rows:
        verdicts = ", ".join(f"{k} {v:,}" for k, v in s["bot_reasons"].items()) or "-"
        table.add_row(name, f"{s['bots']:,}", verdicts, f"{s['ignored']:,}",
                      f"{s['late_dropped']:,} / {s['late']:,}",
                      f"{s['outliers_dropped']:,} / {s['outliers']:,}", f"{s['waiting']:,}",
                      style="bold" if name == "(all)" else None)
    return table


def import_events(argv: list[str]) -> int:
    """`microtune import-events FILE`: publish history as backfill events (adapters/backfill)."""
    from adapters import backfill

    return backfill.main(argv)


def experiment(argv: list[str]) -> int:
    from adapters import experiment_cli

    return experiment_cli.main(argv)


def evaluate(argv: list[str]) -> int:
    from adapters import tuning_cli

    return tuning_cli.evaluate(argv)


def calibrate(argv: list[str]) -> int:
    from adapters import tuning_cli

    return tuning_cli.calibrate(argv)


COMMANDS = {"replay": replay, "debug": debug, "rollback": rollback, "export": export,
            "import": import_, "forget": forget, "stats": stats,
            "import-events": import_events, "experiment": experiment, "evaluate": evaluate,
            "calibrate": calibrate, "migrate": migrate}


def run(name: str, argv: list[str]) -> int:
    if not structlog.is_configured():  # a host (a test, an application) may have done it
        # warnings and errors only (a rollback and an erasure log one each), on stderr
        configure_logging(os.environ.get("MICROTUNE_LOG_LEVEL", "warning"), json=False)
    try:
        return COMMANDS[name](argv)
    except (OperatorError, lease.LeaseHeld, schema.SchemaMismatch) as exc:  # a writer
        # refused (the service runs), or the store's schema is not this version's
        console.print(f"[red]microtune {name}:[/red] {exc}")
        return 2
    except KeyboardInterrupt:  # Ctrl-C: a line, not a traceback
        console.print(f"microtune {name}: interrupted")
        return 130
