"""`microtune demo --experiment`, in-process against a real NATS server and SQLite store: the
control arm (no micro-adjustment) against the adjusted one, every ranking logged, every click
naming its exposure, and the report computed from the log."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from rich.console import Console

from actors import Microtune
from actors.experiments import analysis
from adapters import demo
from adapters.nats_service import Service, ServiceConfig
from events import TuningConfig
from events.codec import event_from_log

DIM = 16
# 16 users, 20 rounds: with the demo's seed (7) the arms end about 0.5 apart in mean
# agreement (control about +0.1: the segment model it ranks by learns the population's taste,
# each user's own included; adjusted about +0.65)
USERS, ROUNDS = 16, 20
# fixed: the assignment of users to arms hashes the experiment's name and the user ids
RUN = "seed7"  # 8 users in each arm
NAME = f"demo-adjustment-{RUN}"


def test_the_experiment_demo_shows_the_adjusted_arm_ahead_of_the_control(server, tmp_path):
    async def scenario():
        system = Microtune.open(tmp_path / "demo.db", TuningConfig(version=1, dim=DIM))
        service = Service(system, ServiceConfig())
        await service.start(server.url)
        out = io.StringIO()
        try:
            result = await demo.run_experiment(
                system, server.url, users=USERS, rounds=ROUNDS, dim=DIM, prefix="microtune",
                console=Console(file=out, width=160), pace=0.0, run=RUN)
            states = {user: system.state(user) for user in result.arm_of}
            rows = {user: list(system.recorder.read(user)) for user in result.arm_of}
            experiment = system.experiments.get(NAME)
            report = analysis.report(experiment, analysis.collect(system.recorder, experiment))
        finally:
            await service.stop()
        return result, states, rows, report, out.getvalue()

    result, states, rows, report, printed = asyncio.run(scenario())
    control, adjusted = result.arms[demo.CONTROL], result.arms[demo.ADJUSTED]

    # both arms got users, and every user is in one of them
    assert control.users and adjusted.users
    assert len(control.users) + len(adjusted.users) == USERS
    assert set(result.arms) == {demo.CONTROL, demo.ADJUSTED}
    assert set(result.arm_of) == {f"demo-{RUN}-{u}" for u in range(USERS)}

    # every ranking was logged as an exposure of the experiment, and named
    assert len(result.rankings) == USERS * ROUNDS
    assert all(r.log_error is None and r.rid for r in result.rankings)
    assert all(r.arm is not None and r.arm.experiment == NAME for r in result.rankings)
    assert result.settled
    for user, events in rows.items():
        logged = [event_from_log(r.body) for r in events]
        exposures = {e.rid for e in logged if e.kind == "exposure"}
        clicks = [e for e in logged if e.kind == "click"]
        assert len(exposures) == ROUNDS
        assert clicks and all(e.rid in exposures for e in clicks)  # every click names its rid
        # a human pace in event time: no bot verdict, nothing ignored
        assert states[user].hyg is not None and states[user].hyg.bot == ""
        assert states[user].hyg.ignored == 0

    # the effect the experiment exists to show: the adjusted arm ends agreeing more
    assert len(control.agreement) == len(adjusted.agreement) == ROUNDS
    assert adjusted.agreement[-1] > control.agreement[-1], (control.agreement,
                                                            adjusted.agreement)
    assert np.mean(adjusted.agreement[-3:]) > np.mean(control.agreement[-3:]) + 0.25
    assert adjusted.agreement[-1] > adjusted.agreement[0] + 0.3  # it learned

    # control users rank by the segment model and prior: their own weights never move;
    # adjusted users' do
    assert all(states[u].w.shape[0] == 0 and states[u].steps == 0 for u in control.users)
    assert all(states[u].w.shape[0] == DIM + 1 and states[u].steps > 0 for u in adjusted.users)
    assert all(np.linalg.norm(states[u].w) > 0 for u in adjusted.users)

    # the report, from the log: both arms with exposures, the sample-ratio check computed
    arms = {a["name"]: a for a in report["arms"]}
    assert set(arms) == {demo.CONTROL, demo.ADJUSTED}
    for name, trace in ((demo.CONTROL, control), (demo.ADJUSTED, adjusted)):
        assert arms[name]["users"] == len(trace.users)
        assert arms[name]["exposures"] == trace.exposures == len(trace.users) * ROUNDS
        # the live click-through is the report's: clicked exposures / exposures
        assert arms[name]["metrics"]["ctr"]["estimate"] == pytest.approx(trace.ctr[-1])
    assert report["srm"]["p_value"] is not None and not report["srm"]["mismatch"]
    assert report["experiment"]["status"] == "stopped"
    assert result.report is not None and result.report["arms"] == report["arms"]

    # what the demo printed: the arms and the report
    assert "CTR so far" in printed and "sample ratio" in printed
    assert f"experiment {NAME}" in printed
