"""Exposures and experiments end to end, through a real NATS server: a logged query's
exposure reaches the user's log before its rid is handed out, outcomes name it, the query
processes rank by the arm, and experiments are changed only with an admin token."""

from __future__ import annotations

import asyncio

import msgpack
import nats
from helpers import until

from actors import Microtune
from actors.experiments import analysis
from adapters import client
from adapters.nats_service import Service, ServiceConfig
from events import SegmentConfig, TuningConfig
from events.codec import event_from_log
from events.types import EXPOSURE

DIM = 4
# no segment model: a control user's scores are then exactly the prior's (zeros)
CFG = TuningConfig(version=1, dim=DIM, segments={"default": SegmentConfig(
    segment_model=False, hygiene=False)})
ITEMS = [(f"i{k}", [float(k == j) for j in range(DIM)]) for k in range(DIM)]
TOKEN = "t0ken-for-the-ops-team-0123456789"


async def _admin(nc, command: str, body: dict) -> dict:
    reply = await nc.request(f"microtune.admin.{command}", msgpack.packb(body), timeout=10)
    return msgpack.unpackb(reply.data)


def test_logged_queries_outcomes_and_arms_through_nats(server, tmp_path):
    async def scenario():
        system = Microtune.open(tmp_path / "mt.db", CFG)
        service = Service(system, ServiceConfig(admin_tokens={"ops-team": TOKEN}))
        await service.start(server.url)
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        try:
            start = {"op": "start", "name": "adj",
                     "arms": [["control", "no-adjust"], ["adjusted", "current"]]}
            refused = await _admin(nc, "experiment", start)  # no token
            assert refused["e"] == "forbidden" and system.experiments.all() == []
            started = await _admin(nc, "experiment", {**start, "tok": TOKEN, "why": "t-1"})
            assert started["experiment"]["arms"][0][0] == "control"
            listed = await _admin(nc, "experiments", {})  # read-only: no token needed
            assert [e["name"] for e in listed["experiments"]] == ["adj"]

            users = [f"u{k}" for k in range(10)]
            rids = {}
            for user in users:
                ranking = await client.rank(nc, user, ITEMS, log=True, t=1000.0, timeout=10)
                assert ranking.rid and ranking.log_error is None
                # the query process ranked by the arm of an experiment started after it was
                assert ranking.arm is not None and ranking.arm.experiment == "adj"
                rids[user] = ranking
            # the exposure is in each user's log, with the arm the service stamped
            await until(lambda: system.journal.stats.events >= len(users),
                        what="the exposures committed")
            for user, ranking in rids.items():
                (row,) = system.recorder.read(user)
                logged = event_from_log(row.body)
                assert logged.kind == EXPOSURE and logged.rid == ranking.rid
                assert logged.arm == ranking.arm
                assert logged.exposure.items == ranking.items
            # outcomes name their exposures; the users learn, each by its arm
            for n in range(6):
                for user in users:
                    item = rids[user].items[0]
                    await client.track(js, user, id=f"c{n}", t=1010.0 + n, kind="click",
                                       item=item, x=dict(ITEMS)[item], rid=rids[user].rid)
            await until(lambda: service.stats.applied >= len(users) * 7,
                        what="the clicks applied")
            arms = {}
            for user in users:
                after = await client.rank(nc, user, ITEMS, min_seq=7, timeout=10)
                arms.setdefault(rids[user].arm.name, []).append(after)
            assert set(arms) == {"control", "adjusted"}
            for ranking in arms["control"]:  # no micro-adjustment: the prior's zeros
                assert set(ranking.scores) == {0.0}
            for ranking in arms["adjusted"]:
                assert max(ranking.scores) > 0.1
            await until(lambda: service.query_stats().get("exposures") == len(users),
                        what="the query process counting the exposures it stored")

            report = analysis.report(system.experiments.get("adj"),
                                     analysis.collect(system.recorder,
                                                      system.experiments.get("adj")))
            assert {a["name"]: a["exposures"] for a in report["arms"]} == {
                "control": len(arms["control"]), "adjusted": len(arms["adjusted"])}
            assert all(a["metrics"]["ctr"]["estimate"] == 1.0 for a in report["arms"])

            stopped = await _admin(nc, "experiment", {"op": "stop", "name": "adj",
                                                      "tok": TOKEN})
            assert stopped["experiment"]["status"] == "stopped"
            user = next(u for u in users if rids[u].arm.name == "control")
            # the query process learns of the stop from the feed: the next logged ranking
            # has no arm (the user ranks by the current config again)
            for _ in range(100):
                again = await client.rank(nc, user, ITEMS, log=True, timeout=10)
                if again.arm is None:
                    break
            assert again.arm is None and again.rid
        finally:
            await nc.close()
            await service.stop()
            system.close()

    asyncio.run(scenario())


def test_an_exposure_that_cannot_be_stored_gets_no_rid_and_says_why(server, tmp_path):
    """No rid is handed out for an exposure that is not kept: with the events stream gone,
    the ranking still comes (the page must render) but names no rid, and says why."""
    async def scenario():
        system = Microtune.open(tmp_path / "mt.db", CFG)
        service = Service(system, ServiceConfig())
        await service.start(server.url)
        nc = await nats.connect(server.url)
        try:
            ok = await client.rank(nc, "ann", ITEMS, log=True, timeout=10)
            assert ok.rid is not None
            await service.stop_consuming()
            await nc.jetstream().delete_stream("MICROTUNE_EVENTS")
            lost = await client.rank(nc, "ann", ITEMS, log=True, timeout=10)
            assert lost.rid is None and "could not be stored" in lost.log_error
            assert lost.items == ok.items
            await until(lambda: service.query_stats().get("exposures_failed") == 1,
                        what="the failed exposure counted")
        finally:
            await nc.close()
            await service.stop()
            system.close()

    asyncio.run(scenario())


def test_a_segment_that_logs_every_ranking_does_so_through_the_query_process(server,
                                                                            tmp_path):
    cfg = TuningConfig(version=1, dim=DIM, segments={"default": SegmentConfig(
        segment_model=False, log_exposures=True)})

    async def scenario():
        system = Microtune.open(tmp_path / "mt.db", cfg)
        service = Service(system, ServiceConfig())
        await service.start(server.url)
        nc = await nats.connect(server.url)
        try:
            ranking = await client.rank(nc, "ann", ITEMS, timeout=10)  # no `l`
            assert ranking.rid is not None
            await until(lambda: len(list(system.recorder.read("ann"))) == 1,
                        what="the exposure committed")
            (row,) = system.recorder.read("ann")
            assert event_from_log(row.body).rid == ranking.rid
        finally:
            await nc.close()
            await service.stop()
            system.close()

    asyncio.run(scenario())
