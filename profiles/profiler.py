"""Measure a device's operator tables with torch, in the project's profile format.

    vllm-emulator profile --model CONFIG_OR_NAME --device cuda|cpu [--tp N] [--dtype bf16] --out DIR

The model config decides the shapes (no weights are downloaded: tensors are
random): the GEMMs of its layers at each token count (QKV, O, gate/up, down, the
LM head, the MoE router), context attention (prefill of `batch` sequences of
`isl` tokens) and generation attention (one token per sequence against `kv_len`
cached ones) with its heads per GPU, the fused experts of MoE models (routed
tokens gathered per expert), and the memory-bound kernels (a norm-like pass over
a buffer of `bytes`). Each point is warmed up, then timed `--iters` times with
CUDA events on a GPU (wall clock on the CPU) and the median kept. Collectives
need several GPUs and are not measured here: they come from the link spec.

Writes DIR/<device name>/operators/{meta.yaml,tables.npz} (default DIR:
$VLLM_EMULATOR_HOME/profiles, where the emulator looks first) and, for a device
the catalogue does not know, $VLLM_EMULATOR_HOME/hardware/<device name>.yaml with
what torch reports, to complete (bandwidth, FLOP/s, links) before serving with
`--hardware <device name>`.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import yaml

from emulator.cost.interpolate import fill_holes
from emulator.hardware import UnknownHardwareError, load_device, user_hardware_dir
from emulator.models import UnknownModelError, load_model
from emulator.cost.tables import Grid, OperatorTables
from profiles.operator_tables import operator_dir, user_home

TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
GRIDS = {  # small: a quick profile that still brackets a serving step; full: what serving needs
    "small": {"tokens": [1, 4, 16, 64, 256], "batch": [1, 4], "isl": [16, 128], "kv_len": [16, 256],
              "bytes": [1 << 12, 1 << 16, 1 << 20]},
    "full": {"tokens": [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192],
             "batch": [1, 2, 4, 8, 16, 32, 64, 128, 256], "isl": [16, 64, 256, 1024, 4096, 8192],
             "kv_len": [16, 128, 1024, 4096, 16384, 65536], "bytes": [1 << k for k in range(12, 31, 2)]},
}


class Timer:
    """Median time of a callable in microseconds: warm-up, then CUDA events or the wall clock."""

    def __init__(self, torch, device: str, warmup: int, iters: int) -> None:
        self.torch, self.device, self.warmup, self.iters = torch, device, warmup, iters

    def __call__(self, fn) -> float:
        torch = self.torch
        for _ in range(self.warmup):
            fn()
        samples = []
        if self.device == "cuda":
            torch.cuda.synchronize()
            for _ in range(self.iters):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) * 1000.0)
        else:
            for _ in range(self.iters):
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(samples)


def gemm_shapes(model, tp: int) -> list[tuple[int, int]]:
    """(n, k) of every GEMM the model runs per token, on one of tp ranks."""
    h, d = model.hidden_size, model.head_dim
    heads, kv_heads = model.num_heads // tp, model.kv_heads_per_device(tp)
    shapes = {((heads + 2 * kv_heads) * d, h), (h, heads * d), (model.vocab_size // tp, h)}
    if not model.is_moe or model.num_dense_layers:
        shapes |= {(2 * model.intermediate_size // tp, h), (h, model.intermediate_size // tp)}
    if model.is_moe:
        shapes.add((model.num_experts, h))
        if model.shared_expert_intermediate_size:
            shapes |= {(2 * model.shared_expert_intermediate_size // tp, h),
                       (h, model.shared_expert_intermediate_size // tp)}
    return sorted(shapes)


def measure(model, tp: int, dtype: str, device: str, grid: dict, timer: Timer, progress) -> dict[str, Grid]:
    import torch
    import torch.nn.functional as F

    tdtype = getattr(torch, TORCH_DTYPES[dtype])
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=tdtype)

    grids: dict[str, Grid] = {}
    tokens = grid["tokens"]
    # GEMMs: one grid over (m, n, k) spanning the model's shapes
    shapes = gemm_shapes(model, tp)
    ns, ks = sorted({n for n, _ in shapes}), sorted({k for _, k in shapes})
    values = np.full((len(tokens), len(ns), len(ks)), np.nan)
    for n, k in shapes:
        weight = rand(n, k)
        for i, m in enumerate(tokens):
            x = rand(m, k)
            values[i, ns.index(n), ks.index(k)] = timer(lambda: F.linear(x, weight))
        progress(f"gemm n={n} k={k}")
    axes = [np.array(tokens, float), np.array(ns, float), np.array(ks, float)]
    filled, measured = fill_holes(axes, values, (0, 1, 2))
    grids[f"gemm/{dtype}"] = Grid(dict(zip(("m", "n", "k"), axes)), filled, measured, "torch F.linear")
    # attention, with the model's heads per GPU
    heads, kv_heads, d = model.num_heads // tp, model.kv_heads_per_device(tp), model.head_dim
    group = heads // kv_heads

    def sdpa(q, k, v, causal):
        return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                              is_causal=causal)
    ctx = np.full((len(grid["batch"]), len(grid["isl"]), 1, 1), np.nan)
    for i, b in enumerate(grid["batch"]):
        for j, s in enumerate(grid["isl"]):
            q, k, v = rand(b, heads, s, d), rand(b, kv_heads, s, d), rand(b, kv_heads, s, d)
            ctx[i, j, 0, 0] = timer(lambda: sdpa(q, k, v, True))
    progress("context attention")
    gen_t = np.full((len(grid["batch"]), len(grid["kv_len"]), 1, 1), np.nan)
    for i, b in enumerate(grid["batch"]):
        for j, s in enumerate(grid["kv_len"]):
            q, k, v = rand(b, heads, 1, d), rand(b, kv_heads, s, d), rand(b, kv_heads, s, d)
            gen_t[i, j, 0, 0] = timer(lambda: sdpa(q, k, v, False))
    progress("generation attention")
    head_axes = {"heads": np.array([float(heads)]), "kv_heads": np.array([float(kv_heads)])}
    kv = dtype if dtype != "fp32" else "bf16"
    for phase, data, seq in (("context", ctx, "isl"), ("generation", gen_t, "kv_len")):
        axes = [np.array(grid["batch"], float), np.array(grid[seq], float)]
        filled, measured = fill_holes(axes + [head_axes["heads"], head_axes["kv_heads"]], data, (0, 1))
        grids[f"{phase}_attention/{kv}/hd{d}/w0"] = Grid({"batch": axes[0], seq: axes[1], **head_axes}, filled,
                                                         measured, "torch scaled_dot_product_attention")
    # fused experts: tokens routed to top-k experts, each expert's gate/up and down GEMMs on its share
    if model.is_moe:
        experts, topk, width = model.num_experts, model.num_experts_per_tok, model.moe_intermediate_size // tp
        w13, w2 = rand(experts, 2 * width, model.hidden_size), rand(experts, model.hidden_size, width)
        times = []
        for m in tokens:
            x = rand(m, model.hidden_size)
            routes = torch.randint(0, experts, (m * topk,), generator=gen, device=device)

            def moe():
                counts = torch.bincount(routes, minlength=experts).tolist()
                order = torch.argsort(routes)
                xs = x.repeat_interleave(topk, 0)[order]
                start = 0
                for e, c in enumerate(counts):
                    if c:
                        part = F.linear(xs[start:start + c], w13[e])
                        F.linear(F.silu(part[:, :width]) * part[:, width:], w2[e])
                        start += c
            times.append(timer(moe))
        name = (f"moe/{dtype}/h{model.hidden_size}_i{model.moe_intermediate_size}_k{topk}_e{experts}/tp{tp}_ep1")
        grids[name] = Grid({"tokens": np.array(tokens, float)}, np.array(times), np.ones(len(tokens), bool),
                           "torch per-expert F.linear")
        progress("moe")
    # memory-bound kernels: an RMSNorm-like pass (read, reduce, scale, write)
    mem = []
    for nbytes in grid["bytes"]:
        x = rand(max(1, nbytes // 2 // 4096), 4096)
        mem.append(timer(lambda: x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-6)))
    grids["memory_bound"] = Grid({"bytes": np.array(grid["bytes"], float)}, np.array(mem),
                                 np.ones(len(mem), bool), "torch RMSNorm-like pass")
    progress("memory-bound")
    return grids


def device_name(torch, device: str) -> tuple[str, dict]:
    """A catalogue name for the device and what torch tells about it."""
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info = {"name": props.name, "memory_bytes": int(props.total_memory), "sm_count": props.multi_processor_count,
                "arch": f"sm{props.major}{props.minor}"}
        raw = props.name
    else:
        info = {"name": platform.processor() or platform.machine(), "kind": "cpu"}
        raw = "CPU"
    try:
        return load_device(raw).name, info
    except UnknownHardwareError:
        return "".join(ch for ch in raw if ch.isalnum() or ch in "-_") or "device", info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF id of a shipped config, or a config.json / directory")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree whose per-GPU shapes to measure")
    parser.add_argument("--dtype", choices=sorted(TORCH_DTYPES), default="bf16")
    parser.add_argument("--out", type=Path, default=None, help="profile root (default: $VLLM_EMULATOR_HOME/profiles)")
    parser.add_argument("--grid", choices=sorted(GRIDS), default="full")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)


def main(args: argparse.Namespace) -> int:
    try:
        import torch
    except ImportError:
        print("error: profiling needs torch: pip install 'vllm-emulator[profile]'", file=sys.stderr)
        return 2
    try:
        model = load_model(args.model)
    except UnknownModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device (use --device cpu)", file=sys.stderr)
        return 2
    if args.tp < 1 or model.num_heads % args.tp:
        print(f"error: --tp {args.tp} must divide the {model.num_heads} attention heads", file=sys.stderr)
        return 2
    name, info = device_name(torch, args.device)
    root = args.out or (user_home() / "profiles")
    timer = Timer(torch, args.device, args.warmup, args.iters)
    started = time.perf_counter()
    grids = measure(model, args.tp, args.dtype, args.device, GRIDS[args.grid], timer,
                    lambda what: print(f"  measured {what}", file=sys.stderr))
    meta = {"format": 1, "hardware": name, "device": info, "model_shapes_from": model.name, "tp": args.tp,
            "dtype": args.dtype, "source": {"repo": "vllm-emulator profile", "commit": "local", "license": "-"},
            "measured_with": f"torch {torch.__version__} on {args.device}, {args.warmup} warm-up + median of "
                             f"{args.iters} ({'CUDA events' if args.device == 'cuda' else 'wall clock'})",
            "profiled_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "units": "microseconds"}
    out = operator_dir(name, root)
    OperatorTables(meta, grids).save(out)
    print(f"wrote {len(grids)} tables to {out} in {time.perf_counter() - started:.1f} s")
    try:
        load_device(name)
    except UnknownHardwareError:
        spec = user_hardware_dir() / f"{name}.yaml.draft"
        spec.parent.mkdir(parents=True, exist_ok=True)
        spec.write_text(yaml.safe_dump({**info, "name": name, "kind": "gpu" if args.device == "cuda" else "cpu"},
                                       sort_keys=False))
        print(f"{name} is not in the catalogue: complete {spec} (memory_bytes, memory_bandwidth, flops) and "
              f"rename it to {name}.yaml to serve with --hardware {name}")
    return 0
