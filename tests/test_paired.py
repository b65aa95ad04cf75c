"""Paired statistics against scipy (an independent implementation)."""

import numpy as np
import pytest
import scipy.stats as scipy_stats

from l2sp.analysis.paired import betainc, paired, sign_flip_p, t_quantile, t_sf
from l2sp.errors import L2SPError

BETA_CASES = [(0.5, 0.5, 0.3), (2.0, 0.5, 0.9), (7.5, 0.5, 0.01), (1.0, 3.0, 0.5), (30, 0.5, 0.99)]


@pytest.mark.parametrize("a,b,x", BETA_CASES)
def test_betainc_matches_scipy(a, b, x):
    from scipy.special import betainc as ref

    assert betainc(a, b, x) == pytest.approx(ref(a, b, x), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("df", [1, 2, 4, 9, 30])
@pytest.mark.parametrize("t", [-3.0, -0.4, 0.0, 0.7, 2.5, 12.0])
def test_t_tail_and_quantile_match_scipy(t, df):
    assert t_sf(t, df) == pytest.approx(scipy_stats.t.sf(t, df), rel=1e-10, abs=1e-15)
    for q in (0.025, 0.5, 0.975, 0.995):
        assert t_quantile(q, df) == pytest.approx(scipy_stats.t.ppf(q, df), rel=1e-9, abs=1e-10)


def _random_pairs(seed, n):
    rng = np.random.default_rng(seed)
    a = rng.normal(91.0, 0.4, n)
    return a, a - rng.normal(0.3, 0.3, n)


@pytest.mark.parametrize("seed,n", [(0, 2), (1, 5), (2, 5), (3, 8), (4, 12)])
def test_paired_matches_ttest_rel_and_t_interval(seed, n):
    a, b = _random_pairs(seed, n)
    r = paired(a.tolist(), b.tolist())
    ref = scipy_stats.ttest_rel(a, b)
    d = a - b
    assert r.n == n
    assert r.mean == pytest.approx(d.mean(), abs=1e-12)
    assert r.std == pytest.approx(d.std(ddof=1), rel=1e-12)
    assert r.p_t == pytest.approx(ref.pvalue, rel=1e-9)
    low, high = scipy_stats.t.interval(0.95, n - 1, loc=d.mean(), scale=scipy_stats.sem(d))
    assert (r.low, r.high) == (pytest.approx(low, rel=1e-9), pytest.approx(high, rel=1e-9))
    assert r.significant == (ref.pvalue < 0.05) == (low > 0 or high < 0)


@pytest.mark.parametrize("seed,n", [(5, 3), (6, 5), (7, 7), (8, 10)])
def test_sign_flip_matches_scipy_permutation_test(seed, n):
    a, b = _random_pairs(seed, n)
    ref = scipy_stats.permutation_test(
        (a, b), lambda x, y: np.mean(x - y), permutation_type="samples", n_resamples=np.inf, alternative="two-sided"
    )
    assert sign_flip_p(a - b) == pytest.approx(ref.pvalue, rel=1e-12)


def test_sign_flip_floor_and_brute_force():
    # every difference positive: only the all-plus and all-minus patterns are as extreme
    assert sign_flip_p([0.1, 0.2, 0.3, 0.4, 0.5]) == pytest.approx(2 / 32)
    # brute force on a tiny case: diffs (1, -3): patterns ±1±3 -> |mean| in {2, 1, 1, 2}; observed |−2/2| = 1
    assert sign_flip_p([1.0, -3.0]) == 1.0
    assert sign_flip_p([3.0, 1.0]) == 0.5


def test_paired_bad_inputs():
    with pytest.raises(L2SPError, match="same seeds"):
        paired([1.0, 2.0], [1.0])
    with pytest.raises(L2SPError, match="at least 2 seeds"):
        paired([1.0], [0.0])
    with pytest.raises(L2SPError, match="confidence"):
        paired([1.0, 2.0], [0.0, 1.0], confidence=1.5)


def test_paired_constant_difference():
    r = paired([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])
    assert (r.mean, r.std, r.p_t, r.low, r.high) == (1.0, 0.0, 0.0, 1.0, 1.0)
    assert r.significant and str(r) == "+1.00 ± 0.00*"


def test_pair_by_seed_matches_seeds_not_positions():
    from l2sp.experiments.seeds import pair_by_seed

    a = [{"seed": s, "test_acc": v} for s, v in ((2, 0.915), (0, 0.920), (1, 0.910), (7, 0.5))]
    b = [{"seed": s, "test_acc": v} for s, v in ((0, 0.912), (1, 0.905), (2, 0.911), (9, 0.9))]
    r = pair_by_seed(a, b)  # seeds 0, 1, 2 only, in seed order; in points
    ref = scipy_stats.ttest_rel([92.0, 91.0, 91.5], [91.2, 90.5, 91.1])
    assert r.n == 3 and r.mean == pytest.approx((0.8 + 0.5 + 0.4) / 3)
    assert r.p_t == pytest.approx(ref.pvalue, rel=1e-9)
    drop = pair_by_seed([{"seed": 0, "d": 3.0}, {"seed": 1, "d": 5.0}], [{"seed": 1, "d": 1.0}, {"seed": 0, "d": 2.0}],
                        lambda r: r["d"], scale=1.0)
    assert (drop.mean, drop.std) == (pytest.approx(2.5), pytest.approx(2 ** 0.5 * 1.5))
