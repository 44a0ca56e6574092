"""`microtune demo`: simulated users with hidden preferences against a running service.

Each round, every simulated user asks for weights over a random slate of items, "sees" the
top items, clicks according to its hidden preference, and the events go back to microtune.
The view shows each user's "agreement" (`AGREEMENT`: the Spearman rank correlation between
the weights served and the user's true taste on the slate) as the weights adjust, and a
summary of all users. On a terminal it is a live table; piped or redirected, one plain line
per round and the final tables.

Where it writes (`Namespace`, said in the banner): users `demo-<run>-<n>`, new on every run;
catalog items `demo-item-<i>` only; against a running service (`--nats-url`) a segment of
the run's own, `demo-<run>`, so that the demo trains neither the `default` segment model
nor any real user's state, and a rerun starts clean. The demo's own service (no
`--nats-url`) has a new store of its own, and there the users stay in segment `default`
(so that `microtune calibrate` and `evaluate` on that store read them as they are).

With `--experiment` the demo runs an experiment `demo-adjustment-<timestamp>`: half the users
(by user) rank without micro-adjustment (arm "control": segment model and prior only), half
by the current config (arm "adjusted"). Every ranking is logged as an exposure and every
click names the exposure it answers (`rid`); the live view adds, per arm, the mean agreement
and the click-through per exposure so far, round by round. At the end the experiment stops;
with the demo's own service the report is printed (`microtune experiment report` prints the
same from any store). The experiment enrols only the demo's segment.

Pace: data hygiene marks machine-paced clicking as a bot, so the users act at a human pace.
By default the demo pauses 0.8-2.0 s between rounds and the events carry the wall clock, as
a real client's do. `--pace SECONDS` pauses that long instead (0: not at all) and the events
carry a simulated clock that advances by human gaps (`EventClock`), so that a fast run still
learns what a slow one would.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from adapters.client import rank, track, upsert_items
from adapters.population import spearman
from events.config import SegmentConfig
from events.errors import Reason, Rejected
from events.types import Ranking

BARS = "▁▂▃▄▅▆▇█"
ITEMS, SLATE, SEEN = 200, 20, 5  # catalog items; a round's slate; the top items a user sees
AGREEMENT = (
    f"agreement: Spearman rank correlation, over the round's slate of {SLATE} items, between "
    "the weights served to the user and its true (hidden) taste; from -1 (served in reverse "
    "order of taste) through 0 (no relation) to +1 (served exactly in the order of taste)")
HUMAN_PAUSE = (0.8, 2.0)  # seconds between rounds (wall clock) at the default pace
# the simulated clock (`--pace`): seconds between a user's actions on one page, and from its
# last action to its next page
ACTION_GAP = (0.3, 2.5)
PAGE_GAP = (1.0, 6.0)
# the experiment's arms: (name, spec) as `Microtune.start_experiment` takes them
CONTROL, ADJUSTED = "control", "adjusted"
ARMS = [(CONTROL, "no-adjust"), (ADJUSTED, "current")]
ARM_TEXT = {CONTROL: "without micro-adjustment, by segment model and prior",
            ADJUSTED: "the current config"}
WHY = "microtune demo --experiment: does the micro-adjustment help?"


def stamp(now: float | None = None) -> str:
    """A run's timestamp (UTC, to the second): experiment names are never reused."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))


class DemoError(Exception):
    """The demo refuses to run (said in one line, exit 2)."""


@dataclass(frozen=True)
class Namespace:
    """Where one run of the demo writes, and nowhere else.

    Users `demo-<run>-<n>`, new on every run: none carries weights (or an experiment arm)
    learned in an earlier run, and a simulated clock never runs behind the events an earlier
    run left. Items `demo-item-<i>`: the same features on every run (the seed's), so a rerun
    rewrites them with what they already hold and no real item is touched. `segment`: every
    demo user's (a `segment` event before its first action): its own segment model and
    statistics, so that the demo never trains the `default` one that real users are ranked
    by; "default" only in the demo's own store, which holds nothing else."""

    run: str
    segment: str

    @property
    def user_prefix(self) -> str:
        return f"demo-{self.run}-"

    def users(self, count: int) -> list[str]:
        return [f"{self.user_prefix}{u}" for u in range(count)]

    @staticmethod
    def items(count: int = ITEMS) -> list[str]:
        return [f"demo-item-{i}" for i in range(count)]


