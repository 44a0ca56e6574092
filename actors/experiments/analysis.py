"""An experiment's report, computed from the log alone: every number can be rebuilt.

For each user whose log has exposures of the experiment (the arm stamped on them), the
user's outcomes are joined to its exposures (actors/experiments/attribution.py) and summed
per user: the unit of analysis is the user, so a user with many exposures weighs as much as
its exposures say and no more, and per-exposure metrics are ratios of per-user sums with
delta-method variances (actors/experiments/statistics.py).

- metrics per arm: estimate and confidence interval (`METRICS`);
- per other arm against the control, for every metric: the difference and the relative lift
  with their intervals by the delta method (the primary test), Welch's t-test on per-user
  means, for click-through also the two-proportion z-test (which treats exposures as
  independent: shown for reference, it overstates certainty when users repeat);
- the always-valid sequential test (mSPRT) over the timeline's looks, so that reading the
  report every hour does not inflate false positives; its mixing scale tau is 10% of the
  metric's level before the experiment (`_tau_base`);
- CUPED on per-user means with the same metric of the user's exposures before the experiment
  started as the covariate, where any user has such a pre-period;
- the sample-ratio check of enrolled users against the split: a mismatch marks the report
  untrustworthy (assignment or logging is broken; no lift should be believed).

Users that data hygiene marks as bots (their current state's verdict) are left out of the
metrics and counted per arm in the notes: the verdict comes from the pace of a user's own
actions, not from what it was shown, so leaving them out favours no arm. The sample-ratio
check counts every enrolled user, bots included (it checks the assignment).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from actors.configs import ConfigRegistry
from actors.experiments import statistics as st
from actors.experiments.attribution import ExposureOutcome, attribute
from actors.experiments.definition import METRICS, Experiment
from actors.replay import current_states
from events.codec import event_from_log
from store.recorder import Recorder, StoredEvent, by_user

TIMELINE_POINTS = 30
SRM_THRESHOLD = 0.001
_LABELS = {"ctr": ("click-through per exposure", True),
           "dwell": ("dwell seconds per exposure", False),
           "feedback": ("mean feedback y", False),
           "scroll": ("mean scroll depth", False)}


@dataclass(slots=True)
class UserSums:
    """One user's exposures of the experiment and what they led to, per metric: numerator
    and denominator (click-through: clicked exposures / exposures), also per timeline bin,
    and the same before the experiment (the CUPED covariate)."""

    arm: str
    num: dict[str, float]
    den: dict[str, float]
    pre_num: dict[str, float]
    pre_den: dict[str, float]
    shown: list[ExposureOutcome]  # the experiment's exposures, for the timeline
    bot: str = ""  # data hygiene's verdict on the user (empty: a human)


def _contributions(e: ExposureOutcome) -> dict[str, tuple[float, float]]:
    """(numerator, denominator) an exposure adds to each metric."""
    return {"ctr": (float(e.clicked), 1.0), "dwell": (e.dwell, 1.0),
            "feedback": (e.feedback, 1.0) if e.feedback is not None else (0.0, 0.0),
            "scroll": (e.scroll, 1.0) if e.scroll is not None else (0.0, 0.0)}


def user_sums(rows: Iterable[StoredEvent], experiment: Experiment) -> UserSums | None:
    """One user's sums, or None if the user has no exposure of the experiment."""
    rows = list(rows)
    joined = attribute(((r.seq, event_from_log(r.body)) for r in rows), experiment.window)
    mine = [e for e in joined.exposures
            if e.arm is not None and e.arm.experiment == experiment.name]
    if not mine:
        return None
    sums = UserSums(mine[0].arm.name, *({m: 0.0 for m in METRICS} for _ in range(4)), mine)
    for e in mine:
        for metric, (num, den) in _contributions(e).items():
            sums.num[metric] += num
            sums.den[metric] += den
    for e in joined.exposures:  # before the experiment: the covariate
        if e.t < experiment.start and e.arm is None:
            for metric, (num, den) in _contributions(e).items():
                sums.pre_num[metric] += num
                sums.pre_den[metric] += den
    return sums


def collect(recorder: Recorder, experiment: Experiment,
            configs: ConfigRegistry | None = None) -> list[UserSums]:
    """Every enrolled user's sums, streaming the log user by user; with `configs`, also each
    one's bot verdict, from its current state (a second pass: snapshot and tail)."""
    users = {rows[0].user: s for rows in by_user(recorder.read_all())
             if (s := user_sums(rows, experiment))}
    if configs is not None and users:
        for state in current_states(recorder, configs, users=users.keys()):
            if state.hyg is not None and state.hyg.bot:
                users[state.user].bot = state.hyg.bot
    return list(users.values())


