"""`microtune debug --plot`: a user's weights over event time, as a PNG, for people.

It draws what `actors.debug.plot_data` chose, and decides nothing about the user: the features
that moved most as coloured lines (one colour each, never reused) and the rest in grey, named
in the legend; under them the size of every learning step, and a strip of the user's events
by kind with the hygiene verdicts (late, outlier, bot); operators' events (rollback, restore,
clear_bot, segment) as lines across; a bot's ignored stretch shaded. The x axis is event time
(UTC); idle stretches (a user's sessions are often hours apart and minutes long) are
shortened to a narrow grey band with their length on it, so that every session is readable.

Drawn on a `matplotlib.figure.Figure` with the Agg canvas, as adapters/experiment_report.py:
no pyplot, so no global figure list to leak into and the caller's backend is left alone.
"""

from __future__ import annotations

import math
import textwrap
from datetime import UTC, datetime
from typing import Any

import numpy as np

from actors.debug import PlotData

# Paul Tol's "bright" scheme, made for lines and for colour-blind readers: six hues no two
# of which are easily confused (Okabe-Ito's orange and vermillion are); its yellow, the
# faintest on white, last
PALETTE = ("#4477AA", "#EE6677", "#228833", "#AA3377", "#66CCEE", "#CCBB44")
GREY = "#c4c4c4"
# the strip: (marker, colour, size) per event kind and per verdict group
KIND_STYLE = {
    "impression": ("|", "#9a9a9a", 7), "click": ("o", "#303030", 4),
    "dwell": ("s", "#303030", 3.5), "scroll": ("v", "#303030", 4),
    "hover": ("^", "#303030", 4), "feedback": ("*", "#303030", 7),
    "exposure": ("D", "#303030", 3.5),
}
VERDICT_STYLE = {"late": ("<", "#b35900", 6), "outlier": ("X", "#a0005a", 6),
                 "bot": ("x", "#c00000", 5)}
MARK_STYLE = {"rollback": ("#202020", "--"), "restore": ("#202020", "-."),
              "clear_bot": ("#2e7d32", ":"), "segment": ("#606060", ":")}
BOT_SHADE = "#fbe3e3"
# An idle stretch longer than GAP seconds (a session timeout) is drawn GAP_WIDTH wide (a
# share of the axis); at most MAX_GAPS of them, the longest.
GAP = 1800.0
GAP_WIDTH = 0.03
MAX_GAPS = 40
# nice tick steps, seconds
STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200,
         86400, 2 * 86400, 7 * 86400, 14 * 86400, 30 * 86400)


class TimeAxis:
    """Event time mapped onto [0, 1], piecewise linearly: idle gaps shrink to a narrow band,
    and each active stretch between them is as wide as the square root of its number of
    events says (a session of 100 events is wider than a lone event hours later, but not
    100 times: each stays readable); within a stretch, time is linear."""

    def __init__(self, times: np.ndarray) -> None:
        t = np.sort(times[np.isfinite(times)])
        if not t.size:
            t = np.zeros(1)
        gaps = np.diff(t)
        long = np.flatnonzero(gaps > GAP)
        long = np.sort(long[np.argsort(-gaps[long], kind="stable")][:MAX_GAPS])
        starts = np.concatenate(([t[0]], t[long + 1]))
        ends = np.concatenate((t[long], [t[-1]]))
        counts = np.diff(np.concatenate(([0], long + 1, [t.size])))
        # a stretch of one instant gets a moment either side (np.interp needs it increasing)
        pad = np.maximum(0.02 * (ends - starts), 0.5)
        starts, ends = starts - pad, ends + pad
        gap_width = min(GAP_WIDTH, 0.25 / len(long)) if long.size else 0.0
        shares = np.sqrt(counts)
        shares *= (1.0 - gap_width * long.size) / shares.sum()
        x = 0.0
        self.tp: list[float] = []
        self.xp: list[float] = []
        self.stretches: list[tuple[float, float, float, float]] = []  # t0, t1, x0, x1
        self.gaps: list[tuple[float, float, float]] = []  # x0, x1, seconds idle
        for i, (t0, t1, share) in enumerate(zip(starts, ends, shares, strict=True)):
            if i:
                self.gaps.append((x, x + gap_width, float(gaps[long[i - 1]])))
                x += gap_width
            self.tp += [float(t0), float(t1)]
            self.xp += [x, x + float(share)]
            self.stretches.append((float(t0), float(t1), x, x + float(share)))
            x += float(share)

    def x(self, t: Any) -> np.ndarray:
        return np.interp(np.asarray(t, dtype=float), self.tp, self.xp)

    def ticks(self) -> tuple[list[float], list[str]]:
        """A few round times per stretch; the date on the first and wherever it changes."""
        xs: list[float] = []
        labels: list[str] = []
        last_day = None
        for t0, t1, x0, x1 in self.stretches:
            budget = max(1, int((x1 - x0) / 0.065))
            step = next((s for s in STEPS if (t1 - t0) / s <= budget), STEPS[-1])
            first = math.ceil(t0 / step) * step
            times = list(np.arange(first, t1, step)) or [(t0 + t1) / 2]
            fmt = "%H:%M:%S" if step < 60 else "%H:%M" if step < 86400 else "%b %d"
            for t in times:
                x = float(self.x(t))
                if xs and x - xs[-1] < 0.055:  # would overlap its neighbour
                    continue
                when = datetime.fromtimestamp(float(t), UTC)
                day = when.date()
                label = when.strftime(fmt)
                if last_day is None:  # the first label: the date with its year
                    label += when.strftime("\n%Y" if step >= 86400 else "\n%b %d %Y")
                elif day != last_day and step < 86400:
                    label += when.strftime("\n%b %d")
                last_day = day
                xs.append(x)
                labels.append(label)
        return xs, labels


