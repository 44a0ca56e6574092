"""`microtune demo`: simulated users with hidden preferences against a running service.

Each round, every simulated user asks for weights over a random slate of items, "sees" the
top items, clicks according to its hidden preference, and the events go back to microtune.
The live table shows how well each user's served ranking agrees with its true taste
(Spearman correlation on the slate) as the weights adjust.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.live import Live
from rich.table import Table

from adapters.client import rank, track, upsert_items
from adapters.population import spearman


async def run_demo(url: str, *, users: int, rounds: int, dim: int, prefix: str,
                   console: Console) -> list[float]:
    import nats

    from adapters.auth import client_options

    rng = np.random.default_rng(7)
    nc = await nats.connect(url, **client_options())  # MICROTUNE_NATS_USER/PASSWORD
    js = nc.jetstream()
    items = {f"item{i}": rng.normal(size=dim) for i in range(200)}
    await upsert_items(js, items, prefix=prefix)
    await asyncio.sleep(0.3)
    names = list(items)
    tastes = {f"demo-user-{u}": rng.normal(size=dim) * 1.5 for u in range(users)}
    history: dict[str, list[float]] = {u: [] for u in tastes}
    mean_by_round: list[float] = []
    n = 0

    def table(round_no: int) -> Table:
        tab = Table(title=f"microtune demo: round {round_no}/{rounds} "
                          "(agreement of served ranking with true taste)")
        tab.add_column("user")
        tab.add_column("first", justify="right")
        tab.add_column("now", justify="right")
        tab.add_column("trend")
        for user, values in list(history.items())[:12]:
            if values:
                bars = "".join("▁▂▃▄▅▆▇█"[min(7, max(0, int((v + 1) * 4)))] for v in values[-30:])
                tab.add_row(user, f"{values[0]:+.2f}", f"{values[-1]:+.2f}", bars)
        if mean_by_round:
            tab.caption = (f"mean over {users} users: first round {mean_by_round[0]:+.2f}, "
                           f"now {mean_by_round[-1]:+.2f}")
        return tab

    with Live(table(0), console=console, refresh_per_second=4) as live:
        for round_no in range(1, rounds + 1):
            scores = []
            for user, taste in tastes.items():
                slate = list(rng.choice(names, size=20, replace=False))
                ranking = await rank(nc, user, slate, prefix=prefix)
                served = np.array([ranking.weights[ranking.items.index(i)] for i in slate])
                truth = np.array([items[i] @ taste for i in slate])
                agreement = spearman(served, truth) if round_no > 1 else spearman(
                    served + rng.normal(size=len(served)) * 1e-9, truth)
                history[user].append(agreement)
                scores.append(agreement)
                for item in ranking.items[:5]:  # the user sees the top five
                    n += 1
                    clicked = rng.random() < 1 / (1 + np.exp(-(items[item] @ taste)))
                    await track(js, user, prefix=prefix, id=f"demo-{n}-{time.time_ns()}",
                                t=time.time(), kind="click" if clicked else "impression",
                                item=item)
            mean_by_round.append(float(np.mean(scores)))
            live.update(table(round_no))
            # a human pace, irregular: data hygiene marks machine-paced clicking as a bot
            await asyncio.sleep(rng.uniform(0.8, 2.0))
    await nc.close()
    return mean_by_round


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="microtune demo", description=__doc__.splitlines()[0])
    parser.add_argument("--nats-url", help="a running `microtune serve`; default: start one")
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--dim", type=int, default=16, help="the service's feature dimension")
    parser.add_argument("--prefix", default="microtune")
    args = parser.parse_args(argv)
    console = Console()
    if args.nats_url:
        means = asyncio.run(run_demo(args.nats_url, users=args.users, rounds=args.rounds,
                                     dim=args.dim, prefix=args.prefix, console=console))
    else:
        means = asyncio.run(_with_own_service(args, console))
    console.print(f"mean agreement: first round {means[0]:+.2f}, last round {means[-1]:+.2f}")
    return 0


async def _with_own_service(args: argparse.Namespace, console: Console) -> list[float]:
    import logging

    import structlog

    from actors.system import Microtune
    from adapters.embedded import EmbeddedNats
    from adapters.nats_service import Service, ServiceConfig
    from events.config import TuningConfig

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    tmp = Path(tempfile.mkdtemp(prefix="microtune-demo-"))
    server = EmbeddedNats(tmp / "nats").start()
    system = Microtune.open(tmp / "demo.db", TuningConfig(version=1, dim=args.dim))
    service = Service(system, ServiceConfig(prefix=args.prefix))
    await service.start(server.url)
    try:
        return await run_demo(server.url, users=args.users, rounds=args.rounds, dim=args.dim,
                              prefix=args.prefix, console=console)
    finally:
        await service.stop()
        server.stop()