def report(experiment: Experiment, users: list[UserSums], *, alpha: float = 0.05,
           generated_at: float | None = None) -> dict:
    """The report (a plain, JSON-ready map; adapters/experiment_report.py renders it)."""
    arms = [a for a, _ in experiment.arms]
    enrolled = {a: 0 for a in arms}
    bots = {a: 0 for a in arms}
    by_arm: dict[str, list[UserSums]] = {a: [] for a in arms}
    for u in users:
        enrolled[u.arm] = enrolled.get(u.arm, 0) + 1
        if u.bot:
            bots[u.arm] = bots.get(u.arm, 0) + 1
        else:
            by_arm.setdefault(u.arm, []).append(u)
    metrics = [experiment.primary, *[g for g in experiment.guardrails
                                     if g != experiment.primary]]
    srm = st.srm_check([enrolled[a] for a in arms], list(experiment.split), SRM_THRESHOLD)
    out_arms = []
    for arm, version in experiment.arms:
        group = by_arm[arm]
        out_arms.append({
            "name": arm, "config": version, "users": len(group), "bots": bots[arm],
            "exposures": int(sum(u.den["ctr"] for u in group)),
            "metrics": {m: {**_interval(st.ratio_interval(*_arrays(group, m), alpha=alpha)),
                            "n": len(group)} for m in metrics}})
    timeline, looks = _timeline(experiment, by_arm, metrics, alpha)
    comparisons = []
    control = by_arm[experiment.control]
    for arm in arms:
        if arm == experiment.control:
            continue
        for metric in metrics:
            comparisons.append(_compare(experiment, control, by_arm[arm], arm, metric, alpha,
                                        looks.get((arm, metric), []),
                                        _tau_base(users, timeline, experiment, metric)))
    return {
        "experiment": {**{k: v for k, v in experiment.to_map().items() if k != "salt"},
                       "split": experiment.shares},
        "generated_at": generated_at,
        "alpha": alpha,
        "metrics": {m: {"label": _LABELS[m][0], "percent": _LABELS[m][1]} for m in metrics},
        "srm": {"chi2": srm.chi2, "p_value": srm.p_value, "mismatch": srm.mismatch,
                "observed": dict(zip(arms, srm.observed, strict=True)),
                "expected": dict(zip(arms, srm.expected, strict=True))},
        "trustworthy": not srm.mismatch,
        "arms": out_arms,
        "comparisons": comparisons,
        "timeline": timeline,
        "notes": _notes(experiment, users, bots),
    }


def _arrays(group: list[UserSums], metric: str, pre: bool = False):
    num = np.array([(u.pre_num if pre else u.num)[metric] for u in group], dtype=float)
    den = np.array([(u.pre_den if pre else u.den)[metric] for u in group], dtype=float)
    return num, den


def _interval(i: st.Interval) -> dict:
    return {"estimate": _num(i.estimate), "low": _num(i.low), "high": _num(i.high)}


