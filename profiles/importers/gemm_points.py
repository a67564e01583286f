"""A GEMM grid over (m, n, k) built from GEMMs measured at a few (n, k) shapes.

Profilers that time whole models (LLMServingSim v0, Vidur) measure a GEMM at every
token count m but only at the (n, k) shapes of the models they ran. The operator
table needs a full grid, so the cells of unmeasured shapes are filled the way the
torch profiler fills its own (emulator.grid_table.fill_holes: in proportion to m,
n and k from the nearest smaller measured cell, else the nearest measured value)
and keep measured = False: a lookup that touches one is reported as extrapolated.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from emulator.cost.interpolate import fill_holes
from emulator.cost.tables import Grid


def gemm_grid(points: dict[tuple[int, int, int], list[float]], ms: list[int], source: str) -> Grid:
    """points: (m, n, k) -> measured times (µs; repeats reduced to their median); ms: the m axis kept."""
    by_shape: dict[tuple[int, int], dict[int, float]] = defaultdict(dict)
    for (m, n, k), times in points.items():
        by_shape[(n, k)][m] = float(np.median(times))
    ns = sorted({n for n, _ in by_shape})
    ks = sorted({k for _, k in by_shape})
    values = np.full((len(ms), len(ns), len(ks)), np.nan)
    for (n, k), row in by_shape.items():
        for i, m in enumerate(ms):
            if m in row:
                values[i, ns.index(n), ks.index(k)] = row[m]
    axes = [np.array(ms, float), np.array(ns, float), np.array(ks, float)]
    filled, measured = fill_holes(axes, values, (0, 1, 2))
    return Grid(dict(zip(("m", "n", "k"), axes)), filled, measured, source)
