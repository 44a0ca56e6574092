"""The append-only event log, snapshots and config versions (SQLite by default, PostgreSQL)."""

from store.catalog import Catalog
from store.journal import Journal, JournalStats, WriteRequest
from store.recorder import (
    AppendConflict,
    PostgresRecorder,
    Recorder,
    Snapshot,
    SQLiteRecorder,
    StoredEvent,
    StoreRefused,
    StoreUnavailable,
    UserLog,
    open_recorder,
)

__all__ = [
    "AppendConflict",
    "Catalog",
    "Journal",
    "JournalStats",
    "PostgresRecorder",
    "Recorder",
    "SQLiteRecorder",
    "Snapshot",
    "StoreRefused",
    "StoreUnavailable",
    "StoredEvent",
    "UserLog",
    "WriteRequest",
    "open_recorder",
]
