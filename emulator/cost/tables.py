"""The table formats the cost models read, and how they are stored.

**Model profile** (`ModelProfile`): measured per-layer tables of one model on one
device, a directory holding `meta.yaml` (provenance, grids, what was measured and
how) and `tables.npz`, all times in microseconds:

    dense/<op>          (2, n)  tokens, time      one call of a per-token op
    per_sequence/<op>   (2, n)  sequences, time   lm_head, sampler
    attention           (n, 5)  prefill_chunk, kv_prefill, n_decode, kv_decode, time
    moe                 (n, 3)  tokens, activated_experts, time   (MoE models)

`meta.yaml` names, for the model family, which dense ops run once per layer and how
many times (`layer_ops`), and which run once per step (`step_ops`).

**Operator tables** (`OperatorTables`): kernel times of one device over named axes, a
directory holding `meta.yaml` (provenance, and per table its axes and source) and
`tables.npz`, with a mask of the cells that were measured (the others were filled by
the importer, see emulator.cost.interpolate.fill_holes):

    gemm/<dtype>                                   m, n, k
    context_attention/<kv_dtype>/hd<D>/w<W>        batch, isl, heads, kv_heads
    generation_attention/<kv_dtype>/hd<D>/w<W>     batch, kv_len, heads, kv_heads
    moe/<dtype>/h<H>_i<I>_k<K>_e<E>/tp<T>_ep<P>    tokens   (dtype w4a16_mxfp4_marlin: the Marlin kernel)
    all_reduce, all_gather, reduce_scatter, all_to_all, send_recv    gpus, bytes
    memory_bound                                   bytes   (norms, activations, adds)

**Routing imbalance** (`RoutingImbalance`, a YAML file): the fused-MoE kernel's time with a
real router's skewed expert loads over its time with balanced loads, by log2 of the tokens
each expert gets on average (T k / E); for MoE tables measured with balanced routing.

Heads are per GPU; `isl` is the prompt length of each of `batch` sequences; `kv_len`
the context each decoding sequence attends to; W is the sliding window (0 = full
attention). Measured collectives of a GPU-to-GPU link use the same format.
Only numpy and PyYAML are needed to read either. Where tables are found (shipped, or a
user's) is profiles/'s business; producing them is the importers' and the profiler's.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's: 10x the pure-Python loader's speed


def read_yaml(path: Path):
    """A YAML data file, by libyaml's parser where PyYAML has it."""
    return yaml.load(path.read_text(), Loader=_SAFE_LOADER)


@dataclass
class ModelProfile:
    meta: dict
    dense: dict[str, np.ndarray] = field(default_factory=dict)
    per_sequence: dict[str, np.ndarray] = field(default_factory=dict)
    attention: np.ndarray | None = None
    moe: np.ndarray | None = None

    @property
    def hardware(self) -> str:
        return self.meta["hardware"]

    @property
    def model(self) -> str:
        return self.meta["model"]

    @property
    def tp(self) -> int:
        return int(self.meta["tp"])

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {f"dense/{k}": v for k, v in self.dense.items()}
        arrays.update({f"per_sequence/{k}": v for k, v in self.per_sequence.items()})
        if self.attention is not None:
            arrays["attention"] = self.attention
        if self.moe is not None:
            arrays["moe"] = self.moe
        np.savez_compressed(directory / "tables.npz", **{k: v.astype(np.float32) for k, v in arrays.items()})
        (directory / "meta.yaml").write_text(yaml.safe_dump(self.meta, sort_keys=False))

    @classmethod
    def load(cls, directory: Path) -> "ModelProfile":
        meta = read_yaml(directory / "meta.yaml")
        profile = cls(meta=meta)
        with np.load(directory / "tables.npz") as npz:
            for key in npz.files:
                array = npz[key].astype(np.float64)
                kind, _, name = key.partition("/")
                if kind == "dense":
                    profile.dense[name] = array
                elif kind == "per_sequence":
                    profile.per_sequence[name] = array
                elif kind == "attention":
                    profile.attention = array
                elif kind == "moe":
                    profile.moe = array
        return profile


@dataclass
class Grid:
    axes: dict[str, np.ndarray]
    values: np.ndarray
    measured: np.ndarray
    source: str = ""


class _StoredGrid(Grid):
    """A grid of a loaded tables.npz, its arrays parsed from the archive (read into memory by `load`) when
    first asked for: a device's tables hold hundreds of grids, a deployment reads a few, and parsing every
    one costs ~50 ms of a process's start."""

    def __init__(self, npz, files: set[str], name: str, axis_names: list[str], source: str) -> None:
        self._npz, self._files, self._name, self._axis_names, self.source = npz, files, name, axis_names, source
        self._arrays: tuple[dict[str, np.ndarray], np.ndarray, np.ndarray] | None = None

    def _parsed(self) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        if self._arrays is None:
            npz, name = self._npz, self._name
            values = npz[f"{name}/values"].astype(np.float64)
            measured = npz[f"{name}/measured"] if f"{name}/measured" in self._files else np.ones(values.shape, bool)
            self._arrays = {axis: npz[f"{name}/axis/{axis}"] for axis in self._axis_names}, values, measured
        return self._arrays

    axes = property(lambda self: self._parsed()[0])
    values = property(lambda self: self._parsed()[1])
    measured = property(lambda self: self._parsed()[2])

    def __reduce__(self):  # copied or pickled as the plain Grid it stands for
        return Grid, (self.axes, self.values, self.measured, self.source)


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
        meta = read_yaml(directory / "meta.yaml")
        index = meta.pop("tables", {})
        tables = cls(meta=meta)
        npz = np.load(io.BytesIO((directory / "tables.npz").read_bytes()))  # read now, parsed grid by grid
        files = set(npz.files)
        for name, info in index.items():
            tables.grids[name] = _StoredGrid(npz, files, name, info["axes"], info.get("source", ""))
        return tables


@dataclass
class RoutingImbalance:
    log2_tokens_per_expert: np.ndarray
    ratio: np.ndarray
    meta: dict = field(default_factory=dict)

    def __call__(self, tokens_per_expert: float) -> float:
        """Skewed over balanced time at this many tokens per expert (flat beyond the measured range)."""
        x = np.log2(max(tokens_per_expert, 1e-9))
        return float(np.interp(x, self.log2_tokens_per_expert, self.ratio))

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump({**self.meta, "log2_tokens_per_expert": self.log2_tokens_per_expert.tolist(),
                                        "ratio": [round(float(r), 4) for r in self.ratio]}, sort_keys=False))

    @classmethod
    def load(cls, path: Path) -> "RoutingImbalance":
        d = read_yaml(path)
        return cls(np.asarray(d.pop("log2_tokens_per_expert"), float), np.asarray(d.pop("ratio"), float), d)
