"""The wire contract (events/contract): the JSON Schemas against the codec and the service.

Every valid example decodes with the real codec and validates; every invalid one is refused
by the codec and by the schema with the same reason. The codec is the truth: where they
disagree, the schema is wrong (or the codec has a bug: two were found and fixed). The checks that
only the service makes (the dimension, admin-only kinds, tokens, info and admin requests)
are held to a real service through a real nats-server.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import math
import re
from typing import Any

import msgpack
import nats
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from events import (
    DEFAULT_LIMITS,
    KINDS,
    SCHEMA_VERSION,
    Candidate,
    Query,
    Ranking,
    Reason,
    Rejected,
    contract,
    decode_content,
    decode_event,
    decode_query,
    decode_reply,
    encode_error,
    encode_event,
    encode_query,
    encode_ranking,
)
from events import codec as codec_module
from events.exposure import exposure_event
from events.types import SUPPORTED_VERSIONS, Arm

DIM = 16  # the README's default feature dimension
INBOUND = ("event", "query", "content", "info-request", "admin-rollback", "admin-forget",
           "admin-clear_bot", "admin-experiment", "admin-stats", "admin-experiments",
           "admin-user")
OUTBOUND = ("ranking", "error", "rejected", "info")
NAN, INF = math.nan, math.inf


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def f64(*values: float) -> bytes:
    return np.array(values, dtype="<f8").tobytes()


def vec(n: int = DIM, value: float = 0.5) -> list[float]:
    return [value] * n


def subject_user(body: Any) -> str:
    """The subject's <user> token a body is sent on: its own `u` when that is text."""
    user = body.get("u") if isinstance(body, dict) else None
    return user if isinstance(user, str) and user else "alice"


def decode(kind: str, raw: bytes) -> Any:
    """The real codec, as the service calls it (on the subject of the body's own user)."""
    try:
        body = msgpack.unpackb(raw, raw=False)
    except Exception:  # the codec says why
        body = None
    if kind == "event":
        return decode_event(raw, subject_user=subject_user(body))
    if kind == "query":
        return decode_query(raw, subject_user=subject_user(body))
    if kind == "content":
        return decode_content(raw)
    raise AssertionError(kind)


# ---------------------------------------------------------------- examples

EVENT = {"v": 1, "id": "e1", "u": "alice", "t": 1_700_000_000.5, "k": "click", "i": "article-1"}
SHOWN = [["a", 0.6, 1.2], ["b", 0.4, 0.8]]
EXPOSURE = {"v": 1, "id": "r1", "u": "alice", "t": 1_700_000_000.0, "k": "exposure",
            "sh": SHOWN, "rq": 12, "rc": 1}
EXPLORED = {**EXPOSURE, "rid": "r1", "pp": [0.7, 0.3], "ci": ["a", "b"],
            "cx": f64(*vec(2 * DIM)), "sw": f64(*vec(DIM + 1)), "co": f64(0.1, -0.1)}


def _logged_exposure() -> dict:
    """An exposure as the query processes write it (events/exposure.py), explored."""
    ranking = Ranking(user="alice", items=("a", "b"), weights=(0.6, 0.4), scores=(1.2, 0.8),
                      seq=3, config=1, propensities=(0.7, 0.3), candidates=("a", "b"),
                      features=f64(*vec(2 * DIM)), shared=f64(*vec(DIM + 1)),
                      offsets=f64(0.1, -0.1))
    query = Query("alice", (Candidate("a"), Candidate("b")), log=True)
    return msgpack.unpackb(encode_event(exposure_event(query, ranking, "r9", 1.0e9)))


VALID_EVENTS = [
    EVENT,
    {**EVENT, "k": "impression"},
    {**EVENT, "x": vec()},
    {**EVENT, "x": f64(*vec())},  # packed little-endian float64
    {**EVENT, "t": 0, "x": [1] * DIM},  # integers are numbers
    {**EVENT, "k": "dwell", "d": 12.5},
    {**EVENT, "k": "scroll", "s": 1},
    {**EVENT, "k": "hover", "h": 0.0},
    {**EVENT, "k": "feedback", "y": 0.8},
    {**EVENT, "k": "click", "d": 3.0, "y": 1.0},  # another kind's field: checked, not needed
    {"v": 1, "id": "s1", "u": "alice", "t": 5.0, "k": "segment", "g": "premium"},
    {"v": 1, "id": "s2", "u": "alice", "t": 5.0, "k": "segment", "g": "a", "i": "x"},
    {**EVENT, "sid": "tab-1", "a": True, "bf": False, "rid": "r1", "c": 2, "r": 1.0},
    {**EVENT, "x": None, "sid": None, "d": None, "a": None},  # nil is absent
    {**EVENT, "id": "an id with spaces é", "i": "ü" * 128},  # ids need not be tokens
    {**EVENT, "zz": {"any": ["thing"]}, "ns": "stamped by the service", "xa": 5},
    {**EVENT, "sh": "ignored on a click", "rq": "too"},
    EXPOSURE,
    {**EXPOSURE, "rq": 0, "pp": None},
    {"v": 1, "id": "r2", "u": "alice", "t": 0.0, "k": "exposure", "sh": [["a", 1.0, -3]]},
    EXPLORED,
    {**EXPLORED, "sw": None, "co": None},
    _logged_exposure(),
]

VALID_QUERIES = [
    {"v": 1, "c": ["article-1", "article-2"]},
    {"v": 1, "u": "alice", "c": [["a", vec()], ["b", vec()]]},
    {"v": 1, "c": [["a", f64(*vec())], ["b", f64(*vec())]]},
    {"v": 1, "c": ["a", ["b", vec()], {"i": "c", "x": f64(*vec())}, {"i": "d"}]},
    {"v": 1, "c": [{"i": "a", "x": None}], "n": 1, "w": True, "ms": 0, "l": True, "t": 5,
     "rid": "r1"},
    {"v": 1, "c": ["a"], "n": None, "ms": None, "t": None, "rid": None, "u": None, "zz": 1},
    {"v": 1, "c": ["a"] * 1000, "n": 1000, "ms": 2**63 - 1},
    msgpack.unpackb(encode_query(Query("alice", (Candidate("a"), Candidate("b", np.ones(DIM))),
                                       top=1, windows=True, min_seq=4, log=True, t=3.0,
                                       rid="r1"))),
]

VALID_CONTENT = [
    {"v": 1, "i": "article-1", "x": vec()},
    {"v": 1, "i": "article-1", "x": f64(*vec())},
    {"v": 1, "b": [{"i": "a", "x": vec()}, {"i": "b", "x": f64(*vec())}]},
    {"v": 1, "b": []},
    {"v": 1, "b": None, "i": "a", "x": vec()},  # nil `b`: the one-item form
    {"v": 1, "b": [{"i": "a", "x": vec(), "zz": 1}], "i": 5, "x": "not read"},
]

