"""The dedupe memory survives export and import: an id applied long before the export (older
than the state's ring of recent ids) is still a duplicate in the imported store."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import fresh_pg_schema
from sqlalchemy import func, select

from actors import Microtune, encode_state
from actors.state import RECENT_IDS
from adapters.cli import main
from adapters.export import read_export
from events import Event, TuningConfig
from store import open_recorder
from store.schema import imported_ids

CFG = TuningConfig(version=1, dim=3)


@pytest.fixture
def other_store_url(store_url, tmp_path):
    """A second, empty store on the same backend as `store_url`."""
    if "://" not in store_url:
        yield str(tmp_path / "imported.db")
        return
    with fresh_pg_schema() as url:
        yield url


def click(user: str, event_id: str, t: float) -> Event:
    x = np.array([1.0, -0.5, 0.25]) * (1 + (hash(event_id) % 7) / 10)
    return Event(id=event_id, user=user, t=t, kind="click", item="a", x=x)


def history(user: str, count: int) -> list[Event]:
    return [click(user, f"{user}-{i}", 1_700_000_000.0 + 60 * i) for i in range(count)]


def imported_count(url: str, user: str) -> int:
    recorder = open_recorder(url)
    try:
        with recorder.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(imported_ids)
                                .where(imported_ids.c.user_id == user)).scalar_one()
    finally:
        recorder.close()


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "msgpack"])
def test_an_id_older_than_the_ring_is_a_duplicate_after_import(store_url, other_store_url,
                                                               tmp_path, capsys, fmt):
    alice = history("alice", 50)  # alice-0 .. alice-17 have left the ring of 32
    with Microtune.open(store_url, CFG, snapshot_every=10) as mt:
        assert all(o.ok for o in mt.track_many(alice[:30] + history("bob", 5)))
        assert all(o.ok for o in mt.track_many(alice[30:]))
        assert mt.track_many([alice[3]])[0].status == "duplicate"  # the log's key, here
    out = tmp_path / f"users.{fmt}"
    assert main(["export", "--store", store_url, "--format", fmt, "--out", str(out)]) == 0
    _head, records = read_export(out)
    by_user = {r["user"]: r for r in records}
    assert list(by_user["alice"]["ids"]) == [e.id for e in alice]
    assert main(["import", str(out), "--store", other_store_url]) == 0

    old = alice[3]
    assert len(alice) - RECENT_IDS >= 4  # alice-3 (seq 4) is not in the ring (the last 32)
    with Microtune.open(other_store_url, CFG) as mt:
        before = encode_state(mt.state("alice"))
        assert before == by_user["alice"]["state"]
        outcomes = mt.track_many([
            click("alice", "alice-new", 1_800_000_000.0),
            old,  # applied long before the export: refused by the imported ids
            alice[45],  # in the ring: refused by the state
            click("bob", "bob-new", 1_800_000_000.0),
        ])
        assert [o.status for o in outcomes] == ["applied", "duplicate", "duplicate", "applied"]
        assert outcomes[0].seq == 51 and outcomes[3].seq == 6
        assert [r.event_id for r in mt.recorder.read("alice")] == ["restore-50", "alice-new"]
        # refused alone too, and again after the user comes back from its snapshot
        assert mt.track_many([alice[0]])[0].status == "duplicate"
        mt.passivate_all()
        assert mt.track_many([alice[17]])[0].status == "duplicate"
        assert mt.track_many([click("alice", "alice-new2", 1_800_000_060.0)])[0].seq == 52
    with Microtune.open(other_store_url, CFG) as mt:  # and after a restart
        assert mt.track_many([old])[0].status == "duplicate"
        assert mt.state("alice").seq == 52


def test_the_memory_carries_over_a_second_import_and_forget_clears_it(
        store_url, other_store_url, tmp_path, capsys):
    with Microtune.open(store_url, CFG) as mt:
        assert all(o.ok for o in mt.track_many(history("alice", 40) + history("bob", 3)))
    first = tmp_path / "first.jsonl"
    assert main(["export", "--store", store_url, "--format", "jsonl", "--out", str(first)]) == 0
    assert main(["import", str(first), "--store", other_store_url]) == 0
    # export the imported store as it is (bob's log is only its restore event, whose id the
    # next import's restore event takes again), then import that into a third store
    second = tmp_path / "second.jsonl"
    assert main(["export", "--store", other_store_url, "--format", "jsonl", "--out",
                 str(second)]) == 0
    records = {r["user"]: r for r in map(json.loads, second.read_text().splitlines()[1:])}
    # the imported ids too, and the log's (the restore events')
    assert set(records["alice"]["ids"]) == {e.id for e in history("alice", 40)} | {"restore-40"}
    assert set(records["bob"]["ids"]) == {"bob-0", "bob-1", "bob-2", "restore-3"}
    third = str(tmp_path / "third.db")
    assert main(["import", str(second), "--store", third]) == 0
    with Microtune.open(third, CFG) as mt:
        assert mt.track_many([history("alice", 40)[2]])[0].status == "duplicate"
        assert mt.track_many([history("bob", 3)[0]])[0].status == "duplicate"

    assert imported_count(other_store_url, "alice") == 40
    assert main(["forget", "--store", other_store_url, "--user", "alice", "--yes"]) == 0
    assert imported_count(other_store_url, "alice") == 0
    assert imported_count(other_store_url, "bob") == 3
    with Microtune.open(other_store_url, CFG) as mt:  # a new, empty history
        assert mt.track_many([history("alice", 40)[2]])[0].seq == 1


def test_an_export_without_ids_still_imports(store_url, other_store_url, tmp_path, capsys):
    """An export written before ids were carried: the users come back without the memory."""
    with Microtune.open(store_url, CFG) as mt:
        assert all(o.ok for o in mt.track_many(history("alice", 5)))
    path = tmp_path / "users.jsonl"
    assert main(["export", "--store", store_url, "--format", "jsonl", "--out", str(path)]) == 0
    lines = path.read_text().splitlines()
    stripped = [lines[0]] + [json.dumps({k: v for k, v in json.loads(line).items()
                                         if k != "ids"}) for line in lines[1:]]
    path.write_text("\n".join(stripped) + "\n")
    assert main(["import", str(path), "--store", other_store_url]) == 0
    assert imported_count(other_store_url, "alice") == 0
    with Microtune.open(other_store_url, CFG) as mt:
        assert mt.state("alice").seq == 5
