"""The store's schema revisions (store/migrate.py, store/migrations): they build exactly the
tables store/schema.py describes, on SQLite and PostgreSQL; a store from before revisions is
adopted with its data; a newer store is refused with a message; readers never change it."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from actors import Microtune
from events import Event, TuningConfig
from store import migrate, open_recorder
from store.recorder import store_url as url_of
from store.schema import metadata

CFG = TuningConfig(version=1, dim=2)


def _events(n: int, user: str = "ann") -> list[Event]:
    return [Event(id=f"e{i}", user=user, t=10.0 + i, kind="click", item="a", x=np.ones(2))
            for i in range(n)]


def test_head_is_the_newest_revision_and_the_chain_is_linear():
    revisions = migrate.revisions()
    assert revisions[-1][0] == migrate.HEAD
    assert revisions[0][0] == migrate.BASELINE
    assert len({r for r, _ in revisions}) == len(revisions)


def test_the_revisions_build_exactly_the_tables_of_the_schema(store_url):
    recorder = open_recorder(store_url)
    try:
        with recorder.engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"version_table": migrate.VERSION_TABLE})
            assert context.get_current_revision() == migrate.HEAD
            assert compare_metadata(context, metadata) == []  # no table, column or key apart
    finally:
        recorder.close()


def test_a_store_from_before_revisions_is_adopted_with_its_data(tmp_path):
    from alembic import command

    path = tmp_path / "old.db"
    with Microtune.open(path, CFG) as mt:  # written, then made to look like the old code's:
        mt.track_many(_events(5))  # the baseline's tables, with data, and no version table
    engine = create_engine(url_of(path))
    with engine.begin() as conn:
        command.downgrade(migrate._config(conn), migrate.BASELINE)
        conn.execute(text(f"DROP TABLE {migrate.VERSION_TABLE}"))
    assert not inspect(engine).has_table(migrate.VERSION_TABLE)
    assert not inspect(engine).has_table("mt_partitions")
    assert migrate.current(engine) == migrate.BASELINE  # its tables say what it is
    engine.dispose()
    with pytest.raises(migrate.StoreBehind, match=r"0001.*microtune migrate"):
        open_recorder(path, upgrade=False)  # a reader changes nothing
    with Microtune.open(path, CFG) as mt:  # a writer brings it to this version's revision
        assert migrate.current(mt.recorder.engine) == migrate.HEAD
        assert mt.recorder.last_seq("ann") == 5
        mt.track_many(_events(7)[5:])
        assert mt.recorder.last_seq("ann") == 7
        assert inspect(mt.recorder.engine).has_table("mt_partitions")


def test_a_store_of_a_newer_version_is_refused_with_a_message(tmp_path):
    path = tmp_path / "new.db"
    with Microtune.open(path, CFG) as mt:
        mt.track_many(_events(2))
    engine = create_engine(url_of(path))
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {migrate.VERSION_TABLE} SET version_num = '9999'"))
    engine.dispose()
    for upgrade in (True, False):
        with pytest.raises(migrate.StoreTooNew, match=r"9999.*upgrade microtune"):
            open_recorder(path, upgrade=upgrade)
    for argv in (["migrate", "--check"], ["migrate"], ["stats"]):
        done = subprocess.run([sys.executable, "-m", "adapters.cli", *argv, "--store",
                               str(path)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, (argv, done.stdout, done.stderr)
        assert "9999" in done.stdout + done.stderr
        assert "Traceback" not in done.stdout + done.stderr


def test_readers_refuse_a_store_that_is_behind_and_migrate_brings_it_up(tmp_path):
    path = tmp_path / "empty.db"
    create_engine(url_of(path)).dispose()  # a database with no tables yet
    with pytest.raises(migrate.StoreBehind, match="microtune migrate"):
        open_recorder(path, upgrade=False)
    check = [sys.executable, "-m", "adapters.cli", "migrate", "--check", "--store", str(path)]
    assert subprocess.run(check, capture_output=True, timeout=120).returncode == 1
    done = subprocess.run([sys.executable, "-m", "adapters.cli", "migrate", "--store",
                           str(path)], capture_output=True, text=True, timeout=120)
    said = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 0 and f"none -> {migrate.HEAD}" in said
    assert subprocess.run(check, capture_output=True, timeout=120).returncode == 0
    open_recorder(path, upgrade=False).close()  # now a reader opens it
