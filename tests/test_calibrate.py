"""Calibration by replay on simulated populations whose truth is known: users whose tastes
turn around every 12 hours want a short half-life, users whose tastes never change a long
one, and `microtune calibrate` finds each."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from actors import Microtune
from actors.calibration import Score, calibrate, points
from events import SegmentConfig, TuningConfig
from events.errors import Rejected
from events.types import Event

DIM = 4
CFG = TuningConfig(version=1, dim=DIM, segments={"default": SegmentConfig(hygiene=False)})
HALF_LIVES = [1800.0, 6 * 3600.0, 3 * 86400.0, 60 * 86400.0]
GRID = {"half_life": HALF_LIVES}


def _population(store, *, switch_every: float | None, seed: int) -> list[str]:
    """Users rating items every 10 minutes for 4 days; y = 1 with probability
    sigmoid(2 taste . x), the taste turned around every `switch_every` seconds (None:
    never)."""
    rng = np.random.default_rng(seed)
    items = rng.normal(size=(40, DIM)) / np.sqrt(DIM)
    users = [f"u{u:02d}" for u in range(24)]
    with Microtune.open(store, CFG) as mt:
        events = []
        for user in users:
            taste, since = rng.normal(size=DIM) * 2, 0.0
            for n in range(576):
                t = 600.0 * n
                if switch_every is not None and t - since >= switch_every:
                    taste, since = -taste, t  # what was liked is now disliked
                k = rng.integers(len(items))
                y = float(rng.random() < 1 / (1 + np.exp(-2 * items[k] @ taste)))
                events.append(Event(id=f"{user}-{n}", user=user, t=1e6 + t, kind="feedback",
                                    item=f"i{k}", x=items[k], target=y))
        assert {o.status for o in mt.track_many(events, timeout=120)} == {"applied"}
    return users


@pytest.mark.parametrize("switch_every, expected", [
    (12 * 3600.0, {1800.0, 6 * 3600.0}),  # tastes change twice a day: forget fast
    (None, {3 * 86400.0, 60 * 86400.0}),  # tastes never change: remember
])
def test_calibration_picks_a_half_life_that_matches_how_fast_tastes_change(
        tmp_path, switch_every, expected):
    store = str(tmp_path / "mt.db")
    for seed in (1, 2):  # two populations of each kind: the choice is not one stream's
        users = _population(f"{store}.{seed}", switch_every=switch_every, seed=seed)
        candidates = points(CFG, "default", GRID)
        scores = calibrate(f"{store}.{seed}", users, [c for _, c in candidates], "default",
                           processes=2 if seed == 1 else 1)
        assert all(s.users == 24 and s.steps == 24 * 576 for s in scores)
        best = min(zip(candidates, scores, strict=True), key=lambda cs: cs[1].log_loss)
        assert best[0][0]["half_life"] in expected, [(p, s.log_loss) for (p, _), s in
                                                     zip(candidates, scores, strict=True)]
        assert 0.5 < best[1].auc <= 1


def test_scores_add_up_across_processes_exactly(tmp_path):
    store = str(tmp_path / "mt.db")
    users = _population(store, switch_every=None, seed=3)
    configs = [c for _, c in points(CFG, "default", {"lr": [0.02, 0.1]})]
    one, two = (calibrate(store, users, configs, "default", processes=p) for p in (1, 2))
    for a, b in zip(one, two, strict=True):
        assert (a.steps, a.users) == (b.steps, b.users)
        assert a.log_loss == pytest.approx(b.log_loss, rel=1e-12) and a.auc == b.auc


def test_a_bad_grid_is_refused():
    for grid in ({"prior": [None]}, {"lr": []}, {"lr": [0.1] * 20, "l2": [0.1] * 20}):
        with pytest.raises(Rejected):
            points(CFG, "default", grid)
    with pytest.raises(Rejected):  # an invalid value, by the config's own validation
        points(CFG, "default", {"lr_min": [0.5]})
    assert Score().auc != Score().auc  # NaN without outcomes


def test_the_calibrate_command_ranks_applies_and_draws(tmp_path):
    store = str(tmp_path / "mt.db")
    _population(store, switch_every=12 * 3600.0, seed=4)
    grid = tmp_path / "grid.toml"
    grid.write_text("[grid]\nhalf_life = [1800.0, 21600.0, 5184000.0]\n")
    plot = tmp_path / "calibrate.png"
    run = subprocess.run([sys.executable, "-m", "adapters.cli", "calibrate", "--store", store,
                          "--grid", str(grid), "--processes", "1", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)
    assert len(rows) == 4 and sum(r["current"] for r in rows) == 1
    assert rows == sorted(rows, key=lambda r: r["log_loss"])
    applied = subprocess.run([sys.executable, "-m", "adapters.cli", "calibrate", "--store",
                              store, "--grid", str(grid), "--processes", "1", "--plot",
                              str(plot), "--apply"], capture_output=True, text=True,
                             timeout=300)
    assert applied.returncode == 0, applied.stderr
    assert plot.stat().st_size > 10_000
    with Microtune.open(store, CFG) as mt:
        assert mt.configs.current.version == 2
        assert mt.configs.current.segments["default"].half_life == rows[0]["params"][
            "half_life"]


def test_the_latest_window_and_a_proposed_experiment(tmp_path):
    """`--since` scores only what was learned in the latest window; `--propose` starts an
    experiment of the current config against the winner instead of applying it."""
    store = str(tmp_path / "mt.db")
    users = _population(store, switch_every=12 * 3600.0, seed=6)
    configs = [c for _, c in points(CFG, "default", GRID)]
    whole = calibrate(store, users, configs, "default")
    latest = calibrate(store, users, configs, "default", since=1e6 + 3 * 86400.0)
    assert all(0 < b.steps < a.steps for a, b in zip(whole, latest, strict=True))
    assert latest[0].steps == 24 * 144  # the last of 4 days
    grid = tmp_path / "grid.toml"
    grid.write_text("[grid]\nhalf_life = [1800.0, 21600.0, 5184000.0]\n")
    run = subprocess.run([sys.executable, "-m", "adapters.cli", "calibrate", "--store", store,
                          "--grid", str(grid), "--processes", "1", "--plot",
                          str(tmp_path / "c.png"), "--since", "1259200",
                          "--propose", "recalibrated"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    with Microtune.open(store, CFG) as mt:
        experiment = mt.experiments.get("recalibrated")
        arms = dict(experiment.arms)
        assert experiment.running and arms["control"] == 1 and experiment.segment == "default"
        calibrated = mt.configs.get(arms["calibrated"])
        assert calibrated.label == "experiment recalibrated arm calibrated"
        assert calibrated.segments["default"].half_life == 21600.0
        assert mt.configs.current.version == 1  # proposed, not applied


def test_more_responsive_segments_never_get_wider_rate_bounds(tmp_path):
    from actors.calibration import ordered, responsiveness

    T0 = 12 * 86400.0  # midnight: three days are three calendar days
    cfg = TuningConfig(version=1, dim=DIM, segments={
        "default": SegmentConfig(hygiene=False),
        "busy": SegmentConfig(hygiene=False, lr_max=0.06),
        "calm": SegmentConfig(hygiene=False, lr_max=0.12)})
    store = str(tmp_path / "mt.db")
    rng = np.random.default_rng(8)
    with Microtune.open(store, cfg) as mt:
        events = []
        for segment, per_day in (("busy", 96), ("calm", 6)):
            for u in range(6):
                user = f"{segment}-{u}"
                events.append(Event(id=f"{user}-g", user=user, t=T0, kind="segment",
                                    segment=segment))
                for n in range(per_day * 3):  # three days
                    x = rng.normal(size=DIM)
                    events.append(Event(id=f"{user}-{n}", user=user,
                                        t=T0 + n * 86400 / per_day, kind="feedback",
                                        item="i", x=x, target=float(rng.random() < 0.5)))
        assert {o.status for o in mt.track_many(events, timeout=120)} == {"applied"}
        measured = responsiveness(mt.recorder.read_all())
    assert measured == {"busy": 96.0, "calm": 6.0}
    assert ordered("busy", 0.1, cfg, measured)  # still below calm's 0.12
    assert not ordered("busy", 0.2, cfg, measured)  # wider than the calmer segment's
    assert not ordered("calm", 0.03, cfg, measured)  # narrower than the busier one's 0.06
    assert ordered("calm", 0.3, cfg, measured)
    assert ordered("default", 5.0, cfg, measured)  # not measured: no users
    grid = tmp_path / "grid.toml"
    grid.write_text("[grid]\nlr_max = [0.05, 0.1, 0.2]\n")
    run = subprocess.run([sys.executable, "-m", "adapters.cli", "calibrate", "--store", store,
                          "--segment", "busy", "--grid", str(grid), "--processes", "1",
                          "--json"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lr_maxes = {r["params"].get("lr_max") for r in json.loads(run.stdout) if not r["current"]}
    assert lr_maxes == {0.05, 0.1} and "1 grid points left out" in run.stderr


def test_a_grid_over_the_segment_model_is_scored_by_a_joint_replay(tmp_path):
    """Users who all share one taste: a segment model that learns faster predicts them
    better; only a joint replay (the segment model learning along) can see it."""
    store = str(tmp_path / "mt.db")
    rng = np.random.default_rng(9)
    items = rng.normal(size=(30, DIM)) / np.sqrt(DIM)
    shared = rng.normal(size=DIM) * 2
    with Microtune.open(store, CFG) as mt:
        events = []
        for n in range(40):  # users arrive one after another and rate a few items each
            for u in range(30):
                k = rng.integers(len(items))
                y = float(rng.random() < 1 / (1 + np.exp(-2 * items[k] @ shared)))
                events.append(Event(id=f"u{u}-{n}", user=f"u{u}", t=1e6 + 600 * n + u,
                                    kind="feedback", item=f"i{k}", x=items[k], target=y))
        assert {o.status for o in mt.track_many(events, timeout=120)} == {"applied"}
        users = sorted({e.user for e in events})
    candidates = points(CFG, "default", {"segment_lr": [0.0005, 0.02, 0.2]})
    scores = calibrate(store, users, [c for _, c in candidates], "default", joint=True)
    assert all(s.steps == 1200 and s.users == 30 for s in scores)
    losses = [s.log_loss for s in scores]
    assert losses[0] > losses[1] > losses[2], losses  # faster shared learning helps here
    again = calibrate(store, users, [c for _, c in candidates], "default", joint=True)
    assert [s.log_loss for s in again] == losses  # deterministic
