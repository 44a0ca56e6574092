"""Activation reads the store only for users it has a log of: a new user costs no read."""

from __future__ import annotations

import numpy as np

from actors import Microtune
from events import Event, TuningConfig
from store import SQLiteRecorder

CFG = TuningConfig(version=1, dim=3)


class CountingRecorder(SQLiteRecorder):
    """The real SQLite recorder, counting activation reads."""

    loads = 0

    def load(self, user):
        CountingRecorder.loads += 1
        return super().load(user)


def click(user: str, event_id: str, t: float) -> Event:
    return Event(id=event_id, user=user, t=t, kind="click", item="a", x=np.ones(3))


def test_a_user_with_no_history_is_activated_without_a_store_read(tmp_path):
    url = f"sqlite:///{tmp_path / 'mt.db'}"
    with Microtune(CountingRecorder(url), CFG) as mt:
        mt.track_many([click("old", f"e{i}", float(i)) for i in range(3)])
    CountingRecorder.loads = 0
    with Microtune(CountingRecorder(url), CFG) as mt:
        assert mt.state("new").seq == 0 and CountingRecorder.loads == 0
        assert mt.state("old").seq == 3 and CountingRecorder.loads == 1
        mt.track_many([click("new", "n1", 10.0)])
        mt.forget("old")
        assert "old" not in mt.context.known and "new" in mt.context.known
    CountingRecorder.loads = 0
    with Microtune(CountingRecorder(url), CFG) as mt:
        assert mt.state("new").seq == 1 and CountingRecorder.loads == 1  # known after restart


def test_a_wrong_guess_heals_itself_on_the_first_write(tmp_path):
    """Were a user with a log missing from the set, its first write would collide with the
    log's seqs; the actor then rebuilds from the store and writes after the log's end."""
    with Microtune.open(tmp_path / "mt.db", CFG) as mt:
        mt.track_many([click("ann", f"e{i}", float(i)) for i in range(3)])
        mt.passivate_all()
        mt.context.known.discard("ann")
        (outcome,) = mt.track_many([click("ann", "e3", 3.0)])
        assert outcome.status == "applied" and outcome.seq == 4
        (repeat,) = mt.track_many([click("ann", "e0", 0.0)])
        assert repeat.status == "duplicate"
        assert [r.seq for r in mt.recorder.read("ann")] == [1, 2, 3, 4]
