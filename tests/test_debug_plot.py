"""`microtune debug --plot`: what the plot chooses to show (actors.debug.plot_data) and the
PNG drawn from it (adapters/debug_plot.py), on a real SQLite store written through the
actors: a user with several kinds of events, an outlier, a late event and a rollback, and
two bots."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from actors import Microtune
from actors.configs import ConfigRegistry
from actors.debug import HIGHLIGHT, USER_KINDS, plot_data, timeline
from adapters import debug_plot
from events import Event, TuningConfig
from store import open_recorder

pytestmark = pytest.mark.filterwarnings("error")  # matplotlib's included: none may leak

DIM = 10
CFG = TuningConfig(version=1, dim=DIM)
T0 = 1.7e9  # 2023-11-14 22:13:20 UTC
# how often each feature is non-zero on an item: x0 always ... x6 rarely; x7-x9 never, so
# those weights cannot move
PRESENT = (1.0, 0.7, 0.5, 0.3, 0.15, 0.1, 0.05, 0.0, 0.0, 0.0)
ROLLBACK_TO = 20
ITEM = np.array([1.0 if p else 0.0 for p in PRESENT])


def _alice(rng: np.random.Generator) -> tuple[list[Event], list[Event]]:
    """Two sessions six hours apart: impressions, clicks, dwell, scroll, hover, feedback, a
    dwell of four hours (an outlier) in the first, a click ten minutes late in the second
    (all in arrival order)."""
    sessions: list[list[Event]] = []
    n = 0
    for start in (T0, T0 + 6 * 3600):
        events, t = [], start
        for view in range(30):
            t += 10.0
            x = rng.normal(size=DIM) * (rng.random(DIM) < np.array(PRESENT))
            did: list[tuple[str, float, dict]] = [("impression", 0.0, {})]
            if view % 3 == 0:
                did += [("click", 1.0, {}), ("dwell", 4.0, {"dwell": float(rng.uniform(5, 60))})]
                if view % 6 == 0:
                    did.append(("feedback", 5.0, {"target": 0.9}))
                if view % 9 == 0:
                    did.append(("scroll", 6.0, {"depth": 0.7}))
            elif view % 5 == 0:
                did.append(("hover", 1.0, {"hover": 2.0}))
            for kind, dt, fields in did:
                n += 1
                events.append(Event(id=f"a{n}", user="alice", t=t + dt, received=t + dt + 0.2,
                                    kind=kind, item=f"item{view}-{int(start)}", x=x, **fields))
        sessions.append(events)
    first, second = sessions
    # early, so that it is learned (judged) before the rollback to seq 20
    first.insert(5, Event(id="a-outlier", user="alice", t=first[4].t + 0.5,
                          received=first[4].t + 0.7, kind="dwell", item="item0-x",
                          x=ITEM, dwell=4 * 3600.0))
    second.append(Event(id="a-late", user="alice", t=second[-1].t - 600,
                        received=second[-1].received + 1, kind="click", item="item-late",
                        x=ITEM))
    # one more event, 20 s on, so that the late click leaves the reorder buffer
    second.append(second[-2]._replace(id="a-last", t=second[-2].t + 20,
                                      received=second[-2].received + 20))
    return first, second


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("debug_plot") / "mt.db"
    rng = np.random.default_rng(7)
    first, second = _alice(rng)
    with Microtune.open(path, CFG) as mt:
        assert all(o.ok for o in mt.track_many(first, timeout=60))
        # an operator's action: its time is the wall clock, years after the events
        assert mt.rollback("alice", to_seq=ROLLBACK_TO, why="TICKET-9", by="ops").ok
        assert all(o.ok for o in mt.track_many(second, timeout=60))
        crawler = [Event(id=f"c{n}", user="crawler", t=T0 + 10 * n, kind="click", item="a",
                         x=np.ones(DIM), automated=True) for n in range(5)]
        clicker = [Event(id=f"k{n}", user="clicker", t=T0 + 0.05 * n,
                         received=T0 + 0.05 * n + 0.1, kind="click", item=f"i{n}",
                         x=rng.normal(size=DIM)) for n in range(80)]
        assert all(o.ok for o in mt.track_many(crawler + clicker, timeout=60))
    return path


def _timeline(store: Path, user: str):
    recorder = open_recorder(store)
    try:
        return timeline(recorder, ConfigRegistry(recorder, CFG), user)
    finally:
        recorder.close()


def _path_lengths(tl) -> np.ndarray:
    """Each weight's total movement, computed here from the timeline's history: the sum of
    |change| over the steps, from the prior (zeros), a rollback's jump not counted."""
    rollbacks = {r.seq for r in tl.rows if r.kind == "rollback"}
    total, previous = np.zeros(DIM + 1), np.zeros(DIM + 1)
    for seq, w in [*tl.history, (None, tl.settled.w)]:
        if seq not in rollbacks:
            total += np.abs(w - previous)
        previous = w
    return total


