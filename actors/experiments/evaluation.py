"""Off-policy evaluation from the store: what config B would have earned on the explored
exposures in the log, by replaying each user under B (actors/experiments/offpolicy.py).

For every user whose log has explored exposures (logged with propensities and candidates),
the user's log is replayed under B from seq 1 (a counterfactual: B's own learning all along),
and at each exposure B ranks the logged candidates from its state at the seq the exposure was
ranked at, with the segment model's weights logged with it: B's greedy slate is the target.
The rewards are the clicks joined to each exposure (actors/experiments/attribution.py).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from actors.experiments.attribution import attribute
from actors.experiments.definition import DEFAULT_WINDOW
from actors.experiments.offpolicy import LoggedSlate
from actors.exploration import greedy
from actors.learning import apply, own_weights, settle
from actors.state import UserState
from events.codec import event_from_log
from events.config import TuningConfig
from events.types import EXPOSURE
from store.recorder import Recorder, StoredEvent, by_user


def user_slates(rows: list[StoredEvent], target: TuningConfig, *, segment: str | None = None,
                window: float = DEFAULT_WINDOW) -> list[LoggedSlate]:
    """One user's explored exposures as logged slates, with target B's slate on each."""
    events = [(r.seq, event_from_log(r.body)) for r in rows]
    explored = [(seq, e) for seq, e in events if e.kind == EXPOSURE and e.exposure is not None
                and e.exposure.propensities is not None and e.exposure.candidates is not None]
    if not explored:
        return []
    joined = {x.rid: x for x in attribute(events, window).exposures}
    need = {e.exposure.seq for _, e in explored}
    state = UserState(rows[0].user)
    states = {0: state}
    for seq, event in events:
        state = apply(state, event, target)
        if seq in need:
            states[seq] = state
    slates = []
    for _seq, event in explored:
        shown = event.exposure
        at = states.get(shown.seq)
        if at is None or (segment is not None and at.segment != segment):
            continue
        settled = settle(at, target)
        w = own_weights(settled, target)
        if shown.shared is not None:
            w = w + np.frombuffer(shown.shared, "<f8")
        features = np.frombuffer(shown.features, "<f8").reshape(len(shown.candidates), -1)
        scores = features @ w[1:] + w[0]
        if shown.offsets is not None:  # the item effects it was ranked with
            scores = scores + np.frombuffer(shown.offsets, "<f8")
        best = [shown.candidates[i] for i in greedy(scores, len(shown.items))]
        clicked = joined[event.rid].clicked_items
        slates.append(LoggedSlate(
            at.user, event.rid, shown.items, shown.propensities,
            tuple(float(item in clicked) for item in shown.items),
            tuple(float(best[k] == item) for k, item in enumerate(shown.items)), tuple(best)))
    return slates


def logged_slates(recorder: Recorder, target: TuningConfig, *, segment: str | None = None,
                  window: float = DEFAULT_WINDOW,
                  users: Iterable[str] | None = None) -> list[LoggedSlate]:
    """Every explored exposure in the store (or of `users`), with B's slate on each."""
    out: list[LoggedSlate] = []
    for rows in by_user(recorder.read_all(users)):
        out.extend(user_slates(rows, target, segment=segment, window=window))
    return out
