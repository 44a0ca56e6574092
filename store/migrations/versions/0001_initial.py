"""The store as it was when revisions began: the log, snapshots, imported ids, configs, the
catalog, the audit trail, segment models, experiments; on PostgreSQL the audited erasure
`mt_forget` (SECURITY DEFINER: the service's role needs no DELETE on the log).

A store written before revisions existed has exactly these tables: store/migrate.py stamps it
with this revision instead of creating them.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

FORGET_FUNCTION = """
    CREATE FUNCTION mt_forget(target text, audit bytea,
                              OUT n_events bigint, OUT n_snapshots bigint,
                              OUT audit_id integer)
    LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
    BEGIN
        DELETE FROM mt_events WHERE user_id = target;
        GET DIAGNOSTICS n_events = ROW_COUNT;
        DELETE FROM mt_snapshots WHERE user_id = target;
        GET DIAGNOSTICS n_snapshots = ROW_COUNT;
        DELETE FROM mt_imported_ids WHERE user_id = target;
        INSERT INTO mt_audit (body) VALUES (audit) RETURNING id INTO audit_id;
    END $$
"""


def upgrade() -> None:
    op.create_table(
        "mt_events",
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("event_id", sa.String(128), nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("user_id", "seq", name="mt_events_pk"),
        sa.UniqueConstraint("user_id", "event_id", name="mt_events_event_id_uq"),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "mt_snapshots",
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("schema", sa.Integer, nullable=False),
        sa.Column("state", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("user_id", "seq", name="mt_snapshots_pk"),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "mt_imported_ids",
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("event_id", sa.String(128), nullable=False),
        sa.PrimaryKeyConstraint("user_id", "event_id", name="mt_imported_ids_pk"),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "mt_configs",
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "mt_catalog",
        sa.Column("item_id", sa.String(128), primary_key=True),
        sa.Column("features", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "mt_audit",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("body", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "mt_segment_models",
        sa.Column("segment", sa.String(128), primary_key=True),
        sa.Column("state", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "mt_experiments",
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("name", "version", name="mt_experiments_pk"),
    )
    create_forget_function()


def create_forget_function() -> None:
    """PostgreSQL only. Every role may execute a new function: only grantees may erase."""
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(FORGET_FUNCTION)
    op.execute("REVOKE EXECUTE ON FUNCTION mt_forget(text, bytea) FROM PUBLIC")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION mt_forget(text, bytea)")
    for table in ("mt_experiments", "mt_segment_models", "mt_audit", "mt_catalog",
                  "mt_configs", "mt_imported_ids", "mt_snapshots", "mt_events"):
        op.drop_table(table)
