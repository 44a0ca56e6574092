"""`microtune demo`: simulated users with hidden preferences against a running service.

Each round, every simulated user asks for weights over a random slate of items, "sees" the
top items, clicks according to its hidden preference, and the events go back to microtune.
The live table shows how well each user's served ranking agrees with its true taste
(Spearman correlation on the slate) as the weights adjust.

With `--experiment` the demo runs an experiment `demo-adjustment-<timestamp>`: half the users
(by user) rank without micro-adjustment (arm "control": segment model and prior only), half
by the current config (arm "adjusted"). Every ranking is logged as an exposure and every
click names the exposure it answers (`rid`); the live view adds, per arm, the mean agreement
and the click-through per exposure so far, round by round. At the end the experiment stops;
with the demo's own service the report is printed (`microtune experiment report` prints the
same from any store).

Pace: data hygiene marks machine-paced clicking as a bot, so the users act at a human pace.
By default the demo pauses 0.8-2.0 s between rounds and the events carry the wall clock, as
a real client's do. `--pace SECONDS` pauses that long instead (0: not at all) and the events
carry a simulated clock that advances by human gaps (`EventClock`), so that a fast run still
learns what a slow one would.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from adapters.client import rank, track, upsert_items
from adapters.population import spearman
from events.config import SegmentConfig
from events.errors import Reason, Rejected
from events.types import Ranking

BARS = "▁▂▃▄▅▆▇█"
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


def user_ids(users: int, run: str | None = None) -> list[str]:
    """`demo-user-<n>`, as the demo always had; with a run tag, `demo-<run>-<n>`: users of
    their own, so that an experiment's users start with no history (none carries weights
    learned in an earlier run into an arm), and a simulated clock never runs behind the
    events an earlier run left on the same service."""
    return [f"demo-user-{u}" if run is None else f"demo-{run}-{u}" for u in range(users)]


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
    (`rank(..., t=)`) are dated the same way. Such a run starts users of its own
    (`user_ids`): on a service where these users acted at the wall clock before, its events
    would all be older than their history.
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


def _spark(values: list[float], lo: float = -1.0, hi: float = 1.0) -> str:
    return "".join(BARS[min(7, max(0, int((v - lo) / (hi - lo) * 8)))] for v in values[-30:])


async def run_demo(url: str, *, users: int, rounds: int, dim: int, prefix: str,
                   console: Console, experiment: str | None = None,
                   pace: float | None = None, run: str | None = None,
                   seed: int = 7) -> DemoResult:
    """Run the simulated users against the service at `url`. `experiment`: the name of a
    running experiment (started by the caller): every ranking is logged, clicks name their
    exposure, and the view follows the arms. `pace`: see `EventClock`. `run`: see
    `user_ids`."""
    import nats

    from adapters.auth import client_options

    rng = np.random.default_rng(seed)
    nc = await nats.connect(url, **client_options())  # MICROTUNE_NATS_USER/PASSWORD
    js = nc.jetstream()
    items = {f"item{i}": rng.normal(size=dim) for i in range(200)}
    await upsert_items(js, items, prefix=prefix)
    await asyncio.sleep(0.3)
    names = list(items)
    tastes = {user: rng.normal(size=dim) * 1.5 for user in user_ids(users, run)}
    history: dict[str, list[float]] = {u: [] for u in tastes}
    result = DemoResult([], experiment)
    if experiment:
        result.arms = {arm: ArmTrace() for arm, _spec in ARMS}
    clock = EventClock(list(tastes), pace, rounds, seed)
    # read your own writes (the seq each user's log reaches with what it sent): not on the
    # default run, which stays as it always was
    expect: dict[str, int] | None = {} if experiment or pace is not None else None
    n = 0

    def table(round_no: int) -> Table:
        title = f"microtune demo: round {round_no}/{rounds} " \
                "(agreement of served ranking with true taste)"
        if experiment:
            title = f"experiment {experiment}: round {round_no}/{rounds}\n" \
                    "(agreement of served ranking with true taste)"
        tab = Table(title=title)
        tab.add_column("user")
        if experiment:
            tab.add_column("arm")
        tab.add_column("first", justify="right")
        tab.add_column("now", justify="right")
        tab.add_column("trend")
        for user, values in list(history.items())[:12]:
            if values:
                arm = (result.arm_of.get(user, "-"),) if experiment else ()
                tab.add_row(user, *arm, f"{values[0]:+.2f}", f"{values[-1]:+.2f}",
                            _spark(values))
        if result.means:
            tab.caption = (f"mean over {users} users: first round {result.means[0]:+.2f}, "
                           f"now {result.means[-1]:+.2f}")
        return tab

    def view(round_no: int) -> Table | Group:
        if not experiment:
            return table(round_no)
        return Group(table(round_no), arms_table(result))

    # with an experiment, users click only what they clearly like: otherwise some item of the
    # top five is clicked nearly always, whatever the ranking, and click-through cannot
    # tell the arms apart (measured: 96-99% in both)
    click_bar = 6.0 if experiment else 0.0
    with Live(view(0), console=console, refresh_per_second=4) as live:
        for round_no in range(1, rounds + 1):
            scores = []
            round_scores: dict[str, list[float]] = {}
            for user, taste in tastes.items():
                slate = list(rng.choice(names, size=20, replace=False))
                ranking = await _rank(nc, user, slate, prefix=prefix, log=bool(experiment),
                                      t=clock.now(user) if clock.simulated else None,
                                      min_seq=None if expect is None else expect.get(user))
                result.rankings.append(ranking)
                served = np.array([ranking.weights[ranking.items.index(i)] for i in slate])
                truth = np.array([items[i] @ taste for i in slate])
                agreement = spearman(served, truth) if round_no > 1 else spearman(
                    served + rng.normal(size=len(served)) * 1e-9, truth)
                history[user].append(agreement)
                scores.append(agreement)
                any_click = False
                for item in ranking.items[:5]:  # the user sees the top five
                    n += 1
                    clicked = bool(rng.random() < 1 / (1 + np.exp(click_bar - items[item] @ taste)))
                    any_click = any_click or clicked
                    extra = {"rid": ranking.rid} if clicked and ranking.rid else {}
                    await track(js, user, prefix=prefix, id=f"demo-{n}-{time.time_ns()}",
                                t=clock.action(user), kind="click" if clicked else "impression",
                                item=item, **extra)
                if expect is not None:  # the exposure, then the five events
                    expect[user] = ranking.seq + (ranking.rid is not None) + 5
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
            live.update(view(round_no))
            if round_no < rounds or expect is None:
                await clock.between_rounds(rng)
    if expect is not None:  # wait until every user's log holds what it sent
        result.settled = await _settle(nc, expect, names[0], prefix)
    await nc.close()
    return result


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
                         run: str | None = None, seed: int = 7) -> DemoResult:
    """`--experiment` with the service of this process (`system` is its `Microtune`): start
    the experiment `demo-adjustment-<run>` (`run`: default, the time), run the demo with the
    users `demo-<run>-<n>`, stop it once every event is in the log, print the report."""
    from actors.experiments import analysis
    from adapters.experiment_report import print_report

    run = run or stamp()
    name = f"demo-adjustment-{run}"
    await asyncio.to_thread(system.start_experiment, name, ARMS, by="microtune demo", why=WHY)
    try:
        result = await run_demo(url, users=users, rounds=rounds, dim=dim, prefix=prefix,
                                console=console, experiment=name, pace=pace, run=run,
                                seed=seed)
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
                                seed: int = 7) -> DemoResult:
    """`--experiment` against a running service: start and stop it through
    `<prefix>.admin.experiment` (needs the admin token, MICROTUNE_ADMIN_TOKEN)."""
    from adapters.ops import _admin

    run = stamp()
    name = f"demo-adjustment-{run}"
    await _admin(url, prefix, "experiment", {"op": "start", "name": name,
                                             "arms": [list(a) for a in ARMS],
                                             "by": "microtune demo", "why": WHY})
    try:
        result = await run_demo(url, users=users, rounds=rounds, dim=dim, prefix=prefix,
                                console=console, experiment=name, pace=pace, run=run,
                                seed=seed)
    finally:  # an experiment on every user must not outlive the demo
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
    parser.add_argument("--nats-url", help="a running `microtune serve`; default: start one")
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
    console = Console()
    try:
        return _run(args, console)
    except KeyboardInterrupt:  # Ctrl-C ends the demo with a line, not a traceback
        console.print("microtune demo: interrupted")
        return 130


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
                                          pace=args.pace,
                                          run=None if args.pace is None else stamp()))
    else:
        result = asyncio.run(_with_own_service(args, console))
    means = result.means
    console.print(f"mean agreement: first round {means[0]:+.2f}, last round {means[-1]:+.2f}")
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
    kw: dict[str, Any] = {"pace": args.pace, "run": None if args.pace is None else stamp()}
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
