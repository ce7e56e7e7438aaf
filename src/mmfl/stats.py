"""Paired comparisons of two variants over the same seeds (the paired t test), with no SciPy.

Benchmarks here compare variants trained with the same seeds on the same data, so the seed's
share of the variation cancels in the per-seed difference; the paired t test on those
differences is far more sensitive than comparing two means and their spreads. The Student t
distribution function is computed from the regularised incomplete beta function (continued
fraction, Lentz's method), so the project needs no SciPy for one p-value.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

#: Significance level the benchmark tables mark.
ALPHA = 0.05


@dataclass(frozen=True)
class PairedResult:
    """The paired comparison ``a - b``: differences' mean and sample sd, wins of ``a``, t and p."""

    n: int
    mean_diff: float
    sd_diff: float
    wins: int
    ties: int
    t: float
    df: int
    p: float

    @property
    def significant(self) -> bool:
        return self.p < ALPHA

    def to_dict(self) -> dict[str, float | int | bool]:
        return {**asdict(self), "significant": self.significant}


def paired_t(a: Sequence[float], b: Sequence[float]) -> PairedResult:
    """Paired t test of ``a`` against ``b`` (same length, paired by position), two-sided.

    With every difference equal the sd is 0: t is +/-inf and p is 0 for a non-zero difference,
    and t = 0, p = 1 when all differences are zero (nothing to tell apart).
    """
    if len(a) != len(b):
        raise ValueError(f"paired_t: {len(a)} and {len(b)} values cannot be paired")
    n = len(a)
    if n < 2:
        raise ValueError("paired_t: needs at least 2 pairs")
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    wins = sum(d > 0 for d in diffs)
    ties = sum(d == 0 for d in diffs)
    if sd == 0.0:
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
        p = 1.0 if mean == 0.0 else 0.0
    else:
        t = mean / (sd / math.sqrt(n))
        p = t_two_sided_p(t, n - 1)
    return PairedResult(n=n, mean_diff=mean, sd_diff=sd, wins=wins, ties=ties, t=t, df=n - 1, p=p)


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom: I_{df/(df+t^2)}(df/2, 1/2)."""
    if df <= 0:
        raise ValueError(f"df: {df} must be positive")
    if math.isinf(t):
        return 0.0
    return regularized_beta(df / (df + t * t), df / 2.0, 0.5)


def regularized_beta(x: float, a: float, b: float) -> float:
    """The regularised incomplete beta function I_x(a, b), for 0 <= x <= 1 and a, b > 0."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x: {x} is outside [0, 1]")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # The continued fraction converges fast for x < (a + 1) / (a + b + 2); use the symmetry otherwise.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(1.0 - x, b, a) / b


def _beta_fraction(x: float, a: float, b: float, eps: float = 1e-15, max_terms: int = 500) -> float:
    """The continued fraction of the incomplete beta function, by Lentz's method."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_terms + 1):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta: no convergence for x={x}, a={a}, b={b}")
