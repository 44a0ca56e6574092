"""A small client helper for Python services: `track`, `rank`, `upsert_items`.

Any language can do the same with its own NATS client and the wire format in the README;
this only saves Python users the encoding. `track` sets the `Nats-Msg-Id` header to
`msg_id(user, id)`, so JetStream itself also drops a re-publish within its duplicate window.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgpack
import numpy as np
from nats.errors import NoRespondersError

from events.codec import decode_reply, event_from_map, event_to_map
from events.errors import Reason, Rejected
from events.types import SCHEMA_VERSION, Event, Ranking

NO_RESPONDERS_WAIT = 0.05  # seconds between two asks while nobody answers a user's queries


def check_user(user: str) -> None:
    """The service's rule for a user id (one NATS token, printable, not too long): raises
    `Rejected` with its reason, before anything is sent."""
    event_from_map({"v": SCHEMA_VERSION, "id": "x", "u": user, "t": 0, "k": "segment", "g": "g"})


def event_body(user: str, *, id: str, t: float, kind: str, item: str | None = None,
               x: Sequence[float] | None = None, **fields: Any) -> bytes:
    """Encode (and validate) an event as the wire format; raises `Rejected`."""
    return _encoded(_event(user, id=id, t=t, kind=kind, item=item, x=x, **fields))


def _encoded(event: Event) -> bytes:
    return msgpack.packb(event_to_map(event), use_bin_type=True)


def _event(user: str, *, id: str, t: float, kind: str, item: str | None = None,
           x: Sequence[float] | None = None, **fields: Any) -> Event:
    names = {"dwell": "d", "depth": "s", "hover": "h", "target": "y", "segment": "g"}
    body = {"v": SCHEMA_VERSION, "id": id, "u": user, "t": t, "k": kind}
    if item is not None:
        body["i"] = item
    if x is not None:
        body["x"] = [float(v) for v in x]
    for key, value in fields.items():
        body[names.get(key, key)] = value
    return event_from_map(body)


def msg_id(user: str, event_id: str) -> str:
    """The `Nats-Msg-Id` header of an event: `<user>.<id>`. Event ids are unique per user but
    JetStream's dedupe window is stream-wide, so the header names the user too; a user id
    has no '.', so the pair is never ambiguous."""
    return f"{user}.{event_id}"


async def track(js, user: str, *, prefix: str = "microtune", **event: Any):
    """Publish one event to JetStream and wait for the server's ack (it is then durable).

    Returns the `PubAck`: `duplicate` is true when JetStream already had this event (a retry
    of one it stored), which is no loss. Raises on a publish that was not acknowledged: retry
    it with the same id."""
    return await publish(js, _event(user, **event), prefix=prefix)


async def publish(js, event: Event, *, prefix: str = "microtune"):
    """Store a validated event on the events stream, deduplicated by `msg_id`; the PubAck
    (`duplicate`: JetStream had it). `track`, and the HTTP gateway, publish through this."""
    return await js.publish(f"{prefix}.events.{event.user}", _encoded(event),
                            headers={"Nats-Msg-Id": msg_id(event.user, event.id)})


async def rank(nc, user: str, candidates: Iterable[str | tuple[str, Sequence[float]]], *,
               top: int | None = None, min_seq: int | None = None, log: bool = False,
               t: float | None = None, rid: str | None = None, prefix: str = "microtune",
               timeout: float = 2.0) -> Ranking:
    """Ask for this user's content weights; raises `Rejected` if the service refuses.

    `min_seq`: read your own writes, from a state at that seq or later (the service waits up
    to its `read_wait`, 2 s by default, then answers `timeout`); `timeout` here is on top.
    `log`: log what is shown as an exposure (shown at `t`, default now): the ranking's `rid`
    names it, for the outcomes to name (README "Measuring the effect"); `log_error` says why
    when it could not be logged."""
    check_user(user)
    # features as packed little-endian float64: the service decodes them without per-number
    # work (a list of numbers works too, from any language)
    cands = [c if isinstance(c, str) else [c[0], np.asarray(c[1], dtype="<f8").tobytes()]
             for c in candidates]
    body: dict[str, Any] = {"v": SCHEMA_VERSION, "c": cands}
    if top is not None:
        body["n"] = top
    if min_seq is not None:
        body["ms"] = min_seq
        timeout += 2.0  # the service's default read_wait
    if log:
        body["l"] = True
    if t is not None:
        body["t"] = t
    if rid is not None:  # a retry of a logged query under the same id: one exposure
        body["rid"] = rid
    data = msgpack.packb(body, use_bin_type=True)
    deadline = time.monotonic() + timeout
    while True:
        try:
            reply = await nc.request(f"{prefix}.query.{user}", data,
                                     timeout=max(0.05, deadline - time.monotonic()))
            return decode_reply(reply.data)
        except NoRespondersError:
            # a fleet hands the user's partition from one worker to the next (a moment), or
            # a query process restarts: ask again until the timeout
            if time.monotonic() + NO_RESPONDERS_WAIT >= deadline:
                raise
            await asyncio.sleep(NO_RESPONDERS_WAIT)


async def upsert_items(js, items: Mapping[str, Sequence[float]], *,
                       prefix: str = "microtune") -> None:
    """Put items' feature vectors in the catalog (one message, durable)."""
    if not items:
        raise Rejected(Reason.OUT_OF_RANGE, "no items")
    batch = [{"i": k, "x": [float(v) for v in np.asarray(x)]} for k, x in items.items()]
    await js.publish(f"{prefix}.content",
                     msgpack.packb({"v": SCHEMA_VERSION, "b": batch}, use_bin_type=True))