def _num(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _per_user(group: list[UserSums], metric: str, pre: bool = False) -> np.ndarray:
    """Each user's own mean (users without that metric's events left out: NaN)."""
    num, den = _arrays(group, metric, pre)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _tau_base(users: list[UserSums], timeline: list[dict], experiment: Experiment,
              metric: str) -> float:
    """The metric's level the sequential test's mixing scale is set from, fixed before the
    experiment's data: the enrolled users' pre-period (pooled), else the control arm's first
    look (an approximation: one look's worth of data)."""
    den = sum(u.pre_den[metric] for u in users)
    if den > 0:
        return sum(u.pre_num[metric] for u in users) / den
    for point in timeline:
        if point["arm"] == experiment.control and point["metric"] == metric and \
                point["estimate"] is not None:
            return point["estimate"]
    return 0.0


def _compare(experiment: Experiment, control: list[UserSums], treated: list[UserSums],
             arm: str, metric: str, alpha: float, looks: list[tuple[float, float]],
             tau_base: float) -> dict:
    primary = st.ratio_comparison(*_arrays(control, metric), *_arrays(treated, metric),
                                  alpha=alpha)
    a, b = _per_user(control, metric), _per_user(treated, metric)
    welch = st.welch(a[~np.isnan(a)], b[~np.isnan(b)], alpha=alpha)
    out = {"arm": arm, "vs": experiment.control, "metric": metric,
           "primary": metric == experiment.primary,
           "difference": _interval(primary.difference),
           "relative": None if primary.relative is None else _interval(primary.relative),
           "p_value": _num(primary.p_value), "method": primary.method,
           "welch": {**_interval(welch.difference), "p_value": _num(welch.p_value)},
           "sequential": None, "cuped": None, "two_proportions": None}
    out["significant"] = bool(out["p_value"] is not None and out["p_value"] < alpha)
    if metric == "ctr":
        s_a, n_a = _arrays(control, metric)
        s_b, n_b = _arrays(treated, metric)
        two = st.two_proportions(int(s_a.sum()), int(n_a.sum()), int(s_b.sum()),
                                 int(n_b.sum()), alpha=alpha)
        out["two_proportions"] = {**_interval(two.difference), "p_value": _num(two.p_value)}
    if looks:
        seq = st.sequential(looks, st.default_tau(tau_base), alpha=alpha)
        out["sequential"] = {"p_value": _num(seq.p_value), "low": _num(seq.interval.low),
                             "high": _num(seq.interval.high), "tau": seq.tau,
                             "looks": len(looks)}
    out["cuped"] = _cuped(control, treated, metric, alpha)
    return out


def _cuped(control: list[UserSums], treated: list[UserSums], metric: str,
           alpha: float) -> dict | None:
    """CUPED on per-user means, the covariate the user's pre-period mean (users without a
    pre-period take the pooled pre-period mean, which leaves them unadjusted)."""
    y_a, y_b = _per_user(control, metric), _per_user(treated, metric)
    x_a, x_b = _per_user(control, metric, pre=True), _per_user(treated, metric, pre=True)
    x_all = np.concatenate([x_a, x_b])
    if np.isnan(x_all).all():
        return None
    fill = float(np.nanmean(x_all))
    keep_a, keep_b = ~np.isnan(y_a), ~np.isnan(y_b)
    x_a, x_b = np.nan_to_num(x_a, nan=fill), np.nan_to_num(x_b, nan=fill)
    c = st.cuped_comparison(y_a[keep_a], x_a[keep_a], y_b[keep_b], x_b[keep_b], alpha=alpha)
    with_pre = int((~np.isnan(_per_user(control + treated, metric, pre=True))).sum())
    return {**_interval(c.difference), "p_value": _num(c.p_value), "users_with_pre": with_pre,
            "estimand": "mean of per-user means"}


def _timeline(experiment: Experiment, by_arm: dict[str, list[UserSums]], metrics: list[str],
              alpha: float) -> tuple[list[dict], dict[tuple[str, str], list]]:
    """Cumulative estimates per arm at TIMELINE_POINTS times (event time of the exposures),
    and, per other arm and metric, the (difference, variance) at each: the sequential test's
    looks."""
    times = [e.t for group in by_arm.values() for u in group for e in u.shown]
    if not times:
        return [], {}
    first, last = min(times), max(times)
    edges = np.linspace(first, last, TIMELINE_POINTS + 1)[1:] if last > first else \
        np.array([last])
    sums: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = defaultdict(dict)
    for arm, group in by_arm.items():
        num = {m: np.zeros((len(group), len(edges))) for m in metrics}
        den = {m: np.zeros((len(group), len(edges))) for m in metrics}
        for i, u in enumerate(group):
            for e in u.shown:  # each exposure's bin and contributions, once for every metric
                b = min(int(np.searchsorted(edges, e.t)), len(edges) - 1)
                adds = _contributions(e)
                for metric in metrics:
                    num[metric][i, b] += adds[metric][0]
                    den[metric][i, b] += adds[metric][1]
        for metric in metrics:
            sums[arm][metric] = (np.cumsum(num[metric], axis=1),
                                 np.cumsum(den[metric], axis=1))
    timeline, looks = [], defaultdict(list)
    for k, t in enumerate(edges):
        for arm in by_arm:
            for metric in metrics:
                num, den = sums[arm][metric]
                live = den[:, k] > 0
                i = st.ratio_interval(num[live, k], den[live, k], alpha=alpha)
                timeline.append({"t": float(t), "arm": arm, "metric": metric,
                                 **_interval(i)})
                if arm != experiment.control:
                    c_num, c_den = sums[experiment.control][metric]
                    c_live = c_den[:, k] > 0
                    diff, var = st.ratio_look(c_num[c_live, k], c_den[c_live, k],
                                              num[live, k], den[live, k])
                    if math.isfinite(diff) and math.isfinite(var) and var > 0:
                        looks[(arm, metric)].append((diff, var))
    return timeline, dict(looks)


def _notes(experiment: Experiment, users: list[UserSums], bots: dict[str, int]) -> list[str]:
    notes = [f"unit: the user; {len(users)} users with exposures of this experiment",
             "bots (data hygiene's verdict) left out of the metrics, counted in the sample "
             "ratio check: " + ", ".join(f"{arm} {n}" for arm, n in bots.items()),
             f"outcomes without a ranking id are joined to the latest exposure of their item "
             f"within {experiment.window:g} s before them (event time)",
             "the segment model is shared by all arms: what one arm's users teach it reaches "
             "the others (a spillover that shrinks differences)"]
    if experiment.traffic < 1:
        notes.append(f"traffic: {experiment.traffic:.0%} of eligible users enrolled")
    return notes
