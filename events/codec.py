"""The msgpack codec, with validation.

Wire format (schema version 1): msgpack maps with short keys; see README "Wire format".
`decode_*` turn untrusted bytes into typed objects or raise `Rejected` with a precise reason;
no other exception escapes them. Unknown keys are tolerated (kept in `Event.extra` and logged)
so that a newer publisher does not break an older service.

The log stores events in the same format, features packed as float64 bytes; `event_from_log`
is the trusted fast path for replay (the row was validated before it was written).
"""

from __future__ import annotations

import itertools
import math
import operator
import sys
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np

from events.errors import Reason, Rejected
from events.limits import DEFAULT_LIMITS, Limits
from events.types import (
    EXPOSURE,
    INTERACTION_KINDS,
    KINDS,
    SCHEMA_VERSION,
    SUPPORTED_VERSIONS,
    Arm,
    Candidate,
    CandidateRows,
    Event,
    Exposure,
    Query,
    Ranking,
)

_EVENT_KEYS = frozenset(
    {"v", "id", "u", "t", "k", "i", "x", "d", "s", "h", "y", "g", "c", "r", "sid", "a", "ns", "b",
     "to", "st", "bf", "rid", "sh", "rq", "rc", "pp", "xa", "ci", "cx", "sw", "co"}
)
_TOKEN_FORBIDDEN = frozenset(" \t\r\n.*>")
_F64 = np.dtype("<f8")
_NUMBER_TYPES = frozenset({int, float})


# ---------------------------------------------------------------- field checks


