"""Import NVIDIA AIConfigurator kernel databases into the project's operator tables.

Source: ai-dynamo/aiconfigurator @095f58a5 (Apache-2.0), `data/<system>/<op>/vllm/<version>/*.parquet`:
kernel latencies (ms) measured under vLLM for GEMMs (dtype, m, n, k), context and
generation attention (batch, sequence length, heads, KV heads, head dim, KV dtype,
window), fused MoE (tokens, model shape, MoE TP/EP, dtype) and collectives (vLLM's
custom all-reduce under CUDA graphs, NCCL all-reduce/all-gather/reduce-scatter/
all-to-all). One vLLM version is taken per op (the first of --versions present);
duplicate measurements are reduced to their median, and kernels measured for the
same point (vLLM picks the fastest it supports) to their minimum. Attention is
taken from the newest collection that names its FlashAttention generation
(0.24: FA3, which vLLM runs on Hopper; the 0.14/0.19 collections used an older
kernel whose decode time is not monotonic in the batch), FA4 rows left out on
Hopper since vLLM does not select FA4 there. vLLM's Marlin MoE kernel on MXFP4 experts
(the backend a deployment picks with VLLM_MXFP4_USE_MARLIN=1 or `--moe-backend marlin`) is kept
apart as `moe/w4a16_mxfp4_marlin/...`, from the newest collection that measured it.

Every fused-MoE point the collectors timed under both a balanced router and AIConfigurator's
skewed one (`power_law_1.01`) gives the skewed/balanced ratio; their median per power of two of
tokens per expert (T k / E), over all shapes, splits, dtypes, vLLM versions and GPUs, is written
to `moe_routing_imbalance.yaml` (emulator.cost.tables.RoutingImbalance): what a real router costs
the kernel against the balanced routing other MoE tables were measured with.

    python -m profiles.importers.aiconfigurator ../shared/data/profiles-src/aiconfigurator

Needs the `import` extra (pyarrow, pandas); the written tables load with numpy only.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from emulator.cost.interpolate import fill_holes
from profiles.model_profile import DATA_DIR
from emulator.cost.tables import Grid, OperatorTables, RoutingImbalance
from profiles.operator_tables import operator_dir

SOURCE = {"repo": "ai-dynamo/aiconfigurator", "commit": "095f58a5", "license": "Apache-2.0"}
SYSTEMS = {"h100_sxm": "H100", "h200_sxm": "H200", "a100_sxm": "A100"}
DTYPES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
MOE_DISTRIBUTION = ("power_law_1.01", "balanced")  # skewed routing as in real traffic; balanced if absent
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "alltoall")
# The collectors log a message's size in elements (collect_nccl.py: `size // bytes_per_element`;
# collect_all_reduce.py: a tensor of `size` elements; the SDK queries them with `x * hidden`, "count,
# not size in bytes"); the tables here are keyed by bytes.
ELEMENT_BYTES = {"half": 2, "bfloat16": 2, "float16": 2, "int8": 1}


def _grid(frame, axes: list[str], proportional: tuple[int, ...], source: str) -> Grid:
    """Pivot rows (axes..., latency ms) into a filled grid of microseconds."""
    values = frame.groupby(axes)["latency"].median() * 1000.0
    coords = [np.array(sorted(frame[a].unique()), dtype=np.float64) for a in axes]
    grid = np.full([len(c) for c in coords], np.nan)
    index = tuple(np.searchsorted(c, values.index.get_level_values(i).to_numpy(np.float64))
                  for i, c in enumerate(coords))
    grid[index] = values.to_numpy()
    filled, measured = fill_holes(coords, grid, proportional)
    names = {"num_heads": "heads", "num_key_value_heads": "kv_heads", "batch_size": "batch", "step": "kv_len",
             "num_tokens": "tokens", "num_gpus": "gpus", "message_size": "bytes"}
    return Grid({names.get(a, a): c for a, c in zip(axes, coords)}, filled, measured, source)


def _add_moe_grids(grids: dict, frame, dtype: str, source: str) -> None:
    """One grid per MoE layer shape and split; kernels measured for the same point reduced to the fastest."""
    keys = ["hidden_size", "inter_size", "topk", "num_experts", "moe_tp_size", "moe_ep_size"]
    best = frame.groupby([*keys, "num_tokens", "kernel_source"])["latency"].median()
    best = best.groupby(level=list(range(len(keys) + 1))).min().reset_index()
    for (h, i, k, e, tp, ep), rows in best.groupby(keys):
        grids[f"moe/{dtype}/h{h}_i{i}_k{k}_e{e}/tp{tp}_ep{ep}"] = _grid(rows, ["num_tokens"], (0,), source)


def _pick_marlin(system_dir: Path, versions: list[str]):
    """The newest measurements of vLLM's Marlin MoE kernel on MXFP4 experts (VLLM_MXFP4_USE_MARLIN=1,
    `--moe-backend marlin`): a backend a deployment chooses, kept apart from the default kernel's tables."""
    import pandas as pd

    for version in versions:
        for path in sorted(system_dir.glob(f"moe/*/{version}/moe_perf.parquet")):
            frame = pd.read_parquet(path)
            rows = frame[(frame["moe_dtype"] == "w4a16_mxfp4") & frame["kernel_source"].str.contains("marlin")]
            distribution = next((d for d in MOE_DISTRIBUTION if (rows["distribution"] == d).any()), None)
            if distribution is not None:
                return path, rows[rows["distribution"] == distribution]
    return None


