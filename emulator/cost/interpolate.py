"""Every lookup over measured tables, in one place.

- `Table1D` and `bracket`: piecewise-linear over one axis, scalar and cached (the
  per-layer profile tables of the step loop).
- `Grid2D`: bilinear over a precomputed 2-D grid, scalar (attention in the step loop).
- `GridTable`: multilinear over an N-D grid of kernel times, vectorised (operator
  tables, read once per engine to tabulate a step's cost); `fill_holes` prepares
  such a grid from sparse measurements.

Between grid points: linear (in log2 of the coordinates for the geometric grids of
kernel shapes). Below the first point: the first value (a kernel never gets cheaper
than its smallest shape). Above the last point: extrapolated and counted, so the
output can say how much of a run was priced outside the measured range.
"""
from __future__ import annotations

import math
from bisect import bisect_right

import numpy as np


class Table1D:
    """y(x) over measured points, linear between them and through the last two above them."""
    __slots__ = ("xs", "ys", "x_max", "extrapolations", "_cache")

    def __init__(self, xs, ys) -> None:
        order = np.argsort(xs)
        self.xs = [float(x) for x in np.asarray(xs)[order]]
        self.ys = [float(y) for y in np.asarray(ys)[order]]
        self.x_max = self.xs[-1]
        self.extrapolations = 0
        self._cache: dict[float, float] = {}

    def __call__(self, x: float) -> float:
        """y(x), counting a lookup above the last point."""
        y = self._cache.get(x)
        if y is None:
            y = self._cache[x] = self._eval(x)
        if x > self.x_max:
            self.extrapolations += 1
        return y

    def value(self, x: float) -> float:
        """y(x), not counted (for reports that re-read what a step already priced)."""
        y = self._cache.get(x)
        if y is None:
            y = self._cache[x] = self._eval(x)
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


class Grid2D:
    """Bilinear lookup over a precomputed 2-D grid (log-log or linear), one point at a time: the step loop's
    attention lookup, where numpy's per-call overhead would dominate."""
    __slots__ = ("xs", "ys", "values", "flags", "log", "_kx", "_ky", "_columns")

    def __init__(self, xs, ys, values, flags, log: bool) -> None:
        self.log = log
        self._kx = [math.log2(x) for x in xs] if log else [float(x) for x in xs]
        self._ky = [math.log2(y) for y in ys] if log else [float(y) for y in ys]
        self.values = np.log2(np.maximum(values, 1e-9)).tolist() if log else values.tolist()
        self.flags = flags.tolist()
        self.xs, self.ys = list(xs), list(ys)
        self._columns: dict[float, Grid2DColumn] = {}

    def __call__(self, x: float, y: float) -> tuple[float, bool]:
        """The value at (x, y) and whether it was extrapolated (any x: a prefill's batch is fractional)."""
        i0, i1, wx = bracket(self._kx, math.log2(x) if self.log else x)
        j0, j1, wy = bracket(self._ky, math.log2(y) if self.log else y)
        v = self.values
        a = v[i0][j0] + (v[i0][j1] - v[i0][j0]) * wy
        b = v[i1][j0] + (v[i1][j1] - v[i1][j0]) * wy
        t = a + (b - a) * wx
        f = self.flags
        extrapolated = x > self.xs[-1] or y > self.ys[-1] or f[i0][j0] or f[i1][j1]
        return (2.0 ** t if self.log else t), extrapolated

    def at_x(self, x: float) -> Grid2DColumn:
        """The lookup with x fixed: the same arithmetic, the x half done once (and kept: a step's x is its
        number of decodes, so a replay asks for a few hundred columns, each many times)."""
        column = self._columns.get(x)
        if column is None:
            column = self._columns[x] = Grid2DColumn(self, x)
        return column


_NO_SPAN = (math.inf, -math.inf, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, False)  # Grid2DColumn.span's empty range