VALID = [("event", b) for b in VALID_EVENTS] + [("query", b) for b in VALID_QUERIES] + [
    ("content", b) for b in VALID_CONTENT]


def _without(body: dict, *keys: str) -> dict:
    return {k: v for k, v in body.items() if k not in keys}


INVALID_EVENTS = [
    # the map itself
    ([1, 2], Reason.MALFORMED),
    ("a string", Reason.MALFORMED),
    # v
    (_without(EVENT, "v"), Reason.MISSING_FIELD),
    ({**EVENT, "v": None}, Reason.WRONG_TYPE),  # nil is no absence for `v`
    ({**EVENT, "v": "1"}, Reason.WRONG_TYPE),
    ({**EVENT, "v": 1.0}, Reason.WRONG_TYPE),
    ({**EVENT, "v": True}, Reason.WRONG_TYPE),
    ({**EVENT, "v": 2}, Reason.UNSUPPORTED_VERSION),
    # ids
    (_without(EVENT, "id"), Reason.MISSING_FIELD),
    ({**EVENT, "id": None}, Reason.MISSING_FIELD),
    ({**EVENT, "id": 5}, Reason.WRONG_TYPE),
    ({**EVENT, "id": b"e1"}, Reason.WRONG_TYPE),
    ({**EVENT, "id": ""}, Reason.INVALID_ID),
    ({**EVENT, "id": "x" * 129}, Reason.OVERSIZE),
    ({**EVENT, "id": "e\x00"}, Reason.INVALID_ID),
    ({**EVENT, "id": "line\nbreak"}, Reason.INVALID_ID),
    ({**EVENT, "id": "e\u2028"}, Reason.INVALID_ID),  # printable beyond ASCII too
    ({**EVENT, "id": "e\u200b"}, Reason.INVALID_ID),  # a format character (Cf)
    (_without(EVENT, "u"), Reason.MISSING_FIELD),
    ({**EVENT, "u": 7}, Reason.WRONG_TYPE),
    ({**EVENT, "u": "al.ice"}, Reason.INVALID_ID),
    ({**EVENT, "u": "al ice"}, Reason.INVALID_ID),
    ({**EVENT, "u": "a*"}, Reason.INVALID_ID),
    ({**EVENT, "u": "a>"}, Reason.INVALID_ID),
    ({**EVENT, "u": "u" * 129}, Reason.OVERSIZE),
    ({**EVENT, "sid": ""}, Reason.INVALID_ID),
    ({**EVENT, "sid": 3}, Reason.WRONG_TYPE),
    ({**EVENT, "rid": "r" * 129}, Reason.OVERSIZE),
    # t
    (_without(EVENT, "t"), Reason.MISSING_FIELD),
    ({**EVENT, "t": "yesterday"}, Reason.WRONG_TYPE),
    ({**EVENT, "t": True}, Reason.WRONG_TYPE),
    ({**EVENT, "t": NAN}, Reason.NOT_FINITE),
    ({**EVENT, "t": INF}, Reason.NOT_FINITE),
    ({**EVENT, "t": -INF}, Reason.NOT_FINITE),  # finite is checked before the range
    ({**EVENT, "t": -1}, Reason.OUT_OF_RANGE),
    # k
    (_without(EVENT, "k"), Reason.MISSING_FIELD),
    ({**EVENT, "k": 3}, Reason.WRONG_TYPE),
    ({**EVENT, "k": "teleport"}, Reason.UNKNOWN_KIND),
    ({**EVENT, "k": "rollback"}, Reason.UNKNOWN_KIND),  # operators' tools only
    # i
    (_without(EVENT, "i"), Reason.MISSING_FIELD),
    ({**EVENT, "i": None}, Reason.MISSING_FIELD),
    ({**EVENT, "k": "segment", "g": "a", "i": 5}, Reason.WRONG_TYPE),
    # x
    ({**EVENT, "x": "0.5"}, Reason.WRONG_TYPE),
    ({**EVENT, "x": {"0": 1.0}}, Reason.WRONG_TYPE),
    ({**EVENT, "x": [1.0, "2"]}, Reason.WRONG_TYPE),
    ({**EVENT, "x": [1.0, True]}, Reason.WRONG_TYPE),
    ({**EVENT, "x": [1.0, [2.0]]}, Reason.WRONG_TYPE),
    ({**EVENT, "x": [1.0, None]}, Reason.WRONG_TYPE),
    ({**EVENT, "x": vec(257)}, Reason.OVERSIZE),
    ({**EVENT, "x": [0.0, NAN]}, Reason.NOT_FINITE),
    ({**EVENT, "x": [0.0, -INF]}, Reason.NOT_FINITE),
    ({**EVENT, "x": b"\x00" * 7}, Reason.WRONG_TYPE),
    ({**EVENT, "x": f64(*vec(257))}, Reason.OVERSIZE),
    ({**EVENT, "x": f64(1.0, INF)}, Reason.NOT_FINITE),
    ({**EVENT, "k": "segment", "g": "a", "x": [NAN]}, Reason.NOT_FINITE),  # any kind's x
    # the kinds' own fields
    ({**EVENT, "k": "dwell"}, Reason.MISSING_FIELD),
    ({**EVENT, "k": "dwell", "d": None}, Reason.MISSING_FIELD),
    ({**EVENT, "k": "dwell", "d": -0.5}, Reason.OUT_OF_RANGE),
    ({**EVENT, "k": "dwell", "d": "12"}, Reason.WRONG_TYPE),
    ({**EVENT, "k": "scroll"}, Reason.MISSING_FIELD),
    ({**EVENT, "k": "scroll", "s": 1.01}, Reason.OUT_OF_RANGE),
    ({**EVENT, "s": 2}, Reason.OUT_OF_RANGE),  # checked whatever the kind
    ({**EVENT, "k": "hover"}, Reason.MISSING_FIELD),
    ({**EVENT, "k": "hover", "h": NAN}, Reason.NOT_FINITE),
    ({**EVENT, "k": "click", "h": INF}, Reason.NOT_FINITE),
    ({**EVENT, "k": "feedback"}, Reason.MISSING_FIELD),
    ({**EVENT, "k": "feedback", "y": -0.1}, Reason.OUT_OF_RANGE),
    ({**EVENT, "y": NAN}, Reason.NOT_FINITE),
    ({**_without(EVENT, "i"), "k": "segment"}, Reason.MISSING_FIELD),
    ({**EVENT, "k": "segment", "g": "a.b"}, Reason.INVALID_ID),
    ({**EVENT, "g": 5}, Reason.WRONG_TYPE),
    # the other optional fields
    ({**EVENT, "c": 0}, Reason.OUT_OF_RANGE),
    ({**EVENT, "c": 1.0}, Reason.WRONG_TYPE),
    ({**EVENT, "c": True}, Reason.WRONG_TYPE),
    ({**EVENT, "r": -5}, Reason.OUT_OF_RANGE),
    ({**EVENT, "a": "yes"}, Reason.WRONG_TYPE),
    ({**EVENT, "a": 1}, Reason.WRONG_TYPE),
    ({**EVENT, "bf": 0}, Reason.WRONG_TYPE),
    # exposures
    (_without(EXPOSURE, "sh"), Reason.MISSING_FIELD),
    ({**EXPOSURE, "sh": None}, Reason.MISSING_FIELD),
    ({**EXPOSURE, "sh": []}, Reason.WRONG_TYPE),
    ({**EXPOSURE, "sh": "a"}, Reason.WRONG_TYPE),
    ({**EXPOSURE, "sh": [["a", 0.5, 0.1]] * 1001}, Reason.OVERSIZE),
    ({**EXPOSURE, "sh": [["a", 0.5]]}, Reason.WRONG_TYPE),
    ({**EXPOSURE, "sh": ["a"]}, Reason.WRONG_TYPE),
    ({**EXPOSURE, "sh": [[5, 0.5, 0.1]]}, Reason.WRONG_TYPE),
    ({**EXPOSURE, "sh": [["", 0.5, 0.1]]}, Reason.INVALID_ID),
    ({**EXPOSURE, "sh": [["a", 1.5, 0.1]]}, Reason.OUT_OF_RANGE),
    ({**EXPOSURE, "sh": [["a", 0.5, NAN]]}, Reason.NOT_FINITE),
    ({**EXPOSURE, "sh": [["a", 0.5, NAN], ["", 0.5, 0.1]]}, Reason.NOT_FINITE),  # in order
    ({**EXPOSURE, "rq": -1}, Reason.WRONG_TYPE),
    ({**EXPOSURE, "rq": None}, Reason.WRONG_TYPE),  # nil is no absence here
    ({**EXPOSURE, "rq": 1.0}, Reason.WRONG_TYPE),
    ({**EXPOSURE, "rc": 0}, Reason.WRONG_TYPE),
    ({**EXPOSURE, "pp": "a"}, Reason.WRONG_TYPE),
    ({**EXPOSURE, "pp": [0.5, 1.5]}, Reason.OUT_OF_RANGE),
    ({**EXPLORED, "ci": None}, Reason.WRONG_TYPE),
    (_without(EXPLORED, "ci"), Reason.WRONG_TYPE),
    (_without(EXPLORED, "cx"), Reason.WRONG_TYPE),
    ({**EXPLORED, "ci": []}, Reason.WRONG_TYPE),
    ({**EXPLORED, "ci": "a"}, Reason.WRONG_TYPE),
    ({**EXPLORED, "ci": ["a", ""]}, Reason.INVALID_ID),
    ({**EXPLORED, "cx": vec(2 * DIM)}, Reason.WRONG_TYPE),
    ({**EXPLORED, "cx": f64(*vec(2 * DIM - 1, NAN), 0.0)}, Reason.NOT_FINITE),
    ({**EXPLORED, "sw": vec(DIM + 1)}, Reason.WRONG_TYPE),
    ({**EXPLORED, "sw": f64(*vec(DIM), NAN)}, Reason.NOT_FINITE),
    ({**EXPLORED, "ci": ["a"], "pp": [1.0], "sh": [["a", 1.0, 0.0]], "cx": f64(*vec(257)),
      "sw": f64(*vec(258)), "co": f64(0.0)}, Reason.OVERSIZE),
    ({**_without(EXPLORED, "ci", "cx", "sw"), "co": f64(0.0, 0.0)}, Reason.WRONG_TYPE),
    ({**EXPLORED, "co": [0.1, -0.1]}, Reason.WRONG_TYPE),
    ({**EXPLORED, "co": f64(0.1, INF)}, Reason.NOT_FINITE),
    # several rules broken: the codec names the first, in its order
    ({"v": 1, "id": 5}, Reason.WRONG_TYPE),
    ({"id": ""}, Reason.MISSING_FIELD),
    ({**EVENT, "t": -1, "k": "teleport"}, Reason.OUT_OF_RANGE),
    ({**EVENT, "k": "teleport", "x": "bad"}, Reason.UNKNOWN_KIND),
    ({**EVENT, "x": vec(300, NAN)}, Reason.OVERSIZE),
    ({**EVENT, "x": ["a"] * 300}, Reason.WRONG_TYPE),
    ({**EVENT, "u": "a.b" * 50}, Reason.OVERSIZE),
    ({**EVENT, "u": "\x00." * 50}, Reason.INVALID_ID),
    ({**EVENT, "k": "dwell", "d": -1, "s": 2, "i": ""}, Reason.INVALID_ID),
    ({**EVENT, "k": "segment", "sid": "", "c": 0}, Reason.MISSING_FIELD),
    ({**EXPOSURE, "rid": "", "sh": []}, Reason.INVALID_ID),
    ({**EXPOSURE, "sh": [], "x": "bad"}, Reason.WRONG_TYPE),
]

