"""A fleet of worker processes (adapters/fleet) on one nats-server and one store: every
partition owned exactly once, a worker killed with -9 mid-stream loses no acknowledged event
and doubles none, queries keep answering; a worker paused past its lease cannot write."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest

from adapters.client import rank, track
from adapters.embedded import EmbeddedNats
from adapters.fleet.supervisor import fleet_server_config
from adapters.fleet.worker import query_mapping
from events.partitions import partition_of
from store.recorder import open_recorder

ROOT = Path(__file__).resolve().parents[1]
DIM = 4
TTL = 2.0


@pytest.fixture
def fleet_server(tmp_path):
    config = tmp_path / "fleet.conf"
    config.write_text(fleet_server_config_without_auth())
    with EmbeddedNats(tmp_path / "nats", config=config) as server:
        yield server


def fleet_server_config_without_auth() -> str:
    text = fleet_server_config(Path("auth.conf"), "microtune", 16)
    return text.split("\n", 1)[1]  # the mapping alone: this server runs without users


def test_the_server_config_maps_queries_to_partitions(tmp_path):
    text = fleet_server_config(Path("../auth/nats-server.conf"), "microtune", 16)
    assert text.startswith('include "../auth/nats-server.conf"\n')
    assert "microtune.q.{{partition(16,1)}}.{{wildcard(1)}}" in text
    assert query_mapping("shop", 8) == {
        "shop.query.*": "shop.q.{{partition(8,1)}}.{{wildcard(1)}}"}


class Workers:
    def __init__(self, url: str, store: str, tmp_path: Path,
                 extra: list[str] | None = None) -> None:
        self.url, self.store, self.tmp = url, store, tmp_path
        self.extra = extra or []
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, name: str) -> None:
        log = open(self.tmp / f"{name}.log", "w")  # noqa: SIM115 - the child's
        env = {**os.environ, "MICROTUNE_METRICS_PORT": "0"}
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "adapters.cli", "serve", "--nats-url", self.url,
             "--store", self.store, "--worker-id", name, "--lease-ttl", str(TTL),
             "--dim", str(DIM), "--log-level", "info", "--log-format", "console",
             *self.extra],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def wait_joined(self, name: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while "joined the fleet" not in self.log(name):
            assert self.processes[name].poll() is None, self.log(name)[-3000:]
            assert time.monotonic() < deadline, self.log(name)[-3000:]
            time.sleep(0.1)

    async def join(self, nc, names: tuple[str, ...]) -> dict[int, str]:
        """Start workers one after another, each joined before the next, and wait until
        they share the partitions; the owners."""
        for name in names:
            self.start(name)
            await asyncio.to_thread(self.wait_joined, name)
        return await until_owned(nc, set(names))

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()


async def owners(nc) -> dict[int, str]:
    kv = await nc.jetstream().key_value("microtune_leases")
    held = {}
    from nats.js.errors import KeyNotFoundError, NoKeysError

    try:
        keys = await kv.keys()
    except NoKeysError:  # an empty bucket (no worker has written yet)
        return held
    for key in keys:
        if key.startswith("p."):
            with contextlib.suppress(KeyNotFoundError):  # released since the listing
                held[int(key[2:])] = (await kv.get(key)).value.decode()
    return held


async def until_owned(nc, workers: set[str], timeout: float = 30.0) -> dict[int, str]:
    """Every partition held, by exactly the given workers, in shares within one."""
    deadline = time.monotonic() + timeout
    while True:
        held = await owners(nc)
        shares = [list(held.values()).count(w) for w in workers]
        if len(held) == 16 and set(held.values()) == workers and max(shares) - min(shares) <= 1:
            return held
        assert time.monotonic() < deadline, held
        await asyncio.sleep(0.2)


def logs_of(store: str) -> dict[str, list[tuple[int, str]]]:
    recorder = open_recorder(store, upgrade=False)
    try:
        out: dict[str, list[tuple[int, str]]] = {}
        for user in recorder.users():
            out[user] = [(row.seq, row.event_id) for row in recorder.read(user)]
        return out
    finally:
        recorder.close()


def check_logs(store: str, sent: dict[str, list[str]]) -> None:
    """Every acknowledged event once, in a gap-free log per user."""
    logs = logs_of(store)
    assert set(logs) == set(sent)
    for user, ids in sent.items():
        seqs = [seq for seq, _ in logs[user]]
        assert seqs == list(range(1, len(seqs) + 1)), (user, seqs)
        assert sorted(i for _, i in logs[user]) == sorted(ids), user


async def wait_applied(store: str, total: int, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        recorder = open_recorder(store, upgrade=False)
        try:
            count = recorder.count_events()
        finally:
            recorder.close()
        if count >= total:
            return
        assert time.monotonic() < deadline, f"{count} of {total} events applied"
        await asyncio.sleep(0.3)


def click(user: str, i: int) -> dict:
    return {"id": f"e{i}", "t": 1.7e9 + i, "kind": "click", "item": f"i{i % 5}",
            "x": [float((i + len(user)) % 3)] * DIM}


def one_process_steps(store: Path, users: list[str], rounds: int) -> int:
    """The segment model's learning steps when one process learns the same stream."""
    import numpy as np

    from actors import Microtune
    from events import Event, TuningConfig

    with Microtune.open(store, TuningConfig(version=1, dim=DIM)) as mt:
        for i in range(rounds):
            mt.track_many([Event(user=u, **{**click(u, i), "x": np.array(click(u, i)["x"])})
                           for u in users])
        return mt.context.models.steps


