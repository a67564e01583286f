"""Multilinear lookup over an N-D grid of measured kernel times, vectorised.

Each axis is interpolated in log2 space (kernel shapes are measured on roughly
geometric grids, and cost is close to a power law of each size between two
points); the time itself is interpolated linearly. Outside an axis' range:
below the first point the first value is kept (a kernel never gets cheaper than
its smallest shape); above the last point the time grows in proportion to that
axis (`proportional`) or stays (`clamp`), and the point is reported as
extrapolated. Cells that were not measured were filled at import time and
carry `measured = False`; a lookup that touches one also counts as
extrapolated.
"""
from __future__ import annotations

import numpy as np


class GridTable:
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