QUERY = {"v": 1, "c": ["a", "b"]}
INVALID_QUERIES = [
    ([1], Reason.MALFORMED),
    (_without(QUERY, "v"), Reason.MISSING_FIELD),
    ({**QUERY, "v": 0}, Reason.UNSUPPORTED_VERSION),
    ({**QUERY, "u": 5}, Reason.INVALID_ID),  # not the subject's user (whatever its type)
    ({**QUERY, "u": ""}, Reason.INVALID_ID),
    ({**QUERY, "u": "x" * 129}, Reason.OVERSIZE),  # the subject's own token, too long
    ({**QUERY, "u": "a\tb"}, Reason.INVALID_ID),
    (_without(QUERY, "c"), Reason.MISSING_FIELD),
    ({**QUERY, "c": None}, Reason.MISSING_FIELD),
    ({**QUERY, "c": "a"}, Reason.WRONG_TYPE),
    ({**QUERY, "c": {"i": "a"}}, Reason.WRONG_TYPE),
    ({**QUERY, "c": []}, Reason.OUT_OF_RANGE),
    ({**QUERY, "c": ["a"] * 1001}, Reason.OVERSIZE),
    ({**QUERY, "c": [5]}, Reason.WRONG_TYPE),
    ({**QUERY, "c": [None]}, Reason.WRONG_TYPE),
    ({**QUERY, "c": [""]}, Reason.INVALID_ID),
    ({**QUERY, "c": ["x" * 129]}, Reason.OVERSIZE),
    ({**QUERY, "c": ["a\n"]}, Reason.INVALID_ID),
    ({**QUERY, "c": ["a.b c*"]}, None),  # candidate ids need not be tokens: valid
    ({**QUERY, "c": [["a"]]}, Reason.WRONG_TYPE),
    ({**QUERY, "c": [["a", vec(), 3]]}, Reason.WRONG_TYPE),
    ({**QUERY, "c": [[5, vec()]]}, Reason.WRONG_TYPE),
    ({**QUERY, "c": [["a", None]]}, Reason.WRONG_TYPE),
    ({**QUERY, "c": [["a", "xx"]]}, Reason.WRONG_TYPE),
    ({**QUERY, "c": [["a", [NAN]]]}, Reason.NOT_FINITE),
    ({**QUERY, "c": [["a", vec(257)]]}, Reason.OVERSIZE),
    ({**QUERY, "c": [["a", b"\x00" * 9]]}, Reason.WRONG_TYPE),
    ({**QUERY, "c": [["a", vec()], ["b", f64(INF)]]}, Reason.NOT_FINITE),
    ({**QUERY, "c": [{"x": vec()}]}, Reason.MISSING_FIELD),
    ({**QUERY, "c": [{"i": None}]}, Reason.MISSING_FIELD),
    ({**QUERY, "c": [{"i": 3, "x": "bad"}]}, Reason.WRONG_TYPE),
    ({**QUERY, "c": [{"i": "a", "x": [INF]}]}, Reason.NOT_FINITE),
    ({**QUERY, "c": ["a", ["", vec()], 5]}, Reason.INVALID_ID),  # the first bad candidate
    ({**QUERY, "n": 0}, Reason.OUT_OF_RANGE),
    ({**QUERY, "n": 1001}, Reason.OUT_OF_RANGE),  # `top`: out_of_range, not oversize
    ({**QUERY, "n": "3"}, Reason.WRONG_TYPE),
    ({**QUERY, "n": 2.0}, Reason.WRONG_TYPE),
    ({**QUERY, "n": True}, Reason.WRONG_TYPE),
    ({**QUERY, "w": None}, Reason.WRONG_TYPE),  # nil is no absence for the flags
    ({**QUERY, "w": 1}, Reason.WRONG_TYPE),
    ({**QUERY, "l": "yes"}, Reason.WRONG_TYPE),
    ({**QUERY, "ms": -1}, Reason.OUT_OF_RANGE),
    ({**QUERY, "ms": 2**63}, Reason.OUT_OF_RANGE),
    ({**QUERY, "ms": 1.5}, Reason.WRONG_TYPE),
    ({**QUERY, "t": -1}, Reason.OUT_OF_RANGE),
    ({**QUERY, "t": NAN}, Reason.NOT_FINITE),
    ({**QUERY, "rid": ""}, Reason.INVALID_ID),
    ({**QUERY, "rid": 5}, Reason.WRONG_TYPE),
    # several rules broken
    ({**QUERY, "c": [], "n": 0}, Reason.OUT_OF_RANGE),
    ({**QUERY, "c": ["a", 5], "n": "x"}, Reason.WRONG_TYPE),
    ({**QUERY, "n": 0, "w": 1}, Reason.OUT_OF_RANGE),
    ({**QUERY, "c": [["a", vec(300, NAN)]]}, Reason.OVERSIZE),
]

