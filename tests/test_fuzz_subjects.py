"""Hostile input on every subject: the service neither crashes nor leaves a message unsettled.

A property test (hypothesis) publishes batches of random input to one in-process `Service`
on one nats-server, on each of its subjects:

- `microtune.events.<user>` and `microtune.content` through JetStream;
- `microtune.query.<user>` and `microtune.admin.stats` as requests.

Payloads are random bytes, random msgpack values and maps (keys from the wire format's
v, id, u, t, k, i, x, d, s, h, y, g, sid, a, c, n, w, b and random ones, including binary and
integer keys; values of every msgpack type: huge, negative, NaN and infinite numbers, nested
lists and maps, binary, very long strings, strings with NUL and control characters,
non-ASCII), and valid messages with some fields replaced by such values, so that the input
reaches every stage of validation, the actors and the store. Known gaps are tried every time,
as explicit examples: an event id with a NUL (PostgreSQL refuses NUL in text), an event,
a query and a catalog upsert of about 1 MiB (their rejection record, raw bytes included, is
over the broker's payload limit), a NUL in a catalog item id and in a segment name, and admin
requests with a wrong admin token (`tok`), an empty body and garbage: a refusal is fine, only
a reply is required.

After the property it asserts:

- nothing on the events and content consumers is pending or unacknowledged (a message that is
  never settled is redelivered for ever, and with a wedged store it blocks the user);
- every request got a reply, a msgpack map;
- no subscription callback raised (nats-py reports those to the error callback);
- every rejection counted in `service.stats.rejected` has its record on `microtune.rejected`;
- the service still applies a good event and answers a good query, and stops cleanly.

It runs on SQLite and, when reachable, on PostgreSQL (the `pg_url` fixture), which refuses
things SQLite accepts.
"""

from __future__ import annotations

import asyncio
import math
import string
import threading
import time
from typing import Any, NamedTuple

import msgpack
import nats
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from actors import Microtune
from adapters.embedded import EmbeddedNats
from adapters.nats_service import Service
from events import TuningConfig

DIM = 4
CFG = TuningConfig(version=1, dim=DIM)
EXAMPLES = 100
SETTLE_TIMEOUT = 20.0  # beyond the catalog grace (10 s) for events whose item is unknown
NATS_MAX_PAYLOAD = 1024 * 1024  # nats-server's default max_payload
WIRE_KEYS = ["v", "id", "u", "t", "k", "i", "x", "d", "s", "h", "y", "g", "sid", "a", "c",
             "n", "w", "b"]
KINDS = ["impression", "click", "dwell", "scroll", "hover", "feedback", "segment",
         "clear_bot"]


class Message(NamedTuple):
    kind: str  # "event", "content" (JetStream) or "query", "admin" (request-reply)
    subject: str
    payload: bytes


# ---------------------------------------------------------------- strategies


def long_text(chars: str) -> st.SearchStrategy[str]:
    return st.builds(lambda c, n: c * n, st.sampled_from(chars), st.integers(100, 70_000))


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0, 2**53 + 1]),
    st.text(st.characters(codec="utf-8"), max_size=40),  # NUL, controls, non-ASCII
    st.sampled_from(["\x00", "a\x00b", "\x1b[2J", "\r\n", "\u202e", "用户", "é" * 129]),
    st.binary(max_size=64),
    long_text("x\x00é用"),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=6)
    | st.dictionaries(st.text(max_size=6) | st.sampled_from(WIRE_KEYS), inner, max_size=6),
    max_leaves=16,
)
KEYS = st.one_of(
    st.sampled_from(WIRE_KEYS),
    st.text(st.characters(codec="utf-8"), max_size=12),
    st.binary(max_size=6),
    st.integers(-3, 3),
)
TOKENS = st.one_of(  # a subject's user token: printable, no spaces, no '.', '*' or '>'
    st.text(string.ascii_letters + string.digits + "-_", min_size=1, max_size=16),
    st.sampled_from(["ünï", "用户", "a" * 129, "x" * 300, "$sys", "%00"]),
)
USER_TOKENS = TOKENS | st.sampled_from(["a.b", "a.b.c"])  # deeper subjects still match `>`