def namespace(run: str | None = None, *, own_store: bool = False) -> Namespace:
    """The namespace of a run (`run`: default, the time): segment `demo-<run>` on a service
    that may hold real users, `default` in the demo's own new store."""
    run = run or stamp()
    return Namespace(run, "default" if own_store else f"demo-{run}")


class EventClock:
    """The event time `t` of each simulated user's next action.

    `pace` None (the default): the wall clock, as a real client sends; the demo sleeps
    HUMAN_PAUSE between rounds. Otherwise a simulated clock per user that advances by
    human-like, irregular gaps (ACTION_GAP between actions, PAGE_GAP between pages), while
    the demo sleeps only `pace` seconds between rounds.

    Data hygiene learns by event time, not wall time, but it aligns each event with the
    broker's receive time r (actors/hygiene.py `Hygiene.align`): an event after r is moved
    to r, and a clock offset r - t between `skew_tolerance` and `max_skew` is corrected as
    skew (by a low order statistic of the recent offsets). A simulated clock that ran ahead
    of the wall clock, or that ran faster than it from up to `max_skew` behind, would so be
    pulled back to the wall clock, where a fast run is machine-paced and marked a bot. So
    the simulated clock starts more than `max_skew` behind the wall clock, and stays there
    for the whole run: hygiene takes such an offset for delayed delivery and trusts the
    event's own time. The demo's events are then dated a day or so in the past; exposures
    (`rank(..., t=)`) are dated the same way. That is safe because every run has users of
    its own (`Namespace`): on a service where these users acted at the wall clock before,
    its events would all be older than their history.
    """

    def __init__(self, users: list[str], pace: float | None, rounds: int, seed: int,
                 max_skew: float = SegmentConfig().max_skew) -> None:
        self.pace = pace
        self._rng = np.random.default_rng(seed + 1)  # not the simulation's own stream
        self._t: dict[str, float] = {}
        if pace is not None:
            longest = (rounds + 1) * (5 * ACTION_GAP[1] + PAGE_GAP[1])  # the run, at most
            start = time.time() - max_skew - longest - 3600.0
            self._t = {u: start + self._rng.uniform(0, PAGE_GAP[1]) for u in users}

    @property
    def simulated(self) -> bool:
        return self.pace is not None

    def now(self, user: str) -> float:
        return self._t[user] if self.pace is not None else time.time()

    def action(self, user: str) -> float:
        """The time of the user's next action on the page it looks at."""
        if self.pace is not None:
            self._t[user] += self._rng.uniform(*ACTION_GAP)
        return self.now(user)

    async def between_rounds(self, rng: np.random.Generator) -> None:
        if self.pace is None:
            # a human pace, irregular: data hygiene marks machine-paced clicking as a bot
            await asyncio.sleep(rng.uniform(*HUMAN_PAUSE))
            return
        for user in self._t:
            self._t[user] += self._rng.uniform(*PAGE_GAP)
        await asyncio.sleep(self.pace)


@dataclass
class ArmTrace:
    """One arm as the demo saw it, round by round."""

    users: set[str] = field(default_factory=set)
    agreement: list[float] = field(default_factory=list)  # mean over the arm's users
    ctr: list[float] = field(default_factory=list)  # clicked exposures / exposures so far
    exposures: int = 0  # logged rankings so far
    clicked: int = 0  # of which the user clicked at least one item


