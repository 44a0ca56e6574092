"""Learning quality by progressive validation on MovieLens-100k, side by side with peers.

Data: MovieLens-100k as shipped inside the `recbole==1.2.1` wheel (fetched with `pip download
--no-deps` into a cache folder and read straight from the zip; recbole is not installed).
Protocol: every rating in (timestamp, original row order); y = 1 if rating >= 4; item
features = multi-hot genres (+ a bias); for every event predict first, record, then learn.
Figures: AUC and log loss over the whole stream and its last half, AUC over each user's first
ten ratings (cold start), learner events/s.

As a fleet (`microtune(..., workers=W)`): users split among W worker processes as the fleet
splits them (partition_of(user, 16), partition n on worker n % W: adapters/fleet/leases.py),
each worker with segment models of its own that learn from its own users' steps only and
stamp its own users' events; everything else as in one process. `merge_every` simulates
merging the workers' models every K ratings (each worker's learning since the last merge
added onto it, in every worker): a measurement, not something the service does.

microtune goes through its real code path: each rating is an `Event` of kind `feedback`
(y the label), learned by the same `apply` the service runs, predicted with `predict` (the
state a query would see). Peers: Vowpal Wabbit (logistic, user and genre namespaces crossed
with -q), River (a LogisticRegression with Adam per user; one global model with user x genre
crossed features), a global-mean and a per-user-mean baseline.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from actors.item_effects import ItemEffects
from actors.learning import apply, predict, settle_after
from actors.segment_model import ITEMS_SUFFIX, SegmentModels
from actors.segment_quality import auc
from actors.state import UserState, decode_state, encode_state
from events.config import SegmentConfig, TuningConfig
from events.partitions import DEFAULT_PARTITIONS, partition_of
from events.types import Event

WHEEL = "recbole-1.2.1-py3-none-any.whl"
INTER = "recbole/dataset_example/ml-100k/ml-100k.inter"
ITEMS = "recbole/dataset_example/ml-100k/ml-100k.item"
EPS = 1e-7


class Rating(NamedTuple):
    user: str
    item: str
    t: float
    y: float  # 1.0 if the rating is 4 or 5
    x: np.ndarray  # multi-hot genres
    genres: tuple[str, ...]


@dataclass
class Stream:
    ratings: list[Rating]
    genres: list[str]


def fetch_wheel(cache: Path) -> Path:
    """The recbole wheel in `cache` (downloaded once with pip, no dependencies)."""
    path = cache / WHEEL
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "recbole==1.2.1", "-d", str(cache)], check=True)
    return path


def load(inter_text: str, item_text: str, limit: int | None = None) -> Stream:
    """Parse recbole's atomic files (tab-separated, a typed header line)."""
    item_genres: dict[str, tuple[str, ...]] = {}
    for line in item_text.splitlines()[1:]:
        cols = line.split("\t")
        if len(cols) >= 4:
            item_genres[cols[0]] = tuple(cols[3].split())
    genres = sorted({g for gs in item_genres.values() for g in gs})
    index = {g: i for i, g in enumerate(genres)}
    rows = []
    for n, line in enumerate(inter_text.splitlines()[1:]):
        user, item, rating, ts = line.split("\t")[:4]
        rows.append((float(ts), n, user, item, float(rating)))
    rows.sort(key=lambda r: (r[0], r[1]))  # timestamp, then the original row order
    if limit is not None:
        rows = rows[:limit]
    ratings = []
    for ts, _n, user, item, rating in rows:
        gs = item_genres.get(item, ())
        x = np.zeros(len(genres))
        for g in gs:
            x[index[g]] = 1.0
        ratings.append(Rating(user, item, ts, 1.0 if rating >= 4 else 0.0, x, gs))
    return Stream(ratings, genres)


def stretched(stream: Stream, factor: float) -> Stream:
    """The same ratings in the same order, `factor` times as far apart in time: a default
    that depends on the calendar span of a stream learns differently from it."""
    t0 = stream.ratings[0].t if stream.ratings else 0.0
    return Stream([r._replace(t=t0 + (r.t - t0) * factor) for r in stream.ratings],
                  stream.genres)


