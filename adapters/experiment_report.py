"""An experiment report, rendered for people: a rich table in the terminal, a single HTML file.

The report is a plain, JSON-serialisable dict built elsewhere (one experiment: its arms, their
metric estimates, every non-control arm compared with the control on every metric, the sample
ratio check and a timeline of cumulative estimates). This module only renders it:

- `print_report(report, console)`: per arm one row (config version, users, exposures, the
  primary metric with its interval, the lift vs control with interval and p-values, the
  CUPED lift, a verdict), then the guardrail metrics, then the sample-ratio line, red when the
  split is broken ("UNTRUSTWORTHY: sample ratio mismatch, p=...") and green when it holds.
- `write_html(report, path)`: one self-contained file (inline CSS, plots as base64 PNG data
  URIs, no script, nothing fetched): title, a banner (red when untrustworthy), the same
  tables, the primary metric per arm over time with its confidence band, a forest plot of
  the lift vs control (fixed-horizon, sequential and CUPED intervals side by side) and the
  sample-ratio section.

`verdict(comparison, report)` is the text of the verdict column, `arm_colors(names)` the
color of each arm in both plots. Metrics are read as higher-is-better: "B better" means B's
estimate is significantly above the control's.

The plots are drawn on `matplotlib.figure.Figure` objects with the Agg canvas, not through
pyplot: nothing is registered in pyplot's global figure list (so no figure can leak, and the
caller's backend is left alone), and each figure is released once its PNG is written.
"""

from __future__ import annotations

import base64
import html
import io
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

__all__ = ["arm_colors", "print_report", "render_html", "verdict", "write_html"]

# Okabe & Ito's colour-blind-safe palette (without its yellow, too pale on white, and its black,
# the text colour), then a few more distinct hues for experiments with many arms.
_PALETTE = (
    "#0072B2",  # blue
    "#D55E00",  # vermillion
    "#009E73",  # bluish green
    "#CC79A7",  # reddish purple
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#8C564B",  # brown
    "#7F7F7F",  # grey
)

_DASH = "—"


def arm_colors(names: Iterable[str]) -> dict[str, str]:
    """Each arm's colour ("#rrggbb"), by position in `names` (the report uses its arms' order).

    The same arm gets the same colour in the timeline and in the forest plot; past the palette
    the colours repeat.
    """
    return {name: _PALETTE[i % len(_PALETTE)] for i, name in enumerate(names)}


# ---------------------------------------------------------------------------------------------
# reading the report


def _get(mapping: Mapping[str, Any] | None, key: str, default: Any = None) -> Any:
    """`mapping[key]`, or `default` when the mapping or the value is missing or None."""
    if not mapping:
        return default
    value = mapping.get(key)
    return default if value is None else value


def _experiment(report: Mapping[str, Any]) -> dict[str, Any]:
    return dict(_get(report, "experiment", {}))


def _control(report: Mapping[str, Any]) -> str | None:
    control = _get(_experiment(report), "control")
    if control is None:
        arms = _get(report, "arms", [])
        control = arms[0].get("name") if arms else None
    return control


def _primary(report: Mapping[str, Any]) -> str | None:
    return _get(_experiment(report), "primary")


def _guardrails(report: Mapping[str, Any]) -> list[str]:
    guardrails = list(_get(_experiment(report), "guardrails", []))
    if guardrails:
        return guardrails
    # not named: every other metric that has numbers
    seen = [m for arm in _get(report, "arms", []) for m in _get(arm, "metrics", {})]
    primary = _primary(report)
    return [m for m in dict.fromkeys(seen) if m != primary]


def _arm_names(report: Mapping[str, Any]) -> list[str]:
    names = [str(arm.get("name")) for arm in _get(report, "arms", [])]
    # arms that appear only in the split or the comparisons still get a colour and a row
    for name in _get(_experiment(report), "split", {}):
        if name not in names:
            names.append(str(name))
    for c in _get(report, "comparisons", []):
        if c.get("arm") is not None and c["arm"] not in names:
            names.append(str(c["arm"]))
    return names


def _srm_mismatch(report: Mapping[str, Any]) -> bool:
    return bool(_get(_get(report, "srm"), "mismatch", False))


def _untrustworthy(report: Mapping[str, Any]) -> bool:
    return _srm_mismatch(report) or report.get("trustworthy") is False


def _alpha(report: Mapping[str, Any]) -> float:
    return float(_get(report, "alpha", 0.05))


def _comparison(report: Mapping[str, Any], arm: str, metric: str | None) -> dict | None:
    for c in _get(report, "comparisons", []):
        if c.get("arm") == arm and c.get("metric") == metric:
            return c
    return None


