"""Typed rejection reasons.

Every malformed event or query is rejected with one `Reason` (a stable string on the wire, so
dashboards and dead-letter consumers can group by it), the offending field where there is one,
and a human-readable detail. Decoding never lets any other exception escape to the caller.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    MALFORMED = "malformed"  # not msgpack, truncated, or not a map
    UNSUPPORTED_VERSION = "unsupported_version"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    NOT_FINITE = "not_finite"  # NaN or +-inf
    OUT_OF_RANGE = "out_of_range"
    OVERSIZE = "oversize"  # payload, id, vector or candidate list beyond the limits
    UNKNOWN_KIND = "unknown_kind"
    INVALID_ID = "invalid_id"  # empty, or not usable as a NATS subject token
    DIMENSION = "dimension"  # feature vector length differs from the configured dimension
    UNKNOWN_CONFIG = "unknown_config"
    # the store refused the event for good (a value its backend cannot hold); retrying
    # cannot help, so it is refused rather than retried for ever
    STORE_REFUSED = "store_refused"
    FORBIDDEN = "forbidden"  # not allowed from this sender (an admin-only kind or command)
    # delivered `max_deliver` times without being settled: dead-lettered with its raw bytes
    UNDELIVERABLE = "undeliverable"
    # a query that asked to read its own writes (`ms`) and the state did not reach that seq
    # within the service's bound
    TIMEOUT = "timeout"
    # the store could not be read to answer (an outage): retrying later can help
    UNAVAILABLE = "unavailable"


class Rejected(ValueError):
    """An event or query that microtune refuses, with the reason."""

    def __init__(self, reason: Reason, detail: str, field: str | None = None) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
        self.field = field

    def to_wire(self) -> dict[str, object]:
        """The error body of a reply or a dead-letter record."""
        out: dict[str, object] = {"e": self.reason.value, "m": self.detail}
        if self.field is not None:
            out["f"] = self.field
        return out
