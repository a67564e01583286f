"""The project's profile format for operator tables of one device.

A directory `<root>/<hardware>/operators/` holds `meta.yaml` (provenance, and
per table its axes and source) and `tables.npz`. Every table is a grid of
kernel times in microseconds over named axes, with a mask of the cells that
were measured (the others were filled by the importer, see
emulator.grid_table.fill_holes):

    gemm/<dtype>                                   m, n, k
    context_attention/<kv_dtype>/hd<D>/w<W>        batch, isl, heads, kv_heads
    generation_attention/<kv_dtype>/hd<D>/w<W>     batch, kv_len, heads, kv_heads
    moe/<dtype>/h<H>_i<I>_k<K>_e<E>/tp<T>_ep<P>    tokens   (dtype w4a16_mxfp4_marlin: the Marlin kernel)
    all_reduce, all_gather, reduce_scatter, all_to_all, send_recv    gpus, bytes
    memory_bound                                   bytes   (norms, activations, adds)

Heads are per GPU; `isl` is the prompt length of each of `batch` sequences;
`kv_len` the context each decoding sequence attends to; W is the sliding
window (0 = full attention). Only numpy is needed to load a profile.

Roots searched, first hit wins: $VLLM_EMULATOR_HOME/profiles (default
~/.vllm-emulator/profiles: where `vllm-emulator profile` writes), then the
tables shipped in this package.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from profiles.model_profile import DATA_DIR


def user_home() -> Path:
    return Path(os.environ.get("VLLM_EMULATOR_HOME", "~/.vllm-emulator")).expanduser()


def search_roots() -> list[Path]:
    return [user_home() / "profiles", DATA_DIR]


@dataclass
class Grid:
    axes: dict[str, np.ndarray]
    values: np.ndarray
    measured: np.ndarray
    source: str = ""


@dataclass
class OperatorTables:
    meta: dict
    grids: dict[str, Grid] = field(default_factory=dict)

    @property
    def hardware(self) -> str:
        return self.meta["hardware"]

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        arrays, index = {}, {}
        for name, grid in sorted(self.grids.items()):
            for axis, values in grid.axes.items():
                arrays[f"{name}/axis/{axis}"] = np.asarray(values, np.float64)
            arrays[f"{name}/values"] = grid.values.astype(np.float32)
            if not grid.measured.all():
                arrays[f"{name}/measured"] = grid.measured.astype(bool)
            index[name] = {"axes": list(grid.axes), "source": grid.source}
        np.savez_compressed(directory / "tables.npz", **arrays)
        (directory / "meta.yaml").write_text(yaml.safe_dump({**self.meta, "tables": index}, sort_keys=False))

    @classmethod
    def load(cls, directory: Path) -> "OperatorTables":
        meta = yaml.safe_load((directory / "meta.yaml").read_text())
        index = meta.pop("tables", {})
        tables = cls(meta=meta)
        with np.load(directory / "tables.npz") as npz:
            for name, info in index.items():
                values = npz[f"{name}/values"].astype(np.float64)
                measured = npz[f"{name}/measured"] if f"{name}/measured" in npz.files else np.ones(values.shape, bool)
                axes = {axis: npz[f"{name}/axis/{axis}"] for axis in info["axes"]}
                tables.grids[name] = Grid(axes, values, measured, info.get("source", ""))
        return tables


def operator_dir(hardware: str, root: Path = DATA_DIR) -> Path:
    return root / hardware / "operators"


def available_operator_tables() -> list[tuple[str, Path]]:
    found = []
    for root in search_roots():
        found.extend((p.parent.parent.name, p.parent) for p in sorted(root.glob("*/operators/meta.yaml")))
    return found


def find_operator_tables(hardware: str) -> OperatorTables | None:
    for root in search_roots():
        directory = operator_dir(hardware, root)
        if (directory / "meta.yaml").is_file():
            return OperatorTables.load(directory)
    return None
