"""The summary's percentiles, read off a sorted array, are numpy's (linear) to the last bit."""
from __future__ import annotations

import numpy as np
import pytest

from emulator.stats import PERCENTILES, distribution, sorted_percentile


@pytest.mark.parametrize("seed", range(4))
def test_sorted_percentiles_equal_numpys(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for n in (1, 2, 3, 7, 100, 997):
        for a in (rng.random(n) * 10.0 ** int(rng.integers(-6, 4)), rng.integers(0, 4, n).astype(float)):
            s = np.sort(a)
            for p in (*PERCENTILES, 0, 12.5, 33.3, 99.99, 100):
                assert sorted_percentile(s, p) == float(np.percentile(a, p))
            summary = distribution(list(a) + [None])
            assert summary["p99"] == float(np.percentile(a, 99)) and summary["max"] == float(a.max())
