"""Shared fixtures: real stores only (SQLite files, and the PostgreSQL server when reachable)."""

from __future__ import annotations

import contextlib
import logging
import os
import uuid

import pytest
import structlog

# A `serve` the tests start takes no metrics port unless the test asks for one: a developer's
# `make serve` beside `make test` holds 9464
os.environ.setdefault("MICROTUNE_METRICS_PORT", "0")

PG_URL = os.environ.get(
    "MICROTUNE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def _pg_unreachable_reason() -> str | None:
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install 'microtune[postgres]')"
    try:
        dsn = PG_URL.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(dsn, connect_timeout=3):
            return None
    except Exception as exc:
        return f"no PostgreSQL server reachable at {PG_URL}: {str(exc).splitlines()[0]}"


_PG_REASON = _pg_unreachable_reason()


@contextlib.contextmanager
def fresh_pg_schema():
    """A PostgreSQL URL whose search_path is a fresh schema, dropped afterwards."""
    import psycopg

    schema = f"mt_test_{uuid.uuid4().hex[:12]}"
    dsn = PG_URL.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def pg_url():
    if _PG_REASON is not None:
        pytest.skip(_PG_REASON)
    with fresh_pg_schema() as url:
        yield url


@pytest.fixture
def server(tmp_path):
    """A nats-server of the test's own (JetStream, a free loopback port), stopped after."""
    from adapters.embedded import EmbeddedNats

    srv = EmbeddedNats(tmp_path / "nats").start()
    yield srv
    srv.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path):
    """Every store test runs on SQLite (WAL) and on PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "microtune.db")
    return request.getfixturevalue("pg_url")
