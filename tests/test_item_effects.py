"""Item effects (on by default): the segment model learns each item's own appeal beyond its
features, stamps it on logged events (replay stays exact), adds it to queries in process and
in the query processes, keeps at most `max_items`, and survives a restart, an export and an
import."""

from __future__ import annotations

import asyncio

import nats
import numpy as np
from helpers import until

from actors import Microtune, encode_state, replay_user
from actors.segment_model import SegmentModels
from adapters import client
from adapters.nats_service import Service, ServiceConfig
from events import Candidate, Event, Query, SegmentConfig, TuningConfig
from events.codec import event_from_log

DIM = 3
SAME = np.array([1.0, 0.0, 0.0])  # two items that look alike: only their appeal differs
T0 = 1_700_000_000.0


def config(**seg) -> TuningConfig:
    return TuningConfig(version=1, dim=DIM, segments={"default": SegmentConfig(
        hygiene=False, item_effects=True, **seg)})


def feedback(users: int = 20, per_user: int = 10) -> list[Event]:
    """Everyone likes "gem" and dislikes "dud", two items with the same features."""
    events = []
    for u in range(users):
        for n in range(per_user):
            item = "gem" if n % 2 else "dud"
            events.append(Event(id=f"u{u}-{n}", user=f"u{u}", t=T0 + 3600 * u + 60 * n,
                                kind="feedback", item=item, x=SAME,
                                target=1.0 if item == "gem" else 0.0))
    return events


def send(mt: Microtune, events: list[Event]) -> None:
    """User after user, as their visits come: each is stamped by what the model learned
    from the users before it."""
    for user in dict.fromkeys(e.user for e in events):
        outcomes = mt.track_many([e for e in events if e.user == user])
        assert {o.status for o in outcomes} == {"applied"}


def test_items_alike_by_features_are_told_apart_by_their_effects(tmp_path):
    with Microtune.open(tmp_path / "mt.db", config()) as mt:
        send(mt, feedback())
        models = mt.context.models
        gem, dud = models.item_bias("default", "gem"), models.item_bias("default", "dud")
        assert gem > 0.5 and dud < -0.5
        ranking = mt.rank(Query("newcomer", (Candidate("dud", SAME), Candidate("gem", SAME),
                                             Candidate("new", SAME))))
        assert ranking.items[0] == "gem" and ranking.items[-1] == "dud"  # "new": features
        # the stamped score carries the item's effect at the time: a user is its log
        for user in ("u0", "u19"):
            logged = [event_from_log(r.body) for r in mt.recorder.read(user)]
            assert all(e.base is not None for e in logged)
            assert encode_state(mt.state(user)) == encode_state(
                replay_user(mt.recorder, mt.configs, user, use_snapshots=False))
        last = [event_from_log(r.body) for r in mt.recorder.read("u19")]
        assert [e.base for e in last if e.item == "gem"][-1] > \
            [e.base for e in last if e.item == "dud"][-1]
    with Microtune.open(tmp_path / "mt.db", config()) as mt:  # the checkpoint restores them
        assert mt.context.models.item_bias("default", "gem") == gem


def test_switched_off_no_item_learns_anything(tmp_path):
    assert SegmentConfig().item_effects  # on by default (config schema 2)
    plain = TuningConfig(version=1, dim=DIM, segments={"default": SegmentConfig(
        hygiene=False, item_effects=False)})
    with Microtune.open(tmp_path / "mt.db", plain) as mt:
        mt.track_many(feedback())
        assert mt.context.models.item_bias("default", "gem") == 0.0
        assert mt.context.models.dump_items() == {}


def test_at_most_max_items_the_least_recently_learned_go_first():
    models = SegmentModels()
    cfg = config(max_items=3)
    from actors.learning import Step

    for n, item in enumerate(["a", "b", "c", "a", "d"]):
        models.learn("default", [Step(f"e{n}", "feedback", T0 + n, "applied", 1.0, 1.0, 0.5,
                                      0.1, np.zeros(DIM + 1), (), SAME, 0.0, item)], cfg)
    assert set(models.dump_items()["default"]) == {"a", "c", "d"}  # b was the oldest
    cursor, changed = models.item_changes(0)
    assert cursor == 5 and set(changed["default"]) == {"a", "c", "d"}
    assert models.item_changes(cursor) == (5, {})


