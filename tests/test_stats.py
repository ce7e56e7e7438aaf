"""The paired t test against cases worked by hand and closed forms of the t distribution."""
from __future__ import annotations

import math

import pytest

from mmfl.stats import paired_t, regularized_beta, t_two_sided_p


def test_paired_t_hand_computed_case() -> None:
    # a - b = 1, 2, 3, 4, 5: mean 3, sd sqrt(10 / 4) = 1.5811, t = 3 / (1.5811 / sqrt 5) = 4.2426, df 4.
    # For 4 degrees of freedom P(|T| >= t) = 1 - x (3 - x^2) / 2 with x = t / sqrt(4 + t^2),
    # here x = 4.24264 / sqrt(22) = 0.904534, x^2 = 9 / 11: p = 1 - 0.904534 * 24 / 22 = 0.0132356.
    r = paired_t([11, 12, 13, 14, 15], [10, 10, 10, 10, 10])
    assert (r.n, r.df, r.wins, r.ties) == (5, 4, 5, 0)
    assert r.mean_diff == pytest.approx(3.0)
    assert r.sd_diff == pytest.approx(1.58114, abs=1e-5)
    assert r.t == pytest.approx(4.24264, abs=1e-5)
    assert r.p == pytest.approx(0.0132356, abs=2e-7)
    assert r.significant
    # Swapping the sides flips the sign and keeps p.
    s = paired_t([10] * 5, [11, 12, 13, 14, 15])
    assert s.t == pytest.approx(-r.t) and s.p == pytest.approx(r.p) and s.wins == 0


def test_paired_t_not_significant_and_degenerate_cases() -> None:
    r = paired_t([1.0, 2.0, 3.0], [1.5, 1.0, 3.2])  # diffs -0.5, 1.0, -0.2: mean 0.1
    assert r.wins == 1 and r.mean_diff == pytest.approx(0.1) and not r.significant
    assert paired_t([1, 2], [1, 2]).p == 1.0 and paired_t([1, 2], [1, 2]).ties == 2
    assert paired_t([2, 3], [1, 2]).p == 0.0 and math.isinf(paired_t([2, 3], [1, 2]).t)
    with pytest.raises(ValueError):
        paired_t([1, 2], [1])
    with pytest.raises(ValueError):
        paired_t([1], [1])


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.2, 4.5, 12.0])
def test_t_distribution_matches_closed_forms(t: float) -> None:
    # df 1 (Cauchy): p = 1 - 2 atan(t) / pi; df 2: p = 1 - t / sqrt(2 + t^2).
    assert t_two_sided_p(t, 1) == pytest.approx(1 - 2 * math.atan(t) / math.pi, abs=1e-12)
    assert t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-12)
    x = t / math.sqrt(4 + t * t)
    assert t_two_sided_p(t, 4) == pytest.approx(1 - x * (3 - x * x) / 2, abs=1e-12)


def test_regularized_beta_edges_and_symmetry() -> None:
    assert regularized_beta(0.0, 2, 3) == 0.0 and regularized_beta(1.0, 2, 3) == 1.0
    assert regularized_beta(0.3, 1, 1) == pytest.approx(0.3)  # uniform
    assert regularized_beta(0.3, 2.5, 4) == pytest.approx(1 - regularized_beta(0.7, 4, 2.5), abs=1e-13)
    with pytest.raises(ValueError):
        regularized_beta(1.5, 1, 1)