@dataclass
class DemoResult:
    means: list[float]  # mean agreement over all users, per round
    experiment: str | None = None
    arms: dict[str, ArmTrace] = field(default_factory=dict)
    arm_of: dict[str, str] = field(default_factory=dict)  # user -> arm
    rankings: list[Ranking] = field(default_factory=list)  # every ranking served
    settled: bool = True  # every user's log held all its events at the end
    report: dict | None = None  # the experiment's report (the embedded path)
    history: dict[str, list[float]] = field(default_factory=dict)  # user -> agreement/round
    ns: Namespace | None = None  # where the run wrote

    def improved(self) -> int:
        """Users whose agreement in the last round is above their first round's."""
        return sum(v[-1] > v[0] for v in self.history.values() if v)


def _spark(values: list[float], lo: float = -1.0, hi: float = 1.0) -> str:
    return "".join(BARS[min(7, max(0, int((v - lo) / (hi - lo) * 8)))] for v in values[-30:])


def banner(ns: Namespace, *, url: str, prefix: str, users: int, rounds: int,
           store: str | None = None) -> str:
    """Where the run writes, said before it writes anything. `store`: the path of the
    demo's own store; None: a running service's, which the demo cannot name."""
    names, items = ns.users(users), ns.items()
    if store is None:
        where = f"the service at {url} (subjects {prefix}.*), into that service's store"
        segment = (f"{ns.segment}: this run's own segment model; the `default` segment "
                   "model and every other user are left alone")
        rerun = "new users and a new segment"
    else:
        where = f"its own service at {url}, into its own new store {store}"
        segment = f"{ns.segment} (the store holds nothing but this demo)"
        rerun = "a new service and store"
    return "\n".join([
        f"microtune demo: {users} simulated users, {rounds} rounds, against {where}",
        f"  users    {_span(names)}  (prefix {ns.user_prefix}, new for this run)",
        f"  segment  {segment}",
        f"  items    {_span(items)} in the catalog ({len(items)} items, the same features "
        "on every run; no other item is written)",
        f"  a rerun starts clean ({rerun}); this run's users stay in the store"])


def _span(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]} … {names[-1]}"


def _spread(values: list[float]) -> tuple[float, float, float, float, float, float]:
    """Mean, min, lower quartile, median, upper quartile, max."""
    lo, q1, med, q3, hi = (float(q) for q in np.quantile(values, [0, 0.25, 0.5, 0.75, 1]))
    return float(np.mean(values)), lo, q1, med, q3, hi


def users_table(result: DemoResult, round_no: int, rounds: int,
                rows: int | None = None) -> Table:
    """One row per user (the first `rows` of them; None: all)."""
    title = f"microtune demo: round {round_no}/{rounds}, agreement per user"
    if result.experiment:
        title = f"experiment {result.experiment}: round {round_no}/{rounds}, agreement per user"
    tab = Table(title=title, min_width=len(title))  # the title on one line
    tab.add_column("user")
    if result.experiment:
        tab.add_column("arm")
    tab.add_column("first", justify="right")
    tab.add_column("now", justify="right")
    tab.add_column("trend")
    shown = [(user, values) for user, values in result.history.items() if values]
    for user, values in shown[:rows]:
        arm = (result.arm_of.get(user, "-"),) if result.experiment else ()
        tab.add_row(user, *arm, f"{values[0]:+.2f}", f"{values[-1]:+.2f}", _spark(values))
    if rows is not None and len(shown) > rows:
        tab.caption = f"{len(shown) - rows} more users not shown; all users below"
    return tab


def summary_table(result: DemoResult) -> Table:
    """All users: the spread of their agreement in the first round and now, and how many
    improved."""
    values = [v for v in result.history.values() if v]
    tab = Table(title=f"all {len(values)} users: agreement")
    for column in ("round", "mean", "min", "25%", "median", "75%", "max"):
        tab.add_column(column, justify="left" if column == "round" else "right")
    last = len(values[0])
    rows = (("1 (first)", 0), (f"{last} (now)", -1)) if last > 1 else (("1 (first, now)", 0),)
    for label, at in rows:
        tab.add_row(label, *(f"{v:+.2f}" for v in _spread([v[at] for v in values])))
    if last > 1:
        tab.caption = f"improved since round 1 (now above first): {result.improved()} of " \
                      f"{len(values)} users"
    return tab