def test_the_query_process_gets_the_item_effects_through_the_feed(server, tmp_path):
    async def scenario():
        system = Microtune.open(tmp_path / "mt.db", config())
        service = Service(system, ServiceConfig())
        await service.start(server.url)
        nc = await nats.connect(server.url)
        try:
            send(system, feedback())
            items = [("dud", SAME.tolist()), ("new", SAME.tolist()), ("gem", SAME.tolist())]

            async def first() -> str:
                return (await client.rank(nc, "newcomer", items, timeout=10)).items[0]

            answers: list[str] = []

            async def settled() -> bool:
                answers.append(await first())
                return answers[-1] == "gem"

            deadline = asyncio.get_running_loop().time() + 10
            while not await settled():
                assert asyncio.get_running_loop().time() < deadline, answers
                await asyncio.sleep(0.05)
            local = system.rank(Query("newcomer", tuple(Candidate(i, np.array(x))
                                                        for i, x in items)))
            for _ in range(100):  # the feed sends what the models learned within 0.1 s
                ranking = await client.rank(nc, "newcomer", items, timeout=10)
                if np.allclose(ranking.scores, local.scores, rtol=0, atol=1e-12):
                    break
                await asyncio.sleep(0.05)
            assert ranking.items == local.items
            assert np.allclose(ranking.scores, local.scores, rtol=0, atol=1e-12)
            await until(lambda: service.query_stats().get("loop_errors") == 0,
                        what="query stats")
        finally:
            await nc.close()
            await service.stop()
            system.close()

    asyncio.run(scenario())


def test_export_and_import_carry_the_item_effects(tmp_path):
    from adapters.cli import main

    store, copy = str(tmp_path / "mt.db"), str(tmp_path / "copy.db")
    with Microtune.open(store, config()) as mt:
        send(mt, feedback(users=6))
        gem = mt.context.models.item_bias("default", "gem")
    assert gem > 0  # checkpointed on close
    out = tmp_path / "users.jsonl"
    assert main(["export", "--store", store, "--format", "jsonl", "--out", str(out)]) == 0
    assert main(["import", str(out), "--store", copy]) == 0
    with Microtune.open(copy, config()) as mt:
        assert mt.context.models.item_bias("default", "gem") == gem


def test_the_item_table_evicts_the_least_recently_learned_and_reads_old_checkpoints():
    """actors/item_effects.py: a full table drops its least recently learned 1% at once;
    a checkpoint keeps the learning order; the first format (a map) still loads."""
    import msgpack
    import pytest

    from actors.item_effects import ItemEffects

    table = ItemEffects()
    for n in range(1000):
        slot, bias = table.fade(f"i{n}", float(n), 1e9, max_items=1000)
        table.step(slot, bias, 0.5, 0.4)
    table.fade("i0", 2000.0, 1e9, max_items=1000)  # i0 learned again: now the newest
    table.fade("new", 2001.0, 1e9, max_items=1000)  # full: the oldest 10 go
    assert len(table) == 991
    assert "i0" in table.index and "new" in table.index
    assert not {f"i{n}" for n in range(1, 11)} & table.index.keys()
    assert table.get("i11") == pytest.approx(-0.4)  # Adagrad: 0.4 / sqrt(0.25) * 0.5
    again = ItemEffects.decode(ItemEffects.encode(table.snapshot()))
    assert again.as_map() == table.as_map()
    assert min(again.index, key=lambda i: again.touched[again.index[i]]) == "i11"
    old = msgpack.packb({"a": [0.25, 1.0, 5.0], "b": [-0.5, 2.0, 6.0]}, use_bin_type=True)
    assert ItemEffects.decode(old).as_map() == {"a": 0.25, "b": -0.5}
    biases = again.biases(["i11", "nope", "new"])
    assert biases.tolist() == [pytest.approx(-0.4), 0.0, table.get("new")]
