"""Prometheus metrics, liveness and readiness on an HTTP port of the service.

`serve --metrics-port` (default 9464, on loopback unless `--metrics-host` says otherwise)
answers:
- `/metrics`: the Prometheus text format. The counters are read from the service's own
  counters at scrape time (a collector, nothing added to the hot path); the two histograms
  (journal batch size and commit time) are observed once per commit on the journal thread.
- `/healthz`: 200 while the process answers at all.
- `/readyz`: 200 when the service takes events and answers queries: its events consumer is
  attached, the store takes a write (a probe), the catalog was loaded; otherwise 503 and, in
  a JSON body, which of these is not so. A load balancer or Kubernetes probes these.

The names (all prefixed `microtune_`) are the ones the Grafana dashboard in
adapters/grafana/microtune.json uses; tests/test_metrics.py checks both.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import structlog
from prometheus_client import CollectorRegistry, Histogram, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from actors import latency

log = structlog.get_logger(__name__)

PROBE_EVERY = 1.0  # seconds a store probe's answer is reused (a scrape storm probes once)


class ServiceCollector(Collector):
    """The service's counters, read when Prometheus scrapes."""

    def __init__(self, service: Any) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        service, system = self.service, self.service.system
        stats, journal = service.stats, system.journal.stats
        for name, value, doc in (
                ("events_received", stats.received, "events taken from the events stream"),
                ("events_applied", stats.applied, "events committed to the log and applied"),
                ("events_duplicate", stats.duplicates, "redelivered or repeated events, "
                                                       "applied once"),
                ("events_failed", stats.failed, "events left to JetStream to redeliver"),
                ("events_dead_lettered", stats.dead_lettered, "events settled as "
                                                              "undeliverable"),
                ("journal_commits", journal.commits, "journal transactions committed"),
                ("journal_retries", journal.retries, "commits retried (store unavailable)"),
                ("segment_model_steps", system.context.models.steps,
                 "learning steps taken by the segment models"),
                ("user_activations", system.directory.activations, "user actors activated"),
                ("user_passivations", system.directory.passivations,
                 "user actors passivated (snapshot, then stopped)")):
            yield CounterMetricFamily(f"microtune_{name}", doc, value=value)
        rejected = CounterMetricFamily("microtune_events_rejected",
                                       "events refused, by reason", labels=["reason"])
        for reason, count in sorted(stats.rejected.items()):
            rejected.add_metric([str(reason)], count)
        yield rejected
        queries = service.query_stats()
        yield CounterMetricFamily("microtune_queries", "queries answered by the query "
                                  "processes", value=queries.get("queries", 0))
        refused = CounterMetricFamily("microtune_queries_rejected", "queries refused, by "
                                      "reason", labels=["reason"])
        for reason, count in sorted((queries.get("rejected") or {}).items()):
            refused.add_metric([str(reason)], count)
        yield refused
        for name, doc, figures in (
                ("microtune_query_seconds", "a query's time in a query process, from its "
                 "arrival to its reply", queries.get("latency")),
                ("microtune_activation_seconds", "loading a user's snapshot and tail when its "
                 "actor starts", system.context.activation.to_map())):
            if figures:
                yield HistogramMetricFamily(name, doc, buckets=latency.buckets(figures),
                                            sum_value=figures["sum"])
        yield GaugeMetricFamily("microtune_consumer_pending", "events waiting in the events "
                                "stream for this service (JetStream num_pending)",
                                value=service.consumer_pending)
        yield GaugeMetricFamily("microtune_unsettled", "events taken and not yet settled",
                                value=len(service._unsettled))
        yield GaugeMetricFamily("microtune_users_live", "live user actors",
                                value=len(system.directory))
        yield GaugeMetricFamily("microtune_gc_longest_pause_seconds", "the longest garbage "
                                "collection pause of the service process",
                                value=system.gc_pauses.to_map()["longest_ms"] / 1e3)
        alerts = CounterMetricFamily("microtune_alerts", "drift and instability alerts "
                                     "raised, by segment and kind", labels=["segment", "kind"])
        for (segment, kind), (raised, _suppressed) in system.context.watches.totals().items():
            alerts.add_metric([segment, kind], raised)
        yield alerts
        quality = system.context.quality.snapshot()
        for key, doc, family in (
                ("log_loss", "log loss of predictions made before learning (average over the "
                             "last ~1000 learning steps)", GaugeMetricFamily),
                ("auc", "AUC of predictions made before learning, last 2000 binary outcomes",
                 GaugeMetricFamily),
                ("step_norm", "mean L2 norm of a learning step (last ~1000)",
                 GaugeMetricFamily)):
            metric = family(f"microtune_segment_{key}", doc, labels=["segment"])
            for segment, figures in sorted(quality.items()):
                if not math.isnan(figures[key]):
                    metric.add_metric([segment], figures[key])
            yield metric
        for key, doc in (("bots", "events of users marked bots (logged, not learned)"),
                         ("outliers", "events hygiene found outliers (dropped or clipped)")):
            metric = CounterMetricFamily(f"microtune_segment_{key}", doc, labels=["segment"])
            for segment, figures in sorted(quality.items()):
                metric.add_metric([segment], figures[key])
            yield metric
        ready, _why = service.readiness()
        yield GaugeMetricFamily("microtune_ready", "1 when /readyz answers 200",
                                value=1.0 if ready else 0.0)


