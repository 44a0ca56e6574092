"""The store's schema, versioned: Alembic revisions (store/migrations/versions) create and
upgrade the tables on SQLite and PostgreSQL alike.

Opening a store checks its revision (one query, in `mt_schema_version`): at `HEAD`, nothing
more; behind it, the revisions run (a writer's open, or `microtune migrate`); ahead of it (a
newer microtune wrote it), the open is refused with a message, since this code cannot know
what the newer tables mean. A store written before revisions existed holds exactly the
tables of revision 0001 and no version table: it is stamped 0001, then upgraded.

On PostgreSQL the revisions need the store owner's rights (CREATE); a service role granted
only what the README lists cannot run them: open the store once as its owner, or run
`microtune migrate --store URL` as the owner, after each upgrade of microtune.
"""

from __future__ import annotations

import time
from pathlib import Path

import structlog
from sqlalchemy import inspect
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

log = structlog.get_logger(__name__)

VERSION_TABLE = "mt_schema_version"
HEAD = "0002"  # the newest revision in versions/ (tests/test_migrations.py checks it)
BASELINE = "0001"  # the tables a store had before revisions existed
_SCRIPTS = Path(__file__).parent / "migrations"


class SchemaMismatch(Exception):
    """The store's schema revision is not the one this code reads and writes."""


class StoreTooNew(SchemaMismatch):
    """The store was written by a newer microtune."""

    def __init__(self, revision: str) -> None:
        self.revision = revision
        super().__init__(f"the store is at schema revision {revision}, which this microtune "
                         f"does not know (it knows up to {HEAD}): upgrade microtune, or open a "
                         "copy of the store written by this version")


class StoreBehind(SchemaMismatch):
    """The store needs revisions that this open may not run."""

    def __init__(self, revision: str | None) -> None:
        self.revision = revision
        super().__init__(f"the store is at schema revision {revision or 'none'}, this "
                         f"microtune needs {HEAD}: run `microtune migrate --store ...` (on "
                         "PostgreSQL, as the store's owner)")


def _config(connection: Connection):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(_SCRIPTS))
    config.attributes["connection"] = connection
    return config


def revisions() -> list[tuple[str, str]]:
    """Every known revision, oldest first, with the first line of its description."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(_SCRIPTS))
    scripts = ScriptDirectory.from_config(config)
    out = [(s.revision, (s.doc or "").strip().splitlines()[0] if s.doc else "")
           for s in scripts.walk_revisions()]
    return out[::-1]


def current(engine: Engine) -> str | None:
    """The store's revision: None for an empty database, BASELINE for a store written before
    revisions (its tables, no version table)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        revision = MigrationContext.configure(
            conn, opts={"version_table": VERSION_TABLE}).get_current_revision()
        if revision is None and inspect(conn).has_table("mt_events"):
            return BASELINE
        return revision


def ensure(engine: Engine, *, upgrade: bool = True) -> None:
    """Check the store's revision at open; run what is missing if `upgrade`, else raise
    `StoreBehind`. Raises `StoreTooNew` for a revision this code does not know."""
    revision = current(engine)
    if revision == HEAD:
        return
    if revision is not None and revision not in {r for r, _ in revisions()}:
        raise StoreTooNew(revision)
    if not upgrade:
        raise StoreBehind(revision)
    for attempt in range(5):
        try:
            migrate(engine)
            return
        except DBAPIError:
            # another writer (a fleet's workers starting together on a new store) ran the
            # same revisions at the same moment; each runs in one transaction, so once it
            # committed there is nothing left to run here
            if current(engine) == HEAD:
                return
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))


def migrate(engine: Engine, to: str = "head") -> tuple[str | None, str | None]:
    """Run the revisions up to `to` (default: the newest); returns (from, to)."""
    from alembic import command

    before = current(engine)
    if before is not None and before not in {r for r, _ in revisions()}:
        raise StoreTooNew(before)
    with engine.begin() as conn:
        config = _config(conn)
        if before == BASELINE and not _stamped(conn):  # written before revisions existed
            command.stamp(config, BASELINE)  # (with mt_forget on PostgreSQL: the owner's
            # first open made both, then and now)
        command.upgrade(config, to)
    after = current(engine)
    if after != before:
        log.info("store.migrated", from_revision=before, to_revision=after)
    return before, after


def _stamped(conn: Connection) -> bool:
    return inspect(conn).has_table(VERSION_TABLE)
