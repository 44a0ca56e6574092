"""The experiment report's two renderings: the rich table and the self-contained HTML page.

The reports are built here as the statistics would build them: binomial clicks and normal
dwell/feedback per arm, the delta-method comparison vs the control, a cumulative timeline of
~30 points per arm. The HTML page is opened by a real headless Chromium (Debian's package):
its screenshot must show the plots in the arms' colours, and its DOM the arms and SRM status.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from adapters.experiment_report import arm_colors, print_report, verdict, write_html

START = 1767225600.0  # 2026-01-01 00:00 UTC
HOUR = 3600.0
Z = 1.959963984540054
METRICS = {
    "ctr": {"label": "click-through per exposure", "percent": True},
    "dwell": {"label": "mean dwell (s) per exposure", "percent": False},
    "feedback": {"label": "mean feedback y", "percent": False},
}
# the true value of each metric per arm: a treatment that lifts CTR and leaves the rest alone
TRUTH = {
    "control": {"ctr": 0.100, "dwell": 12.0, "feedback": 0.30},
    "treatment": {"ctr": 0.106, "dwell": 12.1, "feedback": 0.30},
    "deep-rank": {"ctr": 0.107, "dwell": 11.8, "feedback": 0.31},
    "fresh-boost": {"ctr": 0.097, "dwell": 12.0, "feedback": 0.29},
}
SPREAD = {"dwell": 9.0, "feedback": 1.0}  # per-exposure standard deviations


def p_two_sided(z: float) -> float:
    return math.erfc(abs(z) / math.sqrt(2))


def interval(estimate: float, se: float, **extra) -> dict:
    return {"estimate": estimate, "low": estimate - Z * se, "high": estimate + Z * se, **extra}


def make_report(arms=("control", "treatment"), *, mismatch=False, seed=7, points=30) -> dict:
    """A report as the experiment statistics produce it (see adapters/experiment_report.py)."""
    rng = np.random.default_rng(seed)
    split = {a: 1 / len(arms) for a in arms}
    total_users = 10_000
    if mismatch:  # the last arm lost 12% of its users (a redirect that drops some, say)
        users = {a: total_users / len(arms) for a in arms}
        users[arms[-1]] *= 0.88
        users = {a: int(rng.poisson(u)) for a, u in users.items()}
    else:
        counts = rng.multinomial(total_users, list(split.values()))
        users = {a: int(n) for a, n in zip(arms, counts, strict=True)}
    exposures = {a: int(users[a] * rng.uniform(11.8, 12.2)) for a in arms}

    # the timeline: cumulative estimates at `points` event times, as exposures accrue
    timeline, final = [], {}
    times = START + HOUR * np.arange(1, points + 1) * 1.6
    for a in arms:
        steps = np.diff(np.linspace(0, exposures[a], points + 1).astype(int))
        clicks = rng.binomial(steps, TRUTH[a]["ctr"])
        n = np.cumsum(steps)
        sums = {
            "ctr": np.cumsum(clicks),
            **{m: np.cumsum(rng.normal(TRUTH[a][m] * steps, SPREAD[m] * np.sqrt(steps)))
               for m in SPREAD},
        }
        for m in METRICS:
            means = sums[m] / n
            sd = np.sqrt(means * (1 - means)) if m == "ctr" else np.full(points, SPREAD[m])
            for t, est, se in zip(times, means, sd / np.sqrt(n), strict=True):
                timeline.append({"t": float(t), "arm": a, "metric": m, **interval(float(est), se)})
            final[a, m] = (float(means[-1]), float(sd[-1] / math.sqrt(n[-1])))

    arm_rows = [
        {"name": a, "config": 4 + i, "users": users[a], "exposures": exposures[a],
         "metrics": {m: interval(final[a, m][0], final[a, m][1], n=users[a]) for m in METRICS}}
        for i, a in enumerate(arms)
    ]
    control = arms[0]
    comparisons = []
    for a in arms[1:]:
        for m in METRICS:
            (xb, sb), (xa, sa) = final[a, m], final[control, m]
            diff, se = xb - xa, math.hypot(sa, sb)
            p = p_two_sided(diff / se)
            seq_se = se * 1.55  # an always-valid interval is wider
            cuped_se = se * 0.8
            cuped = diff + rng.normal(0, se * 0.3)
            comparisons.append({
                "arm": a, "vs": control, "metric": m, "primary": m == "ctr",
                "difference": interval(diff, se),
                "relative": interval(diff / xa, se / xa),
                "p_value": p, "method": "delta-method z",
                "sequential": {"p_value": min(1.0, p_two_sided(diff / seq_se) * 1.3),
                               "low": diff - Z * seq_se, "high": diff + Z * seq_se},
                "cuped": interval(cuped, cuped_se, p_value=p_two_sided(cuped / cuped_se)),
                "significant": p < 0.05,
            })

    observed = {a: users[a] for a in arms}
    expected = {a: sum(observed.values()) * split[a] for a in arms}
    chi2 = sum((observed[a] - expected[a]) ** 2 / expected[a] for a in arms)
    dof = len(arms) - 1
    # chi-square survival function for 1 or 2 degrees of freedom (no scipy needed here)
    srm_p = math.erfc(math.sqrt(chi2 / 2)) if dof == 1 else math.exp(-chi2 / 2)
    assert dof <= 2
    return {
        "experiment": {"name": "ranker-v2", "version": 3, "status": "running",
                       "start": START, "stop": None, "split": split, "control": control,
                       "primary": "ctr", "guardrails": ["dwell", "feedback"], "segment": None},
        "generated_at": float(times[-1] + 600),
        "alpha": 0.05,
        "metrics": METRICS,
        "srm": {"chi2": chi2, "p_value": srm_p, "mismatch": srm_p < 0.001,
                "observed": observed, "expected": expected},
        "trustworthy": srm_p >= 0.001,
        "arms": arm_rows,
        "comparisons": comparisons,
        "timeline": timeline,
        "notes": ["exposures without a running experiment are not counted",
                  "users are assigned by a hash of (experiment, user id)"],
    }


REPORTS = {
    "two-arm": lambda: make_report(),
    "three-arm": lambda: make_report(("control", "deep-rank", "fresh-boost"), seed=11),
    "srm": lambda: make_report(mismatch=True, seed=3),
}


def names(report: dict) -> list[str]:
    return [a["name"] for a in report["arms"]]


def shown(p: float) -> str:
    """A p-value as the report shows it: two significant digits."""
    return "<0.0001" if p < 0.0001 else f"{p:.2g}"


def test_the_sample_reports_are_what_they_claim():
    for build in REPORTS.values():
        report = build()
        assert json.loads(json.dumps(report)) == report  # plain JSON, as it arrives
        assert len([p for p in report["timeline"] if p["metric"] == "ctr"]) == 30 * len(
            report["arms"])
    assert not REPORTS["two-arm"]()["srm"]["mismatch"]
    assert not REPORTS["three-arm"]()["srm"]["mismatch"]
    srm = REPORTS["srm"]()
    assert srm["srm"]["mismatch"] and not srm["trustworthy"]
    primary = next(c for c in REPORTS["two-arm"]()["comparisons"] if c["primary"])
    assert primary["significant"] and primary["difference"]["estimate"] > 0


# ---------------------------------------------------------------------------------------------
# the verdict


def test_verdict_by_the_fixed_horizon_test_and_its_sign():
    report = REPORTS["two-arm"]()
    c = {"arm": "B", "difference": {"estimate": 0.01}, "p_value": 0.001, "significant": True}
    assert verdict(c, report) == "B better"
    c_worse = {**c, "difference": {"estimate": -0.01}}
    assert verdict(c_worse, report) == "B worse"
    c_flat = {**c, "p_value": 0.4, "significant": False}
    assert verdict(c_flat, report) == "no significant difference"
    # without `significant`, p < alpha decides
    assert verdict({"arm": "B", "difference": {"estimate": 0.01}, "p_value": 0.01}, report) == (
        "B better"
    )
    assert verdict({"arm": "B", "difference": {"estimate": 0.01}, "p_value": 0.2}, report) == (
        "no significant difference"
    )
    # a broken split overrides everything
    assert verdict(c, REPORTS["srm"]()) == "untrustworthy (SRM)"


# ---------------------------------------------------------------------------------------------
# the terminal view


def rich_text(report: dict) -> str:
    console = Console(file=io.StringIO(), record=True, width=140)
    print_report(report, console)
    return console.export_text()


@pytest.mark.parametrize("variant", list(REPORTS))
def test_print_report_names_every_arm_and_the_p_values(variant):
    report = REPORTS[variant]()
    text = rich_text(report)
    for name in names(report):
        assert name in text
    for c in report["comparisons"]:
        if c["primary"]:
            assert shown(c["p_value"]) in text
            assert shown(c["sequential"]["p_value"]) in text
    for metric in report["experiment"]["guardrails"]:
        assert metric in text
    srm_p = shown(report["srm"]["p_value"])
    assert (f"p{srm_p}" if srm_p.startswith("<") else f"p={srm_p}") in text
    if variant == "srm":
        assert "UNTRUSTWORTHY: sample ratio mismatch" in text
        assert "untrustworthy (SRM)" in text
    else:
        assert "UNTRUSTWORTHY" not in text and "untrustworthy" not in text
        assert "no sample ratio mismatch" in text
    if variant == "two-arm":
        assert "treatment better" in text  # the CTR lift is significant


def test_a_narrow_console_wraps_cells_rather_than_cropping_numbers():
    report = REPORTS["three-arm"]()
    console = Console(file=io.StringIO(), record=True, width=90)
    print_report(report, console)
    text = console.export_text()
    assert "…" not in text
    assert all(len(line) <= 90 for line in text.splitlines())
    for name in names(report):
        assert name in text
    for c in report["comparisons"]:
        assert shown(c["p_value"]) in text and shown(c["sequential"]["p_value"]) in text


def test_print_report_colours_the_srm_line():
    def srm_line(report):
        console = Console(file=io.StringIO(), width=140, force_terminal=True,
                          color_system="standard")
        print_report(report, console)
        return next(line for line in console.file.getvalue().splitlines()
                    if "sample ratio" in line and "planned split" not in line)

    # ANSI SGR: 1 bold, 37 white, 41 red background; 32 green
    assert srm_line(REPORTS["srm"]()).startswith("\x1b[1;37;41mUNTRUSTWORTHY: sample ratio")
    assert srm_line(REPORTS["two-arm"]()).startswith("\x1b[1;32msample ratio OK")


def minimal_report() -> dict:
    """Every optional part missing or None: a planned experiment with no data."""
    return {
        "experiment": {"name": "cold-start", "version": 1, "status": "planned", "start": None,
                       "stop": None, "split": {"control": 0.5, "treatment": 0.5},
                       "control": "control", "primary": "ctr", "guardrails": None,
                       "segment": None},
        "generated_at": START,
        "alpha": None,
        "metrics": {"ctr": {"label": "click-through per exposure", "percent": True}},
        "srm": None,
        "trustworthy": None,
        "arms": [],
        "comparisons": [],
    }


def test_optional_parts_may_be_missing():
    report = REPORTS["two-arm"]()
    for c in report["comparisons"]:
        c["relative"] = c["sequential"] = c["cuped"] = None
    del report["notes"], report["timeline"]
    text = rich_text(report)
    assert "treatment" in text and "UNTRUSTWORTHY" not in text

    text = rich_text(minimal_report())
    assert "cold-start" in text and "sample ratio not checked" in text


def test_write_html_copes_with_missing_parts(tmp_path):
    report = REPORTS["two-arm"]()
    for c in report["comparisons"]:
        c["relative"] = c["sequential"] = c["cuped"] = None
    del report["notes"], report["timeline"]
    page = write_html(report, tmp_path / "partial.html").read_text()
    assert page.count("<img") == 1  # the forest plot; no timeline to draw
    assert "no timeline of ctr yet" in page

    page = write_html(minimal_report(), tmp_path / "minimal.html").read_text()
    assert "cold-start" in page and "no comparison yet" in page and "<img" not in page


# ---------------------------------------------------------------------------------------------
# the HTML file


class Resources(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        self._in_title = tag == "title"
        self.refs += [(tag, k, v or "") for k, v in attrs if k in ("src", "href", "srcset")]

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.title += data


@pytest.mark.parametrize("variant", list(REPORTS))
def test_write_html_is_one_self_contained_file(tmp_path, variant):
    report = REPORTS[variant]()
    before = plt.get_fignums()
    path = write_html(report, tmp_path / "report.html")
    assert path == tmp_path / "report.html" and path.is_file()
    assert plt.get_fignums() == before  # no figure left behind in pyplot
    page = path.read_text(encoding="utf-8")

    parsed = Resources()
    parsed.feed(page)
    assert "ranker-v2" in parsed.title and "running" in parsed.title
    assert "http://" not in page and "https://" not in page and "<script" not in page
    images = [v for tag, _, v in parsed.refs if tag == "img"]
    assert len(images) == 2  # the timeline and the forest plot
    assert all(v.startswith("data:image/png;base64,") for v in images)
    for v in images:
        assert base64.b64decode(v.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [r for r in parsed.refs if r[0] != "img"]  # no stylesheet or link to fetch
    for name in names(report):
        assert name in page
    assert ('class="banner bad"' in page) == (variant == "srm")


# ---------------------------------------------------------------------------------------------
# a real browser


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found and Path("/usr/bin/chromium").exists():
        found = "/usr/bin/chromium"
    if not found:
        pytest.skip("Debian's chromium is not installed: apt-get install chromium")
    return found


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    return subprocess.run(
        [chromium_path(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", "--hide-scrollbars",
         "--window-size=1280,2000", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )


def pixels_near(image: np.ndarray, color: str, tolerance: int = 24) -> int:
    """How many pixels are within `tolerance` (per channel) of `color` ("#rrggbb")."""
    rgb = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.int16)
    return int((np.abs(image.astype(np.int16) - rgb).max(axis=2) <= tolerance).sum())


BANNER_RED = "#a50e0e"


@pytest.mark.parametrize("variant", list(REPORTS))
def test_chromium_renders_the_plots_in_the_arms_colours(tmp_path, variant):
    report = REPORTS[variant]()
    page = write_html(report, tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    done = chromium(tmp_path, f"--screenshot={shot}", page.resolve().as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    assert shot.is_file()

    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape == (2000, 1280, 3)
    gray = image.mean(axis=2)
    assert gray.std() > 25  # not a blank page
    # text, tables and plots: a substantial part not white (the text alone is about 4%)
    assert (gray < 240).mean() > 0.07
    # the plots: every arm's line and whiskers, in its colour (the page uses them nowhere else)
    colors = arm_colors(names(report))
    counts = {name: pixels_near(image, color) for name, color in colors.items()}
    assert all(n > 400 for n in counts.values()), counts
    # the red banner (border and text) only when the split is broken
    assert (pixels_near(image, BANNER_RED, 16) > 500) == (variant == "srm")


@pytest.mark.parametrize("variant", ["two-arm", "srm"])
def test_chromium_dom_names_the_arms_and_the_srm_status(tmp_path, variant):
    report = REPORTS[variant]()
    page = write_html(report, tmp_path / "report.html")
    done = chromium(tmp_path, "--dump-dom", page.resolve().as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert re.search(r"<title>[^<]*ranker-v2", dom)
    for name in names(report):
        assert name in dom
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', dom)) == 2
    if variant == "srm":
        assert "UNTRUSTWORTHY: sample ratio mismatch" in dom
    else:
        assert "no sample ratio mismatch" in dom and "UNTRUSTWORTHY" not in dom
