"""The measured collective costs of a device's GPU-to-GPU link, and the collective model built on them.

Two sources, in the operator-table format (emulator.cost.tables) over (gpus, bytes), in µs:
- the device's operator tables (profiles.operator_tables): AIConfigurator's all-reduce (vLLM's custom
  all-reduce or NCCL, whichever is faster, as vLLM picks), all-gather, reduce-scatter and all-to-all,
  timed under vLLM;
- `profiles/data/collectives/<topology>/{meta.yaml,tables.npz}`: Vidur's NCCL `all_reduce` and
  `send_recv` between GPUs of one node (profiles.importers.vidur); `meta.yaml` lists the catalogue
  devices whose interconnect the topology is.
A kind measured by both is read from the operator tables (timed under vLLM). What neither measured is
modelled from the link (emulator.cost.collectives.Collectives).
"""
from __future__ import annotations

from functools import cache
from pathlib import Path

from emulator.cost.collectives import KINDS, Collectives
from emulator.cost.tables import Grid, OperatorTables, read_yaml
from emulator.hardware import DeviceSpec
from profiles.model_profile import DATA_DIR
from profiles.operator_tables import find_operator_tables

COLLECTIVES_DIR = DATA_DIR / "collectives"


@cache
def _topologies() -> tuple[tuple[Path, tuple[str, ...]], ...]:
    """Each topology's folder and the devices its meta.yaml lists (its tables are read when a device needs them)."""
    out = []
    for meta in sorted(COLLECTIVES_DIR.glob("*/meta.yaml")):
        devices = (read_yaml(meta) or {}).get("devices", ())
        out.append((meta.parent, tuple(devices)))
    return tuple(out)


@cache
def _topology_tables(directory: Path) -> OperatorTables:
    return OperatorTables.load(directory)


def link_grids(device: str) -> dict[str, Grid]:
    """The collectives measured on a catalogue device's link by Vidur ({} when not measured)."""
    for directory, devices in _topologies():
        if device in devices:
            return dict(_topology_tables(directory).grids)
    return {}


def collective_grids(device: str, operator_tables: OperatorTables | None = None) -> dict[str, Grid]:
    """Every measured collective of a device: Vidur's, overridden by its operator tables' (vLLM's own)."""
    grids = link_grids(device)
    tables = operator_tables if operator_tables is not None else find_operator_tables(device)
    if tables is not None:
        grids.update({kind: grid for kind, grid in tables.grids.items() if kind in KINDS})
    return grids


def collectives_for(device: DeviceSpec, operator_tables: OperatorTables | None = None) -> Collectives:
    """The collective pricer of a device's link: measured grids where there are, the link model elsewhere
    (and everywhere for a link whose YAML says `tables: false`, as a calibrated overlay does: its fitted
    figures describe the user's link, not the one the tables timed)."""
    if not device.interconnect.tables:
        return Collectives(device.interconnect, device.arch)
    return Collectives(device.interconnect, device.arch, collective_grids(device.name, operator_tables))
