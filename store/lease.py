"""The store lease: at most one writer per store.

A user's actor is the single writer of that user's log only within one process; two processes
writing one store would race on every user they share (the log's keys catch the collisions,
but both go on serving diverging states). So the writer (`Microtune`: the service, and the
offline tools that write) holds a lease for as long as it lives; a second one is refused with
who holds it. Readers (replay, debug, export, stats) take no lease: they read consistent
snapshots beside the writer.

- SQLite: an exclusive `flock` on `<database>.lock` beside the file, which holds the holder's
  pid, host and start time. The kernel drops the lock when the holder dies, however it dies,
  so there is never a stale lease to clean up (the file stays; it is not the lock).
- PostgreSQL: `pg_try_advisory_lock` on a connection of its own, kept open; the key is derived
  from the database and schema (one server can hold many stores). The server drops the lock
  when that connection ends. The holder's details are that connection's `application_name`,
  found through `pg_locks` (no table, no privilege: a service role may take it). A watchdog
  checks the connection: a lost connection is a lost lease, logged and taken again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy.engine import URL, make_url

log = structlog.get_logger(__name__)

WATCH_INTERVAL = 10.0  # seconds between the PostgreSQL lease's connection checks


class LeaseHeld(Exception):
    """Another writer holds the store."""

    def __init__(self, store: str, holder: dict[str, Any] | None) -> None:
        self.store = store
        self.holder = holder
        super().__init__(f"the store {store} is held by {_describe(holder)}; stop it, or use "
                         "--nats-url to go through it")


FLEET = {"fleet": True}  # what a fleet's workers leave as the holder's details (SQLite)


def _describe(holder: dict[str, Any] | None) -> str:
    if holder == FLEET:
        return "a fleet of microtune workers (serve --workers)"
    if not holder:  # it has the lock but has not written its details yet
        return "another microtune process"
    try:
        since = datetime.fromtimestamp(float(holder["since"]), UTC)
        return (f"microtune pid {holder['pid']} on host {holder['host']} since "
                f"{since.isoformat(timespec='seconds')}")
    except (KeyError, TypeError, ValueError):
        return "another microtune process"


def _me() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}


class StoreLease:
    """A held lease; `release()` (or leaving the `with` block) gives it up."""

    store = ""

    def release(self) -> None:  # a store that needs no lease (in memory): nothing to give up
        pass

    def __enter__(self) -> StoreLease:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()


def acquire(store: str | Path | URL, *, shared: bool = False) -> StoreLease:
    """Take the lease of a store (a SQLAlchemy URL, or a SQLite path); raises `LeaseHeld`.

    `shared`: a fleet's worker (adapters/fleet). Workers share the store with each other, each
    writing only the partitions it holds (the store fences the rest: store/fencing.py), and
    exclude a single writer as it excludes them."""
    url = _url(store)
    backend = url.get_backend_name()
    if backend == "sqlite":
        if url.database in (None, "", ":memory:"):  # private to this process: nothing to fence
            return StoreLease()
        return FileLease(Path(url.database), shared=shared)
    if backend == "postgresql":
        return AdvisoryLease(url, shared=shared)
    raise ValueError(f"no lease for a {backend} store")


def refusal(store: str | Path | URL, *, shared: bool = False) -> str | None:
    """Why a writer could not open `store` now (who holds it), or None if it could."""
    try:
        acquire(store, shared=shared).release()
    except LeaseHeld as exc:
        return str(exc)
    return None


def _url(store: str | Path | URL) -> URL:
    if isinstance(store, URL):
        return store
    text = str(store)
    if "://" not in text:
        return make_url(f"sqlite:///{text}")
    if text.startswith("postgresql://"):  # as open_recorder: psycopg 3
        text = "postgresql+psycopg://" + text[len("postgresql://"):]
    return make_url(text)


class FileLease(StoreLease):
    """SQLite: an exclusive flock on `<database>.lock`, held through an open descriptor.

    flock locks belong to the open file, not the process: a second `FileLease` in the same
    process is refused too, as a second process is."""

    def __init__(self, database: Path, *, shared: bool = False) -> None:
        self.store = str(database)
        self.shared = shared
        real = database.resolve()  # beside the file itself, however it is named
        self.path = real.with_name(real.name + ".lock")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise LeaseHeld(self.store, holder) from None
        except BaseException:
            os.close(fd)
            raise
        if shared:  # the same bytes from every worker: a single writer is told who holds it
            if not os.pread(fd, 1, 0):
                os.pwrite(fd, json.dumps(FLEET).encode(), 0)
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_me()).encode(), 0)
        self._fd: int | None = fd
        log.info("store.lease_taken", store=self.store, lock=str(self.path))

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if not self.shared:  # (other workers may hold it still)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # no holder's details without a holder
        os.close(fd)  # closing the last descriptor of the open file drops the lock


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"null")
    except (OSError, ValueError):
        return None


class AdvisoryLease(StoreLease):
    """PostgreSQL: a session advisory lock on a dedicated connection, kept open."""

    def __init__(self, url: URL, *, shared: bool = False) -> None:
        self.store = url.render_as_string(hide_password=True)
        self._url = url
        self._shared = shared
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._released = False
        self._conn, self._key = self._take()
        self._watchdog = threading.Thread(target=self._watch, name="microtune-lease",
                                          daemon=True)
        self._watchdog.start()
        log.info("store.lease_taken", store=self.store, key=self._key)

    def _connect(self, application_name: str):
        import psycopg
        from sqlalchemy import create_engine

        engine = create_engine(self._url)  # only for its dialect's reading of the URL
        _args, params = engine.dialect.create_connect_args(self._url)
        engine.dispose()
        params.pop("context", None)
        # keepalives: a silently dead peer shows up in minutes, not hours
        return psycopg.connect(**params, autocommit=True, keepalives=1, keepalives_idle=30,
                               application_name=application_name)

    def _take(self):
        me = _me()
        # what a refused writer reads (63 bytes at most: the host, last, may be cut)
        who = "microtune-fleet" if self._shared else "microtune"
        conn = self._connect(f"{who} {me['pid']} {me['since']:.0f} {me['host']}"[:63])
        try:
            db, schema = conn.execute("SELECT current_database(), current_schema()").fetchone()
            digest = hashlib.blake2b(f"microtune-store:{db}:{schema}".encode(), digest_size=8)
            key = int.from_bytes(digest.digest(), "big", signed=True)
            take = "pg_try_advisory_lock_shared" if self._shared else "pg_try_advisory_lock"
            if not conn.execute(f"SELECT {take}(%s)", (key,)).fetchone()[0]:
                raise LeaseHeld(self.store, _pg_holder(conn, key))
        except BaseException:
            conn.close()
            raise
        return conn, key

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_INTERVAL):
            with self._lock:
                if self._released:
                    return
                if self._conn is not None:
                    try:
                        self._conn.execute("SELECT 1")
                        continue
                    except Exception as exc:
                        log.error("store.lease_lost", store=self.store, error=str(exc))
                        with contextlib.suppress(Exception):
                            self._conn.close()
                        self._conn = None
                try:  # the server dropped the lock with the connection: take it again
                    self._conn, self._key = self._take()
                    log.warning("store.lease_retaken", store=self.store)
                except LeaseHeld as held:  # another writer got in meanwhile: say it loudly
                    log.critical("store.lease_taken_by_another", store=self.store,
                                 holder=held.holder)
                    return
                except Exception as exc:  # still unreachable: again at the next check
                    log.error("store.lease_unreachable", store=self.store, error=str(exc))

    def release(self) -> None:
        self._stop.set()
        with self._lock:
            self._released = True
            conn, self._conn = self._conn, None
        if conn is None:
            return
        with contextlib.suppress(Exception):  # closing the session drops the lock anyway
            give = "pg_advisory_unlock_shared" if self._shared else "pg_advisory_unlock"
            conn.execute(f"SELECT {give}(%s)", (self._key,))
        with contextlib.suppress(Exception):
            conn.close()


def _pg_holder(conn, key: int) -> dict[str, Any] | None:
    """The holder's details from its lease connection's application_name, or None."""
    unsigned = key & 0xFFFFFFFFFFFFFFFF  # a bigint key is (classid, objid) = (high, low)
    try:
        row = conn.execute(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
            "AND l.classid::text::bigint = %s AND l.objid::text::bigint = %s "
            "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            (unsigned >> 32, unsigned & 0xFFFFFFFF)).fetchone()
        who, pid, since, host = row[0].split(" ", 3)
        if who == "microtune-fleet":
            return FLEET
        return {"pid": int(pid), "host": host, "since": float(since)}
    except Exception:  # gone meanwhile, or not a microtune name: say less
        return None
