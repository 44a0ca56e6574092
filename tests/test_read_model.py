"""The read model: replicas kept from the feed equal the actors' states, bit for bit.

A real system (SQLite and PostgreSQL) commits events; its feed goes through a real pipe to a
`ReadModel` that has its own recorder, as a query process has.
"""

from __future__ import annotations

import multiprocessing
import time

import msgpack
import numpy as np
import pytest
from helpers import canonical

from actors import Microtune
from actors.configs import ConfigRegistry
from actors.read_model import ReadModel
from actors.segment_model import SegmentModels
from actors.user import rebuild
from events import TuningConfig
from events.types import Candidate, Event, Query
from store import open_recorder

DIM = 4
CFG = TuningConfig(version=1, dim=DIM)
CANDS = tuple(Candidate(f"i{k}", np.eye(DIM)[k]) for k in range(DIM))


def events(user: str, n: int, start: int = 0, t0: float = 1000.0) -> list[Event]:
    kinds = ("click", "impression", "dwell", "click", "hover")
    return [Event(id=f"{user}-{i}", user=user, t=t0 + 7.0 * i, kind=kinds[i % len(kinds)],
                  item=f"i{i % DIM}", x=np.eye(DIM)[i % DIM], dwell=12.0, hover=2.0)
            for i in range(start, start + n)]


def pump(model: ReadModel, conn, quiet: float = 0.2) -> None:
    """Hand the model every frame until the pipe stays quiet, then apply everything."""
    while conn.poll(quiet):
        model.on_frame(conn.recv_bytes())
    while model.catch_up(1000):
        pass


@pytest.fixture
def wired(store_url):
    mt = Microtune.open(store_url, CFG)
    here, there = multiprocessing.Pipe(duplex=True)
    reader_recorder = open_recorder(store_url)
    model = ReadModel(ConfigRegistry(reader_recorder, CFG), SegmentModels(), {})
    yield mt, model, there, here, reader_recorder
    mt.close()
    reader_recorder.close()


def same_answer(model: ReadModel, mt: Microtune, user: str) -> None:
    query = Query(user, CANDS)
    mine, theirs = model.rank(query), mt.rank(query)
    assert (mine.items, mine.scores, mine.weights, mine.seq) == (
        theirs.items, theirs.scores, theirs.weights, theirs.seq)


def test_replicas_equal_the_actors_states_bit_for_bit(wired):
    mt, model, conn, here, recorder = wired
    mt.track_many(events("old", 12))  # before the feed: the model must load it
    sender = mt.open_feed().attach(here, models_every=0.01)
    for k in range(3):
        mt.track_many(events("ann", 5, start=5 * k) + events("bob", 4, start=4 * k))
        pump(model, conn)
    assert model.has("ann") and model.has("bob")  # from their first event: nothing to load
    assert not model.has("old")  # seen only from seq 13: loaded when asked for

    # a load with events committed while it reads: the rows that come meanwhile go on top
    model.begin_load("old")
    mt.track_many(events("old", 3, start=12))
    state, _ = rebuild(recorder, model.configs, "old")
    mt.track_many(events("old", 4, start=15))
    pump(model, conn)
    model.finish_load("old", state)

    time.sleep(0.05)  # the segment models, sent when they moved
    pump(model, conn)
    for user in ("ann", "bob", "old"):
        assert model.seq(user) == mt.state(user).seq
        replica = model._replicas[user].state
        assert canonical(replica) == canonical(mt.state(user))
        same_answer(model, mt, user)
    assert model.stats.holes == 0 and model.stats.gaps == 0
    assert sender.gaps == 0


def test_a_dropped_backlog_drops_the_replicas_and_the_store_rebuilds_them(wired):
    mt, model, conn, here, recorder = wired
    sender = mt.open_feed().attach(here, max_rows=50, models_every=0.01)
    mt.track_many(events("ann", 3))
    pump(model, conn)
    assert model.seq("ann") == 3
    # the reader stops reading: the pipe fills, the sender's backlog passes its bound and is
    # replaced by a gap (the write side never waits for a reader)
    users = [f"u{k}" for k in range(40)]
    for k in range(40):
        mt.track_many([e for u in users for e in events(u, 3, start=3 * k)]
                      + events("ann", 1, start=3 + k))
    assert sender.gaps >= 1
    time.sleep(0.1)
    pump(model, conn)
    assert model.stats.gaps >= 1
    assert mt.state("ann").seq == 43
    assert not model.has("ann")  # dropped at the gap, not rebuilt from a partial feed
    model.begin_load("ann")
    state, _ = rebuild(recorder, model.configs, "ann")
    model.finish_load("ann", state)
    assert canonical(model._replicas["ann"].state) == canonical(mt.state("ann"))


def test_a_hole_in_a_replicas_seqs_drops_it_never_skips_an_event(wired):
    mt, model, conn, here, recorder = wired
    mt.open_feed().attach(here, models_every=0.01)
    mt.track_many(events("ann", 2))
    pump(model, conn)
    mt.track_many(events("ann", 3, start=2))  # seqs 3, 4, 5
    rows = list(recorder.read("ann"))
    # seq 5 arrives without 3 and 4 (as if the feed lost them)
    frame = msgpack.packb([["r", [[r.user, r.seq, r.event_id, r.body] for r in rows[4:]]]])
    model.on_frame(frame)
    assert model.rank(Query("ann", CANDS)) is None  # no answer from a state missing events
    assert model.stats.holes == 1 and not model.has("ann")


def test_forget_drops_the_replica(wired):
    mt, model, conn, here, _recorder = wired
    mt.open_feed().attach(here, models_every=0.01)
    mt.track_many(events("ann", 4))
    pump(model, conn)
    assert model.seq("ann") == 4
    mt.forget("ann", by="test")
    mt.track_many(events("ann", 1, start=10))  # a new history, seq 1 again
    pump(model, conn)
    assert model.seq("ann") == 1
    assert canonical(model._replicas["ann"].state) == canonical(mt.state("ann"))
