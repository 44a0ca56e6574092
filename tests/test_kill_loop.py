"""A kill -9 loop, counted from outside: nothing acknowledged is lost, nothing is doubled.

A publisher (a task of this test) publishes events for 30 users through JetStream, each with
the user-qualified `Nats-Msg-Id` header `<user>.<event id>`, and records every id whose publish
JetStream acknowledged; an unacknowledged publish is retried with the same id, as a real
publisher would. Meanwhile a chaos script kills with SIGKILL the broker 3 times and the
`microtune serve` subprocess 3 times (restarting each), and in the middle holds a store outage
of 40 s: another process holds `BEGIN EXCLUSIVE` on the SQLite file, so every commit waits out
sqlite's 30 s busy timeout and fails, and the journal retries.

The outage is timed to catch the hard case: events delivered at its start cannot be committed,
JetStream redelivers them after the service's `ack_wait` (30 s), and the service is killed
while the lock is still held, after those redeliveries arrived. An event must be acked only
once it is committed, so a redelivery of an event still waiting for its commit must not be
acked as a duplicate: if it is, the kill loses it.

After the last kill, the service's final restart and the log holding every acknowledged event
(or the broker having nothing left to deliver), it asserts, from the database itself:

- 0 acknowledged events lost (every acknowledged (user, id) is in `mt_events`);
- 0 applied twice (each (user, id) once; seqs gap-free from 1 per user; nothing unpublished);
- `python -m adapters.cli replay --all --verify --store <db>` exits 0.

The figures (published, acknowledged, kills of each kind, lost, doubled, and per kill the time
from the restart until the log grows again and until it holds every event acknowledged before
the kill) are printed and written to `kill-loop.json` in the test's tmp_path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import nats
import pytest

from adapters.embedded import EmbeddedNats

ROOT = Path(__file__).resolve().parents[1]
DIM = 4
USERS = [f"u{n:02d}" for n in range(30)]
EVENTS_PER_USER = 100  # 3000 events
PUBLISH_SECONDS = 95.0  # spread evenly: about 32 events/s
OUTAGE_SECONDS = 40.0
ACK_WAIT = 30.0  # the service's ack_wait (ServiceConfig)
T0 = 1_700_000_000.0

LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("ROLLBACK")
conn.close()
print("released", flush=True)
"""


# ---------------------------------------------------------------- the processes


class ServeProcess:
    """`microtune serve` as a subprocess that can be killed -9 and started again."""

    def __init__(self, url: str, data_dir: Path) -> None:
        self.url, self.data_dir = url, data_dir
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    async def start(self, timeout: float = 90.0) -> None:
        self.starts += 1
        with open(self.data_dir.parent / f"serve-{self.starts}.log", "wb") as log_file:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "adapters.cli", "serve", "--nats-url", self.url,
                "--data-dir", str(self.data_dir), "--dim", str(DIM), "--log-level", "warning",
                "--log-format", "console", cwd=ROOT,
                stdout=asyncio.subprocess.PIPE, stderr=log_file)
        line = (await asyncio.wait_for(self.proc.stdout.readline(), timeout)).decode()
        assert "microtune is serving" in line, f"serve did not start: {line!r}"

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)

    async def wait(self, timeout: float = 30.0) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout)


