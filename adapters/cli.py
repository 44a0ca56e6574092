"""The `microtune` command line.

Settings come from, highest first: flags, `MICROTUNE_*` environment variables, a TOML file
(`--config-file` or `MICROTUNE_CONFIG_FILE`), then the defaults shown by `--help`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tomllib
from pathlib import Path
from typing import Any

import structlog

from adapters.logs import configure_logging

log = structlog.get_logger(__name__)

# name -> (default, help); each is also MICROTUNE_<NAME> and a key of the TOML file
SERVE_SETTINGS: dict[str, tuple[Any, str]] = {
    "data_dir": ("microtune-data", "where the SQLite store and the embedded server's data live"),
    "store": (None, "store URL (sqlite:///path, postgresql://...); default: in data_dir"),
    "nats_url": (None, "join this NATS server; default: start an embedded one"),
    "embedded_port": (4223, "port of the embedded NATS server (loopback)"),
    "nats_user": (None, "NATS user name"),
    "nats_password": (None, "NATS password (prefer the environment or a file: ps shows flags)"),
    "nats_password_file": (None, "file holding the NATS password"),
    "nats_token": (None, "NATS token (prefer the environment or a file: ps shows flags)"),
    "nats_token_file": (None, "file holding the NATS token"),
    "nats_creds": (None, "NATS credentials file"),
    "admin_tokens_file": (None, "TOML file of admin tokens (name = \"token\"): who may "
                          "rollback, forget, clear_bot through NATS; embedded default: "
                          "<data_dir>/auth/secrets.toml"),
    "tls_ca": (None, "CA certificate file for TLS to NATS"),
    "tls_cert": (None, "client certificate file for TLS to NATS"),
    "tls_key": (None, "client key file for TLS to NATS"),
    "prefix": ("microtune", "subject prefix"),
    "dim": (16, "item feature dimension (a new store only; it is fixed per store)"),
    "max_ack_pending": (20000, "JetStream messages unanswered at most (backpressure)"),
    "max_live": (200000, "live user actors at most; the least recently used are passivated"),
    "idle_timeout": (600.0, "seconds before an idle user actor is passivated"),
    "metrics_port": (9464, "HTTP port of /metrics (Prometheus), /healthz and /readyz; 0: none"),
    "metrics_host": ("127.0.0.1", "address the metrics port listens on (loopback: nothing "
                     "outside the machine reads it unless you say so)"),
    "ready_timeout": (120.0, "seconds to become ready (consumers attached, store writable, "
                      "catalog loaded); beyond them serve stops with a message, exit 3"),
    "stop_timeout": (120.0, "seconds a graceful stop may take; beyond them serve logs what it "
                     "still waits for and exits 4 (what was acknowledged is committed: "
                     "the rest is delivered again)"),
    "workers": (1, "processes that ingest: 1 is one service; N > 1 starts N workers of a "
                "fleet on this machine, each with its partitions of the users (README "
                "\"A fleet\")"),
    "worker_id": (None, "join a fleet as this worker (one token, unique in the fleet; with "
                  "--nats-url and a store every worker shares)"),
    "partitions": (16, "partitions of the users (a new store only; fixed per deployment)"),
    "stream_replicas": (1, "copies of each stream and of the leases on a NATS cluster (3 "
                        "survives the loss of a node); streams that exist keep theirs"),
    "lease_ttl": (10.0, "a fleet's worker that stops renewing its leases loses its "
                  "partitions after this many seconds"),
    "log_level": ("info", "debug, info, warning, error"),
    "log_format": ("json", "json or console"),
}


def _settings_parser(name: str, settings: dict[str, tuple[Any, str]], file_values: dict):
    parser = argparse.ArgumentParser(
        prog=f"microtune {name}",
        description=__doc__.splitlines()[0],
        epilog="Every setting may also come from MICROTUNE_<NAME> or the TOML file.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config-file", default=os.environ.get("MICROTUNE_CONFIG_FILE"),
                        help="TOML file with settings (and a [tuning] table)")
    for key, (default, help_text) in settings.items():
        env = os.environ.get(f"MICROTUNE_{key.upper()}")
        value = env if env is not None else file_values.get(key, default)
        kind = type(default) if default is not None else str
        parser.add_argument(f"--{key.replace('_', '-')}", default=value, type=kind,
                            help=f"{help_text} [env MICROTUNE_{key.upper()}]")
    return parser


def _file_values(argv: list[str]) -> dict:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config-file", default=os.environ.get("MICROTUNE_CONFIG_FILE"))
    known, _ = pre.parse_known_args(argv)
    if not known.config_file:
        return {}
    with open(known.config_file, "rb") as f:
        return tomllib.load(f)


def _tuning(values: dict, dim: int):
    """The TOML file's [tuning] table as a config, or None without one."""
    from events.config import TuningConfig

    body = values.get("tuning")
    if not body:
        return None
    return TuningConfig.from_map({"version": 1, "dim": dim, **body})


