"""The update rule: simulated users with known preferences, and each bound of the rule."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from actors.learning import apply, engagement, sigmoid
from actors.state import UserState
from events import Event, SegmentConfig, TuningConfig

D = 8
RAW = {"hygiene": False}  # the update rule alone: every event learns at once (tests of hygiene:
# tests/test_hygiene.py)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


class SimulatedUser:
    """Clicks an item with probability sigmoid(theta . x - 0.5), else only sees it."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.theta = self.rng.normal(size=D) * 1.5
        items = self.rng.normal(size=(500, D))
        self.train, self.held_out = items[:400], items[400:]
        self.t = 1.0e9
        self.n = 0

    def events(self, count: int, step: float = 60.0):
        for _ in range(count):
            x = self.train[self.rng.integers(len(self.train))]
            clicked = self.rng.random() < sigmoid(float(self.theta @ x) - 0.5)
            self.t += step
            self.n += 1
            yield Event(id=f"e{self.n}", user="sim", t=self.t,
                        kind="click" if clicked else "impression", item="i", x=x)

    def agreement(self, state: UserState) -> float:
        """Rank agreement of held-out items: learned weights versus the true preference."""
        return spearman(self.held_out @ state.w[1:], self.held_out @ self.theta)


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop", "adagrad"])
@pytest.mark.parametrize("seed", [0, 1])
def test_learns_a_known_preference_and_follows_a_change(optimizer, seed):
    half_life = 6 * 3600.0
    cfg = TuningConfig(version=1, dim=D, segments={
        "default": SegmentConfig(optimizer=optimizer, half_life=half_life)})
    user = SimulatedUser(seed)
    state = UserState("sim")
    for event in user.events(300):
        state = apply(state, event, cfg)
    assert user.agreement(state) > 0.75

    user.theta = -user.theta  # the user's taste turns around
    start = user.t
    for event in user.events(int(half_life / 60)):
        state = apply(state, event, cfg)
    assert user.t - start <= half_life
    assert user.agreement(state) > 0.75, "the weights follow within one half-life"


def test_old_preferences_fade_toward_the_prior_by_event_time():
    prior = tuple(float(i) for i in range(D + 1))
    cfg = TuningConfig(version=1, dim=D, segments={
        "default": SegmentConfig(half_life=3600.0, prior=prior, **RAW)})
    rng = np.random.default_rng(1)
    state = UserState("u")
    for i in range(50):
        state = apply(state, Event(id=str(i), user="u", t=1000.0 + i, kind="click", item="a",
                                   x=rng.normal(size=D)), cfg)
    moved = np.abs(state.w - np.array(prior)).max()
    assert moved > 0.5
    # 20 half-lives later, one event: the old deviation has decayed by 2**-20
    late = apply(state, Event(id="late", user="u", t=state.t_last + 20 * 3600, kind="impression",
                              item="a", x=np.zeros(D)), cfg)
    deviation = np.abs(late.w - np.array(prior)).max()
    assert deviation <= moved * 2**-20 + cfg.segment(None).max_step


def test_clock_never_runs_backwards_for_decay():
    cfg = TuningConfig(version=1, dim=D, segments={"default": SegmentConfig(**RAW)})
    x = np.ones(D)
    s = apply(UserState("u"), Event(id="a", user="u", t=5000.0, kind="click", item="i", x=x), cfg)
    late = apply(s, Event(id="b", user="u", t=100.0, kind="click", item="i", x=x), cfg)
    assert late.t_last == 5000.0  # an older event does not move the clock back


def test_per_event_step_is_bounded():
    cfg = TuningConfig(version=1, dim=D, segments={"default": SegmentConfig(
        max_step=0.05, lr_min=1.0, lr_max=1.0, optimizer="adagrad")})
    state = UserState("u")
    for i in range(20):
        new = apply(state, Event(id=str(i), user="u", t=float(i), kind="click", item="a",
                                 x=np.full(D, 10.0)), cfg)
        if state.w.shape[0]:
            assert np.linalg.norm(new.w - state.w) <= 0.05 + 1e-12
        state = new


