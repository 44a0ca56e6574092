"""The quality benchmark's protocol on a tiny synthetic sample in MovieLens's recbole format
(the real data is fetched by scripts/bench_quality.py; its licence forbids shipping it)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from actors.segment_model import SegmentModels
from adapters import quality as q
from events.partitions import partition_of

GENRES = ["Action", "Comedy", "Drama", "Horror", "Sci-Fi"]


def sample(users: int = 30, per_user: int = 60, seed: int = 0) -> tuple[str, str]:
    """Users who like some genres and dislike others; ratings 1-5 in recbole's files."""
    rng = np.random.default_rng(seed)
    items = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    item_genres = {}
    for i in range(1, 121):
        gs = list(rng.choice(GENRES, size=rng.integers(1, 3), replace=False))
        item_genres[str(i)] = gs
        items.append(f"{i}\tMovie {i}\t1990\t{' '.join(gs)}")
    taste = {str(u): dict(zip(GENRES, rng.normal(size=len(GENRES)) * 2, strict=True))
             for u in range(1, users + 1)}
    rows = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for u, k in itertools.product(range(1, users + 1), range(per_user)):
        item = str(rng.integers(1, 121))
        score = sum(taste[str(u)][g] for g in item_genres[item])
        rating = int(np.clip(round(3 + score + rng.normal()), 1, 5))
        rows.append(f"{u}\t{item}\t{rating}\t{880000000 + k * 100 + u}")
    return "\n".join(rows), "\n".join(items)


def test_the_stream_is_time_ordered_labelled_and_multi_hot():
    inter = ("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
             "1\t10\t5\t300\n2\t11\t3\t100\n3\t10\t4\t300\n")
    items = ("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
             "10\tA\t1990\tComedy Drama\n11\tB\t1991\tAction\n")
    stream = q.load(inter, items)
    assert stream.genres == ["Action", "Comedy", "Drama"]
    assert [(r.user, r.y) for r in stream.ratings] == [("2", 0.0), ("1", 1.0), ("3", 1.0)]
    assert stream.ratings[1].x.tolist() == [0.0, 1.0, 1.0]


def test_auc_against_all_pairs():
    rng = np.random.default_rng(1)
    y = (rng.random(300) < 0.4).astype(float)
    p = np.round(rng.random(300), 1)  # many ties
    pos, neg = p[y == 1], p[y == 0]
    pairs = np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])
    assert q.auc(y, p) == pytest.approx(pairs)
    assert q.auc(np.array([0, 1.0]), np.array([0.1, 0.9])) == 1.0
    assert q.log_loss(np.array([1.0]), np.array([0.5])) == pytest.approx(np.log(2))


def test_microtune_predicts_before_it_learns_and_learns_tastes():
    stream = q.load(*sample())
    result = q.microtune(stream)
    # flipping a rating's label changes no prediction up to and including its own
    i = len(stream.ratings) // 2
    flipped = stream.ratings[i]._replace(y=1.0 - stream.ratings[i].y)
    other = q.microtune(q.Stream([*stream.ratings[:i], flipped, *stream.ratings[i + 1:]],
                                 stream.genres))
    assert np.array_equal(other.predictions[:i + 1], result.predictions[:i + 1])
    assert not np.array_equal(other.predictions, result.predictions)
    assert result.figures["auc_last_half"] > 0.7, result.figures
    baseline = q.user_mean(stream).figures["auc_last_half"]
    assert result.figures["auc_last_half"] > baseline
    # the cold-start figure covers each user's first ratings only
    assert result.cold.sum() == 30 * q.COLD
    assert result.figures["auc_cold"] == q.auc(result.labels[result.cold],
                                                 result.predictions[result.cold])


def test_the_paired_bootstrap_interval():
    stream = q.load(*sample())
    users = [r.user for r in stream.ratings]
    ours, flat = q.microtune(stream), q.global_mean(stream)
    assert q.auc_difference(ours, ours, users, resamples=20) == (0.0, 0.0, 0.0)
    diff, low, high = q.auc_difference(ours, flat, users, resamples=50)
    assert 0.1 < low < diff < high, (diff, low, high)


def test_as_a_fleet_each_worker_learns_from_its_own_users_only():
    stream = q.load(*sample())
    models = [SegmentModels(), SegmentModels()]
    fleet = q.microtune(stream, workers=2, models=models)
    assert fleet.config == "defaults, as 2 workers"
    whole = [SegmentModels()]
    one = q.microtune(stream, models=whole)
    assert not np.array_equal(fleet.predictions, one.predictions)
    assert models[0].checkpoint() != models[1].checkpoint()
    assert 0 < models[0].steps < whole[0].steps == models[0].steps + models[1].steps
    for k in (0, 1):
        # the fleet's split: partition n of 16 on worker n % 2
        ix = [i for i, r in enumerate(stream.ratings) if partition_of(r.user, 16) % 2 == k]
        assert 0 < len(ix) < len(stream.ratings)
        # worker k's models are exactly those of a process that saw only its users, and its
        # users were stamped and predicted with them
        alone = [SegmentModels()]
        own = q.microtune(q.Stream([stream.ratings[i] for i in ix], stream.genres),
                          models=alone)
        assert models[k].steps == alone[0].steps
        assert models[k].checkpoint() == alone[0].checkpoint()
        assert np.array_equal(fleet.predictions[ix], own.predictions)


def test_merging_the_workers_models_after_every_rating_is_one_process():
    stream = q.load(*sample(users=10, per_user=40))
    one = q.microtune(stream)
    for workers in (2, 3):
        models = [SegmentModels() for _ in range(workers)]
        merged = q.microtune(stream, workers=workers, models=models, merge_every=1)
        assert np.allclose(merged.predictions, one.predictions, rtol=0, atol=1e-9)
        assert all(m.checkpoint() == models[0].checkpoint() for m in models)
        learned = [m.summary()["default"]["steps"] for m in models]  # each holds everyone's
        assert learned == [sum(m.steps for m in models)] * workers
    rare = q.microtune(stream, workers=2, merge_every=100)
    apart = q.microtune(stream, workers=2)
    assert not np.array_equal(rare.predictions, one.predictions)
    assert not np.array_equal(rare.predictions, apart.predictions)


def test_the_peers_run_the_same_protocol():
    pytest.importorskip("vowpalwabbit", reason="benchmark extra: pip install -e '.[bench]'")
    pytest.importorskip("river", reason="benchmark extra: pip install -e '.[bench]'")
    stream = q.load(*sample(users=10, per_user=40))
    for result in (q.vw(stream, "-q ug -l 0.5"), q.river_per_user(stream, 0.05),
                   q.river_global(stream, 0.05)):
        assert len(result.predictions) == len(stream.ratings)
        assert result.figures["auc"] > 0.6, (result.config, result.figures)