def serve(argv: list[str]) -> int:
    file_values = _file_values(argv)
    args = _settings_parser("serve", SERVE_SETTINGS, file_values).parse_args(argv)
    configure_logging(args.log_level, json=args.log_format == "json")
    from store.lease import LeaseHeld
    from store.migrate import SchemaMismatch

    try:
        if args.workers > 1 and not args.worker_id:
            from adapters.fleet.supervisor import serve_fleet

            return serve_fleet(args, SERVE_SETTINGS)
        return asyncio.run(_serve(args, _tuning(file_values, args.dim)))
    except (LeaseHeld, SchemaMismatch) as exc:  # another writer won the race since _serve's
        # check; or the store's schema is newer than this version, or cannot be upgraded
        print(f"microtune serve: {exc}", file=sys.stderr)
        return 2


async def _serve(args: argparse.Namespace, tuning) -> int:
    from adapters.auth import ensure_credentials, load_admin_tokens
    from adapters.embedded import EmbeddedNats
    from adapters.nats_service import Service, ServiceConfig
    from store import lease

    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    store = args.store or str(data_dir / "microtune.db")
    worker = args.worker_id
    if worker and not args.nats_url:
        print("microtune serve: a fleet's worker (--worker-id) joins a NATS server that the "
              "fleet shares: give --nats-url (or run serve --workers N, which starts one)",
              file=sys.stderr)
        return 2
    if held := lease.refusal(store, shared=bool(worker)):  # another writer: say so first
        print(f"microtune serve: {held}", file=sys.stderr)
        return 2
    embedded = None
    url = args.nats_url
    options: dict[str, Any] = {}
    admin_tokens: dict[str, str] = {}
    credentials = None
    if not url:  # safe as shipped: the embedded server runs with a user per role
        credentials = ensure_credentials(data_dir / "auth", args.prefix)
        embedded = EmbeddedNats(data_dir / "nats", port=args.embedded_port,
                                config=credentials.server_config)
        try:
            embedded.start()
        except (RuntimeError, TimeoutError) as exc:
            print(f"microtune serve: {exc}", file=sys.stderr)
            return 2
        url = embedded.url
        options.update(credentials.connect_options("service"))
        admin_tokens = dict(credentials.admin_tokens)
    if args.admin_tokens_file:
        try:
            admin_tokens = load_admin_tokens(args.admin_tokens_file)
        except (OSError, ValueError) as exc:
            print(f"microtune serve: {exc}", file=sys.stderr)
            return 2
    if args.nats_user:
        options.update(user=args.nats_user,
                       password=_read_secret(args.nats_password, args.nats_password_file))
    token = _read_secret(args.nats_token, args.nats_token_file)
    if token:
        options["token"] = token
    if args.nats_creds:
        options["user_credentials"] = args.nats_creds
    if args.tls_ca or args.tls_cert:  # files, not an SSLContext: query processes get them
        from adapters.query_process import TlsFiles

        options["tls"] = TlsFiles(args.tls_ca, args.tls_cert, args.tls_key)

    from events.config import TuningConfig
    from events.errors import Rejected

    system = _open_system(store, tuning or TuningConfig(version=1, dim=args.dim), args)
    if tuning is not None:  # the file's settings, as a new config version if they changed
        try:
            before = system.configs.current.version
            current = system.configs.adopt(tuning)
        except Rejected as exc:
            print(f"microtune serve: the [tuning] table does not fit the store {store}: "
                  f"{exc.detail}", file=sys.stderr)
            system.close()
            if embedded is not None:
                embedded.stop()
            return 2
        if current.version != before:
            log.info("config.adopted_from_file", version=current.version, previous=before)
    config = ServiceConfig(prefix=args.prefix, max_ack_pending=args.max_ack_pending,
                           admin_tokens=admin_tokens, log_level=args.log_level,
                           log_json=args.log_format == "json", replicas=args.stream_replicas)
    if worker:
        from adapters.fleet.worker import FleetSettings, Worker

        service = Worker(system, config, FleetSettings(worker=worker, lease_ttl=args.lease_ttl))
    else:
        service = Service(system, config)
    stop = asyncio.Event()
    hung = False
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    metrics = None
    if args.metrics_port:
        from adapters.metrics import MetricsServer

        try:  # before start: /healthz answers while the service gets ready
            metrics = MetricsServer(service, args.metrics_host, args.metrics_port).start()
        except OSError as exc:
            print(f"microtune serve: the metrics port {args.metrics_host}:{args.metrics_port} "
                  f"is not free ({exc.strerror}); give another with --metrics-port, or 0 for "
                  "none", file=sys.stderr)
            system.close()
            if embedded is not None:
                embedded.stop()
            return 2
    try:
        try:
            # a cluster's servers, comma-separated: the client fails over among them
            servers = url.split(",") if "," in url else url
            await asyncio.wait_for(_ready(service, servers, options), args.ready_timeout)
        except TimeoutError:
            checks = service.readiness()[1]
            failing = ", ".join(k for k, ok in checks.items() if not ok) or "start"
            print(f"microtune serve: not ready after {args.ready_timeout:g} s ({failing}); "
                  "stopping", file=sys.stderr)
            await service.stop()
            return 3
        p = args.prefix
        if worker:
            print(f"microtune worker {worker} joined the fleet on {url} (store: "
                  f"{_shown(store)}; partitions {service.fleet_stats()['serving']} of "
                  f"{service.partitions})", flush=True)
        else:
            print(
                f"microtune is serving on {url} (store: {_shown(store)}, feature dim "
                f"{system.configs.current.dim})\n"
                f"  publish events:  JetStream subject {p}.events.<user>, msgpack "
                "{v:1, id, u, t, k, i, x?, ...}\n"
                f"  query weights:   request on {p}.query.<user>, msgpack {{v:1, c:[item ids or "
                "[id, features]], n?}\n"
                f"  catalog:         {p}.content, msgpack {{v:1, i, x}}; rejections on "
                f"{p}.rejected\n"
                f"  try it:          {_try_it(credentials, url)}\n"
                f"{_auth_banner(credentials, admin_tokens)}"
                + (f"  metrics:         http://{args.metrics_host}:{metrics.port}/metrics "
                   "(and /healthz, /readyz)\n" if metrics is not None else "")
                + "  stop with Ctrl-C (finishes in-flight work, snapshots users).",
                flush=True,
            )
        housekeeping = asyncio.create_task(_housekeeping(system, stop))
        supervisor = os.environ.get("MICROTUNE_SUPERVISOR_PID")  # serve --workers N
        watch = None if not (worker and supervisor) else asyncio.create_task(
            _watch_supervisor(int(supervisor), stop))
        await stop.wait()
        housekeeping.cancel()
        orphaned = watch is not None and watch.done() and not watch.cancelled()
        if watch is not None:
            watch.cancel()
        log.info("service.stopping", orphaned=orphaned)
        # an orphan's supervisor took the embedded server with it (a hand-off over a dead
        # server only waits): a short try, then out; what it acknowledged is committed
        timeout = min(args.stop_timeout, ORPHAN_STOP_TIMEOUT) if orphaned else args.stop_timeout
        try:
            await asyncio.wait_for(asyncio.shield(service.stop()), timeout)
        except TimeoutError:
            if orphaned:
                log.warning("service.orphan_stop_abandoned", seconds=timeout)
            else:
                log.error("service.stop_timed_out", seconds=timeout, waiting=_waiting_tasks())
            hung = True
    finally:
        if metrics is not None:
            metrics.stop()
        if embedded is not None:
            embedded.stop()
    if hung:  # a stop that hangs is a bug (logged above); threads waiting for work would
        # keep the process alive. Nothing acknowledged is lost: an event is acknowledged once
        # committed, and the unacknowledged are delivered again.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(4)
    return 0


