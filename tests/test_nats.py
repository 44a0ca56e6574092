"""The NATS adapter against real nats-server processes (started here, on free ports)."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import msgpack
import nats
import numpy as np
import pytest
from helpers import start_service, until

from actors import decode_state, encode_state, replay_user
from actors.configs import ConfigRegistry
from adapters.embedded import EmbeddedNats
from events import TuningConfig
from events.codec import event_from_log as decode_event
from store import open_recorder

DIM = 4
CFG = TuningConfig(version=1, dim=DIM)
ROOT = Path(__file__).resolve().parents[1]



def body(user: str, event_id: str, t: float, kind: str = "click", item: str = "a",
         x=(1.0, 0.0, 0.0, 0.0), **extra) -> bytes:
    return msgpack.packb({"v": 1, "id": event_id, "u": user, "t": t, "k": kind, "i": item,
                          "x": list(x), **extra})



async def running(tmp_path, url, **service_kw):
    return await start_service(tmp_path, url, CFG, **service_kw)


def test_same_event_id_twice_is_applied_once(server, tmp_path):
    async def scenario():
        system, service = await running(tmp_path, server.url)
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        for _ in range(2):  # no Nats-Msg-Id header: JetStream keeps both, microtune must not
            await js.publish("microtune.events.ann", body("ann", "e1", 100.0))
        await js.publish("microtune.events.ann", body("ann", "e2", 160.0))
        await until(lambda: service.stats.applied + service.stats.duplicates == 3)
        assert service.stats.applied == 2 and service.stats.duplicates == 1
        assert [r.event_id for r in system.recorder.read("ann")] == ["e1", "e2"]
        await nc.close()
        await service.stop()

    asyncio.run(scenario())


def test_bad_input_is_rejected_with_reasons_and_the_service_goes_on(server, tmp_path):
    async def scenario():
        _system, service = await running(tmp_path, server.url)
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        bad = {
            "malformed": (b"\xc1garbage", "ann"),
            "oversize": (body("ann", "big", 1.0, pad="x" * 70_000), "ann"),
            "wrong_type": (body("ann", "wt", "yesterday"), "ann"),
            "not_finite": (body("ann", "nan", 1.0, x=(math.nan, 0, 0, 0)), "ann"),
            "invalid_id": (body("bob", "wu", 1.0), "ann"),  # body says bob, subject says ann
            "unknown_kind": (body("ann", "uk", 1.0, kind="teleport"), "ann"),
            "dimension": (body("ann", "dim", 1.0, x=(1.0, 2.0)), "ann"),
        }
        for raw, subject_user in bad.values():
            await js.publish(f"microtune.events.{subject_user}", raw)
        await js.publish("microtune.events.ann", msgpack.packb(
            {"v": 1, "id": "noitem", "u": "ann", "t": 1.0, "k": "click", "i": "unknown"}))
        await js.publish("microtune.events.ann", body("ann", "good", 5.0))
        await until(lambda: sum(service.stats.rejected.values()) == len(bad) + 1
                    and service.stats.applied == 1, what="all rejections")
        assert set(service.stats.rejected) == set(bad) | {"missing_field"}

        # every rejection is on the rejected stream, with its reason and the raw bytes
        sub = await js.pull_subscribe("microtune.rejected", durable="test-reader")
        records = [msgpack.unpackb(m.data) for m in await sub.fetch(len(bad) + 1, timeout=5)]
        by_reason = {r["e"]: r for r in records}
        assert set(by_reason) == set(bad) | {"missing_field"}
        assert by_reason["malformed"]["raw"] == b"\xc1garbage"

        # a bad query gets an error reply with the reason; a good one is answered
        reply = await nc.request("microtune.query.ann", b"\x00\x01", timeout=2)
        assert msgpack.unpackb(reply.data)["e"] == "malformed"
        reply = await nc.request("microtune.query.ann", msgpack.packb(
            {"v": 1, "c": [["a", [1, 0, 0, 0]], ["b", [0, 1, 0, 0]]]}), timeout=2)
        answer = msgpack.unpackb(reply.data)
        assert answer["i"] == ["a", "b"] and answer["q"] == 1
        await nc.close()
        await service.stop()

    asyncio.run(scenario())


def test_burst_far_beyond_max_ack_pending_stays_bounded_and_is_all_applied(server, tmp_path):
    async def scenario():
        system, service = await running(tmp_path, server.url, max_ack_pending=100)
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        total = 4000
        peak = 0

        async def watch():
            nonlocal peak
            while True:
                peak = max(peak, service._in_flight)
                await asyncio.sleep(0)

        watcher = asyncio.create_task(watch())
        futures = [await js.publish_async(f"microtune.events.u{i % 50}",
                                          body(f"u{i % 50}", f"e{i}", float(i)))
                   for i in range(total)]
        await asyncio.gather(*futures)
        await until(lambda: service.stats.applied == total, timeout=60, what="the burst")
        watcher.cancel()
        assert system.recorder.count_events() == total
        assert 0 < peak <= 100, f"in flight peaked at {peak}"
        await nc.close()
        await service.stop()

    asyncio.run(scenario())


def test_broker_killed_and_restarted_loses_no_acknowledged_event(tmp_path):
    server = EmbeddedNats(tmp_path / "nats").start()

    async def scenario():
        system, service = await running(tmp_path, server.url)
        nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        js = nc.jetstream()
        acknowledged: set[str] = set()
        for i in range(600):
            if i == 300:
                server.kill()  # kill -9 in the middle of the stream
                await asyncio.sleep(0.3)
                server.start()
            while True:
                try:
                    await js.publish(f"microtune.events.u{i % 7}",
                                     body(f"u{i % 7}", f"e{i}", float(i)), timeout=1,
                                     headers={"Nats-Msg-Id": f"u{i % 7}.e{i}"})
                    acknowledged.add(f"e{i}")
                    break
                except Exception:  # not acknowledged: the publisher retries, as it should
                    await asyncio.sleep(0.1)
        await until(lambda: system.recorder.count_events() >= len(acknowledged), timeout=60,
                    what="all acknowledged events in the log")
        logged = [r.event_id for r in system.recorder.read_all()]
        assert len(logged) == len(set(logged)), "an event was applied twice"
        assert acknowledged <= set(logged), "an acknowledged event was lost"
        await nc.close()
        await service.stop()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()


def _serve(url: str, data_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "adapters.cli", "serve", "--nats-url", url,
         "--data-dir", str(data_dir), "--dim", str(DIM), "--log-level", "warning"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    line = proc.stdout.readline()
    assert "microtune is serving" in line, line
    return proc


def test_service_killed_mid_batch_and_restarted_loses_nothing_doubles_nothing(server, tmp_path):
    data = tmp_path / "svc"
    proc = _serve(server.url, data)
    total = 6000

    async def publish_and_kill():
        nc = await nats.connect(server.url)
        js = nc.jetstream()

        async def publish():
            futures = [await js.publish_async(f"microtune.events.u{i % 20}",
                                              body(f"u{i % 20}", f"e{i}", float(i)))
                       for i in range(total)]
            await asyncio.gather(*futures)

        publishing = asyncio.create_task(publish())
        recorder = open_recorder(data / "microtune.db")
        await until(lambda: recorder.count_events() > 200, what="some progress")
        os.kill(proc.pid, signal.SIGKILL)  # in the middle of the stream
        proc.wait()
        done_before = recorder.count_events()
        await publishing  # the broker keeps everything the service did not ack
        recorder.close()
        await nc.close()
        return done_before

    done_before = asyncio.run(publish_and_kill())
    assert done_before < total, "the kill came too late to test anything"
    proc = _serve(server.url, data)  # JetStream redelivers what was not acked
    recorder = open_recorder(data / "microtune.db")
    deadline = time.monotonic() + 60
    while recorder.count_events() < total:
        assert time.monotonic() < deadline, recorder.count_events()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # graceful: snapshots every live user
    assert proc.wait(30) == 0
    configs = ConfigRegistry(recorder, CFG)
    for u in range(20):
        user = f"u{u}"
        assert [r.seq for r in recorder.read(user)] == list(range(1, total // 20 + 1))
        live = recorder.latest_snapshot(user)
        replayed = replay_user(recorder, configs, user, use_snapshots=False)
        assert live.seq == replayed.seq
        assert live.state == encode_state(replayed)
        assert decode_state(live.state).seq == total // 20
    recorder.close()


PLAIN_CLIENT = textwrap.dedent("""
    import asyncio, sys, msgpack, nats

    async def main(url):
        nc = await nats.connect(url)
        js = nc.jetstream()
        t = 1_700_000_000
        for n in range(40):  # this user likes items with feature 0, not feature 1
            liked = n % 2 == 0
            x = [1.0, 0.0, 0.0, 0.0] if liked else [0.0, 1.0, 0.0, 0.0]
            kind = "click" if liked else "impression"
            await js.publish("microtune.events.plain-user", msgpack.packb(
                {"v": 1, "id": f"p{n}", "u": "plain-user", "t": t + 60 * n, "k": kind,
                 "i": f"item{n}", "x": x}))
        await asyncio.sleep(1.0)
        reply = await nc.request("microtune.query.plain-user", msgpack.packb(
            {"v": 1, "c": [["liked", [1.0, 0, 0, 0]], ["disliked", [0, 1.0, 0, 0]]]}),
            timeout=5)
        print(msgpack.packb(msgpack.unpackb(reply.data)).hex())
        await nc.close()

    asyncio.run(main(sys.argv[1]))
