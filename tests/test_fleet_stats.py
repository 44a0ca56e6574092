"""Summing a fleet's counters (adapters/fleet/stats.py): what adds, what stays per worker."""

from adapters.fleet.stats import summed


def test_counters_add_maps_add_by_key_names_unite_the_rest_stays_per_worker():
    maps = {
        "w1": {"applied": 5, "rejected": {"malformed": 1}, "experiments_running": ["a"],
               "gc": {"gen0": {"collections": 3}}, "busy_s": 0.5, "started": True},
        "w0": {"applied": 7, "rejected": {"malformed": 2, "dimension": 1},
               "experiments_running": ["a", "b"], "gc": {"gen0": {"collections": 4}},
               "busy_s": 0.25, "started": True},
    }
    out = summed(maps, live=["w0", "w1", "w2"])
    assert out["applied"] == 12
    assert out["busy_s"] == 0.75
    assert out["rejected"] == {"dimension": 1, "malformed": 3}
    assert out["experiments_running"] == ["a", "b"]
    assert "gc" not in out and "started" not in out  # per worker only: no sum means anything
    assert out["fleet"] == {"workers": 2, "answered": ["w0", "w1"], "missing": ["w2"]}
    assert list(out["by_worker"]) == ["w0", "w1"]
    assert out["by_worker"]["w1"]["gc"] == {"gen0": {"collections": 3}}