def _waiting_tasks() -> dict[str, str]:
    """Where each asyncio task waits: its chain of awaits, outermost first."""
    waiting = {}
    for task in asyncio.all_tasks():
        chain, coro = [], task.get_coro()
        while coro is not None:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
            if frame is not None:
                chain.append(f"{frame.f_code.co_name} "
                             f"({Path(frame.f_code.co_filename).name}:{frame.f_lineno})")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        waiting[task.get_name()] = " > ".join(chain)
    return waiting


def _open_system(store: str, tuning, args: argparse.Namespace):
    """The service's system; a fleet's worker's writes through a fence (store/fencing.py),
    sized by the store's number of partitions (recorded by the first to start)."""
    from actors.system import Microtune

    return Microtune.open(store, tuning, max_live=args.max_live,
                          idle_timeout=args.idle_timeout, partitions=args.partitions,
                          fleet=bool(args.worker_id))


async def _ready(service, url: str, options: dict) -> None:
    """Start the service, then wait until every readiness check passes."""
    await service.start(url, **options)
    while not service.readiness()[0]:
        await asyncio.sleep(0.2)


def _shown(store: str) -> str:
    """A store URL as printed: never its password."""
    if "://" not in store:
        return store
    from sqlalchemy.engine import make_url

    try:
        return make_url(store).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy reads: say nothing of it rather than too much
        return store.split("://", 1)[0] + "://..."


