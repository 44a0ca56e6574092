"""Recorders: the append-only event log, snapshots and config versions behind one interface.

As in the `eventsourcing` library, one recorder per storage backend: `SQLiteRecorder`
(WAL, the default) and `PostgresRecorder` (shared deployments). The interface has no update
or delete of events. A batch append is one transaction: either every row lands or none does.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import structlog
from sqlalchemy import Engine, bindparam, create_engine, event, func, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError

from store.schema import configs, events, metadata, snapshots

log = structlog.get_logger(__name__)


class StoredEvent(NamedTuple):
    user: str
    seq: int
    event_id: str
    body: bytes


class Snapshot(NamedTuple):
    user: str
    seq: int
    schema: int
    state: bytes


class AppendConflict(Exception):
    """A batch was refused: some (user, event id) or (user, seq) rows already exist."""

    def __init__(self, duplicate_ids: set[tuple[str, str]], taken_seqs: set[tuple[str, int]]):
        super().__init__(f"{len(duplicate_ids)} duplicate ids, {len(taken_seqs)} taken seqs")
        self.duplicate_ids = duplicate_ids
        self.taken_seqs = taken_seqs


class Recorder:
    """SQLAlchemy Core implementation shared by the backends; subclasses set dialect details."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        metadata.create_all(engine)
        self._insert_snapshot = self._insert_ignore(snapshots)
        self._insert_config = self._insert_ignore(configs)
        self._read_tail = (
            select(events.c.seq, events.c.event_id, events.c.body)
            .where(events.c.user_id == bindparam("u"), events.c.seq > bindparam("after"))
            .order_by(events.c.seq)
        )
        self._read_snapshot = (
            select(snapshots.c.seq, snapshots.c.schema, snapshots.c.state)
            .where(snapshots.c.user_id == bindparam("u"))
            .order_by(snapshots.c.seq.desc())
            .limit(1)
        )

    def _insert_ignore(self, table):  # pragma: no cover - each backend defines it
        raise NotImplementedError

    # ------------------------------------------------------------ writes

    def append(
        self, rows: Sequence[StoredEvent], snaps: Sequence[Snapshot] = ()
    ) -> None:
        """Append events (and snapshots) in one transaction; `AppendConflict` if refused."""
        try:
            with self.engine.begin() as conn:
                if rows:
                    conn.execute(
                        events.insert(),
                        [
                            {"user_id": r.user, "seq": r.seq, "event_id": r.event_id,
                             "body": r.body}
                            for r in rows
                        ],
                    )
                if snaps:
                    conn.execute(
                        self._insert_snapshot,
                        [
                            {"user_id": s.user, "seq": s.seq, "schema": s.schema,
                             "state": s.state}
                            for s in snaps
                        ],
                    )
        except IntegrityError:
            raise self._conflicts(rows) from None

    def _conflicts(self, rows: Sequence[StoredEvent]) -> AppendConflict:
        """After a refused batch: which of its rows collide with the log (rare path)."""
        by_user: dict[str, list[StoredEvent]] = {}
        for r in rows:
            by_user.setdefault(r.user, []).append(r)
        dup_ids: set[tuple[str, str]] = set()
        taken: set[tuple[str, int]] = set()
        query = select(events.c.seq, events.c.event_id).where(
            events.c.user_id == bindparam("u"),
            (events.c.seq.in_(bindparam("seqs", expanding=True)))
            | (events.c.event_id.in_(bindparam("ids", expanding=True))),
        )
        with self.engine.connect() as conn:
            for user, urows in by_user.items():
                ids = {r.event_id for r in urows}
                seqs = {r.seq for r in urows}
                for seq, event_id in conn.execute(
                    query, {"u": user, "seqs": sorted(seqs), "ids": sorted(ids)}
                ):
                    if event_id in ids:
                        dup_ids.add((user, event_id))
                    if seq in seqs:
                        taken.add((user, seq))
        return AppendConflict(dup_ids, taken)

    def save_snapshots(self, snaps: Sequence[Snapshot]) -> None:
        self.append((), snaps)

    def save_config(self, version: int, body: bytes) -> bool:
        """Record a config version (append-only: an existing version is never replaced)."""
        with self.engine.begin() as conn:
            existing = conn.execute(
                select(configs.c.body).where(configs.c.version == version)
            ).scalar()
            if existing is not None:
                return existing == body
            conn.execute(self._insert_config, [{"version": version, "body": body}])
            return True

    # ------------------------------------------------------------ reads

    def load(self, user: str) -> tuple[Snapshot | None, list[StoredEvent]]:
        """What activation needs: the latest snapshot and the events after it."""
        with self.engine.connect() as conn:
            snap_row = conn.execute(self._read_snapshot, {"u": user}).first()
            snap = None if snap_row is None else Snapshot(user, *snap_row)
            tail = conn.execute(
                self._read_tail, {"u": user, "after": 0 if snap is None else snap.seq}
            ).all()
        return snap, [StoredEvent(user, seq, eid, body) for seq, eid, body in tail]

    def read(
        self, user: str, after_seq: int = 0, until_seq: int | None = None
    ) -> Iterator[StoredEvent]:
        """A user's events with after_seq < seq <= until_seq, in order, streamed."""
        query = (
            select(events.c.seq, events.c.event_id, events.c.body)
            .where(events.c.user_id == user, events.c.seq > after_seq)
            .order_by(events.c.seq)
        )
        if until_seq is not None:
            query = query.where(events.c.seq <= until_seq)
        with self.engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=2000).execute(query)
            for seq, event_id, body in result:
                yield StoredEvent(user, seq, event_id, body)

    def read_all(self, users: Iterable[str] | None = None) -> Iterator[StoredEvent]:
        """Every event ordered by (user, seq), streamed: never the whole log in memory."""
        query = select(events.c.user_id, events.c.seq, events.c.event_id, events.c.body)
        if users is not None:
            query = query.where(events.c.user_id.in_(list(users)))
        query = query.order_by(events.c.user_id, events.c.seq)
        with self.engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=5000).execute(query)
            for row in result:
                yield StoredEvent(*row)

    def latest_snapshot(self, user: str, max_seq: int | None = None) -> Snapshot | None:
        query = select(snapshots.c.seq, snapshots.c.schema, snapshots.c.state).where(
            snapshots.c.user_id == user
        )
        if max_seq is not None:
            query = query.where(snapshots.c.seq <= max_seq)
        with self.engine.connect() as conn:
            row = conn.execute(query.order_by(snapshots.c.seq.desc()).limit(1)).first()
        return None if row is None else Snapshot(user, *row)

    def last_seq(self, user: str) -> int:
        with self.engine.connect() as conn:
            return conn.execute(
                select(func.coalesce(func.max(events.c.seq), 0)).where(
                    events.c.user_id == user
                )
            ).scalar_one()

    def configs(self) -> dict[int, bytes]:
        with self.engine.connect() as conn:
            return dict(conn.execute(select(configs.c.version, configs.c.body)).all())

    def users(self) -> Iterator[str]:
        with self.engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=5000).execute(
                select(events.c.user_id).distinct().order_by(events.c.user_id)
            )
            for (user,) in result:
                yield user

    def count_events(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(events)).scalar_one()

    def close(self) -> None:
        self.engine.dispose()