def _metric_spec(report: Mapping[str, Any], metric: str | None) -> dict[str, Any]:
    return dict(_get(_get(report, "metrics", {}), metric or "", {}))


def _percent(report: Mapping[str, Any], metric: str | None) -> bool:
    return bool(_get(_metric_spec(report, metric), "percent", False))


def _label(report: Mapping[str, Any], metric: str | None) -> str:
    return str(_get(_metric_spec(report, metric), "label", metric or "?"))


def verdict(comparison: Mapping[str, Any] | None, report: Mapping[str, Any]) -> str:
    """The verdict on one comparison: "<arm> better", "<arm> worse", "no significant difference".

    By the fixed-horizon test (its `significant`, else p < alpha) and the sign of the
    difference; "untrustworthy (SRM)" overrides it when the sample ratio check failed.
    """
    if _srm_mismatch(report):
        return "untrustworthy (SRM)"
    if not comparison:
        return "no data"
    estimate = _get(_get(comparison, "difference"), "estimate")
    significant = comparison.get("significant")
    if significant is None:
        p = comparison.get("p_value")
        significant = p is not None and p < _alpha(report)
    if not significant or estimate is None or estimate == 0:
        return "no significant difference"
    return f"{comparison.get('arm', 'B')} {'better' if estimate > 0 else 'worse'}"


def _verdict_kind(text: str) -> str:
    """srm, good, bad or none: what a verdict's colour says, in the table and on the page."""
    if text.startswith("untrustworthy"):
        return "srm"
    if text.endswith(" better"):
        return "good"
    if text.endswith(" worse"):
        return "bad"
    return "none"


def _verdict_style(text: str) -> str:
    return {"srm": "bold red", "good": "green", "bad": "red", "none": "dim"}[_verdict_kind(text)]


# ---------------------------------------------------------------------------------------------
# formatting numbers


def _finite(x: Any) -> bool:
    """A usable number (numpy's scalars included; not None, NaN, infinity or a bool)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _decimals(interval: Mapping[str, Any] | None, percent: bool, default: int = 2) -> int:
    """Decimals showing an interval's half-width to two significant digits (0 to 6)."""
    low, high = _get(interval, "low"), _get(interval, "high")
    if not (_finite(low) and _finite(high)) or high <= low:
        return default
    half = (high - low) / 2 * (100 if percent else 1)
    return max(0, min(6, 1 - math.floor(math.log10(half))))


def _value(x: Any, percent: bool, decimals: int, *, sign: bool = False, unit: str = "") -> str:
    if not _finite(x):
        return _DASH
    scaled = x * 100 if percent else x
    if round(scaled, decimals) == 0:
        scaled = 0.0  # no "-0.000"
        sign = False
    text = f"{scaled:+.{decimals}f}" if sign else f"{scaled:.{decimals}f}"
    return text + unit


def _interval(
    est: Mapping[str, Any] | None,
    percent: bool,
    *,
    sign: bool = False,
    unit: str | None = None,
    compact: bool = False,
) -> str:
    """"10.10% [9.80%, 10.40%]" ("10.10% [9.80, 10.40]" when compact), or the estimate alone
    when the bounds are missing."""
    if not est or not _finite(est.get("estimate")):
        return _DASH
    if unit is None:
        unit = "%" if percent else ""
    d = _decimals(est, percent)
    text = _value(est["estimate"], percent, d, sign=sign, unit=unit)
    if _finite(est.get("low")) and _finite(est.get("high")):
        # "10.10% [9.80%, 10.40%]", but "+0.49 pp [+0.14, +0.83]": the unit once is enough
        bound_unit = "%" if unit == "%" and not compact else ""
        low = _value(est["low"], percent, d, sign=sign, unit=bound_unit)
        high = _value(est["high"], percent, d, sign=sign, unit=bound_unit)
        text += f" [{low}, {high}]"
    return text


def _difference(c: Mapping[str, Any] | None, percent: bool, compact: bool = False) -> str:
    """The absolute lift, in percentage points for a percent metric."""
    return _interval(
        _get(c, "difference"), percent, sign=True, unit=" pp" if percent else "", compact=compact
    )


def _relative(c: Mapping[str, Any] | None, compact: bool = False) -> str:
    rel = _get(c, "relative")
    return _interval(rel, True, sign=True, compact=compact) if rel else ""


def _p(p: Any) -> str:
    if not _finite(p):
        return _DASH
    if p < 0.0001:
        return "<0.0001"
    return f"{p:.2g}"


