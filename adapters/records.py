"""What `<prefix>.rejected` keeps of a refused message: one record format for the service
and the query processes."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import msgpack

from events.errors import Rejected
from events.limits import DEFAULT_LIMITS

# raw bytes a rejection record keeps at most: the largest valid message (so a valid-sized
# message is kept whole), far below the server's 1 MiB, so the record always fits
RECORD_RAW_BYTES = DEFAULT_LIMITS.max_payload_bytes


def record(subject: str, raw: bytes, rejected: Rejected) -> bytes:
    """What `<prefix>.rejected` keeps: the reason, the subject, the raw bytes (the first
    `RECORD_RAW_BYTES` of them, with the size and SHA-256 of the whole when cut), when."""
    out: dict[str, Any] = {"v": 1, **rejected.to_wire(), "s": subject[:1024],
                           "raw": raw[:RECORD_RAW_BYTES], "n": len(raw), "at": time.time()}
    if len(raw) > RECORD_RAW_BYTES:
        out["rt"] = True  # raw is truncated
        out["sha256"] = hashlib.sha256(raw).hexdigest()
    return msgpack.packb(out, use_bin_type=True)