def features() -> st.SearchStrategy[list[float]]:
    return st.lists(st.floats(-10, 10), min_size=DIM, max_size=DIM)


def valid_event(user: str) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries({
        "v": st.just(1), "id": st.text(string.ascii_letters, min_size=1, max_size=8),
        "u": st.just(user), "t": st.floats(1.6e9, 1.8e9), "k": st.sampled_from(KINDS[:6]),
        "i": st.sampled_from(["a", "b", "c"]), "x": features(),
        "d": st.floats(0, 100), "s": st.floats(0, 1), "h": st.floats(0, 5),
        "y": st.floats(0, 1)})


def valid_query() -> st.SearchStrategy[dict]:
    candidate = st.tuples(st.sampled_from(["a", "b", "c"]), features()).map(list)
    return st.fixed_dictionaries({"v": st.just(1), "c": st.lists(candidate, min_size=1,
                                                                  max_size=4)},
                                 optional={"n": st.integers(1, 4), "w": st.booleans()})


def valid_content() -> st.SearchStrategy[dict]:
    item = st.fixed_dictionaries({"i": st.sampled_from(["a", "b", "c", "d"]),
                                  "x": features()})
    return st.one_of(item.map(lambda m: {"v": 1, **m}),
                     st.lists(item, min_size=1, max_size=3).map(lambda b: {"v": 1, "b": b}))


@st.composite
def mutated(draw, base: st.SearchStrategy[dict]) -> dict:
    """A valid map with some fields dropped and some set to random values."""
    body = draw(base)
    if body:
        for key in draw(st.sets(st.sampled_from(sorted(body)), max_size=2)):
            del body[key]
    body.update(draw(st.dictionaries(KEYS, VALUES, max_size=4)))
    return body


