"""Snapshot export and import: every user's current state, in JSON lines, Parquet or msgpack.

An export is a consistent point-in-time view of the store (one read transaction, see
`Recorder.scan`), written user by user in constant memory. Each record has what an analyst
reads (user, seq, config version, segment, session, bot verdict, weights) and the full state
(`state`, the snapshot encoding) that `import` restores bit for bit. The header carries every
tuning-config version, so an imported store replays and learns exactly as the original did,
and the segment models (as of their last checkpoint), so it also scores as the original did.

- jsonl: a header line, then one JSON object per user (`state` in base64);
- msgpack: a header map, then one map per user (`state` as bytes, `w` as a float list);
- parquet: one row per user; the header is the file's key-value metadata `microtune`.

An imported user's log starts with one `restore` event at the exported seq (its history
before that stays in the source store); new events follow from seq + 1. Each record also
carries the user's event ids up to that seq (`ids`), which the import records so that an old
id redelivered to the new store is refused as a duplicate, as it would have been in the old.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Container, Iterator
from pathlib import Path
from typing import Any

import msgpack

from actors.configs import ConfigRegistry
from actors.item_effects import ItemEffects
from actors.replay import current_states
from actors.segment_model import ITEMS_SUFFIX
from actors.state import UserState, decode_state, encode_state
from events.codec import encode_logged_event
from events.config import TuningConfig
from events.types import Event
from store.recorder import Recorder, StoredEvent

FORMATS = ("jsonl", "parquet", "msgpack")
EXPORT_SCHEMA = 1
PARQUET_ROWS = 5000  # rows per Parquet row group: the writer's memory bound
IMPORT_BATCH = 1000  # restore events per transaction


def record(state: UserState, ids: list[str] | None = None) -> dict[str, Any]:
    """One user's export record (`state`: the full encoded state, bytes; `ids`: the user's
    event ids up to its seq, the dedupe memory)."""
    h = state.hyg
    return {
        "user": state.user,
        "seq": state.seq,
        "config": state.config,
        "segment": state.segment,
        "session": None if h is None else h.session,
        "session_start": None if h is None else h.session_start,
        "bot": None if h is None or not h.bot else h.bot,
        "steps": state.steps,
        "w": state.w.tolist(),
        "state": encode_state(state),
        "ids": ids or [],
    }


def header(configs: ConfigRegistry, segment_models: dict[str, bytes]) -> dict[str, Any]:
    return {
        "microtune_export": EXPORT_SCHEMA,
        "created": time.time(),
        "configs": {str(v): c.to_map() for v, c in sorted(configs.versions().items())},
        # as of their last checkpoint: the weights (or the item effects' count) to read, the
        # state to import
        "segment_models": {name: _segment_model(name, raw)
                           for name, raw in sorted(segment_models.items())},
    }


def _segment_model(name: str, raw: bytes) -> dict[str, Any]:
    state = base64.b64encode(raw).decode("ascii")
    if name.endswith(ITEMS_SUFFIX):  # a segment's item effects
        return {"items": len(ItemEffects.decode(raw)), "state": state}
    return {"w": decode_state(raw).w.tolist(), "state": state}


def export(recorder: Recorder, configs: ConfigRegistry, path: str | Path, fmt: str, *,
           users: Container[str] | None = None,
           progress: Callable[[], None] | None = None) -> int:
    """Write every user's current state (or only `users`) to `path`; returns the count."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    writer = _WRITERS[fmt](Path(path), header(configs, recorder.segment_models()))
    # A second stream, beside the scan's and begun after it: the ids up to a user's exported
    # seq never change later (append-only), so a later read has all of them.
    id_rows = recorder.export_ids()
    ids = _IdsByUser(id_rows)
    count = 0
    try:
        for state in current_states(recorder, configs, users=users):
            writer.write(record(state, ids.up_to(state.user, state.seq)))
            count += 1
            if progress is not None:
                progress()
    finally:
        id_rows.close()  # its connection goes back now, not when collected
        writer.close()
    return count


class _IdsByUser:
    """Walks `Recorder.export_ids` (ordered by user, as the scan) alongside the scan."""

    def __init__(self, rows: Iterator[tuple[str, int, str]]) -> None:
        self._rows = rows
        self._next: tuple[str, int, str] | None = None
        self._started = False

    def up_to(self, user: str, seq: int) -> list[str]:
        """The user's ids with seq <= `seq` (users before it are skipped for good)."""
        if not self._started:  # only now, once the scan has begun: no id it has is missed
            self._started = True
            self._next = next(self._rows, None)
        while self._next is not None and self._next[0] < user:
            self._next = next(self._rows, None)
        ids = []
        while self._next is not None and self._next[0] == user:
            if self._next[1] <= seq:
                ids.append(self._next[2])
            self._next = next(self._rows, None)
        return ids


def read_export(path: str | Path, fmt: str | None = None) -> tuple[dict, Iterator[dict]]:
    """The header and the records of an export file (streamed)."""
    path = Path(path)
    fmt = fmt or guess_format(path)
    return _READERS[fmt](path)