def _pick(system_dir: Path, op: str, stem: str, versions: list[str]) -> tuple[Path, str] | None:
    for version in versions:
        path = next(iter(sorted(system_dir.glob(f"{op}/*/{version}/{stem}.parquet"))), None)
        if path is not None:
            return path, version
    return None


def import_system(system_dir: Path, versions: list[str], attention_versions: list[str],
                  out_root: Path = DATA_DIR) -> Path:
    import pandas as pd

    hardware = SYSTEMS[system_dir.name]
    grids: dict[str, Grid] = {}
    used: dict[str, str] = {}

    def rel(path: Path) -> str:
        return "/".join(path.parts[-6:])

    found = _pick(system_dir, "gemm", "gemm_perf", versions)
    if found:
        path, used["gemm"] = found
        frame = pd.read_parquet(path)
        for dtype, rows in frame.groupby("gemm_dtype"):
            grids[f"gemm/{DTYPES.get(dtype, dtype)}"] = _grid(rows, ["m", "n", "k"], (0, 1, 2), rel(path))
    for phase, seq_axis in (("context", "isl"), ("generation", "step")):
        found = _pick(system_dir, "attention", f"{phase}_attention_perf", attention_versions)
        if not found:
            continue
        path, used[f"{phase}_attention"] = found
        frame = pd.read_parquet(path)
        if frame["kernel_source"].str.contains("fa3").any():
            frame = frame[~frame["kernel_source"].str.contains("fa4")]
        if "window_size" not in frame:
            frame["window_size"] = 0
        for (kv_dtype, head_dim, window), rows in frame.groupby(["kv_cache_dtype", "head_dim", "window_size"]):
            name = f"{phase}_attention/{DTYPES.get(kv_dtype, kv_dtype)}/hd{head_dim}/w{window}"
            grids[name] = _grid(rows, ["batch_size", seq_axis, "num_heads", "num_key_value_heads"], (0, 1),
                                rel(path))
    found = _pick(system_dir, "moe", "moe_perf", versions)
    if found:
        path, used["moe"] = found
        frame = pd.read_parquet(path)
        distribution = next(d for d in MOE_DISTRIBUTION if (frame["distribution"] == d).any())
        frame = frame[frame["distribution"] == distribution]
        for dtype, rows in frame.groupby("moe_dtype"):
            _add_moe_grids(grids, rows, DTYPES.get(dtype, dtype), f"{rel(path)} ({distribution})")
    marlin = _pick_marlin(system_dir, attention_versions)
    if marlin is not None:
        path, rows = marlin
        used["moe_marlin"] = path.parts[-2]
        _add_moe_grids(grids, rows, "w4a16_mxfp4_marlin", f"{rel(path)} (marlin)")
    custom = _pick(system_dir, "comm", "custom_allreduce_perf", versions)
    nccl = next(iter(sorted(system_dir.glob("comm/nccl/*/nccl_perf.parquet"))), None)
    if nccl is not None:
        used["nccl"] = nccl.parts[-2]
        frame = pd.read_parquet(nccl)
        frame = frame[frame["nccl_dtype"] == "half"]
        frame = frame.assign(message_size=frame["message_size"] * ELEMENT_BYTES["half"])
        for op in COLLECTIVES:
            rows = frame[frame["op_name"] == op]
            if op == "all_reduce" and custom is not None:
                used["custom_allreduce"] = custom[1]
                graph = pd.read_parquet(custom[0])
                graph = graph[graph["backend"] == "vllm_graph"]
                graph = graph.assign(message_size=graph["message_size"] * graph["allreduce_dtype"].map(ELEMENT_BYTES))
                # vLLM takes its custom all-reduce where it is faster, NCCL elsewhere
                rows = pd.concat([rows, graph]).groupby(["num_gpus", "message_size"])["latency"].min().reset_index()
            name = "all_to_all" if op == "alltoall" else op
            grids[name] = _grid(rows, ["num_gpus", "message_size"], (1,), rel(nccl))
    meta = {
        "format": 1,
        "hardware": hardware,
        "source": {**SOURCE, "path": f"data/{system_dir.name}"},
        "vllm_versions": used,
        "measured_with": "AIConfigurator collectors: kernel latency under vLLM, CUDA graphs where vLLM uses them",
        "units": "microseconds",
    }
    out = operator_dir(hardware, out_root)
    OperatorTables(meta, grids).save(out)
    return out


