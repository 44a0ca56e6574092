"""The append-only event log, snapshots and config versions (SQLite by default, PostgreSQL)."""

# First, before any other import: importing it checks that `events`, `store`, `actors` and
# `adapters` are microtune's own here, with a clear error if not (README "Installed names").
# If `events` itself is another one, the check cannot be imported: say so instead.
try:
    from events import _distribution  # noqa: F401
except ImportError as error:
    if error.name != "events":
        raise
    raise ImportError(
        f"microtune cannot import its own `events` ({error}): another module or folder named "
        "`events` comes first on sys.path, or microtune's is missing. Rename that one or start "
        'Python from another directory; README "Installed names" says more.'
    ) from error

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
