"""Alerts wired into the service: a segment whose outcomes turn around raises a drift alert,
published on microtune.alerts.drift, counted in /metrics and shown by admin.stats (real
nats-server and store; the detectors themselves: tests/test_alerts.py)."""

from __future__ import annotations

import asyncio

import msgpack
import nats
from helpers import until
from test_metrics import samples

from actors.alerts import AlertSettings, Watches
from adapters.metrics import MetricsServer
from events import TuningConfig

CFG = TuningConfig(version=1, dim=2)


def feedback(n: int, user: str, y: float) -> bytes:
    return msgpack.packb({"v": 1, "id": f"f{n}", "u": user, "t": 100.0 + 10 * n,
                          "k": "feedback", "i": "a", "x": [1.0, 0.0], "y": y})


def test_a_turnaround_raises_one_drift_alert_published_counted_and_shown(server, tmp_path):
    async def main():
        from actors import Microtune
        from adapters.nats_service import Service, ServiceConfig

        system = Microtune.open(tmp_path / "mt.db", CFG)
        # sensitive settings: a short test stream (the defaults' figures: bench alerts)
        system.context.watches = Watches(AlertSettings(min_steps=30, loss_delta=0.01,
                                                       loss_threshold=4.0))
        service = Service(system, ServiceConfig())
        await service.start(server.url)
        metrics = MetricsServer(service, "127.0.0.1", 0).start()
        nc = await nats.connect(server.url)
        got: list[tuple[str, dict]] = []

        async def on_alert(msg):
            got.append((msg.subject, msgpack.unpackb(msg.data)))

        await nc.subscribe("microtune.alerts.>", cb=on_alert)
        js = nc.jetstream()
        try:
            users = [f"u{k}" for k in range(8)]
            n = 0
            for phase, y in ((0, 1.0), (1, 0.0)):  # everyone liked `a`, then no one does
                for _round in range(12):
                    for user in users:
                        await js.publish(f"microtune.events.{user}", feedback(n, user, y))
                        n += 1
                await until(lambda n=n: service.stats.applied == n, timeout=60)
                if phase == 0:
                    assert system.context.watches.counts == {}  # quiet while it holds
            await until(lambda: got, timeout=20)
            subject, body = got[0]
            assert subject == "microtune.alerts.drift"
            assert body["kind"] == "drift" and body["segment"] == "default"
            stats = await service._admin_stats({})
            assert stats["alerts"]["default"]["drift"]["alerts"] >= 1
            scraped = await asyncio.to_thread(
                samples, f"http://127.0.0.1:{metrics.port}")
            assert scraped["microtune_alerts_total{kind=drift,segment=default}"] >= 1
        finally:
            metrics.stop()
            await service.stop()
            await nc.close()

    asyncio.run(main())