def guess_format(path: Path) -> str:
    suffix = path.suffix.lstrip(".").lower()
    aliases = {"json": "jsonl", "ndjson": "jsonl", "pq": "parquet", "mpk": "msgpack",
               "msgpack": "msgpack", "jsonl": "jsonl", "parquet": "parquet"}
    if suffix not in aliases:
        raise ValueError(f"cannot tell the format of {path.name}; give --format")
    return aliases[suffix]


def import_(recorder: Recorder, path: str | Path, fmt: str | None = None, *,
            progress: Callable[[], None] | None = None) -> int:
    """Restore an export into an empty store: its config versions, and per user one
    `restore` event at the exported seq. Returns the number of users."""
    if recorder.count_events():
        raise ValueError("import needs an empty store (this one has events)")
    head, records = read_export(path, fmt)
    if head.get("microtune_export") != EXPORT_SCHEMA:
        raise ValueError(f"not a microtune export of schema {EXPORT_SCHEMA}")
    for _version, body in sorted(head["configs"].items(), key=lambda kv: int(kv[0])):
        config = TuningConfig.from_map(body, stored=True)  # its schema's defaults
        if not recorder.save_config(config.version, config.encode()):
            raise ValueError(f"config version {config.version} exists with other values")
    recorder.save_segment_models({name: base64.b64decode(m["state"])
                                  for name, m in head.get("segment_models", {}).items()})
    batch: list[StoredEvent] = []
    seen: list[tuple[str, str]] = []  # the batch's users' ids (an older export has none)
    count = 0
    for rec in records:
        state = decode_state(rec["state"])
        event = Event(id=f"restore-{state.seq}", user=state.user, t=max(state.t_last, 0.0),
                      kind="restore", config=state.config or None, restored=rec["state"])
        batch.append(StoredEvent(state.user, state.seq, event.id, encode_logged_event(event)))
        # not the restore's own id: a store imported before may have logged the same one
        seen.extend((state.user, i) for i in rec.get("ids") or () if i != event.id)
        count += 1
        if progress is not None:
            progress()
        if len(batch) >= IMPORT_BATCH:
            _restore_batch(recorder, batch, seen)
            batch, seen = [], []
    if batch:
        _restore_batch(recorder, batch, seen)
    return count


def _restore_batch(recorder: Recorder, batch: list[StoredEvent],
                   seen: list[tuple[str, str]]) -> None:
    # the ids first: a user is never in the log without its dedupe memory
    recorder.save_imported_ids(seen)
    recorder.append(batch)


# ---------------------------------------------------------------- formats


class _Jsonl:
    def __init__(self, path: Path, head: dict) -> None:
        self.f = path.open("w", encoding="utf-8")
        self.f.write(json.dumps(head) + "\n")

    def write(self, rec: dict) -> None:
        self.f.write(json.dumps({**rec, "state": base64.b64encode(rec["state"]).decode()})
                     + "\n")

    def close(self) -> None:
        self.f.close()


def _read_jsonl(path: Path) -> tuple[dict, Iterator[dict]]:
    f = path.open(encoding="utf-8")
    head = json.loads(f.readline())

    def records() -> Iterator[dict]:
        with f:
            for line in f:
                rec = json.loads(line)
                rec["state"] = base64.b64decode(rec["state"])
                yield rec

    return head, records()


class _Msgpack:
    def __init__(self, path: Path, head: dict) -> None:
        self.f = path.open("wb")
        self.packer = msgpack.Packer(use_bin_type=True)
        self.f.write(self.packer.pack(head))

    def write(self, rec: dict) -> None:
        self.f.write(self.packer.pack(rec))

    def close(self) -> None:
        self.f.close()


def _read_msgpack(path: Path) -> tuple[dict, Iterator[dict]]:
    f = path.open("rb")
    unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=False)
    head = next(unpacker)

    def records() -> Iterator[dict]:
        with f:
            yield from unpacker

    return head, records()


class _Parquet:
    def __init__(self, path: Path, head: dict) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.pa = pa
        self.schema = pa.schema(
            [("user", pa.string()), ("seq", pa.int64()), ("config", pa.int32()),
             ("segment", pa.string()), ("session", pa.int64()),
             ("session_start", pa.float64()), ("bot", pa.string()), ("steps", pa.int64()),
             ("w", pa.list_(pa.float64())), ("state", pa.binary()),
             ("ids", pa.list_(pa.string()))],
            metadata={"microtune": json.dumps(head)})
        self.writer = pq.ParquetWriter(path, self.schema)
        self.rows: list[dict] = []

    def write(self, rec: dict) -> None:
        self.rows.append(rec)
        if len(self.rows) >= PARQUET_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self.rows:
            self.writer.write_table(self.pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []

    def close(self) -> None:
        self._flush()
        self.writer.close()


def _read_parquet(path: Path) -> tuple[dict, Iterator[dict]]:
    import pyarrow.parquet as pq

    f = pq.ParquetFile(path)
    head = json.loads(f.schema_arrow.metadata[b"microtune"])

    def records() -> Iterator[dict]:
        for batch in f.iter_batches(batch_size=PARQUET_ROWS):
            yield from batch.to_pylist()

    return head, records()


_WRITERS = {"jsonl": _Jsonl, "msgpack": _Msgpack, "parquet": _Parquet}
_READERS = {"jsonl": _read_jsonl, "msgpack": _read_msgpack, "parquet": _read_parquet}