def _unpack(raw: bytes, limits: Limits, *, version: bool = True) -> Mapping[str, Any]:
    """Untrusted bytes into a map; `version=False` leaves the version check to the caller
    (`event_from_map` makes it, on either of its paths)."""
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise Rejected(Reason.MALFORMED, f"expected bytes, got {type(raw).__name__}")
    if len(raw) > limits.max_payload_bytes:
        raise Rejected(
            Reason.OVERSIZE, f"payload of {len(raw)} bytes exceeds {limits.max_payload_bytes}"
        )
    try:
        obj = msgpack.unpackb(raw, raw=False)
    except Exception as exc:  # msgpack raises several types for garbage and truncation
        raise Rejected(Reason.MALFORMED, f"not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise Rejected(Reason.MALFORMED, f"expected a msgpack map, got {type(obj).__name__}")
    if version:
        _check_version(obj)
    return obj


def _check_version(obj: Mapping[str, Any]) -> None:
    if "v" not in obj:
        raise Rejected(Reason.MISSING_FIELD, "schema version 'v' is required", "v")
    v = obj["v"]
    if not isinstance(v, int) or isinstance(v, bool):
        raise Rejected(Reason.WRONG_TYPE, "'v' must be an integer", "v")
    if v not in SUPPORTED_VERSIONS:
        raise Rejected(
            Reason.UNSUPPORTED_VERSION,
            f"schema version {v} is not supported (supported: {sorted(SUPPORTED_VERSIONS)})",
            "v",
        )


def _required(obj: Mapping[str, Any], key: str) -> Any:
    if key not in obj or obj[key] is None:
        raise Rejected(Reason.MISSING_FIELD, f"'{key}' is required", key)
    return obj[key]


def _string(value: Any, key: str, limits: Limits, *, token: bool = False) -> str:
    if not isinstance(value, str):
        raise Rejected(Reason.WRONG_TYPE, f"'{key}' must be a string", key)
    if not value:
        raise Rejected(Reason.INVALID_ID, f"'{key}' must not be empty", key)
    if len(value) > limits.max_id_length:
        raise Rejected(
            Reason.OVERSIZE, f"'{key}' is longer than {limits.max_id_length} characters", key
        )
    # Printable on every backend alike: no NUL (PostgreSQL refuses it in text, SQLite keeps
    # it), no control characters or line breaks (ids travel in NATS headers and logs), no lone
    # surrogates (no database can encode them).
    if not value.isprintable():
        raise Rejected(
            Reason.INVALID_ID,
            f"'{key}' must be printable text (no NUL, control characters or line breaks)",
            key,
        )
    if token and not _TOKEN_FORBIDDEN.isdisjoint(value):
        raise Rejected(
            Reason.INVALID_ID,
            f"'{key}' must be a NATS subject token (printable, no spaces, '.', '*' or '>')",
            key,
        )
    return value


def _number(
    value: Any, key: str, lo: float | None = None, hi: float | None = None
) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Rejected(Reason.WRONG_TYPE, f"'{key}' must be a number", key)
    value = float(value)
    if not math.isfinite(value):
        raise Rejected(Reason.NOT_FINITE, f"'{key}' must be finite, got {value}", key)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise Rejected(
            Reason.OUT_OF_RANGE, f"'{key}'={value} is outside [{lo}, {hi}]", key
        )
    return value


def _vector(value: Any, key: str, limits: Limits) -> np.ndarray:
    if isinstance(value, bytes):  # packed little-endian float64, as the log stores it
        if len(value) % 8:
            raise Rejected(Reason.WRONG_TYPE, f"'{key}' bytes must be packed float64", key)
        arr = np.frombuffer(value, dtype=_F64)
    elif isinstance(value, list | tuple):
        if not _NUMBER_TYPES.issuperset(map(type, value)):  # bool is not a number here
            raise Rejected(Reason.WRONG_TYPE, f"'{key}' must be a list of numbers", key)
        arr = np.array(value, dtype=np.float64)
    else:
        raise Rejected(Reason.WRONG_TYPE, f"'{key}' must be a list of numbers", key)
    if arr.shape[0] > limits.max_dimension:
        raise Rejected(
            Reason.OVERSIZE, f"'{key}' has {arr.shape[0]} > {limits.max_dimension} entries", key
        )
    if not np.isfinite(arr).all():
        raise Rejected(Reason.NOT_FINITE, f"'{key}' contains NaN or infinity", key)
    arr.flags.writeable = False
    return arr


def _config_version(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Rejected(Reason.WRONG_TYPE, "'c' (config version) must be an integer", "c")
    if value < 1:
        raise Rejected(Reason.OUT_OF_RANGE, "'c' (config version) must be >= 1", "c")
    return value


# ---------------------------------------------------------------- events


# The common shape of an interaction event, checked in one pass (`_interaction_fast`): an
# interaction kind with its own field if it has one, features (packed or a list of numbers),
# a session id. Anything
# else, and anything doubtful, takes the careful path, which finds the precise reason.
_FAST_FIELDS = {"impression": None, "click": None, "dwell": "d", "scroll": "s", "hover": "h",
                "feedback": "y"}
_FAST_KEYS = {kind: frozenset({"v", "id", "u", "t", "k", "i", "x", "sid", "rid"} | {field} - {None})
              for kind, field in _FAST_FIELDS.items()}
_FAST_UPPER = {"d": math.inf, "s": 1.0, "h": math.inf, "y": 1.0}
_FAST_NUMBERS = (int, float)
_LITTLE_ENDIAN = sys.byteorder == "little"  # packed features are read as native doubles
_NO_EXTRA = Event._field_defaults["extra"]


def _interaction_fast(obj: dict, limits: Limits) -> Event | None:
    """The event `event_from_map` would return, for the common shape; None where in doubt.

    Pure speed: it accepts nothing the careful path refuses and builds the identical event
    (a property test holds the two to that)."""
    kind = obj.get("k")
    keys = _FAST_KEYS.get(kind) if type(kind) is str and _LITTLE_ENDIAN else None
    if keys is None or not keys.issuperset(obj):
        return None
    v, eid, user, t, item = obj.get("v"), obj.get("id"), obj.get("u"), obj.get("t"), obj.get("i")
    n = limits.max_id_length
    if (type(v) is not int or v not in SUPPORTED_VERSIONS
            or type(eid) is not str or type(user) is not str or type(item) is not str
            or not (0 < len(eid) <= n and 0 < len(user) <= n and 0 < len(item) <= n)
            or not (eid.isprintable() and user.isprintable() and item.isprintable())
            or not _TOKEN_FORBIDDEN.isdisjoint(user)
            or type(t) not in _FAST_NUMBERS or not 0.0 <= t < math.inf):
        return None
    field = _FAST_FIELDS[kind]
    value = None
    if field is not None:
        value = obj.get(field)
        # dwell and hover have no upper bound but must be finite (the careful path says
        # not_finite): strictly below the bound, and the bound of d and h is infinity
        if type(value) not in _FAST_NUMBERS or not (
                0.0 <= value < _FAST_UPPER[field] or value == _FAST_UPPER[field] < math.inf):
            return None
        value = float(value)
    session = obj.get("sid")
    if session is not None and (type(session) is not str or not 0 < len(session) <= n
                                or not session.isprintable()):
        return None
    rid = obj.get("rid")
    if rid is not None and (type(rid) is not str or not 0 < len(rid) <= n
                            or not rid.isprintable()):
        return None
    x = obj.get("x")
    if type(x) is bytes:
        if len(x) % 8 or len(x) > 8 * limits.max_dimension:
            return None
        # a NaN or an infinity makes the sum non-finite (so does an overflow: the careful
        # path then decides); Python floats sum without numpy's warnings, and quicker
        if not math.isfinite(sum(memoryview(x).cast("d"))):
            return None
        x = np.frombuffer(x, dtype=_F64)
        x.flags.writeable = False
    elif type(x) is list:  # a list of numbers, as most clients send them
        if (len(x) > limits.max_dimension or not _NUMBER_TYPES.issuperset(map(type, x))
                or not math.isfinite(sum(x))):
            return None
        x = np.array(x, dtype=_F64)
        x.flags.writeable = False
    elif x is not None:
        return None
    return Event(eid, user, float(t), kind, item, x,
                 value if field == "d" else None, value if field == "s" else None,
                 value if field == "h" else None, value if field == "y" else None,
                 None, None, None, session, False, None, None, None, None, False, _NO_EXTRA, rid)


def event_from_map(obj: Mapping[str, Any], limits: Limits = DEFAULT_LIMITS) -> Event:
    """Validate a decoded wire map into an `Event` (raises `Rejected`)."""
    if type(obj) is dict:
        event = _interaction_fast(obj, limits)
        if event is not None:
            return event
    _check_version(obj)
    event_id = _string(_required(obj, "id"), "id", limits)
    user = _string(_required(obj, "u"), "u", limits, token=True)
    t = _number(_required(obj, "t"), "t", lo=0.0)
    kind = _required(obj, "k")
    if not isinstance(kind, str):
        raise Rejected(Reason.WRONG_TYPE, "'k' (kind) must be a string", "k")
    if kind not in KINDS:
        raise Rejected(
            Reason.UNKNOWN_KIND, f"unknown kind {kind!r} (known: {', '.join(KINDS)})", "k"
        )
    fields: dict[str, Any] = {}
    needs = KINDS[kind]
    if kind in INTERACTION_KINDS:
        fields["item"] = _string(_required(obj, "i"), "i", limits)
    elif obj.get("i") is not None:
        fields["item"] = _string(obj["i"], "i", limits)
    if obj.get("x") is not None:
        fields["x"] = _vector(obj["x"], "x", limits)
    for key, name, lo, hi in (
        ("d", "dwell", 0.0, None),
        ("s", "depth", 0.0, 1.0),
        ("h", "hover", 0.0, None),
        ("y", "target", 0.0, 1.0),
    ):
        if key == needs:
            fields[name] = _number(_required(obj, key), key, lo, hi)
        elif obj.get(key) is not None:
            fields[name] = _number(obj[key], key, lo, hi)
    if needs == "g" or obj.get("g") is not None:
        fields["segment"] = _string(_required(obj, "g"), "g", limits, token=True)
    if obj.get("c") is not None:
        fields["config"] = _config_version(obj["c"])
    if obj.get("r") is not None:  # the service stamps its own receive time over this
        fields["received"] = _number(obj["r"], "r", lo=0.0)
    if obj.get("sid") is not None:
        fields["session"] = _string(obj["sid"], "sid", limits)
    if obj.get("a") is not None:
        if not isinstance(obj["a"], bool):
            raise Rejected(Reason.WRONG_TYPE, "'a' (automated) must be true or false", "a")
        fields["automated"] = obj["a"]
    if obj.get("bf") is not None:
        if not isinstance(obj["bf"], bool):
            raise Rejected(Reason.WRONG_TYPE, "'bf' (backfill) must be true or false", "bf")
        fields["backfill"] = obj["bf"]
    if obj.get("rid") is not None:
        fields["rid"] = _string(obj["rid"], "rid", limits)
    if kind == EXPOSURE:
        fields["exposure"] = _exposure(obj, limits)
        if fields.setdefault("rid", event_id) != event_id:
            raise Rejected(Reason.INVALID_ID, "an exposure's 'rid' is its event id", "rid")
    # 'ns' (segment statistics), 'b' (segment model score) and 'xa' (experiment arm) are
    # stamped by the service; a publisher's are ignored
    extra = {k: obj[k] for k in obj if k not in _EVENT_KEYS}
    return Event(id=event_id, user=user, t=t, kind=kind, extra=extra, **fields)


def _exposure(obj: Mapping[str, Any], limits: Limits) -> Exposure:
    """An exposure's ranking: `sh` = [[item, weight, score], ...] best first, `rq` the seq
    and `rc` the config version that ranked it, `pp` optional propensities."""
    shown = _required(obj, "sh")
    if not isinstance(shown, list) or not shown:
        raise Rejected(Reason.WRONG_TYPE, "'sh' (shown) must be a non-empty list", "sh")
    if len(shown) > limits.max_candidates:
        raise Rejected(Reason.OVERSIZE, f"{len(shown)} shown items exceed "
                       f"{limits.max_candidates}", "sh")
    items, weights, scores = [], [], []
    for entry in shown:
        if not isinstance(entry, list | tuple) or len(entry) != 3:
            raise Rejected(Reason.WRONG_TYPE, "each shown item is [item, weight, score]", "sh")
        items.append(_string(entry[0], "sh[].i", limits))
        weights.append(_number(entry[1], "sh[].w", 0.0, 1.0))
        scores.append(_number(entry[2], "sh[].s"))
    seq, config = obj.get("rq", 0), obj.get("rc", 1)
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < 2**63:
        raise Rejected(Reason.WRONG_TYPE, "'rq' (the ranking's seq) must be an integer >= 0",
                       "rq")
    if isinstance(config, bool) or not isinstance(config, int) or config < 1:
        raise Rejected(Reason.WRONG_TYPE, "'rc' (the ranking's config) must be an integer >= 1",
                       "rc")
    propensities = obj.get("pp")
    if propensities is not None:
        if not isinstance(propensities, list) or len(propensities) != len(items):
            raise Rejected(Reason.WRONG_TYPE, "'pp' (propensities) must list one number per "
                           "shown item", "pp")
        propensities = tuple(_number(p, "pp[]", 0.0, 1.0) for p in propensities)
    candidates, features, shared = obj.get("ci"), obj.get("cx"), obj.get("sw")
    if candidates is not None or features is not None:  # an explored ranking's draw
        if not isinstance(candidates, list) or not candidates or \
                len(candidates) > limits.max_candidates:
            raise Rejected(Reason.WRONG_TYPE, "'ci' (candidates) is a list of item ids", "ci")
        candidates = tuple(_string(c, "ci[]", limits) for c in candidates)
        if not isinstance(features, bytes) or not features or \
                len(features) % (8 * len(candidates)):
            raise Rejected(Reason.WRONG_TYPE, "'cx' (the candidates' features) is packed "
                           "float64, one row per candidate", "cx")
        _vector(features, "cx", Limits(max_dimension=len(features) // 8))  # finite
        if shared is not None:
            if not isinstance(shared, bytes) or len(shared) * len(candidates) != \
                    len(features) + 8 * len(candidates):
                raise Rejected(Reason.WRONG_TYPE, "'sw' (the segment model's weights) is "
                               "packed float64, dim + 1 of them", "sw")
            _vector(shared, "sw", limits)
    offsets = obj.get("co")
    if offsets is not None and (candidates is None or not isinstance(offsets, bytes)
                                or len(offsets) != 8 * len(candidates)):
        raise Rejected(Reason.WRONG_TYPE, "'co' (the candidates' item effects) is packed "
                       "float64, one per candidate", "co")
    if offsets is not None:
        _vector(offsets, "co", Limits(max_dimension=len(candidates)))
    return Exposure(tuple(items), tuple(weights), tuple(scores), seq, config, propensities,
                    candidates, features, shared, offsets)


def decode_event(
    raw: bytes, limits: Limits = DEFAULT_LIMITS, *, subject_user: str | None = None
) -> Event:
    """Decode and validate one event from untrusted bytes (raises `Rejected`).

    `subject_user`: the user token of the subject it came on; the body's `u` must match.
    """
    event = event_from_map(_unpack(raw, limits, version=False), limits)
    if subject_user is not None and event.user != subject_user:
        raise Rejected(
            Reason.INVALID_ID,
            f"the subject's user {subject_user!r} differs from the body's 'u' {event.user!r}",
            "u",
        )
    return event


def event_to_map(event: Event, *, pack_x: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {**event.extra}
    out.update(v=SCHEMA_VERSION, id=event.id, u=event.user, t=event.t, k=event.kind)
    if event.item is not None:
        out["i"] = event.item
    if event.x is not None:
        x = np.ascontiguousarray(event.x, dtype=_F64)
        out["x"] = x.tobytes() if pack_x else x.tolist()
    for key, value in (
        ("d", event.dwell),
        ("s", event.depth),
        ("h", event.hover),
        ("y", event.target),
        ("g", event.segment),
        ("c", event.config),
        ("r", event.received),
        ("sid", event.session),
        ("to", event.to_seq),
        ("st", event.restored),
    ):
        if value is not None:
            out[key] = value
    if event.automated:
        out["a"] = True
    if event.backfill:  # only when set: an event without it encodes as it always did
        out["bf"] = True
    if event.norms:
        out["ns"] = {k: list(v) for k, v in event.norms.items()}
    if event.base is not None:
        out["b"] = event.base
    if event.rid is not None:
        out["rid"] = event.rid
    if event.exposure is not None:
        e = event.exposure
        out.update(sh=[[i, w, s] for i, w, s in zip(e.items, e.weights, e.scores, strict=True)],
                   rq=e.seq, rc=e.config)
        if e.propensities is not None:
            out["pp"] = list(e.propensities)
        if e.candidates is not None:
            out.update(ci=list(e.candidates), cx=e.features)
            if e.shared is not None:
                out["sw"] = e.shared
            if e.offsets is not None:
                out["co"] = e.offsets
    if event.arm is not None:
        out["xa"] = list(event.arm)
    return out


def encode_event(event: Event) -> bytes:
    """The wire encoding (features as a list of floats, readable from any language)."""
    return msgpack.packb(event_to_map(event), use_bin_type=True)


def encode_logged_event(event: Event) -> bytes:
    """The log encoding: the wire map with features packed as float64 bytes."""
    return msgpack.packb(event_to_map(event, pack_x=True), use_bin_type=True)


def event_from_log(body: bytes) -> Event:
    """Trusted fast path for replay: the row was validated before it was written."""
    obj = msgpack.unpackb(body, raw=False)
    x = obj.get("x")
    norms = obj.get("ns")
    return Event(
        id=obj["id"],
        user=obj["u"],
        t=obj["t"],
        kind=obj["k"],
        item=obj.get("i"),
        x=None if x is None else np.frombuffer(x, dtype=_F64),
        dwell=obj.get("d"),
        depth=obj.get("s"),
        hover=obj.get("h"),
        target=obj.get("y"),
        segment=obj.get("g"),
        config=obj.get("c"),
        received=obj.get("r"),
        session=obj.get("sid"),
        automated=obj.get("a", False),
        norms=None if norms is None else {k: tuple(v) for k, v in norms.items()},
        base=obj.get("b"),
        to_seq=obj.get("to"),
        restored=obj.get("st"),
        backfill=obj.get("bf", False),
        extra={k: obj[k] for k in obj if k not in _EVENT_KEYS},
        rid=obj.get("rid"),
        exposure=None if obj["k"] != EXPOSURE else _logged_exposure(obj),
        arm=None if (xa := obj.get("xa")) is None else Arm(*xa),
    )


def _logged_exposure(obj: Mapping[str, Any]) -> Exposure:
    shown = obj["sh"]
    pp, ci = obj.get("pp"), obj.get("ci")
    return Exposure(tuple(e[0] for e in shown), tuple(e[1] for e in shown),
                    tuple(e[2] for e in shown), obj["rq"], obj["rc"],
                    None if pp is None else tuple(pp), None if ci is None else tuple(ci),
                    obj.get("cx"), obj.get("sw"), obj.get("co"))


# ---------------------------------------------------------------- queries


def query_from_map(obj: Mapping[str, Any], limits: Limits = DEFAULT_LIMITS) -> Query:
    _check_version(obj)
    user = _string(_required(obj, "u"), "u", limits, token=True)
    raw = _required(obj, "c")
    if not isinstance(raw, list):
        raise Rejected(Reason.WRONG_TYPE, "'c' (candidates) must be a list", "c")
    if not raw:
        raise Rejected(Reason.OUT_OF_RANGE, "'c' (candidates) must not be empty", "c")
    if len(raw) > limits.max_candidates:
        raise Rejected(
            Reason.OVERSIZE, f"{len(raw)} candidates exceed {limits.max_candidates}", "c"
        )
    matrix = None
    fast = _candidates_fast(raw, limits)
    if fast is None:
        candidates = _candidates(raw, limits)
    else:
        candidates, matrix = fast
    top = obj.get("n")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int):
            raise Rejected(Reason.WRONG_TYPE, "'n' (top) must be an integer", "n")
        if not 1 <= top <= limits.max_top:
            raise Rejected(Reason.OUT_OF_RANGE, f"'n' (top) must be in [1, {limits.max_top}]", "n")
    windows = obj.get("w", False)
    if not isinstance(windows, bool):
        raise Rejected(Reason.WRONG_TYPE, "'w' (recent windows) must be true or false", "w")
    min_seq = obj.get("ms")
    if min_seq is not None:
        if isinstance(min_seq, bool) or not isinstance(min_seq, int):
            raise Rejected(Reason.WRONG_TYPE, "'ms' (minimum seq) must be an integer", "ms")
        if not 0 <= min_seq < 2**63:
            raise Rejected(Reason.OUT_OF_RANGE, "'ms' (minimum seq) must be >= 0", "ms")
    logged = obj.get("l", False)
    if not isinstance(logged, bool):
        raise Rejected(Reason.WRONG_TYPE, "'l' (log the exposure) must be true or false", "l")
    shown_at = obj.get("t")
    if shown_at is not None:
        shown_at = _number(shown_at, "t", lo=0.0)
    rid = obj.get("rid")
    if rid is not None:
        rid = _string(rid, "rid", limits)
    return Query(user=user, candidates=candidates if fast is not None else tuple(candidates),
                 top=top, windows=windows, matrix=matrix, min_seq=min_seq, log=logged,
                 t=shown_at, rid=rid)


def _candidates(raw: list, limits: Limits) -> list[Candidate]:
    candidates = []
    for entry in raw:
        if isinstance(entry, str):
            candidates.append(Candidate(_string(entry, "c[].i", limits)))
        elif isinstance(entry, list) and len(entry) == 2:
            candidates.append(
                Candidate(_string(entry[0], "c[].i", limits), _vector(entry[1], "c[].x", limits))
            )
        elif isinstance(entry, dict):
            x = entry.get("x")
            candidates.append(
                Candidate(
                    _string(_required(entry, "i"), "c[].i", limits),
                    None if x is None else _vector(x, "c[].x", limits),
                )
            )
        else:
            raise Rejected(
                Reason.WRONG_TYPE,
                "a candidate is an item id, [id, features] or {'i': id, 'x': features}",
                "c",
            )
    return candidates


def _candidates_fast(raw: list, limits: Limits) -> tuple[CandidateRows, np.ndarray] | None:
    """All candidates as [id, features] with equal lengths: one matrix, one finiteness check.

    Returns the candidates and that matrix, or None when the shape is anything else; the
    careful path then finds the reason. (Checks go through `map` over types and lengths:
    a generator per candidate cost more than the rest of the decoding.)
    """
    try:
        if set(map(type, raw)) != _LIST or set(map(len, raw)) != _PAIR:
            return None
        rows = list(map(_SECOND, raw))
        kinds = set(map(type, rows))
        if kinds == _BYTES:  # packed float64: no per-number work at all
            size = len(rows[0])
            if not size or size % 8 or set(map(len, rows)) != {size}:
                return None
            matrix = np.frombuffer(b"".join(rows), dtype=_F64).reshape(len(rows), size // 8)
        elif kinds == _LIST:
            if not _NUMBER_TYPES.issuperset(map(type, itertools.chain.from_iterable(rows))):
                return None
            matrix = np.array(rows, dtype=np.float64)
        else:
            return None
    except (TypeError, ValueError):
        return None
    if matrix.ndim != 2 or matrix.shape[1] > limits.max_dimension:
        return None
    if not np.isfinite(matrix).all():
        return None
    ids = tuple(map(_FIRST, raw))
    if (set(map(type, ids)) != _STR or "" in ids
            or max(map(len, ids)) > limits.max_id_length
            or not all(map(str.isprintable, ids))):  # as the careful path: invalid_id
        return None
    matrix.flags.writeable = False
    return CandidateRows(ids, matrix), matrix


_LIST, _PAIR, _BYTES, _STR = {list}, {2}, {bytes}, {str}
_FIRST, _SECOND = operator.itemgetter(0), operator.itemgetter(1)


def decode_query(
    raw: bytes, limits: Limits = DEFAULT_LIMITS, *, subject_user: str | None = None
) -> Query:
    """Decode and validate one query from untrusted bytes (raises `Rejected`).

    `subject_user`: the user token of the subject it came on; the body's `u` may be left out,
    and must match if given.
    """
    obj = _unpack(raw, limits)
    if subject_user is not None:
        if obj.get("u") is None:
            obj = {**obj, "u": subject_user}
        elif obj["u"] != subject_user:
            raise Rejected(
                Reason.INVALID_ID,
                f"the subject's user {subject_user!r} differs from the body's 'u' {obj['u']!r}",
                "u",
            )
    return query_from_map(obj, limits)


def decode_content(raw: bytes, limits: Limits = DEFAULT_LIMITS) -> list[tuple[str, np.ndarray]]:
    """A catalog upsert: {"v": 1, "i": item, "x": [...]} or {"v": 1, "b": [{"i", "x"}, ...]}."""
    obj = _unpack(raw, limits)
    entries = obj.get("b")
    if entries is None:
        entries = [obj]
    elif not isinstance(entries, list):
        raise Rejected(Reason.WRONG_TYPE, "'b' must be a list of {'i', 'x'} maps", "b")
    out = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise Rejected(Reason.WRONG_TYPE, "'b' must be a list of {'i', 'x'} maps", "b")
        out.append((_string(_required(entry, "i"), "i", limits),
                    _vector(_required(entry, "x"), "x", limits)))
    return out


def encode_query(query: Query) -> bytes:
    cands = [
        c.item if c.x is None else [c.item, np.asarray(c.x, dtype=float).tolist()]
        for c in query.candidates
    ]
    body: dict[str, Any] = {"v": SCHEMA_VERSION, "u": query.user, "c": cands}
    if query.top is not None:
        body["n"] = query.top
    if query.windows:
        body["w"] = True
    if query.min_seq is not None:
        body["ms"] = query.min_seq
    if query.log:
        body["l"] = True
    if query.t is not None:
        body["t"] = query.t
    if query.rid is not None:
        body["rid"] = query.rid
    return msgpack.packb(body, use_bin_type=True)


def encode_ranking(ranking: Ranking) -> bytes:
    body = {
        "v": SCHEMA_VERSION,
        "u": ranking.user,
        "i": list(ranking.items),
        "w": list(ranking.weights),
        "s": list(ranking.scores),
        "q": ranking.seq,
        "cv": ranking.config,
    }
    if ranking.windows is not None:
        body["rw"] = dict(ranking.windows)
    if ranking.rid is not None:
        body["rid"] = ranking.rid
    if ranking.arm is not None:
        body["xa"] = list(ranking.arm)
    if ranking.log_error is not None:
        body["le"] = ranking.log_error
    if ranking.propensities is not None:
        body["pp"] = list(ranking.propensities)
    return msgpack.packb(body, use_bin_type=True)


def encode_error(rejected: Rejected) -> bytes:
    return msgpack.packb({"v": SCHEMA_VERSION, **rejected.to_wire()}, use_bin_type=True)


def decode_reply(raw: bytes) -> Ranking:
    """Client side: a reply into a `Ranking`, or `Rejected` if the service refused."""
    obj = msgpack.unpackb(raw, raw=False)
    if "e" in obj:
        raise Rejected(Reason(obj["e"]), obj.get("m", ""), obj.get("f"))
    return Ranking(
        user=obj["u"],
        items=tuple(obj["i"]),
        weights=tuple(obj["w"]),
        scores=tuple(obj["s"]),
        seq=obj["q"],
        config=obj["cv"],
        windows=obj.get("rw"),
        rid=obj.get("rid"),
        arm=None if obj.get("xa") is None else Arm(*obj["xa"]),
        log_error=obj.get("le"),
        propensities=None if obj.get("pp") is None else tuple(obj["pp"]),
    )
