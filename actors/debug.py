"""A user's timeline for debugging: what every logged event did, replayed with a trace.

The replay runs the same `apply` as live traffic, from seq 1, and asks it for a trace
(`actors.learning.Step`): so the timeline shows exactly the decisions the live system made.
With data hygiene an event may learn later than it was logged (when a later event releases
it, or at an impression's deadline): its row shows its final verdict and the seq of the event
that released it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from actors.configs import ConfigRegistry
from actors.learning import Step, apply, settle
from actors.state import UserState
from events.codec import event_from_log
from store.recorder import Recorder

TOP_MOVES = 3  # features listed per learning step


class Row(NamedTuple):
    seq: int
    event_id: str
    kind: str
    item: str | None
    t: float
    received: float | None
    verdict: str
    y: float | None = None  # target
    importance: float | None = None
    p: float | None = None  # the prediction before the update
    rate: float | None = None  # mean per-coordinate learning rate
    change: float | None = None  # L2 norm of the weight change
    moved: tuple[tuple[str, float], ...] = ()  # (feature, change), largest first
    learned_at: int | None = None  # seq of the event whose arrival made it learn
    session: int | None = None

    def to_map(self) -> dict[str, Any]:
        return {k: (list(map(list, v)) if k == "moved" else v)
                for k, v in self._asdict().items()}


class Timeline(NamedTuple):
    user: str
    rows: list[Row]
    state: UserState  # after the last event (as logged)
    settled: UserState  # as queries see it (the reorder buffer released)
    history: list[tuple[int, np.ndarray]]  # (seq, weights) after every change


def feature_names(dim: int) -> list[str]:
    return ["bias", *(f"x{i}" for i in range(dim))]


def timeline(recorder: Recorder, configs: ConfigRegistry, user: str, *,
             until_seq: int | None = None) -> Timeline:
    state = UserState(user)
    rows: dict[str, Row] = {}
    order: list[str] = []
    history: list[tuple[int, np.ndarray]] = []
    config = configs.current
    for stored in recorder.read(user, until_seq=until_seq):
        event = event_from_log(stored.body)
        config = configs.get(event.config)
        trace: list[Step] = []
        before = state.w
        state = apply(state, event, config, trace)
        rows[event.id] = Row(stored.seq, event.id, event.kind, event.item, event.t,
                             event.received, "logged")
        order.append(event.id)
        _record(rows, trace, stored.seq, state, config.dim)
        if state.w is not before:
            history.append((stored.seq, state.w))
    trace = []
    settled = settle(state, config, trace)
    _record(rows, trace, None, settled, config.dim)
    return Timeline(user, [rows[i] for i in order], state, settled, history)


def _record(rows: dict[str, Row], trace: list[Step], seq: int | None, state: UserState,
            dim: int) -> None:
    session = state.hyg.session if state.hyg is not None else None
    names = feature_names(dim)
    for step in trace:
        row = rows.get(step.event_id)
        if row is None:
            continue
        update: dict[str, Any] = {"verdict": step.verdict, "session": session}
        if step.verdict not in ("pending", "impression_pending"):
            update["learned_at"] = seq
        if step.step is not None:
            moved = -step.step  # w moves by -step
            top = np.argsort(-np.abs(moved))[:TOP_MOVES]
            update.update(y=step.y, importance=step.importance, p=step.p, rate=step.rate,
                          change=float(np.linalg.norm(moved)),
                          moved=tuple((names[i], float(moved[i])) for i in top))
        rows[step.event_id] = row._replace(**update)


def summary(tl: Timeline, configs: ConfigRegistry) -> dict[str, Any]:
    """The user's state in words and numbers, for the header of the debug view."""
    s = tl.settled
    config = configs.get(s.config or None)
    seg = config.segment(s.segment)
    out: dict[str, Any] = {
        "user": tl.user, "seq": s.seq, "config": s.config, "segment": s.segment,
        "learning_steps": s.steps,
        "weights": dict(zip(feature_names(config.dim), s.w.tolist(), strict=False)),
    }
    h = s.hyg
    if h is not None:
        out.update(
            session={"number": h.session, "start": h.session_start, "last": h.session_last,
                     "events": h.session_events, "client_ids": list(h.session_ids)},
            bot=h.bot or None, clock_skew_s=h.skew(), late=h.late, outliers=h.outliers,
            ignored_as_bot=h.ignored, waiting_impressions=len(h.impressions),
            recent_window=h.window_counts(seg),
        )
    return out


def _why_still(tl: Timeline) -> str:
    """Why a user's weights never moved, for the plot's title."""
    hyg = tl.state.hyg
    if hyg is not None and hyg.bot:
        return f"marked a bot: {hyg.bot}"
    if not tl.rows:
        return "its log is empty"
    return "no event of it has learned yet (waiting in the lateness window, or none learns)"


def plot(tl: Timeline, dim: int, path: str) -> None:
    """A PNG of every weight over the log (seq), with rollbacks marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    if tl.history:
        seqs = [q for q, _ in tl.history]
        weights = np.array([w for _, w in tl.history])
        for i, name in enumerate(feature_names(dim)):
            ax.plot(seqs, weights[:, i], label=name, linewidth=1.2 if i else 2.0)
    for row in tl.rows:
        if row.kind == "rollback":
            ax.axvline(row.seq, color="red", linestyle="--", linewidth=1)
            ax.annotate("rollback", (row.seq, ax.get_ylim()[1]), color="red", fontsize=8,
                        rotation=90, va="top")
    ax.set_xlabel("seq (log order)")
    ax.set_ylabel("weight")
    ax.set_title(f"weights of user {tl.user} over its log" if tl.history
                 else f"user {tl.user}: no weight has moved ({_why_still(tl)})")
    if dim <= 16 and tl.history:  # no lines: no legend (matplotlib would warn)
        ax.legend(loc="upper left", fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
