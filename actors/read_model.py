"""The read model: replicas of users' states, kept by a query process from the feed.

A replica is what the user's actor holds, rebuilt the same way: from the store (snapshot and
tail, `actors.user.rebuild`) and then by `apply`ing each committed event the feed brings, in
seq order. Since `apply` is a pure function of the log, a replica at seq N is bit-identical to
the actor's state at seq N, and a query names the seq it was answered from.

Work is split so that queries come first (the owner calls in one thread, an event loop):
- `on_frame` only files the feed's rows under their replicas (microseconds a row);
- `catch_up(budget)` applies filed rows for at most `budget` seconds, then returns, so that
  the loop can serve the queries that arrived meanwhile;
- `rank` first applies the queried user's own filed rows, then answers.

Replicas exist for users that were queried (loaded from the store) or whose log the feed showed
from its first event (seq 1: nothing to load). Rows of anyone else are skipped; that user is
loaded when asked for. A hole in a replica's seqs (the feed dropped a backlog, `GAP`) drops
the replica; it is loaded again when next asked for. At most `max_users` replicas are kept
(least recently used go first).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np
import structlog

from actors import feed, ranking
from actors.configs import ConfigRegistry
from actors.experiments.definition import Experiment
from actors.experiments.registry import ExperimentRegistry
from actors.learning import apply
from actors.segment_model import SegmentModels
from actors.state import UserState
from events.codec import event_from_log
from events.errors import Reason, Rejected
from events.partitions import partition_of
from events.types import Query, Ranking

log = structlog.get_logger(__name__)

_F64 = np.dtype("<f8")


class Replica:
    __slots__ = ("filed", "state", "view")

    def __init__(self, state: UserState) -> None:
        self.state = state
        self.filed: list[tuple[int, bytes]] | None = None  # committed rows not applied yet
        self.view = ranking.View()


@dataclass(slots=True)
class ReadStats:
    rows: int = 0  # rows received
    applied: int = 0
    loads: int = 0  # replicas rebuilt from the store
    gaps: int = 0  # backlogs the feed dropped
    holes: int = 0  # replicas dropped for a hole in their seqs
    evicted: int = 0


class ReadModel:
    def __init__(self, configs: ConfigRegistry, models: SegmentModels,
                 catalog: dict[str, np.ndarray], *, max_users: int = 200_000,
                 experiments: ExperimentRegistry | None = None) -> None:
        self.configs = configs
        self.experiments = experiments or ExperimentRegistry()
        self.models = models
        self.catalog = catalog
        self.max_users = max_users
        self.stats = ReadStats()
        self._replicas: dict[str, Replica] = {}
        # users being loaded -> rows the feed brought meanwhile
        self._loading: dict[str, list[tuple[int, bytes]]] = {}
        self._dirty: collections.deque[str] = collections.deque()  # replicas with filed rows
        # a fleet's worker: (count, the partitions it holds), as its last PARTITIONS said
        self.partitions: tuple[int, frozenset[int]] | None = None
        self.partition_frames = 0  # PARTITIONS frames received

    def __len__(self) -> int:
        return len(self._replicas)

    @property
    def behind(self) -> int:
        """Replicas with filed rows not applied yet (0 once caught up)."""
        return len(self._dirty)

    # ------------------------------------------------------------ the feed

    def on_frame(self, data: bytes) -> None:
        for kind, payload in feed.decode_frame(data):
            if kind == feed.ROWS:
                self._file(payload)
            elif kind == feed.MODELS:
                self.models.load(payload)
            elif kind == feed.ITEMS:
                for item, raw in payload:
                    x = np.frombuffer(raw, _F64)
                    x.flags.writeable = False
                    self.catalog[item] = x
            elif kind == feed.ITEM_EFFECTS:
                full, biases = payload
                self.models.load_items(biases, replace=full)
            elif kind == feed.EXPERIMENTS:
                self.experiments.load(Experiment.decode(raw) for raw in payload)
            elif kind == feed.PARTITIONS:
                self._serve(int(payload[0]), frozenset(payload[1]))
            elif kind == feed.FORGET:
                self._replicas.pop(payload, None)
                self._loading.pop(payload, None)
            elif kind == feed.GAP:
                self.stats.gaps += 1
                log.warning("read_model.gap", replicas=len(self._replicas))
                self._replicas.clear()
                self._loading = {user: [] for user in self._loading}  # their reads restart
                self._dirty.clear()

    def _serve(self, count: int, held: frozenset[int]) -> None:
        """Keep replicas of the held partitions only: another worker writes the others'
        users now, and a replica kept for later would be behind their logs."""
        self.partition_frames += 1
        if self.partitions != (count, held):
            self.partitions = (count, held)
            self.drop(lambda user: partition_of(user, count) not in held)

    def drop(self, chosen) -> int:
        """Drop the replicas (and loads) of the users `chosen` accepts; how many."""
        doomed = [user for user in self._replicas if chosen(user)]
        for user in doomed:
            del self._replicas[user]
        for user in [user for user in self._loading if chosen(user)]:
            del self._loading[user]
        return len(doomed)

    def _file(self, rows: list) -> None:
        replicas, loading, dirty = self._replicas, self._loading, self._dirty
        self.stats.rows += len(rows)
        for user, seq, _event_id, body in rows:
            replica = replicas.get(user)
            if replica is None:
                waiting = loading.get(user)
                if waiting is not None:
                    waiting.append((seq, body))
                    continue
                if seq != 1:
                    continue  # not ours to keep: loaded from the store when asked for
                replica = self._add(user, Replica(UserState(user)))
            if replica.filed is None:
                replica.filed = []
                dirty.append(user)
            replica.filed.append((seq, body))

    def catch_up(self, budget_rows: int = 64) -> bool:
        """Apply filed rows, replica by replica, about `budget_rows` of them; True if rows
        are left (the caller schedules another turn after serving what waits)."""
        dirty, replicas = self._dirty, self._replicas
        done = 0
        while dirty and done < budget_rows:
            replica = replicas.get(dirty.popleft())
            if replica is not None and replica.filed:
                done += self._apply_filed(replica)
        return bool(dirty)

    def _apply_filed(self, replica: Replica) -> int:
        rows, replica.filed = replica.filed, None
        if not rows:
            return 0
        state, configs = replica.state, self.configs
        for seq, body in rows:
            if seq <= state.seq:
                continue  # the store had it already
            if seq != state.seq + 1:  # a hole: this replica cannot be trusted any more
                self.stats.holes += 1
                log.warning("read_model.hole", user_id=state.user, seq=state.seq,
                            next_seq=seq)
                self._replicas.pop(state.user, None)
                return len(rows)
            try:
                event = event_from_log(body)
                config = configs.get_fresh(event.config)
                before, state = state, apply(state, event, config)
                replica.view.advance(before, event, state, config)
            except Exception as exc:  # never the loop's end: the store rebuilds it on demand
                log.error("read_model.apply_failed", user_id=state.user, seq=seq,
                          error=repr(exc))
                self._replicas.pop(state.user, None)
                return len(rows)
        self.stats.applied += len(rows)
        replica.state = state
        return len(rows)

    # ------------------------------------------------------------ loading

    def begin_load(self, user: str) -> None:
        """A load of `user` from the store starts: rows from now on are kept for it."""
        self._loading.setdefault(user, [])

    def finish_load(self, user: str, state: UserState) -> None:
        """The loaded state (`actors.user.rebuild`): the rows the feed brought meanwhile go
        on top of it (those it already has are skipped)."""
        rows = self._loading.pop(user, None)
        if rows is None:  # forgotten meanwhile
            return
        replica = self._add(user, Replica(state))
        replica.filed = rows
        self._apply_filed(replica)

    def abandon_load(self, user: str) -> None:
        self._loading.pop(user, None)

    # ------------------------------------------------------------ queries

    def has(self, user: str) -> bool:
        return user in self._replicas

    def seq(self, user: str) -> int | None:
        replica = self._replicas.get(user)
        return None if replica is None else replica.state.seq

    def rank(self, query: Query) -> Ranking | Rejected | None:
        """The answer from the user's replica, up to date with every row filed; None if the
        user has no replica (load it first)."""
        replica = self._replicas.get(query.user)
        if replica is None:
            return None
        if replica.filed:
            self._apply_filed(replica)
            if query.user not in self._replicas:  # it had a hole
                return None
        # most recently used last: eviction takes the first
        del self._replicas[query.user]
        self._replicas[query.user] = replica
        try:
            return ranking.answer(replica.state, replica.view, query, self.configs,
                                  self.experiments, self.models)
        except Rejected:
            return Rejected(Reason.UNKNOWN_CONFIG, "config version unknown to the query process")

    def _add(self, user: str, replica: Replica) -> Replica:
        replicas = self._replicas
        replicas[user] = replica
        while len(replicas) > self.max_users:
            del replicas[next(iter(replicas))]
            self.stats.evicted += 1
        return replica
