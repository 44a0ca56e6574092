"""Replay: rebuild state from the log with the same `apply` that serves live traffic.

- `replay_user`: one user, optionally only up to seq N, optionally under another tuning config
  (a counterfactual: "what would this user's weights be under config B?").
- `replay_all`: every user, streamed in (user, seq) order: constant memory, whatever the log size.

A counterfactual replays from seq 1 (snapshots were made under the recorded configs); a plain
replay may start from a snapshot at or before the target seq.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from actors.configs import ConfigRegistry
from actors.learning import apply
from actors.state import SnapshotError, UserState, decode_state
from events.codec import event_from_log
from events.config import TuningConfig
from store.recorder import Recorder


def _config_for(configs: ConfigRegistry, override: TuningConfig | None):
    if override is None:
        return configs.get
    return lambda _version: override


def replay_user(
    recorder: Recorder,
    configs: ConfigRegistry,
    user: str,
    *,
    until_seq: int | None = None,
    config: TuningConfig | None = None,
    use_snapshots: bool = True,
) -> UserState:
    """The user's state after the events with seq <= until_seq (all when None)."""
    config_for = _config_for(configs, config)
    state = UserState(user)
    if use_snapshots and config is None:
        snap = recorder.latest_snapshot(user, max_seq=until_seq)
        if snap is not None:
            try:
                state = decode_state(snap.state)
            except SnapshotError:
                state = UserState(user)
    for row in recorder.read(user, after_seq=state.seq, until_seq=until_seq):
        event = event_from_log(row.body)
        state = apply(state, event, config_for(event.config))
    return state


def replay_all(
    recorder: Recorder,
    configs: ConfigRegistry,
    *,
    users: Iterable[str] | None = None,
    config: TuningConfig | None = None,
) -> Iterator[UserState]:
    """Every user's state rebuilt from the full log, one user at a time."""
    config_for = _config_for(configs, config)
    state: UserState | None = None
    for row in recorder.read_all(users):
        if state is None or row.user != state.user:
            if state is not None:
                yield state
            state = UserState(row.user)
        event = event_from_log(row.body)
        state = apply(state, event, config_for(event.config))
    if state is not None:
        yield state
