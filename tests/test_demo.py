"""`microtune demo`: where it writes, what it prints when its output is not a terminal, and
what its "agreement" is. A real NATS server and a real SQLite store; the command line as a
subprocess with stdout a pipe, as `microtune demo | cat` runs it."""

from __future__ import annotations

import asyncio
import io
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
from helpers import canonical
from rich.console import Console

from actors import Microtune
from adapters import demo
from adapters.client import rank
from adapters.nats_service import Service, ServiceConfig
from events import Event, TuningConfig
from events.config import SegmentConfig
from store.catalog import read_items

DIM = 8
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # a terminal control sequence
ROUND = re.compile(r"^round (\d+)/(\d+): agreement of all (\d+) users: mean [+-]\d\.\d\d, "
                   r"quartiles ", re.M)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "adapters.cli", "demo", *args]


def _real_store(path) -> Microtune:
    """A store with a real user, alice, who clicked in segment default, and a real item
    `item0` (the name the demo's items once had). Hygiene off: her clicks learn at once,
    so the default segment model holds something the demo must not move."""
    config = TuningConfig(version=1, dim=DIM, segments={"default": SegmentConfig(hygiene=False)})
    system = Microtune.open(path, config)
    system.catalog.upsert([("item0", np.arange(DIM, dtype=float) / DIM)])
    rng = np.random.default_rng(3)
    system.track_many([Event(id=f"a{n}", user="alice", t=1000.0 + 7 * n,
                             kind="click" if n % 3 else "impression", item=f"real{n % 4}",
                             x=rng.normal(size=DIM)) for n in range(12)])
    return system