""")


def test_a_plain_nats_client_in_another_process_gets_the_weights_it_should(server, tmp_path):
    async def scenario():
        system, service = await running(tmp_path, server.url)
        script = tmp_path / "client.py"
        script.write_text(PLAIN_CLIENT)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(script), server.url, stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        answer = msgpack.unpackb(bytes.fromhex(out.decode().strip()))
        assert answer["i"] == ["liked", "disliked"]
        assert math.isclose(sum(answer["w"]), 1.0)
        assert answer["w"][0] > 0.6
        assert answer["q"] == 40 and answer["cv"] == 1
        # the user's own weights (rebuilt from the log) plus the segment model's
        w = system.replay("plain-user").w + system.context.models.weights("default", 4)
        weights = np.exp(np.array([w[0] + w[1], w[0] + w[2]]))
        assert np.allclose(answer["w"], weights / weights.sum())
        await service.stop()

    asyncio.run(scenario())



def test_the_broker_receive_time_is_logged_and_corrects_a_skewed_client_clock(server, tmp_path):
    async def scenario():
        system, service = await running(tmp_path, server.url)
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        skew = -4 * 3600.0  # the device clock is four hours behind
        sent = time.time()
        for i in range(6):
            await js.publish("microtune.events.ann", body("ann", f"e{i}", time.time() + skew,
                                                          sid="tab-1"))
            await asyncio.sleep(0.01)
        await until(lambda: service.stats.applied == 6)
        logged = [decode_event(r.body) for r in system.recorder.read("ann")]
        assert all(sent - 1 <= e.received <= time.time() + 1 for e in logged)
        assert all(e.session == "tab-1" for e in logged)
        state = system.state("ann")
        assert state.hyg.skew() == pytest.approx(-skew, abs=5)
        assert state.hyg.t_max == pytest.approx(time.time(), abs=30)  # in broker time

        # recent-window counts on request, through the wire format
        reply = await nc.request("microtune.query.ann", msgpack.packb(
            {"v": 1, "c": [["a", [1.0, 0, 0, 0]]], "w": True}), timeout=2)
        assert msgpack.unpackb(reply.data)["rw"]["click"] == 6
        await nc.close()
        await service.stop()

    asyncio.run(scenario())