def view(result: DemoResult, round_no: int, rounds: int, rows: int | None = None, *,
         define: bool = True) -> Group:
    """What the demo shows: the definition of agreement (unless `define` is false), the
    users, all users' summary and, with an experiment, the arms."""
    parts: list[RenderableType] = [Text(AGREEMENT, style="dim")] if define else []
    parts.append(users_table(result, round_no, rounds, rows))
    if any(result.history.values()):
        parts.append(summary_table(result))
    if result.experiment:
        parts.append(arms_table(result))
    return Group(*parts)


def round_line(result: DemoResult, round_no: int, rounds: int) -> str:
    """A round in one plain line (output that is not a terminal)."""
    now = [v[-1] for v in result.history.values() if v]
    mean, lo, q1, med, q3, hi = _spread(now)
    line = (f"round {round_no}/{rounds}: agreement of all {len(now)} users: mean {mean:+.2f}, "
            f"quartiles {q1:+.2f} / {med:+.2f} / {q3:+.2f}, min {lo:+.2f}, max {hi:+.2f}")
    if round_no > 1:
        line += f"; improved since round 1: {result.improved()} of {len(now)}"
    for arm, trace in result.arms.items():
        if trace.agreement:
            ctr = f", CTR {trace.ctr[-1]:.1%}" if trace.ctr else ""
            line += f"; {arm}: mean {trace.agreement[-1]:+.2f}{ctr}"
    return line


async def run_demo(url: str, *, users: int, rounds: int, dim: int, prefix: str,
                   console: Console, experiment: str | None = None,
                   pace: float | None = None, ns: Namespace | None = None,
                   store: str | None = None, seed: int = 7) -> DemoResult:
    """Run the simulated users against the service at `url`. `experiment`: the name of a
    running experiment (started by the caller): every ranking is logged, clicks name their
    exposure, and the view follows the arms. `pace`: see `EventClock`. `ns`: where the run
    writes (default: a new run in a segment of its own). `store`: the path of the demo's own
    store, for the banner. Raises `DemoError` if the run's users already have events."""
    import nats

    from adapters.auth import client_options

    ns = ns or namespace()
    rng = np.random.default_rng(seed)
    items = {name: rng.normal(size=dim) for name in ns.items()}
    names = list(items)
    tastes = {user: rng.normal(size=dim) * 1.5 for user in ns.users(users)}
    result = DemoResult([], ns=ns, experiment=experiment, history={u: [] for u in tastes})
    if experiment:
        result.arms = {arm: ArmTrace() for arm, _spec in ARMS}
    clock = EventClock(list(tastes), pace, rounds, seed)
    # read your own writes (the seq each user's log reaches with what it sent): not on the
    # default run, which stays as it always was
    expect: dict[str, int] | None = {} if experiment or pace is not None else None
    console.print(banner(ns, url=url, prefix=prefix, users=users, rounds=rounds, store=store),
                  highlight=False, soft_wrap=True)
    nc = await nats.connect(url, **client_options())  # MICROTUNE_NATS_USER/PASSWORD
    try:
        js = nc.jetstream()
        probe = [(names[0], items[names[0]])]  # features given: no wait for the catalog
        await _check_clean(nc, next(iter(tastes)), probe, prefix, dim)
        await upsert_items(js, items, prefix=prefix)
        await asyncio.sleep(0.3)
        if ns.segment != "default":
            # each user joins the run's segment before anything else: its events then train
            # that segment's model, and its first query already ranks (and enrols) there
            for user in tastes:
                await track(js, user, prefix=prefix, id=f"demo-segment-{ns.run}",
                            t=clock.now(user), kind="segment", segment=ns.segment)
            for user in tastes:
                await rank(nc, user, probe, prefix=prefix, min_seq=1, timeout=5.0)
            if expect is not None:
                expect.update(dict.fromkeys(tastes, 1))
        await _rounds(nc, js, result, tastes=tastes, items=items, rounds=rounds,
                      prefix=prefix, console=console, clock=clock, expect=expect, rng=rng)
        if expect is not None:  # wait until every user's log holds what it sent
            result.settled = await _settle(nc, expect, names[0], prefix)
    finally:
        await nc.close()
    return result