async def hold_store_lock(db: Path, seconds: float, locked: asyncio.Event) -> None:
    """Another process holds an exclusive lock on the SQLite file for `seconds`."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LOCKER, str(db), str(seconds), stdout=asyncio.subprocess.PIPE)
    assert (await asyncio.wait_for(proc.stdout.readline(), 60)).strip() == b"locked"
    locked.set()
    assert (await proc.stdout.readline()).strip() == b"released"
    assert await proc.wait() == 0


# ---------------------------------------------------------------- the publisher


def event_body(user: str, n: int) -> bytes:
    x = [1.0, 0.0, 0.0, 0.0] if n % 2 else [0.0, 1.0, 0.0, 0.0]
    return msgpack.packb({"v": 1, "id": f"e{n}", "u": user, "t": T0 + 30.0 * n,
                          "k": "click" if n % 3 else "impression", "i": f"item{n % 7}",
                          "x": x})


@dataclass
class Publisher:
    url: str
    acked: dict[tuple[str, str], float] = field(default_factory=dict)  # id -> when
    published: set[tuple[str, str]] = field(default_factory=set)
    attempts: int = 0
    client_errors: int = 0  # connection errors while the broker is down (expected)

    async def run(self) -> None:
        nc = await nats.connect(self.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1,
                                error_cb=self.on_error)
        js = nc.jetstream()
        start = time.monotonic()
        interval = PUBLISH_SECONDS / EVENTS_PER_USER

        async def one_user(k: int, user: str) -> None:
            for n in range(EVENTS_PER_USER):
                await sleep_until(start + (n + k / len(USERS)) * interval)
                await self.publish_until_acked(js, user, n)

        await asyncio.gather(*(one_user(k, u) for k, u in enumerate(USERS)))
        await nc.close()

    async def on_error(self, _exc: Exception) -> None:
        self.client_errors += 1

    async def publish_until_acked(self, js, user: str, n: int) -> None:
        key = (user, f"e{n}")
        self.published.add(key)
        while True:
            self.attempts += 1
            try:
                await js.publish(f"microtune.events.{user}", event_body(user, n), timeout=2,
                                 headers={"Nats-Msg-Id": f"{user}.e{n}"})
            except Exception:  # not acknowledged (the broker is down): retry, same id
                await asyncio.sleep(0.2)
                continue
            self.acked[key] = time.monotonic()
            return


async def sleep_until(moment: float) -> None:
    await asyncio.sleep(max(0.0, moment - time.monotonic()))


# ---------------------------------------------------------------- watching the log


def read_log(db: Path) -> list[tuple[str, int, str]]:
    """(user, seq, event id) of every logged event, read straight from the file."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute("SELECT user_id, seq, event_id FROM mt_events").fetchall()
    finally:
        conn.close()


@dataclass
class Recovery:
    kind: str  # "broker" or "service"
    killed_at: float
    restarted_at: float = 0.0
    during_outage: bool = False
    log_at_restart: int = 0
    missing: set = field(default_factory=set)  # acknowledged before the kill, not yet logged
    first_growth: float | None = None
    caught_up: float | None = None

    def figures(self, origin: float) -> dict:
        def since_restart(moment: float | None) -> float | None:
            return None if moment is None else round(moment - self.restarted_at, 2)

        return {"kind": self.kind, "killed_at_s": round(self.killed_at - origin, 1),
                "down_s": round(self.restarted_at - self.killed_at, 2),
                "during_outage": self.during_outage,
                "log_grows_again_after_s": since_restart(self.first_growth),
                "caught_up_after_s": since_restart(self.caught_up),
                "never_logged": len(self.missing)}


