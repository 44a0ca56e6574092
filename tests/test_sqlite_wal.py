"""A new SQLite connection switches the store to WAL even while another process writes.

SQLite refuses the switch at once, without its busy wait, while another connection holds a
write lock; workers, query processes and tools that started together on a new store died
of it now and then ("database is locked" from PRAGMA journal_mode=WAL)."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from store.recorder import wal_mode


def _writing(path) -> sqlite3.Connection:
    """A connection in the middle of a write (its lock held until COMMIT)."""
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("CREATE TABLE t (x)")
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO t VALUES (1)")
    return writer


def test_the_switch_to_wal_waits_for_a_writer(tmp_path):
    path = tmp_path / "store.db"
    writer = _writing(path)
    # the premise: SQLite's own busy wait does not cover it
    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        sqlite3.connect(path, timeout=5).execute("PRAGMA journal_mode=WAL")
    assert time.monotonic() - started < 1.0

    result: dict = {}

    def switch() -> None:
        conn = sqlite3.connect(path, timeout=5)
        try:
            wal_mode(conn.cursor(), patience=10.0)
            result["mode"] = conn.execute("PRAGMA journal_mode").fetchone()[0]
        except Exception as exc:  # the assertion below shows it
            result["error"] = repr(exc)
        finally:
            conn.close()

    thread = threading.Thread(target=switch)
    thread.start()
    time.sleep(0.3)
    writer.execute("COMMIT")
    thread.join(15)
    assert result == {"mode": "wal"}


def test_a_lock_that_outlasts_the_patience_is_raised(tmp_path):
    path = tmp_path / "store.db"
    writer = _writing(path)
    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        wal_mode(sqlite3.connect(path, timeout=5).cursor(), patience=0.3)
    assert 0.3 <= time.monotonic() - started < 3.0
    writer.execute("COMMIT")