@st.composite
def one_field_off(draw, base: st.SearchStrategy[dict]) -> dict:
    """A valid map with one wire-format field set to a random scalar."""
    return {**draw(base), draw(st.sampled_from(WIRE_KEYS)): draw(SCALARS)}


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def payloads(valid: st.SearchStrategy[dict]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=200),
        VALUES.map(pack),
        st.dictionaries(KEYS, VALUES, max_size=10).map(pack),
        mutated(valid).map(pack),
        one_field_off(valid).map(pack),
        valid.map(pack),
    ).filter(lambda raw: len(raw) < NATS_MAX_PAYLOAD // 2)


@st.composite
def messages(draw) -> Message:
    kind = draw(st.sampled_from(["event", "event", "query", "content", "admin"]))
    if kind == "event":
        user = draw(USER_TOKENS)
        return Message(kind, f"microtune.events.{user}", draw(payloads(valid_event(user))))
    if kind == "query":
        user = draw(TOKENS)
        return Message(kind, f"microtune.query.{user}", draw(payloads(valid_query())))
    if kind == "content":
        return Message(kind, "microtune.content", draw(payloads(valid_content())))
    admin = st.fixed_dictionaries({}, optional={"tok": VALUES, "u": VALUES})
    return Message(kind, "microtune.admin.stats", draw(payloads(admin)))


def event(user: str, event_id: str, **extra: Any) -> dict:
    return {"v": 1, "id": event_id, "u": user, "t": 1.7e9, "k": "click", "i": "a",
            "x": [1.0, 0.0, 0.0, 0.0], **extra}


def padded(body: dict, size: int) -> bytes:
    """`body` with a padding field, packed to exactly `size` bytes."""
    overhead = len(pack({**body, "pad": "x" * 70_000})) - 70_000  # a str32 header
    raw = pack({**body, "pad": "x" * (size - overhead)})
    assert len(raw) == size, len(raw)
    return raw


ABOUT_1_MIB = NATS_MAX_PAYLOAD - 64  # fits the broker; its rejection record does not
KNOWN_GAPS = [
    Message("event", "microtune.events.nul-user", pack(event("nul-user", "bad\x00id"))),
    Message("event", "microtune.events.big-user",
            padded(event("big-user", "huge"), ABOUT_1_MIB)),
    Message("query", "microtune.query.big-user",
            padded({"v": 1, "c": [["a", [1.0, 0.0, 0.0, 0.0]]]}, ABOUT_1_MIB)),
    Message("content", "microtune.content",
            padded({"v": 1, "i": "big-item", "x": [1.0, 0.0, 0.0, 0.0]}, ABOUT_1_MIB)),
    Message("content", "microtune.content", pack({"v": 1, "i": "cat\x00item",
                                                  "x": [0.0, 1.0, 0.0, 0.0]})),
    Message("event", "microtune.events.seg-user",
            pack(event("seg-user", "g1", g="seg\x00ment"))),
    Message("query", "microtune.query.nul-user",
            pack({"v": 1, "c": [["a\x00", [1.0, 0.0, 0.0, 0.0]]]})),
    Message("admin", "microtune.admin.stats", pack({"tok": "not-the-admin-token"})),
    Message("admin", "microtune.admin.stats", b""),
    Message("admin", "microtune.admin.stats", b"\xc1\x00garbage"),
]


# ---------------------------------------------------------------- the service under test


class WatchedService(Service):
    """The service, with every error nats-py reports (a callback that raised) kept."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.errors: list[str] = []

    async def _on_error(self, exc: Exception) -> None:
        self.errors.append(repr(exc))
        await super()._on_error(exc)


class Harness:
    """One service and one client on an event loop of their own (a thread), for the whole
    property; `send` publishes a batch and notes what went wrong."""

    def __init__(self, store: str, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.system = Microtune.open(store, CFG)
        self.service = WatchedService(self.system)
        self.problems: list[str] = []
        self.sent: dict[str, int] = {}
        self.run(self._connect(url))

    def run(self, coro, timeout: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _connect(self, url: str) -> None:
        await self.service.start(url)
        self.nc = await nats.connect(url)
        self.js = self.nc.jetstream()

    def send(self, batch: list[Message]) -> None:
        self.run(self._send(batch))

    async def _send(self, batch: list[Message]) -> None:
        await asyncio.gather(*(self._send_one(m) for m in batch))

    async def _send_one(self, m: Message) -> None:
        self.sent[m.kind] = self.sent.get(m.kind, 0) + 1
        what = f"{m.kind} on {m.subject[:60]!r} ({len(m.payload)} bytes: {m.payload[:60]!r})"
        if m.kind in ("event", "content"):
            try:
                await self.js.publish(m.subject, m.payload, timeout=5)
            except Exception as exc:  # not the service's doing, but the input is then untried
                self.problems.append(f"publish failed: {what}: {exc!r}")
            return
        try:
            reply = await self.nc.request(m.subject, m.payload, timeout=5)
        except Exception as exc:
            self.problems.append(f"no reply to {what}: {exc!r}")
            return
        try:
            assert isinstance(msgpack.unpackb(reply.data, raw=False), dict)
        except Exception:
            self.problems.append(f"a reply that is not a msgpack map to {what}: "
                                 f"{reply.data[:80]!r}")

    def close(self) -> None:
        if self.nc.is_connected:
            self.run(self.nc.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


# ---------------------------------------------------------------- the checks


async def settled(js, stream: str, durable: str, timeout: float) -> str | None:
    """None once the consumer has nothing pending nor unacknowledged; else what is left."""
    deadline = time.monotonic() + timeout
    while True:
        info = await js.consumer_info(stream, durable)
        if info.num_pending == 0 and info.num_ack_pending == 0:
            return None
        if time.monotonic() > deadline:
            return (f"{stream}/{durable}: {info.num_pending} pending, {info.num_ack_pending} "
                    f"delivered and never acked, {info.num_redelivered} redelivered")
        await asyncio.sleep(0.25)


async def final_checks(h: Harness) -> list[str]:
    problems = []
    service, js = h.service, h.js
    cfg = service.config
    left = await asyncio.gather(
        settled(js, cfg.events_stream, cfg.durable, SETTLE_TIMEOUT),
        settled(js, cfg.content_stream, f"{cfg.durable}-content", SETTLE_TIMEOUT))
    problems += [f"unsettled messages: {what}" for what in left if what]

    # a good event is still applied, a good query still answered
    await js.publish("microtune.events.probe-user", pack(event("probe-user", "probe-1")))
    deadline = time.monotonic() + 15
    logged = []
    while not logged and time.monotonic() < deadline:
        logged = await asyncio.to_thread(lambda: list(h.system.recorder.read("probe-user")))
        await asyncio.sleep(0.1)
    if [r.event_id for r in logged] != ["probe-1"]:
        problems.append(f"a good event was not applied within 15 s: {logged}")
    try:
        reply = await h.nc.request("microtune.query.probe-user", pack(
            {"v": 1, "c": [["a", [1.0, 0.0, 0.0, 0.0]], ["b", [0.0, 1.0, 0.0, 0.0]]]}),
            timeout=5)
        answer = msgpack.unpackb(reply.data, raw=False)
        if answer.get("i") is None or sorted(answer["i"]) != ["a", "b"]:
            problems.append(f"a good query got {answer}")
    except Exception as exc:
        problems.append(f"a good query got no answer: {exc!r}")

    # every rejection counted has its record (query rejections are published without an
    # ack, and the query processes report their counts once a second)
    deadline = time.monotonic() + 5.0
    while True:
        rejected = (await service._admin_stats({}))["rejected"]
        counted = sum(rejected.values())
        stored = (await js.stream_info(cfg.rejected_stream)).state.messages
        if counted == stored or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.25)
    if counted != stored:
        problems.append(f"{counted} rejections counted ({rejected}) but "
                        f"{stored} records on {h.service.rejected_subject}")
    if service.errors:
        problems.append(f"{len(service.errors)} errors in the service's callbacks, e.g. "
                        f"{sorted(set(service.errors))[:5]}")
    try:
        await asyncio.wait_for(service.stop(timeout=10), 30)
    except Exception as exc:
        problems.append(f"the service did not stop cleanly within 30 s: {exc!r}")
    return problems


# ---------------------------------------------------------------- the property


def fuzz(store: str, tmp_path) -> None:
    server = EmbeddedNats(tmp_path / "nats").start()
    harness = Harness(store, server.url)
    try:
        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate],  # a live service: no shrinking
                  suppress_health_check=list(HealthCheck))
        @given(st.lists(messages(), min_size=2, max_size=10))
        def publish_batch(batch: list[Message]) -> None:
            harness.send(batch)

        for known in KNOWN_GAPS:  # tried every time, one per example
            publish_batch = example([known])(publish_batch)
        publish_batch()
        started = time.monotonic()
        problems = harness.problems + harness.run(final_checks(harness))
        stats = harness.service.stats
        print(f"\n{store.split('?')[0]}: sent {harness.sent}; rejected {dict(stats.rejected)}; "
              f"applied {stats.applied}; duplicates {stats.duplicates}; "
              f"checks took {time.monotonic() - started:.1f} s")
        assert not problems, "\n".join(problems)
    finally:
        harness.close()
        server.stop()


def test_hostile_input_on_every_subject_sqlite(tmp_path):
    fuzz(str(tmp_path / "mt.db"), tmp_path)


@pytest.mark.postgres
def test_hostile_input_on_every_subject_postgres(pg_url, tmp_path):
    fuzz(pg_url, tmp_path)
