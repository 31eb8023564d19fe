"""Intervals for rates and for means over seeds (95%, no extra dependency).

- :func:`wilson`: the Wilson score interval of one cell's rate (``k`` successes of ``n``), which
  stays inside [0, 1] and is sensible at 0% and 100%, unlike the normal approximation.
- :func:`t_interval`: mean ± Student-t half-width of values over seeds (or draws); with one value
  the half-width is undefined (``nan``) and said so rather than shown as zero.
"""

from __future__ import annotations

import math

# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom; 1.96 beyond
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def wilson(rate: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval ``(low, high)`` of a rate measured on ``n`` trials (``(0, 1)`` when ``n`` is 0)."""
    if n <= 0:
        return 0.0, 1.0
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def t_quantile(df: int) -> float:
    return _T95[df - 1] if 1 <= df <= len(_T95) else 1.96


def t_interval(values) -> tuple[float, float]:
    """``(mean, half-width)`` of a 95% t-interval over ``values``; the half-width is ``nan`` for one value."""
    xs = [float(v) for v in values]
    if not xs:
        return math.nan, math.nan
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, math.nan
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    return mean, t_quantile(len(xs) - 1) * sd / math.sqrt(len(xs))
