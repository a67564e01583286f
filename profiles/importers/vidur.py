"""Import Vidur's operator and collective profiles into the project's tables.

Source: microsoft/vidur @7d475133 (MIT), `profiling/`:

- `compute/<device>/<org>/<model>/mlp.csv`: CUDA kernel times (ms; PyTorch profiler, median)
  of one transformer block built from vLLM's (Sarathi's) layers in fp16, by `num_tokens` and
  `num_tensor_parallel_workers`, with the model's shape in the row (n_head, n_kv_head,
  n_embd, n_expanded_embd, use_gated_mlp): `attn_pre_proj` (fused QKV GEMM),
  `attn_post_proj` (O), `mlp_up_proj` (gate+up, or up alone), `mlp_down_proj`, the norms
  (`input_layernorm`, `post_attention_layernorm`: one RMSNorm or LayerNorm kernel each),
  `mlp_act`, `attn_rope`, `add`, `emb`. Imported for the devices that have no operator
  tables measured under vLLM (the A40; the A100 and H100 have AIConfigurator's), once the
  hardware catalogue knows the device (a YAML in $VLLM_EMULATOR_HOME/hardware/ will do): the
  four GEMMs of every model and TP size become `gemm/fp16` (m, n, k) (unmeasured shapes
  filled, see profiles.importers.gemm_points) and the norm kernels `memory_bound` by bytes
  moved (read + write of the tokens' hidden states).
- `network/<topology>/{all_reduce,send_recv}.csv`: NCCL kernel time (ms, median of 11
  back-to-back calls, median of 3 runs) by message size (bytes) and workers. Rows whose
  workers span nodes (`devices_per_node` < `num_workers`) are left out: the emulator's
  interconnect is the link inside a node. Each topology is written to
  `profiles/data/collectives/<topology>/` for the catalogue devices built that way (see
  profiles.collectives); the others are skipped, with the reason (SKIPPED).

    python -m profiles.importers.vidur ../shared/data/profiles-src/vidur/profiling
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from emulator.cost.tables import Grid, OperatorTables
from emulator.hardware import UnknownHardwareError, load_device
from profiles.collectives import COLLECTIVES_DIR
from profiles.importers.gemm_points import gemm_grid
from profiles.model_profile import DATA_DIR
from profiles.operator_tables import operator_dir

SOURCE = {"repo": "microsoft/vidur", "commit": "7d475133", "license": "MIT"}
COMPUTE = {"a40": "A40"}  # a100 and h100 have AIConfigurator tables, measured under vLLM itself
TOPOLOGIES = {  # Vidur's topology -> catalogue devices whose GPU-to-GPU link it measured
    "a100_dgx": ("A100", "A100-40GB"),  # SXM4 over NVSwitch (DGX A100 came with 40 and 80 GB)
    "h100_dgx": ("H100",),              # SXM5 over NVSwitch
}
SKIPPED = {
    "a100_pairwise_nvlink": "A100 PCIe cards bridged in pairs: not in the catalogue",
    "h100_pairwise_nvlink": "H100 PCIe cards bridged in pairs: not in the catalogue",
    "a40_pairwise_nvlink": "its pair moves 64 MB at 4 GB/s, a copy through the host, not the NVLink bridge "
                           "(56 GB/s) the name says: not the link an A40 spec would describe",
}
GEMM_M = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096]
NORMS = ("input_layernorm", "post_attention_layernorm")


def _median_ms(row: dict, op: str) -> float | None:
    value = row.get(f"time_stats.{op}.median")
    return float(value) if value not in (None, "") else None


def gemm_shapes(row: dict) -> dict[str, tuple[int, int]]:
    """(n, k) of the four GEMMs of a mlp.csv row, on one of its TP ranks."""
    h, heads, kv, inter = (int(row[c]) for c in ("n_embd", "n_head", "n_kv_head", "n_expanded_embd"))
    tp, d = int(row["num_tensor_parallel_workers"]), h // heads
    up = 2 * inter if row["use_gated_mlp"] == "True" else inter
    return {"attn_pre_proj": ((heads + 2 * kv) * d // tp, h), "attn_post_proj": (h, heads * d // tp),
            "mlp_up_proj": (up // tp, h), "mlp_down_proj": (h, inter // tp)}


def half_octaves(sizes) -> list[int]:
    """The measured sizes nearest to a ladder of half octaves, and the largest: a compact axis."""
    sizes = np.array(sorted(sizes), float)
    ladder = 2.0 ** (np.arange(np.ceil(2 * np.log2(sizes[0])), np.floor(2 * np.log2(sizes[-1])) + 1) / 2)
    return sorted({int(sizes[np.argmin(np.abs(np.log2(sizes / rung)))]) for rung in ladder} | {int(sizes[-1])})


def memory_bound_grid(samples: dict[int, list[float]], source: str) -> Grid:
    """Norm-kernel times at the half-octave byte counts (median of the models and TP sizes there)."""
    picked = half_octaves(samples)
    values = np.array([np.median(samples[b]) for b in picked])
    return Grid({"bytes": np.array(picked, float)}, values, np.ones(len(picked), bool), source)


def compute_tables(device_dir: Path, hardware: str) -> OperatorTables:
    gemms: dict[tuple[int, int, int], list[float]] = defaultdict(list)
    norms: dict[int, list[float]] = defaultdict(list)
    models = []
    for path in sorted(device_dir.glob("*/*/mlp.csv")):
        models.append(f"{path.parent.parent.name}/{path.parent.name}")
        with path.open() as f:
            for row in csv.DictReader(f):
                m = int(row["num_tokens"])
                for op, (n, k) in gemm_shapes(row).items():
                    ms = _median_ms(row, op)
                    if ms is not None and m in GEMM_M:
                        gemms[(m, n, k)].append(ms * 1000.0)
                moved = 2 * m * int(row["n_embd"]) * 2  # fp16 hidden states read and written
                for op in NORMS:
                    ms = _median_ms(row, op)
                    if ms is not None:
                        norms[moved].append(ms * 1000.0)
    src = f"profiling/compute/{device_dir.name}"
    grids = {"gemm/fp16": gemm_grid(gemms, GEMM_M, f"{src} attn_pre_proj/attn_post_proj/mlp_up_proj/mlp_down_proj"),
             "memory_bound": memory_bound_grid(norms, f"{src} input/post-attention norm kernels, bytes read + written")}
    meta = {
        "format": 1,
        "hardware": hardware,
        "source": {**SOURCE, "path": src},
        "measured_with": "Vidur's MLP profiler: one block of vLLM (Sarathi) layers in fp16, CUDA kernel time "
                         "(PyTorch profiler), median",
        "models": models,
        "units": "microseconds",
    }
    return OperatorTables(meta, grids)


def collective_grid(path: Path, kind: str, source: str) -> Grid | None:
    """(gpus, bytes) -> µs of the rows inside one node; sizes thinned to a half-octave ladder."""
    times: dict[tuple[int, int], list[float]] = defaultdict(list)
    with path.open() as f:
        for row in csv.DictReader(f):
            gpus = int(row["num_workers"])
            if int(row["devices_per_node"]) == gpus:
                times[(gpus, int(row["size"]))].append(float(row[f"time_stats.{kind}.median"]) * 1000.0)
    if not times:
        return None
    gpus = sorted({g for g, _ in times})
    picked = half_octaves({s for _, s in times})
    values = np.full((len(gpus), len(picked)), np.nan)
    for i, g in enumerate(gpus):
        for j, s in enumerate(picked):
            if (g, s) in times:
                values[i, j] = np.median(times[(g, s)])
    measured = ~np.isnan(values)
    if not measured.all():
        raise ValueError(f"{path}: sizes differ between worker counts")
    return Grid({"gpus": np.array(gpus, float), "bytes": np.array(picked, float)}, values, measured, source)


def network_tables(topology_dir: Path, devices: tuple[str, ...]) -> OperatorTables:
    grids = {}
    for kind in ("all_reduce", "send_recv"):
        path = topology_dir / f"{kind}.csv"
        if path.exists():
            grid = collective_grid(path, kind, f"profiling/network/{topology_dir.name}/{kind}.csv")
            if grid is not None:
                grids[kind] = grid
    meta = {
        "format": 1,
        "topology": topology_dir.name,
        "devices": list(devices),
        "source": {**SOURCE, "path": f"profiling/network/{topology_dir.name}"},
        "measured_with": "NCCL through torch.distributed, fp16 buffers, kernel time (median of 11 calls, "
                         "median of 3 runs); workers inside one node",
        "units": "microseconds",
    }
    return OperatorTables(meta, grids)


def import_all(source: Path, out_root: Path = DATA_DIR) -> list[Path]:
    written = []
    for name, hardware in COMPUTE.items():
        device_dir = source / "compute" / name
        if not device_dir.is_dir():
            continue
        try:
            load_device(hardware)
        except UnknownHardwareError:  # tables no cost model could reach, and the roofline fit needs a spec
            print(f"skipped compute/{name}: add {hardware} to the hardware catalogue first "
                  f"(emulator/data/hardware/ or $VLLM_EMULATOR_HOME/hardware/)", file=sys.stderr)
            continue
        out = operator_dir(hardware, out_root)
        compute_tables(device_dir, hardware).save(out)
        written.append(out)
    for topology_dir in sorted((source / "network").glob("*")):
        devices = TOPOLOGIES.get(topology_dir.name)
        if devices is None:
            reason = SKIPPED.get(topology_dir.name, "no catalogue device has this link")
            print(f"skipped {topology_dir.name}: {reason}", file=sys.stderr)
            continue
        out = out_root / COLLECTIVES_DIR.name / topology_dir.name
        network_tables(topology_dir, devices).save(out)
        written.append(out)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source_dir", type=Path, help="Vidur's profiling/ folder (compute/ and network/)")
    parser.add_argument("--out", type=Path, default=DATA_DIR)
    args = parser.parse_args(argv)
    written = import_all(args.source_dir, args.out)
    if not written:
        print(f"no Vidur compute or network profiles under {args.source_dir}", file=sys.stderr)
        return 2
    for out in written:
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