def routing_imbalance(system_dirs: list[Path]) -> RoutingImbalance:
    """Median skewed/balanced fused-MoE time by log2(tokens per expert), over every paired measurement."""
    import pandas as pd
    ratios = []
    keys = ["kernel_source", "moe_dtype", "hidden_size", "inter_size", "topk", "num_experts", "moe_tp_size",
            "moe_ep_size", "num_tokens"]
    for system_dir in system_dirs:
        for path in sorted(system_dir.glob("moe/*/*/moe_perf.parquet")):
            frame = pd.read_parquet(path)
            if not {"balanced", MOE_DISTRIBUTION[0]} <= set(frame.get("distribution", ())):
                continue
            paired = frame.pivot_table(index=keys, columns="distribution", values="latency", aggfunc="median")
            paired = paired.dropna(subset=["balanced", MOE_DISTRIBUTION[0]]).reset_index()
            ratio = paired[MOE_DISTRIBUTION[0]] / paired["balanced"]
            per_expert = np.log2(paired["num_tokens"] * paired["topk"] / paired["num_experts"])
            ratios.append(pd.DataFrame({"bin": per_expert.round(), "ratio": ratio}))
    table = pd.concat(ratios).groupby("bin")["ratio"].agg(["median", "count"])
    table = table[table["count"] >= 100]
    meta = {"format": 1, "source": {**SOURCE, "path": "data/*/moe/*/*/moe_perf.parquet"},
            "what": f"fused-MoE latency with {MOE_DISTRIBUTION[0]} routing over balanced routing, same point; "
                    f"median per power of two of tokens per expert",
            "pairs": int(table["count"].sum())}
    return RoutingImbalance(table.index.to_numpy(np.float64), table["median"].to_numpy(), meta)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source_dir", type=Path, help="AIConfigurator folder holding data/<system>/")
    parser.add_argument("--out", type=Path, default=DATA_DIR)
    parser.add_argument("--versions", default="0.19.0,0.14.0", help="vLLM versions in order of preference")
    parser.add_argument("--attention-versions", default="0.24.0,0.19.0,0.14.0",
                        help="vLLM versions in order of preference for attention")
    args = parser.parse_args(argv)
    try:
        import pandas  # noqa: F401
    except ImportError:
        print("the AIConfigurator importer needs pandas and pyarrow: pip install 'vllm-emulator[import]'",
              file=sys.stderr)
        return 2
    systems = [p for p in sorted((args.source_dir / "data").glob("*")) if p.name in SYSTEMS]
    if not systems:
        print(f"no AIConfigurator systems ({', '.join(SYSTEMS)}) under {args.source_dir}/data", file=sys.stderr)
        return 2
    for system_dir in systems:
        out = import_system(system_dir, args.versions.split(","), args.attention_versions.split(","), args.out)
        print(f"{system_dir} -> {out}")
    routing = args.out / "moe_routing_imbalance.yaml"
    routing_imbalance(systems).save(routing)
    print(f"MoE routing imbalance -> {routing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