CONTENT = {"v": 1, "i": "a", "x": vec()}
INVALID_CONTENT = [
    ("x", Reason.MALFORMED),
    (_without(CONTENT, "v"), Reason.MISSING_FIELD),
    ({**CONTENT, "v": 2}, Reason.UNSUPPORTED_VERSION),
    (_without(CONTENT, "i"), Reason.MISSING_FIELD),
    (_without(CONTENT, "x"), Reason.MISSING_FIELD),
    ({**CONTENT, "x": None}, Reason.MISSING_FIELD),
    ({**CONTENT, "i": 5}, Reason.WRONG_TYPE),
    ({**CONTENT, "i": ""}, Reason.INVALID_ID),
    ({**CONTENT, "i": "i" * 129}, Reason.OVERSIZE),
    ({**CONTENT, "x": "abc"}, Reason.WRONG_TYPE),
    ({**CONTENT, "x": vec(257)}, Reason.OVERSIZE),
    ({**CONTENT, "x": f64(NAN)}, Reason.NOT_FINITE),
    ({"v": 1, "b": "a"}, Reason.WRONG_TYPE),
    ({"v": 1, "b": {"i": "a", "x": vec()}}, Reason.WRONG_TYPE),
    ({"v": 1, "b": [5]}, Reason.WRONG_TYPE),
    ({"v": 1, "b": [{"i": "a", "x": vec()}, ["b", vec()]]}, Reason.WRONG_TYPE),
    ({"v": 1, "b": [{"i": "a"}]}, Reason.MISSING_FIELD),
    ({"v": 1, "b": [{"x": vec()}]}, Reason.MISSING_FIELD),
    ({"v": 1, "b": [{"i": "a\x00", "x": vec()}]}, Reason.INVALID_ID),
    ({"v": 1, "b": [{"i": "a", "x": [1.0, INF]}]}, Reason.NOT_FINITE),
    ({"v": 1, "b": [{"i": 5}]}, Reason.WRONG_TYPE),  # `i` before the missing `x`
    ({"v": 1, "b": [{"i": "a", "x": [NAN]}, {"i": ""}]}, Reason.NOT_FINITE),
]

INVALID = ([("event", b, r) for b, r in INVALID_EVENTS]
           + [("query", b, r) for b, r in INVALID_QUERIES]
           + [("content", b, r) for b, r in INVALID_CONTENT])


