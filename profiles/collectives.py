"""Where the measured collective costs of a device's GPU-to-GPU link are.

`profiles/data/collectives/<topology>/{meta.yaml,tables.npz}` hold, in the operator-table
format, `all_reduce` and `send_recv` grids over (gpus, bytes) in microseconds, measured
with NCCL between GPUs of one node (Vidur's network profiles, imported by
profiles.importers.vidur). `meta.yaml` lists the catalogue devices whose interconnect the
topology is; emulator.cost.collectives.MeasuredCollective prices from one.
"""
from __future__ import annotations

from functools import cache

from emulator.cost.collectives import MeasuredCollective
from emulator.cost.tables import Grid, OperatorTables
from profiles.model_profile import DATA_DIR

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


def find_collective(device: str, kind: str) -> MeasuredCollective | None:
    """`kind`: all_reduce or send_recv."""
    grid = collective_grids(device).get(kind)
    return MeasuredCollective(kind, grid) if grid is not None else None