class Asker:
    """Queries users in turn until stopped: how many were asked, how many failed, the longest
    time without an answer."""

    def __init__(self, nc, users: list[str], timeout: float = 1.0) -> None:
        self.nc, self.users, self.timeout = nc, users, timeout
        self.asked = self.failed = 0
        self.longest_gap = self.longest_wait = 0.0
        self.why: collections.Counter = collections.Counter()
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        last_ok, n = time.monotonic(), 0
        while not self._stop.is_set():
            user = self.users[n % len(self.users)]
            n += 1
            self.asked += 1
            asked = time.monotonic()
            try:
                await rank(self.nc, user, [("a", [1.0] * DIM), ("b", [0.0] * DIM)],
                           timeout=self.timeout)
                now = time.monotonic()
                self.longest_wait = max(self.longest_wait, now - asked)
                self.longest_gap = max(self.longest_gap, now - last_ok)
                last_ok = now
            except Exception as exc:
                self.failed += 1
                self.why[f"{type(exc).__name__}: {exc}"[:80]] += 1
            await asyncio.sleep(0.01)


def test_three_workers_one_killed_mid_stream_lose_and_double_nothing(fleet_server, tmp_path,
                                                                    store_url):
    store = store_url  # SQLite (one file, shared) and PostgreSQL
    workers = Workers(fleet_server.url, store, tmp_path)
    users = [f"user{n}" for n in range(48)]
    sent: dict[str, list[str]] = {u: [] for u in users}

    async def main() -> dict:
        nc = await nats.connect(fleet_server.url)
        js = nc.jetstream()
        for name in ("w0", "w1", "w2"):
            workers.start(name)
        for name in ("w0", "w1", "w2"):
            await asyncio.to_thread(workers.wait_joined, name)
        held = await until_owned(nc, {"w0", "w1", "w2"})
        assert sorted(list(held.values()).count(w) for w in ("w0", "w1", "w2")) == [5, 5, 6]

        asker = Asker(nc, users)
        asker.start()
        killed_at = None
        for i in range(30):  # rounds of one event per user, the kill in the middle
            for user in users:
                await track(js, user, **click(user, i))
                sent[user].append(f"e{i}")
            if i == 12:
                workers.processes["w1"].kill()  # kill -9, mid-stream
                killed_at = time.monotonic()
        await wait_applied(store, sum(len(v) for v in sent.values()))
        moved = await until_owned(nc, {"w0", "w2"})
        await asker.stop()
        await nc.close()
        return {"queries": asker, "killed_at": killed_at, "moved": moved, "held": held}

    try:
        result = asyncio.run(main())
    finally:
        workers.stop()
    check_logs(store, sent)
    w1_had = {p for p, w in result["held"].items() if w == "w1"}
    assert w1_had and all(result["moved"][p] in ("w0", "w2") for p in w1_had)
    # the store's epochs moved with them: a claim per move
    recorder = open_recorder(store, upgrade=False)
    try:
        leases = recorder.partition_leases()
    finally:
        recorder.close()
    assert all(leases[p][0] >= 2 and leases[p][1] in ("w0", "w2") for p in w1_had)
    # the segment model was learned from every worker's users: each worker added the others'
    # deltas (actors/segment_model.py), so the one checkpointed last counts their steps too
    recorder = open_recorder(store, upgrade=False)
    try:
        saved = recorder.segment_models()
    finally:
        recorder.close()
    from actors.state import decode_state

    steps = decode_state(saved["default"]).steps
    alone = one_process_steps(tmp_path / "alone.db", users, rounds=30)
    print(f"segment model steps in the checkpoint: {steps}, one process: {alone}")
    assert steps >= 0.9 * alone  # a worker alone would have about a third
    replay = subprocess.run([sys.executable, "-m", "adapters.cli", "replay", "--all",
                             "--verify", "--store", store], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    q = result["queries"]
    print(f"queries: {q.asked} asked, {q.failed} failed, longest gap {q.longest_gap:.2f} s; "
          f"{dict(q.why)}")
    assert q.asked - q.failed > 100


def test_a_worker_joining_and_one_leaving_rebalance_under_load(fleet_server, tmp_path,
                                                              store_url):
    """Two workers; a third joins mid-stream, then one of the first leaves (SIGTERM), while
    events and queries flow. Hand-offs, not lease expiry, move the partitions (a lease TTL
    longer than the test's waits), every partition ends owned once by the two left, nothing is
    lost or doubled, and queries keep being answered."""
    store = store_url
    workers = Workers(fleet_server.url, store, tmp_path, extra=["--lease-ttl", "30"])
    users = [f"user{n}" for n in range(48)]
    sent: dict[str, list[str]] = {u: [] for u in users}

    async def main() -> tuple[dict, dict, Asker]:
        nc = await nats.connect(fleet_server.url)
        js = nc.jetstream()
        for name in ("w0", "w1"):
            workers.start(name)
        for name in ("w0", "w1"):
            await asyncio.to_thread(workers.wait_joined, name)
        await until_owned(nc, {"w0", "w1"}, timeout=25.0)
        asker = Asker(nc, users, timeout=2.0)  # the client default
        asker.start()
        joined = left = None
        for i in range(30):
            for user in users:
                await track(js, user, **click(user, i))
                sent[user].append(f"e{i}")
            if i == 8:
                workers.start("w2")
                await asyncio.to_thread(workers.wait_joined, "w2")
                joined = await until_owned(nc, {"w0", "w1", "w2"}, timeout=25.0)
            if i == 18:
                workers.processes["w0"].terminate()  # a graceful leave
                left = await until_owned(nc, {"w1", "w2"}, timeout=25.0)
        await wait_applied(store, sum(len(v) for v in sent.values()))
        await asker.stop()
        await nc.close()
        return joined, left, asker

    try:
        joined, left, asker = asyncio.run(main())
        assert workers.processes["w0"].wait(30) == 0, workers.log("w0")[-3000:]
    finally:
        workers.stop()
    # the leaver handed off every partition it held, and nothing went wrong on the way
    w0_had = sorted(p for p, w in joined.items() if w == "w0")
    w0_log = workers.log("w0")
    handed = {int(re.search(r"partition=(\d+)", line).group(1))
              for line in w0_log.splitlines() if "fleet.partition_handed_off" in line}
    assert set(w0_had) <= handed, (w0_had, handed, w0_log[-3000:])
    assert all(left[p] in ("w1", "w2") for p in w0_had)
    for name in ("w0", "w1", "w2"):
        text = workers.log(name)
        for trouble in ("rebalance_failed", "hand_off_failed", "never retrieved",
                        "leases.lost", "user_actor.fenced"):
            assert trouble not in text, (name, trouble, text[-3000:])
    check_logs(store, sent)
    replay = subprocess.run([sys.executable, "-m", "adapters.cli", "replay", "--all",
                             "--verify", "--store", store], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    print(f"queries: {asker.asked} asked, {asker.failed} failed, longest gap "
          f"{asker.longest_gap:.2f} s, longest wait {asker.longest_wait:.2f} s; "
          f"{dict(asker.why)}")
    assert asker.asked - asker.failed > 100
    assert asker.failed <= 0.01 * asker.asked  # a hand-off: queries wait a moment


def test_a_joining_worker_starts_from_the_fleets_segment_models(fleet_server, tmp_path):
    """A worker that joins takes the segment models from a running worker, not from the
    store's last checkpoint (up to 30 s old, or none): a new user scores alike on both."""
    store = str(tmp_path / "mt.db")
    workers = Workers(fleet_server.url, store, tmp_path, extra=["--lease-ttl", "30"])
    users = [f"user{n}" for n in range(24)]
    candidates = [("a", [1.0, 0.0, 0.0, 0.0]), ("b", [0.0, 1.0, 1.0, 0.0])]

    async def main() -> tuple[dict, dict]:
        nc = await nats.connect(fleet_server.url)
        js = nc.jetstream()
        workers.start("w0")
        await asyncio.to_thread(workers.wait_joined, "w0")
        for i in range(6):  # the segment model learns: clicks on features 1 and 2
            for user in users:
                await track(js, user, id=f"e{i}", t=1.7e9 + i, kind="click", item="b",
                            x=[0.0, 1.0, 1.0, 0.0])
        await wait_applied(store, 6 * len(users))
        workers.start("w1")
        await asyncio.to_thread(workers.wait_joined, "w1")
        held = await until_owned(nc, {"w0", "w1"}, timeout=25.0)
        newcomers: dict[str, str] = {}  # worker -> a user it holds that has no events
        for n in range(1000):
            newcomers.setdefault(held[partition_of(f"new{n}", 16)], f"new{n}")
            if len(newcomers) == 2:
                break
        answers = {w: await rank(nc, user, candidates) for w, user in newcomers.items()}
        await nc.close()
        return ({w: dict(zip(a.items, a.scores, strict=True)) for w, a in answers.items()},
                newcomers)

    try:
        scores, newcomers = asyncio.run(main())
    finally:
        workers.stop()
    print(f"a new user's scores: {scores} ({newcomers})")
    assert scores["w0"]["b"] > scores["w0"]["a"] + 0.1  # w0's segment model learned
    for item in ("a", "b"):
        assert abs(scores["w1"][item] - scores["w0"][item]) < 1e-6, scores


def test_stats_sum_every_worker_and_experiments_reach_every_worker(fleet_server, tmp_path):
    """`admin.stats`, which one worker answers, counts the whole fleet: each worker's own
    counters beside their sums. An experiment written to the store by another writer (its
    `changed` notice lost, as in a disconnection) reaches every worker within a renewal."""
    import msgpack

    from actors.configs import ConfigRegistry
    from actors.experiments.registry import ExperimentRegistry
    from events import TuningConfig

    store = str(tmp_path / "mt.db")
    workers = Workers(fleet_server.url, store, tmp_path)
    users = [f"user{n}" for n in range(20)]

    async def stats(nc) -> dict:
        reply = await nc.request("microtune.admin.stats", b"", timeout=10)
        return msgpack.unpackb(reply.data, raw=False)

    async def main() -> tuple[dict, dict]:
        nc = await nats.connect(fleet_server.url)
        js = nc.jetstream()
        await workers.join(nc, ("w0", "w1"))
        for i in range(3):
            for user in users:
                await track(js, user, **click(user, i))
        await wait_applied(store, 3 * len(users))
        counted = await stats(nc)
        recorder = open_recorder(store, upgrade=False)
        try:
            ExperimentRegistry(recorder).start(
                "elsewhere", [("a", "current"), ("b", "no-adjust")],
                ConfigRegistry(recorder, TuningConfig(version=1, dim=DIM)), by="test")
        finally:
            recorder.close()
        deadline = time.monotonic() + 10 * TTL
        while True:
            seen = await stats(nc)
            running = {w: m["experiments_running"] for w, m in seen["by_worker"].items()}
            if all("elsewhere" in names for names in running.values()):
                break
            assert time.monotonic() < deadline, running
            await asyncio.sleep(0.2)
        await nc.close()
        return counted, seen

    try:
        counted, seen = asyncio.run(main())
    finally:
        workers.stop()
    assert counted["fleet"] == {"workers": 2, "answered": ["w0", "w1"], "missing": []}
    by_worker = counted["by_worker"]
    assert counted["applied"] == 60 == sum(w["applied"] for w in by_worker.values())
    assert all(w["applied"] > 0 for w in by_worker.values())  # each its own share
    assert counted["live_actors"] == sum(w["live_actors"] for w in by_worker.values())
    assert sorted(p for w in by_worker.values() for p in w["fleet_worker"]["serving"]) == list(
        range(16))
    assert seen["experiments_running"] == ["elsewhere"]


def test_a_worker_paused_past_its_lease_cannot_write(fleet_server, tmp_path):
    store = str(tmp_path / "fleet.db")
    workers = Workers(fleet_server.url, store, tmp_path)
    users = [f"user{n}" for n in range(32)]
    sent: dict[str, list[str]] = {u: [] for u in users}

    async def main() -> tuple[dict, dict]:
        nc = await nats.connect(fleet_server.url)
        js = nc.jetstream()
        held = await workers.join(nc, ("a", "b"))
        for user in users:
            await track(js, user, id="e0", t=1.7e9, kind="click", item="i", x=[1.0] * DIM)
            sent[user].append("e0")
        await wait_applied(store, len(users))
        workers.processes["a"].send_signal(signal.SIGSTOP)  # paused: no renewal, no write
        moved = await until_owned(nc, {"b"}, timeout=TTL * 10)
        for user in users:  # b applies these, a is still paused
            await track(js, user, id="e1", t=1.7e9 + 1, kind="click", item="i", x=[0.0] * DIM)
            sent[user].append("e1")
        await wait_applied(store, 2 * len(users))
        workers.processes["a"].send_signal(signal.SIGCONT)  # a resumes: its leases are gone
        deadline = time.monotonic() + 30
        while "fleet.partition_lost" not in workers.log("a"):
            assert time.monotonic() < deadline, workers.log("a")[-3000:]
            await asyncio.sleep(0.2)
        after = await until_owned(nc, {"a", "b"})  # and it joins again, with new claims
        await nc.close()
        return held, {"moved": moved, "after": after}

    try:
        held, _result = asyncio.run(main())
    finally:
        workers.stop()
    check_logs(store, sent)
    a_had = {p for p, w in held.items() if w == "a"}
    assert a_had
    assert {partition_of(u, 16) for u in users} & a_had  # a held users that got events


def test_serve_workers_2_on_embedded_defaults(tmp_path):
    """The README's `make serve` path with two workers: the fleet starts, serves a query
    and an event, and stops on SIGTERM."""
    env = {**os.environ, "MICROTUNE_METRICS_PORT": "0"}
    from adapters.embedded import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "adapters.cli", "serve", "--workers", "2", "--data-dir",
         str(tmp_path / "data"), "--embedded-port", str(port), "--dim", str(DIM),
         "--log-level", "warning"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 90
        while sum("joined the fleet" in line for line in lines) < 2:
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
            lines.append(proc.stdout.readline())

        async def use() -> None:
            from adapters.auth import ensure_credentials

            creds = ensure_credentials(tmp_path / "data" / "auth")
            pub = await nats.connect(f"nats://127.0.0.1:{port}",
                                     **creds.connect_options("publisher"))
            query = await nats.connect(f"nats://127.0.0.1:{port}",
                                       **creds.connect_options("querier"))
            ack = await track(pub.jetstream(), "ann", id="e1", t=1.7e9, kind="click",
                              item="a", x=[1.0] * DIM)
            assert ack.seq >= 1
            ranking = await rank(query, "ann", [("a", [1.0] * DIM)], min_seq=1, timeout=10)
            assert ranking.seq == 1
            await pub.close()
            await query.close()

        asyncio.run(use())
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, "".join(lines) + out


def test_a_three_node_cluster_loses_a_node_mid_stream(tmp_path):
    """Three nats-servers in a cluster, the streams and leases at R3, three workers; one
    node killed with -9 mid-stream: every acknowledged event once, gap-free, verified."""
    from adapters.embedded import free_port

    ports = [free_port() for _ in range(3)]
    routes = [free_port() for _ in range(3)]
    nodes = []
    for i in range(3):
        config = tmp_path / f"n{i}.conf"
        others = ", ".join(f'"nats://127.0.0.1:{p}"' for j, p in enumerate(routes) if j != i)
        config.write_text(f"server_name: n{i}\n"
                          f'cluster {{ name: mt, listen: "127.0.0.1:{routes[i]}", '
                          f"routes: [{others}] }}\n" + fleet_server_config_without_auth())
        nodes.append(EmbeddedNats(tmp_path / f"n{i}", port=ports[i], config=config).start())
    urls = ",".join(f"nats://127.0.0.1:{p}" for p in ports)
    store = str(tmp_path / "cluster.db")
    # leases outlive a leader election of the cluster's KV (a few seconds)
    workers = Workers(urls, store, tmp_path, extra=["--stream-replicas", "3", "--lease-ttl", "8"])
    users = [f"user{n}" for n in range(30)]
    sent: dict[str, list[str]] = {u: [] for u in users}

    async def main() -> None:
        nc = await nats.connect(urls.split(","))
        js = nc.jetstream()
        deadline = time.monotonic() + 60
        while True:  # the cluster's JetStream has a leader: an R3 stream can be made
            try:
                await js.add_stream(name="probe", subjects=["probe"], num_replicas=3)
                await js.delete_stream("probe")
                break
            except Exception:
                assert time.monotonic() < deadline, "no JetStream cluster"
                await asyncio.sleep(0.5)
        for name in ("w0", "w1", "w2"):
            workers.start(name)
        for name in ("w0", "w1", "w2"):
            await asyncio.to_thread(workers.wait_joined, name)
        await until_owned(nc, {"w0", "w1", "w2"})
        info = await js.stream_info("MICROTUNE_EVENTS")
        assert info.config.num_replicas == 3
        for i in range(20):
            for user in users:
                while True:  # a publish the cluster did not acknowledge is published again
                    try:
                        await track(js, user, **click(user, i))
                        break
                    except Exception:
                        await asyncio.sleep(0.2)
                if i == 8 and user == users[0]:
                    nodes[1].kill()  # kill -9 of a node mid-stream
                sent[user].append(f"e{i}")
        await wait_applied(store, sum(len(v) for v in sent.values()), timeout=120)
        await nc.close()

    try:
        asyncio.run(main())
    finally:
        workers.stop()
        for node in nodes:
            node.stop()
    check_logs(store, sent)
    replay = subprocess.run([sys.executable, "-m", "adapters.cli", "replay", "--all",
                             "--verify", "--store", store], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert replay.returncode == 0, replay.stdout + replay.stderr


def test_workers_stop_when_their_supervisor_is_killed(tmp_path):
    """kill -9 of `serve --workers 2` leaves no worker running (holding leases), and no
    embedded nats-server holding its port and its JetStream store."""
    from adapters.embedded import free_port

    env = {**os.environ, "MICROTUNE_METRICS_PORT": "0"}
    out = tmp_path / "serve.log"  # a file: the orphans write after nobody reads a pipe
    with out.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "adapters.cli", "serve", "--workers", "2", "--data-dir",
             str(tmp_path / "data"), "--embedded-port", str(free_port()), "--dim", str(DIM),
             "--log-level", "warning"], cwd=ROOT, env=env, stdout=log,
            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while out.read_text(errors="replace").count("joined the fleet") < 2:
        assert time.monotonic() < deadline and proc.poll() is None, out.read_text()
        time.sleep(0.1)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                              text=True).stdout.split()
    workers = [int(pid) for pid in children
               if "adapters.cli" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")]
    servers = [int(pid) for pid in children
               if "nats-server" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")]
    assert len(workers) == 2 and len(servers) == 1
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 60
    try:
        while any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in workers):
            assert time.monotonic() < deadline, "a worker outlived its supervisor"
            time.sleep(0.2)
        while Path(f"/proc/{servers[0]}").exists() and "Z" not in _state(servers[0]):
            assert time.monotonic() < deadline, "the embedded nats-server outlived serve"
            time.sleep(0.2)
    finally:
        subprocess.run(["pkill", "-9", "-f", str(tmp_path / "data" / "nats")])
    # the orphans said so in structured lines, not a traceback per reconnect attempt
    assert "nats: encountered error" not in out.read_text(errors="replace")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return "Z"