def test_the_plot_highlights_the_weights_that_moved_most(store):
    tl = _timeline(store, "alice")
    data = plot_data(tl)
    total = _path_lengths(tl)
    names = ["bias", *(f"x{i}" for i in range(DIM))]
    expected = [names[i] for i in np.argsort(-total, kind="stable")[:HIGHLIGHT]]
    assert [d.name for d in data.highlighted] == expected
    for d in data.highlighted:
        assert d.movement == pytest.approx(total[names.index(d.name)])
        assert "total movement" in d.why and "largest step" in d.why and "from " in d.why
    # the features no item has never move: listed as such, never highlighted
    assert set(data.still) == {"x7", "x8", "x9"}
    assert set(data.faded) == set(names) - set(expected) - set(data.still)
    assert data.empty is None and data.title == "user alice: what moved its weights, and when"
    # the line starts at the prior and ends at what a query sees
    assert data.seqs[0] == 0 and not data.weights[0].any()
    assert data.weights[-1].tolist() == tl.settled.w.tolist()


def test_the_markers_are_the_kinds_verdicts_and_rollback_in_the_log(store):
    tl = _timeline(store, "alice")
    data = plot_data(tl)
    kinds = {r.kind for r in tl.rows if r.kind in USER_KINDS}
    assert kinds == {"impression", "click", "dwell", "feedback", "scroll", "hover"}
    assert {s.label for s in data.events} == kinds
    for s in data.events:
        assert list(s.seq) == [r.seq for r in tl.rows if r.kind == s.label]
    verdicts = {s.label: s for s in data.verdicts}
    assert set(verdicts) == {"late", "outlier"}
    late = next(r for r in tl.rows if r.event_id == "a-late")
    assert verdicts["late"].seq == (late.seq,)
    outlier = next(r for r in tl.rows if r.event_id == "a-outlier")
    assert verdicts["outlier"].seq == (outlier.seq,) and verdicts["outlier"].detail == "1 dropped"
    (rollback,) = data.marks
    assert rollback.kind == "rollback"
    assert rollback.seq == next(r.seq for r in tl.rows if r.kind == "rollback")
    assert rollback.label == f"rollback to seq {ROLLBACK_TO}: TICKET-9"
    assert "1 rollback" in data.subtitle
    # the time axis is the events' time: the rollback, made now, sits where it is in the
    # log (after the first session, before the second), not years later
    first_session_end = max(r.t for r in tl.rows if r.seq < rollback.seq)
    assert rollback.t == pytest.approx(first_session_end)
    assert data.row_times.min() == pytest.approx(T0 + 10.0)
    assert data.row_times.max() < T0 + 7 * 3600
    assert np.all(np.diff(data.row_times) >= 0)  # in log order: the late click at arrival
    # every learning step, the ones the rollback undid included
    assert len(data.learned) == len(tl.learning) > tl.settled.steps