def test_a_demo_against_a_service_leaves_the_default_segment_and_real_users_alone(
        server, tmp_path):
    candidates = [("item0", np.arange(DIM, dtype=float) / DIM),
                  ("other", np.ones(DIM))]

    async def scenario():
        system = _real_store(tmp_path / "real.db")
        service = Service(system, ServiceConfig())
        await service.start(server.url)
        try:
            models = system.context.models
            before = {
                "model": models.weights("default", DIM).copy(),
                "items": models.item_biases("default", ["real0", "item0"]),
                "alice": canonical(system.state("alice")),
                "log": len(list(system.recorder.read("alice"))),
                "item0": system.catalog.get("item0").copy(),
            }
            import nats
            nc = await nats.connect(server.url)
            before["rank"] = (await rank(nc, "alice", candidates)).weights
            # the command line, stdout a pipe: a demo against a running service
            proc = await asyncio.create_subprocess_exec(
                *_cli("--nats-url", server.url, "--users", "4", "--rounds", "3",
                      "--pace", "0", "--dim", str(DIM)),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            after_rank = (await rank(nc, "alice", candidates)).weights
            await nc.close()
            after = {
                "model": models.weights("default", DIM).copy(),
                "items": models.item_biases("default", ["real0", "item0"]),
                "alice": canonical(system.state("alice")),
                "log": len(list(system.recorder.read("alice"))),
                "item0": system.catalog.get("item0").copy(),
                "rank": after_rank,
            }
            users = sorted(set(system.recorder.users()) - {"alice"})
            states = {user: system.state(user) for user in users}
            items = read_items(system.recorder)
            segment_models = {s: models.weights(s, DIM) for s in {s.segment for s in
                                                                   states.values()}}
        finally:
            await service.stop()
        return proc.returncode, out.decode(), err.decode(), before, after, states, items, \
            segment_models

    rc, out, err, before, after, states, items, segment_models = asyncio.run(scenario())
    assert rc == 0, err[-2000:]
    assert "Traceback" not in out + err

    # the banner says where it writes: the service, the segment, the users, the items
    segment = re.search(r"^  segment  (demo-\S+): this run's own", out, re.M).group(1)
    prefix = re.search(r"\(prefix (demo-\S+), new for this run\)", out).group(1)
    assert f"the service at {server.url}" in out
    assert "demo-item-0 … demo-item-199" in out
    assert segment == f"demo-{prefix.removeprefix('demo-').rstrip('-')}"

    # the default segment model, alice and her item: bit for bit as before
    assert np.array_equal(before["model"], after["model"])
    assert np.abs(before["model"]).sum() > 0  # there was something to move
    assert np.array_equal(before["items"], after["items"])
    assert before["alice"] == after["alice"] and before["log"] == after["log"]
    assert np.array_equal(before["item0"], after["item0"])
    assert before["rank"] == after["rank"]  # her scores did not change

    # the demo's users: under its prefix, in its segment, learned; its segment model learned
    assert sorted(states) == sorted(f"{prefix}{u}" for u in range(4))
    assert all(s.segment == segment and s.steps > 0 for s in states.values())
    assert set(segment_models) == {segment}
    assert segment_models[segment] is not None and np.abs(segment_models[segment]).sum() > 0
    # the catalog: alice's item and the demo's own items, nothing else
    assert set(items) - {"item0"} == {f"demo-item-{i}" for i in range(demo.ITEMS)}

    # piped: a plain line per round, whole, no terminal codes; agreement defined
    rounds = ROUND.findall(out)
    assert [(int(r), int(n), int(u)) for r, n, u in rounds] == [(1, 3, 4), (2, 3, 4), (3, 3, 4)]
    assert demo.AGREEMENT in out
    assert not ANSI.search(out)
    assert re.search(r"^mean agreement: first round [+-]\d\.\d\d, last round [+-]\d\.\d\d; "
                     r"improved since round 1: \d of 4 users$", out, re.M)


def test_a_run_refuses_users_that_already_have_events(server, tmp_path):
    ns = demo.namespace("twice")
    console = Console(file=io.StringIO(), width=120)

    async def scenario():
        system = Microtune.open(tmp_path / "demo.db", TuningConfig(version=1, dim=DIM))
        service = Service(system, ServiceConfig())
        await service.start(server.url)
        try:
            first = await demo.run_demo(server.url, users=2, rounds=1, dim=DIM,
                                        prefix="microtune", console=console, pace=0.0, ns=ns)
            logs = {u: len(list(system.recorder.read(u))) for u in first.history}
            with pytest.raises(demo.DemoError, match="already has"):
                await demo.run_demo(server.url, users=2, rounds=1, dim=DIM,
                                    prefix="microtune", console=console, pace=0.0, ns=ns)
            await asyncio.sleep(0.3)  # anything it had sent would be in by now
            again = {u: len(list(system.recorder.read(u))) for u in first.history}
        finally:
            await service.stop()
        return first, logs, again

    first, logs, again = asyncio.run(scenario())
    assert set(first.history) == {"demo-twice-0", "demo-twice-1"}
    assert all(n > 0 for n in logs.values()) and logs == again  # the refusal wrote nothing


def test_piped_demo_with_its_own_service_prints_a_line_per_round():
    # capture_output: stdout is a pipe, as in `microtune demo | cat`
    run = subprocess.run(_cli("--users", "3", "--rounds", "2", "--pace", "0"),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    assert "Traceback" not in out + run.stderr and not ANSI.search(out)
    assert re.search(r"^microtune demo: 3 simulated users, 2 rounds, against its own service "
                     r"at nats://\S+, into its own new store \S+demo\.db$", out, re.M)
    assert re.search(r"^  segment  default \(the store holds nothing but this demo\)$", out,
                     re.M)
    assert [m[0] for m in ROUND.findall(out)] == ["1", "2"]
    assert out.count(demo.AGREEMENT) == 1  # defined once, before the rounds
    assert "all 3 users: agreement" in out  # the final summary of every user


def test_ctrl_c_in_a_piped_demo_ends_with_one_line_and_130():
    proc = subprocess.Popen(_cli("--users", "2", "--rounds", "50", "--pace", "0.3"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stdout:  # plain lines arrive as the rounds go, not at the end
            lines.append(line)
            if line.startswith("round 1/50:"):
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in out + err
    assert out.rstrip().splitlines()[-1] == "microtune demo: interrupted"


def test_the_live_view_defines_agreement_and_sums_up_every_user(server, tmp_path):
    # a terminal of 26 lines: room for 6 user rows; the summary covers all 9 users
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=140, height=26)

    async def scenario():
        system = Microtune.open(tmp_path / "demo.db", TuningConfig(version=1, dim=DIM))
        service = Service(system, ServiceConfig())
        await service.start(server.url)
        try:
            return await demo.run_demo(server.url, users=9, rounds=2, dim=DIM,
                                       prefix="microtune", console=console, pace=0.0,
                                       ns=demo.namespace("live"))
        finally:
            await service.stop()

    result = asyncio.run(scenario())
    text = ANSI.sub("", out.getvalue())
    assert "Spearman rank correlation" in text and "+1 (served exactly in the order" in text
    assert "3 more users not shown; all users below" in text
    assert "all 9 users: agreement" in text
    assert f"improved since round 1 (now above first): {result.improved()} of 9 users" in text
    assert not ROUND.search(text)  # a terminal gets the live view, not the plain lines
    # the summary's numbers are those of every user's rounds
    last = [v[-1] for v in result.history.values()]
    assert len(last) == 9 and result.means[-1] == pytest.approx(np.mean(last))


def test_the_experiment_of_a_demo_in_its_own_segment_enrols_only_the_demo_users(
        server, tmp_path):
    ns = demo.namespace("exp")

    async def scenario():
        system = _real_store(tmp_path / "real.db")
        service = Service(system, ServiceConfig())
        await service.start(server.url)
        try:
            result = await demo.run_experiment(
                system, server.url, users=6, rounds=2, dim=DIM, prefix="microtune",
                console=Console(file=io.StringIO(), width=160), pace=0.0, ns=ns)
            experiment = system.experiments.get(f"demo-adjustment-{ns.run}")
            alice = system.state("alice")
        finally:
            await service.stop()
        return result, experiment, alice

    result, experiment, alice = asyncio.run(scenario())
    assert experiment.segment == ns.segment == "demo-exp"
    assert set(result.arm_of) == set(ns.users(6))
    assert set(result.arm_of.values()) <= {demo.CONTROL, demo.ADJUSTED}  # all enrolled
    assert all(r.arm is not None and r.arm.experiment == experiment.name
               for r in result.rankings)
    # the real user, in segment default: never covered, never given an arm
    assert alice.segment == "default" and not experiment.covers(alice.segment)
    assert alice.arm is None
