"""Experiment statistics: known answers, degenerate input, and simulations with a known truth.

The simulations draw whole batches of experiments at once (seeded numpy Generators, users as
rows of 2-D arrays) and run the module's functions on each simulated experiment. Their sizes
are in SIMULATION_SIZES. Simulated click-through: each user gets Poisson(EXPOSURES)
exposures and a personal CTR ~ Beta with mean `ctr` and concentration KAPPA, so users differ
and exposures of one user are correlated, as in the product.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from actors.experiments.statistics import (
    Interval,
    cuped,
    cuped_comparison,
    default_tau,
    mean_interval,
    mean_look,
    msprt,
    proportion_interval,
    ratio_comparison,
    ratio_estimate,
    ratio_interval,
    ratio_look,
    sequential,
    srm_check,
    two_proportions,
    welch,
)

ALPHA = 0.05
Z = stats.norm.ppf(1 - ALPHA / 2)
EXPOSURES = 10  # mean exposures per user (Poisson)
KAPPA = 20  # Beta concentration of the users' CTRs: design effect 1 + EXPOSURES/(KAPPA+1)
LOOKS = 20

AA_SIMS, AA_USERS = 2000, 1000  # A/A experiments, users per arm (also the peeking runs)
POWER_SIMS = 1000  # experiments with CTR 0.10 vs 0.11, users per arm from power_users()
SRM_DRAWS, SRM_USERS = 10_000, 10_000  # true 50/50 assignments of SRM_USERS users
CUPED_SIMS, CUPED_USERS, CUPED_RHO = 2000, 500, 0.7  # A/A experiments, users per arm, corr
SIMULATION_SIZES = {
    "a/a (fixed horizon, welch, naive binomial)": (AA_SIMS, AA_USERS),
    "a/a peeking (20 looks every 50 users per arm)": (AA_SIMS, AA_USERS),
    "power, fixed and sequential (users per arm ~2177, then 2x)": (POWER_SIMS, None),
    "srm null draws (users per draw)": (SRM_DRAWS, SRM_USERS),
    "cuped a/a (rho 0.7)": (CUPED_SIMS, CUPED_USERS),
}


def ctr_users(rng: np.random.Generator, sims: int, users: int,
              ctr: float) -> tuple[np.ndarray, np.ndarray]:
    """(clicks, exposures), each (sims, users): per-user sums of one arm, per experiment."""
    exposures = rng.poisson(EXPOSURES, size=(sims, users))
    user_ctr = rng.beta(ctr * KAPPA, (1 - ctr) * KAPPA, size=(sims, users))
    return rng.binomial(exposures, user_ctr).astype(float), exposures.astype(float)


def ratio_variance_per_user(ctr: float) -> float:
    """n * Var(R) for the simulated users, in closed form (the delta-method target).

    d = c - ctr e has Var = E[e q(1-q)] + E[e^2] Var(q) = ctr(1-ctr) L (KAPPA+1+L)/(KAPPA+1),
    and Var(R) = Var(d) / (n L^2) with L = EXPOSURES.
    """
    lam = EXPOSURES
    return ctr * (1 - ctr) * (KAPPA + 1 + lam) / (lam * (KAPPA + 1))


def power_users(ctr_a: float, ctr_b: float, power: float = 0.8) -> int:
    """Users per arm for `power` by the normal approximation."""
    spread = ratio_variance_per_user(ctr_a) + ratio_variance_per_user(ctr_b)
    z_power = stats.norm.ppf(power)
    return math.ceil((Z + z_power) ** 2 * spread / (ctr_b - ctr_a) ** 2)


def look_sizes(users: int, looks: int) -> np.ndarray:
    """Users per arm at each of `looks` equally spaced looks ending at `users`."""
    return np.round(np.arange(1, looks + 1) * users / looks).astype(int)


# --- known answers -----------------------------------------------------------------------


def test_wilson_textbook_value():
    interval = proportion_interval(81, 263)
    assert interval.estimate == pytest.approx(81 / 263)
    assert interval.low == pytest.approx(0.25529, abs=5e-5)
    assert interval.high == pytest.approx(0.36621, abs=5e-5)


@pytest.mark.parametrize(("s", "n"), [(81, 263), (0, 10), (10, 10), (1, 3), (500, 1000)])
def test_wilson_bounds_solve_the_score_equation(s, n):
    # Wilson's bounds are the q with |p - q| = z sqrt(q (1 - q) / n): an independent check
    p = s / n
    for alpha in (0.05, 0.01):
        z = stats.norm.ppf(1 - alpha / 2)
        interval = proportion_interval(s, n, alpha)
        for q in (interval.low, interval.high):
            assert abs(p - q) == pytest.approx(z * math.sqrt(q * (1 - q) / n), abs=1e-12)
        assert 0.0 <= interval.low <= p <= interval.high <= 1.0


def test_two_proportions_against_hand_computation():
    # 120/1000 vs 150/1000: pooled 0.135, se = sqrt(0.135*0.865*2/1000) = 0.0152824,
    # z = 0.03/se = 1.96305, p = 0.04964; Wald se = sqrt(.12*.88 + .15*.85)/sqrt(1000)
    # = 0.0152676, half-width 0.029924; log lift 0.223144 +- 1.96*sqrt(.88/120 + .85/150)
    result = two_proportions(120, 1000, 150, 1000)
    assert result.method == "two-proportion z"
    assert result.statistic == pytest.approx(1.96305, abs=1e-5)
    assert result.p_value == pytest.approx(0.04964, abs=1e-5)
    assert result.df is None
    assert result.difference.estimate == pytest.approx(0.03)
    assert result.difference.low == pytest.approx(0.000076, abs=1e-6)
    assert result.difference.high == pytest.approx(0.059924, abs=1e-6)
    assert result.relative.estimate == pytest.approx(0.25)
    assert result.relative.low == pytest.approx(-0.00033, abs=1e-5)
    assert result.relative.high == pytest.approx(0.56301, abs=1e-5)


def test_two_proportions_zero_baseline_has_no_relative_lift():
    result = two_proportions(0, 100, 5, 100)
    assert result.relative is None
    assert result.p_value < 0.05
    lost = two_proportions(5, 100, 0, 100).relative
    assert lost.estimate == -1.0 and math.isnan(lost.low) and math.isnan(lost.high)


@pytest.mark.parametrize("alpha", [0.05, 0.1])
def test_welch_matches_scipy(alpha):
    rng = np.random.default_rng(3)
    a, b = rng.normal(1.0, 1.0, 40), rng.lognormal(0.2, 0.8, 65)
    result = welch(a, b, alpha)
    reference = stats.ttest_ind(b, a, equal_var=False)
    ci = reference.confidence_interval(1 - alpha)
    assert result.method == "welch t"
    assert result.statistic == pytest.approx(reference.statistic, rel=1e-12)
    assert result.p_value == pytest.approx(reference.pvalue, rel=1e-12)
    assert result.df == pytest.approx(reference.df, rel=1e-12)
    assert result.difference.estimate == pytest.approx(b.mean() - a.mean(), rel=1e-12)
    assert result.difference.low == pytest.approx(ci.low, rel=1e-10)
    assert result.difference.high == pytest.approx(ci.high, rel=1e-10)
    assert result.relative.estimate == pytest.approx(b.mean() / a.mean() - 1)


def test_mean_interval_is_student_t():
    values = np.array([2.0, 4.0, 4.0, 5.0, 7.0, 9.0])
    # mean 31/6, s = 2.4833, t_{5, 0.975} = 2.5706: half-width 2.6061
    half = stats.t.ppf(0.975, 5) * values.std(ddof=1) / math.sqrt(6)
    assert half == pytest.approx(2.6061, abs=1e-4)
    interval = mean_interval(values)
    assert interval.estimate == pytest.approx(31 / 6)
    assert (interval.low, interval.high) == pytest.approx((31 / 6 - half, 31 / 6 + half))


def test_ratio_interval_is_the_delta_method():
    rng = np.random.default_rng(4)
    den = rng.poisson(8, 300).astype(float) + 1
    num = rng.binomial(den.astype(int), 0.2).astype(float)
    n, ratio = num.size, num.sum() / den.sum()
    cov = np.cov(num, den)  # the textbook form: (s_x^2 - 2R s_xy + R^2 s_y^2) / (n ybar^2)
    variance = (cov[0, 0] - 2 * ratio * cov[0, 1] + ratio**2 * cov[1, 1]) / (n * den.mean()**2)
    assert ratio_estimate(num, den) == pytest.approx((ratio, variance), rel=1e-10)
    interval = ratio_interval(num, den)
    assert interval.high - interval.low == pytest.approx(2 * Z * math.sqrt(variance))
    other = rng.binomial(den.astype(int), 0.25).astype(float)
    result = ratio_comparison(num, den, other, den)
    diff, var_diff = ratio_look(num, den, other, den)
    assert result.method == "delta-method z"
    assert result.statistic == pytest.approx(diff / math.sqrt(var_diff))
    assert result.p_value == pytest.approx(2 * stats.norm.sf(abs(result.statistic)))
    assert var_diff == pytest.approx(variance + ratio_estimate(other, den)[1])


def test_srm_matches_chisquare():
    check = srm_check([5200, 4800], [0.5, 0.5])
    assert check.chi2 == pytest.approx(16.0)  # 2 * 200^2 / 5000
    assert check.p_value == pytest.approx(stats.chisquare([5200, 4800]).pvalue)
    assert check.mismatch
    assert check.observed == (5200, 4800) and check.expected == (5000.0, 5000.0)
    observed, weights = [2480, 2575, 4945], [1, 1, 2]  # weights need not sum to 1
    check = srm_check(observed, weights)
    reference = stats.chisquare(observed, [2500, 2500, 5000])
    assert (check.chi2, check.p_value) == pytest.approx((reference.statistic, reference.pvalue))
    assert not check.mismatch


def test_srm_zero_weight_arm():
    assert srm_check([50, 50, 0], [1, 1, 0]).p_value == pytest.approx(1.0)
    leaked = srm_check([50, 50, 1], [1, 1, 0])
    assert leaked.mismatch and leaked.p_value == 0.0


def test_cuped_theta_is_cov_over_var_and_reduces_variance():
    rng = np.random.default_rng(5)
    x = rng.normal(10, 2, 5000)
    y = 3 + 0.8 * x + rng.normal(0, 1, 5000)
    adjusted, theta = cuped(y, x)
    assert theta == pytest.approx(np.cov(y, x)[0, 1] / np.var(x, ddof=1), rel=1e-12)
    assert adjusted.mean() == pytest.approx(y.mean())  # centred x: the mean is kept
    r = np.corrcoef(y, x)[0, 1]
    assert adjusted.var() == pytest.approx((1 - r**2) * y.var(), rel=1e-9)
    assert adjusted.var() < 0.5 * y.var()
    unrelated, theta = cuped(y, rng.normal(size=5000))
    assert abs(theta) < 0.1 and unrelated.var() == pytest.approx(y.var(), rel=0.01)


def test_msprt_against_hand_computation():
    # V = 1e-4, tau = 0.01, diff = 0.02: Lambda = sqrt(1/2) * exp(1) = 1.922115;
    # half-width = sqrt(2e-4 * (2 log 20 + log 2)) = 0.0365640
    p_value, interval = msprt(0.02, 1e-4, 0.01)
    assert p_value == pytest.approx(1 / (math.sqrt(0.5) * math.e), rel=1e-12)
    assert interval.estimate == 0.02
    assert interval.high - 0.02 == pytest.approx(0.0365640, abs=1e-7)
    assert 0.02 - interval.low == pytest.approx(0.0365640, abs=1e-7)


@pytest.mark.parametrize(("variance", "tau"), [(1e-4, 0.01), (2.5, 0.3), (1e-6, 0.05)])
def test_msprt_interval_edge_is_where_p_equals_alpha(variance, tau):
    # the confidence sequence is exactly the set of theta_0 the mSPRT does not reject
    half = msprt(0.0, variance, tau)[1].high
    assert msprt(half, variance, tau)[0] == pytest.approx(ALPHA, rel=1e-9)
    assert msprt(0.9 * half, variance, tau)[0] > ALPHA > msprt(1.1 * half, variance, tau)[0]
    assert msprt(0.0, variance, tau)[0] == 1.0


def test_sequential_running_min_and_intersection():
    looks = [(0.03, 4e-4), (0.01, 1e-4), (0.012, 5e-5)]
    result = sequential(looks, tau=0.02)
    singles = [msprt(d, v, 0.02) for d, v in looks]
    assert result.p_value == min(p for p, _ in singles)
    assert result.interval == Interval(0.012, max(i.low for _, i in singles),
                                       min(i.high for _, i in singles))
    assert result.tau == 0.02
    # a decisive early look stays decisive: the p-value never rises again
    assert sequential([(0.5, 1e-4), (0.0, 1e-4)], 0.02).p_value < 1e-10


def test_default_tau():
    assert default_tau(0.10) == pytest.approx(0.01)
    assert default_tau(-40.0, relative=0.05) == pytest.approx(2.0)
    assert default_tau(0.0) == 1e-3
    assert default_tau(float("nan"), minimum=0.5) == 0.5


# --- degenerate input: NaN or p = 1, never an exception or a warning ---------------------


@pytest.mark.filterwarnings("error")
def test_degenerate_input_never_raises_or_warns():
    empty, one = np.array([]), np.array([3.0])
    assert all(math.isnan(v) for v in _values(proportion_interval(0, 0)))
    assert all(math.isnan(v) for v in _values(mean_interval(empty)))
    assert all(math.isnan(v) for v in _values(ratio_interval(empty, empty)))
    assert math.isnan(ratio_interval([0.0, 0.0], [0.0, 0.0]).estimate)  # no exposures
    single = mean_interval(one)
    assert single.estimate == 3.0 and math.isnan(single.low) and math.isnan(single.high)
    constant = mean_interval(np.full(7, 3.3))  # zero variance: no standard error
    assert constant.estimate == pytest.approx(3.3) and math.isnan(constant.low)
    for result in (welch(empty, empty), welch(one, one), welch(np.full(5, 0.1), np.full(5, 0.1)),
                   ratio_comparison(empty, empty, one, one), two_proportions(0, 0, 0, 0),
                   two_proportions(0, 50, 0, 50), cuped_comparison(empty, empty, empty, empty)):
        assert result.p_value == 1.0 and math.isnan(result.statistic)
        assert math.isnan(result.difference.low) and math.isnan(result.difference.high)
    assert welch(empty, one).relative is None
    # one constant arm is fine (scipy would warn about the constant arm's float mean)
    assert welch(np.full(6, 0.1), np.arange(6.0)).p_value < 1.0
    assert cuped(np.arange(3.0), np.full(3, 2.0))[1] == 0.0  # var(x) = 0: no adjustment
    assert cuped(empty, empty)[1] == 0.0
    assert srm_check([0, 0], [1, 1]).p_value == 1.0
    assert sequential([], 0.01).p_value == 1.0
    assert msprt(0.1, 0.0, 0.01)[0] == 1.0
    skipped = sequential([(0.01, 1e-4), (float("nan"), float("nan"))], 0.01)
    assert skipped.interval.low == msprt(0.01, 1e-4, 0.01)[1].low
    assert math.isnan(mean_look(empty, one)[1])


def _values(interval: Interval) -> tuple[float, float, float]:
    return interval.estimate, interval.low, interval.high


def test_invalid_parameters_raise():
    with pytest.raises(ValueError):
        proportion_interval(5, 3)
    with pytest.raises(ValueError):
        welch(np.ones(3), np.arange(3.0), alpha=1.5)
    with pytest.raises(ValueError):
        ratio_interval(np.ones(3), np.ones(4))
    with pytest.raises(ValueError):
        srm_check([1, 2], [1, 1, 1])
    with pytest.raises(ValueError):
        msprt(0.1, 1.0, tau=0.0)


# --- simulations -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def aa_ctr():
    """AA_SIMS A/A experiments, AA_USERS users per arm, CTR 0.10 in both arms."""
    rng = np.random.default_rng(20240601)
    return ctr_users(rng, AA_SIMS, AA_USERS, 0.10) + ctr_users(rng, AA_SIMS, AA_USERS, 0.10)


def aa_rates(aa_ctr) -> dict[str, float]:
    clicks_a, exp_a, clicks_b, exp_b = aa_ctr
    ratio = [ratio_comparison(clicks_a[i], exp_a[i], clicks_b[i], exp_b[i]).p_value
             for i in range(AA_SIMS)]
    per_user = [welch(clicks_a[i], clicks_b[i]).p_value for i in range(AA_SIMS)]
    naive = [two_proportions(int(clicks_a[i].sum()), int(exp_a[i].sum()),
                             int(clicks_b[i].sum()), int(exp_b[i].sum())).p_value
             for i in range(AA_SIMS)]
    return {name: float(np.mean(np.array(p) < ALPHA))
            for name, p in (("ratio", ratio), ("welch", per_user), ("naive", naive))}


def test_aa_false_positive_rate_is_alpha(aa_ctr):
    rates = aa_rates(aa_ctr)
    # 2000 experiments: binomial sd of the rate at 0.05 is 0.0049, so [0.03, 0.07] is +-4 sd
    assert 0.03 <= rates["ratio"] <= 0.07
    assert 0.03 <= rates["welch"] <= 0.07
    # exposures as independent trials ignore the users' differing CTRs (design effect
    # 1 + 10/21): about 0.11 false positives, which is why ratio_comparison is the default
    assert rates["naive"] > 0.08


def test_peeking_inflates_fixed_horizon_but_not_sequential(aa_ctr):
    clicks_a, exp_a, clicks_b, exp_b = aa_ctr
    sizes = look_sizes(AA_USERS, LOOKS)
    tau = default_tau(0.10)  # from the (known) baseline CTR, fixed before the experiment
    peeked = sequential_rejections = 0
    for i in range(AA_SIMS):
        peeked += any(ratio_comparison(clicks_a[i, :m], exp_a[i, :m], clicks_b[i, :m],
                                       exp_b[i, :m]).p_value < ALPHA for m in sizes)
        looks = [ratio_look(clicks_a[i, :m], exp_a[i, :m], clicks_b[i, :m], exp_b[i, :m])
                 for m in sizes]
        sequential_rejections += sequential(looks, tau, ALPHA).p_value < ALPHA
    # stopping at the first of 20 looks with p < 0.05: about 0.25 (theory for 20 looks)
    assert peeked / AA_SIMS > 0.12
    assert sequential_rejections / AA_SIMS <= ALPHA + 0.012  # +2.5 sd at 2000 experiments


def power_run(rng: np.random.Generator, users: int, looks: int) -> tuple[float, float, float]:
    """(fixed power at `users`, sequential power at `users`, sequential power at 2*users)."""
    clicks_a, exp_a = ctr_users(rng, POWER_SIMS, 2 * users, 0.10)
    clicks_b, exp_b = ctr_users(rng, POWER_SIMS, 2 * users, 0.11)
    sizes = look_sizes(2 * users, 2 * looks)  # the first `looks` end at `users`
    tau = default_tau(0.10)
    fixed = at_n = at_2n = 0
    for i in range(POWER_SIMS):
        result = ratio_comparison(clicks_a[i, :users], exp_a[i, :users], clicks_b[i, :users],
                                  exp_b[i, :users])
        fixed += result.p_value < ALPHA and result.difference.estimate > 0
        all_looks = [ratio_look(clicks_a[i, :m], exp_a[i, :m], clicks_b[i, :m], exp_b[i, :m])
                     for m in sizes]
        at_n += sequential(all_looks[:looks], tau, ALPHA).p_value < ALPHA
        at_2n += sequential(all_looks, tau, ALPHA).p_value < ALPHA
    return fixed / POWER_SIMS, at_n / POWER_SIMS, at_2n / POWER_SIMS


def test_power_fixed_and_sequential():
    users = power_users(0.10, 0.11)  # ~2177 per arm for 80% power
    spread = (ratio_variance_per_user(0.10) + ratio_variance_per_user(0.11)) / users
    expected = stats.norm.sf(Z - 0.01 / math.sqrt(spread))
    assert expected == pytest.approx(0.80, abs=0.005)
    fixed, sequential_n, sequential_2n = power_run(np.random.default_rng(7), users, LOOKS)
    assert abs(fixed - expected) <= 0.07
    # The price of always-valid inference: at the fixed design's size and its 20 looks the
    # mSPRT (tau = the lift, near its best) has power ~0.49 by the normal theory (the final
    # look alone needs |z| > 3.03 instead of 1.96). Given twice the users it finds it ~0.87.
    assert 0.40 < sequential_n < fixed - 0.2
    assert sequential_2n > 0.75


def test_srm_flags_a_real_mismatch_and_rarely_a_fair_split():
    assert srm_check([5200, 4800], [0.5, 0.5]).mismatch
    rng = np.random.default_rng(11)
    in_a = rng.binomial(SRM_USERS, 0.5, size=SRM_DRAWS)
    flagged = sum(srm_check([int(k), SRM_USERS - int(k)], [0.5, 0.5]).mismatch for k in in_a)
    # threshold 0.001 over 10,000 fair draws: ~10 flags (Poisson; 1..25 is beyond 3.5 sd)
    assert 1 <= flagged <= 25


def test_cuped_keeps_alpha_and_narrows_the_interval():
    rng = np.random.default_rng(13)
    shape = (CUPED_SIMS, 2, CUPED_USERS)  # experiment, arm, user
    pre = rng.normal(size=shape)
    noise = rng.normal(size=shape)
    y = 30 + 10 * (CUPED_RHO * pre + math.sqrt(1 - CUPED_RHO**2) * noise)  # e.g. dwell
    x = 30 + 10 * pre  # the same users' pre-period metric
    rejections, widths = 0, []
    for i in range(CUPED_SIMS):
        adjusted = cuped_comparison(y[i, 0], x[i, 0], y[i, 1], x[i, 1])
        plain = welch(y[i, 0], y[i, 1])
        assert adjusted.method == "welch t, CUPED"
        rejections += adjusted.p_value < ALPHA
        widths.append((adjusted.difference.high - adjusted.difference.low)
                      / (plain.difference.high - plain.difference.low))
    assert 0.03 <= rejections / CUPED_SIMS <= 0.07
    # width ratio -> sqrt(1 - rho^2) = 0.714
    assert np.mean(widths) == pytest.approx(math.sqrt(1 - CUPED_RHO**2), abs=0.02)
    assert max(widths) < 1.0
