"""Who may do what, as shipped: `microtune serve` on its embedded defaults, used by clients of
each role over real NATS; and the same permissions on an external server configured with
`microtune auth-config`."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import msgpack
import nats
import pytest
from nats.errors import Error as NatsError

from adapters import client
from adapters.embedded import EmbeddedNats, free_port
from events.errors import Rejected
from store import open_recorder

ROOT = Path(__file__).resolve().parents[1]
X = [1.0, 0.0, 0.0, 0.0]


def env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def login(auth: Path, role: str) -> dict[str, str]:
    values = env_file(auth / f"{role}.env")
    return {"user": values["MICROTUNE_NATS_USER"], "password": values["MICROTUNE_NATS_PASSWORD"]}


async def connect(url: str, errors: list | None = None, **options):
    async def on_error(exc):
        if errors is not None:
            errors.append(str(exc))
    return await nats.connect(url, error_cb=on_error, allow_reconnect=False, **options)


@pytest.fixture
def served(tmp_path):
    """`microtune serve` with no NATS URL: the embedded server, as shipped."""
    data = tmp_path / "data"
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "adapters.cli", "serve", "--data-dir", str(data), "--dim", "4",
         "--embedded-port", str(port), "--log-level", "warning"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    banner = [proc.stdout.readline()]
    while banner[-1] and "stop with Ctrl-C" not in banner[-1]:
        banner.append(proc.stdout.readline())
    assert "microtune is serving" in banner[0], banner
    yield f"nats://127.0.0.1:{port}", data, "".join(banner)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def test_the_embedded_default_grants_each_role_only_its_subjects(served):
    url, data, banner = served
    auth = data / "auth"
    assert str(auth) in banner and "publisher.env" in banner  # told how to log in
    assert stat.S_IMODE(auth.stat().st_mode) == 0o700
    for path in auth.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path

    async def scenario():
        # nobody gets in without a password
        with pytest.raises(NatsError):
            await connect(url)
        errors: list[str] = []
        pub = await connect(url, errors, **login(auth, "publisher"))
        js = pub.jetstream()
        await client.track(js, "ann", id="e1", t=1.0, kind="click", item="a", x=X)
        # admin-only kinds are refused on the events subject
        await js.publish("microtune.events.ann", msgpack.packb(
            {"v": 1, "id": "cb", "u": "ann", "t": 2.0, "k": "clear_bot"}))
        # a publisher may not erase users, write the catalog, or read rejected raw bytes
        with pytest.raises(NatsError):
            await pub.request("microtune.admin.forget", msgpack.packb({"u": "ann"}), timeout=1)
        with pytest.raises(NatsError):
            await client.upsert_items(js, {"a": X})
        with pytest.raises(NatsError):
            await js.stream_info("MICROTUNE_REJECTED")
        await asyncio.sleep(0.2)
        assert any("permissions violation" in e for e in errors), errors

        catalog = await connect(url, **login(auth, "catalog"))
        await client.upsert_items(catalog.jetstream(), {"b": [0.0, 1.0, 0.0, 0.0]})
        querier = await connect(url, **login(auth, "querier"))
        for _ in range(100):  # the upsert and the event are applied shortly
            try:
                ranking = await client.rank(querier, "ann", [("a", X), "b"])  # b: catalog
            except Rejected:  # b is not in the catalog yet
                ranking = None
            if ranking is not None and ranking.seq == 1:
                break
            await asyncio.sleep(0.05)
        assert ranking.items == ("a", "b") and ranking.seq == 1
        with pytest.raises(NatsError):  # a querier cannot publish events
            await client.track(querier.jetstream(), "ann", id="q1", t=3.0, kind="click",
                               item="a", x=X)

        # the admin reads the rejected stream: clear_bot was refused there, with the reason
        admin = await connect(url, **login(auth, "admin"))
        ajs = admin.jetstream()
        sub = await ajs.pull_subscribe("microtune.rejected", durable="ops")
        records = [msgpack.unpackb(m.data) for m in await sub.fetch(1, timeout=5)]
        assert records[0]["e"] == "forbidden" and records[0]["f"] == "k"
        # and may clear a bot verdict, with the admin token; the log says who
        token = env_file(auth / "admin.env")["MICROTUNE_ADMIN_TOKEN"]
        reply = await admin.request("microtune.admin.clear_bot", msgpack.packb(
            {"u": "ann", "tok": token, "why": "ticket-7"}), timeout=5)
        assert msgpack.unpackb(reply.data)["status"] == "applied"
        reply = await admin.request("microtune.admin.clear_bot", msgpack.packb(
            {"u": "ann", "tok": "not-the-token-at-all"}), timeout=5)
        assert msgpack.unpackb(reply.data)["e"] == "forbidden"
        for nc in (pub, catalog, querier, admin):
            await nc.close()

    asyncio.run(scenario())
    recorder = open_recorder(data / "microtune.db")
    logged = [msgpack.unpackb(r.body) for r in recorder.read("ann")]
    recorder.close()
    assert [e["k"] for e in logged] == ["click", "clear_bot"]
    assert logged[1]["by"] == "admin" and logged[1]["why"] == "ticket-7"


def test_the_operators_tools_use_the_admin_env_file(served):
    url, data, _banner = served
    admin = env_file(data / "auth" / "admin.env")

    def run(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "adapters.cli", *argv], cwd=ROOT,
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, **env})

    bare = {k: "" for k in admin}
    refused = run("forget", "--user", "ann", "--yes", "--nats-url", url, env=bare)
    assert refused.returncode == 2 and "MICROTUNE_ADMIN_TOKEN" in refused.stderr
    done = run("forget", "--user", "ann", "--yes", "--nats-url", url, env=admin)
    assert done.returncode == 0, done.stderr
    stats = run("stats", "--nats-url", url, "--store", str(data / "microtune.db"), "--json",
                env=admin)
    assert stats.returncode == 0, stats.stderr


def test_auth_config_for_an_external_server(tmp_path):
    """`microtune auth-config` writes a nats-server configuration and the roles' env files;
    a server started with it enforces the same permissions."""
    out = tmp_path / "auth"
    done = subprocess.run([sys.executable, "-m", "adapters.cli", "auth-config", "--out",
                           str(out), "--prefix", "shop"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    server = EmbeddedNats(tmp_path / "nats", config=out / "nats-server.conf").start()

    async def scenario():
        errors: list[str] = []
        pub = await connect(server.url, errors, **login(out, "publisher"))
        svc = await connect(server.url, **login(out, "service"))
        sub = await svc.subscribe("shop.events.>")
        await svc.flush()  # the subscription is on the server before anything is published
        await pub.publish("shop.events.ann", b"allowed")
        await pub.publish("shop.admin.forget", b"denied")
        await pub.publish("microtune.events.ann", b"another prefix: denied")
        await pub.flush()
        msg = await sub.next_msg(timeout=2)
        assert msg.data == b"allowed"
        await asyncio.sleep(0.2)
        assert sum("permissions violation" in e for e in errors) == 2, errors
        await pub.close()
        await svc.close()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()


def test_a_publisher_backfills_history_with_its_own_credentials(served, tmp_path):
    url, data, _banner = served
    history = tmp_path / "history.jsonl"
    history.write_text("".join(
        f'{{"v": 1, "id": "h{i}", "u": "hist", "t": {1_700_000_000 + 60 * i}, "k": "click", '
        f'"i": "a", "x": {X}}}\n' for i in range(5)))
    publisher = env_file(data / "auth" / "publisher.env")
    done = subprocess.run([sys.executable, "-m", "adapters.cli", "import-events", str(history),
                           "--nats-url", url], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **publisher})
    assert done.returncode == 0, done.stderr

    async def seq_of_hist() -> int:
        querier = await connect(url, **login(data / "auth", "querier"))
        for _ in range(100):
            ranking = await client.rank(querier, "hist", [("a", X)])
            if ranking.seq == 5:
                break
            await asyncio.sleep(0.05)
        await querier.close()
        return ranking.seq

    assert asyncio.run(seq_of_hist()) == 5


def test_serve_never_prints_a_store_password(server, pg_url, tmp_path):
    store = pg_url.replace("postgres@", "postgres:s3cret-pw@")  # trust auth ignores it
    proc = subprocess.Popen(
        [sys.executable, "-m", "adapters.cli", "serve", "--nats-url", server.url, "--store",
         store, "--data-dir", str(tmp_path / "data"), "--dim", "4", "--log-level", "info"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    banner = proc.stdout.readline()
    assert "microtune is serving" in banner and "***" in banner, banner
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "s3cret-pw" not in banner + out + err
