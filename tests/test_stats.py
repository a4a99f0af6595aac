"""Small-sample statistics against hand-computed numbers, published t tables and scipy's t quantiles."""

import math

import pytest

from pwda_fast import stats

# Two-sided 95% points t_{0.975, df} as R's qt(0.975, df) gives them (printed t tables, e.g. the
# NIST/SEMATECH e-Handbook's, agree to their 3 decimals).
T_975 = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305, 4: 2.776445105, 5: 2.570581836,
         6: 2.446911851, 9: 2.262157163, 10: 2.228138852, 19: 2.093024054, 29: 2.045229642,
         30: 2.042272456, 60: 2.000297822, 100: 1.983971519, 1000: 1.962339081}


def test_mean_sd_and_t_interval_by_hand():
    """Paired differences 1, 2, 4, 5 (n = 4):

    mean = 12 / 4 = 3
    deviations -2, -1, 1, 2; squares 4, 1, 1, 4; sum 10
    sample sd = sqrt(10 / 3) = sqrt(3.333333) = 1.8257419
    t_{0.975, 3} = 3.1824463 (table)
    half width = 3.1824463 * 1.8257419 / sqrt(4) = 5.8103252 / 2 = 2.9051626
    95% interval = [3 - 2.9051626, 3 + 2.9051626] = [0.0948374, 5.9051626]
    """
    values = [1.0, 2.0, 4.0, 5.0]
    assert stats.mean(values) == 3.0
    assert stats.sample_sd(values) == pytest.approx(1.8257419, abs=1e-7)
    ci = stats.t_interval(values)
    assert (ci.mean, ci.n, ci.level) == (3.0, 4, 0.95)
    assert ci.half_width == pytest.approx(2.9051626, abs=1e-6)
    assert (ci.low, ci.high) == (pytest.approx(0.0948374, abs=1e-6), pytest.approx(5.9051626, abs=1e-6))
    assert ci.to_dict()["low"] == ci.low and ci.to_dict()["sd"] == ci.sd


def test_interval_of_three_negative_differences_by_hand():
    """-0.5, -2.0, -3.5 (n = 3): mean -2.0; deviations 1.5, 0, -1.5; sum of squares 4.5;
    sd = sqrt(4.5 / 2) = 1.5; t_{0.975, 2} = 4.3026527; half = 4.3026527 * 1.5 / sqrt(3) = 3.7262064;
    interval [-5.7262064, 1.7262064]: it contains 0 although every difference is negative."""
    ci = stats.t_interval([-0.5, -2.0, -3.5])
    assert ci.mean == pytest.approx(-2.0) and ci.sd == pytest.approx(1.5)
    assert ci.half_width == pytest.approx(3.7262064, abs=1e-6)
    assert ci.low < 0 < ci.high


def test_one_value_has_no_spread_or_interval():
    ci = stats.t_interval([7.5])
    assert (ci.mean, ci.sd, ci.half_width, ci.low, ci.high) == (7.5, None, None, None, None)
    assert stats.sample_sd([7.5]) is None
    with pytest.raises(ValueError, match="no values"):
        stats.mean([])


@pytest.mark.parametrize("df", sorted(T_975))
def test_t_quantile_matches_the_tables(df):
    assert stats.t_quantile(0.975, df) == pytest.approx(T_975[df], abs=1e-8)


def test_t_quantile_other_levels_symmetry_and_limits():
    assert stats.t_quantile(0.995, 7) == pytest.approx(3.499483297, abs=1e-8)  # 99% two-sided, df 7
    assert stats.t_quantile(0.95, 12) == pytest.approx(1.782287556, abs=1e-8)  # 90% two-sided, df 12
    assert stats.t_quantile(0.025, 4) == pytest.approx(-T_975[4], abs=1e-9)
    assert stats.t_quantile(0.5, 3) == pytest.approx(0.0, abs=1e-12)
    z = 1.959963984540054  # the normal quantile: the limit as df grows
    assert stats.t_quantile(0.975, 1e7) == pytest.approx(z, abs=1e-6)
    assert stats.t_quantile(0.975, 1e15) == pytest.approx(z, abs=1e-12)
    assert stats.t_quantile(0.975, 1e4) > z
    # Both sides of the switch to the series at LARGE_DF meet.
    below, above = stats.t_quantile(0.975, stats.LARGE_DF), stats.t_quantile(0.975, stats.LARGE_DF + 1e-9)
    assert below == pytest.approx(above, abs=1e-12)
    for bad_p, bad_df in ((0.0, 3), (1.0, 3), (0.975, 0)):
        with pytest.raises(ValueError):
            stats.t_quantile(bad_p, bad_df)


def test_cdf_inverts_the_quantile_and_df_1_is_cauchy():
    for df in (1, 2.5, 8, 40):
        for p in (0.6, 0.9, 0.975, 0.999):
            assert stats.t_cdf(stats.t_quantile(p, df), df) == pytest.approx(p, abs=1e-12)
    # df = 1 is the Cauchy distribution: P(T <= t) = 1/2 + atan(t) / pi.
    for t in (-3.0, 0.0, 0.7, 20.0):
        assert stats.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-13)


# scipy's quantiles (Boost's inversion, accurate to a few ulp) as the reference, the way the label
# tables are checked against cityscapesscripts: a test-only dependency (`make` installs it).
SCIPY_DFS = [*range(1, 61), 75, 100, 120, 250, 500, 999, stats.LARGE_DF, 1001, 2000, 10**4, 10**6, 10**9,
             0.5, 2.5, 7.3]
SCIPY_PS = (0.6, 0.75, 0.9, 0.95, 0.975, 0.99, 0.995, 0.999)


@pytest.mark.parametrize("df", SCIPY_DFS)
def test_t_quantile_matches_scipy_when_installed(df):
    t = pytest.importorskip("scipy.stats", reason="scipy not installed (pip install scipy to run this "
                                                  "cross-check)").t
    for p in SCIPY_PS:
        expected = float(t.ppf(p, df))
        assert stats.t_quantile(p, df) == pytest.approx(expected, rel=1e-11, abs=0), (p, df)
        assert stats.t_quantile(1 - p, df) == pytest.approx(-expected, rel=1e-11, abs=0), (1 - p, df)