def test_window_budget_caps_movement():
    seg = SegmentConfig(max_step=1.0, window=3600.0, window_budget=2.0, lr_min=0.5, lr_max=0.5,
                        optimizer="adagrad", half_life=1e12, **RAW)
    cfg = TuningConfig(version=1, dim=D, segments={"default": seg})
    rng = np.random.default_rng(0)
    state = UserState("u")
    trail = []
    for i in range(400):  # one event a second: far more than the budget allows
        state = apply(state, Event(id=str(i), user="u", t=float(i), kind="click", item="a",
                                   x=rng.normal(size=D) * 5), cfg)
        trail.append(state.w.copy())
    moved = sum(np.linalg.norm(b - a) for a, b in itertools.pairwise(trail))
    # a leaky bucket: capacity plus what drains in the elapsed time
    assert moved <= seg.window_budget + 400 * seg.window_budget / seg.window + 1e-9
    assert moved >= seg.window_budget * 0.5  # and it did move


def test_rate_bounds_clip_the_adaptive_rate():
    r = 0.01
    cfg = TuningConfig(version=1, dim=D, segments={"default": SegmentConfig(
        optimizer="adagrad", lr_min=r, lr_max=r, l2=0.0, max_step=100.0, window_budget=1e9,
        warmup=0.0, **RAW)})
    x = np.arange(D, dtype=float) / D
    s = apply(UserState("u"), Event(id="a", user="u", t=1.0, kind="click", item="i", x=x), cfg)
    full_x = np.concatenate(([1.0], x))
    expected = -r * (sigmoid(0.0) - 1.0) * full_x  # plain SGD at rate r from w0 = 0
    assert np.allclose(s.w, expected, rtol=0, atol=1e-15)


def test_a_new_users_rates_warm_up_and_settle():
    """The warm-up multiplies the rate (and its upper bound) by 1 + warmup / (1 + n /
    warmup_events) at a user's n-th learning step: twice the bound at first, 1.5 times at the
    tenth step, the bound itself in the long run."""
    r = 0.01
    cfg = TuningConfig(version=1, dim=D, segments={"default": SegmentConfig(
        optimizer="adagrad", lr=100.0, lr_min=1e-6, lr_max=r, l2=0.0, max_step=100.0,
        window_budget=1e9, warmup=1.0, warmup_events=10.0, **RAW)})
    state, trace = UserState("u"), []
    for n in range(200):
        state = apply(state, Event(id=str(n), user="u", t=float(n), kind="click", item="i",
                                   x=np.ones(D)), cfg, trace)
    rates = [step.rate for step in trace if step.rate is not None]
    assert rates[0] == pytest.approx(2 * r)
    assert rates[10] == pytest.approx(1.5 * r)
    assert rates[199] == pytest.approx(r * (1 + 1 / (1 + 199 / 10)))
    assert all(a > b for a, b in itertools.pairwise(rates))


def test_engagement_targets():
    seg = SegmentConfig()
    x = np.zeros(1)
    def ev(kind, **kw):
        return Event(id="a", user="u", t=0.0, kind=kind, item="i", x=x, **kw)
    assert engagement(ev("click"), seg) == (1.0, 1.0)
    assert engagement(ev("impression"), seg) == (0.0, seg.impression_importance)
    y, _ = engagement(ev("dwell", dwell=seg.dwell_scale), seg)
    assert math.isclose(y, 1 - math.exp(-1))
    assert engagement(ev("scroll", depth=0.7), seg) == (0.7, 1.0)
    assert engagement(ev("feedback", target=0.25), seg) == (0.25, 1.0)


def test_apply_is_pure():
    cfg = TuningConfig(version=1, dim=D, segments={"default": SegmentConfig(**RAW)})
    x = np.ones(D)
    s1 = apply(UserState("u"), Event(id="a", user="u", t=1.0, kind="click", item="i", x=x), cfg)
    w_before = s1.w.copy()
    recent_before = s1.recent
    s2 = apply(s1, Event(id="b", user="u", t=2.0, kind="click", item="i", x=x), cfg)
    assert np.array_equal(s1.w, w_before) and s1.recent == recent_before
    assert not np.array_equal(s2.w, s1.w)
