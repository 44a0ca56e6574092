"""The log is the truth: live state == replayed state, bit for bit.

Random event sequences (random times, kinds, items, repeated ids, segment changes, config
changes, exposures and outcomes naming them, experiments started and stopped, so that users
learn under their arms' configs) go through the real system (actors, journal, SQLite) while
actors are passivated and re-activated and snapshots are taken at arbitrary points.
Afterwards every user's live state, encoded as a snapshot, must equal byte for byte: a replay
from the log, a replay from the latest snapshot, and an independent fold of `apply` over the
events the test sent (first occurrence of each id), in the order sent.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from helpers import canonical
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors import Microtune, apply, encode_state, replay_user
from actors.state import UserState
from events import Event, SegmentConfig, TuningConfig
from events.codec import event_from_log
from events.types import Exposure

DIM = 3
USERS = ["ann", "bob", "cyd"]
ITEMS = np.random.default_rng(42).normal(size=(6, DIM))
CONFIG = TuningConfig(version=1, dim=DIM, segments={
    "default": SegmentConfig(half_life=600.0),
    "fast": SegmentConfig(optimizer="rmsprop", lr=0.2, lr_min=0.05, lr_max=0.4, max_step=0.3,
                          half_life=120.0, window=60.0, window_budget=0.5, item_effects=True),
    "slow": SegmentConfig(optimizer="adagrad", half_life=86400.0, late_policy="drop",
                          outlier_action="clip", lateness=30.0, impression_timeout=5.0,
                          segment_model=False),
    "raw": SegmentConfig(hygiene=False, adaptive_bounds=True, max_step=0.2),
})

kinds = st.sampled_from(["click", "impression", "dwell", "scroll", "hover", "feedback",
                         "segment", "clear_bot", "exposure"])
SHOWN = Exposure(("a", "b"), (0.7, 0.3), (1.25, 0.4), 0, 1)


@st.composite
def event_op(draw):
    kind = draw(kinds)
    fields = {}
    if kind == "segment":
        fields["segment"] = draw(st.sampled_from(["default", "fast", "slow", "raw"]))
    elif kind == "clear_bot":
        pass
    elif kind == "exposure":
        fields["exposure"] = SHOWN
    else:
        fields["item"] = "i"
        fields["x"] = ITEMS[draw(st.integers(0, len(ITEMS) - 1))]
        fields.update({
            "dwell": {"dwell": draw(st.floats(0, 600))},
            "scroll": {"depth": draw(st.floats(0, 1))},
            "hover": {"hover": draw(st.floats(0, 30))},
            "feedback": {"target": draw(st.floats(0, 1))},
        }.get(kind, {}))
        if kind != "impression":  # an outcome may name the exposure it answers
            fields["rid"] = draw(st.sampled_from([None, "id1", "id2"]))
    t = draw(st.floats(0, 5000, allow_nan=False))  # unordered event times
    delay = draw(st.one_of(st.none(), st.floats(-10, 3 * 3600)))  # skewed or late clocks
    event_id = f"id{draw(st.integers(0, 25))}"  # a small id pool: repeats are common
    if kind == "exposure":
        fields["rid"] = event_id
    return ("event", Event(
        id=event_id,
        user=draw(st.sampled_from(USERS)),
        t=t,
        kind=kind,
        received=None if delay is None else t + delay,
        session=draw(st.sampled_from([None, "tab1", "tab2"])),
        automated=draw(st.integers(0, 15)) == 0,  # hygiene: a declared bot, now and then
        backfill=draw(st.integers(0, 3)) == 0,  # history: trusted time, not paced
        **fields,
    ))


ops = st.lists(
    st.one_of(
        event_op(),
        event_op(),
        event_op(),
        st.just(("passivate",)),
        st.just(("restart",)),
        st.just(("config",)),
        st.just(("experiment",)),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, snapshot_every=st.integers(1, 15), max_live=st.integers(1, 3))
def test_live_state_equals_replay_bit_for_bit(ops, snapshot_every, max_live):
    with tempfile.TemporaryDirectory() as tmp:
        def start() -> Microtune:
            return Microtune.open(Path(tmp) / "mt.db", CONFIG, snapshot_every=snapshot_every,
                                  max_live=max_live)

        mt = start()
        sent: dict[str, list[tuple[Event, int]]] = {u: [] for u in USERS}
        try:
            pending: list[Event] = []

            def send() -> None:
                version = mt.configs.current.version
                for outcome in mt.track_many(pending):
                    assert outcome.status in ("applied", "duplicate")
                for e in pending:
                    sent[e.user].append((e, version))
                pending.clear()

            for op in ops:
                if op[0] == "event":
                    pending.append(op[1])
                    continue
                send()
                if op[0] == "passivate":
                    assert mt.passivate_all(30)
                elif op[0] == "restart":  # as after a crash: no snapshots on the way out
                    mt.close(snapshot=False)
                    mt = start()
                elif op[0] == "experiment":  # start one, or stop the one running
                    running = mt.experiments.running
                    if running:
                        mt.stop_experiment(running[0].name)
                    else:
                        mt.start_experiment(f"x{len(mt.experiments.all())}",
                                            [("control", "no-adjust"), ("b", "current")])
                else:
                    cur = mt.configs.current
                    seg = cur.segments["default"]
                    changed = SegmentConfig(lr=seg.lr * 0.9, lr_max=seg.lr_max * 0.8,
                                            half_life=seg.half_life * 0.7, l2=seg.l2 * 2)
                    mt.configs.add(TuningConfig(version=1, dim=DIM, segments={
                        **cur.segments, "default": changed}))
            send()

            for user in USERS:
                live = encode_state(mt.state(user))
                full = replay_user(mt.recorder, mt.configs, user, use_snapshots=False)
                from_snapshot = replay_user(mt.recorder, mt.configs, user)
                assert live == encode_state(full)
                assert live == encode_state(from_snapshot)
                # and without the codec: a field that snapshots lose would show here
                assert canonical(full) == canonical(from_snapshot) == canonical(mt.state(user))

                # what the actor stamped (the segment model's score, segment statistics, the
                # experiment arm and its config) depends on other users and on experiments;
                # the rest of each logged event is what was sent
                stamped = {e.id: e for e in (event_from_log(row.body)
                                             for row in mt.recorder.read(user))}
                expected, seen = UserState(user), set()
                for event, version in sent[user]:
                    if event.id in seen:
                        continue
                    seen.add(event.id)
                    logged = stamped[event.id]
                    if logged.config != version:  # only an arm's config replaces the current
                        assert mt.configs.get(logged.config).label is not None or any(
                            logged.config in dict(e.arms).values()
                            for e in mt.experiments.all()), logged
                    cfg = mt.configs.get(logged.config)
                    expected = apply(expected, event._replace(
                        config=logged.config, base=logged.base, norms=logged.norms,
                        arm=logged.arm), cfg)
                assert live == encode_state(expected)
                assert canonical(expected) == canonical(full)
                assert [r.seq for r in mt.recorder.read(user)] == list(range(1, len(seen) + 1))
        finally:
            mt.close()
