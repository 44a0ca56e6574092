"""The HTTP gateway: `microtune gateway`, a stateless process that speaks NATS to the service.

Content platforms integrate by HTTP (a CMS webhook, a service without a NATS client). The
gateway turns each request into the wire format's message on the same subjects, with the same
validation and reasons (events/codec.py), so it adds no rule of its own and scales on its own,
never competing with ingest for the service's GIL. FastAPI on uvicorn: it validates and
documents the routes (OpenAPI at /docs, /openapi.json) from the same declarations.

Routes (JSON both ways; the keys are the wire format's, README "Wire format"):
- `POST /v1/events`: one event, or `{"events": [...]}` (at most `MAX_BATCH`). Each valid event
  is stored on the events stream (JetStream, deduplicated by `<user>.<id>`) before the reply,
  so `accepted` is durable; the service applies it within moments. 202 with one outcome per
  event (`accepted`, `duplicate`: JetStream had it already, `rejected` with `e`, `m`, `f`);
  a single event that is refused: 400 (422 for a wrong type) with its reason.
- `POST /v1/users/{user}/rank`: `{"c": [id or {"i", "x"}], "n"?, "l"?, "t"?, "rid"?, "ms"?}`;
  200 with the reply's fields, or the error reply with a status by reason.
- `PUT /v1/items`: `{"b": [{"i", "x"}, ...]}` (or one `{"i", "x"}`): the catalog; 202 with
  the content stream's `cs`, which `GET /v1/info?cs=` reports as applied.
- `GET /v1/info`: `microtune.info` (the dimension, versions, limits, catalog progress).
- `GET /v1/users/{user}`: the user's weights, seq, segment, session, bot verdict and arm
  (`microtune.admin.user`: an admin token, as below).
- `POST /v1/admin/{command}`: `microtune.admin.<command>`, with the admin token from
  `Authorization: Bearer <token>` (put in the request as `tok`); the service checks it.
- `GET /v1/contract` and `/v1/contract/{name}`: the wire contract's JSON Schemas.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import nats
import numpy as np
import structlog
from fastapi import Body, FastAPI, Request
from fastapi.responses import JSONResponse
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from adapters import client
from adapters.logs import nats_callbacks
from events import contract
from events.codec import decode_content, event_from_map
from events.errors import Reason, Rejected
from events.types import SCHEMA_VERSION

log = structlog.get_logger(__name__)

MAX_BATCH = 1000  # events per request (one JetStream publish each, acks awaited together)
# HTTP status per refusal reason: the client's mistake (400, 422 for a wrong type), not
# allowed (403), the service's state (503/504)
_STATUS = {Reason.WRONG_TYPE: 422, Reason.FORBIDDEN: 403, Reason.TIMEOUT: 504,
           Reason.UNAVAILABLE: 503}


@dataclass
class GatewaySettings:
    nats_url: str = "nats://127.0.0.1:4223"
    prefix: str = "microtune"
    connect_options: dict[str, Any] = field(default_factory=dict)
    timeout: float = 5.0  # a query's or a publish's ack wait


def _status(reason: Reason) -> int:
    return _STATUS.get(reason, 400)


def _refusal(rejected: Rejected, status: int | None = None) -> JSONResponse:
    return JSONResponse(rejected.to_wire(), status_code=status or _status(rejected.reason))


def _jsonable(value: Any) -> Any:
    """A msgpack reply as JSON: bytes (packed features) as lists of floats."""
    if isinstance(value, bytes):
        return np.frombuffer(value, dtype="<f8").tolist()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def create_app(settings: GatewaySettings) -> FastAPI:
    state: dict[str, Any] = {}
    p = settings.prefix

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        nc = await nats.connect(settings.nats_url, name="microtune-gateway",
                                max_reconnect_attempts=-1, **nats_callbacks(),
                                **settings.connect_options)
        state["nc"], state["js"] = nc, nc.jetstream(timeout=settings.timeout)
        log.info("gateway.connected", nats_url=settings.nats_url, prefix=p)
        try:
            yield
        finally:
            await nc.drain()

    app = FastAPI(title="microtune", version=str(SCHEMA_VERSION), lifespan=lifespan,
                  description="Events in, content weights out: the HTTP face of microtune's "
                              "NATS wire format (README \"HTTP gateway\").")

    async def _request(subject: str, body: dict) -> dict:
        try:
            reply = await state["nc"].request(
                subject, msgpack.packb(body, use_bin_type=True), timeout=settings.timeout)
        except NatsTimeout:
            raise Rejected(Reason.TIMEOUT, f"no reply on {subject} within "
                           f"{settings.timeout:g} s") from None
        except NoRespondersError:
            raise Rejected(Reason.UNAVAILABLE, f"nothing answers {subject}: is microtune "
                           "serving?") from None
        return msgpack.unpackb(reply.data, raw=False)

    async def _publish_event(body: Any) -> dict:
        """One event: validated as the service would, then stored on the events stream."""
        event_id = body.get("id") if isinstance(body, dict) else None
        try:
            if not isinstance(body, dict):
                raise Rejected(Reason.WRONG_TYPE, "an event is a JSON object")
            event = event_from_map({"v": SCHEMA_VERSION, **body})
        except Rejected as refused:
            return {"id": event_id, "status": "rejected", **refused.to_wire()}
        ack = await client.publish(state["js"], event, prefix=p)
        return {"id": event.id, "status": "duplicate" if ack.duplicate else "accepted",
                "stream_seq": ack.seq}

    @app.post("/v1/events", status_code=202,
              summary="Publish one event, or a batch as {\"events\": [...]}")
    async def post_events(payload: Any = Body(...)) -> Any:  # noqa: B008 - FastAPI's idiom
        batch = isinstance(payload, dict) and "events" in payload
        events = payload["events"] if batch else [payload]
        if not isinstance(events, list) or not events or len(events) > MAX_BATCH:
            return _refusal(Rejected(Reason.OUT_OF_RANGE, f"events: a list of 1 to {MAX_BATCH}",
                                     "events"))
        try:
            outcomes = await asyncio.gather(*(_publish_event(e) for e in events))
        except (NatsTimeout, nats.errors.Error) as exc:
            return _refusal(Rejected(Reason.UNAVAILABLE, f"the events stream did not "
                                     f"acknowledge: {exc!r}; retry with the same ids"))
        if not batch and outcomes[0]["status"] == "rejected":
            out = {k: v for k, v in outcomes[0].items() if k in ("v", "e", "m", "f")}
            return JSONResponse(out, status_code=_status(Reason(out["e"])))
        return {"events": outcomes,
                "accepted": sum(o["status"] != "rejected" for o in outcomes)}

    @app.post("/v1/users/{user}/rank", summary="Content weights for a user's candidates")
    async def rank(user: str, payload: dict = Body(...)) -> Any:  # noqa: B008
        try:
            client.check_user(user)  # the subject it names: one token, the service's rule
            reply = await _request(f"{p}.query.{user}", {"v": SCHEMA_VERSION, **payload})
        except Rejected as refused:
            return _refusal(refused)
        if "e" in reply:
            return JSONResponse(reply, status_code=_status(Reason(reply["e"])))
        return _jsonable(reply)

    @app.get("/v1/users/{user}", summary="A user's weights, seq, segment, session, bot "
             "verdict (an admin token: personal data)")
    async def user_state(user: str, request: Request) -> Any:
        return await _admin_call("user", {"u": user}, request)

    @app.put("/v1/items", status_code=202, summary="Put items' features in the catalog")
    async def put_items(payload: dict = Body(...)) -> Any:  # noqa: B008
        raw = msgpack.packb({"v": SCHEMA_VERSION, **payload}, use_bin_type=True)
        try:
            decode_content(raw)  # the service's own validation, before it is stored
        except Rejected as refused:
            return _refusal(refused)
        ack = await state["js"].publish(f"{p}.content", raw)
        return {"cs": ack.seq, "status": "accepted"}

    @app.get("/v1/info", summary="The dimension, versions, limits and catalog progress")
    async def info(cs: int | None = None) -> Any:
        try:
            reply = await _request(f"{p}.info", {} if cs is None else {"cs": cs})
        except Rejected as refused:
            return _refusal(refused)
        return JSONResponse(_jsonable(reply), status_code=400 if "e" in reply else 200)

    @app.post("/v1/admin/{command}", summary="An admin command (a token in Authorization)")
    async def admin(command: str, request: Request,
                    payload: dict = Body(default_factory=dict)) -> Any:  # noqa: B008
        return await _admin_call(command, dict(payload), request)

    async def _admin_call(command: str, body: dict, request: Request) -> Any:
        token = request.headers.get("authorization", "")
        if token.lower().startswith("bearer "):
            body["tok"] = token[7:].strip()
        try:
            if not command.replace("_", "").isalnum():
                raise Rejected(Reason.UNKNOWN_KIND, f"no admin command {command!r}")
            reply = await _request(f"{p}.admin.{command}", body)
        except Rejected as refused:
            return _refusal(refused)
        if "e" in reply:
            return JSONResponse(reply, status_code=_status(Reason(reply["e"])))
        return _jsonable(reply)

    @app.get("/v1/contract", summary="The wire contract's JSON Schemas, by name")
    async def contract_list() -> Any:
        return {"schemas": sorted(contract.documents())}

    @app.get("/v1/contract/{name}", summary="One JSON Schema of the wire contract")
    async def contract_one(name: str) -> Any:
        documents = contract.documents()
        if name not in documents:
            return JSONResponse({"error": f"no schema {name!r}", "schemas": sorted(documents)},
                                status_code=404)
        return JSONResponse(json.loads(documents[name]))

    @app.get("/healthz", summary="The gateway answers, and its NATS connection is up")
    async def healthz() -> Any:
        nc = state.get("nc")
        up = nc is not None and nc.is_connected
        return JSONResponse({"nats_connected": up}, status_code=200 if up else 503)

    return app
