"""Exploration: propensities as each policy defines them, and a logged draw reproduced bit for
bit from the log (the state at the logged seq, the logged candidates and the ranking id)."""

from __future__ import annotations

import numpy as np
import pytest

from actors import Microtune
from actors.exploration import choose, reproduce, spread
from actors.replay import replay_user
from actors.state import encode_state
from events import SegmentConfig, TuningConfig
from events.codec import event_from_log
from events.types import EXPOSURE, Candidate, Event, Query

DIM = 3
RNG = np.random.default_rng(5)
ITEMS = {f"i{k}": RNG.normal(size=DIM) for k in range(8)}
CANDIDATES = tuple(Candidate(item, x) for item, x in ITEMS.items())


def test_epsilon_greedy_propensities_are_exact_and_match_the_draws():
    scores = np.array([3.0, 1.0, 2.0, 0.5, -1.0])
    n, eps, runs = 3, 0.3, 20_000
    best = [0, 2, 1]
    counts = np.zeros((len(scores), n))
    for r in range(runs):
        slate = choose("epsilon", scores, n, f"rid-{r}", epsilon=eps)
        for k, i in enumerate(slate.order):
            counts[i, k] += 1
            assert slate.propensities[k] == pytest.approx(
                (1 - eps) * (best[k] == i) + eps / len(scores))
    expected = np.full((len(scores), n), eps / len(scores))
    for k, i in enumerate(best):
        expected[i, k] += 1 - eps
    # binomial sd at most sqrt(0.25 / runs) = 0.0035: within 4 sd
    assert np.abs(counts / runs - expected).max() < 0.015
    a, b = (choose("epsilon", scores, n, f"same-{k}", epsilon=eps) for k in (1, 1))
    assert a.order.tolist() == b.order.tolist() and a.propensities == b.propensities


def test_thompson_propensities_estimate_the_slates_probability():
    features = RNG.normal(size=(6, DIM))
    w = np.array([0.1, 0.8, -0.3, 0.2])
    s = spread(np.array([4.0, 1.0, 0.0, 9.0]), DIM, 0.7)
    assert s == pytest.approx(0.7 / np.sqrt(1 + np.array([4.0, 1.0, 0.0, 9.0])))
    assert spread(np.zeros(0), DIM, 0.7).tolist() == [0.7] * (DIM + 1)  # nothing learned yet
    scores = features @ w[1:] + w[0]
    # the truth, by brute force: the probability of each item at the first position
    draws = w + s * np.random.default_rng(0).standard_normal((200_000, DIM + 1))
    firsts = np.argmax(draws[:, 1:] @ features.T + draws[:, :1], axis=1)
    truth = np.bincount(firsts, minlength=6) / len(firsts)
    errors = []
    for r in range(300):
        slate = choose("thompson", scores, 2, f"r{r}", features=features, weights=w,
                       spread=s, samples=400)
        first = slate.order[0]
        errors.append(slate.propensities[0] - truth[first])
        assert 0 < slate.propensities[0] <= 1
    # each estimate is a frequency over 400 draws (sd <= 0.025); their mean is unbiased
    # up to the +1 of the shown draw
    assert abs(np.mean(errors)) < 0.01 and np.max(np.abs(errors)) < 0.12


@pytest.mark.parametrize("policy", ["epsilon", "thompson"])
def test_replay_reproduces_every_logged_draw_bit_for_bit(tmp_path, policy):
    cfg = TuningConfig(version=1, dim=DIM, segments={"default": SegmentConfig(
        explore=policy, epsilon=0.4, explore_samples=64)})
    with Microtune.open(tmp_path / "mt.db", cfg) as mt:
        t = 1000.0
        explored = 0
        for n in range(8):
            for user in ("ann", "bob", "cyd"):
                ranking = mt.rank(Query(user, CANDIDATES, top=4, t=t))  # logged: it explores
                assert ranking.rid is not None and len(ranking.propensities) == 4
                explored += ranking.items != tuple(sorted(
                    ranking.items, key=lambda i: -ranking.scores[ranking.items.index(i)]))
                item = ranking.items[n % 4]
                (out,) = mt.track_many([Event(id=f"{user}-{n}", user=user, t=t + 2,
                                              kind="click", item=item, x=ITEMS[item],
                                              rid=ranking.rid)])
                assert out.status == "applied"
                t += 60
        assert explored > 0  # some slates were not the greedy ones
        for user in ("ann", "bob", "cyd"):
            assert encode_state(mt.state(user)) == encode_state(
                replay_user(mt.recorder, mt.configs, user, use_snapshots=False))
            for row in mt.recorder.read(user):
                event = event_from_log(row.body)
                if event.kind != EXPOSURE:
                    continue
                e = event.exposure
                at = replay_user(mt.recorder, mt.configs, user, until_seq=e.seq,
                                 use_snapshots=False)
                again = reproduce(at, e, event.rid, mt.configs.get(e.config))
                assert tuple(e.candidates[i] for i in again.order) == e.items
                assert again.propensities == e.propensities  # bit for bit
