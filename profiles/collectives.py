"""Measured collective costs of a device's GPU-to-GPU link, for the cost models.

`profiles/data/collectives/<topology>/{meta.yaml,tables.npz}` hold, in the operator-table
format (profiles.operator_tables), `all_reduce` and `send_recv` grids over (gpus, bytes)
in microseconds, measured with NCCL between GPUs of one node (Vidur's network profiles,
imported by profiles.importers.vidur). `meta.yaml` lists the catalogue devices whose
interconnect the topology is. A cost model prices a collective from these tables instead
of the spec-sheet ring formula when the device has one; beyond the measured sizes the time
grows in proportion to the bytes, and beyond the measured GPU counts it stays, both
reported as extrapolated.
"""
from __future__ import annotations

from functools import cache

import numpy as np

from emulator.grid_table import GridTable
from profiles.model_profile import DATA_DIR
from profiles.operator_tables import Grid, OperatorTables

COLLECTIVES_DIR = DATA_DIR / "collectives"


@cache
def _topologies() -> tuple[OperatorTables, ...]:
    return tuple(OperatorTables.load(p.parent) for p in sorted(COLLECTIVES_DIR.glob("*/meta.yaml")))


def collective_grids(device: str) -> dict[str, Grid]:
    """The measured collective grids of a catalogue device ({} when its link was not measured)."""
    for tables in _topologies():
        if device in tables.meta.get("devices", ()):
            return dict(tables.grids)
    return {}


class MeasuredCollective:
    """One collective's measured time by (bytes, GPUs), vectorised like emulator.grid_table."""

    def __init__(self, kind: str, grid: Grid) -> None:
        self.kind = kind
        self.source = grid.source
        self._table = GridTable(list(grid.axes.values()), grid.values, grid.measured, proportional=(False, True))

    def __call__(self, num_bytes, gpus) -> tuple[np.ndarray, np.ndarray]:
        """Microseconds and whether each point lies outside the measured sizes and GPU counts."""
        return self._table(gpus, num_bytes)


def find_collective(device: str, kind: str) -> MeasuredCollective | None:
    """`kind`: all_reduce or send_recv."""
    grid = collective_grids(device).get(kind)
    return MeasuredCollective(kind, grid) if grid is not None else None
