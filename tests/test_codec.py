"""Validation: a precise reason for every failure; nothing else escapes the decoder."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from events import (
    Candidate,
    Event,
    Limits,
    Query,
    Reason,
    Rejected,
    decode_event,
    decode_query,
    decode_reply,
    encode_error,
    encode_event,
    encode_logged_event,
    encode_query,
    event_from_log,
)

GOOD = {"v": 1, "id": "e1", "u": "alice", "t": 1_700_000_000.5, "k": "click", "i": "item-1"}


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def reason_of(raw: bytes, limits: Limits | None = None) -> Reason:
    with pytest.raises(Rejected) as info:
        decode_event(raw, limits) if limits else decode_event(raw)
    return info.value.reason


def test_valid_event_round_trips_with_features():
    event = decode_event(pack({**GOOD, "k": "dwell", "d": 12.5, "x": [0.5, 1, -2.0]}))
    assert event.kind == "dwell" and event.dwell == 12.5 and event.x.tolist() == [0.5, 1.0, -2.0]
    assert decode_event(encode_event(event)) == event
    assert event_from_log(encode_logged_event(event)) == event


@pytest.mark.parametrize(
    ("body", "reason", "field"),
    [
        ({k: v for k, v in GOOD.items() if k != "v"}, Reason.MISSING_FIELD, "v"),
        ({**GOOD, "v": 99}, Reason.UNSUPPORTED_VERSION, "v"),
        ({**GOOD, "v": "1"}, Reason.WRONG_TYPE, "v"),
        ({k: v for k, v in GOOD.items() if k != "id"}, Reason.MISSING_FIELD, "id"),
        ({k: v for k, v in GOOD.items() if k != "u"}, Reason.MISSING_FIELD, "u"),
        ({k: v for k, v in GOOD.items() if k != "t"}, Reason.MISSING_FIELD, "t"),
        ({k: v for k, v in GOOD.items() if k != "i"}, Reason.MISSING_FIELD, "i"),
        ({**GOOD, "k": "dwell"}, Reason.MISSING_FIELD, "d"),
        ({**GOOD, "k": "feedback"}, Reason.MISSING_FIELD, "y"),
        ({**GOOD, "t": "yesterday"}, Reason.WRONG_TYPE, "t"),
        ({**GOOD, "t": True}, Reason.WRONG_TYPE, "t"),
        ({**GOOD, "u": 42}, Reason.WRONG_TYPE, "u"),
        ({**GOOD, "k": 3}, Reason.WRONG_TYPE, "k"),
        ({**GOOD, "x": "1,2,3"}, Reason.WRONG_TYPE, "x"),
        ({**GOOD, "x": [1.0, "2"]}, Reason.WRONG_TYPE, "x"),
        ({**GOOD, "t": math.nan}, Reason.NOT_FINITE, "t"),
        ({**GOOD, "t": math.inf}, Reason.NOT_FINITE, "t"),
        ({**GOOD, "x": [1.0, math.nan]}, Reason.NOT_FINITE, "x"),
        ({**GOOD, "k": "dwell", "d": -math.inf}, Reason.NOT_FINITE, "d"),
        ({**GOOD, "t": -5}, Reason.OUT_OF_RANGE, "t"),
        ({**GOOD, "k": "scroll", "s": 1.5}, Reason.OUT_OF_RANGE, "s"),
        ({**GOOD, "k": "feedback", "y": -0.1}, Reason.OUT_OF_RANGE, "y"),
        ({**GOOD, "k": "dwell", "d": -1}, Reason.OUT_OF_RANGE, "d"),
        ({**GOOD, "c": 0}, Reason.OUT_OF_RANGE, "c"),
        ({**GOOD, "k": "teleport"}, Reason.UNKNOWN_KIND, "k"),
        ({**GOOD, "u": "a.b"}, Reason.INVALID_ID, "u"),
        ({**GOOD, "u": "a b"}, Reason.INVALID_ID, "u"),
        ({**GOOD, "u": ">"}, Reason.INVALID_ID, "u"),
        ({**GOOD, "id": ""}, Reason.INVALID_ID, "id"),
        ({**GOOD, "id": "x" * 129}, Reason.OVERSIZE, "id"),
        ({**GOOD, "x": [0.0] * 257}, Reason.OVERSIZE, "x"),
    ],
)
def test_each_reason(body, reason, field):
    with pytest.raises(Rejected) as info:
        decode_event(pack(body))
    assert info.value.reason is reason
    assert info.value.field == field
    assert info.value.detail  # a human-readable explanation


def test_oversize_payload_is_rejected_before_decoding():
    raw = pack({**GOOD, "pad": "x" * 2000})
    assert reason_of(raw, Limits(max_payload_bytes=1000)) is Reason.OVERSIZE


@pytest.mark.parametrize(
    "raw",
    [b"", b"\xc1", b"garbage!", b"\x92\x01", pack([1, 2, 3]), pack("str"), pack({1: 2})],
)
def test_garbage_and_non_maps_are_malformed(raw):
    assert reason_of(raw) is Reason.MALFORMED


def test_truncated_msgpack_is_malformed():
    raw = pack({**GOOD, "x": [1.0] * 10})
    for cut in range(1, len(raw)):
        assert reason_of(raw[:cut]) in (Reason.MALFORMED,)


def test_unknown_optional_keys_are_tolerated_and_kept():
    event = decode_event(pack({**GOOD, "campaign": "winter", "zz": [1, 2]}))
    assert event.extra == {"campaign": "winter", "zz": [1, 2]}
    assert event_from_log(encode_logged_event(event)).extra == event.extra


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_random_bytes_never_escape_as_other_exceptions(raw):
    try:
        decode_event(raw)
        decode_query(raw)
    except Rejected:
        pass


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.sampled_from(["v", "id", "u", "t", "k", "i", "x", "d", "s", "y", "g", "c"]),
        st.one_of(
            st.none(), st.booleans(), st.integers(-5, 5), st.floats(), st.text(max_size=4),
            st.lists(st.floats(), max_size=3), st.binary(max_size=9),
        ),
    )
)
def test_random_maps_give_a_reason_or_an_event(body):
    try:
        event = decode_event(pack(body))
    except Rejected as rejected:
        assert isinstance(rejected.reason, Reason)
    else:
        assert math.isfinite(event.t)


def test_query_round_trip_and_errors():
    query = Query("alice", (Candidate("a"), Candidate("b", np.array([1.0, 2.0]))), top=1)
    decoded = decode_query(encode_query(query))
    assert decoded.user == "alice" and decoded.top == 1
    assert decoded.candidates[0].x is None and decoded.candidates[1].x.tolist() == [1.0, 2.0]
    for body, reason in [
        ({"v": 1, "u": "alice", "c": []}, Reason.OUT_OF_RANGE),
        ({"v": 1, "u": "alice", "c": "a"}, Reason.WRONG_TYPE),
        ({"v": 1, "u": "alice", "c": [5]}, Reason.WRONG_TYPE),
        ({"v": 1, "u": "alice", "c": ["a"] * 1001}, Reason.OVERSIZE),
        ({"v": 1, "u": "alice", "c": ["a"], "n": 0}, Reason.OUT_OF_RANGE),
        ({"v": 1, "c": ["a"]}, Reason.MISSING_FIELD),
        ({"v": 1, "u": "alice", "c": [["a", [math.nan]]]}, Reason.NOT_FINITE),
    ]:
        with pytest.raises(Rejected) as info:
            decode_query(pack(body))
        assert info.value.reason is reason, body


def test_error_reply_decodes_to_rejected():
    with pytest.raises(Rejected) as info:
        decode_reply(encode_error(Rejected(Reason.DIMENSION, "bad", "x")))
    assert info.value.reason is Reason.DIMENSION and info.value.field == "x"


def test_event_equality_compares_features():
    a = Event(id="1", user="u", t=1.0, kind="click", item="i", x=np.array([1.0]))
    b = Event(id="1", user="u", t=1.0, kind="click", item="i", x=np.array([2.0]))
    assert a != b


def test_query_fast_path_agrees_with_the_careful_path():
    rows = [[f"c{i}", [float(i), -1.5, 2]] for i in range(50)]
    fast = decode_query(pack({"v": 1, "u": "a", "c": rows}))
    mixed = decode_query(pack({"v": 1, "u": "a", "c": [*rows, "c-last"]}))  # careful path
    assert [c.item for c in fast.candidates] == [c.item for c in mixed.candidates][:50]
    for a, b in zip(fast.candidates, mixed.candidates, strict=False):
        assert a.x.tolist() == b.x.tolist()
    for bad, reason in [
        ([["a", [1.0, True]], ["b", [1.0, 2.0]]], Reason.WRONG_TYPE),
        ([["a", [1.0, 2.0]], ["b", [1.0]], ["c", [1.0, "x"]]], Reason.WRONG_TYPE),
        ([["a", [1.0, math.inf]], ["b", [1.0, 2.0]]], Reason.NOT_FINITE),
        ([["a", [1.0] * 300]], Reason.OVERSIZE),
        ([["", [1.0]], ["b", [2.0]]], Reason.INVALID_ID),
        ([["a" * 200, [1.0]], ["b", [2.0]]], Reason.OVERSIZE),
        ([[7, [1.0]], ["b", [2.0]]], Reason.WRONG_TYPE),
        ([["a", b"\0" * 12], ["b", b"\0" * 12]], Reason.WRONG_TYPE),  # not packed float64
        ([["a", np.array([1.0, math.nan]).tobytes()]], Reason.NOT_FINITE),
        ([["a", np.zeros(300).tobytes()]], Reason.OVERSIZE),
    ]:
        with pytest.raises(Rejected) as info:
            decode_query(pack({"v": 1, "u": "a", "c": bad}))
        assert info.value.reason is reason


def test_query_features_as_packed_float64_bytes():
    """The client helper's form: one matrix straight from the bytes, equal to the lists'."""
    rows = [[f"c{i}", [float(i), -1.5, 2.25]] for i in range(20)]
    packed = [[i, np.array(x).tobytes()] for i, x in rows]
    a, b = decode_query(pack({"v": 1, "u": "a", "c": rows})), decode_query(
        pack({"v": 1, "u": "a", "c": packed}))
    assert a.matrix.tobytes() == b.matrix.tobytes() and b.matrix.shape == (20, 3)
    assert [c.x.tolist() for c in a.candidates] == [c.x.tolist() for c in b.candidates]
    uneven = decode_query(pack({"v": 1, "u": "a", "c": [*packed, ["d", b"\0" * 16]]}))
    assert uneven.matrix is None and uneven.candidates[-1].x.tolist() == [0.0, 0.0]


def _wire_value(draw_kind: str):
    """Values near the edges of what an interaction event's fields accept."""
    numbers = st.one_of(st.integers(-2, 3), st.floats(allow_nan=True, allow_infinity=True),
                        st.sampled_from([0, 0.0, 1, 1.0, 1e-300, 1e200, -0.0]))
    ids = st.one_of(st.text(max_size=5), st.sampled_from(["a", "u.1", "x" * 128, "x" * 129,
                                                          "e\x00", "tab\t", "é", ""]))
    packed = st.one_of(
        st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=4).map(
            lambda v: np.array(v, dtype="<f8").tobytes()),
        st.binary(max_size=17), st.lists(st.floats(), max_size=3),
        # lists as most clients send them: with NaN, infinities, ints, bools, text, and
        # finite values whose sum overflows
        st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3),
                           st.booleans(), st.just("1.5"), st.just(1e308)), max_size=5))
    return {"v": st.one_of(st.just(1), st.just(2), st.just(True), st.just(1.0)),
            "id": ids, "u": ids, "i": ids, "sid": ids, "rid": ids, "t": numbers,
            "k": st.sampled_from(["click", "impression", "dwell", "scroll", "hover",
                                  "feedback", "segment", "teleport", 3]),
            "x": packed, "d": numbers, "s": numbers, "h": numbers, "y": numbers,
            "a": st.booleans(), "zz": st.integers()}[draw_kind]


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.data())
def test_the_fast_path_accepts_only_what_the_careful_path_accepts_and_builds_the_same(data):
    """`event_from_map` takes a one-pass path for the common interaction event: it must
    accept nothing the careful path refuses, and build the identical event (types included:
    a canonical form compares float bits and array bytes)."""
    from types import MappingProxyType

    from helpers import canonical

    from events.codec import event_from_map

    kind = data.draw(st.sampled_from(["click", "impression", "dwell", "scroll", "hover",
                                      "feedback"]))
    body = {"v": 1, "id": "e1", "u": "ann", "t": 5.5, "k": kind, "i": "a",
            "x": np.ones(3).tobytes()}
    field = {"dwell": "d", "scroll": "s", "hover": "h", "feedback": "y"}.get(kind)
    if field:
        body[field] = 0.5
    if data.draw(st.booleans()):
        body["sid"] = "tab-1"
    if data.draw(st.booleans()):
        body["rid"] = "r-1"  # the exposure this outcome answers
    # a valid event, then up to two fields changed to edge values or removed
    for key in data.draw(st.sets(st.sampled_from(
            ["v", "id", "u", "t", "k", "i", "x", "sid", "rid", "d", "s", "h", "y", "a",
             "zz"]),
            max_size=2)):
        if data.draw(st.integers(0, 4)) == 0:
            body.pop(key, None)
        else:
            body[key] = data.draw(_wire_value(key))
    try:
        careful = event_from_map(MappingProxyType(body))  # not a dict: the careful path
    except Rejected:
        careful = None
    try:
        fast = event_from_map(body)
    except Rejected:
        fast = None
    if careful is None:
        assert fast is None, body
    else:
        assert canonical(fast) == canonical(careful), body
