"""The tables. The log is per user: (user, seq) gap-free from 1, event id unique per user."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    UniqueConstraint,
)

metadata = MetaData()

events = Table(
    "mt_events",
    metadata,
    Column("user_id", String(128), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("event_id", String(128), nullable=False),
    Column("body", LargeBinary, nullable=False),  # msgpack, events.encode_logged_event
    PrimaryKeyConstraint("user_id", "seq", name="mt_events_pk"),
    UniqueConstraint("user_id", "event_id", name="mt_events_event_id_uq"),
    sqlite_with_rowid=False,  # the (user, seq) key is the table: one B-tree fewer per insert
)

snapshots = Table(
    "mt_snapshots",
    metadata,
    Column("user_id", String(128), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("schema", Integer, nullable=False),
    Column("state", LargeBinary, nullable=False),  # msgpack, actors.state.encode_state
    PrimaryKeyConstraint("user_id", "seq", name="mt_snapshots_pk"),
    sqlite_with_rowid=False,
)

imported_ids = Table(
    "mt_imported_ids",
    metadata,
    # an imported user's event ids from before its `restore` event (adapters/export.py): its
    # dedupe memory, which the append path checks (Recorder._after_insert), so that an old id
    # redelivered after an import is refused as a duplicate, as the log's unique key would
    Column("user_id", String(128), nullable=False),
    Column("event_id", String(128), nullable=False),
    PrimaryKeyConstraint("user_id", "event_id", name="mt_imported_ids_pk"),
    sqlite_with_rowid=False,
)

configs = Table(
    "mt_configs",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("body", LargeBinary, nullable=False),  # msgpack, TuningConfig.encode
)

catalog = Table(
    "mt_catalog",
    metadata,
    Column("item_id", String(128), primary_key=True),
    Column("features", LargeBinary, nullable=False),  # float64 little-endian
)

audit_log = Table(
    "mt_audit",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    # msgpack: what was done, when (wall clock), by whom and why; never a user id or any
    # other personal data (an erasure's record must not keep what it erased)
    Column("body", LargeBinary, nullable=False),
)

segment_models = Table(
    "mt_segment_models",
    metadata,
    # a learned cache, not history: one row per segment, replaced at each checkpoint
    Column("segment", String(128), primary_key=True),
    Column("state", LargeBinary, nullable=False),  # msgpack, actors.state.encode_state
)

experiments = Table(
    "mt_experiments",
    metadata,
    # append-only: each start, ramp and stop of an experiment is a new version of its
    # definition (msgpack, actors.experiments.Experiment.to_map), with who, when and why
    Column("name", String(128), nullable=False),
    Column("version", Integer, nullable=False),
    Column("body", LargeBinary, nullable=False),
    PrimaryKeyConstraint("name", "version", name="mt_experiments_pk"),
)

# A fleet's partitions (events/partitions.py; revision 0002): the lease epoch of each, which
# every fenced journal batch must match (store/fencing.py), and who took it last
partitions = Table(
    "mt_partitions",
    metadata,
    Column("part", Integer, primary_key=True, autoincrement=False),
    Column("epoch", BigInteger, nullable=False),
    Column("owner", String(256), nullable=False),
    Column("since", Float, nullable=False),  # wall-clock seconds of the claim
)

# deployment settings that must never change under the data: the number of partitions
settings = Table(
    "mt_settings",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", String(256), nullable=False),
)