def _id(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------- the codec's kinds


@pytest.mark.parametrize(("kind", "body"), VALID, ids=[f"{k}-{_id(b)}" for k, b in VALID])
def test_every_valid_example_decodes_and_validates(kind: str, body: dict):
    raw = pack(body)
    decode(kind, raw)  # raises Rejected if the codec refuses it
    assert contract.check(kind, body, dim=DIM) is None
    assert contract.check_bytes(kind, raw) is None


@pytest.mark.parametrize(("kind", "body", "reason"), INVALID,
                         ids=[f"{k}-{r}-{_id(b)}" for k, b, r in INVALID])
def test_every_invalid_example_is_refused_with_the_same_reason(kind: str, body: Any,
                                                               reason: Reason | None):
    raw = pack(body)
    violation = contract.check_bytes(kind, raw)
    if reason is None:  # a near miss that is valid
        decode(kind, raw)
        assert violation is None
        return
    with pytest.raises(Rejected) as refused:
        decode(kind, raw)
    assert violation is not None, f"the schema accepts what the codec refuses: {refused.value}"
    assert violation.reason is refused.value.reason, (violation, refused.value)
    assert refused.value.reason is reason
    assert violation.stage == "codec"
    if refused.value.field is not None:  # the codec's `f` (`c[].i`) is on the schema's path
        head = refused.value.field.split("[")[0]
        assert head in (violation.field, *violation.path), (violation, refused.value.field)


@pytest.mark.parametrize("kind", ["event", "query", "content"])
def test_payload_limit_and_bytes_that_are_not_msgpack(kind: str):
    big = pack({"v": 1, "pad": "x" * DEFAULT_LIMITS.max_payload_bytes})
    for raw, reason in ((big, Reason.OVERSIZE), (b"\xc1", Reason.MALFORMED),
                        (pack({"v": 1})[:-1] + b"\xd9", Reason.MALFORMED),
                        (b"", Reason.MALFORMED)):
        with pytest.raises(Rejected) as refused:
            decode(kind, raw)
        assert refused.value.reason is reason
        assert contract.check_bytes(kind, raw).reason is reason


def test_the_rules_a_schema_cannot_state_are_in_its_x_rules():
    """The codec's checks that compare two fields or the subject: the schema accepts the
    message, and its `x-rules` name the codec's reason for that field."""
    for kind, body, subject in [
        ("event", {**EVENT, "u": "bob"}, "alice"),
        ("query", {**QUERY, "u": "bob"}, "alice"),
        ("event", {**EXPOSURE, "rid": "another"}, "alice"),
        ("event", {**EXPOSURE, "pp": [1.0]}, "alice"),
        ("event", {**EXPLORED, "cx": f64(*vec(2 * DIM + 1))}, "alice"),
        ("event", {**EXPLORED, "sw": f64(*vec(DIM))}, "alice"),
        ("event", {**EXPLORED, "co": f64(0.1)}, "alice"),
    ]:
        decoder = decode_event if kind == "event" else decode_query
        with pytest.raises(Rejected) as refused:
            decoder(pack(body), subject_user=subject)
        assert contract.check(kind, body) is None
        rules = contract.schema(kind)["x-rules"]
        assert any(r["reason"] == refused.value.reason and r["stage"] == "codec"
                   and refused.value.field in r["fields"] for r in rules), refused.value


# the checks the service makes once the codec accepted: held to a real service below
SERVICE_STAGE = [
    ("event", {**EVENT, "x": vec(DIM - 1)}, Reason.DIMENSION),
    ("event", {**EVENT, "x": f64(*vec(DIM + 1))}, Reason.DIMENSION),
    ("event", {**EVENT, "k": "clear_bot"}, Reason.FORBIDDEN),
    ("query", {**QUERY, "c": [["a", vec(DIM - 1)]]}, Reason.DIMENSION),
    ("query", {**QUERY, "c": ["a", {"i": "b", "x": f64(*vec(3))}]}, Reason.DIMENSION),
    ("content", {**CONTENT, "x": vec(DIM + 1)}, Reason.DIMENSION),
    ("content", {"v": 1, "b": [{"i": "a", "x": vec()}, {"i": "b", "x": []}]}, Reason.DIMENSION),
]


@pytest.mark.parametrize(("kind", "body", "reason"), SERVICE_STAGE)
def test_the_service_stage_checks_come_after_the_codec(kind: str, body: dict, reason: Reason):
    decode(kind, pack(body))  # the codec accepts
    violation = contract.check(kind, body, dim=DIM)
    assert violation.reason is reason and violation.stage == "service"
    # a codec refusal comes first, wherever it is in the message
    worse = {**body, "v": 2}
    assert contract.check(kind, worse, dim=DIM).reason is Reason.UNSUPPORTED_VERSION


# The fast decoding paths once missed two rules the schemas state (the careful paths had them):
def test_candidate_ids_are_printable_on_the_fast_path_too():
    body = {**QUERY, "c": [["a\x00", vec()], ["b\n", vec()]]}
    assert contract.check("query", body).reason is Reason.INVALID_ID
    with pytest.raises(Rejected) as refused:
        decode_query(pack(body), subject_user="alice")
    assert refused.value.reason is Reason.INVALID_ID


@pytest.mark.parametrize(("kind", "field"), [("dwell", "d"), ("hover", "h")])
def test_an_infinite_duration_is_refused_on_the_fast_path_too(kind: str, field: str):
    body = {**EVENT, "k": kind, field: INF}
    assert contract.check("event", body).reason is Reason.NOT_FINITE
    with pytest.raises(Rejected) as refused:
        decode_event(pack(body))
    assert refused.value.reason is Reason.NOT_FINITE


# random maps: the codec and the schema agree on every one (or the codec has a reason that
# only an x-rule states: an exposure's cross-field checks)
_NUMBERS = st.one_of(st.integers(-2, 3), st.floats(allow_nan=True, allow_infinity=True),
                     st.sampled_from([0, 1.0, 1e-300, 1e308, -0.0, 2**63]))
_IDS = st.one_of(st.text(max_size=4), st.sampled_from(["a", "u.1", "x" * 128, "x" * 129,
                                                       "e\x00", "tab\t", "é", "", "a b"]))
_VECTORS = st.one_of(
    st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=4).map(
        lambda v: np.array(v, dtype="<f8").tobytes()),
    st.binary(max_size=17),
    st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3),
                       st.booleans(), st.just("1.5"), st.none()), max_size=5),
    st.just(vec(257)), st.just([NAN] * 257))
_ANY = st.one_of(st.none(), st.booleans(), _NUMBERS, _IDS, _VECTORS)


def _values(key: str):
    return {"v": st.sampled_from([1, 2, True, 1.0, None, "1"]),
            "k": st.sampled_from([*KINDS, "teleport", 3, None]),
            "t": _NUMBERS, "d": _NUMBERS, "s": _NUMBERS, "h": _NUMBERS, "y": _NUMBERS,
            "r": _NUMBERS, "c": _NUMBERS, "n": _NUMBERS, "ms": _NUMBERS,
            "x": _VECTORS, "a": _ANY, "bf": _ANY, "w": _ANY, "l": _ANY}.get(key, _IDS)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.data())
def test_random_events_get_the_codec_reason_from_the_schema(data):
    body = dict(EVENT)
    kind = data.draw(st.sampled_from([k for k in KINDS if k != "exposure"]))
    body["k"] = kind
    for key in data.draw(st.lists(st.sampled_from(
            ["v", "id", "u", "t", "k", "i", "x", "d", "s", "h", "y", "g", "c", "r", "sid",
             "a", "bf", "rid"]), max_size=3)):
        if data.draw(st.booleans()):
            body.pop(key, None)
        else:
            body[key] = data.draw(st.one_of(_values(key), _ANY))
    _agree("event", body)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.data())
def test_random_queries_get_the_codec_reason_from_the_schema(data):
    candidate = st.one_of(_IDS, st.tuples(_IDS, _VECTORS).map(list),
                          st.fixed_dictionaries({"i": _IDS}, optional={"x": _VECTORS}),
                          _ANY, st.lists(_IDS, max_size=3))
    body = {"v": 1, "c": data.draw(st.lists(candidate, max_size=4))}
    for key in data.draw(st.lists(st.sampled_from(["v", "c", "n", "w", "ms", "l", "t",
                                                   "rid"]), max_size=3)):
        if data.draw(st.booleans()):
            body.pop(key, None)
        else:
            body[key] = data.draw(st.one_of(_values(key), _ANY))
    _agree("query", body)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.data())
