"""Collective costs measured on a GPU-to-GPU link (NCCL between GPUs of one node), by size and GPUs.

The grids are in the operator-table format (emulator.cost.tables) over (gpus, bytes), in
microseconds; profiles.collectives finds the one measured for a device's link. Beyond the
measured sizes the time grows in proportion to the bytes, beyond the measured GPU counts it
stays; both are reported as extrapolated.
"""
from __future__ import annotations

import numpy as np

from emulator.cost.interpolate import GridTable
from emulator.cost.tables import Grid


class MeasuredCollective:
    """One collective's measured time by (bytes, GPUs), vectorised (a GridTable)."""

    def __init__(self, kind: str, grid: Grid) -> None:
        self.kind = kind
        self.source = grid.source
        self._table = GridTable(list(grid.axes.values()), grid.values, grid.measured, proportional=(False, True))

    def __call__(self, num_bytes, gpus) -> tuple[np.ndarray, np.ndarray]:
        """Microseconds and whether each point lies outside the measured sizes and GPU counts."""
        return self._table(gpus, num_bytes)
