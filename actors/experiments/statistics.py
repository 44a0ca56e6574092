"""Statistics for A/B experiments: intervals, comparisons, SRM, CUPED, always-valid tests.

Pure functions over numpy arrays (numpy and scipy only): no I/O, no clock, no state.

Inputs
------
The experimental unit is the user: users are randomised to arms, so users are independent,
but one user's events are not (the same person clicks, dwells and rates repeatedly). Every
metric therefore arrives as per-user arrays, one entry per user of the arm:

* a per-user metric (e.g. total dwell seconds of the user): `values`;
* a ratio metric (e.g. click-through per exposure): `num` = clicks attributed to the user's
  exposures, `den` = the user's exposures; for mean dwell or mean feedback, per-user sums
  and counts.

Treating exposures (not users) as independent, e.g. a binomial test on total clicks over
total exposures, understates the variance whenever users differ in their rates, and so
rejects too often; `ratio_comparison` is the sound default for per-exposure metrics.

Conventions
-----------
* `alpha` is two-sided; z = Phi^-1(1 - alpha/2), t_nu = the Student t quantile at 1 - alpha/2
  with nu degrees of freedom.
* A comparison is arm B (treatment) against arm A (control): difference = B - A,
  relative = (B - A) / A, which is None when A's estimate is 0 or undefined.
* Degenerate data never raise and never warn: with no users, a single user, or zero variance
  there is no standard error, so a result carries its estimate (NaN if there is none) with
  NaN bounds, statistic NaN and p_value 1.0 ("no evidence"). (scipy may still warn about lost
  precision for data that are nearly, not exactly, constant.) Invalid parameters (alpha or tau
  out of range, arrays of different lengths, negative weights) raise ValueError.
* Values are assumed finite; NaN in the data propagates.

Methods
-------
proportion_interval(successes, n): Wilson score interval for one proportion.
    p = s/n;  centre = (p + z^2/(2n)) / (1 + z^2/n);
    half = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/(4n^2)).
    The bounds are the two values q with |p - q| = z sqrt(q(1-q)/n). Assumes n independent
    Bernoulli trials (e.g. one conversion flag per user). Unlike the Wald interval it keeps
    its coverage near 0 and 1 and never leaves [0, 1]. The estimate is p.

mean_interval(values): Student t interval for the mean of per-user values.
    mean +- t_{n-1} * s / sqrt(n),  s^2 the sample variance (ddof 1).
    Assumes independent users and a mean close to normal (the CLT; fine for a few dozen
    users unless the metric is very heavy-tailed).

ratio_interval(num, den): sum(num) / sum(den) with a delta-method variance over users.
    R = sum(num)/sum(den) = mean(num)/mean(den);  d_i = num_i - R den_i;
    Var(R) = sum(d_i^2) / (n (n-1) mean(den)^2)
           = (s_num^2 - 2 R s_num,den + R^2 s_den^2) / (n mean(den)^2);
    interval R +- z sqrt(Var(R)). Assumes independent users (their events may correlate
    arbitrarily) and enough users for the first-order Taylor expansion of num/den and the
    normal approximation; the exposure count per user may vary. `ratio_estimate` gives
    (R, Var(R)).

two_proportions(s_a, n_a, s_b, n_b): two-proportion z test (one Bernoulli outcome per user).
    Test, under H0 p_a = p_b, with the pooled rate p = (s_a + s_b)/(n_a + n_b):
    z = (p_b - p_a) / sqrt(p(1-p)(1/n_a + 1/n_b)).
    Difference: unpooled Wald interval p_b - p_a +- z sqrt(p_a(1-p_a)/n_a + p_b(1-p_b)/n_b).
    Relative lift: delta method on the log of the ratio of rates,
    log(p_b/p_a) +- z sqrt((1-p_a)/s_a + (1-p_b)/s_b), exponentiated, minus 1; the log scale
    keeps the interval asymmetric like the ratio itself. Bounds are NaN when s_b = 0.
    Assumes independent trials; the Wald difference interval needs a few successes and
    failures per arm.

welch(a, b): Welch's unequal-variance t test on per-user values.
    t = (mean_b - mean_a) / se,  se^2 = s_a^2/n_a + s_b^2/n_b;
    nu = se^4 / ((s_a^2/n_a)^2/(n_a-1) + (s_b^2/n_b)^2/(n_b-1))  (Welch-Satterthwaite);
    t and p come from scipy.stats.ttest_ind(b, a, equal_var=False); interval
    mean_b - mean_a +- t_nu se. Assumes independent users and near-normal means; does not
    assume equal variances (treatment often changes the spread too).

ratio_comparison(num_a, den_a, num_b, den_b): delta-method z test of two ratio metrics.
    diff = R_b - R_a, Var(diff) = Var(R_a) + Var(R_b) (ratio_interval's Var; arms are
    independent); z = diff / sqrt(Var(diff)); interval diff +- z_alpha sqrt(Var(diff)).
    Assumptions as ratio_interval. The sound default for per-exposure metrics with users as
    units.

Relative intervals of welch, ratio_comparison and cuped_comparison: delta method on the
ratio m_b/m_a (the metrics may be negative, so no logarithm):
    Var(m_b/m_a) = Var(m_b)/m_a^2 + m_b^2 Var(m_a)/m_a^4; interval m_b/m_a - 1 +- c sqrt(Var),
with c the critical value of the difference's interval (t_nu for welch, z otherwise). Needs
m_a well away from 0 relative to its standard error.

srm_check(observed, weights, threshold): sample-ratio mismatch test.
    expected_i = N w_i / sum(w), N = sum(observed);
    chi2 = sum((o_i - e_i)^2 / e_i) on k - 1 degrees of freedom (scipy.stats.chisquare);
    mismatch when p < threshold. The small default threshold (0.001) is because the check
    runs on every experiment, often repeatedly, and a mismatch is a bug to chase, not a
    result. Arms with weight 0 are left out; any user in one is a mismatch (chi2 inf, p 0).
    Assumes users are assigned independently with the configured probabilities.

cuped(y, x): CUPED adjustment with a pre-experiment covariate x (Deng et al. 2013).
    theta = cov(y, x) / var(x);  y_adj = y - theta (x - mean(x)).
    Pass both arms pooled: one theta and one mean(x) for both arms, so the adjustment is the
    same function of x in each arm and removes no treatment effect (x predates the
    experiment, so it is independent of the assignment). Var(mean y_adj) = (1 - rho^2)
    Var(mean y), rho = corr(y, x). theta = 0 when var(x) = 0 or fewer than two users.

cuped_comparison(y_a, x_a, y_b, x_b): theta from the pooled arms, then welch on y_adj.
    The estimated theta is treated as known, which is asymptotically exact; the means of
    y_adj still estimate the arm means of y, so the relative lift keeps its meaning.

msprt(diff, variance, tau): one look of the normal-mixture mSPRT (Johari, Pekelis, Walsh
2017; Lindon and Malek) for theta = B - A, given its estimate `diff` with variance V:
    Lambda = sqrt(V / (V + tau^2)) * exp(tau^2 diff^2 / (2 V (V + tau^2)));
    p = min(1, 1/Lambda);
    confidence sequence: diff +- sqrt(V (V + tau^2) / tau^2 * (2 log(1/alpha)
                                                                 + log((V + tau^2) / V))),
    the set of theta_0 whose own mSPRT has Lambda < 1/alpha. Lambda is the likelihood ratio
    of a N(0, tau^2) mixture of alternatives against H0, a martingale under H0, so by
    Ville's inequality P(sup over looks of Lambda >= 1/alpha) <= alpha: the test may be
    read at any number of looks, at any times, and stopped whenever, keeping its error rate.
    Assumes diff is normal with variance V (the CLT; V a consistent plug-in estimate) and
    that successive looks add independent users (independent increments). tau only trades
    power between effect sizes; it must be fixed before the data are seen.

sequential(looks, tau): always-valid inference over looks [(diff, variance), ...] in time
    order. p = the running minimum of the looks' mSPRT p (= min(1, 1/max Lambda));
    interval = the intersection of all looks' confidence sequences (an intersection of
    sets that all hold at once with probability 1 - alpha still holds); estimate = the last
    diff, which the intersection need not contain. Looks without a variance are skipped. An
    empty intersection (a sign the normal model does not hold) gives NaN bounds. `ratio_look`
    and `mean_look` make looks.

default_tau(control): the mixing scale tau = relative * |control| (default 10% of the
    control arm's metric measured before the experiment, e.g. its historical CTR), but at
    least `minimum` (in the metric's units; set it for metrics centred near 0). The mSPRT
    is most powerful near effects of size ~tau, and a 10% relative lift is the typical
    effect one hopes to detect. Choose it once, before the experiment.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import special, stats

NAN = float("nan")


@dataclass(frozen=True, slots=True)
class Interval:
    estimate: float
    low: float
    high: float


@dataclass(frozen=True, slots=True)
class Comparison:
    """Arm B against arm A (control)."""

    difference: Interval  # B - A, absolute
    relative: Interval | None  # (B - A) / A; None when A's estimate is 0 or undefined
    statistic: float  # z or t
    p_value: float  # two-sided
    df: float | None  # Welch's degrees of freedom, else None
    method: str  # "two-proportion z", "welch t", "delta-method z", "welch t, CUPED"


@dataclass(frozen=True, slots=True)
class SrmCheck:
    chi2: float
    p_value: float
    mismatch: bool
    observed: tuple[int, ...]
    expected: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class Sequential:
    """Always-valid inference for B - A."""

    p_value: float  # always-valid p-value (running minimum over the looks given)
    interval: Interval  # confidence sequence for B - A at this look
    tau: float


# --- small helpers -----------------------------------------------------------------------


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def _z(alpha: float) -> float:
    _check_alpha(alpha)
    return float(special.ndtri(1.0 - alpha / 2.0))


def _t(alpha: float, df: float) -> float:
    _check_alpha(alpha)
    return float(special.stdtrit(df, 1.0 - alpha / 2.0))


def _check_counts(successes: int, n: int) -> None:
    if not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")


def _array(values: np.ndarray | Sequence[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).ravel()


def _pair(num: np.ndarray, den: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    num, den = _array(num), _array(den)
    if num.shape != den.shape:
        raise ValueError(f"num and den differ in length: {num.size} != {den.size}")
    return num, den


def _usable(variance: float) -> bool:
    # a standard error exists: finite and positive (zero means no measured noise)
    return math.isfinite(variance) and variance > 0.0


def _sample_var(values: np.ndarray) -> float:
    # Exactly 0 for constant data: the float mean of n copies of c need not be c, which
    # would leave a spurious ~1e-33 variance (and a huge t) behind.
    if values.size < 2:
        return NAN
    if values.max() == values.min():
        return 0.0
    return float(values.var(ddof=1))


def _normal_interval(estimate: float, variance: float, critical: float) -> Interval:
    if not _usable(variance):
        return Interval(estimate, NAN, NAN)
    half = critical * math.sqrt(variance)
    return Interval(estimate, estimate - half, estimate + half)


def _z_test(diff: float, variance: float) -> tuple[float, float]:
    if not (_usable(variance) and math.isfinite(diff)):
        return NAN, 1.0
    z = diff / math.sqrt(variance)
    return z, math.erfc(abs(z) / math.sqrt(2.0))  # = 2 (1 - Phi(|z|)), exact in the tails


def _relative(m_a: float, var_a: float, m_b: float, var_b: float,
              critical: float) -> Interval | None:
    # delta method on m_b / m_a; None when there is no baseline to be relative to
    if not math.isfinite(m_a) or m_a == 0.0:
        return None
    variance = var_b / m_a**2 + m_b**2 * var_a / m_a**4
    return _normal_interval(m_b / m_a - 1.0, variance, critical)


def _degenerate(difference: float, method: str, relative: Interval | None = None,
                df: float | None = None) -> Comparison:
    return Comparison(Interval(difference, NAN, NAN), relative, NAN, 1.0, df, method)


# --- one arm -----------------------------------------------------------------------------


def proportion_interval(successes: int, n: int, alpha: float = 0.05) -> Interval:
    """Wilson score interval for successes / n; NaN when n = 0."""
    z = _z(alpha)
    _check_counts(successes, n)
    if n <= 0:
        return Interval(NAN, NAN, NAN)
    p = successes / n
    scale = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / scale
    half = z / scale * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n))
    # at p = 0 (or 1) the bound is exactly 0 (or 1); the subtraction would leave ~1e-17
    low = 0.0 if successes == 0 else centre - half
    high = 1.0 if successes == n else centre + half
    return Interval(p, low, high)


def mean_estimate(values: np.ndarray) -> tuple[float, float]:
    """(mean, variance of the mean s^2/n); NaN where undefined."""
    values = _array(values)
    if values.size == 0:
        return NAN, NAN
    return float(values.mean()), _sample_var(values) / values.size


def mean_interval(values: np.ndarray, alpha: float = 0.05) -> Interval:
    """Student t interval for the mean of per-user values."""
    values = _array(values)
    mean, variance = mean_estimate(values)
    critical = _t(alpha, values.size - 1) if values.size >= 2 else NAN
    return _normal_interval(mean, variance, critical)


def ratio_estimate(num: np.ndarray, den: np.ndarray) -> tuple[float, float]:
    """(sum(num)/sum(den), its delta-method variance over users); NaN where undefined."""
    num, den = _pair(num, den)
    n, total = num.size, float(den.sum())
    if n == 0 or total == 0.0:
        return NAN, NAN
    ratio = float(num.sum()) / total
    if n < 2:
        return ratio, NAN
    residual = num - ratio * den  # sums to 0, so its mean square is its variance
    mean_den = total / n
    return ratio, float(residual @ residual) / (n * (n - 1) * mean_den**2)


def ratio_interval(num: np.ndarray, den: np.ndarray, alpha: float = 0.05) -> Interval:
    """sum(num)/sum(den) +- z * delta-method standard error over users."""
    ratio, variance = ratio_estimate(num, den)
    return _normal_interval(ratio, variance, _z(alpha))


# --- two arms ----------------------------------------------------------------------------


def two_proportions(s_a: int, n_a: int, s_b: int, n_b: int, alpha: float = 0.05) -> Comparison:
    """Pooled two-proportion z test; Wald interval for B - A; log-ratio interval for lift."""
    method = "two-proportion z"
    z_alpha = _z(alpha)
    _check_counts(s_a, n_a)
    _check_counts(s_b, n_b)
    if n_a <= 0 or n_b <= 0:
        return _degenerate(NAN, method)
    p_a, p_b = s_a / n_a, s_b / n_b
    diff = p_b - p_a
    pooled = (s_a + s_b) / (n_a + n_b)
    statistic, p_value = _z_test(diff, pooled * (1.0 - pooled) * (1.0 / n_a + 1.0 / n_b))
    wald = p_a * (1.0 - p_a) / n_a + p_b * (1.0 - p_b) / n_b
    difference = _normal_interval(diff, wald, z_alpha)
    return Comparison(difference, _log_lift(s_a, n_a, s_b, n_b, z_alpha), statistic, p_value,
                      None, method)


def _log_lift(s_a: int, n_a: int, s_b: int, n_b: int, z: float) -> Interval | None:
    # the log of a ratio of rates is closer to normal than the ratio itself
    if s_a <= 0:
        return None
    lift = (s_b / n_b) / (s_a / n_a) - 1.0
    if s_b <= 0:
        return Interval(lift, NAN, NAN)
    log_ratio = math.log((s_b / n_b) / (s_a / n_a))
    half = z * math.sqrt((1.0 - s_a / n_a) / s_a + (1.0 - s_b / n_b) / s_b)
    return Interval(lift, math.expm1(log_ratio - half), math.expm1(log_ratio + half))


def welch(a: np.ndarray, b: np.ndarray, alpha: float = 0.05) -> Comparison:
    """Welch's t test of mean(b) - mean(a) on per-user values."""
    method = "welch t"
    a, b = _array(a), _array(b)
    _check_alpha(alpha)
    m_a, v_a = mean_estimate(a)  # v = variance of the mean
    m_b, v_b = mean_estimate(b)
    diff = m_b - m_a
    variance = v_a + v_b
    if not _usable(variance):
        return _degenerate(diff, method, _relative(m_a, v_a, m_b, v_b, NAN))
    df = variance**2 / (v_a**2 / (a.size - 1) + v_b**2 / (b.size - 1))
    statistic, p_value = _scipy_welch(a, b)
    critical = _t(alpha, df)
    return Comparison(_normal_interval(diff, variance, critical),
                      _relative(m_a, v_a, m_b, v_b, critical), statistic, p_value, df, method)


