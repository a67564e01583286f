"""Piecewise-linear lookups over measured grids, fast enough for the step loop.

Between grid points: linear. Below the first point: the first value (a kernel
never gets cheaper than its smallest shape). Above the last point: linear
extrapolation through the last two points, counted in `extrapolations` so the
output can say how much of a run was priced outside the measured range.
"""
from __future__ import annotations

from bisect import bisect_right

import numpy as np


class Table1D:
    __slots__ = ("xs", "ys", "x_max", "extrapolations", "_cache")

    def __init__(self, xs, ys) -> None:
        order = np.argsort(xs)
        self.xs = [float(x) for x in np.asarray(xs)[order]]
        self.ys = [float(y) for y in np.asarray(ys)[order]]
        self.x_max = self.xs[-1]
        self.extrapolations = 0
        self._cache: dict[float, float] = {}

    def __call__(self, x: float) -> float:
        y = self._cache.get(x)
        if y is None:
            y = self._cache[x] = self._eval(x)
        if x > self.x_max:
            self.extrapolations += 1
        return y

    def _eval(self, x: float) -> float:
        xs, ys = self.xs, self.ys
        if len(xs) == 1 or x <= xs[0]:
            return ys[0]
        i = bisect_right(xs, x)
        if i >= len(xs):
            i = len(xs) - 1
        x0, x1 = xs[i - 1], xs[i]
        return ys[i - 1] + (ys[i] - ys[i - 1]) * (x - x0) / (x1 - x0)


def bracket(axis: list[float], x: float) -> tuple[int, int, float]:
    """Indices (lo, hi) around x and the weight of hi; extrapolates above the last point."""
    n = len(axis)
    if n == 1 or x <= axis[0]:
        return 0, 0, 0.0
    i = bisect_right(axis, x)
    if i >= n:
        i = n - 1
    return i - 1, i, (x - axis[i - 1]) / (axis[i] - axis[i - 1])