def _names(names: tuple[str, ...], most: int = 30) -> str:
    """Names in lines of the legend's width; beyond `most`, how many more."""
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return "\n".join(textwrap.wrap(" ".join(names[:most]) + more, 28))


def _duration(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.0f} d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min"


def figure(data: PlotData) -> Any:
    """The figure (a `matplotlib.figure.Figure`, not registered with pyplot)."""
    from matplotlib.figure import Figure

    axis = TimeAxis(np.concatenate((data.row_times, data.times)))
    strip = [*data.events, *data.verdicts]
    fig = Figure(figsize=(13, 7.8), layout="constrained")
    heights = [5.0, 1.3, 0.3 + 0.32 * max(len(strip), 1)]
    wax, sax, rax = fig.subplots(3, 1, sharex=True, height_ratios=heights)

    end = float(axis.x(data.row_times[-1])) if data.row_times.size else 1.0
    _weights(wax, data, axis, end)
    _steps(sax, data, axis)
    _seqs(sax, data, axis)
    _strip(rax, strip, axis)

    for ax in (wax, sax, rax):
        for x0, x1, _ in axis.gaps:
            ax.axvspan(x0, x1, color="#ececec", linewidth=0, zorder=0)
        bot = next((m for m in data.marks if m.kind == "bot"), None)
        if bot is not None:
            ax.axvspan(float(axis.x(bot.t)), 1.01, color=BOT_SHADE, linewidth=0, zorder=0)
        for mark in data.marks:
            if mark.kind in MARK_STYLE:
                color, style = MARK_STYLE[mark.kind]
                ax.axvline(float(axis.x(mark.t)), color=color, linestyle=style, linewidth=1.2,
                           zorder=4)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    _annotate(wax, data, axis)

    rax.set_xlim(-0.01, 1.01)
    if data.row_times.size:  # else no time to show
        xs, labels = axis.ticks()
        rax.set_xticks(xs, labels, fontsize=8)
        rax.set_xlabel("event time (UTC)" + ("; idle stretches shortened to the grey bands"
                                             if axis.gaps else ""), fontsize=9)
    else:
        rax.set_xticks([])
    fig.suptitle("\n".join(textwrap.wrap(data.title, 120)), x=0.01, ha="left", fontsize=13)
    return fig


def _weights(ax: Any, data: PlotData, axis: TimeAxis, end: float) -> None:
    """The highlighted weights in colour, the others grey, as steps; the legend has one
    entry per highlighted weight and names the others."""
    from matplotlib.lines import Line2D

    ax.set_ylabel("weight")
    ax.grid(True, axis="y", color="#e6e6e6", linewidth=0.8)
    ax.set_axisbelow(True)
    if data.subtitle:
        ax.set_title("\n".join(textwrap.wrap(data.subtitle, 150)), loc="left", fontsize=9,
                     color="#444444")
    if not data.highlighted:  # the title says why
        ax.text(0.5, 0.5, "no weight has moved" if data.row_times.size else "no event",
                transform=ax.transAxes, ha="center", va="center", fontsize=12,
                color="#555555")
        ax.set_yticks([])
        return
    # each line runs on to the last event: the weights stay until something moves them
    xs = np.append(axis.x(data.times), max(end, float(axis.x(data.times[-1]))))
    weights = np.vstack((data.weights, data.weights[-1]))
    top = {d.index for d in data.highlighted}
    for i in range(weights.shape[1]):
        if i not in top:
            ax.plot(xs, weights[:, i], drawstyle="steps-post", color=GREY, linewidth=0.8,
                    zorder=1)
    handles = []
    for d, color in zip(data.highlighted, PALETTE, strict=False):
        (h,) = ax.plot(xs, weights[:, d.index], drawstyle="steps-post", color=color,
                       linewidth=2.0, zorder=3,
                       label=f"{d.name}: net {d.net:+.2f}, moved {d.movement:.2f}")
        handles.append(h)
    if data.faded:
        handles.append(Line2D([], [], color=GREY, linewidth=1.5, label=(
            f"{len(data.faded)} others, moved less:\n{_names(data.faded)}")))
    if data.still:
        handles.append(Line2D([], [], color="none",
                            label=f"never moved:\n{_names(data.still)}"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8.5,
              frameon=False, title="features moved most\n(net change, total movement)",
              title_fontsize=8.5, alignment="left")


def _steps(ax: Any, data: PlotData, axis: TimeAxis) -> None:
    """|Δw| of every learning step, where it moved the weights (the arrival that released
    the event it learned from)."""
    ax.set_ylabel("|Δw| per\nstep", fontsize=9)
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(True, axis="y", color="#e6e6e6", linewidth=0.8)
    ax.set_axisbelow(True)
    if not data.learned:
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no learning step", transform=ax.transAxes, ha="center",
                va="center", fontsize=9, color="#666666")
        return
    x = axis.x([s.t for s in data.learned])
    change = np.array([s.change for s in data.learned])
    ax.vlines(x, 0, change, color="#404040", linewidth=1.0, zorder=3)
    ax.set_ylim(0, float(change.max()) * 1.4 or 1.0)


