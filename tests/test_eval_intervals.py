"""Confidence intervals of the eval report against scipy, textbook values and a published paired example."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from sts.errors import STSError
from sts.eval.intervals import mean_interval, paired_difference_interval, wilson_interval


@pytest.mark.parametrize("n", [1, 7, 20])
def test_wilson_interval_of_0_1_scores_equals_scipy(n):
    for k in range(n + 1):
        got = wilson_interval([1.0] * k + [0.0] * (n - k))
        want = stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
        assert (got.estimate, got.low, got.high) == pytest.approx((k / n, want.low, want.high), abs=1e-12)


def test_wilson_interval_of_15_of_20_by_its_formula():
    z, n, p = 1.959963984540054, 20, 0.75
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    got = wilson_interval([1.0] * 15 + [0.0] * 5)
    assert (got.low, got.high) == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert (round(got.low, 4), round(got.high, 4)) == (0.5313, 0.8881)


def test_paired_difference_matches_the_published_example():
    # Fagerland, Lydersen & Laake, "Statistical Analysis of Contingency Tables" (2017), Ch. 8: Cavo et al. (2012),
    # 161 pairs [[59, 6], [16, 80]]; Newcombe's square-and-add interval -0.0621 (-0.1186 to -0.0046).
    first = [1.0] * 59 + [1.0] * 6 + [0.0] * 16 + [0.0] * 80
    second = [1.0] * 59 + [0.0] * 6 + [1.0] * 16 + [0.0] * 80
    got = paired_difference_interval(first, second)
    assert (round(got.estimate, 4), round(got.low, 4), round(got.high, 4)) == (-0.0621, -0.1186, -0.0046)
    swapped = paired_difference_interval(second, first)
    assert (swapped.estimate, swapped.low, swapped.high) == pytest.approx((-got.estimate, -got.high, -got.low))


def test_identical_perfect_scores_leave_a_wilson_sized_doubt():
    # Both means 1: no correlation term, so each side is one Wilson half-width (1 - lower bound of 20/20).
    got = paired_difference_interval([1.0] * 20, [1.0] * 20)
    margin = 1 - stats.binomtest(20, 20).proportion_ci(0.95, method="wilson").low
    assert (got.estimate, got.low, got.high) == pytest.approx((0.0, -margin, margin))


def test_mean_interval_equals_the_student_t_interval():
    values = [2.5, 3.0, 2.8, 3.3, 4.1, 1.9]
    got = mean_interval(values)
    want = stats.ttest_1samp(values, 0.0).confidence_interval(0.95)
    assert (got.estimate, got.low, got.high) == pytest.approx((sum(values) / 6, want.low, want.high))
    assert mean_interval([3.0]) is None


def test_mean_interval_is_cut_to_the_range_the_mean_lies_in():
    # Two score differences of +100 and 0 points: the t interval (1 degree of freedom) spans about +-635 points.
    wide = stats.ttest_1samp([100.0, 0.0], 0.0).confidence_interval(0.95)
    assert wide.low < -100 and wide.high > 100
    got = mean_interval([100.0, 0.0], bounds=(-100.0, 100.0))
    assert (got.estimate, got.low, got.high) == (50.0, -100.0, 100.0)
    got = mean_interval([1.0, 1.2, 5.0], bounds=(1.0, math.inf))  # acceptance lengths: at least 1
    assert got.low == 1.0 and got.high == pytest.approx(stats.ttest_1samp([1.0, 1.2, 5.0], 0).confidence_interval().high)


def test_bad_scores_are_refused():
    with pytest.raises(STSError, match="at least one score"):
        wilson_interval([])
    with pytest.raises(STSError, match=r"\[0, 1\]"):
        wilson_interval([0.5, 1.5])
    with pytest.raises(STSError, match="equal lengths"):
        paired_difference_interval([1.0, 0.0], [1.0])