class SQLiteRecorder(Recorder):
    """SQLite in WAL mode: readers never block the single writer (the journal).

    `synchronous=FULL` by default so that a commit, and so every ack, survives power loss;
    group commit makes that one fsync per batch, not per event.
    """

    def __init__(self, url: str, *, synchronous: str = "FULL") -> None:
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={synchronous}")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        super().__init__(engine)

    def _insert_ignore(self, table):
        return sqlite_insert(table).on_conflict_do_nothing()


class PostgresRecorder(Recorder):
    def __init__(self, url: str) -> None:
        super().__init__(create_engine(url, pool_size=8, max_overflow=8, pool_pre_ping=True))

    def _insert_ignore(self, table):
        return pg_insert(table).on_conflict_do_nothing()


def open_recorder(url_or_path: str | Path) -> Recorder:
    """A recorder for a SQLAlchemy URL, or a SQLite file for a plain path."""
    url = str(url_or_path)
    if "://" not in url:
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{url}"
    if url.startswith("sqlite"):
        return SQLiteRecorder(url)
    if url.startswith("postgresql"):
        if url.startswith("postgresql://"):  # psycopg 3 is the driver we ship
            url = "postgresql+psycopg://" + url[len("postgresql://"):]
        return PostgresRecorder(url)
    raise ValueError(f"unsupported store URL {url!r} (sqlite:/// or postgresql://)")


def ping(recorder: Recorder) -> None:
    with recorder.engine.connect() as conn:
        conn.execute(text("SELECT 1"))