def load_movielens(cache: Path, limit: int | None = None) -> Stream:
    with zipfile.ZipFile(fetch_wheel(cache)) as z:
        return load(z.read(INTER).decode("latin-1"), z.read(ITEMS).decode("latin-1"), limit)


# ---------------------------------------------------------------- metrics


def auc_difference(a: Result, b: Result, users: list[str], *, resamples: int = 200,
                   seed: int = 0) -> tuple[float, float, float]:
    """AUC(a) - AUC(b) on the same stream, with a 95% interval from a paired bootstrap over
    users (a user's ratings are correlated, so users, not ratings, are resampled)."""
    by_user: dict[str, list[int]] = {}
    for i, user in enumerate(users):
        by_user.setdefault(user, []).append(i)
    groups = [np.array(ix) for ix in by_user.values()]
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(resamples):
        ix = np.concatenate([groups[g] for g in rng.integers(len(groups), size=len(groups))])
        y = a.labels[ix]
        diffs.append(auc(y, a.predictions[ix]) - auc(y, b.predictions[ix]))
    low, high = np.percentile(diffs, (2.5, 97.5))
    return a.figures["auc"] - b.figures["auc"], float(low), float(high)


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, EPS, 1 - EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


@dataclass
class Result:
    learner: str
    config: str
    predictions: np.ndarray
    labels: np.ndarray
    seconds: float
    cold: np.ndarray | None = None  # True where the rating is among its user's first COLD
    figures: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        half = len(self.labels) // 2
        y, p = self.labels, self.predictions
        self.figures = {
            "auc": auc(y, p), "log_loss": log_loss(y, p),
            "auc_first_half": auc(y[:half], p[:half]),
            "log_loss_first_half": log_loss(y[:half], p[:half]),
            "auc_last_half": auc(y[half:], p[half:]),
            "log_loss_last_half": log_loss(y[half:], p[half:]),
            "events_per_s": len(y) / self.seconds if self.seconds else float("inf"),
        }
        if self.cold is not None:  # cold start: how well a learner does for new users
            self.figures["auc_cold"] = auc(y[self.cold], p[self.cold])


COLD = 10  # a user's first ratings, for the cold-start figure


def progressive(stream: Stream, learner: str, config: str,
                step: Callable[[Rating], float]) -> Result:
    """Run predict-then-learn (`step` returns the prediction made before learning)."""
    labels = np.array([r.y for r in stream.ratings])
    seen: dict[str, int] = {}
    cold = np.empty(len(labels), dtype=bool)
    for i, r in enumerate(stream.ratings):
        cold[i] = seen.get(r.user, 0) < COLD
        seen[r.user] = seen.get(r.user, 0) + 1
    start = time.perf_counter()
    preds = np.array([step(r) for r in stream.ratings])
    return Result(learner, config, preds, labels, time.perf_counter() - start, cold)


# ---------------------------------------------------------------- learners


def worker_of(user: str, workers: int) -> int:
    """The worker (0..workers-1) that learns from `user` in a fleet of `workers`: the one
    holding its partition (partition n belongs to worker n % workers)."""
    return partition_of(user, DEFAULT_PARTITIONS) % workers


