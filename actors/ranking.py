"""Answering a query from a user's state: one rule for the write side and the read side.

The user actor answers in-process queries (`Microtune.rank`) from its live state; the query
process (adapters/query_process.py) answers NATS queries from its replica of the same state,
rebuilt by the same `apply` from the committed log. Both call `rank` here, so they score alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from actors import exploration, hygiene
from actors.configs import ConfigRegistry
from actors.learning import settle, settle_after
from actors.segment_model import SegmentModels
from actors.state import UserState
from events.config import TuningConfig
from events.errors import Reason, Rejected
from events.exposure import new_rid
from events.types import Arm, CandidateRows, Event, Query, Ranking

if TYPE_CHECKING:
    from actors.experiments.registry import ExperimentRegistry


class View:
    """A user's state as queries see it: with its reorder buffer released (`settle`), so an
    answer reflects every event the user has sent. Not logged; cached by seq, since settling
    re-runs the learning of the buffered events. The events applied since the last answer
    (`advance`, at most `FOLLOW` of them) bring the cached state forward one learning step
    each (`settle_after`) instead of settling the whole buffer again.

    Queries may read it from other threads than the one that applies: each attribute is
    replaced in one assignment, and a chain of events that a race broke (one missing, one
    twice) is simply not followed: the state is settled from scratch."""

    FOLLOW = 8
    __slots__ = ("_cache", "_since")

    def __init__(self) -> None:
        # (the settled state, the config it was settled under)
        self._cache: tuple[UserState, TuningConfig] | None = None
        self._since: tuple[tuple[UserState, Event, UserState, TuningConfig], ...] = ()

    def advance(self, before: UserState, event: Event, after: UserState,
                config: TuningConfig) -> None:
        """`after = apply(before, event, config)` happened (cheap: only remembered). Past
        `FOLLOW` events without a query the view lets go of all it holds: a user nobody asks
        about keeps no states alive here (a query settles it from scratch)."""
        if self._cache is None:
            return
        since = self._since
        if len(since) < self.FOLLOW:
            self._since = (*since, (before, event, after, config))
        else:
            self._cache, self._since = None, ()

    def of(self, state: UserState, config: TuningConfig) -> UserState:
        cache = self._cache
        if cache is not None and cache[0].seq == state.seq and cache[1] is config:
            return cache[0]
        since, self._since = self._since, ()
        if cache is not None and cache[1] is config and _follows(cache[0], since, state,
                                                                  config):
            settled = cache[0]
            for before, event, after, _config in since:
                settled = settle_after(settled, before, event, after, config)
        else:
            settled = settle(state, config)
        self._cache = (settled, config)
        return settled


def _follows(settled: UserState, since: tuple, state: UserState,
             config: TuningConfig) -> bool:
    """Whether `since` leads, event by event under `config`, from the state `settled` was
    settled from to `state`."""
    if not since or since[0][0].seq != settled.seq or since[-1][2] is not state:
        return False
    previous = since[0][0]
    for before, _event, after, used in since:
        if before is not previous or used is not config:
            return False
        previous = after
    return True


def answer(state: UserState, view: View, query: Query, configs: ConfigRegistry,
           experiments: ExperimentRegistry, models: SegmentModels) -> Ranking | Rejected:
    """A query's answer from a user's state, wherever it is served (the user actor, a query
    process): the config it ranks by (the user's arm's, or its last event's), whether it is
    logged as an exposure (asked for with `l`, or the segment logs or explores every
    ranking), and under which ranking id (the query's own, or a new one). Raises `Rejected`
    for a config version unknown here."""
    last = configs.get_fresh(state.config or None)
    seg = last.segment(state.segment)
    log = query.log or seg.log_exposures or seg.explore != "none"
    config, arm = experiments.ranking_config(state, configs, log, last)
    return rank(view.of(state, config), query, config, models, arm, log,
                (query.rid or new_rid()) if log else None)


def rank(state: UserState, query: Query, config: TuningConfig,
         models: SegmentModels, arm: Arm | None = None, log: bool = False,
         rid: str | None = None) -> Ranking | Rejected:
    """Score the query's candidates by the user's (settled) weights plus its segment model's;
    weights are a softmax over the returned items, best first. A logged ranking (`log`, with
    its ranking id `rid`) of an exploring segment shows the slate its policy draws
    (actors/exploration.py), the weights by position, and carries what its exposure logs to
    reproduce the draw: the candidates, their features and the segment model's weights."""
    dim = config.dim
    features = query.matrix
    if features is None or features.shape[1] != dim:  # the careful path finds the reason
        for cand in query.candidates:
            if cand.x is None:
                return Rejected(Reason.MISSING_FIELD, f"no features for item {cand.item!r}", "c")
            if cand.x.shape[0] != dim:
                return Rejected(Reason.DIMENSION,
                                f"item {cand.item!r} has {cand.x.shape[0]} != {dim}", "c")
        features = np.stack([cand.x for cand in query.candidates])
    w = models.total(state, config)  # the user's own + the segment's
    scores = features @ w[1:] + w[0]
    seg = config.segment(state.segment)
    cands = query.candidates
    ids = cands.items if type(cands) is CandidateRows else [c.item for c in cands]
    offsets = None
    if seg.item_effects and seg.segment_model:  # the segment model's item effects
        offsets = models.item_biases(state.segment or "default", ids)
        if offsets is not None:
            scores = scores + offsets
    order = np.argsort(-scores, kind="stable")
    if query.top is not None:
        order = order[: query.top]
    top = scores[order]
    e = np.exp(top - top[0])
    weights = e / e.sum()
    explored = {}
    if log and rid is not None and seg.explore != "none":
        slate = exploration.choose(
            seg.explore, scores, len(order), rid, epsilon=seg.epsilon, features=features,
            weights=w, spread=exploration.spread(state.v, dim, seg.explore_scale),
            samples=seg.explore_samples, offsets=offsets)
        order, top = slate.order, scores[slate.order]  # the weights stay by position
        shared = models.weights(state.segment or "default", dim) if seg.segment_model else None
        explored = {"propensities": slate.propensities, "candidates": tuple(ids),
                    "features": np.ascontiguousarray(features, "<f8").tobytes(),
                    "shared": None if shared is None else shared.astype("<f8").tobytes(),
                    "offsets": None if offsets is None else offsets.astype("<f8").tobytes()}
    return Ranking(
        user=query.user,
        items=tuple([ids[i] for i in order.tolist()]),
        weights=tuple(weights.tolist()),
        scores=tuple(top.tolist()),
        seq=state.seq,
        config=config.version,
        windows=(state.hyg or hygiene.EMPTY).window_counts(seg)
        if query.windows else None,
        arm=arm,
        log=log,
        rid=rid if log else None,
        **explored,
    )