def _read_secret(value: str | None, path: str | None) -> str | None:
    if path:
        return Path(path).read_text().strip()
    return value


def _env_hint(credentials, role: str) -> str:
    if credentials is None:
        return ""
    return f"set -a; . {credentials.folder / (role + '.env')}; set +a; "


def _try_it(credentials, url: str) -> str:
    demo = f"microtune demo --nats-url {url}"
    if credentials is None:
        return demo
    return f"{_env_hint(credentials, 'admin')}\n                   {demo}"


def _auth_banner(credentials, admin_tokens: dict[str, str]) -> str:
    if credentials is not None:
        roles = ", ".join(f"{r}.env" for r in ("publisher", "querier", "catalog", "admin"))
        return (f"  who may do what: clients log in as a role (README \"Who may do what\"):\n"
                f"                   {roles} in {credentials.folder}/ (owner-only)\n"
                f"                   set MICROTUNE_NATS_USER/PASSWORD for your NATS client:\n"
                f"                   {_env_hint(credentials, 'publisher')}\n")
    if not admin_tokens:
        return ("  admin commands (rollback, forget, clear_bot) are off: no admin tokens "
                "(--admin-tokens-file)\n")
    return ""


async def _housekeeping(system, stop: asyncio.Event) -> None:
    """Every 30 s (or a quarter of the idle timeout): passivate idle users, checkpoint the
    segment models."""
    while not stop.is_set():
        await asyncio.sleep(min(30.0, max(1.0, system.directory.idle_timeout / 4)))
        count = system.directory.passivate_idle()
        if count:
            log.info("directory.passivated_idle", users=count)
        await asyncio.to_thread(system.checkpoint)  # the segment models


ORPHAN_STOP_TIMEOUT = 15.0  # seconds a worker whose supervisor died tries to stop cleanly


async def _watch_supervisor(pid: int, stop: asyncio.Event) -> None:
    """A worker of `serve --workers N` stops once the supervisor that started it is gone."""
    while not stop.is_set():
        if os.getppid() != pid:
            log.error("fleet.supervisor_gone", supervisor=pid)
            stop.set()
            return
        await asyncio.sleep(1.0)


def auth_config(argv: list[str]) -> int:
    """`microtune auth-config`: credentials and a nats-server configuration for an external
    server (the embedded one gets the same from `serve`)."""
    from adapters.auth import ROLES, ensure_credentials

    parser = argparse.ArgumentParser(
        prog="microtune auth-config",
        description="Write a nats-server authorization (a user per role: service, publisher, "
                    "querier, catalog, admin) and each role's env file, owner-only; existing "
                    "secrets are kept.")
    parser.add_argument("--out", default="microtune-data/auth", type=Path)
    parser.add_argument("--prefix", default="microtune")
    args = parser.parse_args(argv)
    creds = ensure_credentials(args.out, args.prefix)
    envs = ", ".join(f"{role}.env" for role in ROLES)
    print(f"wrote {creds.folder}/: nats-server.conf, secrets.toml and {envs}"
          f"\n  the server:  nats-server -js -c {creds.server_config} (or include its "
          "authorization block in your configuration)"
          f"\n  the service: set -a; . {creds.folder}/service.env; set +a; microtune serve "
          f"--nats-url URL --admin-tokens-file {creds.folder}/secrets.toml"
          f"\n  clients:     . {creds.folder}/<role>.env, then MICROTUNE_NATS_USER and "
          "MICROTUNE_NATS_PASSWORD (and MICROTUNE_ADMIN_TOKEN for admins)")
    return 0


