"""A distribution's mean is the same to the last bit whatever numpy's BLAS threading (a summary must not depend
on the machine's core count)."""
from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
import numpy as np
from emulator.stats import weighted_distribution
rng = np.random.default_rng(7)
values = rng.random(2_000_000) * 0.05
weights = rng.integers(1, 5, size=len(values))
print(repr(weighted_distribution(values, weights)["mean"]))
"""


def test_weighted_mean_does_not_depend_on_blas_threads():
    means = set()
    for threads in ("1", "2", "4"):
        env = {**os.environ, "OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads}
        means.add(subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                                 check=True).stdout.strip())
    assert len(means) == 1, means