class LogWatcher:
    """Polls the log and times each kill's recovery."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.logged: set[tuple[str, str]] = set()
        self.recoveries: list[Recovery] = []

    async def run(self) -> None:
        while True:
            await self.poll()
            await asyncio.sleep(0.1)

    async def poll(self) -> None:
        if not self.db.exists():
            return
        try:
            rows = await asyncio.to_thread(read_log, self.db)
        except sqlite3.Error:  # the schema is not there yet
            return
        now = time.monotonic()
        self.logged = {(user, event_id) for user, _seq, event_id in rows}
        for r in self.recoveries:
            if not r.restarted_at:
                continue
            if r.first_growth is None and len(self.logged) > r.log_at_restart:
                r.first_growth = now
            if r.caught_up is None:
                r.missing -= self.logged
                if not r.missing:
                    r.caught_up = now


# ---------------------------------------------------------------- the scenario


@pytest.mark.slow
def test_kill_loop_loses_no_acknowledged_event_and_doubles_none(tmp_path):
    data = tmp_path / "svc"
    data.mkdir()
    db = data / "microtune.db"
    broker = EmbeddedNats(tmp_path / "nats")
    serve = ServeProcess("", data)
    figures: dict = {}

    async def scenario() -> None:
        broker.start()
        serve.url = broker.url
        await serve.start()
        publisher = Publisher(broker.url)
        watcher = LogWatcher(db)
        origin = time.monotonic()
        publishing = asyncio.create_task(publisher.run())
        watching = asyncio.create_task(watcher.run())
        outage: dict[str, float] = {}

        async def kill(kind: str) -> None:
            r = Recovery(kind, time.monotonic(), missing=set(publisher.acked))
            r.during_outage = "start" in outage and "end" not in outage
            if kind == "broker":
                broker.kill()
                await asyncio.sleep(1.0)
                await asyncio.to_thread(broker.start)
            else:
                serve.kill()
                await serve.wait()
                await serve.start()
            await watcher.poll()
            r.restarted_at, r.log_at_restart = time.monotonic(), len(watcher.logged)
            watcher.recoveries.append(r)

        async def outage_window() -> None:
            locked = asyncio.Event()
            holder = asyncio.create_task(hold_store_lock(db, OUTAGE_SECONDS, locked))
            await locked.wait()
            outage["start"] = time.monotonic()
            # events delivered now are redelivered after ack_wait while still uncommitted;
            # kill the service once those redeliveries are in, before the lock goes
            await sleep_until(outage["start"] + ACK_WAIT + 6.0)
            await kill("service")
            await holder
            outage["end"] = time.monotonic()

        await sleep_until(origin + 8)
        await kill("broker")
        await sleep_until(origin + 16)
        await kill("service")
        await sleep_until(origin + 24)
        await outage_window()  # until about origin + 64
        await sleep_until(origin + 72)
        await kill("broker")
        await sleep_until(origin + 81)
        await kill("service")
        await sleep_until(origin + 90)
        await kill("broker")
        await publishing

        # the final restart is done: wait until the log has every acknowledged event, or
        # until the broker has nothing left to deliver (then what is missing is lost)
        nc = await nats.connect(broker.url)
        js = nc.jetstream()
        deadline = time.monotonic() + 60
        idle_since = None
        while time.monotonic() < deadline:
            await watcher.poll()
            if set(publisher.acked) <= watcher.logged:
                break
            info = await js.consumer_info("MICROTUNE_EVENTS", "microtune-ingest")
            if info.num_pending == 0 and info.num_ack_pending == 0:
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > 3:
                    break
            else:
                idle_since = None
            await asyncio.sleep(0.2)
        await nc.close()
        watching.cancel()
        serve.proc.send_signal(signal.SIGTERM)  # graceful: snapshots every live user
        figures["service_exit"] = await serve.wait(60)
        figures.update(
            wall_s=round(time.monotonic() - origin, 1),
            events_published=len(publisher.published),
            events_acknowledged=len(publisher.acked),
            publish_attempts=publisher.attempts,
            publisher_connection_errors=publisher.client_errors,
            broker_kills=sum(r.kind == "broker" for r in watcher.recoveries),
            service_kills=sum(r.kind == "service" for r in watcher.recoveries),
            service_kills_during_outage=sum(r.kind == "service" and r.during_outage
                                            for r in watcher.recoveries),
            outage_s=round(outage["end"] - outage["start"], 1),
            events_acknowledged_during_outage=sum(
                outage["start"] <= t <= outage["end"] for t in publisher.acked.values()),
            recoveries=[r.figures(origin) for r in watcher.recoveries],
            acked=sorted(publisher.acked), published=sorted(publisher.published),
        )

    try:
        asyncio.run(scenario())
    finally:
        if serve.proc is not None and serve.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                serve.kill()
        broker.stop()

    acked = {tuple(k) for k in figures.pop("acked")}
    published = {tuple(k) for k in figures.pop("published")}
    rows = read_log(db)
    logged = Counter((user, event_id) for user, _seq, event_id in rows)
    lost = sorted(acked - set(logged))
    doubled = sorted(k for k, n in logged.items() if n > 1)
    unpublished = sorted(set(logged) - published)
    seqs: dict[str, list[int]] = {}
    for user, seq, _event_id in rows:
        seqs.setdefault(user, []).append(seq)
    gaps = sorted(u for u, s in seqs.items() if sorted(s) != list(range(1, len(s) + 1)))
    verify = subprocess.run(
        [sys.executable, "-m", "adapters.cli", "replay", "--all", "--verify", "--store",
         str(db)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    figures.update(events_logged=len(rows), lost=len(lost), lost_sample=lost[:10],
                   doubled=len(doubled), users_with_seq_gaps=gaps,
                   logged_but_never_published=len(unpublished),
                   replay_verify_exit=verify.returncode)
    (tmp_path / "kill-loop.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))

    assert figures["broker_kills"] == 3 and figures["service_kills"] == 3
    assert figures["service_kills_during_outage"] >= 1
    assert figures["service_exit"] == 0
    assert not lost, f"{len(lost)} acknowledged events lost, e.g. {lost[:10]}"
    assert not doubled, f"{len(doubled)} events applied twice, e.g. {doubled[:10]}"
    assert not gaps, f"users whose seqs are not 1..n: {gaps}"
    assert not unpublished, f"logged events nobody published: {unpublished[:10]}"
    assert verify.returncode == 0, verify.stdout + verify.stderr