def microtune(stream: Stream, config: TuningConfig | None = None, label: str = "defaults",
              workers: int = 1, models: list[SegmentModels] | None = None,
              merge_every: int = 0) -> Result:
    """microtune's real path, as a user actor runs it: the segment model's score stamped on
    each `feedback` event, `apply` with a trace, the segment model learning from that trace;
    `predict` (what a query sees: the settled state, kept up by `settle_after` as the user
    actor's view is) before each.

    `workers`: as a fleet of that many workers, each user stamped and learned with the
    segment models of its worker (`worker_of`); `models`: those models (one per worker, to
    look at after the run; fresh ones by default). `merge_every`: every that many ratings,
    all workers' models merged (`merge_models`); 0: never."""
    config = config or TuningConfig(version=1, dim=len(stream.genres))
    if models is None:
        models = [SegmentModels() for _ in range(workers)]
    if workers < 1 or len(models) != workers:
        raise ValueError("one SegmentModels per worker, at least one worker")
    states: dict[str, UserState] = {}
    settled: dict[str, UserState] = {}  # what a query sees, kept as a user actor's view does
    owner: dict[str, SegmentModels] = {}
    merged: dict[str, bytes] = {}  # the models at the last merge
    steps: list = []
    n = 0

    def step(r: Rating) -> float:
        nonlocal n, merged
        n += 1
        state = states.get(r.user) or UserState(r.user)
        view = settled.get(r.user) or state
        segment = state.segment or "default"
        mine = owner.get(r.user)
        if mine is None:
            mine = owner[r.user] = models[worker_of(r.user, workers)]
        base = mine.stamp(segment, r.x, config, r.item)
        p = predict(view, r.x, config, base or 0.0)
        event = Event(id=str(n), user=r.user, t=r.t, kind="feedback", item=r.item, x=r.x,
                      target=r.y, config=config.version, base=base)
        new = states[r.user] = apply(state, event, config, steps)
        settled[r.user] = settle_after(view, state, event, new, config)
        mine.learn(segment, steps, config)
        steps.clear()
        if merge_every and workers > 1 and n % merge_every == 0:
            merged = merge_models(models, merged)
        return p

    if workers > 1:
        label = f"{label}, as {workers} workers" + (
            f", merged every {merge_every:,} ratings" if merge_every else "")
    return progressive(stream, "microtune", label, step)


def merge_models(models: list[SegmentModels], base: dict[str, bytes]) -> dict[str, bytes]:
    """Every worker's learning since `base` (their common checkpoint at the last merge; {}
    before any) added onto it, loaded into every worker; returns the merged checkpoint.
    Weights and Adagrad sums add their changes (what one process would have summed), an
    item's bias and sum likewise, times and step counts as the latest / the total."""
    saved = [m.checkpoint() for m in models]
    out: dict[str, bytes] = {}
    for name in sorted({name for s in saved for name in s}):
        rows = [s[name] for s in saved if name in s]
        if name.endswith(ITEMS_SUFFIX):
            out[name] = _merge_items(rows, base.get(name))
        else:
            out[name] = _merge_weights(rows, base.get(name))
    for m in models:
        m.load(out)
    return out


def _merge_weights(rows: list[bytes], base: bytes | None) -> bytes:
    states = [decode_state(r) for r in rows]
    first = states[0]
    b = decode_state(base) if base is not None else None

    def added(field: str) -> np.ndarray:
        old = getattr(b, field) if b is not None and getattr(b, field).shape[0] else None
        arrays = [getattr(s, field) for s in states if getattr(s, field).shape[0]]
        if not arrays:
            return getattr(first, field)
        start = np.zeros_like(arrays[0]) if old is None else old
        return start + sum(a - start for a in arrays)

    steps0 = b.steps if b is not None else 0
    return encode_state(first._replace(
        w=added("w"), m=added("m"), v=added("v"),
        steps=steps0 + sum(s.steps - steps0 for s in states),
        t_last=max(s.t_last for s in states)))


def _merge_items(rows: list[bytes], base: bytes | None) -> bytes:
    tables = [ItemEffects.decode(r) for r in rows]
    old = ItemEffects.decode(base) if base is not None else ItemEffects()
    out = ItemEffects()
    for item in sorted({i for t in tables for i in t.index}):
        b0, s0 = 0.0, 0.0
        if item in old.index:
            slot = old.index[item]
            b0, s0 = float(old.bias[slot]), float(old.sums[slot])
        bias, sums, t = b0, s0, -math.inf
        for table in tables:
            slot = table.index.get(item)
            if slot is not None:
                bias += float(table.bias[slot]) - b0
                sums += float(table.sums[slot]) - s0
                t = max(t, float(table.times[slot]))
        out.set(item, bias)
        slot = out.index[item]
        out.sums[slot], out.times[slot] = sums, t
    return ItemEffects.encode(out.snapshot())