async def _check_clean(nc, user: str, probe: list[tuple[str, np.ndarray]], prefix: str,
                       dim: int) -> None:
    """Refuse a run whose users already have events (two runs in the same second), and say
    so in one line when the service refuses the demo's queries (a wrong --dim)."""
    try:
        first = await rank(nc, user, probe, prefix=prefix)
    except Rejected as exc:
        hint = f" (--dim {dim}: is it the service's?)" if exc.reason == Reason.DIMENSION else ""
        raise DemoError(f"the service refused the demo's first query: {exc}{hint}") from exc
    if first.seq > 0:
        raise DemoError(f"user {user} already has {first.seq} events in this store: another "
                        "run in the same second? Run the demo again")


async def _rounds(nc, js, result: DemoResult, *, tastes: dict[str, np.ndarray],
                  items: dict[str, np.ndarray], rounds: int, prefix: str, console: Console,
                  clock: EventClock, expect: dict[str, int] | None,
                  rng: np.random.Generator) -> None:
    """The rounds: rank, see, click, track; the live view on a terminal, else a line each."""
    experiment, history, names = result.experiment, result.history, list(items)
    # a live view needs a terminal; piped or redirected, Live would print only its last frame
    interactive = console.is_terminal and not console.is_dumb_terminal
    rows = max(5, console.size.height - (30 if experiment else 20)) if interactive else None
    if not interactive:  # plain lines, whole (soft_wrap: rich would break them at 80)
        console.print(AGREEMENT, highlight=False, soft_wrap=True)
    # with an experiment, users click only what they clearly like: otherwise some item of the
    # top five is clicked nearly always, whatever the ranking, and click-through cannot
    # tell the arms apart (measured: 96-99% in both)
    click_bar = 6.0 if experiment else 0.0
    n = 0
    live_view = Live(view(result, 0, rounds, rows), console=console, refresh_per_second=4) \
        if interactive else contextlib.nullcontext()
    with live_view as live:
        for round_no in range(1, rounds + 1):
            scores = []
            round_scores: dict[str, list[float]] = {}
            for user, taste in tastes.items():
                slate = list(rng.choice(names, size=SLATE, replace=False))
                ranking = await _rank(nc, user, slate, prefix=prefix, log=bool(experiment),
                                      t=clock.now(user) if clock.simulated else None,
                                      min_seq=None if expect is None else expect.get(user))
                result.rankings.append(ranking)
                served = np.array([ranking.weights[ranking.items.index(i)] for i in slate])
                truth = np.array([items[i] @ taste for i in slate])
                # round 1: a new user's weights are all equal; a tiny noise breaks the ties
                agreement = spearman(served, truth) if round_no > 1 else spearman(
                    served + rng.normal(size=len(served)) * 1e-9, truth)
                history[user].append(agreement)
                scores.append(agreement)
                any_click = False
                for item in ranking.items[:SEEN]:  # the user sees the top five
                    n += 1
                    clicked = bool(rng.random() < 1 / (1 + np.exp(click_bar - items[item] @ taste)))
                    any_click = any_click or clicked
                    extra = {"rid": ranking.rid} if clicked and ranking.rid else {}
                    await track(js, user, prefix=prefix, id=f"demo-{n}-{time.time_ns()}",
                                t=clock.action(user), kind="click" if clicked else "impression",
                                item=item, **extra)
                if expect is not None:  # the exposure, then the five events
                    expect[user] = ranking.seq + (ranking.rid is not None) + SEEN
                if experiment:
                    arm = ranking.arm.name if ranking.arm is not None else "not enrolled"
                    result.arm_of[user] = arm
                    trace = result.arms.setdefault(arm, ArmTrace())
                    trace.users.add(user)
                    round_scores.setdefault(arm, []).append(agreement)
                    if ranking.rid is not None:
                        trace.exposures += 1
                        trace.clicked += int(any_click)
            result.means.append(float(np.mean(scores)))
            for arm, trace in result.arms.items():
                if arm in round_scores:
                    trace.agreement.append(float(np.mean(round_scores[arm])))
                if trace.exposures:
                    trace.ctr.append(trace.clicked / trace.exposures)
            if live is not None:
                live.update(view(result, round_no, rounds, rows))
            else:
                console.print(round_line(result, round_no, rounds), highlight=False,
                              soft_wrap=True)
            if round_no < rounds or expect is None:
                await clock.between_rounds(rng)
    if not interactive:  # the final tables, every user (agreement is defined above)
        console.print(view(result, rounds, rounds, define=False))