BENCHMARKS = ("core", "nats", "ceiling", "ops", "hygiene", "quality", "readme", "calibrate",
              "drift", "items", "alerts", "gateway", "fleet")


def bench(argv: list[str]) -> int:
    """`microtune bench <name> [its options]`: run scripts/bench_<name>.py of this checkout."""
    import runpy

    scripts = Path(__file__).resolve().parents[1] / "scripts"
    if not argv or argv[0] not in BENCHMARKS or not scripts.is_dir():
        print(f"usage: microtune bench {{{','.join(BENCHMARKS)}}} [options]\n"
              "  (runs scripts/bench_<name>.py of a source checkout; --help for its options)")
        return 2
    script = scripts / f"bench_{argv[0]}.py"
    saved = sys.argv, list(sys.path)
    sys.argv = [str(script), *argv[1:]]
    sys.path.insert(0, str(scripts))  # the scripts share bench_report
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = saved
    return 0


GATEWAY_SETTINGS: dict[str, tuple[Any, str]] = {
    "nats_url": ("nats://127.0.0.1:4223", "the NATS server microtune serves on"),
    "nats_user": (None, "NATS user name (the embedded server's: `. <data dir>/auth/admin.env`, "
                        "or a role that may publish what you route)"),
    "nats_password": (None, "NATS password (prefer MICROTUNE_NATS_PASSWORD or a file)"),
    "nats_password_file": (None, "file holding the NATS password"),
    "prefix": ("microtune", "subject prefix"),
    "host": ("127.0.0.1", "address the HTTP port listens on (loopback unless you say so)"),
    "port": (8080, "HTTP port"),
    "timeout": (5.0, "seconds a query or a publish may take"),
    "log_level": ("info", "debug, info, warning, error"),
}


def gateway(argv: list[str]) -> int:
    """`microtune gateway`: the HTTP API (adapters/gateway.py) on uvicorn."""
    file_values = _file_values(argv)
    args = _settings_parser("gateway", GATEWAY_SETTINGS, file_values).parse_args(argv)
    configure_logging(args.log_level, json=False)
    import uvicorn

    from adapters.gateway import GatewaySettings, create_app

    options: dict[str, Any] = {}  # MICROTUNE_NATS_USER etc. are read by the parser
    if args.nats_user:
        options.update(user=args.nats_user,
                       password=_read_secret(args.nats_password, args.nats_password_file))
    app = create_app(GatewaySettings(nats_url=args.nats_url, prefix=args.prefix,
                                     connect_options=options, timeout=args.timeout))
    print(f"microtune gateway on http://{args.host}:{args.port} (OpenAPI at /docs), "
          f"speaking NATS at {args.nats_url}", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    except KeyboardInterrupt:
        return 130
    return 0


COMMANDS = {"serve": serve, "bench": bench, "auth-config": auth_config, "gateway": gateway}


USAGE = """usage: microtune <command> [--help]

  serve     run the service (embedded NATS + SQLite by default)
  demo      simulated users against a running service, with a live view
  bench     core | nats | ceiling | ops | hygiene | quality | calibrate | drift | items |
            alerts | gateway: the benchmarks (bench-results/); bench readme writes the README's
            tables from their JSON
  gateway   the HTTP API (events, rank, items, info, admin) in front of a running service
  auth-config  users per role and admin tokens for an external NATS (serve makes its own)
  migrate   create or upgrade the store's tables (schema revisions); --check, --history

operators' tools (offline against the store; rollback, forget, stats also --nats-url):
  replay    rebuild state from the log: --user U | --all, --until-seq/--until-time,
            --config FILE (counterfactual), --verify (snapshots against the log)
  debug     a user's timeline: verdict, target, prediction, rate, change per event
  rollback  append a rollback event: --user U --to-seq N | --to-time T
  export    every user's current state: --format jsonl|parquet|msgpack --out PATH
  import    restore an export into a new store
  forget    erase a user (privacy law), audited
  stats     users, events, segments, bot verdicts, hygiene drops; the service's counters
            with --nats-url

  import-events FILE --nats-url URL   publish past events (JSON lines or msgpack) as history:
            flagged bf=true, event times trusted, Nats-Msg-Id <user>.<id>"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from adapters import demo, ops

    COMMANDS["demo"] = demo.main
    for name in ops.COMMANDS:
        COMMANDS[name] = lambda rest, name=name: ops.run(name, rest)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(USAGE)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
