"""Event and query types, their msgpack codec, validation and schema versions."""

# First, before any other import: importing it checks that `events`, `store`, `actors` and
# `adapters` are microtune's own here, with a clear error if not (README "Installed names")
from events import _distribution  # noqa: F401
from events.codec import (
    decode_content,
    decode_event,
    decode_query,
    decode_reply,
    encode_error,
    encode_event,
    encode_logged_event,
    encode_query,
    encode_ranking,
    event_from_log,
    event_from_map,
    event_to_map,
    query_from_map,
)
from events.config import SegmentConfig, TuningConfig
from events.errors import Reason, Rejected
from events.limits import DEFAULT_LIMITS, Limits
from events.types import (
    INTERACTION_KINDS,
    KINDS,
    SCHEMA_VERSION,
    Candidate,
    Event,
    Query,
    Ranking,
)

__all__ = [
    "DEFAULT_LIMITS",
    "INTERACTION_KINDS",
    "KINDS",
    "SCHEMA_VERSION",
    "Candidate",
    "Event",
    "Limits",
    "Query",
    "Ranking",
    "Reason",
    "Rejected",
    "SegmentConfig",
    "TuningConfig",
    "decode_content",
    "decode_event",
    "decode_query",
    "decode_reply",
    "encode_error",
    "encode_event",
    "encode_logged_event",
    "encode_query",
    "encode_ranking",
    "event_from_log",
    "event_from_map",
    "event_to_map",
    "query_from_map",
]
