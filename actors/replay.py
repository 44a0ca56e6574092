"""Replay: rebuild state from the log with the same `apply` that serves live traffic.

- `replay_user`: one user, optionally only up to seq N, optionally under another tuning config
  (a counterfactual: "what would this user's weights be under config B?").
- `replay_all`: every user, streamed in (user, seq) order: constant memory, whatever the log size.
- `current_states`: every user's current state from one consistent read (snapshot + tail).
- `verify_snapshots` / `check_snapshot`: latest snapshots against a replay from seq 1.
- `seq_at_time`: where a log prefix "up to time T" ends (--until-time, --to-time), by the
  broker's receive time (the default) or by event time (`--time-basis event`).

A counterfactual replays from seq 1 (snapshots were made under the recorded configs); a plain
replay may start from a snapshot at or before the target seq.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
from collections.abc import Callable, Container, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import NamedTuple

import structlog

from actors.configs import ConfigRegistry
from actors.learning import apply
from actors.state import SnapshotError, UserState, decode_state, encode_state
from events.codec import event_from_log
from events.config import TuningConfig
from events.types import Event
from store.recorder import Recorder, Snapshot, StoredEvent, UserLog, open_recorder

log = structlog.get_logger(__name__)


def _config_for(configs: ConfigRegistry, override: TuningConfig | None):
    if override is None:
        return configs.get
    return lambda _version: override


TIME_BASES = ("received", "event")


def event_time(event: Event, basis: str = "received") -> float:
    """When an event happened for the operators' tools (--until-time, --to-time).

    "received" (the default): the broker's receive time when logged (it follows the log's
    order), else the event's own time. "event": the event's own time `t`, which is what
    slices a backfill, whose events were all received within moments of each other."""
    if basis == "event" or event.received is None:
        return event.t
    return event.received


def seq_at_time(recorder: Recorder, user: str, until_time: float,
                basis: str = "received") -> int:
    """The seq of the log prefix up to `until_time`: the events before the first one that
    happened (see `event_time`, by `basis`) later than it. A prefix, because a state is a
    fold of the log: by event time, the first event logged with a later time ends it, even
    if older ones follow (a skewed clock, history sent after newer events)."""
    if basis not in TIME_BASES:
        raise ValueError(f"time basis {basis!r} is not one of {TIME_BASES}")
    seq = 0
    for row in recorder.read(user):
        if event_time(event_from_log(row.body), basis) > until_time:
            break
        seq = row.seq
    return seq


def replay_user(
    recorder: Recorder,
    configs: ConfigRegistry,
    user: str,
    *,
    until_seq: int | None = None,
    until_time: float | None = None,
    config: TuningConfig | None = None,
    use_snapshots: bool = True,
    time_basis: str = "received",
) -> UserState:
    """The user's state after the events with seq <= until_seq (all when None), or after the
    log prefix up to `until_time` (see `seq_at_time`; `time_basis` "received" or "event")."""
    if until_time is not None:
        seq = seq_at_time(recorder, user, until_time, time_basis)
        until_seq = seq if until_seq is None else min(until_seq, seq)
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
    from_user: str | None = None,
    to_user: str | None = None,
) -> Iterator[UserState]:
    """Every user's state rebuilt from the full log, one user at a time."""
    config_for = _config_for(configs, config)
    state: UserState | None = None
    for row in recorder.read_all(users, from_user=from_user, to_user=to_user):
        if state is None or row.user != state.user:
            if state is not None:
                yield state
            state = UserState(row.user)
        event = event_from_log(row.body)
        state = apply(state, event, config_for(event.config))
    if state is not None:
        yield state


def current_states(recorder: Recorder, configs: ConfigRegistry, *,
                   users: Container[str] | None = None) -> Iterator[UserState]:
    """Every user's current state (latest snapshot + the events after it), from ONE consistent
    read of the store (`Recorder.scan`), user by user: a point-in-time view in constant
    memory, safe while the service writes. An undecodable snapshot: that user is rebuilt from
    its full log (a separate read, logged)."""
    for entry in recorder.scan():
        if users is not None and entry.user not in users:
            continue
        state = UserState(entry.user)
        rows = entry.events
        if entry.snapshot is not None:
            try:
                state = decode_state(entry.snapshot.state)
            except SnapshotError as exc:
                log.warning("snapshot.undecodable", user_id=entry.user,
                            seq=entry.snapshot.seq, error=str(exc))
                rows = list(recorder.read(entry.user))
        for row in rows:
            event = event_from_log(row.body)
            state = apply(state, event, configs.get(event.config))
        yield state