class JournalTimings:
    """The journal's batch sizes and commit times, as histograms (`Journal.on_timing`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.batch = Histogram("microtune_journal_batch_events", "events per committed batch",
                               buckets=(1, 4, 16, 64, 256, 1024, 4096, 16384),
                               registry=registry)
        self.commit = Histogram("microtune_journal_commit_seconds", "time of one commit "
                                "(the transaction and its fsync)",
                                buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1,
                                         0.25, 1.0, 5.0), registry=registry)

    def __call__(self, events: int, seconds: float) -> None:
        self.batch.observe(events)
        self.commit.observe(seconds)


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every 15 s is not news; structlog has what matters


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class MetricsServer:
    """The HTTP port: /metrics, /healthz, /readyz, on a daemon thread of its own."""

    def __init__(self, service: Any, host: str, port: int) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(ServiceCollector(service))
        service.system.journal.on_timing = JournalTimings(self.registry)
        self._service = service
        metrics = make_wsgi_app(self.registry)

        def app(environ: dict, start: Callable) -> list[bytes]:
            path = environ.get("PATH_INFO", "")
            if path == "/healthz":
                return _reply(start, 200, {"status": "alive"})
            if path == "/readyz":
                ready, why = service.readiness()
                return _reply(start, 200 if ready else 503,
                              {"status": "ready" if ready else "not ready", "checks": why})
            if path == "/metrics":
                return metrics(environ, start)
            return _reply(start, 404, {"error": f"no {path}: /metrics, /healthz, /readyz"})

        self.httpd = make_server(host, port, app, server_class=_Server, handler_class=_Quiet)
        self.port = self.httpd.server_port
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True,
                                       name="microtune-metrics")

    def start(self) -> MetricsServer:
        self.thread.start()
        log.info("metrics.serving", port=self.port)
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


_PHRASES = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}


def _reply(start: Callable, status: int, body: dict) -> list[bytes]:
    raw = json.dumps(body).encode()
    start(f"{status} {_PHRASES[status]}",
          [("Content-Type", "application/json"), ("Content-Length", str(len(raw)))])
    return [raw]


class StoreProbe:
    """Whether the store takes a write now, asked at most once per PROBE_EVERY seconds."""

    def __init__(self, probe: Callable[[], bool]) -> None:
        self._probe = probe
        self._lock = threading.Lock()
        self._at = -1e9
        self._ok = False

    def __call__(self) -> bool:
        with self._lock:
            now = time.monotonic()
            if now - self._at >= PROBE_EVERY:
                self._ok, self._at = self._probe(), now
            return self._ok
