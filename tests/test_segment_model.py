"""The segment model: learned from a segment's users, stamped on their logged events, added to
their scores; checkpointed on SQLite and PostgreSQL; never a threat to replay's exactness."""

from __future__ import annotations

import numpy as np

from actors import Microtune, encode_state, replay_user
from events import Candidate, Event, Query, SegmentConfig, TuningConfig
from events.codec import event_from_log

DIM = 3
SPORTS, POLITICS, MUSIC = np.eye(DIM)
T0 = 1_700_000_000.0


def config(**seg) -> TuningConfig:
    return TuningConfig(version=1, dim=DIM, segments={"default": SegmentConfig(**seg)})


def crowd(users: int = 30, per_user: int = 12, automated: bool = False,
          prefix: str = "u") -> list[Event]:
    """Users who all click sports and see politics and music go by, minutes apart."""
    events = []
    for u in range(users):
        for n in range(per_user):
            t = T0 + 3600 * u + 120 * n
            item, x, kind = [("s", SPORTS, "click"), ("p", POLITICS, "impression"),
                             ("m", MUSIC, "impression")][n % 3]
            events.append(Event(id=f"{prefix}{u}-{n}", user=f"{prefix}{u}", t=t, kind=kind,
                                item=f"{item}{n}", x=x, automated=automated))
    return events


def rank_new_user(mt: Microtune) -> tuple[str, ...]:
    query = Query("newcomer", (Candidate("p", POLITICS), Candidate("s", SPORTS),
                               Candidate("m", MUSIC)))
    return mt.rank(query).items


def test_a_new_user_is_ranked_by_what_the_segment_learned(tmp_path):
    """Cold start: nobody has seen the newcomer, yet sports comes first, as it does for the
    segment; without the segment model the newcomer's ranking is the prior's (a tie)."""
    with Microtune.open(tmp_path / "on.db", config()) as mt:
        assert all(o.ok for o in mt.track_many(crowd()))
        assert rank_new_user(mt)[0] == "s"
        shared = mt.context.models.weights("default", DIM)
        assert shared[1] > 0.1 > max(shared[2], shared[3])
    with Microtune.open(tmp_path / "off.db", config(segment_model=False)) as mt:
        assert all(o.ok for o in mt.track_many(crowd()))
        assert rank_new_user(mt) == ("p", "s", "m")  # all scores equal: the stable order
        assert mt.context.models.weights("default", DIM) is None


def test_the_score_is_stamped_on_the_log_and_replay_stays_exact(tmp_path):
    """The logged event carries the model's score at ingest; the model moves on afterwards,
    and the user's state is still rebuilt bit for bit from the log alone."""
    with Microtune.open(tmp_path / "mt.db", config()) as mt:
        assert all(o.ok for o in mt.track_many(crowd()))
        expected = mt.context.models.score("default", SPORTS)
        probe = Event(id="probe", user="ann", t=T0 + 10**6, kind="click", item="s", x=SPORTS)
        assert mt.track_many([probe])[0].ok
        later = probe._replace(id="later", t=probe.t + 60)  # releases the probe (hygiene)
        assert mt.track_many([later])[0].ok
        logged = event_from_log(next(iter(mt.recorder.read("ann"))).body)
        assert logged.base == expected != 0.0
        before = mt.context.models.weights("default", DIM).copy()
        assert all(o.ok for o in mt.track_many(crowd(prefix="v")[::7]))  # the model moves on
        assert not np.array_equal(before, mt.context.models.weights("default", DIM))
        live = mt.state("ann")
        assert encode_state(live) == encode_state(
            replay_user(mt.recorder, mt.configs, "ann", use_snapshots=False))
        # a counterfactual without the segment model ignores the stamped scores
        alone = replay_user(mt.recorder, mt.configs, "ann", config=config(segment_model=False))
        assert not np.array_equal(alone.w, live.w)


def test_bots_teach_the_segment_model_nothing(tmp_path):
    with Microtune.open(tmp_path / "mt.db", config()) as mt:
        assert all(o.ok for o in mt.track_many(crowd(users=5, automated=True)))
        assert mt.context.models.steps == 0
        assert mt.context.models.weights("default", DIM) is None


def test_the_model_survives_a_restart_on_both_stores(store_url):
    with Microtune.open(store_url, config()) as mt:
        assert all(o.ok for o in mt.track_many(crowd(users=8)))
        saved = mt.context.models.weights("default", DIM).copy()
        steps = mt.context.models.steps
        assert steps > 0
    with Microtune.open(store_url, config()) as mt:
        assert np.array_equal(mt.context.models.weights("default", DIM), saved)
        assert mt.context.models.summary()["default"]["steps"] == steps
        assert rank_new_user(mt)[0] == "s"
    # a second checkpoint replaces the first (per segment: a row of weights, one of item
    # effects)
    with Microtune.open(store_url, config()) as mt:
        assert all(o.ok for o in mt.track_many(crowd(users=3, per_user=6, prefix="w")))
        moved = mt.context.models.weights("default", DIM).copy()
    with Microtune.open(store_url, config()) as mt:
        assert np.array_equal(mt.context.models.weights("default", DIM), moved)
        assert mt.recorder.counts()["mt_segment_models"] == 2


def test_any_valid_segment_rate_gives_a_valid_model_config():
    """A config that validates must never make the segment model's own config invalid (that
    would fail inside an actor's turn)."""
    from actors.segment_model import model_config

    for rate in (1e-6, 1e-4, 0.02, 5.0):
        own = model_config(config(segment_lr=rate), "default").segment("default")
        assert own.lr == own.lr_max == rate and 0 < own.lr_min <= rate


def test_workers_exchanging_deltas_after_every_step_learn_as_one_process():
    """A fleet's exchange (take_delta / add_delta): two models that learn alternate steps and
    pass each other their own changes after every step end where one model learning all of
    them ends (weights, Adagrad sums, item biases), and never send back what they received."""
    from actors.learning import Step
    from actors.segment_model import SegmentModels

    cfg = TuningConfig(version=1, dim=3)
    rng = np.random.default_rng(7)
    one, a, b = SegmentModels(), SegmentModels(), SegmentModels()
    a.start_sharing()
    b.start_sharing()
    for i in range(200):
        step = Step(f"e{i}", "click", 1.7e9 + i, "applied", y=float(rng.random() < 0.4),
                    importance=1.0, x=rng.normal(size=3), score=float(rng.normal()),
                    item=f"item{i % 7}")
        learner, other = (a, b) if i % 2 else (b, a)
        one.learn("default", [step], cfg)
        learner.learn("default", [step], cfg)
        other.add_delta(learner.take_delta())
        assert other.take_delta() == {}  # what it received is not its own to send
    for model in (a, b):
        for name in ("w", "v"):
            np.testing.assert_allclose(getattr(model._states["default"], name),
                                       getattr(one._states["default"], name), atol=1e-12)
        assert model._states["default"].steps == 200
        for item in (f"item{k}" for k in range(7)):
            assert abs(model.item_bias("default", item) - one.item_bias("default", item)) < 1e-12


def test_a_loaded_checkpoint_is_not_sent_as_learning():
    from actors.learning import Step
    from actors.segment_model import SegmentModels

    cfg = TuningConfig(version=1, dim=3)
    first = SegmentModels()
    first.learn("default", [Step("e", "click", 1.0, "applied", y=1.0, importance=1.0,
                                 x=np.ones(3), score=0.0, item="i")], cfg)
    loaded = SegmentModels()
    loaded.load(first.checkpoint())
    loaded.start_sharing()
    assert loaded.take_delta() == {}
