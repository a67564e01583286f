"""The project's profile format for measured per-layer tables of one model on one device.

A profile is a directory holding `meta.yaml` (provenance, grids, what was measured
and how) and `tables.npz`, with all times in microseconds:

    dense/<op>          (2, n)  tokens, time      one call of a per-token op
    per_sequence/<op>   (2, n)  sequences, time   lm_head, sampler
    attention           (n, 5)  prefill_chunk, kv_prefill, n_decode, kv_decode, time
    moe                 (n, 3)  tokens, activated_experts, time   (MoE models)

`meta.yaml` names, for the model family, which dense ops run once per layer and
how many times (`layer_ops`), and which run once per step (`step_ops`).
Directory layout: profiles/data/<hardware>/<org>--<model>/<dtype>/tp<N>/.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

DATA_DIR = Path(__file__).resolve().parent / "data"


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
        meta = yaml.load((directory / "meta.yaml").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
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


def profile_dir(hardware: str, model: str, dtype: str, tp: int, root: Path = DATA_DIR) -> Path:
    return root / hardware / model.replace("/", "--") / dtype / f"tp{tp}"


def available_profiles(root: Path = DATA_DIR) -> list[tuple[str, str, str, int]]:
    """(hardware, model, dtype, tp) of every shipped model profile."""
    found = []
    for meta in sorted(root.glob("*/*/*/tp*/meta.yaml")):
        tp_dir = meta.parent
        found.append((tp_dir.parents[2].name, tp_dir.parents[1].name.replace("--", "/"),
                      tp_dir.parent.name, int(tp_dir.name[2:])))
    return found


def find_profile(hardware: str, model: str, dtype: str = "bf16", tp: int = 1,
                 root: Path = DATA_DIR) -> ModelProfile | None:
    directory = profile_dir(hardware, model, dtype, tp, root)
    if (directory / "meta.yaml").is_file():
        return ModelProfile.load(directory)
    return None
