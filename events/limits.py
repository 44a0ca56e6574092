"""Limits are part of the contract: beyond them a message is rejected with `OVERSIZE`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    max_payload_bytes: int = 64 * 1024
    max_id_length: int = 128
    max_dimension: int = 256
    max_candidates: int = 1000
    max_top: int = 1000


DEFAULT_LIMITS = Limits()
