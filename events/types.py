"""The event and query types.

An `Event` is what a publisher sends and, once enriched (item features resolved, config
version stamped), exactly what the log stores: a logged event is self-contained, so replay
never depends on today's catalog or config.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np

SCHEMA_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})

# kind -> the kind-specific wire field it requires (None: only the item)
INTERACTION_KINDS: dict[str, str | None] = {
    "impression": None,
    "click": None,
    "dwell": "d",  # dwell time, seconds
    "scroll": "s",  # scroll depth, [0, 1]
    "hover": "h",  # hover time, seconds
    "feedback": "y",  # explicit target in [0, 1] (a like, a mapped rating, a purchase)
}
CONTROL_KINDS: dict[str, str | None] = {
    "segment": "g",  # the user's segment from now on
    "clear_bot": None,  # admin: clear a bot verdict (the user learns again)
}
# written by operators' tools only (never accepted from publishers): `rollback` restores the
# state at an earlier seq (`to_seq`; the actor stamps that state, `restored`, on the logged
# event), `restore` is the first event of a user imported from an export (`restored`)
ADMIN_KINDS = frozenset({"rollback", "restore"})
# what a user was shown: a ranking, logged (README "Measuring the effect"). It moves no
# weight; outcomes (clicks, dwell, feedback) are joined to it (actors/experiments/attribution)
EXPOSURE = "exposure"
# the interactions that answer an exposure: what the user did with an item it was shown
OUTCOME_KINDS = frozenset({"click", "dwell", "scroll", "hover", "feedback"})
# what a user does (the bot heuristics watch these; impressions and explicit feedback are
# produced by pages and rating forms, not by the pace of a hand)
ACTION_KINDS = frozenset({"click", "dwell", "scroll", "hover"})
KINDS = {**INTERACTION_KINDS, **CONTROL_KINDS, EXPOSURE: "sh"}
_NO_EXTRA: Mapping[str, Any] = MappingProxyType({})


class Event(NamedTuple):
    """One interaction or control event of one user.

    `x` is the item's feature vector (without the bias term, which the model adds); it may be
    absent on the wire and is resolved before the event is logged. `config` is the tuning
    config version in force, stamped at ingest and logged with the event. (A NamedTuple:
    immutable and cheap to build, which matters at hundreds of thousands per second.)
    """

    id: str
    user: str
    t: float
    kind: str
    item: str | None = None
    x: np.ndarray | None = None
    dwell: float | None = None
    depth: float | None = None
    hover: float | None = None
    target: float | None = None
    segment: str | None = None
    config: int | None = None
    received: float | None = None  # server receive time (the broker's), stamped at ingest
    session: str | None = None  # the client's own session/connection id (a tab, a socket)
    automated: bool = False  # the publisher declares this traffic automated
    norms: Mapping[str, tuple[float, float, float]] | None = None  # segment statistics used
    base: float | None = None  # the segment model's score of this item, stamped at ingest
    to_seq: int | None = None  # rollback: the seq whose state comes back
    restored: bytes | None = None  # rollback, restore: that state (actors.state encoding)
    # the publisher vouches for `t`: history sent late on purpose (`bf` on the wire; README
    # "Backfill"). Hygiene trusts its time and does not pace it as a hand's actions.
    backfill: bool = False
    extra: Mapping[str, Any] = _NO_EXTRA  # unknown wire keys, kept and logged
    # the ranking id (`rid`): on an exposure, its own; on an outcome, the exposure it answers
    rid: str | None = None
    exposure: Exposure | None = None  # an exposure's ranking (kind "exposure" only)
    # the experiment arm the user is in, stamped by the service on an exposure (never taken
    # from a publisher): the assignment is logged, so replay and reports read it from the log
    arm: Arm | None = None

    @property
    def is_interaction(self) -> bool:
        return self.kind in INTERACTION_KINDS

    def __eq__(self, other: object) -> bool:  # numpy arrays need an explicit comparison
        if not isinstance(other, Event):
            return NotImplemented
        same_x = (self.x is None and other.x is None) or (
            self.x is not None and other.x is not None and np.array_equal(self.x, other.x)
        )
        return same_x and all(
            getattr(self, f) == getattr(other, f) for f in _SCALAR_FIELDS
        )

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = None  # type: ignore[assignment]


_SCALAR_FIELDS = (
    "id", "user", "t", "kind", "item", "dwell", "depth", "hover", "target", "segment", "config",
    "received", "session", "automated", "norms", "base", "to_seq", "restored", "backfill",
    "rid", "exposure", "arm",
)


class Arm(NamedTuple):
    """A user's experiment assignment: experiment name, arm name, and the version of the
    experiment's definition that assigned it (actors/experiments)."""

    experiment: str
    name: str
    version: int