def _seqs(ax: Any, data: PlotData, axis: TimeAxis) -> None:
    """Each stretch's seqs, along its top: the seq is what the table and `--until-seq` use."""
    if not data.row_seqs.size:
        return
    xs = axis.x(data.row_times)
    top = ax.get_xaxis_transform()
    for _, _, x0, x1 in axis.stretches:
        inside = data.row_seqs[(xs >= x0) & (xs <= x1)]
        if inside.size and x1 - x0 > 0.045:
            first, last = inside.min(), inside.max()
            ax.text((x0 + x1) / 2, 0.98, f"seq {first}" if first == last
                    else f"seq {first}-{last}", transform=top, ha="center", va="top",
                    fontsize=7.5, color="#707070")


def _strip(ax: Any, strip: list, axis: TimeAxis) -> None:
    """One row per event kind and per hygiene verdict, top to bottom."""
    ticks, labels = [], []
    for row, series in enumerate(strip):
        y = len(strip) - 1 - row
        marker, color, size = (KIND_STYLE.get(series.label) or VERDICT_STYLE.get(series.label)
                               or ("o", "#303030", 4))
        ax.plot(axis.x(series.t), np.full(len(series.t), y), linestyle="none", marker=marker,
                color=color, markersize=size, alpha=0.75, zorder=3,
                markerfacecolor="none" if marker in "os^vD" else color)
        ticks.append(y)
        detail = f", {series.detail}" if series.detail else ""
        labels.append(f"{series.label} ({len(series.t)}{detail})")
    ax.set_yticks(ticks, labels, fontsize=8)
    for tick, series in zip(ax.get_yticklabels(), strip, strict=True):
        if series.label in VERDICT_STYLE:
            tick.set_color(VERDICT_STYLE[series.label][1])
    ax.set_ylim(-0.7, max(len(strip), 1) - 0.3)
    if len(strip) > 1 and any(s.label in VERDICT_STYLE for s in strip):
        kinds = sum(s.label not in VERDICT_STYLE for s in strip)
        ax.axhline(len(strip) - kinds - 0.5, color="#d0d0d0", linewidth=0.8)


def _annotate(ax: Any, data: PlotData, axis: TimeAxis) -> None:
    """Idle gaps' lengths, and the operators' events and the bot verdict, in words."""
    top = ax.get_xaxis_transform()  # x in data, y in axes fraction
    for x0, x1, seconds in axis.gaps:  # nothing happens in a gap: the label may cover it
        ax.text((x0 + x1) / 2, 0.5, f"{_duration(seconds)} idle", transform=top,
                rotation=90, ha="center", va="center", fontsize=7.5, color="#707070",
                zorder=5, bbox={"facecolor": "#ececec", "edgecolor": "none", "pad": 1})
    for row, mark in enumerate(data.marks):
        x = float(axis.x(mark.t))
        color = MARK_STYLE.get(mark.kind, ("#a00000", ""))[0]
        right = x > 0.6  # near the right edge the label runs leftwards, off the legend
        ax.text(x, 0.975 - 0.045 * (row % 4), f" {mark.label} (seq {mark.seq}) ", transform=top,
                ha="right" if right else "left", va="top", fontsize=8, color=color, zorder=6,
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 1.5})


def write(data: PlotData, path: str) -> None:
    """The PNG at `path`; the figure released."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = figure(data)
    FigureCanvasAgg(fig)
    try:
        fig.savefig(path, dpi=110, metadata={"Software": None})
    finally:
        fig.clear()
