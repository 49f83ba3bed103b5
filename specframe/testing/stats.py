"""Statistical tests, for parts whose randomness the exact checks cannot follow (it does not go
through the sampler): Pearson's chi-square, and its power against a stated alternative."""

from __future__ import annotations

import math
from collections import Counter

import torch
from attrs import frozen

from .report import CheckFailed

SHIFT = 0.05  # the alternative a statistical test's power is stated against: this much probability moved


@frozen
class ChiSquare:
    """Pearson's chi-square goodness of fit."""

    statistic: float
    dof: int
    p_value: float
    worst: str = ""  # the cell that contributes most, for messages

    def describe(self, alpha: float | None = None) -> str:
        below = f" < {alpha:.2g}" if alpha is not None and self.p_value < alpha else ""
        return (f"chi-square {self.statistic:.1f} on {self.dof} degrees of freedom, p = {self.p_value:.2g}{below}"
                + (f" (worst cell {self.worst})" if self.worst else ""))


def _upper_tail(dof: float, statistic: float) -> float:
    """P(chi-square with `dof` degrees of freedom > statistic)."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


def chi_square(observed: Counter, expected: dict, min_expected: float = 5.0) -> ChiSquare:
    """Compare counts with expected counts; cells expected below `min_expected` are pooled.

    A count in a cell with expected count 0 gives p = 0 (an impossible outcome happened).
    """
    impossible = [key for key, count in observed.items() if count and expected.get(key, 0.0) <= 0]
    if impossible:
        key = impossible[0]
        return ChiSquare(math.inf, 0, 0.0, f"{key} occurred {observed[key]} times but has probability 0")
    cells = [(key, observed.get(key, 0), e) for key, e in expected.items() if e >= min_expected]
    rest_observed = sum(observed.get(key, 0) for key, e in expected.items() if 0 < e < min_expected)
    rest_expected = sum(e for e in expected.values() if 0 < e < min_expected)
    if rest_expected > 0:
        cells.append(("(rare outcomes pooled)", rest_observed, rest_expected))
    if len(cells) < 2:
        return ChiSquare(0.0, 0, 1.0)
    terms = [((o - e) ** 2 / e, key, o, e) for key, o, e in cells]
    statistic = sum(t[0] for t in terms)
    _, key, o, e = max(terms, key=lambda t: t[0])
    return ChiSquare(statistic, len(cells) - 1, _upper_tail(len(cells) - 1, statistic),
                     f"{key}: observed {o}, expected {e:.1f}")


def chi_square_power(expected: dict, alpha: float, shift: float = SHIFT) -> float:
    """The chance that `chi_square` rejects at level `alpha` when `shift` of the probability has
    moved from the likeliest cell to the second likeliest (noncentral chi-square, pooled cells
    ignored). `expected`: expected counts; their sum is the number of samples."""
    n = sum(expected.values())
    counts = sorted((e for e in expected.values() if e >= 5.0), reverse=True)
    if len(counts) < 2 or n <= 0:
        return 0.0
    moved = min(shift * n, counts[0])
    noncentrality = moved ** 2 / counts[0] + moved ** 2 / counts[1]
    dof = len(counts) - 1
    low, high = 0.0, 10.0 * dof + 100.0  # the critical value, by bisection on the upper tail
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if _upper_tail(dof, middle) > alpha else (low, middle)
    half = noncentrality / 2  # a Poisson(half) mixture of central chi-squares with dof + 2j
    return min(1.0, sum(math.exp(-half + j * math.log(half) - math.lgamma(j + 1)) * _upper_tail(dof + 2 * j, high)
               for j in range(int(half + 10 * math.sqrt(half) + 20)))) if half > 0 else alpha


def expect_fit(what: str, observed: Counter, expected: dict, alpha: float) -> str:
    """Raise CheckFailed when the counts do not fit; else describe the fit and the test's power."""
    result = chi_square(observed, expected)
    if result.p_value < alpha:
        raise CheckFailed(f"{what}: {result.describe(alpha)}")
    power = chi_square_power(expected, alpha)
    return f"{result.describe()}; power {power:.0%} against {SHIFT} of the probability moved"