async def _rank(nc, user: str, slate: list[str], *, prefix: str, log: bool,
                t: float | None, min_seq: int | None) -> Ranking:
    try:
        return await rank(nc, user, slate, prefix=prefix, log=log, t=t, min_seq=min_seq)
    except Rejected as exc:  # the user's events are slow to arrive: rank from what is there
        if exc.reason != Reason.TIMEOUT or min_seq is None:
            raise
        return await rank(nc, user, slate, prefix=prefix, log=log, t=t)


async def _settle(nc, expect: dict[str, int], item: str, prefix: str) -> bool:
    """Wait (bounded) until each user's log reaches the seq its events take it to."""
    settled = True
    for user, seq in expect.items():
        try:
            await rank(nc, user, [item], prefix=prefix, min_seq=seq, timeout=5.0)
        except Rejected:
            settled = False
    return settled


def arms_table(result: DemoResult) -> Table:
    """Per arm: its users, the mean agreement and the click-through so far, round by round."""
    tab = Table(title="the arms: mean agreement, and click-through per exposure so far")
    for column, justify in (("arm", "left"), ("users", "right"), ("agreement first", "right"),
                            ("now", "right"), ("trend", "left"), ("CTR so far", "right"),
                            ("trend", "left"), ("exposures", "right")):
        tab.add_column(column, justify=justify)
    for arm, trace in result.arms.items():
        if not trace.users and arm not in ARM_TEXT:
            continue
        agree = trace.agreement
        tab.add_row(arm, str(len(trace.users)),
                    f"{agree[0]:+.2f}" if agree else "-", f"{agree[-1]:+.2f}" if agree else "-",
                    _spark(agree), f"{trace.ctr[-1]:.1%}" if trace.ctr else "-",
                    _spark(trace.ctr, 0.0, 1.0), f"{trace.exposures:,}")
    tab.caption = "; ".join(f"{arm}: {text}" for arm, text in ARM_TEXT.items())
    return tab


# ---------------------------------------------------------------- the experiment


async def run_experiment(system, url: str, *, users: int, rounds: int, dim: int,
                         prefix: str, console: Console, pace: float | None = None,
                         run: str | None = None, ns: Namespace | None = None,
                         store: str | None = None, seed: int = 7) -> DemoResult:
    """`--experiment` with the service of this process (`system` is its `Microtune`): start
    the experiment `demo-adjustment-<run>` on the run's segment (`ns`; default: the run's
    namespace in the demo's own store, `run` default the time), run the demo with the users
    `demo-<run>-<n>`, stop it once every event is in the log, print the report."""
    from actors.experiments import analysis
    from adapters.experiment_report import print_report

    ns = ns or namespace(run, own_store=True)
    name = f"demo-adjustment-{ns.run}"
    await asyncio.to_thread(system.start_experiment, name, ARMS, segment=ns.segment,
                            by="microtune demo", why=WHY)
    try:
        result = await run_demo(url, users=users, rounds=rounds, dim=dim, prefix=prefix,
                                console=console, experiment=name, pace=pace, ns=ns,
                                store=store, seed=seed)
    finally:
        experiment = await asyncio.to_thread(system.stop_experiment, name, by="microtune demo",
                                             why="the demo is over")
    users_sums = await asyncio.to_thread(analysis.collect, system.recorder, experiment,
                                         system.configs)
    result.report = analysis.report(experiment, users_sums, generated_at=time.time())
    print_summary(result, console)
    console.print()
    print_report(result.report, console)
    return result


