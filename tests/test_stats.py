import math

import pytest

from purifylib.stats import t_interval, t_quantile, wilson


def test_wilson_interval():
    lo, hi = wilson(0.0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)  # never below 0, not (0, 0) at 0%
    lo, hi = wilson(0.5, 100)
    assert (lo, hi) == (pytest.approx(0.4038, abs=1e-3), pytest.approx(0.5962, abs=1e-3))
    lo, hi = wilson(1.0, 36)
    assert hi == 1.0 and lo == pytest.approx(0.9036, abs=1e-3)
    assert wilson(0.3, 0) == (0.0, 1.0)


def test_t_interval():
    mean, half = t_interval([1, 2, 3])
    assert mean == 2 and half == pytest.approx(4.303 / math.sqrt(3))
    mean, half = t_interval([5])
    assert mean == 5 and math.isnan(half)  # one seed: no interval, said as such
    assert t_quantile(100) == 1.96
