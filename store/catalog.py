"""The content catalog: item id -> feature vector, persisted, cached in memory.

Events and queries may name an item without its features; ingest resolves them here, and the
features are logged with the event, so replay never depends on today's catalog.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import numpy as np
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError

from store.recorder import Recorder, StoreRefused, StoreUnavailable, is_refusal
from store.schema import catalog

_F64 = np.dtype("<f8")


class Catalog:
    def __init__(self, recorder: Recorder) -> None:
        self._recorder = recorder
        self._lock = threading.Lock()
        self._items = read_items(recorder)

    def __len__(self) -> int:
        return len(self._items)

    def get(self, item: str) -> np.ndarray | None:
        return self._items.get(item)

    def cache(self, items: Iterable[tuple[str, np.ndarray]]) -> None:
        """Items another process stored (a fleet's worker that consumes the catalog)."""
        with self._lock:
            for item, x in items:
                self._items[item] = _frozen(np.ascontiguousarray(x, _F64))

    def upsert(self, items: Iterable[tuple[str, np.ndarray]]) -> int:
        """Insert or replace items' features (persisted before they are served). Raises
        `StoreUnavailable` (retry) or `StoreRefused` (never), as `Recorder.append` does."""
        rows = [
            {"item_id": item, "features": np.ascontiguousarray(x, _F64).tobytes()}
            for item, x in items
        ]
        if not rows:
            return 0
        dialect = self._recorder.engine.dialect.name
        insert = pg_insert(catalog) if dialect == "postgresql" else sqlite_insert(catalog)
        stmt = insert.on_conflict_do_update(
            index_elements=[catalog.c.item_id], set_={"features": insert.excluded.features}
        )
        try:
            with self._lock, self._recorder.engine.begin() as conn:
                conn.execute(stmt, rows)
        except DBAPIError as exc:  # as the recorder does: a refusal is final, else retry
            dbapi = self._recorder.engine.dialect.dbapi
            if is_refusal(dbapi, exc.orig):
                raise StoreRefused(str(exc.orig).splitlines()[0]) from exc
            raise StoreUnavailable(str(exc.orig).splitlines()[0]) from exc
        with self._lock:
            for row in rows:
                self._items[row["item_id"]] = _frozen(np.frombuffer(row["features"], _F64))
        return len(rows)


def read_items(recorder: Recorder) -> dict[str, np.ndarray]:
    """Every item's features, read-only arrays."""
    with recorder.engine.connect() as conn:
        return {item: _frozen(np.frombuffer(raw, dtype=_F64))
                for item, raw in conn.execute(select(catalog.c.item_id, catalog.c.features))}


def _frozen(x: np.ndarray) -> np.ndarray:
    x.flags.writeable = False
    return x
