"""Metrics, liveness and readiness over HTTP (adapters/metrics.py), against a real service,
nats-server and store: counters move as events flow, readiness follows the store, the
Grafana dashboard uses only names the service exports, serve stops when it cannot be ready."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgpack
import nats
from helpers import start_service, until
from prometheus_client.parser import text_string_to_metric_families

from adapters.metrics import PROBE_EVERY, MetricsServer
from events import TuningConfig

CFG = TuningConfig(version=1, dim=2)
DASHBOARD = Path(__file__).parent.parent / "adapters" / "grafana" / "microtune.json"


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read()


def exported(base: str) -> set[str]:
    """Every series name /metrics declares, with or without samples yet."""
    status, raw = get(f"{base}/metrics")
    assert status == 200
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "gauge": ("",)}
    return {f"{family.name}{suffix}"
            for family in text_string_to_metric_families(raw.decode())
            for suffix in suffixes.get(family.type, ("",))}


def samples(base: str) -> dict[str, float]:
    status, raw = get(f"{base}/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(raw.decode()):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def event(n: int, **extra) -> bytes:
    return msgpack.packb({"v": 1, "id": f"e{n}", "u": "ann", "t": 10.0 + 10 * n, "k": "click",
                          "i": "a", "x": [1.0, 0.0], **extra})


def test_metrics_move_with_events_and_readiness_follows_the_store(server, tmp_path):
    async def scenario():
        _system, service = await start_service(tmp_path, server.url, CFG)
        metrics = MetricsServer(service, "127.0.0.1", 0).start()
        base = f"http://127.0.0.1:{metrics.port}"
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        try:
            assert get(f"{base}/healthz")[0] == 200
            status, body = await asyncio.to_thread(get, f"{base}/readyz")
            assert status == 200 and json.loads(body)["status"] == "ready"
            before = await asyncio.to_thread(samples, base)
            assert before["microtune_events_applied_total"] == 0
            for n in range(5):
                await js.publish("microtune.events.ann", event(n))
            await js.publish("microtune.events.ann", b"\x00 not msgpack")
            await until(lambda: service.stats.applied == 5 and sum(
                service.stats.rejected.values()) == 1)
            after = await asyncio.to_thread(samples, base)
            assert after["microtune_events_applied_total"] == 5
            assert after["microtune_events_received_total"] == 6
            assert after["microtune_events_rejected_total{reason=malformed}"] == 1
            assert after["microtune_journal_batch_events_count"] >= 1
            assert after["microtune_journal_commit_seconds_sum"] > 0
            assert after["microtune_users_live"] == 1 and after["microtune_ready"] == 1
            # query latency, from the query processes' reports (once a second)
            for _ in range(3):
                reply = await nc.request("microtune.query.ann", msgpack.packb(
                    {"v": 1, "c": [["a", [1.0, 0.0]]]}), timeout=5)
                assert "e" not in msgpack.unpackb(reply.data)
            await until(lambda: (service.query_stats().get("latency") or {}).get(
                "count", 0) >= 3, timeout=10)
            scraped = await asyncio.to_thread(samples, base)
            assert scraped["microtune_query_seconds_count"] >= 3
            assert scraped['microtune_query_seconds_bucket{le=+Inf}'] >= 3
            assert "microtune_activation_seconds_count" in scraped
            # per segment: clicks only (y = 1), so a loss and step norms, no AUC yet
            assert 0 < after["microtune_segment_log_loss{segment=default}"] < 1
            assert after["microtune_segment_step_norm{segment=default}"] > 0
            assert "microtune_segment_auc{segment=default}" not in after
            assert after["microtune_segment_bots_total{segment=default}"] == 0

            lock = sqlite3.connect(tmp_path / "mt.db", timeout=30, isolation_level=None)
            lock.execute("BEGIN EXCLUSIVE")  # another process holds the store: not writable
            await asyncio.sleep(PROBE_EVERY + 0.1)
            status, body = await asyncio.to_thread(get, f"{base}/readyz")
            assert status == 503
            assert json.loads(body)["checks"]["store_writable"] is False
            lock.execute("ROLLBACK")
            lock.close()
            await asyncio.sleep(PROBE_EVERY + 0.1)
            assert (await asyncio.to_thread(get, f"{base}/readyz"))[0] == 200
            names = await asyncio.to_thread(exported, base)
        finally:
            metrics.stop()
            await service.stop()
            await nc.close()
        return names

    names = asyncio.run(scenario())
    used = set()
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"microtune_[a-z_]+", target["expr"]))
    missing = used - names
    assert not missing, f"the dashboard uses names the service does not export: {missing}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_stops_with_a_message_when_it_cannot_become_ready(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    store = data / "held.db"
    from actors import Microtune

    Microtune.open(store, CFG).close()  # a store, then held by another process's lock
    lock = sqlite3.connect(store, timeout=30, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "adapters.cli", "serve", "--data-dir", str(data),
         "--store", str(store), "--embedded-port", str(_free_port()),
         "--metrics-port", str(_free_port()), "--ready-timeout", "4", "--dim", "2"],
        capture_output=True, text=True, timeout=120)
    lock.execute("ROLLBACK")
    lock.close()
    assert done.returncode == 3, done.stderr[-2000:]
    assert "not ready after 4 s (store_writable)" in done.stderr
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 60


def test_segment_quality_tracks_loss_auc_norms_and_hygiene_drops():
    import math

    import numpy as np

    from actors.learning import Step
    from actors.segment_quality import SegmentQuality

    quality = SegmentQuality()
    steps = [Step(f"e{n}", "feedback", float(n), "applied", y=float(n % 2), importance=1.0,
                  p=0.8 if n % 2 else 0.3, rate=0.1, step=np.array([0.3, 0.4]))
             for n in range(10)]
    steps += [Step("b", "click", 11.0, "bot"), Step("o", "dwell", 12.0, "outlier_dropped")]
    quality.observe("news", steps)
    got = quality.snapshot()["news"]
    assert got["steps"] == 10 and got["bots"] == 1 and got["outliers"] == 1
    assert got["auc"] == 1.0  # every positive scored above every negative
    assert got["step_norm"] == 0.5
    # an average over ~1000 steps that starts at the first step's loss: after ten, between
    # the two losses seen and still near the first's
    assert -math.log(0.8) < got["log_loss"] <= -math.log(0.7)
    assert abs(got["log_loss"] + math.log(0.7)) < 0.01