class Exposure(NamedTuple):
    """What one ranking showed, best first: items with their weights and scores, the seq and
    config version of the state that ranked them, and (with exploration) each item's
    probability of being shown (`propensities`, for off-policy evaluation)."""

    items: tuple[str, ...]
    weights: tuple[float, ...]
    scores: tuple[float, ...]
    seq: int
    config: int
    propensities: tuple[float, ...] | None = None
    # an explored ranking's candidates (ids; features packed float64, N x dim) and the
    # segment model's weights it ranked with (packed; None: none): what reproduces its draw
    candidates: tuple[str, ...] | None = None
    features: bytes | None = None
    shared: bytes | None = None
    offsets: bytes | None = None  # the candidates' item effects (packed; None: none)


class Candidate(NamedTuple):
    """A content item to weigh: its id, and its features unless the catalog has them."""

    item: str
    x: np.ndarray | None = None


class CandidateRows(Sequence[Candidate]):
    """Candidates decoded as one matrix (`Query.matrix`): their ids and the matrix's rows,
    a `Candidate` built only when one is asked for (building all 100 of a query took 40 us,
    most of decoding it)."""

    __slots__ = ("items", "matrix")

    def __init__(self, items: tuple[str, ...], matrix: np.ndarray) -> None:
        self.items = items
        self.matrix = matrix

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return tuple(self)[index]
        return Candidate(self.items[index], self.matrix[index])

    def __iter__(self) -> Iterator[Candidate]:
        return map(Candidate, self.items, self.matrix)

    def __repr__(self) -> str:
        return f"CandidateRows({len(self)} items, dim {self.matrix.shape[1]})"


class Query(NamedTuple):
    user: str
    candidates: Sequence[Candidate]  # a tuple, or `CandidateRows` from the decoder
    top: int | None = None
    windows: bool = False  # also answer the user's recent-window counts
    # every candidate's features as one read-only matrix (rows in candidate order), when all
    # came with features of one length: scoring then needs no stacking
    matrix: np.ndarray | None = None
    # read your own writes: answer from a state at this seq or later (the seq of the event
    # the caller just wrote, from its outcome), waiting a bounded time for it
    min_seq: int | None = None
    # log this ranking as an exposure (`l`): the reply carries its ranking id (`rid`)
    log: bool = False
    t: float | None = None  # when the ranking is shown (event time); default: when answered
    # the ranking id to log it under (default: a new random one): a client that retries a
    # logged query with the same id gets one exposure, not two (and a reproducible draw)
    rid: str | None = None


@dataclass(frozen=True, slots=True)
class Ranking:
    """The answer to a query: weights sum to 1 over the returned items, best first.

    `seq` and `config` identify exactly which state served the answer, so the caller can log
    which adjustment served each delivery.
    """

    user: str
    items: tuple[str, ...]
    weights: tuple[float, ...]
    scores: tuple[float, ...]
    seq: int
    config: int
    windows: Mapping[str, int] | None = None  # kind -> count in the recent window, on request
    rid: str | None = None  # the ranking id, when the query asked for its exposure to be logged
    arm: Arm | None = None  # the experiment arm that ranked it, if any
    log_error: str | None = None  # why a ranking asked to be logged was not (none: it was)
    # to be logged as an exposure: the query asked (`l`), or the user's segment logs every
    # ranking (`log_exposures`); not on the wire
    log: bool = False
    # an explored slate (actors/exploration.py): each shown item's propensity (`pp` in the
    # reply), and for its exposure the candidates, their features (packed float64, N x dim)
    # and the segment model's weights it ranked with (packed; None: none)
    propensities: tuple[float, ...] | None = None
    candidates: tuple[str, ...] | None = None
    features: bytes | None = None
    shared: bytes | None = None
    offsets: bytes | None = None  # the candidates' item effects (packed; None: none)
