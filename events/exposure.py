"""An exposure event from a ranking: what was shown to whom, logged in the user's own log.

The query process (or `Microtune.rank`) builds it when a query asks to be logged (`l`), and
publishes it like any event; the service stamps the user's experiment arm on it at ingest.
Its event id is its ranking id (`rid`), which the reply hands to the caller, so that the
outcomes it leads to can name it.
"""

from __future__ import annotations

import uuid

from events.types import EXPOSURE, Event, Exposure, Query, Ranking


def new_rid() -> str:
    """A ranking id: random, unique (128 bits)."""
    return uuid.uuid4().hex


def exposure_event(query: Query, ranking: Ranking, rid: str, t: float) -> Event:
    """The exposure of `ranking` (the answer to `query`), shown at event time `t`."""
    shown = Exposure(ranking.items, ranking.weights, ranking.scores, ranking.seq,
                     ranking.config, ranking.propensities, ranking.candidates, ranking.features,
                     ranking.shared, ranking.offsets)
    return Event(id=rid, user=query.user, t=query.t if query.t is not None else t,
                 kind=EXPOSURE, rid=rid, exposure=shown)
