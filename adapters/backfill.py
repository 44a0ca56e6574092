"""Backfill: publish a file of past events as history (`microtune import-events FILE`).

Each record is a wire-format event map (README "Wire format"), in JSON lines or a msgpack
stream. It goes out on `<prefix>.events.<user>` through JetStream with `bf: true`, so that
data hygiene trusts its time (README "Backfill"), and with the header
`Nats-Msg-Id: <user>.<id>`: JetStream's dedupe window is stream-wide and event ids are unique
only per user. Every record is first decoded exactly as the service decodes it, so what the
service would refuse for its form (a missing field, a bad user token, an oversize payload) is
refused here, with the reason, and never sent. Publishing waits for every PubAck; one with
`duplicate` set was already in the stream within its dedupe window.

A PubAck means the broker stored the event; the service may still reject it for what only it
knows (a feature dimension, an item missing from the catalog): those go to
`<prefix>.rejected` as any rejection does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import msgpack
import structlog
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from adapters.ops import OperatorError, _json, _quiet, console
from events.codec import decode_event
from events.errors import Reason, Rejected
from events.limits import DEFAULT_LIMITS, Limits

log = structlog.get_logger(__name__)

FORMATS = ("jsonl", "msgpack")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".msgpack": "msgpack",
             ".mpk": "msgpack", ".msgpk": "msgpack"}
MAX_EXAMPLES = 10  # refusals reported one by one; the rest only counted


@dataclass(slots=True)
class ImportReport:
    """What `publish_file` did with every record of the file."""

    records: int = 0
    published: int = 0  # stored by JetStream
    duplicates: int = 0  # the PubAck's `duplicate`: the same <user>.<id> within the window
    refused: Counter = field(default_factory=Counter)  # reason -> records never sent
    failed: Counter = field(default_factory=Counter)  # error -> sent, but no PubAck
    # (record number from 1, reason, detail) of the first MAX_EXAMPLES refusals and failures
    examples: list[tuple[int, str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.refused and not self.failed

    def note(self, number: int, reason: str, detail: str, counter: Counter) -> None:
        counter[reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append((number, reason, detail))

    def to_map(self) -> dict[str, Any]:
        return {"records": self.records, "published": self.published,
                "duplicates": self.duplicates, "refused": dict(self.refused),
                "failed": dict(self.failed),
                "examples": [{"record": n, "reason": r, "detail": d}
                             for n, r, d in self.examples]}


# ---------------------------------------------------------------- reading


def detect_format(path: Path) -> str:
    """From the file name, else from its first byte: '{' is JSON lines, anything else a
    msgpack stream (whose maps start with 0x80-0x8f, 0xde or 0xdf)."""
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is not None:
        return fmt
    with path.open("rb") as f:
        head = f.read(64).lstrip()
    return "jsonl" if head[:1] == b"{" else "msgpack"


def read_records(f: IO[bytes], fmt: str) -> Iterator[tuple[Any, int]]:
    """(record, bytes read so far) for each record of the file; a record that cannot be
    parsed comes as a `Rejected` (reason malformed). A broken msgpack stream cannot be
    resynchronised: its first bad record ends the reading."""
    if fmt == "jsonl":
        position = 0
        for line in f:
            position += len(line)
            if not line.strip():
                continue
            try:
                yield json.loads(line), position
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError alike
                yield Rejected(Reason.MALFORMED, f"not JSON: {exc}"), position
        return
    unpacker = msgpack.Unpacker(f, raw=False, max_buffer_size=DEFAULT_LIMITS.max_payload_bytes
                                * 16)
    while True:
        start = unpacker.tell()  # after OutOfData, tell() counts the partial record too
        try:
            record = unpacker.unpack()
        except msgpack.OutOfData:
            if start < _size(f):  # a record cut off at the end of the file
                yield Rejected(Reason.MALFORMED, "a truncated msgpack record at the end"), \
                    unpacker.tell()
            return
        except Exception as exc:  # msgpack raises several types for garbage
            yield Rejected(Reason.MALFORMED, f"not valid msgpack ({type(exc).__name__}); "
                                             "the rest of the stream is unreadable"), \
                unpacker.tell()
            return
        yield record, unpacker.tell()


def _size(f: IO[bytes]) -> int:
    try:
        return os.fstat(f.fileno()).st_size
    except (OSError, AttributeError, ValueError):
        return 0


def prepare(record: Any, limits: Limits = DEFAULT_LIMITS) -> tuple[str, str, bytes]:
    """(user, Nats-Msg-Id, payload) of one record as a backfill event; raises `Rejected`
    for whatever the service would refuse on the form alone (its own decoder decides)."""
    if not isinstance(record, dict):
        raise Rejected(Reason.MALFORMED, f"a record must be a map, not {type(record).__name__}")
    try:
        payload = msgpack.packb({**record, "bf": True}, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise Rejected(Reason.WRONG_TYPE, f"cannot be encoded as msgpack: {exc}") from None
    event = decode_event(payload, limits)
    return event.user, f"{event.user}.{event.id}", payload


# ---------------------------------------------------------------- publishing


async def check_stream(js, prefix: str) -> str | None:
    """The JetStream stream that takes `<prefix>.events.>`; `LookupError` without one (or
    without JetStream at all); None if this client may not ask (a `publisher` may only
    publish events: then the first publish tells)."""
    from nats import errors
    from nats.js.errors import NotFoundError

    try:
        return await js.find_stream_name_by_subject(f"{prefix}.events.backfill")
    except errors.TimeoutError:  # a permissions violation gets no reply
        return None
    except (NotFoundError, errors.NoRespondersError):  # no stream; JetStream off
        raise LookupError(f"no JetStream stream takes {prefix}.events.>: start the service "
                          "once (it creates the stream) or check --prefix") from None


async def publish_file(js, path: Path, *, prefix: str = "microtune", fmt: str | None = None,
                       limits: Limits = DEFAULT_LIMITS, ack_timeout: float = 30.0,
                       progress: Callable[[int, ImportReport], None] | None = None,
                       ) -> ImportReport:
    """Publish every record of `path` as a backfill event and wait for every PubAck.

    `js`: a JetStream context (its `publish_async_max_pending` bounds the acks awaited at
    once). Records go out in file order on one connection, so each user's history is logged
    in that order: give it oldest first (README "Backfill"). `progress(bytes read, report)`
    is called as the file is read."""
    from nats import errors

    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {FORMATS}")
    size = path.stat().st_size
    report = ImportReport()
    waiting: set[asyncio.Future] = set()

    def acked(future: asyncio.Future, number: int) -> None:
        waiting.discard(future)
        if future.cancelled():
            report.note(number, "cancelled", "no PubAck", report.failed)
            return
        exc = future.exception()
        if exc is not None:
            report.note(number, type(exc).__name__, str(exc) or type(exc).__name__,
                        report.failed)
        elif future.result().duplicate:
            report.duplicates += 1
        else:
            report.published += 1

    with path.open("rb") as f:
        for record, position in read_records(f, fmt):
            report.records += 1
            number = report.records
            try:
                if isinstance(record, Rejected):
                    raise record
                user, msg_id, payload = prepare(record, limits)
            except Rejected as exc:
                report.note(number, exc.reason.value, exc.detail, report.refused)
            else:
                try:
                    future = await js.publish_async(f"{prefix}.events.{user}", payload,
                                                     wait_stall=ack_timeout,
                                                     headers={"Nats-Msg-Id": msg_id})
                except errors.Error as exc:  # acks stalled, the connection lost: stop here
                    report.note(number, type(exc).__name__, "not sent; the import stopped "
                                "here", report.failed)
                    break
                waiting.add(future)
                future.add_done_callback(lambda fut, n=number: acked(fut, n))
            if progress is not None:
                progress(position, report)
    if waiting:
        _done, late = await asyncio.wait(set(waiting), timeout=ack_timeout)
        for future in late:
            future.cancel()
        await asyncio.sleep(0)  # let the cancelled futures' callbacks count them
    if progress is not None:
        progress(size, report)
    log.info("backfill.published", path=str(path), **{k: v for k, v in report.to_map().items()
                                                     if k != "examples"})
    return report


# ---------------------------------------------------------------- the command


def _connect_options(args: argparse.Namespace) -> dict[str, Any]:
    """NATS credentials: what every microtune client reads from the environment
    (`adapters.auth.client_options`: MICROTUNE_NATS_USER, _PASSWORD or _PASSWORD_FILE, _TOKEN,
    _CREDS), or `--nats-user` with its password from MICROTUNE_NATS_PASSWORD or
    `--nats-password-file`. Never a password on the command line: `ps` and shell histories
    would show it."""
    from adapters.auth import client_options

    options = client_options()
    if not args.nats_user:
        return options
    if args.nats_password_file:
        password = args.nats_password_file.read_text().strip()
    else:
        password = os.environ.get("MICROTUNE_NATS_PASSWORD") or options.get("password")
    if not password:
        raise OperatorError("--nats-user needs a password: MICROTUNE_NATS_PASSWORD or "
                            "--nats-password-file")
    options.update(user=args.nats_user, password=password)
    return options


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="microtune import-events",
        description="Publish a file of past events (wire-format maps, JSON lines or msgpack) "
                    "as history: with bf=true, so their event times are trusted, and "
                    "Nats-Msg-Id <user>.<id>. Exit 1 if any record was refused or not acked.")
    parser.add_argument("file", type=Path)
    parser.add_argument("--format", choices=FORMATS,
                        help="default: from the file name (.jsonl, .msgpack), else its content")
    parser.add_argument("--nats-url", default=os.environ.get("MICROTUNE_NATS_URL"),
                        help="the NATS server the service consumes from [env "
                             "MICROTUNE_NATS_URL]")
    parser.add_argument("--prefix", default=os.environ.get("MICROTUNE_PREFIX", "microtune"))
    parser.add_argument("--nats-user",
                        help="NATS user (default: the environment's, MICROTUNE_NATS_USER); the "
                             "password comes from MICROTUNE_NATS_PASSWORD or "
                             "--nats-password-file")
    parser.add_argument("--nats-password-file", type=Path)
    parser.add_argument("--window", type=int, default=1000,
                        help="PubAcks awaited at once (default 1000)")
    parser.add_argument("--ack-timeout", type=float, default=30.0,
                        help="seconds to wait for acks (default 30)")
    parser.add_argument("--json", action="store_true", help="the report as JSON on stdout")
    args = parser.parse_args(argv)
    if not args.nats_url:
        parser.error("--nats-url (or MICROTUNE_NATS_URL) is required")
    if not args.file.is_file():
        raise OperatorError(f"no file {args.file}")
    options = _connect_options(args)
    report = asyncio.run(_run(args, options))
    if args.json:
        _json(report.to_map())
    refused = sum(report.refused.values())
    failed = sum(report.failed.values())
    console.print(f"{report.records:,} records: {report.published:,} published, "
                  f"{report.duplicates:,} duplicates (already in the stream), {refused:,} "
                  f"refused here, {failed:,} not acknowledged")
    for reason, count in sorted({**report.refused, **report.failed}.items()):
        console.print(f"  {reason}: {count:,}")
    for number, reason, detail in report.examples:
        console.print(f"  record {number}: {reason}: {detail}")
    return 0 if report.ok else 1


async def _run(args: argparse.Namespace, options: dict[str, Any]) -> ImportReport:
    import nats
    from nats import errors

    try:
        nc = await nats.connect(args.nats_url, connect_timeout=5, max_reconnect_attempts=3,
                                error_cb=_quiet, **options)
    except (OSError, errors.Error) as exc:
        raise OperatorError(f"cannot reach NATS at {args.nats_url}: "
                            f"{exc or type(exc).__name__}") from None
    try:
        js = nc.jetstream(publish_async_max_pending=args.window)
        try:
            await check_stream(js, args.prefix)
        except LookupError as exc:
            raise OperatorError(str(exc)) from None
        with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                      TextColumn("{task.fields[sent]:,} sent, {task.fields[refused]:,} "
                                 "refused"), TimeElapsedColumn(), console=console,
                      transient=True) as bar:
            size = args.file.stat().st_size
            task = bar.add_task("import-events", total=size, sent=0, refused=0)

            def advance(position: int, report: ImportReport) -> None:
                if report.records % 200 == 0 or position == size:
                    bar.update(task, completed=position,
                               sent=report.records - sum(report.refused.values()),
                               refused=sum(report.refused.values()))

            try:
                return await publish_file(js, args.file, prefix=args.prefix, fmt=args.format,
                                          ack_timeout=args.ack_timeout, progress=advance)
            except ValueError as exc:
                raise OperatorError(str(exc)) from None
    finally:
        await nc.close()
