"""`microtune bench readme` writes the learning-quality block from the benchmark's JSON:
the speed verdict and the fleet rows come from the figures, never from the text."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("bench_readme",
                                                  ROOT / "scripts" / "bench_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(learner: str, config: str, auc: float, rate: float) -> dict:
    figures = dict(log_loss_first_half=0.6, auc=auc, auc_last_half=auc, log_loss=0.6,
                   log_loss_last_half=0.6, auc_cold=auc - 0.05, events_per_s=rate)
    return {"learner": learner, "config": config, **figures}


def test_the_verdict_names_the_speed_gap_to_vws_best_and_the_fleet_rows():
    results = [_row("microtune", "defaults", 0.77, 30_000.0),
               _row("microtune", "defaults, as 2 workers, merged every 1,000 ratings",
                    0.7695, 25_000.0),
               _row("vowpal wabbit", "-q ug |i item", 0.76, 81_000.0),
               _row("vowpal wabbit", "-q ug", 0.72, 90_000.0)]
    text = _script().quality_table(results, "2026-11-26, test")
    assert ("- ratings/s: microtune 30,000, VW's best by AUC 81,000 (`-q ug |i item`): "
            "behind, 2.7x slower") in text
    assert "- defaults, as 2 workers, merged every 1,000 ratings: AUC 0.7695, -0.0005" in text
    faster = [dict(results[0], events_per_s=100_000.0), *results[1:]]
    assert "VW's best by AUC 81,000" in _script().quality_table(faster, "x")
    assert "behind, " not in _script().quality_table(faster, "x").split("ratings/s:")[1][:80]


def test_the_capacity_model_scales_one_workers_measured_costs():
    data = {"events": 150_000, "machine": {"date": "2026-11-26T00:00:00", "arch": "x86_64",
                                           "cores": 2},
            "runs": {"1 worker": {"events_per_s": 10_000.0, "cpu_us_per_event": {
                "serve": 90.0, "query processes": 25.0, "nats-server": 20.0,
                "postgresql": 7.5}}}}
    text = _script().capacity_table(data, nodes=100)
    assert "the fleet takes 1,000,000 events/s" in text
    assert "| nats-server | 20.0 | one events stream: its leader sees every event | 20.0 on one " \
           "server |" in text
    assert "| postgresql | 7.5 | one store: every event's row and its commit | 7.5 on one " \
           "server |" in text
    assert "| serve | 90.0 | each worker's own core | 0.90 per node |" in text