async def run_experiment_remote(url: str, *, users: int, rounds: int, dim: int, prefix: str,
                                console: Console, pace: float | None = None,
                                ns: Namespace | None = None, seed: int = 7) -> DemoResult:
    """`--experiment` against a running service: start and stop it through
    `<prefix>.admin.experiment` (needs the admin token, MICROTUNE_ADMIN_TOKEN). It enrols
    only the run's segment: the service's real users are never assigned an arm."""
    from adapters.ops import _admin

    ns = ns or namespace()
    name = f"demo-adjustment-{ns.run}"
    await _admin(url, prefix, "experiment", {"op": "start", "name": name,
                                             "arms": [list(a) for a in ARMS],
                                             "segment": ns.segment,
                                             "by": "microtune demo", "why": WHY})
    try:
        result = await run_demo(url, users=users, rounds=rounds, dim=dim, prefix=prefix,
                                console=console, experiment=name, pace=pace, ns=ns,
                                seed=seed)
    finally:  # an experiment must not outlive the demo
        await _admin(url, prefix, "experiment", {"op": "stop", "name": name,
                                                 "by": "microtune demo",
                                                 "why": "the demo is over"})
    print_summary(result, console)
    console.print(f"experiment {name} stopped. The full report (read from the service's "
                  f"store):\n  microtune experiment report {name} --store <store>\n"
                  "(`microtune serve` keeps its store in microtune-data/microtune.db)")
    return result


def print_summary(result: DemoResult, console: Console) -> None:
    """One line per arm: what the live view ended with."""
    console.print()
    for arm, trace in result.arms.items():
        if not trace.users:
            continue
        agree, ctr = trace.agreement, trace.ctr
        console.print(
            f"[bold]{arm}[/bold] ({ARM_TEXT.get(arm, 'not in the experiment')}): "
            f"{len(trace.users)} users; mean agreement "
            f"{agree[0]:+.2f} in the first round, {agree[-1]:+.2f} in the last; "
            f"click-through {ctr[-1] if ctr else float('nan'):.1%} of "
            f"{trace.exposures:,} exposures", highlight=False)
    if not result.settled:
        console.print("[yellow]some users' last events were not in the log yet; the report "
                      "may miss them[/yellow]")