def _scipy_welch(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    # Welch's t is shift-invariant: moving a constant arm to exact zeros keeps scipy from
    # warning about catastrophic cancellation in a variance that is exactly 0.
    shift = a[0] if a.max() == a.min() else b[0] if b.max() == b.min() else 0.0
    result = stats.ttest_ind(b - shift, a - shift, equal_var=False)
    return float(result.statistic), float(result.pvalue)


def ratio_look(num_a: np.ndarray, den_a: np.ndarray, num_b: np.ndarray,
               den_b: np.ndarray) -> tuple[float, float]:
    """(R_b - R_a, its delta-method variance): one look for `sequential`."""
    r_a, v_a = ratio_estimate(num_a, den_a)
    r_b, v_b = ratio_estimate(num_b, den_b)
    return r_b - r_a, v_a + v_b


def mean_look(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(mean(b) - mean(a), its variance): one look for `sequential`."""
    m_a, v_a = mean_estimate(a)
    m_b, v_b = mean_estimate(b)
    return m_b - m_a, v_a + v_b


def ratio_comparison(num_a: np.ndarray, den_a: np.ndarray, num_b: np.ndarray,
                     den_b: np.ndarray, alpha: float = 0.05) -> Comparison:
    """Delta-method z test of sum(num_b)/sum(den_b) - sum(num_a)/sum(den_a), users as units."""
    z_alpha = _z(alpha)
    r_a, v_a = ratio_estimate(num_a, den_a)
    r_b, v_b = ratio_estimate(num_b, den_b)
    diff, variance = r_b - r_a, v_a + v_b
    statistic, p_value = _z_test(diff, variance)
    return Comparison(_normal_interval(diff, variance, z_alpha),
                      _relative(r_a, v_a, r_b, v_b, z_alpha), statistic, p_value, None,
                      "delta-method z")


# --- sample-ratio mismatch ---------------------------------------------------------------


def srm_check(observed: Sequence[int], weights: Sequence[float],
              threshold: float = 0.001) -> SrmCheck:
    """Chi-square goodness of fit of the users per arm against the configured split."""
    counts = tuple(int(c) for c in observed)
    w = np.asarray(weights, dtype=np.float64).ravel()
    if len(counts) != w.size:
        raise ValueError(f"{len(counts)} observed counts for {w.size} weights")
    if np.any(w < 0) or not np.all(np.isfinite(w)) or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative and not all 0, got {list(weights)}")
    obs = np.asarray(counts, dtype=np.float64)
    expected = obs.sum() * w / w.sum()
    result = SrmCheck(0.0, 1.0, False, counts, tuple(float(e) for e in expected))
    live = expected > 0
    if np.any(obs[~live] > 0):  # users in an arm meant to get none
        return dataclasses.replace(result, chi2=math.inf, p_value=0.0, mismatch=True)
    if np.count_nonzero(live) < 2:  # nothing to compare (no users, or a single arm)
        return result
    chi2, p_value = stats.chisquare(obs[live], expected[live])
    return dataclasses.replace(result, chi2=float(chi2), p_value=float(p_value),
                               mismatch=bool(p_value < threshold))


# --- CUPED -------------------------------------------------------------------------------


def cuped(y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, float]:
    """(y - theta (x - mean x), theta), theta = cov(y, x)/var(x); pass both arms pooled."""
    y, x = _pair(y, x)
    if y.size < 2 or x.max() == x.min():
        return y.copy(), 0.0
    x_centred = x - x.mean()
    theta = float(x_centred @ (y - y.mean())) / float(x_centred @ x_centred)
    return y - theta * x_centred, theta


def cuped_comparison(y_a: np.ndarray, x_a: np.ndarray, y_b: np.ndarray, x_b: np.ndarray,
                     alpha: float = 0.05) -> Comparison:
    """CUPED with theta and mean(x) from both arms pooled, then Welch on adjusted values."""
    y_a, x_a = _pair(y_a, x_a)
    y_b, x_b = _pair(y_b, x_b)
    adjusted, _ = cuped(np.concatenate([y_a, y_b]), np.concatenate([x_a, x_b]))
    result = welch(adjusted[: y_a.size], adjusted[y_a.size :], alpha)
    return dataclasses.replace(result, method="welch t, CUPED")


# --- always-valid (sequential) inference -------------------------------------------------


def _check_tau(tau: float) -> None:
    if not (math.isfinite(tau) and tau > 0.0):
        raise ValueError(f"tau must be positive and finite, got {tau}")


def msprt(diff: float, variance: float, tau: float,
          alpha: float = 0.05) -> tuple[float, Interval]:
    """One look of the normal-mixture mSPRT: (p = min(1, 1/Lambda), confidence sequence)."""
    _check_alpha(alpha)
    _check_tau(tau)
    if not (_usable(variance) and math.isfinite(diff)):
        return 1.0, Interval(diff, NAN, NAN)
    spread = variance + tau * tau
    # log Lambda, so that a decisive look does not overflow exp
    log_lambda = 0.5 * math.log(variance / spread) + (
        tau * tau * diff * diff / (2.0 * variance * spread))
    p_value = math.exp(-log_lambda) if log_lambda > 0.0 else 1.0
    half = math.sqrt(variance * spread / (tau * tau)
                     * (2.0 * math.log(1.0 / alpha) + math.log(spread / variance)))
    return p_value, Interval(diff, diff - half, diff + half)


def sequential(looks: Sequence[tuple[float, float]], tau: float,
               alpha: float = 0.05) -> Sequential:
    """Always-valid p (running min) and confidence sequence (running intersection)."""
    _check_alpha(alpha)
    _check_tau(tau)
    p_value, low, high = 1.0, -math.inf, math.inf
    estimate = NAN
    for diff, variance in looks:
        estimate = float(diff)
        p, interval = msprt(diff, variance, tau, alpha)
        p_value = min(p_value, p)
        if math.isfinite(interval.low):  # a look without a variance says nothing
            low, high = max(low, interval.low), min(high, interval.high)
    if not (math.isfinite(low) and low <= high):  # no usable look, or empty intersection
        low = high = NAN
    return Sequential(p_value, Interval(estimate, low, high), tau)


def default_tau(control: float, relative: float = 0.1, minimum: float = 1e-3) -> float:
    """tau = relative * |control| (a 10% lift by default), at least `minimum`."""
    if not (relative > 0.0 and minimum > 0.0):
        raise ValueError(f"relative and minimum must be positive, got {relative}, {minimum}")
    scaled = relative * abs(control)
    return scaled if math.isfinite(scaled) and scaled > minimum else minimum
