"""Off-policy evaluation from a real store: an exploring segment's log, replayed under other
configs, ranks them as their true values do; and `microtune evaluate` prints it."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np

from actors import Microtune
from actors.experiments import evaluation, offpolicy
from events import SegmentConfig, TuningConfig
from events.types import Candidate, Event, Query

DIM = 4
CFG = TuningConfig(version=1, dim=DIM, segments={"default": SegmentConfig(
    hygiene=False, explore="epsilon", epsilon=0.3, segment_model=False, lr=0.2, lr_min=0.05,
    lr_max=0.4)})


def _serve_log(store) -> None:
    """Users with hidden tastes are served explored slates (top 3 of 8) and click by taste."""
    rng = np.random.default_rng(11)
    items = {f"i{k}": rng.normal(size=DIM) for k in range(24)}
    with Microtune.open(store, CFG) as mt:
        t = 1_000_000.0
        for u in range(30):
            user, taste = f"u{u}", rng.normal(size=DIM) * 1.5
            for n in range(12):
                slate = rng.choice(list(items), size=8, replace=False)
                ranking = mt.rank(Query(user, tuple(Candidate(i, items[i]) for i in slate),
                                        top=3, t=t, rid=f"{user}-r{n}"))  # reproducible
                clicks = [Event(id=f"{user}-{n}-{i}", user=user, t=t + 1 + k, kind="click",
                                item=i, x=items[i], rid=ranking.rid)
                          for k, i in enumerate(ranking.items)
                          if rng.random() < 1 / (1 + np.exp(1.0 - items[i] @ taste))]
                assert all(o.status == "applied" for o in mt.track_many(clicks))
                t += 600


def test_evaluation_replays_each_user_under_the_target_and_orders_configs(tmp_path):
    store = tmp_path / "mt.db"
    _serve_log(store)
    with Microtune.open(store, CFG) as mt:
        learned = evaluation.logged_slates(mt.recorder, CFG)  # the same learning, greedy
        frozen = evaluation.logged_slates(mt.recorder, replace(CFG, segments={
            "default": replace(CFG.segments["default"], personal=False)}))  # no adjustment
    assert len(learned) == len(frozen) == 30 * 12
    # the log's own slates: the greedy target agrees with what was shown when not explored
    agree = np.mean([s.target_items == s.shown for s in learned])
    assert 0.6 < agree < 0.85  # epsilon 0.3 (a random slate is rarely the greedy one)
    est_learned, est_frozen = offpolicy.estimate(learned), offpolicy.estimate(frozen)
    for method in ("ips", "snips", "dr"):
        assert est_learned[method].value.estimate > est_frozen[method].value.estimate, method
    # greedy learning beats the explored log it was learned from
    assert est_learned["dr"].value.estimate > est_learned["logged"].value.estimate


def test_the_evaluate_command_prints_the_estimates(tmp_path):
    store = tmp_path / "mt.db"
    _serve_log(store)
    frozen = tmp_path / "frozen.toml"
    frozen.write_text("[tuning.segments.default]\nhygiene = false\npersonal = false\n"
                      "segment_model = false\n")
    run = subprocess.run([sys.executable, "-m", "adapters.cli", "evaluate", "--store",
                          str(store), "--config", str(frozen), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert set(result) == {"ips", "snips", "dr", "logged"}
    assert result["dr"]["slates"] == 360 and result["dr"]["users"] == 30
    assert result["dr"]["low"] <= result["dr"]["estimate"] <= result["dr"]["high"]
    table = subprocess.run([sys.executable, "-m", "adapters.cli", "evaluate", "--store",
                            str(store), "--config", "1"], capture_output=True, text=True,
                           timeout=120)
    assert table.returncode == 0 and "doubly robust" in table.stdout