# ---------------------------------------------------------------- command line


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="microtune demo", description=__doc__.splitlines()[0])
    parser.add_argument("--nats-url", help="a running `microtune serve`: the demo writes into "
                                           "its store, in a segment of its own (see the "
                                           "banner); default: start a service of its own")
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--dim", type=int, default=16, help="the service's feature dimension")
    parser.add_argument("--prefix", default="microtune")
    parser.add_argument("--experiment", action="store_true",
                        help="run an experiment: half the users without micro-adjustment "
                             "(control) against the current config (adjusted); with "
                             "--nats-url it needs the admin token (MICROTUNE_ADMIN_TOKEN)")
    parser.add_argument("--pace", type=float, default=None, metavar="SECONDS",
                        help="pause between rounds (default: 0.8-2.0 s at random, with the "
                             "wall clock as event time); given, the events carry a simulated "
                             "human-paced clock instead, so that a fast run still learns")
    parser.add_argument("--explore", choices=("epsilon", "thompson"),
                        help="the demo's own service explores (epsilon 0.2, or Thompson "
                             "sampling) and logs every ranking with its propensities, for "
                             "`microtune evaluate` and `microtune calibrate` on its store")
    args = parser.parse_args(argv)
    if args.explore and args.nats_url:
        parser.error("--explore configures the demo's own service; a running one explores "
                     "as its [tuning] table says")
    if args.pace is not None and args.pace < 0:
        parser.error("--pace must be >= 0")
    if args.users < 1 or args.rounds < 1:
        parser.error("--users and --rounds must be at least 1")
    console = Console()
    try:
        return _run(args, console)
    except KeyboardInterrupt:  # Ctrl-C ends the demo with a line, not a traceback
        console.print("microtune demo: interrupted")
        return 130
    except (DemoError, Rejected) as exc:  # refused: one line, not a traceback
        console.print(f"[red]microtune demo:[/red] {exc}", highlight=False)
        return 2


def _run(args: argparse.Namespace, console: Console) -> int:
    if args.nats_url:
        if args.experiment:
            from adapters.ops import OperatorError

            try:
                result = asyncio.run(run_experiment_remote(
                    args.nats_url, users=args.users, rounds=args.rounds, dim=args.dim,
                    prefix=args.prefix, console=console, pace=args.pace))
            except OperatorError as exc:
                console.print(f"[red]microtune demo:[/red] {exc}")
                return 2
        else:
            result = asyncio.run(run_demo(args.nats_url, users=args.users, rounds=args.rounds,
                                          dim=args.dim, prefix=args.prefix, console=console,
                                          pace=args.pace))
    else:
        result = asyncio.run(_with_own_service(args, console))
    means = result.means
    console.print(f"mean agreement: first round {means[0]:+.2f}, last round {means[-1]:+.2f}; "
                  f"improved since round 1: {result.improved()} of {len(result.history)} "
                  "users", highlight=False, soft_wrap=True)
    return 0


async def _with_own_service(args: argparse.Namespace, console: Console) -> DemoResult:
    import logging

    import structlog

    from actors.system import Microtune
    from adapters.embedded import EmbeddedNats
    from adapters.nats_service import Service, ServiceConfig
    from events.config import SegmentConfig, TuningConfig

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    tmp = Path(tempfile.mkdtemp(prefix="microtune-demo-"))
    server = EmbeddedNats(tmp / "nats").start()
    segment = SegmentConfig() if args.explore is None else SegmentConfig(
        explore=args.explore, epsilon=0.2)
    system = Microtune.open(tmp / "demo.db", TuningConfig(version=1, dim=args.dim,
                                                          segments={"default": segment}))
    service = Service(system, ServiceConfig(prefix=args.prefix))
    await service.start(server.url)
    run: Callable[..., Awaitable[Any]] = run_demo
    # a new store of the demo's own: its users stay in segment default, so `microtune
    # calibrate` (segment default) and `evaluate` read them without naming a segment
    kw: dict[str, Any] = {"pace": args.pace, "ns": namespace(own_store=True),
                          "store": str(tmp / "demo.db")}
    if args.experiment:
        run, kw = run_experiment, {**kw, "system": system}
    try:
        result = await run(url=server.url, users=args.users, rounds=args.rounds,
                           dim=args.dim, prefix=args.prefix, console=console, **kw)
    finally:
        await service.stop()
        server.stop()
    if result.experiment:
        console.print(f"the demo's store stays in {tmp}: microtune experiment report "
                      f"{result.experiment} --store {tmp / 'demo.db'}", highlight=False)
    if args.explore:
        console.print(f"the demo's store stays in {tmp}: microtune evaluate --store "
                      f"{tmp / 'demo.db'} --config B.toml; microtune calibrate --store "
                      f"{tmp / 'demo.db'} --grid grid.toml (README \"Tuning from evidence\")",
                      highlight=False)
    return result
