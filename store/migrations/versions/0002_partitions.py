"""Partitions for a fleet: mt_partitions (each partition's lease epoch, its owner, since when)
and mt_settings (the number of partitions, fixed per deployment).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mt_partitions",
        sa.Column("part", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("epoch", sa.BigInteger, nullable=False),
        sa.Column("owner", sa.String(256), nullable=False),
        sa.Column("since", sa.Float, nullable=False),
    )
    op.create_table(
        "mt_settings",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(256), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("mt_settings")
    op.drop_table("mt_partitions")