def test_a_bots_plot_says_it_is_a_bot_since_when_and_why(store):
    crawler = plot_data(_timeline(store, "crawler"))
    assert crawler.highlighted == () and crawler.weights.size == 0
    assert crawler.title.startswith("user crawler: no weight has moved: marked a bot: "
                                    "declared: the publisher flagged the event as automated")
    assert "since 2023-11-14 22:13:30 UTC (seq 2)" in crawler.title
    assert "its 5 events are ignored" in crawler.title
    assert [s.label for s in crawler.verdicts] == ["bot"] and len(crawler.verdicts[0].t) == 5
    (bot,) = crawler.marks
    assert bot.kind == "bot" and bot.seq == 2

    # a clicker learns for a moment, then is marked: the plot has lines, and says so
    tl = _timeline(store, "clicker")
    clicker = plot_data(tl)
    assert clicker.highlighted and clicker.empty is None
    assert tl.settled.hyg.bot.startswith("regular intervals: ")  # metronome clicks
    assert f"marked a bot since 2023-11-14 22:13:23 UTC (seq 80): {tl.settled.hyg.bot}" in (
        clicker.subtitle)
    assert any(m.kind == "bot" for m in clicker.marks)


def test_an_empty_plot_says_why_when_nothing_learned_yet(tmp_path):
    with Microtune.open(tmp_path / "mt.db", CFG) as mt:  # one impression, still waiting
        mt.track_many([Event(id="i1", user="new", t=T0, kind="impression", item="a",
                             x=np.ones(DIM))])
        tl = timeline(mt.recorder, mt.configs, "new")
    data = plot_data(tl)
    assert data.highlighted == () and "no event of it has learned yet" in data.title
    debug_plot.write(data, str(tmp_path / "new.png"))
    assert (tmp_path / "new.png").stat().st_size > 5000


def _pixels_near(image: np.ndarray, color: str, tolerance: float = 0.04) -> int:
    rgb = np.array([int(color[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(image[..., :3] - rgb).max(axis=-1) < tolerance).sum())


def test_the_png_draws_each_highlighted_weight_in_its_own_colour_over_event_time(
        store, tmp_path):
    from matplotlib.image import imread

    data = plot_data(_timeline(store, "alice"))
    png = tmp_path / "alice.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        debug_plot.write(data, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 50_000
    image = imread(png)
    assert image.shape[0] > 600 and image.shape[1] > 1200
    colours = debug_plot.PALETTE[:len(data.highlighted)]
    assert len(set(colours)) == len(colours) == HIGHLIGHT  # no colour twice
    for colour in colours:  # every highlighted line is there, in its colour
        assert _pixels_near(image, colour) > 100, colour

    fig = debug_plot.figure(data)
    weights, _, strip = fig.axes[:3]
    legend = [t.get_text() for t in weights.get_legend().get_texts()]
    assert len(legend) == HIGHLIGHT + 2  # the highlighted, the grey ones, the still ones
    assert all(any(t.startswith(f"{d.name}: ") for t in legend) for d in data.highlighted)
    ticks = " ".join(t.get_text() for t in strip.get_xticklabels())
    assert "Nov 14 2023" in ticks and "Nov 15" in ticks  # event time, across the two days
    assert [t.get_text().split(" (")[0] for t in strip.get_yticklabels()] == [
        *(s.label for s in data.events), *(s.label for s in data.verdicts)]
    fig.clear()


def test_idle_hours_shrink_to_a_band_and_sessions_stay_readable():
    session = np.arange(30) * 10.0
    axis = debug_plot.TimeAxis(np.concatenate((T0 + session, T0 + 6 * 3600 + session)))
    ((x0, x1, idle),) = axis.gaps
    assert idle == pytest.approx(6 * 3600 - 290)
    assert x1 - x0 == pytest.approx(debug_plot.GAP_WIDTH)
    widths = [b - a for _, _, a, b in axis.stretches]
    assert widths[0] == pytest.approx(widths[1]) and widths[0] > 0.4
    assert axis.x(T0 + 3 * 3600) == pytest.approx((x0 + x1) / 2, abs=0.01)
