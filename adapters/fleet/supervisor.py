"""`microtune serve --workers N`: a fleet of N workers on one machine, on embedded defaults.

The supervisor starts the embedded NATS server (unless given `--nats-url`) with the subject
mapping that takes a query to its partition's owner, then N worker processes (`serve
--worker-id <host>-<i>`, each with its own query process), and restarts a worker that dies.
Every setting reaches the workers through the environment (`MICROTUNE_<NAME>`), secrets
included, never their command line. Ctrl-C (or SIGTERM) stops the workers (each hands its
partitions off, snapshots its users), then the server.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import structlog

from adapters.fleet.worker import query_mapping

log = structlog.get_logger(__name__)

RESTART_AFTER = 1.0  # seconds before a dead worker is started again
# a supervised worker stops (handing its partitions off) once its supervisor is gone, however
# it went (kill -9 included): a fleet leaves no orphans holding leases
SUPERVISOR_ENV = "MICROTUNE_SUPERVISOR_PID"
# what a worker gets from the supervisor rather than from the settings it was given
OWN = {"workers", "worker_id", "nats_url", "metrics_port", "store", "data_dir"}


def serve_fleet(args: argparse.Namespace, settings: dict[str, tuple[Any, str]]) -> int:
    from adapters.auth import ensure_credentials
    from adapters.embedded import EmbeddedNats
    from store import lease
    from store.recorder import open_recorder

    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    store = args.store or str(data_dir / "microtune.db")
    if held := lease.refusal(store, shared=True):
        print(f"microtune serve: {held}", file=sys.stderr)
        return 2
    recorder = open_recorder(store)  # creates the store, and fixes its number of partitions
    try:
        partitions = recorder.partitions(args.partitions)
    finally:
        recorder.close()
    env = {**os.environ, **_settings_env(args, settings)}
    env.update(MICROTUNE_STORE=store, MICROTUNE_DATA_DIR=str(data_dir))
    embedded = None
    url = args.nats_url
    if not url:
        credentials = ensure_credentials(data_dir / "auth", args.prefix)
        config = data_dir / "nats" / "fleet.conf"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(fleet_server_config(
            Path(os.path.relpath(credentials.server_config, config.parent)), args.prefix,
            partitions))
        embedded = EmbeddedNats(data_dir / "nats", port=args.embedded_port, config=config)
        try:
            embedded.start()
        except (RuntimeError, TimeoutError) as exc:
            print(f"microtune serve: {exc}", file=sys.stderr)
            return 2
        url = embedded.url
        service = credentials.connect_options("service")
        env.update(MICROTUNE_NATS_USER=service["user"],
                   MICROTUNE_NATS_PASSWORD=service["password"])
        if not args.admin_tokens_file:
            env["MICROTUNE_ADMIN_TOKENS_FILE"] = str(credentials.folder / "secrets.toml")
    env["MICROTUNE_NATS_URL"] = url
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())
    names = [f"{host}-{i}" for i in range(args.workers)]
    print(f"microtune fleet: {args.workers} workers on {url} (store: {store}; {partitions} "
          f"partitions; queries mapped by the server: {query_mapping(args.prefix, partitions)})"
          "\n  stop with Ctrl-C (each worker hands its partitions off).", flush=True)
    fleet = _Fleet(names, env, args.metrics_port)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        fleet.start()
        while not stop.wait(0.5):
            fleet.restart_dead()
    finally:
        fleet.stop()
        if embedded is not None:
            embedded.stop()
    return 0


def fleet_server_config(authorization: Path, prefix: str, partitions: int) -> str:
    """The embedded server's configuration for a fleet: the roles' authorization (a path
    relative to this file: nats-server reads includes so), and the mapping of queries to
    partitions (give an external server the same mapping)."""
    return (f"include {json.dumps(str(authorization))}\n"
            f"mappings {json.dumps(query_mapping(prefix, partitions), indent=2)}\n")


def _settings_env(args: argparse.Namespace, settings: dict[str, tuple[Any, str]]) -> dict:
    env = {}
    for key in settings:
        value = getattr(args, key, None)
        if value is not None and key not in OWN:
            env[f"MICROTUNE_{key.upper()}"] = str(value)
    if getattr(args, "config_file", None):
        env["MICROTUNE_CONFIG_FILE"] = str(args.config_file)
    return env


class _Fleet:
    def __init__(self, names: list[str], env: dict[str, str], metrics_port: int) -> None:
        self.names = names
        self.env = env
        self.metrics_port = metrics_port
        self.processes: dict[str, subprocess.Popen] = {}
        self.died: dict[str, float] = {}

    def start(self) -> None:
        for index, name in enumerate(self.names):
            self._spawn(index, name)

    def _spawn(self, index: int, name: str) -> None:
        env = {**self.env, "MICROTUNE_WORKER_ID": name, "MICROTUNE_WORKERS": "1",
               SUPERVISOR_ENV: str(os.getpid()),
               "MICROTUNE_METRICS_PORT": str(self.metrics_port + index
                                             if self.metrics_port else 0)}
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "adapters.cli", "serve"], env=env)
        log.info("fleet.worker_started", worker=name, pid=self.processes[name].pid)

    def restart_dead(self) -> None:
        now = time.monotonic()
        for index, name in enumerate(self.names):
            process = self.processes[name]
            if process.poll() is None:
                continue
            if name not in self.died:
                self.died[name] = now
                log.error("fleet.worker_died", worker=name, exitcode=process.returncode)
            elif now - self.died[name] > RESTART_AFTER:
                del self.died[name]
                self._spawn(index, name)

    def stop(self, timeout: float = 120.0) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self.processes.values():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
