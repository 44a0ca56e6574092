"""The append-only event log, snapshots and config versions (SQLite by default, PostgreSQL)."""

from store.journal import Journal, JournalStats, WriteRequest
from store.recorder import (
    AppendConflict,
    PostgresRecorder,
    Recorder,
    Snapshot,
    SQLiteRecorder,
    StoredEvent,
    open_recorder,
)

__all__ = [
    "AppendConflict",
    "Journal",
    "JournalStats",
    "PostgresRecorder",
    "Recorder",
    "SQLiteRecorder",
    "Snapshot",
    "StoredEvent",
    "WriteRequest",
    "open_recorder",
]