class Mismatch(NamedTuple):
    user: str
    seq: int  # the snapshot's seq
    reason: str


def verify_snapshots(recorder: Recorder, configs: ConfigRegistry,
                     progress: Callable[[UserLog], None] | None = None) -> Iterator[Mismatch]:
    """Check every user's latest snapshot against a replay of its log from seq 1 (one
    consistent read, streamed); yields the users whose snapshot differs. `progress` is
    called with each user's `UserLog` once it is checked."""
    for entry in recorder.scan(full=True):
        if entry.snapshot is not None:
            mismatch = check_snapshot(entry.snapshot, entry.events, configs)
            if mismatch is not None:
                yield mismatch
        if progress is not None:
            progress(entry)


def check_snapshot(snap: Snapshot, rows: Iterable[StoredEvent],
                   configs: ConfigRegistry) -> Mismatch | None:
    """Replay `rows` (the user's log from seq 1) up to the snapshot's seq and compare."""
    state = UserState(snap.user)
    for row in rows:
        if row.seq > snap.seq:
            break
        event = event_from_log(row.body)
        state = apply(state, event, configs.get(event.config))
    if state.seq != snap.seq:
        return Mismatch(snap.user, snap.seq, f"the log ends at seq {state.seq}")
    if encode_state(state) == snap.state:
        return None
    try:
        decode_state(snap.state)
        reason = "the snapshot differs from the replayed state"
    except SnapshotError as exc:
        reason = f"undecodable snapshot: {exc}"
    return Mismatch(snap.user, snap.seq, reason)


class ReplaySummary(NamedTuple):
    users: int
    events: int
    digest: str  # sha256 over (user, encoded state) in user order: equal replays, equal digests


def _replay_range(store: str, from_user: str | None, to_user: str | None,
                  config: bytes | None) -> tuple[int, int, list[bytes]]:
    recorder = open_recorder(store, upgrade=False)
    try:
        configs = ConfigRegistry(recorder, TuningConfig(version=1, dim=1))
        override = None if config is None else TuningConfig.decode(config)
        users = events = 0
        digests = []
        for state in replay_all(recorder, configs, config=override,
                                from_user=from_user, to_user=to_user):
            users += 1
            events += state.seq
            digests.append(hashlib.sha256(state.user.encode() + encode_state(state)).digest())
        return users, events, digests
    finally:
        recorder.close()


def replay_parallel(store: str, *, workers: int = 2,
                    config: TuningConfig | None = None) -> ReplaySummary:
    """Replay every user in `workers` processes, each over a contiguous range of users.

    The same `apply` runs in each process; states are summarised by a digest, which equals
    the digest of a sequential replay (`summarize(replay_all(...))`).
    """
    recorder = open_recorder(store, upgrade=False)
    try:
        users = list(recorder.users())
    finally:
        recorder.close()
    if not users:
        return ReplaySummary(0, 0, hashlib.sha256().hexdigest())
    step = -(-len(users) // workers)
    bounds = [users[i] for i in range(0, len(users), step)] + [None]
    ranges = [(bounds[i] if i else None, bounds[i + 1]) for i in range(len(bounds) - 1)]
    raw_config = None if config is None else config.encode()
    with ProcessPoolExecutor(len(ranges), mp_context=mp.get_context("spawn")) as pool:
        parts = list(pool.map(_replay_range, [store] * len(ranges), *zip(*ranges, strict=True),
                              [raw_config] * len(ranges)))
    digest = hashlib.sha256()
    for _, _, digests in parts:
        for d in digests:
            digest.update(d)
    return ReplaySummary(sum(p[0] for p in parts), sum(p[1] for p in parts), digest.hexdigest())


def summarize(states: Iterable[UserState]) -> ReplaySummary:
    """The `ReplaySummary` of states in user order (to compare with `replay_parallel`)."""
    digest = hashlib.sha256()
    users = events = 0
    for state in states:
        users += 1
        events += state.seq
        digest.update(hashlib.sha256(state.user.encode() + encode_state(state)).digest())
    return ReplaySummary(users, events, digest.hexdigest())