def test_random_upserts_get_the_codec_reason_from_the_schema(data):
    entry = st.fixed_dictionaries({}, optional={"i": _IDS, "x": _VECTORS})
    body = data.draw(st.one_of(
        st.builds(lambda e: {"v": 1, **e}, entry),
        st.builds(lambda b: {"v": 1, "b": b}, st.one_of(st.lists(entry, max_size=3), _ANY))))
    _agree("content", body)


def _agree(kind: str, body: dict) -> None:
    raw = pack(body)
    violation = contract.check_bytes(kind, raw, service=False)
    try:
        decode(kind, raw)
    except Rejected as refused:
        assert violation is not None, (body, refused)
        assert violation.reason is refused.reason, (body, violation, refused)
    else:
        assert violation is None, (body, violation)


# ---------------------------------------------------------------- every reason named


def _reasons_reached(module: Any, *entries: str) -> set[Reason]:
    """The reasons the code reachable from `entries` can raise, read from the source:
    `Reason.X` in those functions and in the module's functions and methods they call."""
    tree = ast.parse(inspect.getsource(module))
    functions = {node.name: node for node in ast.walk(tree)
                 if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}
    found: set[Reason] = set()
    todo, seen = list(entries), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in ast.walk(functions[name]):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.value.id == "Reason":
                    found.add(Reason[node.attr])
                elif node.value.id in ("self", "Service") and node.attr in functions:
                    todo.append(node.attr)
            elif isinstance(node, ast.Name) and node.id in functions:
                todo.append(node.id)
    return found


def test_every_reason_the_codec_can_raise_is_in_the_schema():
    for kind, entry in (("event", "decode_event"), ("query", "decode_query"),
                        ("content", "decode_content")):
        raised = _reasons_reached(codec_module, entry)
        assert raised, entry
        assert raised <= contract.reasons(kind), (kind, raised - contract.reasons(kind))


def test_every_reason_the_service_can_raise_for_a_request_is_in_the_schema():
    from adapters import nats_service

    assert _reasons_reached(nats_service, "_on_info") <= contract.reasons("info-request")
    assert {f"admin-{c}" for c in nats_service._ADMIN} <= set(INBOUND)  # each has a schema
    for command in nats_service._ADMIN:
        raised = _reasons_reached(nats_service, "_on_admin", f"_admin_{command}")
        # `unknown_kind` of `_on_admin` is an unknown command, which no admin-<command> is
        raised -= {Reason.UNKNOWN_KIND}
        if command in ("stats", "experiments"):
            raised -= {Reason.FORBIDDEN}  # `_admin_identity`: not for the read-only ones
        kind = f"admin-{command}"
        assert raised <= contract.reasons(kind), (kind, raised - contract.reasons(kind))


# ---------------------------------------------------------------- the documents


def test_the_documents_are_valid_draft_2020_12_and_listed():
    docs = contract.documents()
    assert set(docs) == {f"{k}.schema.json" for k in (*contract.kinds(), "common")}
    assert set(contract.kinds()) == set(INBOUND) | set(OUTBOUND)
    for kind in contract.kinds():
        Draft202012Validator.check_schema(contract.schema(kind))
    listing = {row["kind"]: row for row in contract.describe()}
    assert listing["event"]["subject"] == "microtune.events.<user>"
    assert listing["query"]["subject"] == "microtune.query.<user>"
    assert listing["content"]["subject"] == "microtune.content"
    assert listing["rejected"]["subject"] == "microtune.rejected"
    assert {k for k, row in listing.items() if row["sender"] == "client"} == set(INBOUND)
    assert {k for k, row in listing.items() if row["sender"] == "microtune"} == set(OUTBOUND)


_ASSERTIONS = frozenset({
    "type", "enum", "const", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "multipleOf", "minLength", "maxLength", "pattern", "minItems", "maxItems", "uniqueItems",
    "required", "dependentRequired", "minProperties", "maxProperties", "not", "oneOf",
    "anyOf", "x-bin", "x-float64", "x-maxFloats", "x-minFloats", "x-maxBytes", "x-finite",
    "x-printable", "x-dimension"})


@pytest.mark.parametrize("kind", INBOUND)
def test_every_check_of_an_inbound_message_names_its_reason(kind: str):
    """Whatever can fail in a message microtune refuses says with which reason, and with
    one reason only (a subschema holds the checks of one reason)."""
    for node in contract.walk(kind):
        failing = _ASSERTIONS & node.keys()
        if failing:
            assert "x-reason" in node, (kind, node)
            Reason(node["x-reason"])
            assert node.get("x-stage", "codec") in ("codec", "service")
    order = contract.schema(kind)["x-order"]
    assert len(order) == len(set(order))


def test_the_schemas_state_the_limits_and_the_codec_constants():
    limits = DEFAULT_LIMITS
    common = contract.schema("common")["$defs"]
    assert common["id"]["allOf"][2]["maxLength"] == limits.max_id_length
    assert common["features"]["then"]["allOf"][1]["x-maxFloats"] == limits.max_dimension
    assert common["features"]["else"]["allOf"][1]["maxItems"] == limits.max_dimension
    assert common["version"]["allOf"][1]["enum"] == sorted(SUPPORTED_VERSIONS)
    assert SCHEMA_VERSION in SUPPORTED_VERSIONS
    assert set(common["reason"]["enum"]) == {r.value for r in Reason}
    for kind in ("event", "query", "content"):
        x = contract.schema(kind)["x-limits"]
        assert x["payload_bytes"] == limits.max_payload_bytes
        assert x["id_length"] == limits.max_id_length and x["features"] == limits.max_dimension
    query = contract.schema("query")["properties"]
    assert query["c"]["allOf"][3]["maxItems"] == limits.max_candidates
    assert query["n"]["else"]["allOf"][1]["maximum"] == limits.max_top
    event = contract.schema("event")
    assert set(event["properties"]["k"]["allOf"][2]["enum"]) == set(KINDS)
    assert event["allOf"][7]["then"]["properties"]["sh"]["allOf"][2]["maxItems"] == \
        limits.max_candidates
    # every key the codec reads off an event is described
    assert event["properties"].keys() >= codec_module._EVENT_KEYS
    assert set(event["x-order"]) <= event["properties"].keys()
    assert contract.schema("rejected")["properties"]["raw"]["x-maxBytes"] == \
        limits.max_payload_bytes


# ---------------------------------------------------------------- what microtune sends


