"""Paired means and their confidence intervals (Student's t), shared by the head-to-head and the model's guard."""

from __future__ import annotations

import math
import statistics

__all__ = ["CONFIDENCE", "t_quantile", "mean", "interval", "upper_within"]

CONFIDENCE = 0.95


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile, so no SciPy is needed: exact for df 1 and 2, else the Cornish-Fisher expansion around
    the normal's (a little low, within 4% of the exact value, for df >= 3 at the levels used here)."""
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = statistics.NormalDist().inv_cdf(p)
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def mean(values: list[float] | None) -> float | None:
    return None if values is None else statistics.fmean(values)


def interval(values: list[float] | None) -> tuple[float, float] | None:
    """Mean +- Student's t half-width at CONFIDENCE (two-sided); one value, or a non-finite one: (mean, mean)."""
    if values is None:
        return None
    centre = statistics.fmean(values)
    if len(values) < 2 or not all(math.isfinite(v) for v in values):
        return (centre, centre)
    half = t_quantile(1 - (1 - CONFIDENCE) / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return (centre - half, centre + half)


def upper_within(bounds: tuple[float, float] | None, budget: float) -> bool:
    """A budget holds when the interval's upper end is within it (no figure: nothing to hold against)."""
    return bounds is None or bounds[1] <= budget
