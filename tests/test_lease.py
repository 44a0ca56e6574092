"""One writer per store: a second `Microtune`, `microtune serve` or writing tool is refused,
naming the holder; readers go on beside it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from actors import Microtune
from adapters.cli import main
from adapters.embedded import EmbeddedNats, free_port
from events import Event, TuningConfig
from store.lease import LeaseHeld

ROOT = Path(__file__).resolve().parents[1]
CFG = TuningConfig(version=1, dim=3)
HELD = re.compile(
    r"the store (?P<store>.+) is held by microtune pid (?P<pid>\d+) on host (?P<host>\S+) "
    r"since (?P<since>\S+); stop it, or use --nats-url to go through it")


def click(user: str, event_id: str) -> Event:
    return Event(id=event_id, user=user, t=1_700_000_000.0, kind="click", item="a",
                 x=np.ones(3))


def test_a_second_writer_is_refused_until_the_first_closes(store_url):
    first = Microtune.open(store_url, CFG)
    try:
        assert first.track_many([click("ann", "e1")])[0].status == "applied"
        with pytest.raises(LeaseHeld) as refused:
            Microtune.open(store_url, CFG)
        held = HELD.fullmatch(str(refused.value))
        assert held, str(refused.value)
        assert int(held["pid"]) == os.getpid() and held["host"] == socket.gethostname()
        assert first.track_many([click("ann", "e2")])[0].seq == 2  # the first goes on
    finally:
        first.close()
    with Microtune.open(store_url, CFG) as second:
        assert second.track_many([click("ann", "e3")])[0].seq == 3


def test_writing_tools_refuse_and_reading_tools_work_while_the_store_is_held(
        store_url, tmp_path, capsys):
    with Microtune.open(store_url, CFG, snapshot_every=1) as mt:
        assert all(o.ok for o in mt.track_many([click("ann", f"e{i}") for i in range(4)]))
        mt.passivate_all()
        out = tmp_path / "users.jsonl"

        def run(*argv: str) -> tuple[int, str]:
            capsys.readouterr()
            code = main(list(argv))
            return code, " ".join(capsys.readouterr().err.split())  # rich wraps lines

        for argv in (["rollback", "--user", "ann", "--to-seq", "1"],
                     ["forget", "--user", "ann", "--yes"]):
            code, err = run(*argv, "--store", store_url)
            assert code == 2 and "is held by microtune pid" in err, err
            assert "use --nats-url to go through it" in err
        code, err = run("import", str(out), "--store", store_url)
        assert code == 2 and "is held by microtune pid" in err, err
        assert mt.state("ann").seq == 4  # nothing was changed
        for argv in (["replay", "--all"], ["replay", "--all", "--verify"],
                     ["replay", "--user", "ann", "--json"], ["debug", "--user", "ann"],
                     ["export", "--format", "jsonl", "--out", str(out)], ["stats"]):
            code, err = run(*argv, "--store", store_url)
            assert code == 0, (argv, err)
    code, err = run("rollback", "--user", "ann", "--to-seq", "1", "--store", store_url)
    assert code == 0, err  # once the writer is gone


def _serve(url: str | None, data_dir: Path, *extra: str) -> subprocess.Popen:
    args = ["--nats-url", url] if url else []
    return subprocess.Popen(
        [sys.executable, "-m", "adapters.cli", "serve", *args, "--data-dir", str(data_dir),
         "--dim", "3", "--log-level", "warning", *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_a_second_serve_on_the_same_data_dir_exits_2_with_one_line(tmp_path):
    data = tmp_path / "data"
    with EmbeddedNats(tmp_path / "nats") as server:
        first = _serve(server.url, data)
        try:
            line = first.stdout.readline()
            assert "microtune is serving" in line, line
            second = _serve(server.url, data)
            _out, err = second.communicate(timeout=60)
            assert second.returncode == 2, err
            lines = err.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in err, err
            assert lines[0].startswith("microtune serve: the store "), lines
            held = HELD.search(lines[0])
            assert held and int(held["pid"]) == first.pid, lines
            # without --nats-url it says so before starting an embedded server
            port = free_port()
            third = _serve(None, data, "--embedded-port", str(port))
            _out, err = third.communicate(timeout=60)
            assert third.returncode == 2 and HELD.search(err), err
            assert not _port_open(port) and not (data / "nats").exists()
        finally:
            first.send_signal(signal.SIGTERM)
            assert first.wait(60) == 0
        again = _serve(server.url, data)  # the store is free again
        try:
            line = again.stdout.readline()
            assert "microtune is serving" in line, (line, again.stderr.read())
        finally:
            again.send_signal(signal.SIGTERM)
            assert again.wait(60) == 0


def test_fleet_workers_share_the_store_and_exclude_a_single_writer(store_url):
    """A fleet's workers hold the lease together (the store fences each one's partitions);
    a single writer is refused while any holds it, and they are refused beside one."""
    from store import lease

    a = lease.acquire(store_url, shared=True)
    b = lease.acquire(store_url, shared=True)
    try:
        with pytest.raises(LeaseHeld, match="a fleet of microtune workers"):
            lease.acquire(store_url)
        a.release()
        with pytest.raises(LeaseHeld, match="a fleet of microtune workers"):
            lease.acquire(store_url)  # b still holds it
    finally:
        a.release()
        b.release()
    single = lease.acquire(store_url)
    try:
        with pytest.raises(LeaseHeld) as refused:
            lease.acquire(store_url, shared=True)
        assert HELD.fullmatch(str(refused.value)), str(refused.value)
    finally:
        single.release()
    lease.acquire(store_url, shared=True).release()