def test_what_microtune_sends_validates_and_the_client_reads_it():
    from adapters.records import record

    rankings = [
        Ranking(user="alice", items=("a", "b"), weights=(0.7, 0.3), scores=(1.0, 0.2), seq=0,
                config=1),
        Ranking(user="alice", items=("a",), weights=(1.0,), scores=(-2.0,), seq=9, config=3,
                windows={"click": 2, "dwell": 0}, rid="r1", arm=Arm("exp", "b", 2),
                log_error=None, propensities=(0.9,)),
        Ranking(user="alice", items=("a",), weights=(1.0,), scores=(0.0,), seq=1, config=1,
                log_error="the exposure could not be stored (TimeoutError); retry to log it"),
    ]
    for ranking in rankings:
        raw = encode_ranking(ranking)
        assert contract.check_bytes("ranking", raw) is None
        assert decode_reply(raw) == ranking
    for reason in Reason:
        for field in (None, "x"):
            raw = encode_error(Rejected(reason, "detail", field))
            assert contract.check_bytes("error", raw) is None
            with pytest.raises(Rejected) as refused:
                decode_reply(raw)
            assert refused.value.reason is reason
    small, big = b"\xc1 garbage", b"\x00" * (DEFAULT_LIMITS.max_payload_bytes + 5)
    for raw in (small, big):
        rec = msgpack.unpackb(record("microtune.events.ann", raw,
                                     Rejected(Reason.MALFORMED, "not msgpack")))
        assert contract.check("rejected", rec) is None
        assert ("rt" in rec) is (raw is big)
    for bad in ({"v": 1, "u": "a", "i": ["a"], "w": [1.0], "s": [0.0], "cv": 1},  # no q
                {"v": 1, "u": "a", "i": ["a"], "w": [1.0], "s": [0.0], "q": 1.5, "cv": 1}):
        assert contract.check("ranking", bad) is not None
    assert contract.check("error", {"v": 1, "e": "nonsense", "m": ""}) is not None
    with pytest.raises(ValueError):
        decode_reply(pack({"v": 1, "e": "nonsense", "m": ""}))


# ---------------------------------------------------------------- against a real service

TOKEN = "contract-token"


def test_a_real_service_refuses_and_answers_as_the_schemas_say(server, tmp_path):
    """The service-stage checks, the info and admin requests, and every reply and record
    the service sends, through a real nats-server."""
    from actors import Microtune
    from adapters.nats_service import Service, ServiceConfig
    from events import TuningConfig

    async def request(nc, subject: str, body: Any) -> dict:
        raw = body if isinstance(body, bytes) else pack(body)
        return msgpack.unpackb((await nc.request(subject, raw, timeout=10)).data, raw=False)

    async def scenario():
        system = Microtune.open(tmp_path / "mt.db", TuningConfig(version=1, dim=DIM))
        service = Service(system, ServiceConfig(admin_tokens={"ops": TOKEN}, read_wait=0.2))
        await service.start(server.url)
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        try:
            await _service_stage(nc, js, service, request)
            await _info_requests(nc, request)
            await _admin_requests(nc, request)
        finally:
            await nc.close()
            await service.stop()

    asyncio.run(scenario())


async def _service_stage(nc, js, service, request) -> None:
    from helpers import until

    # the catalog: a valid upsert is applied, the service-stage refusals are refused so
    for body in VALID_CONTENT:
        ack = await js.publish("microtune.content", pack(body))
        catalog = await _settled(nc, request, ack.seq)
        assert catalog["status"] == "applied", catalog
    for kind, body, reason in SERVICE_STAGE:
        if kind != "content":
            continue
        ack = await js.publish("microtune.content", pack(body))
        catalog = await _settled(nc, request, ack.seq)
        assert catalog["status"] == "refused" and catalog["e"] == reason.value
    # queries: valid ones are ranked (or, waiting for a seq not reached, `timeout`), the
    # service-stage ones refused with the reason
    ack = await js.publish("microtune.content", pack({"v": 1, "b": [
        {"i": i, "x": vec()} for i in ("article-1", "article-2", "a", "b", "c", "d")]}))
    assert (await _settled(nc, request, ack.seq))["status"] == "applied"
    for body in VALID_QUERIES:
        reply = await request(nc, "microtune.query.alice", body)
        if body.get("ms"):
            assert reply["e"] == "timeout" and contract.check("error", reply) is None
        else:
            assert contract.check("ranking", reply) is None, reply
    for kind, body, reason in SERVICE_STAGE:
        if kind != "query":
            continue
        reply = await request(nc, "microtune.query.alice", body)
        assert reply["e"] == reason.value and contract.check("error", reply) is None
    bad = await request(nc, "microtune.query.alice", {**QUERY, "u": 5})
    assert bad["e"] == "invalid_id" and contract.check("error", bad) is None
    # events: the service-stage refusals, on the rejected stream with their reasons
    expected = []
    for n, (kind, body, reason) in enumerate(SERVICE_STAGE):
        if kind == "event":
            await js.publish("microtune.events.alice", pack({**body, "id": f"svc-{n}"}))
            expected.append(reason.value)
    await js.publish("microtune.events.alice", pack({**EVENT, "x": vec()}))
    refused = len(expected) + sum(kind == "content" for kind, _, _ in SERVICE_STAGE)
    await until(lambda: service.stats.applied >= 1
                and sum(service.stats.rejected.values()) >= refused,
                what="the service-stage refusals")
    sub = await js.pull_subscribe("microtune.rejected", durable="contract-test")
    records = [msgpack.unpackb(m.data, raw=False)
               for m in await sub.fetch(100, timeout=5)]
    for rec in records:
        assert contract.check("rejected", rec) is None, rec
    events = [r for r in records if r["s"] == "microtune.events.alice"]
    assert sorted(r["e"] for r in events) == sorted(expected)


async def _settled(nc, request, seq: int) -> dict:
    for _ in range(500):
        reply = await request(nc, "microtune.info", {"cs": seq})
        assert contract.check("info", reply) is None, reply
        if reply["catalog"]["status"] != "pending":
            return reply["catalog"]
        await asyncio.sleep(0.01)
    raise AssertionError(f"upsert {seq} still pending")


async def _info_requests(nc, request) -> None:
    for body in (b"", {}, {"cs": 1}, {"cs": None, "zz": 1}):
        raw = body if isinstance(body, bytes) else pack(body)
        assert contract.check_bytes("info-request", raw) is None
        reply = await request(nc, "microtune.info", raw)
        assert "e" not in reply and contract.check("info", reply) is None, reply
        assert reply["dim"] == DIM
    for body, reason in (([1, 2], Reason.WRONG_TYPE), ("x", Reason.WRONG_TYPE),
                         ({"cs": "1"}, Reason.WRONG_TYPE), ({"cs": -1}, Reason.WRONG_TYPE),
                         ({"cs": True}, Reason.WRONG_TYPE), ({"cs": 1.0}, Reason.WRONG_TYPE),
                         (b"\xc1", Reason.MALFORMED)):
        raw = body if isinstance(body, bytes) else pack(body)
        reply = await request(nc, "microtune.info", raw)
        assert reply["e"] == reason.value and contract.check("error", reply) is None
        assert contract.check_bytes("info-request", raw).reason is reason