def _p_is(p: Any) -> str:
    """"p=0.52", "p<0.0001"."""
    text = _p(p)
    return f"p{text}" if text.startswith("<") else f"p={text}"


def _count(n: Any) -> str:
    return f"{n:,.0f}" if _finite(n) else _DASH


def _when(t: Any) -> str:
    if not _finite(t):
        return _DASH
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _cuped(c: Mapping[str, Any] | None, percent: bool, compact: bool = False) -> list[str]:
    cuped = _get(c, "cuped")
    if not cuped:
        return [_DASH]
    lines = [_interval(cuped, percent, sign=True, unit=" pp" if percent else "", compact=compact)]
    if _finite(cuped.get("p_value")):
        lines.append(_p_is(cuped["p_value"]))
    return lines


def _srm_line(report: Mapping[str, Any]) -> tuple[str, str]:
    """The sample-ratio status line and its severity ("bad", "good", "unknown")."""
    srm = _get(report, "srm")
    if not srm:
        return "sample ratio not checked", "unknown"
    chi2 = f"chi2={srm['chi2']:.2f}" if _finite(srm.get("chi2")) else "chi2 not computed"
    p = _p_is(srm.get("p_value"))
    if srm.get("mismatch"):
        return (
            f"UNTRUSTWORTHY: sample ratio mismatch, {p} ({chi2}): users were not split as "
            "planned; do not trust the comparisons", "bad")
    return f"sample ratio OK: no sample ratio mismatch, {p} ({chi2})", "good"


def _heading(report: Mapping[str, Any]) -> str:
    exp = _experiment(report)
    name = _get(exp, "name", "experiment")
    version = _get(exp, "version")
    status = _get(exp, "status", "unknown status")
    return f"{name}{f' v{version}' if version is not None else ''} ({status})"


