"""A user's state and its snapshot codec.

The state is a pure function of the user's log (fold of `apply`); a snapshot is only an
optimisation. Snapshots are msgpack maps with their own schema version; floats are stored as
raw float64 so that a decoded snapshot is bit-identical to the state that was encoded.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import msgpack
import numpy as np

from actors.hygiene import Hygiene, from_wire, to_wire
from events.types import Arm

# 2: the hygiene state; 3: waiting impressions keep their base score; 4: the experiment arm
# and the stability of the user's updates
SNAPSHOT_SCHEMA = 4
_READABLE_SCHEMAS = frozenset({2, 3, 4})
RECENT_IDS = 32  # event-id hashes kept for dedupe; older repeats are caught by the log's key

_F64 = np.dtype("<f8")
_EMPTY = np.zeros(0)  # shared defaults: never mutated
_EMPTY.flags.writeable = False
_NO_IDS = bytes(8 * RECENT_IDS)


def id_hash(event_id: str) -> bytes:
    """A stable 8-byte hash of an event id (Python's hash() is salted per process)."""
    return hashlib.blake2b(event_id.encode(), digest_size=8).digest()


class UserState(NamedTuple):
    """Everything `apply` needs and produces for one user. Arrays are never mutated.

    Compare states by their encoding (`encode_state`), not with `==` (arrays inside).
    """

    user: str
    seq: int = 0  # seq of the last applied event
    config: int = 0  # config version of the last applied event
    segment: str = "default"
    t_last: float = -1.0  # event time of the newest learning event; < 0: none yet
    steps: int = 0  # learning updates so far
    b1p: float = 1.0  # beta1 ** steps, kept as a running product (bias correction)
    b2p: float = 1.0  # beta2 ** steps
    bucket: float = 0.0  # movement in the current window (leaky bucket level)
    # weights (bias first; empty until the first learning event), first and second moments
    # (Adagrad: the running sum of squares), and a ring of the last RECENT_IDS event-id
    # hashes, 8 bytes each (immutable bytes: the membership test is one C search)
    w: np.ndarray = _EMPTY
    m: np.ndarray = _EMPTY
    v: np.ndarray = _EMPTY
    recent: bytes = _NO_IDS
    recent_pos: int = 0
    hyg: Hygiene | None = None  # data hygiene (actors/hygiene.py); None until needed
    # the user's latest experiment assignment, from the exposure that logged it (sticky:
    # whether it still applies depends on the experiment, actors/experiments)
    arm: Arm | None = None
    # how steady the user's updates are (actors/learning.py, adaptive bounds): running means
    # of the step vector and of its norm, and the updates counted; None until needed
    stability: tuple[np.ndarray, float, int] | None = None

    def has_seen(self, event_hash: bytes) -> bool:
        # A match at an offset that is not a multiple of 8 would need 8 random bytes to line
        # up across two hashes: as unlikely as a collision of the hashes themselves.
        return event_hash in self.recent


class SnapshotError(ValueError):
    """A snapshot that cannot be decoded; the caller falls back to full replay."""


def encode_state(state: UserState) -> bytes:
    return msgpack.packb(
        {
            "sv": SNAPSHOT_SCHEMA,
            "u": state.user,
            "q": state.seq,
            "c": state.config,
            "g": state.segment,
            "tl": state.t_last,
            "n": state.steps,
            "b1": state.b1p,
            "b2": state.b2p,
            "bk": state.bucket,
            "w": np.ascontiguousarray(state.w, _F64).tobytes(),
            "m": np.ascontiguousarray(state.m, _F64).tobytes(),
            "v": np.ascontiguousarray(state.v, _F64).tobytes(),
            "r": state.recent,
            "rp": state.recent_pos,
            "hy": None if state.hyg is None else to_wire(state.hyg),
            "xa": None if state.arm is None else list(state.arm),
            "sb": None if state.stability is None else [
                np.ascontiguousarray(state.stability[0], _F64).tobytes(), *state.stability[1:]],
        },
        use_bin_type=True,
    )


def decode_state(raw: bytes) -> UserState:
    try:
        obj = msgpack.unpackb(raw, raw=False)
        if obj.get("sv") not in _READABLE_SCHEMAS:
            raise SnapshotError(f"snapshot schema {obj.get('sv')!r} is not {SNAPSHOT_SCHEMA}")
        recent = obj["r"]
        if not isinstance(recent, bytes) or len(recent) != 8 * RECENT_IDS:
            raise SnapshotError("snapshot id ring has the wrong size")
        # read-only views of the snapshot's bytes: no copy
        w, m, v = (np.frombuffer(obj[k], dtype=_F64) for k in ("w", "m", "v"))
        if not w.shape == m.shape == v.shape:
            raise SnapshotError("snapshot vectors differ in length")
        return UserState(
            user=obj["u"],
            seq=obj["q"],
            config=obj["c"],
            segment=obj["g"],
            t_last=obj["tl"],
            steps=obj["n"],
            b1p=obj["b1"],
            b2p=obj["b2"],
            bucket=obj["bk"],
            w=w,
            m=m,
            v=v,
            recent=recent,
            recent_pos=obj["rp"],
            hyg=None if obj["hy"] is None else from_wire(obj["hy"]),
            arm=None if obj.get("xa") is None else Arm(*obj["xa"]),
            stability=None if obj.get("sb") is None else (
                np.frombuffer(obj["sb"][0], dtype=_F64), obj["sb"][1], obj["sb"][2]),
        )
    except SnapshotError:
        raise
    except Exception as exc:
        raise SnapshotError(f"undecodable snapshot ({type(exc).__name__}: {exc})") from None
