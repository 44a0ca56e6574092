"""Users to partitions: the hash NATS itself computes in a subject transform.

A fleet splits users into P partitions (fixed per deployment, recorded in the store). The
events stream maps `microtune.events.<user>` to a partitioned subject with NATS's own
`{{partition(P, 1)}}` (FNV-1a, 32 bits, of the user token, modulo P), so each partition is
a subject filter with a durable consumer of its own. The store computes the same function to
fence a batch (store/recorder.py): both must agree on every user, and
tests/test_partitions.py checks this one against a real nats-server.
"""

from __future__ import annotations

_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193
DEFAULT_PARTITIONS = 16


def partition_of(user: str, partitions: int) -> int:
    """The partition of a user among `partitions`: FNV-1a 32 of its UTF-8 bytes, mod P."""
    h = _FNV_OFFSET
    for byte in user.encode("utf-8"):
        h = ((h ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    return h % partitions