def global_mean(stream: Stream) -> Result:
    total, count = 0.0, 0

    def step(r: Rating) -> float:
        nonlocal total, count
        p = (total + 0.5) / (count + 1)
        total, count = total + r.y, count + 1
        return p

    return progressive(stream, "baseline", "global mean", step)


def user_mean(stream: Stream, prior: float = 5.0) -> Result:
    """Per-user mean, shrunk toward the running global mean by `prior` pseudo-ratings."""
    return _mean_by(stream, lambda r: r.user, prior, f"user mean (prior {prior:g})")


def item_mean(stream: Stream, prior: float = 5.0) -> Result:
    """Each item's mean rating so far, shrunk toward the global mean (`prior` ratings)."""
    return _mean_by(stream, lambda r: r.item, prior, f"item mean (prior {prior:g})")


def _mean_by(stream: Stream, key: Callable[[Rating], str], prior: float,
             label: str) -> Result:
    sums: dict[str, tuple[float, int]] = {}
    total, count = 0.0, 0

    def step(r: Rating) -> float:
        nonlocal total, count
        g = (total + 0.5) / (count + 1)
        k = key(r)
        s, c = sums.get(k, (0.0, 0))
        p = (s + prior * g) / (c + prior)
        sums[k] = (s + r.y, c + 1)
        total, count = total + r.y, count + 1
        return p

    return progressive(stream, "baseline", label, step)


def vw(stream: Stream, args: str, items: bool = False) -> Result:
    """Vowpal Wabbit, logistic, with user and genre namespaces (and, with `items`, an item
    namespace: a weight per item, VW's own item effects)."""
    from vowpalwabbit import Workspace

    ws = Workspace(f"--loss_function logistic --link logistic --quiet {args}")

    def step(r: Rating) -> float:
        feats = " ".join(g.replace("'", "").replace("-", "_") for g in r.genres)
        line = f"{1 if r.y else -1} |u u{r.user} |g {feats}"
        if items:
            line += f" |i i{r.item}"
        p = ws.predict(line)
        ws.learn(line)
        return float(p)

    result = progressive(stream, "vowpal wabbit", f"{args} |i item" if items else args, step)
    ws.finish()
    return result


def river_per_user(stream: Stream, lr: float) -> Result:
    from river import linear_model, optim

    models: dict = {}

    def step(r: Rating) -> float:
        model = models.get(r.user)
        if model is None:
            model = models[r.user] = linear_model.LogisticRegression(optimizer=optim.Adam(lr))
        x = {g: 1.0 for g in r.genres}
        p = model.predict_proba_one(x).get(True, 0.5)
        model.learn_one(x, bool(r.y))
        return p

    return progressive(stream, "river", f"per-user LogisticRegression, Adam lr {lr:g}", step)


def river_global(stream: Stream, lr: float) -> Result:
    from river import linear_model, optim

    # AdaGrad: sparse updates. River's Adam steps every weight it holds (~18k crossed
    # features here): three learning rates did not finish in 15 minutes
    model = linear_model.LogisticRegression(optimizer=optim.AdaGrad(lr))

    def step(r: Rating) -> float:
        x = {f"u{r.user}": 1.0, **{g: 1.0 for g in r.genres},
             **{f"u{r.user}x{g}": 1.0 for g in r.genres}}
        p = model.predict_proba_one(x).get(True, 0.5)
        model.learn_one(x, bool(r.y))
        return p

    return progressive(stream, "river", f"global, user x genre crossed, AdaGrad lr {lr:g}",
                       step)


def microtune_config(dim: int, **segment) -> TuningConfig:
    return TuningConfig(version=1, dim=dim, segments={"default": SegmentConfig(**segment)})


def best(results: Iterable[Result], key: str = "auc") -> Result:
    return max(results, key=lambda r: -math.inf if math.isnan(r.figures[key])
               else r.figures[key])
