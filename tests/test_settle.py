"""What a query sees after one more event, computed incrementally (`settle_after`), is
bit-identical to settling the new state from scratch (`settle`)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.learning import apply, settle, settle_after
from actors.state import UserState, encode_state
from events import Event, SegmentConfig, TuningConfig

DIM = 3
ITEMS = np.random.default_rng(7).normal(size=(5, DIM))
CONFIGS = [TuningConfig(version=1, dim=DIM, segments={"default": seg}) for seg in (
    SegmentConfig(),
    SegmentConfig(optimizer="adam", lateness=30.0, impression_timeout=5.0, half_life=600.0,
                  late_policy="drop", outlier_action="clip", adaptive_bounds=True),
    SegmentConfig(lateness=0.0, bot_burst=5.0, bot_max_rate=1.0),
)]


@st.composite
def stream(draw):
    events, t = [], 1000.0
    for n in range(draw(st.integers(1, 60))):
        kind = draw(st.sampled_from(["click", "click", "dwell", "feedback", "impression",
                                     "hover", "scroll", "exposure", "segment"]))
        t += draw(st.sampled_from([0.0, 0.5, 2.0, 40.0, -3.0, -60.0, 4000.0]))
        fields: dict = {}
        if kind not in ("exposure", "segment"):
            fields = {"item": f"i{draw(st.integers(0, 4))}",
                      "x": ITEMS[draw(st.integers(0, 4))]}
        if kind == "dwell":
            fields["dwell"] = draw(st.floats(0, 900))
        if kind == "hover":
            fields["hover"] = draw(st.floats(0, 60))
        if kind == "scroll":
            fields["depth"] = draw(st.floats(0, 1))
        if kind == "feedback":
            fields["target"] = draw(st.floats(0, 1))
        if kind == "segment":
            fields["segment"] = "default"
        delay = draw(st.sampled_from([None, 0.0, 1.0, 7200.0]))
        events.append(Event(id=f"e{n}", user="u", t=t, kind=kind,
                            received=None if delay is None else t + delay,
                            backfill=draw(st.integers(0, 9)) == 0, **fields))
    return events


@settings(max_examples=150, deadline=None)
@given(stream(), st.integers(0, len(CONFIGS) - 1))
def test_settle_after_equals_settle_from_scratch(events, which):
    config = CONFIGS[which]
    state = UserState("u")
    settled = settle(state, config)
    for event in events:
        new = apply(state, event, config)
        settled = settle_after(settled, state, event, new, config)
        assert encode_state(settled) == encode_state(settle(new, config)), event
        state = new


def test_in_order_clicks_take_the_incremental_path():
    """A burst within the lateness window: each click learns once on top of the last
    settled state, not the whole buffer again (counted through the trace)."""
    config = CONFIGS[0]
    state, settled, steps = UserState("u"), UserState("u"), 0
    for n in range(20):
        event = Event(id=f"e{n}", user="u", t=1000.0 + 0.1 * n, kind="click", item="a",
                      x=ITEMS[n % 5])
        new = apply(state, event, config)
        trace: list = []
        before = settled
        settled = settle_after(settled, state, event, new, config)
        scratch = settle(new, config, trace)
        steps += sum(1 for s in trace if s.verdict == "applied")
        assert encode_state(settled) == encode_state(scratch)
        assert settled.steps == before.steps + 1  # one more learning step, on top
        state = new
    assert steps > 20 * 5  # from scratch, every query re-learned the buffer


@settings(max_examples=60, deadline=None)
@given(stream(), st.lists(st.booleans(), min_size=60, max_size=60))
def test_the_query_view_follows_events_and_answers_as_from_scratch(events, asks):
    """ranking.View, as the user actor and the read model drive it: events remembered by
    `advance`, queries now and then (`of`), each answer bit-identical to settling anew."""
    from actors.ranking import View

    config, view, state = CONFIGS[0], View(), UserState("u")
    for event, ask in zip(events, asks, strict=False):
        before, state = state, apply(state, event, config)
        view.advance(before, event, state, config)
        if ask:
            assert encode_state(view.of(state, config)) == encode_state(settle(state, config))
    other = TuningConfig(version=2, dim=DIM)  # another config: settled under it, not reused
    assert encode_state(view.of(state, other)) == encode_state(settle(state, other))