ADMIN = [
    # (command, body, reason or None for valid)
    ("stats", b"", None),
    ("stats", {"zz": 1}, None),
    ("experiments", {}, None),
    ("stats", [1], Reason.WRONG_TYPE),
    ("stats", b"\xc1", Reason.MALFORMED),
    ("rollback", {}, Reason.FORBIDDEN),
    ("rollback", {"tok": 5, "u": "ann", "to": 1}, Reason.FORBIDDEN),
    ("rollback", {"tok": None, "u": "ann", "to": 1}, Reason.FORBIDDEN),
    ("rollback", {"tok": TOKEN}, Reason.MISSING_FIELD),
    ("rollback", {"tok": TOKEN, "u": 5, "to": 1}, Reason.MISSING_FIELD),
    ("rollback", {"tok": TOKEN, "u": "", "to": 1}, Reason.MISSING_FIELD),
    ("rollback", {"tok": TOKEN, "u": "x" * 129, "to": 1}, Reason.MISSING_FIELD),
    ("rollback", {"tok": TOKEN, "u": "ann"}, Reason.MISSING_FIELD),
    ("rollback", {"tok": TOKEN, "u": "ann", "to": None, "tt": None}, Reason.MISSING_FIELD),
    ("rollback", {"tok": TOKEN, "u": "ann", "to": 1, "tt": 2.0}, Reason.MISSING_FIELD),
    ("rollback", {"tok": TOKEN, "u": "ann", "to": "1"}, Reason.WRONG_TYPE),
    ("rollback", {"tok": TOKEN, "u": "ann", "to": 1.0}, Reason.WRONG_TYPE),
    ("rollback", {"tok": TOKEN, "u": "ann", "to": True}, Reason.WRONG_TYPE),
    ("rollback", {"tok": TOKEN, "u": "ann", "tt": "noon"}, Reason.WRONG_TYPE),
    ("rollback", [1], Reason.WRONG_TYPE),
    ("rollback", {"tok": TOKEN, "u": "ann", "to": 0, "why": "test"}, None),
    ("rollback", {"tok": TOKEN, "u": "ann", "tt": 1, "to": None}, None),
    ("forget", {"u": "ann"}, Reason.FORBIDDEN),
    ("forget", {"tok": TOKEN}, Reason.MISSING_FIELD),
    ("forget", {"tok": TOKEN, "u": "nobody", "why": ["any", "value"]}, None),
    ("clear_bot", {"tok": TOKEN, "u": None}, Reason.MISSING_FIELD),
    ("clear_bot", {"tok": TOKEN, "u": "ann"}, None),
    ("experiment", {"name": "x", "op": "stop"}, Reason.FORBIDDEN),
    ("experiment", {"tok": TOKEN, "op": "stop"}, Reason.MISSING_FIELD),
    ("experiment", {"tok": TOKEN, "name": "", "op": "stop"}, Reason.MISSING_FIELD),
    ("experiment", {"tok": TOKEN, "name": "x"}, Reason.UNKNOWN_KIND),
    ("experiment", {"tok": TOKEN, "name": "x", "op": "pause"}, Reason.UNKNOWN_KIND),
    ("experiment", {"tok": TOKEN, "name": "x", "op": "start"}, Reason.WRONG_TYPE),
    ("experiment", {"tok": TOKEN, "name": "x", "op": "start", "arms": [["a"]]},
     Reason.WRONG_TYPE),
    ("experiment", {"tok": TOKEN, "name": "x", "op": "start", "arms": [[1, "current"]]},
     Reason.WRONG_TYPE),
    ("experiment", {"tok": TOKEN, "name": "x", "op": "start",
                    "arms": [["a", "current"], ["b", "no-adjust"]], "guardrails": ["nope"]},
     Reason.WRONG_TYPE),
    ("experiment", {"tok": TOKEN, "name": "x", "op": "start",
                    "arms": [["a", "current"], ["b", "no-adjust"]], "guardrails": None},
     Reason.WRONG_TYPE),
    ("experiment", {"tok": TOKEN, "name": "x", "op": "start",
                    "arms": [["a", "current"], ["b", "no-adjust"]], "traffic": "lots"},
     Reason.MALFORMED),
    ("experiment", {"tok": TOKEN, "name": "x", "op": "start",
                    "arms": [["a", "current"], ["b", "no-adjust"]], "window": None},
     Reason.MALFORMED),
    ("experiment", {"tok": TOKEN, "name": "x", "op": "ramp", "traffic": [1]},
     Reason.MALFORMED),
    ("experiment", {"tok": TOKEN, "name": "contract", "op": "start",
                    "arms": [["a", "current"], ["b", "no-adjust"]], "traffic": 0.5,
                    "guardrails": ["dwell"], "why": "test"}, None),
    ("experiment", {"tok": TOKEN, "name": "contract", "op": "ramp", "traffic": 1}, None),
    ("experiment", {"tok": TOKEN, "name": "contract", "op": "stop"}, None),
    ("user", {"tok": TOKEN, "u": "ann"}, None),
    ("user", {"tok": TOKEN}, Reason.MISSING_FIELD),
    ("user", {"u": "ann"}, Reason.FORBIDDEN),
]


async def _admin_requests(nc, request) -> None:
    for command, body, reason in ADMIN:
        kind = f"admin-{command}"
        raw = body if isinstance(body, bytes) else pack(body)
        reply = await request(nc, f"microtune.admin.{command}", raw)
        violation = contract.check_bytes(kind, raw)
        if reason is None:
            assert violation is None, (command, body, violation)
            assert "e" not in reply, (command, body, reply)
            continue
        assert reply.get("e") == reason.value, (command, body, reply)
        assert violation is not None and violation.reason is reason, (command, body, violation)
        assert contract.check("error", reply) is None, reply
    # a token the service does not know: the schema cannot tell (an x-rule says so)
    body = {"tok": "not-" + TOKEN, "u": "ann", "to": 1}
    assert (await request(nc, "microtune.admin.rollback", body))["e"] == "forbidden"
    assert contract.check("admin-rollback", body) is None
    assert any(r["reason"] == "forbidden" for r in contract.schema("admin-rollback")["x-rules"])


def test_the_readme_wire_section_names_what_the_schemas_say():
    """The schemas' subjects are the README's (the paragraph linking them is proposed
    separately); a drift in either shows here."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### Wire format"):readme.index("### Delivery")]
    for row in contract.describe():
        subject = re.sub(r"\.<(user|command)>$", "", row["subject"] or "")
        if subject.startswith("microtune."):  # `microtune.admin.rollback` / `.forget`
            assert subject in section or f"`.{subject.rsplit('.', 1)[1]}`" in section, row
