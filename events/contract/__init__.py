"""The wire contract: a JSON Schema (draft 2020-12) for every message kind on the wire.

The schemas are the files beside this module (`<kind>.schema.json`, and `common.schema.json`
that they refer to by relative reference), published as they are so that the gateway can
serve them and clients in any language can validate what they send. Each describes the
message as msgpack decodes it (common.schema.json says how msgpack maps onto JSON Schema),
with the limits of `events.limits`, and for every constraint the `Reason` microtune refuses
a violation with (`x-reason`). The codec stays the truth: tests/test_contract.py holds the
schemas to it, example by example.

`check` validates a decoded message and returns the first violation as microtune would name
it (or None); `check_bytes` starts from the bytes, as the service does. `kinds`, `describe`
and `documents` list the schemas for serving.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator, Mapping
from functools import cache
from importlib import resources
from typing import Any, NamedTuple

import msgpack
import numpy as np
from jsonschema import Draft202012Validator, ValidationError, validators
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from events.errors import Reason

COMMON = "common"
_SUFFIX = ".schema.json"
_F64 = np.dtype("<f8")


# ---------------------------------------------------------------- the documents


@cache
def documents() -> dict[str, str]:
    """Every schema file's text by file name (`event.schema.json`, ...), `common` included:
    what the gateway serves, byte for byte."""
    folder = resources.files(__package__)
    return {
        entry.name: entry.read_text(encoding="utf-8")
        for entry in sorted(folder.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(_SUFFIX)
    }


@cache
def _schemas() -> dict[str, dict[str, Any]]:
    return {name[: -len(_SUFFIX)]: json.loads(text) for name, text in documents().items()}


def kinds() -> tuple[str, ...]:
    """The message kinds that have a schema (`event`, `query`, ...; not `common`)."""
    return tuple(k for k in _schemas() if k != COMMON)


def schema(kind: str) -> dict[str, Any]:
    """The schema of one kind (a copy: yours to change)."""
    return copy.deepcopy(_schema(kind))


def _schema(kind: str) -> dict[str, Any]:
    try:
        return _schemas()[kind]
    except KeyError:
        raise KeyError(f"no schema for {kind!r} (known: {', '.join(kinds())})") from None


def describe() -> list[dict[str, Any]]:
    """One line per kind, for a listing: its file, title, subject, transport and sender
    (`client`: microtune validates it and names a reason; `microtune`: what it sends)."""
    return [
        {"kind": kind, "file": kind + _SUFFIX, "title": s.get("title"),
         "subject": s.get("x-subject"), "transport": s.get("x-transport"),
         "sender": s.get("x-sender")}
        for kind, s in ((k, _schema(k)) for k in kinds())
    ]


# ---------------------------------------------------------------- microtune's keywords
# A plain draft 2020-12 validator ignores these (common.schema.json defines them); they state
# what JSON cannot carry: msgpack bins, NaN and infinities, and the store's dimension.


def _floats(instance: bytes) -> np.ndarray:
    return np.frombuffer(instance, dtype=_F64)


def _x_bin(validator, value, instance, schema) -> Iterator[ValidationError]:
    if value and not isinstance(instance, bytes):
        yield ValidationError(f"{instance!r} is not a msgpack bin")


def _x_float64(validator, value, instance, schema) -> Iterator[ValidationError]:
    if value and (not isinstance(instance, bytes) or len(instance) % 8):
        yield ValidationError("not a bin of packed float64 (a byte length a multiple of 8)")


def _x_max_floats(validator, value, instance, schema) -> Iterator[ValidationError]:
    if isinstance(instance, bytes) and len(instance) // 8 > value:
        yield ValidationError(f"{len(instance) // 8} float64 > {value}")


def _x_min_floats(validator, value, instance, schema) -> Iterator[ValidationError]:
    if isinstance(instance, bytes) and len(instance) // 8 < value:
        yield ValidationError(f"{len(instance) // 8} float64 < {value}")


def _x_max_bytes(validator, value, instance, schema) -> Iterator[ValidationError]:
    if isinstance(instance, bytes) and len(instance) > value:
        yield ValidationError(f"{len(instance)} bytes > {value}")


def _x_finite(validator, value, instance, schema) -> Iterator[ValidationError]:
    if not value:
        return
    if isinstance(instance, float) and not math.isfinite(instance):
        yield ValidationError(f"{instance} is not finite")
    elif isinstance(instance, bytes) and not len(instance) % 8 \
            and not np.isfinite(_floats(instance)).all():
        yield ValidationError("the float64 contain NaN or an infinity")


def _x_printable(validator, value, instance, schema) -> Iterator[ValidationError]:
    if value and isinstance(instance, str) and not instance.isprintable():
        yield ValidationError(f"{instance!r} is not printable text")


def _x_dimension(dim: int | None):
    def check(validator, value, instance, schema) -> Iterator[ValidationError]:
        if not value or dim is None:  # without a dimension there is nothing to compare
            return
        if isinstance(instance, bytes):
            n = len(instance) // 8
        elif isinstance(instance, list):
            n = len(instance)
        else:
            return
        if n != dim:
            yield ValidationError(f"{n} features, not the feature dimension {dim}")
    return check


def _msgpack_integer(checker, instance) -> bool:
    # msgpack keeps ints and floats apart: 1.0 is no integer here (JSON Schema says it is)
    return isinstance(instance, int) and not isinstance(instance, bool)


@cache
def _registry() -> Registry:
    return Registry().with_resources(
        (kind + _SUFFIX, Resource.from_contents(s, default_specification=DRAFT202012))
        for kind, s in _schemas().items()
    )


@cache
def _validator_class(dim: int | None) -> type:
    return validators.extend(
        Draft202012Validator,
        validators={
            "x-bin": _x_bin, "x-float64": _x_float64, "x-maxFloats": _x_max_floats,
            "x-minFloats": _x_min_floats, "x-maxBytes": _x_max_bytes, "x-finite": _x_finite,
            "x-printable": _x_printable, "x-dimension": _x_dimension(dim),
        },
        type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _msgpack_integer),
    )


@cache
def validator(kind: str, dim: int | None = None) -> Draft202012Validator:
    """A jsonschema validator of `kind`, with microtune's keywords; `dim`: the feature
    dimension to hold vectors to (None: not checked, as the codec does not)."""
    return _validator_class(dim)(_schema(kind), registry=_registry())


# ---------------------------------------------------------------- the first violation


class Violation(NamedTuple):
    """One broken rule: the reason microtune gives (None for a message microtune sends,
    which it never refuses), the top-level key at fault, the path to the value (the missing
    key last, for a missing one), what is wrong, and the stage (`codec`, `service`)."""

    reason: Reason | None
    field: str | None
    path: tuple[str | int, ...]
    detail: str
    stage: str


def _missing(error: ValidationError) -> list[str]:
    instance, value = error.instance, error.validator_value
    if not isinstance(instance, Mapping):
        return []
    if error.validator == "required":
        return [key for key in value if key not in instance]
    if error.validator == "dependentRequired":
        return [dep for key, deps in value.items() if key in instance
                for dep in deps if dep not in instance]
    return []


def _violation(error: ValidationError, order: list[str]) -> Violation:
    path = tuple(error.absolute_path)
    missing = sorted(_missing(error), key=lambda k: order.index(k) if k in order else len(order))
    if missing:
        path += (missing[0],)
    # `x-field`: a rule about one key that JSON Schema must state on another (`co` needs `ci`)
    field = error.schema.get("x-field") or (path[0] if path else None)
    reason = error.schema.get("x-reason")
    return Violation(None if reason is None else Reason(reason),
                     field if isinstance(field, str) else None, path, error.message,
                     error.schema.get("x-stage", "codec"))


def violations(kind: str, message: Any, *, dim: int | None = None,
               service: bool = True) -> list[Violation]:
    """Every broken rule, first the one microtune names: the codec's checks before the
    service's, then by field in the schema's `x-order` (the codec's), then in the order the
    schema states them (a list's items in order). `service=False`: the codec's only."""
    order = _schema(kind).get("x-order", [])

    def position(v: Violation) -> int:
        if v.field is None:
            return -1  # the message itself (not a map)
        return order.index(v.field) if v.field in order else len(order)

    found = [_violation(e, order) for e in validator(kind, dim).iter_errors(message)]
    if not service:
        found = [v for v in found if v.stage == "codec"]
    # sorted() is stable: within a field, the validator's own order (the schema's) stays
    return sorted(found, key=lambda v: (v.stage != "codec", position(v)))


def check(kind: str, message: Any, *, dim: int | None = None,
          service: bool = True) -> Violation | None:
    """The first rule a decoded message breaks, as microtune names it; None if none.
    `service=False`: the codec's rules only (what `events.codec` refuses)."""
    found = violations(kind, message, dim=dim, service=service)
    return found[0] if found else None


def check_bytes(kind: str, raw: bytes, *, dim: int | None = None,
                service: bool = True) -> Violation | None:
    """`check` from the bytes, as the service starts: the payload limit (`oversize`), then
    msgpack (`malformed`), then the schema."""
    s = _schema(kind)
    limit = s.get("x-limits", {}).get("payload_bytes")
    if limit is not None and len(raw) > limit:
        return Violation(Reason.OVERSIZE, None, (), f"payload of {len(raw)} bytes > {limit}",
                         "codec")
    if not raw and "x-empty-body" in s:
        return check(kind, copy.deepcopy(s["x-empty-body"]), dim=dim, service=service)
    try:
        message = msgpack.unpackb(raw, raw=False)
    except Exception as exc:  # msgpack raises several types for garbage and truncation
        return Violation(Reason.MALFORMED, None, (), f"not valid msgpack ({type(exc).__name__})",
                         "codec")
    return check(kind, message, dim=dim, service=service)


def reasons(kind: str) -> set[Reason]:
    """Every reason the schema of `kind` names: in its assertions (through its references)
    and in its `x-rules`."""
    found: set[Reason] = set()
    for node in walk(kind):
        if "x-reason" in node:
            found.add(Reason(node["x-reason"]))
    for rule in _schema(kind).get("x-rules", []):
        if "reason" in rule:
            found.add(Reason(rule["reason"]))
    return found


def walk(kind: str) -> Iterator[dict[str, Any]]:
    """Every subschema of `kind` that can fail, following references into the other files
    (each once): not the insides of `if`, `not`, `anyOf` and `oneOf`, which fail as their
    parent."""
    seen: set[int] = set()
    stack: list[tuple[str, Any]] = [(kind, _schema(kind))]
    while stack:
        base, node = stack.pop()
        if not isinstance(node, dict) or id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        for key, value in node.items():
            if key == "$ref":
                stack.append(_resolve(base, value))
            elif key in _APPLY_ONE:
                stack.append((base, value))
            elif key in _APPLY_LIST:
                stack.extend((base, v) for v in value)
            elif key in _APPLY_MAP:
                stack.extend((base, v) for v in value.values())


# the applicators these schemas use whose subschemas report their own failures (a failed
# `anyOf` or `oneOf` is reported as its parent's, as `if` and `not` are)
_APPLY_ONE = frozenset({"items", "additionalProperties", "then", "else"})
_APPLY_LIST = frozenset({"allOf", "prefixItems"})
_APPLY_MAP = frozenset({"properties", "patternProperties", "dependentSchemas"})


def _resolve(base: str, ref: str) -> tuple[str, Any]:
    file, _, pointer = ref.partition("#")
    kind = file[: -len(_SUFFIX)] if file else base
    node: Any = _schema(kind)
    for part in filter(None, pointer.split("/")):
        node = node[part]
    return kind, node