def _facts(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    exp = _experiment(report)
    split = _get(exp, "split", {})
    segment = _get(exp, "segment")
    alpha = _alpha(report)
    primary = _primary(report)
    facts = [
        ("started", _when(_get(exp, "start"))),
        ("stopped", _when(_get(exp, "stop")) if _get(exp, "stop") else "not stopped"),
        ("planned split", ", ".join(
            f"{a} {w:.0%}" if _finite(w) else str(a) for a, w in split.items()) or _DASH),
        ("control arm", str(_control(report) or _DASH)),
        ("primary metric", f"{primary} ({_label(report, primary)})" if primary else _DASH),
        ("guardrails", ", ".join(_guardrails(report)) or _DASH),
        ("segment", str(segment) if segment else "all users"),
        ("intervals", f"{1 - alpha:.0%} confidence, alpha={alpha:g}"),
        ("generated", _when(_get(report, "generated_at"))),
    ]
    return facts


# ---------------------------------------------------------------------------------------------
# the rows, shared by both views

_SUMMARY_HEADERS = (
    "arm", "config", "users", "exposures", "{primary} [CI]", "lift vs {control} [CI]", "p",
    "seq. p", "CUPED lift [CI]", "verdict",
)
_GUARDRAIL_HEADERS = (
    "metric", "arm", "estimate [CI]", "lift vs {control} [CI]", "p", "seq. p",
    "CUPED lift [CI]", "verdict",
)


def _lift_lines(c: Mapping[str, Any] | None, percent: bool, compact: bool) -> list[str]:
    if not c:
        return [_DASH]
    lines = [_difference(c, percent, compact)]
    relative = _relative(c, compact)
    if relative:
        lines.append(f"{'rel.' if compact else 'relative'} {relative}")
    return lines


def _arm_label(name: str, is_control: bool, compact: bool = False) -> str:
    """The arm's name, with "(control)" when that is not already its name."""
    return name if compact or not is_control or name == "control" else f"{name} (control)"


def _summary_rows(report: Mapping[str, Any], compact: bool) -> list[dict[str, Any]]:
    primary, control = _primary(report), _control(report)
    percent = _percent(report, primary)
    rows = []
    for arm in _get(report, "arms", []):
        name = str(arm.get("name"))
        is_control = name == control
        c = None if is_control else _comparison(report, name, primary)
        estimate = _get(_get(arm, "metrics", {}), primary or "")
        rows.append({
            "arm": _arm_label(name, is_control, compact),
            "name": name,
            "config": str(_get(arm, "config", _DASH)),
            "users": _count(arm.get("users")),
            "exposures": _count(arm.get("exposures")),
            "estimate": _interval(estimate, percent, compact=compact),
            **_result(report, c, percent, compact),
        })
    return rows


def _result(report: Mapping[str, Any], c: Mapping[str, Any] | None, percent: bool,
            compact: bool) -> dict[str, Any]:
    """A row's comparison with the control (None: the control's own row)."""
    if c is None:
        return {"lift": [_DASH], "p": _DASH, "seq_p": _DASH, "cuped": [_DASH],
                "verdict": "baseline"}
    return {"lift": _lift_lines(c, percent, compact), "p": _p(_get(c, "p_value")),
            "seq_p": _p(_get(_get(c, "sequential"), "p_value")),
            "cuped": _cuped(c, percent, compact), "verdict": verdict(c, report)}


def _guardrail_rows(report: Mapping[str, Any], compact: bool) -> list[dict[str, Any]]:
    control = _control(report)
    rows = []
    for metric in _guardrails(report):
        percent = _percent(report, metric)
        for arm in _get(report, "arms", []):
            name = str(arm.get("name"))
            is_control = name == control
            c = None if is_control else _comparison(report, name, metric)
            rows.append({
                "metric": metric,
                "label": _label(report, metric),
                "arm": _arm_label(name, is_control, compact),
                "name": name,
                "estimate": _interval(
                    _get(_get(arm, "metrics", {}), metric), percent, compact=compact
                ),
                **_result(report, c, percent, compact),
            })
    return rows


# ---------------------------------------------------------------------------------------------
# the terminal view


def _legend(report: Mapping[str, Any]) -> str:
    """What the columns mean, under the tables."""
    level = f"{1 - _alpha(report):.0%}"
    return (
        f"[CI]: {level} confidence interval; pp: percentage points; rel.: lift relative to the "
        "control; p: fixed-horizon test; seq. p: sequential, valid at any look; CUPED: lift with "
        "pre-experiment variance removed"
    )


def _table(title: str, caption: str | None = None) -> Table:
    # no padding: the box's blank column divider is the one space between columns, so that
    # ten columns fit in 140 characters
    return Table(
        title=title, caption=caption, box=box.SIMPLE_HEAD, title_justify="left",
        title_style="bold", caption_justify="left", caption_style="dim", header_style="bold",
        padding=(0, 0), pad_edge=False,
    )


def _add_columns(table: Table, headers: Sequence[str], **names: str) -> None:
    for header in headers:
        numeric = header in ("config", "users", "exposures", "p", "seq. p")
        table.add_column(
            header.format(**names),
            justify="right" if numeric else "left",
            # only the verdict wraps (but see `_fit`)
            no_wrap=header != "verdict",
            overflow="fold",
        )


def _fit(table: Table, console: Console) -> Table:
    """The table, its cells allowed to wrap when the console is too narrow for it unwrapped.

    Rich crops a no-wrap cell that does not fit, and a cropped number is a wrong number.
    """
    unbounded = console.options.update_width(1_000_000)  # a measure is capped by the width
    needed = len(table.columns) + 1  # the column dividers and the edges
    for column in table.columns:
        sizes = [Measurement.get(console, unbounded, c) for c in [column.header, *column.cells]]
        needed += max(m.maximum if column.no_wrap else m.minimum for m in sizes)
    if needed > console.options.max_width:
        for column in table.columns:
            column.no_wrap = False
    return table


def print_report(report: Mapping[str, Any], console: Console) -> None:
    """The report as rich tables: the arms on the primary metric, the guardrails, the SRM line."""
    primary, control = _primary(report), _control(report) or "control"
    console.print(Text(f"experiment {_heading(report)}", style="bold"))
    facts = Table.grid(padding=(0, 1))
    for _ in range(2):
        facts.add_column(style="dim", justify="right", no_wrap=True)
        facts.add_column(min_width=44)
    cells = [x for k, v in _facts(report) for x in (k, v)]
    for i in range(0, len(cells), 4):
        facts.add_row(*cells[i:i + 4])
    console.print(facts)
    console.print()

    table = _table(f"primary metric: {primary} ({_label(report, primary)})")
    _add_columns(table, _SUMMARY_HEADERS, primary=str(primary), control=control)
    for row in _summary_rows(report, compact=True):
        table.add_row(
            row["arm"], row["config"], row["users"], row["exposures"], row["estimate"],
            "\n".join(row["lift"]), row["p"], row["seq_p"], "\n".join(row["cuped"]),
            Text(row["verdict"], style=_verdict_style(row["verdict"])),
        )
    console.print(_fit(table, console))

    guardrails = _guardrail_rows(report, compact=True)
    if guardrails:
        table = _table("guardrail metrics", caption=_legend(report))
        _add_columns(table, _GUARDRAIL_HEADERS, control=control)
        previous = None
        for row in guardrails:
            if previous is not None and row["metric"] != previous:
                table.add_section()
            metric = row["metric"] if row["metric"] != previous else ""
            previous = row["metric"]
            table.add_row(
                metric, row["arm"], row["estimate"], "\n".join(row["lift"]), row["p"],
                row["seq_p"], "\n".join(row["cuped"]),
                Text(row["verdict"], style=_verdict_style(row["verdict"])),
            )
        console.print(_fit(table, console))

    line, severity = _srm_line(report)
    style = {"bad": "bold white on red", "good": "bold green", "unknown": "yellow"}[severity]
    console.print(Text(line, style=style))
    if _untrustworthy(report) and severity != "bad":
        console.print(Text("UNTRUSTWORTHY: the report is marked untrustworthy", style="bold red"))
    for note in _get(report, "notes", []):
        console.print(Text(f"note: {note}", style="dim"))


# ---------------------------------------------------------------------------------------------
# the plots


def _png(fig: Any) -> str:
    """The figure as a base64 PNG, and the figure released."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    finally:
        fig.clear()
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _dates(points: Iterable[Mapping[str, Any]]) -> list[datetime]:
    return [datetime.fromtimestamp(p["t"], UTC) for p in points]


def _timeline_figure(report: Mapping[str, Any]) -> Any | None:
    """The primary metric per arm over event time: cumulative estimate and its band."""
    from matplotlib import dates as mdates
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    primary = _primary(report)
    percent = _percent(report, primary)
    points: dict[str, list[dict]] = {}
    for p in _get(report, "timeline", []):
        if p.get("metric") == primary and _finite(p.get("t")) and _finite(p.get("estimate")):
            points.setdefault(str(p.get("arm")), []).append(p)
    if not points:
        return None
    names = _arm_names(report)
    names += [a for a in points if a not in names]
    colors = arm_colors(names)
    scale = 100 if percent else 1

    fig = Figure(figsize=(11, 4.6), layout="constrained")
    ax = fig.add_subplot()
    for name in names:
        series = sorted(points.get(name, []), key=lambda p: p["t"])
        if not series:
            continue
        ts = [datetime.fromtimestamp(p["t"], UTC) for p in series]
        est = [p["estimate"] * scale for p in series]
        last = series[-1]
        label = f"{_arm_label(name, name == _control(report))}: "
        label += _value(last["estimate"], percent, _decimals(last, percent), unit="%" if percent
                        else "")
        ax.plot(ts, est, color=colors[name], linewidth=2.2, label=label, zorder=3)
        banded = [p for p in series if _finite(p.get("low")) and _finite(p.get("high"))]
        if banded:
            ax.fill_between(
                [datetime.fromtimestamp(p["t"], UTC) for p in banded],
                [p["low"] * scale for p in banded], [p["high"] * scale for p in banded],
                color=colors[name], alpha=0.15, linewidth=0, zorder=2,
            )
    locator = mdates.AutoDateLocator(minticks=4, maxticks=9)
    ax.xaxis.set_major_locator(locator)
    # no offset text under the axis (it reads as one more tick): the years go in the label
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, show_offset=False))
    if percent:
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}%"))
    level = f"{1 - _alpha(report):.0%}"
    ax.set_title(
        f"{_label(report, primary)} ({primary}) per arm over time: cumulative estimate, "
        f"{level} confidence band", fontsize=12, loc="left",
    )
    years = sorted({t.year for p in points.values() for t in _dates(p)})
    span = str(years[0]) if years[0] == years[-1] else f"{years[0]}-{years[-1]}"
    ax.set_xlabel(f"event time (UTC, {span})")
    ax.set_ylabel(f"{primary} (%)" if percent else f"{primary}")
    ax.grid(True, color="#e3e3e3", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.legend(title="arm: latest estimate", loc="best", frameon=True, framealpha=0.9,
              fontsize=9, title_fontsize=9)
    return fig


_KINDS = (
    # key, legend label, marker, line style, vertical offset (in rows)
    ("difference", "fixed-horizon", "o", "-", 0.22),
    ("sequential", "sequential (always valid)", "s", "--", 0.0),
    ("cuped", "CUPED (variance-reduced)", "D", ":", -0.22),
)


def _lift_figure(report: Mapping[str, Any]) -> Any | None:
    """A forest plot: per metric a panel; per non-control arm the lift with its intervals."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    comparisons = [c for c in _get(report, "comparisons", []) if _get(c, "difference")]
    if not comparisons:
        return None
    primary = _primary(report)
    metrics = [m for m in dict.fromkeys([primary, *_guardrails(report)]) if m]
    metrics += [m for m in dict.fromkeys(c.get("metric") for c in comparisons) if m not in metrics]
    metrics = [m for m in metrics if any(c.get("metric") == m for c in comparisons)]
    names = _arm_names(report)
    colors = arm_colors(names)
    arms = [a for a in names if any(c.get("arm") == a for c in comparisons)]
    control = _control(report) or "control"

    heights = [0.9 + 0.75 * len(arms) for _ in metrics]
    fig = Figure(figsize=(11, sum(heights) + 0.9), layout="constrained")
    axes = fig.subplots(len(metrics), 1, squeeze=False, height_ratios=heights)[:, 0]
    used: set[str] = set()
    for ax, metric in zip(axes, metrics, strict=True):
        percent = _percent(report, metric)
        scale = 100 if percent else 1
        ticks, labels = [], []
        for row, arm in enumerate(arms):
            y = len(arms) - 1 - row
            c = _comparison(report, arm, metric)
            ticks.append(y)
            if not c:
                labels.append(f"{arm}\n(no comparison)")
                continue
            seq_p = _get(_get(c, "sequential"), "p_value")
            labels.append(f"{arm}\n{_p_is(c.get('p_value'))}, seq. {_p_is(seq_p)}")
            for key, _, marker, style, offset in _KINDS:
                interval = _get(c, key)
                if not interval:
                    continue
                # a sequential interval may come without its point estimate: the fixed one's
                est = _get(interval, "estimate", _get(_get(c, "difference"), "estimate"))
                low, high = _get(interval, "low"), _get(interval, "high")
                if _finite(low) and _finite(high):
                    ax.hlines(y + offset, low * scale, high * scale, color=colors[arm],
                              linestyle=style, linewidth=2.2, zorder=3)
                    ax.vlines([low * scale, high * scale], y + offset - 0.07, y + offset + 0.07,
                              color=colors[arm], linewidth=2.2, zorder=3)
                if _finite(est):
                    ax.plot(est * scale, y + offset, marker=marker, color=colors[arm],
                            markersize=7, markeredgecolor="white", linestyle="none", zorder=4)
                used.add(key)
        ax.axvline(0, color="#333333", linewidth=1.1, zorder=1)
        ax.set_yticks(ticks, labels, fontsize=9)
        ax.set_ylim(-0.6, len(arms) - 0.4)
        lo, hi = ax.get_xlim()
        span = max(abs(lo), abs(hi))
        ax.set_xlim(-span * 1.08, span * 1.08)  # zero in the middle: the sign reads at a glance
        if percent:
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:+g} pp" if v else "0"))
            unit = " (percentage points)"
        else:
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:+g}" if v else "0"))
            unit = ""
        ax.set_xlabel(f"difference in {metric}, arm minus {control}{unit}", fontsize=9)
        kind = "primary" if metric == primary else "guardrail"
        ax.set_title(f"{metric}: {_label(report, metric)} ({kind})", fontsize=11, loc="left")
        ax.grid(True, axis="x", color="#e3e3e3", linewidth=0.8)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    handles = [
        Line2D([], [], color="#444444", marker=marker, linestyle=style, linewidth=2,
               label=label)
        for key, label, marker, style, _ in _KINDS if key in used
    ]
    level = f"{1 - _alpha(report):.0%}"
    fig.suptitle(f"lift vs {control} with {level} intervals (right of 0: arm above {control})",
                 fontsize=12, x=0.01, ha="left")
    # under the plots, not beside the title: a long title and the legend cannot collide
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=9,
               frameon=False, title="interval", title_fontsize=9)
    return fig