class Grid2DColumn:
    """Grid2D at one x, by y (a run of decode steps: the same batch, a longer context every step)."""
    __slots__ = ("grid", "x", "i0", "i1", "wx", "beyond_x", "y_last", "_ky", "_log", "_spans", "_span_columns")

    def __init__(self, grid: Grid2D, x: float) -> None:
        self.grid, self.x = grid, x
        self.i0, self.i1, self.wx = bracket(grid._kx, math.log2(x) if grid.log else x)
        self.beyond_x = x > grid.xs[-1]
        self._ky, self.y_last, self._log = grid._ky, grid.ys[-1], grid.log
        # Per span [ky[j-1], ky[j]) of the y axis, what a lookup in it reads, the differences taken once
        # (the same operations on the same values as taking them per lookup): its start and width, the
        # two rows' values at its start and their rises, whether a cell it touches was extrapolated.
        # Span 0 stands for y at or below the first point (weight 0 on the first point).
        v0, v1 = grid.values[self.i0], grid.values[self.i1]
        f0, f1 = grid.flags[self.i0], grid.flags[self.i1]
        ky = grid._ky
        self._spans = [(ky[0], 1.0, v0[0], v0[0] - v0[0], v1[0], v1[0] - v1[0], f0[0] or f1[0])] + [
            (ky[j - 1], ky[j] - ky[j - 1], v0[j - 1], v0[j] - v0[j - 1], v1[j - 1], v1[j] - v1[j - 1],
             f0[j - 1] or f1[j]) for j in range(1, len(ky))]
        self._span_columns: tuple[np.ndarray, np.ndarray] | None = None  # ky and the spans as arrays, for `many`

    def __call__(self, y: float) -> tuple[float, bool]:
        ky, log = self._ky, self._log
        k = math.log2(y) if log else y
        if k <= ky[0] or len(ky) == 1:
            start, width, a0, da, b0, db, flagged = self._spans[0]
            wy = 0.0
        else:  # bracket(ky, k), inlined: this runs twice per priced decode step
            j = bisect_right(ky, k)
            start, width, a0, da, b0, db, flagged = self._spans[j if j < len(ky) else len(ky) - 1]
            wy = (k - start) / width
        a = a0 + da * wy
        b = b0 + db * wy
        t = a + (b - a) * self.wx
        extrapolated = self.beyond_x or y > self.y_last or flagged
        return (2.0 ** t if log else t), extrapolated

    def span(self, y: float) -> tuple[float, float, float, float, float, float, float, float, bool]:
        """What a lookup at y reads, and for which y it reads the same: (lo, hi, start, width, a0, da, b0, db,
        extrapolated), where for every y in [lo, hi) the lookup is t = a + (b - a) * wx with a = a0 + da * wy,
        b = b0 + db * wy and wy = (y - start) / width, and says `extrapolated`: `__call__`'s operations, so a
        caller that keeps a span between lookups (a run's contexts stay in one for long stretches) skips the
        search. At or below the first point (a weight of 0, not computed): an empty range. Linear grids only."""
        ky = self._ky
        if self._log:
            raise ValueError("Grid2DColumn.span: only for a linear grid")
        if len(ky) == 1 or y <= ky[0]:
            return _NO_SPAN
        j = bisect_right(ky, y)
        last = len(ky) - 1
        if j > last:
            j = last
        # span j holds ky[j - 1] <= y < ky[j] (y > ky[0] for the first; any y past ky[-2] for the last, which
        # is cut at the last point: past it every lookup is extrapolated)
        lo = ky[j - 1] if j > 1 else math.nextafter(ky[0], math.inf)
        hi = ky[j]
        start, width, a0, da, b0, db, flagged = self._spans[j]
        extrapolated = bool(self.beyond_x or flagged)
        if j == last:
            past = math.nextafter(self.y_last, math.inf)
            if y < past:
                hi = past
            else:
                lo, hi, extrapolated = past, math.inf, True
        return lo, hi, start, width, a0, da, b0, db, extrapolated

    def many(self, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The lookup at every y of an array, each exactly as one lookup computes it (the same float
        operations, elementwise); linear grids only (numpy's log2 may differ from math's in the last bit)."""
        if self._log:
            raise ValueError("Grid2DColumn.many: only for a linear grid")
        if self._span_columns is None:
            self._span_columns = np.asarray(self._ky, dtype=np.float64), np.asarray(self._spans, dtype=np.float64).T
        ky, spans = self._span_columns  # spans: start, width, a0, da, b0, db, flagged
        j = np.minimum(np.searchsorted(ky, ys, side="right"), len(ky) - 1)
        below = ys <= ky[0] if len(ky) > 1 else np.ones(len(ys), bool)
        j[below] = 0
        wy = (ys - spans[0][j]) / spans[1][j]
        wy[below] = 0.0
        a = spans[2][j] + spans[3][j] * wy
        b = spans[4][j] + spans[5][j] * wy
        t = a + (b - a) * self.wx
        return t, self.beyond_x | (ys > self.y_last) | (spans[6][j] != 0)


class GridTable:
    """Kernel times over an N-D grid, each axis in log2 space (shapes are measured on roughly
    geometric grids and cost is close to a power law of each size between two points). Above
    the last point of an axis the time grows in proportion to it (`proportional`) or stays.
    Cells filled at import time carry `measured = False`; touching one counts as extrapolated."""

    def __init__(self, axes: list[np.ndarray], values: np.ndarray, measured: np.ndarray | None = None,
                 proportional: tuple[bool, ...] | None = None) -> None:
        self.axes = [np.asarray(a, dtype=np.float64) for a in axes]
        self.log_axes = [np.log2(np.maximum(a, 1e-12)) for a in self.axes]
        self.values = np.asarray(values, dtype=np.float64)
        if self.values.shape != tuple(len(a) for a in self.axes):
            raise ValueError(f"grid of shape {self.values.shape} does not match axes {[len(a) for a in self.axes]}")
        if np.isnan(self.values).any():
            raise ValueError("grid has holes; fill them before building a GridTable")
        self.measured = np.ones(self.values.shape, bool) if measured is None else np.asarray(measured, bool)
        self.proportional = proportional or (False,) * len(self.axes)

    @property
    def ndim(self) -> int:
        return len(self.axes)

    def __call__(self, *coords) -> tuple[np.ndarray, np.ndarray]:
        """Times at the given coordinates (broadcast arrays); returns (times, extrapolated)."""
        pts = np.broadcast_arrays(*[np.asarray(c, dtype=np.float64) for c in coords])
        shape = pts[0].shape
        pts = [p.ravel() for p in pts]
        n = pts[0].size
        lo_idx, weights, scale = [], [], np.ones(n)
        extrapolated = np.zeros(n, bool)
        for axis, log_axis, prop, x in zip(self.axes, self.log_axes, self.proportional, pts):
            x = np.maximum(x, 1e-12)
            above = x > axis[-1]
            extrapolated |= above
            if prop:
                scale = np.where(above, scale * x / axis[-1], scale)
            if len(axis) == 1:
                lo_idx.append(np.zeros(n, int))
                weights.append(np.zeros(n))
                continue
            lx = np.clip(np.log2(x), log_axis[0], log_axis[-1])
            i = np.clip(np.searchsorted(log_axis, lx, side="right") - 1, 0, len(axis) - 2)
            w = (lx - log_axis[i]) / (log_axis[i + 1] - log_axis[i])
            lo_idx.append(i)
            weights.append(w)
        total = np.zeros(n)
        touched_unmeasured = np.zeros(n, bool)
        for corner in range(1 << self.ndim):
            idx, wc = [], np.ones(n)
            for d in range(self.ndim):
                up = (corner >> d) & 1
                idx.append(lo_idx[d] + up)
                wc = wc * (weights[d] if up else 1.0 - weights[d])
            idx_t = tuple(np.minimum(ix, len(a) - 1) for ix, a in zip(idx, self.axes))
            total += wc * self.values[idx_t]
            touched_unmeasured |= (wc > 1e-9) & ~self.measured[idx_t]
        return (total * scale).reshape(shape), (extrapolated | touched_unmeasured).reshape(shape)


def fill_holes(axes: list[np.ndarray], values: np.ndarray,
               proportional_axes: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Fill unmeasured (NaN) cells so a grid can be interpolated; returns (filled, measured).

    A hole above a measured cell along a proportional axis (one whose cost is
    linear in its size, e.g. decode batch or context: twice the batch reads twice
    the KV) gets that cell's time scaled by the ratio of the coordinates; any
    other hole takes the value of its nearest measured neighbour.
    """
    measured = ~np.isnan(values)
    filled = values.copy()
    for _ in range(sum(filled.shape)):
        if not np.isnan(filled).any():
            break
        for axis in range(filled.ndim):
            moved = np.moveaxis(filled, axis, 0)
            for i in range(1, moved.shape[0]):  # slices keep 1-D grids writable in place
                here, below = moved[i:i + 1], moved[i - 1:i]
                hole = np.isnan(here) & ~np.isnan(below)
                if hole.any():
                    ratio = axes[axis][i] / axes[axis][i - 1] if axis in proportional_axes else 1.0
                    here[hole] = below[hole] * ratio
            for i in range(moved.shape[0] - 2, -1, -1):
                here, above = moved[i:i + 1], moved[i + 1:i + 2]
                hole = np.isnan(here) & ~np.isnan(above)
                if hole.any():
                    here[hole] = above[hole]
    return filled, measured
