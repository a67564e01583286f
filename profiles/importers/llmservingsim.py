"""Import LLMServingSim 2.0 per-layer profiles into the project's profile format.

Source: casys-kaist/LLMServingSim @5daddb21 (MIT), `perf/<GPU>/<org>/<model>/<dtype>/tp<N>/`:
dense.csv (layer,tokens,time_us), per_sequence.csv (layer,sequences,time_us),
attention.csv (prefill_chunk,kv_prefill,n_decode,kv_decode,time_us) and, for MoE
models, moe.csv (tokens,activated_experts,time_us). They were measured with vLLM
0.19 kernels in eager mode on a one-layer model (GPU kernel time, no launch gaps).
Where the bundle has skew.csv (decode attention timed on batches of mixed lengths,
t_mean_us and t_max_us the same batch at its mean and at its longest length, t_skew_us
the real one), `decode_skew_measured` is the least-squares share alpha of
t_skew = t_mean + alpha (t_max - t_mean), as LLMServingSim fits it (its pooled
`alpha_default`); `decode_skew`, what the cost model applies, is that alpha where
LLMServingSim enables its skew fit for the bundle, and 0 where it measured the skew
but leaves the fit disabled (RTX 4090).

    python -m profiles.importers.llmservingsim ../shared/data/profiles-src/llmservingsim/perf
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

from emulator.cost.tables import ModelProfile
from profiles.model_profile import DATA_DIR, profile_dir

SOURCE = {"repo": "casys-kaist/LLMServingSim", "commit": "5daddb21", "license": "MIT"}
DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp8": "fp8"}
# Ops that run once per decoder layer (with their multiplicity) and once per step.
PER_LAYER = {"layernorm": 2, "qkv_proj": 1, "qk_norm": 1, "rotary_emb": 1, "o_proj": 1,
             "gate_up_proj": 1, "act_fn": 1, "down_proj": 1}
PER_STEP = ("embedding", "final_layernorm")


def _read_1d(path: Path) -> dict[str, np.ndarray]:
    rows = defaultdict(dict)
    with path.open() as f:
        for row in csv.DictReader(f):
            key = float(row.get("tokens") or row.get("sequences"))
            rows[row["layer"]][key] = float(row["time_us"])  # a repeated key: the last row wins
    return {op: np.array([sorted(v), [v[k] for k in sorted(v)]]) for op, v in rows.items()}


def _read_table(path: Path, columns: list[str]) -> np.ndarray:
    with path.open() as f:
        return np.array([[float(row[c]) for c in columns] for row in csv.DictReader(f)])


def decode_skew(skew_csv: Path) -> float:
    """Least-squares alpha of t_skew - t_mean = alpha (t_max - t_mean) over every measured batch."""
    table = _read_table(skew_csv, ["t_mean_us", "t_max_us", "t_skew_us"])
    gap, excess = table[:, 1] - table[:, 0], table[:, 2] - table[:, 0]
    return round(float(gap @ excess / (gap @ gap)), 4)


def import_bundle(tp_dir: Path, out_root: Path = DATA_DIR) -> Path:
    """Convert one `.../<dtype>/tp<N>/` folder; returns the written profile directory."""
    meta_src = yaml.safe_load((tp_dir.parent / "meta.yaml").read_text())
    tp = int(tp_dir.name[2:])
    dtype = DTYPES.get(tp_dir.parent.name, tp_dir.parent.name)
    dense = _read_1d(tp_dir / "dense.csv")
    layer_ops = {op: n for op, n in PER_LAYER.items() if op in dense}
    meta = {
        "format": 1,
        "hardware": meta_src["hardware"],
        "device_name": meta_src.get("gpu"),
        "model": meta_src["model"],
        "architecture": meta_src.get("architecture"),
        "dtype": dtype,
        "tp": tp,
        "measured_with": f"vLLM {meta_src.get('vllm_version')} kernels, eager mode, one-layer model, "
                         f"median of {meta_src.get('measurement_iterations', '?')} iterations (GPU kernel time)",
        "cuda_version": meta_src.get("cuda_version"),
        "profiled_at": str(meta_src.get("profiled_at")),
        "source": {**SOURCE, "path": "/".join(tp_dir.parts[-5:])},
        "layer_ops": layer_ops,
        "step_ops": [op for op in PER_STEP if op in dense],
        "attention_grid": meta_src.get("attention_grid"),
        "profiled_limits": {k: meta_src["engine_effective"][k]
                            for k in ("max_num_batched_tokens", "max_num_seqs")},
    }
    if (tp_dir / "skew.csv").exists():
        meta["decode_skew_measured"] = decode_skew(tp_dir / "skew.csv")
        enabled = (meta_src.get("skew_fit") or {}).get("enabled", False)
        meta["decode_skew"] = meta["decode_skew_measured"] if enabled else 0.0
    profile = ModelProfile(meta=meta, dense=dense, per_sequence=_read_1d(tp_dir / "per_sequence.csv"))
    profile.attention = _read_table(tp_dir / "attention.csv",
                                    ["prefill_chunk", "kv_prefill", "n_decode", "kv_decode", "time_us"])
    moe = tp_dir / "moe.csv"
    if not moe.exists() and tp > 1 and (tp_dir.parent / "tp1" / "moe.csv").exists():
        moe = tp_dir.parent / "tp1" / "moe.csv"  # MoE is profiled once, at tp1
        meta["moe_from_tp1"] = True
    if moe.exists():
        profile.moe = _read_table(moe, ["tokens", "activated_experts", "time_us"])
    out = profile_dir(meta["hardware"], meta["model"], dtype, tp, out_root)
    profile.save(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("perf_dir", type=Path, help="LLMServingSim's perf/ folder")
    parser.add_argument("--out", type=Path, default=DATA_DIR)
    args = parser.parse_args(argv)
    bundles = sorted(p for p in args.perf_dir.glob("*/*/*/*/tp*") if (p / "dense.csv").exists())
    if not bundles:
        print(f"no LLMServingSim bundles under {args.perf_dir}", file=sys.stderr)
        return 2
    for tp_dir in bundles:
        print(f"{tp_dir} -> {import_bundle(tp_dir, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