# ---------------------------------------------------------------------------------------------
# the HTML view

_CSS = """
body { font-family: -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif;
       color: #1d1d1f; background: #ffffff; margin: 0; }
main { max-width: 1160px; margin: 0 auto; padding: 18px 20px 40px; }
h1 { font-size: 24px; margin: 4px 0 10px; }
h2 { font-size: 18px; margin: 26px 0 8px; border-bottom: 1px solid #dddddd; padding-bottom: 4px; }
.banner { padding: 10px 14px; border-radius: 6px; font-size: 15px; margin: 8px 0 12px;
          border: 1px solid #c9ced6; background: #f2f4f7; color: #1d1d1f; }
.banner.bad { background: #fde8e8; border: 2px solid #a50e0e; color: #8a0b0b; font-weight: 600; }
.facts { display: flex; flex-wrap: wrap; gap: 4px 22px; font-size: 13px; color: #444444;
         margin: 0 0 6px; padding: 0; list-style: none; }
.facts b { color: #777777; font-weight: normal; }
table { border-collapse: collapse; font-size: 13px; margin: 4px 0; }
th, td { padding: 5px 10px; border-bottom: 1px solid #e4e4e4; text-align: left;
         vertical-align: top; }
th { background: #f6f6f6; font-weight: 600; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.arm { white-space: nowrap; }
td.ci { font-variant-numeric: tabular-nums; white-space: nowrap; }
td .sub { color: #666666; font-size: 12px; }
tr.group td { border-top: 2px solid #cccccc; }
.v-good { color: #116b2f; font-weight: 600; }
.v-bad { color: #a50e0e; font-weight: 600; }
.v-none { color: #666666; }
.v-srm { color: #ffffff; background: #a50e0e; font-weight: 600; }
.srm-ok { color: #116b2f; font-weight: 600; }
.srm-bad { color: #a50e0e; font-weight: 700; }
figure { margin: 10px 0 4px; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid #eeeeee; }
figcaption { font-size: 12px; color: #555555; margin-top: 4px; }
.empty { color: #777777; font-style: italic; }
ul.notes { font-size: 13px; color: #444444; }
p { font-size: 14px; }
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _verdict_class(text: str) -> str:
    return f"v-{_verdict_kind(text)}"


def _lift_cell(lines: Sequence[str]) -> str:
    first, *rest = lines
    return _e(first) + "".join(f'<br><span class="sub">{_e(x)}</span>' for x in rest)


def _summary_html(report: Mapping[str, Any]) -> str:
    primary, control = _primary(report), _control(report) or "control"
    rows = _summary_rows(report, compact=False)
    if not rows:
        return '<p class="empty">no arm has data yet</p>'
    head = "".join(
        f"<th>{_e(h.format(primary=primary, control=control))}</th>" for h in _SUMMARY_HEADERS
    )
    body = []
    for r in rows:
        body.append(
            "<tr>"
            f"<td class=arm>{_e(r['arm'])}</td><td class=num>{_e(r['config'])}</td>"
            f"<td class=num>{_e(r['users'])}</td><td class=num>{_e(r['exposures'])}</td>"
            f"<td class=ci>{_e(r['estimate'])}</td>{_result_cells(r)}</tr>"
        )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _result_cells(r: Mapping[str, Any]) -> str:
    """The cells both tables end with: lift, p, sequential p, CUPED lift, verdict."""
    return (f"<td class=ci>{_lift_cell(r['lift'])}</td><td class=num>{_e(r['p'])}</td>"
            f"<td class=num>{_e(r['seq_p'])}</td><td class=ci>{_lift_cell(r['cuped'])}</td>"
            f"<td class=\"{_verdict_class(r['verdict'])}\">{_e(r['verdict'])}</td>")


def _guardrails_html(report: Mapping[str, Any]) -> str:
    control = _control(report) or "control"
    rows = _guardrail_rows(report, compact=False)
    if not rows:
        return '<p class="empty">no guardrail metrics</p>'
    head = "".join(f"<th>{_e(h.format(control=control))}</th>" for h in _GUARDRAIL_HEADERS)
    body, previous = [], None
    for r in rows:
        first = r["metric"] != previous
        metric = (
            f"<b>{_e(r['metric'])}</b><br><span class=sub>{_e(r['label'])}</span>" if first else ""
        )
        previous = r["metric"]
        body.append(
            f"<tr{' class=group' if first else ''}>"
            f"<td>{metric}</td><td class=arm>{_e(r['arm'])}</td>"
            f"<td class=ci>{_e(r['estimate'])}</td>{_result_cells(r)}</tr>"
        )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _srm_html(report: Mapping[str, Any]) -> str:
    line, severity = _srm_line(report)
    cls = {"bad": "srm-bad", "good": "srm-ok", "unknown": "empty"}[severity]
    out = [f'<p class="{cls}">{_e(line)}</p>']
    srm = _get(report, "srm")
    if srm:
        observed, expected = _get(srm, "observed", {}), _get(srm, "expected", {})
        total_o = sum(v for v in observed.values() if _finite(v)) or None
        total_e = sum(v for v in expected.values() if _finite(v)) or None
        rows = []
        for arm in dict.fromkeys([*_arm_names(report), *observed, *expected]):
            o, x = observed.get(arm), expected.get(arm)
            if o is None and x is None:
                continue
            share_o = f"{o / total_o:.2%}" if _finite(o) and total_o else _DASH
            share_e = f"{x / total_e:.2%}" if _finite(x) and total_e else _DASH
            diff = f"{o - x:+,.0f}" if _finite(o) and _finite(x) else _DASH
            rel = f"{(o - x) / x:+.2%}" if _finite(o) and _finite(x) and x else _DASH
            rows.append(
                f"<tr><td>{_e(arm)}</td><td class=num>{_count(o)}</td>"
                f"<td class=num>{_e(f'{x:,.1f}' if _finite(x) else _DASH)}</td>"
                f"<td class=num>{share_o}</td><td class=num>{share_e}</td>"
                f"<td class=num>{_e(diff)}</td><td class=num>{_e(rel)}</td></tr>"
            )
        out.append(
            "<table><thead><tr><th>arm</th><th>observed users</th><th>expected users</th>"
            "<th>observed share</th><th>planned share</th><th>observed - expected</th>"
            f"<th>relative</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        )
        chi2 = f"{srm['chi2']:.3f}" if _finite(srm.get("chi2")) else _DASH
        out.append(
            f"<p>chi-square goodness of fit: chi2 = {_e(chi2)}, "
            f"{_e(_p_is(srm.get('p_value')))}; a very small p means the observed split is "
            "unlikely under the planned one.</p>"
        )
    return "".join(out)


def _figure_html(fig: Any | None, alt: str, caption: str, empty: str) -> str:
    if fig is None:
        return f'<p class="empty">{_e(empty)}</p>'
    data = _png(fig)
    return (
        f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


def render_html(report: Mapping[str, Any]) -> str:
    """The whole report as one self-contained HTML document (see `write_html`)."""
    exp = _experiment(report)
    heading = _heading(report)
    untrustworthy = _untrustworthy(report)
    srm_text, severity = _srm_line(report)
    if severity == "bad":
        banner = f'<div class="banner bad">{_e(srm_text)}</div>'
    elif untrustworthy:
        banner = '<div class="banner bad">UNTRUSTWORTHY: the report is marked untrustworthy</div>'
    else:
        status = _get(exp, "status", "unknown")
        stage = {
            "running": "Running: interim results; before the planned end, read the sequential "
                       "p-values (valid at any look)",
            "stopped": "Stopped: final results",
            "planned": "Planned: no exposures yet",
        }.get(status, f"Status: {status}")
        srm_sentence = srm_text[:1].upper() + srm_text[1:]
        banner = f'<div class="banner">{_e(stage)}.<br>{_e(srm_sentence)}.</div>'

    facts = "".join(f"<li><b>{_e(k)}</b> {_e(v)}</li>" for k, v in _facts(report))
    primary, control = _primary(report), _control(report) or "control"
    level = f"{1 - _alpha(report):.0%}"
    timeline = _figure_html(
        _timeline_figure(report),
        f"{primary} per arm over time with its {level} confidence band",
        f"Cumulative {primary} of each arm at successive event times; the shaded band is its "
        f"{level} confidence interval.",
        f"no timeline of {primary} yet",
    )
    lift = _figure_html(
        _lift_figure(report),
        f"lift vs {control} per arm and metric with fixed-horizon and sequential intervals",
        f"Each row is one arm against {control}: the point is the estimated difference, the "
        "whiskers its interval (solid: fixed-horizon test, dashed: sequential, always-valid "
        "interval, dotted: CUPED). An interval that crosses the vertical line at 0 is not "
        "significant.",
        "no comparison yet",
    )
    notes = _get(report, "notes", [])
    notes_html = (
        "<h2>Notes</h2><ul class=notes>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>"
        if notes else ""
    )
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>{_e(_get(exp, 'name', 'experiment'))}: experiment report "
        f"({_e(_get(exp, 'status', 'unknown'))})</title>"
        f"<style>{_CSS}</style></head><body><main>"
        f"<h1>Experiment {_e(heading)}</h1>{banner}<ul class=facts>{facts}</ul>"
        f"<h2>Summary: {_e(primary)} ({_e(_label(report, primary))})</h2>"
        f"{_summary_html(report)}"
        f"<h2>Guardrail metrics</h2>{_guardrails_html(report)}"
        f"<h2>{_e(primary)} over time</h2>{timeline}"
        f"<h2>Lift vs {_e(control)}</h2>{lift}"
        f"<h2>Sample ratio check</h2>{_srm_html(report)}"
        f"{notes_html}"
        "</main></body></html>\n"
    )


def write_html(report: Mapping[str, Any], path: Path) -> Path:
    """Write the report to `path` as one self-contained HTML file; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(report), encoding="utf-8")
    return path
