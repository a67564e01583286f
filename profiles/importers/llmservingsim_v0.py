"""Import LLMServingSim's v0 (PyTorch-profiler) tables into the project's profile formats.

Source: casys-kaist/LLMServingSim @5daddb21 (MIT), `v0_perf_models/<HW>/<org>/<model>/tp<N>/`.
What the files hold, read from LLMServingSim's v0 profiler and the simulator that consumes them:

- `layers.csv` (layer_name, input, kv_cache, tp_size, latency(ns)): a one-layer Hugging Face
  model in fp16 (eager, separate q/k/v and gate/up GEMMs, unfused RMSNorm and rope) run on
  one sequence of `input` tokens with an empty KV cache (`kv_cache` is always 0); each row is
  the summed CUDA kernel time of one module (PyTorch profiler, median of the repeats). The
  simulator reads every op at the step's token count, except `lm_head`, read at the number
  of sequences (vLLM computes logits only for the last token of each). MoE models (Mixtral,
  PhiMoE) time one expert at full width on all tokens (`expert.w1/w3/w2`, `act_fn`) and
  the whole routing block (`gate`); the simulator runs the experts one after another, each
  on the tokens routed to it.
- `attention.csv` on GPUs: `flash_attn_varlen_func` (FA2, fp16, causal) on one layer's heads
  per GPU, ms. Prefill rows: one sequence of `prefill_chunk_size` new tokens against
  `kv_cache_size` keys that include the chunk (history = kv - chunk). Decode rows:
  `batch_size` one-token sequences sharing `kv_cache_size` keys split evenly (kv // batch
  each; no split-KV, so long single-sequence decodes are slow).
- `attention.csv` on the TPU (another tool, p50 in ns): prefill of a chunk after
  `kv_cache_size` cached tokens; decode of `batch_size` sequences of `kv_cache_size` each.
  Its `layers.csv` comes from XLA, which fuses ops, so a row can carry a neighbour's time:
  the k/v projections are inside `q_proj`, and below 313 tokens `up_proj` is inside
  `down_proj` (at one token inside `gate_proj`); the MLP is therefore kept as one op, the
  sum of the rows present. Rope is part of the TPU's attention, as LLMServingSim prices it.

Two outputs:

1. A per-model profile (profiles.model_profile, priced by emulator.cost.profiled.ProfiledCostModel)
   for every bundle that has an attention table: the layer ops by tokens, lm_head by
   sequences, a 4-D attention table and, for MoE models, the experts by (tokens, active
   experts). Mixed prefill+decode batches cost the sum of the two kernels, as LLMServingSim
   prices them; decode cells beyond the measured region (large batches at long contexts,
   which the source never ran) are filled in proportion to the batch from the largest
   measured batch at that context and listed in `meta.yaml`. GPU bundles are stored under
   `fp16` (what they measured), the TPU one under `bf16` (its MXU computes in bf16).
2. Operator tables (profiles.operator_tables, priced by emulator.operator_costmodel) for the
   GPUs without AIConfigurator tables (A6000, RTX 3090), so any model config is composed
   from what they measured: `gemm/fp16` from every single-GEMM row of every bundle of the
   device (on the H100 the same rows land within -10/+12 % (p10/p90) of AIConfigurator's
   GEMMs measured under vLLM), context attention (FA2 prefill without history; on the
   RTX 3090, which has no attention.csv, the models' own attention rows, one sequence) and
   the per-expert MoE of PhiMoE. Decode attention is left to the roofline: the FA2 decode
   rows (contiguous KV, no split-KV) are 4-10x slower on the H100 than vLLM's own decode
   kernel as AIConfigurator measured it, so they would misprice vLLM's decode.

    python -m profiles.importers.llmservingsim_v0 ../shared/data/profiles-src/llmservingsim/v0_perf_models
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emulator.cost.work import expected_active_experts
from emulator.cost.interpolate import fill_holes
from emulator.hardware import load_device
from profiles.importers.gemm_points import gemm_grid
from emulator.cost.tables import Grid, ModelProfile, OperatorTables
from profiles.model_profile import DATA_DIR, profile_dir
from profiles.operator_tables import operator_dir

SOURCE = {"repo": "casys-kaist/LLMServingSim", "commit": "5daddb21", "license": "MIT"}
OPERATOR_DEVICES = ("A6000", "RTX3090")  # H100 has AIConfigurator tables measured with vLLM's own kernels


@dataclass(frozen=True)
class Shape:
    """What the tables do not record: each model's shapes, from its Hugging Face config.json."""
    architecture: str
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    experts: int = 0
    top_k: int = 0


MODELS = {
    "meta-llama/Llama-3.1-8B": Shape("llama", 4096, 32, 8, 14336, 128256),
    "meta-llama/Llama-3.1-70B": Shape("llama", 8192, 64, 8, 28672, 128256),
    "mistralai/Mixtral-8x7B-v0.1": Shape("mixtral", 4096, 32, 8, 14336, 32000, experts=8, top_k=2),
    "microsoft/Phi-mini-MoE-instruct": Shape("phimoe", 4096, 32, 8, 960, 32064, experts=16, top_k=2),
}
DENSE_MLP = ("gate_proj", "up_proj", "act_fn", "down_proj")
EXPERT_OPS = ("expert.w1", "expert.w3", "act_fn", "expert.w2")
STEP_OPS = ("embedding", "final_layernorm")
# Grids kept from the per-token sweeps (every count from 1 to 2048 was measured)
TOKENS = [*range(1, 17), *range(24, 257, 8), *range(272, 513, 16), *range(544, 2049, 32)]
GEMM_M = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048]
CHUNKS = [32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048]
HISTORY = [0, 32, 64, 128, 256, 512, 1024, 2048]
BATCHES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256]
CONTEXTS = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
MIXED_CONTEXTS = [16, 64, 256, 1024, 4096, 16384, 65536]  # coarser: a mixed slice is a sum of the two
MOE_TOKENS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536,
              2048, 3072, 4096, 6144, 8192]


# -- reading -----------------------------------------------------------------------------
def read_layers(path: Path) -> dict[str, dict[int, float]]:
    """op -> {input tokens: µs} (repeated rows reduced to their median)."""
    rows: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    with path.open() as f:
        for row in csv.DictReader(f):
            rows[row["layer_name"]][int(row["input"])].append(float(row["latency(ns)"]) / 1000.0)
    return {op: {n: statistics.median(v) for n, v in by_n.items()} for op, by_n in rows.items()}


@dataclass
class Attention:
    """Measured attention in the emulator's terms, µs per layer."""
    prefill: dict[tuple[int, int], float]  # (chunk, history) -> µs
    decode: dict[tuple[int, int], float]   # (sequences, context per sequence) -> µs
    kernel: str


def read_attention(path: Path) -> Attention:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    prefill, decode = defaultdict(list), defaultdict(list)
    tpu = "p50_ns" in rows[0]
    for r in rows:
        chunk, kv, batch = int(r["prefill_chunk_size"]), int(r["kv_cache_size"]), int(r["batch_size"])
        if r["is_prefill"] == "True":
            us = float(r["p50_ns"]) / 1000.0 if tpu else float(r["time_stats.attn_prefill.median"]) * 1000.0
            prefill[(chunk, kv if tpu else kv - chunk)].append(us)
        else:
            us = float(r["p50_ns"]) / 1000.0 if tpu else float(r["time_stats.attn_decode.median"]) * 1000.0
            context = kv if tpu else kv // batch
            if context > 0:  # a GPU row with fewer keys than sequences attends to nothing
                decode[(batch, context)].append(us)
    kernel = "TPU attention (rope included), p50" if tpu else "flash_attn_varlen_func (FA2, fp16), median"
    return Attention(_medians(prefill), _medians(decode), kernel)


def _medians(repeats: dict) -> dict:
    return {key: statistics.median(times) for key, times in repeats.items()}


# -- attention grids -----------------------------------------------------------------------
def decode_grid(decode: dict[tuple[int, int], float], batches: list[int], contexts: list[int]):
    """(values, measured) over batches x contexts, per-sequence context.

    Inside a batch's measured contexts: linear between measured points. Below them: the
    smallest one's time (never cheaper). Above them: the largest smaller batch measured at
    that context, scaled by the batch ratio (decode reads each sequence's KV once, and at
    such batches the kernel fills the device); beyond every measured context, in
    proportion to the context. measured = False outside the batch's measured contexts.
    """
    curves = {}
    for (b, c), us in decode.items():
        curves.setdefault(b, {})[c] = us
    curves = {b: (np.array(sorted(v)), np.array([v[c] for c in sorted(v)])) for b, v in curves.items()}

    def within(b, c):
        xs, ys = curves[b]
        return None if c > xs[-1] else float(np.interp(c, xs, ys))

    values = np.zeros((len(batches), len(contexts)))
    measured = np.ones(values.shape, bool)
    for i, b in enumerate(batches):
        xs, _ = curves[b]
        for j, c in enumerate(contexts):
            t = within(b, c)
            if t is None:
                donors = [d for d in curves if d < b and curves[d][0][-1] >= c]
                if donors:
                    t = within(max(donors), c) * b / max(donors)
                else:  # beyond every measured context: in proportion to the context
                    t = float(curves[b][1][-1]) * c / xs[-1]
            measured[i, j] = xs[0] <= c <= xs[-1]
            values[i, j] = t
    return values, measured


def _nearest(options, wanted: list[int]) -> list[int]:
    """The measured values closest (in log scale) to each wanted one, and the largest."""
    options = sorted(options)
    picked = {min(options, key=lambda o: abs(np.log2((o + 1) / (w + 1)))) for w in wanted}
    return sorted(picked | {options[-1]})


def attention_points(att: Attention) -> tuple[np.ndarray, dict]:
    """The profile's (n, 5) table: prefill-only, decode-only and mixed slices; and what was filled."""
    chunks = [c for c in CHUNKS if any(k[0] == c for k in att.prefill)]
    histories = {c: _nearest([h for (cc, h) in att.prefill if cc == c], HISTORY) for c in chunks}
    batches = [b for b in BATCHES if any(k[0] == b for k in att.decode)]
    max_context = max(c for _, c in att.decode)
    contexts = [c for c in CONTEXTS if c <= max_context]
    dec, dec_measured = decode_grid(att.decode, batches, contexts)
    mixed = [contexts.index(c) for c in MIXED_CONTEXTS if c in contexts]
    rows = []
    for c in chunks:
        for h in histories[c]:
            rows.append((c, h, 0, 0, att.prefill[(c, h)]))
    for i, b in enumerate(batches):
        for j, ctx in enumerate(contexts):
            rows.append((0, 0, b, ctx, dec[i, j]))
    for c in chunks:
        for h in histories[c]:
            for i, b in enumerate(batches):
                for j in mixed:
                    rows.append((c, h, b, contexts[j], att.prefill[(c, h)] + dec[i, j]))
    filled = [[int(batches[i]), int(contexts[j])] for i, j in zip(*np.nonzero(~dec_measured))]
    grid = {"chunks": chunks, "history": {c: histories[c] for c in chunks}, "decode_batches": batches,
            "decode_contexts": contexts, "mixed_contexts": [contexts[j] for j in mixed],
            "mixed": "prefill + decode (separately measured kernels, summed as LLMServingSim prices them)",
            "decode_filled": {"rule": "x batch / measured batch, from the largest measured batch at that context; "
                                      "below a batch's smallest context: that context's time",
                              "cells": filled}}
    return np.array(rows, float), grid


# -- per-model profiles --------------------------------------------------------------------
def _table(points: dict[int, float], grid: list[int]) -> np.ndarray:
    xs = [x for x in grid if x in points]
    return np.array([xs, [points[x] for x in xs]], float)


def expert_time(layers: dict[str, dict[int, float]], tokens: float) -> float:
    """One expert (full width, as LLMServingSim runs them) on `tokens` tokens, µs."""
    total = 0.0
    for op in EXPERT_OPS:
        xs = np.array(sorted(layers[op]), float)
        ys = np.array([layers[op][int(x)] for x in xs])
        t = max(tokens, 1.0)
        if t <= xs[-1]:
            total += float(np.interp(t, xs, ys))
        else:  # beyond the sweep: the slope of its last 10 % (GEMMs are linear in tokens there)
            tail = xs >= 0.9 * xs[-1]
            slope = np.polyfit(xs[tail], ys[tail], 1)[0]
            total += float(ys[-1] + slope * (t - xs[-1]))
    return total


def moe_points(layers: dict[str, dict[int, float]], shape: Shape) -> np.ndarray:
    """(tokens, active experts, µs): the active experts run one after another, each on its share."""
    rows = []
    for t in MOE_TOKENS:
        for a in range(1, shape.experts + 1):
            rows.append((t, a, a * expert_time(layers, t * shape.top_k / a)))
    return np.array(rows, float)


def model_profile(tp_dir: Path, hardware: str) -> ModelProfile:
    model = f"{tp_dir.parents[1].name}/{tp_dir.parent.name}"
    shape = MODELS[model]
    tp = int(tp_dir.name[2:])
    layers = read_layers(tp_dir / "layers.csv")
    att = read_attention(tp_dir / "attention.csv")
    tpu = load_device(hardware).kind == "tpu"
    dense: dict[str, np.ndarray] = {}
    if tpu:
        for op in ("input_layernorm", "q_proj", "o_proj", "post_layernorm", *STEP_OPS):
            dense[op] = _table(layers[op], TOKENS)
        mlp = {n: sum(layers[op].get(n, 0.0) for op in DENSE_MLP) for n in TOKENS}
        dense["mlp"] = _table(mlp, TOKENS)
        layer_ops = {"input_layernorm": 1, "q_proj": 1, "o_proj": 1, "post_layernorm": 1, "mlp": 1}
    else:
        per_layer = ["input_layernorm", "q_proj", "k_proj", "v_proj", "rope", "o_proj", "post_layernorm"]
        per_layer += ["gate"] if shape.experts else list(DENSE_MLP)
        for op in [*per_layer, *STEP_OPS]:
            dense[op] = _table(layers[op], TOKENS)
        layer_ops = {op: 1 for op in per_layer}
    points, grid = attention_points(att)
    meta = {
        "format": 1,
        "hardware": hardware,
        "device_name": None,
        "model": model,
        "architecture": shape.architecture,
        "dtype": "bf16" if tpu else "fp16",
        "tp": tp,
        "measured_with": ("XLA profile of the model's ops; attention: " + att.kernel if tpu else
                          "PyTorch profiler (CUDA kernel time) of a one-layer Hugging Face model in fp16, eager; "
                          "attention: " + att.kernel),
        "source": {**SOURCE, "path": "v0_perf_models/" + "/".join(tp_dir.parts[-4:])},
        "layer_ops": layer_ops,
        "step_ops": list(STEP_OPS),
        "attention_grid": grid,
        "profiled_limits": {"max_num_batched_tokens": max(layers["q_proj"]),
                            "max_num_seqs": max(grid["decode_batches"])},
    }
    profile = ModelProfile(meta=meta, dense=dense, per_sequence={"lm_head": _table(layers["lm_head"], TOKENS)})
    profile.attention = points
    if shape.experts:
        profile.moe = moe_points(layers, shape)
        meta["moe"] = (f"{shape.experts} experts, top-{shape.top_k}; each active expert (gate, up, act, down at "
                       "full width, not split by TP) runs on tokens x top_k / active experts, one after another")
    return profile


# -- operator tables -------------------------------------------------------------------------
def gemm_shapes(shape: Shape, tp: int) -> dict[str, tuple[int, int]]:
    """(n, k) of each op of layers.csv that is one GEMM (experts are whole on every GPU)."""
    d = shape.hidden // shape.heads
    shapes = {"q_proj": (shape.heads * d // tp, shape.hidden), "k_proj": (shape.kv_heads * d // tp, shape.hidden),
              "v_proj": (shape.kv_heads * d // tp, shape.hidden), "o_proj": (shape.hidden, shape.heads * d // tp),
              "lm_head": (shape.vocab // tp, shape.hidden)}
    if shape.experts:
        shapes |= {"expert.w1": (shape.intermediate, shape.hidden), "expert.w3": (shape.intermediate, shape.hidden),
                   "expert.w2": (shape.hidden, shape.intermediate)}
    else:
        shapes |= {"gate_proj": (shape.intermediate // tp, shape.hidden),
                   "up_proj": (shape.intermediate // tp, shape.hidden),
                   "down_proj": (shape.hidden, shape.intermediate // tp)}
    return shapes


def context_grid(context: dict[tuple[int, int], dict[int, float]], source: str) -> Grid:
    """One-sequence prefill times per (heads, KV heads) per GPU -> the 4-D context-attention grid;
    a length one head split lacks, and a (heads, KV heads) pair never run, are filled and marked."""
    isl = sorted(set().union(*context.values()))
    heads = sorted({h for h, _ in context})
    kv_heads = sorted({k for _, k in context})
    values = np.full((1, len(isl), len(heads), len(kv_heads)), np.nan)
    for (h, k), per in context.items():
        values[0, :, heads.index(h), kv_heads.index(k)] = [per.get(n, np.nan) for n in isl]
    axes = [np.array([1.0]), np.array(isl, float), np.array(heads, float), np.array(kv_heads, float)]
    filled, measured = fill_holes(axes, values, (0, 1))
    return Grid(dict(zip(("batch", "isl", "heads", "kv_heads"), axes)), filled, measured, source)


def operator_tables(hardware: str, bundles: list[Path]) -> OperatorTables:
    src = "v0_perf_models/" + hardware
    gemms: dict[tuple[int, int, int], list[float]] = defaultdict(list)
    context: dict[tuple[int, int], dict[int, float]] = {}
    fa2 = any((b / "attention.csv").exists() for b in bundles)
    grids: dict[str, Grid] = {}
    for tp_dir in bundles:
        model = f"{tp_dir.parents[1].name}/{tp_dir.parent.name}"
        shape, tp = MODELS[model], int(tp_dir.name[2:])
        layers = read_layers(tp_dir / "layers.csv")
        for op, (n, k) in gemm_shapes(shape, tp).items():
            for m in GEMM_M:
                gemms[(m, n, k)].append(layers[op][m])
        heads = (shape.heads // tp, shape.kv_heads // tp)
        if fa2 and (tp_dir / "attention.csv").exists():
            att = read_attention(tp_dir / "attention.csv")
            context.setdefault(heads, {c: us for (c, h), us in att.prefill.items() if h == 0})
        elif not fa2 and "attn" in layers and heads not in context:
            context[heads] = {n: layers["attn"][n] for n in TOKENS}
        if shape.experts and tp == 1:
            name = f"moe/fp16/h{shape.hidden}_i{shape.intermediate}_k{shape.top_k}_e{shape.experts}/tp1_ep1"
            grids[name] = expert_grid(layers, shape, f"{src} per-expert rows of layers.csv (tp1), experts one "
                                                     "after another on uniformly routed tokens")
    grids["gemm/fp16"] = gemm_grid(gemms, GEMM_M, f"{src} single-GEMM rows of layers.csv (cuBLAS via nn.Linear)")
    if context:
        source = ("attention.csv prefill rows without history (FA2 varlen)" if fa2 else
                  "layers.csv `attn` rows (the model's own attention on one sequence)")
        grids["context_attention/fp16/hd128/w0"] = context_grid(context, f"{src} {source}")
    meta = {
        "format": 1,
        "hardware": hardware,
        "source": {**SOURCE, "path": src},
        "measured_with": "PyTorch profiler (CUDA kernel time) of one-layer Hugging Face models in fp16, eager"
                         + ("; attention: flash_attn_varlen_func (FA2)" if fa2 else ""),
        "models": sorted(f"{p.parents[1].name}/{p.parent.name} {p.name}" for p in bundles),
        "units": "microseconds",
    }
    return OperatorTables(meta, grids)


def expert_grid(layers: dict[str, dict[int, float]], shape: Shape, source: str) -> Grid:
    """The MoE layer by tokens: the expected active experts, each on its share of the routed tokens."""
    tokens = np.array(MOE_TOKENS, float)
    active = np.maximum([expected_active_experts(t, shape.experts, shape.top_k) for t in tokens], 1.0)
    share = tokens * shape.top_k / active
    times = np.array([a * expert_time(layers, s) for a, s in zip(active, share)])
    return Grid({"tokens": tokens}, times, share <= max(layers["expert.w1"]), source)


# -- command ---------------------------------------------------------------------------------
def import_all(source: Path, out_root: Path = DATA_DIR) -> list[Path]:
    bundles = sorted(p for p in source.glob("*/*/*/tp*") if (p / "layers.csv").exists())
    written = []
    by_device: dict[str, list[Path]] = defaultdict(list)
    for tp_dir in bundles:
        hardware = load_device(tp_dir.parents[2].name).name
        by_device[hardware].append(tp_dir)
        if (tp_dir / "attention.csv").exists():
            profile = model_profile(tp_dir, hardware)
            out = profile_dir(hardware, profile.model, profile.meta["dtype"], profile.tp, out_root)
            profile.save(out)
            written.append(out)
    for hardware in OPERATOR_DEVICES:
        if by_device.get(hardware):
            out = operator_dir(hardware, out_root)
            operator_tables(hardware, by_device[hardware]).save(out)
            written.append(out)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source_dir", type=Path, help="LLMServingSim's v0_perf_models/ folder")
    parser.add_argument("--out", type=Path, default=DATA_DIR)
    args = parser.parse_args(argv)
    written = import_all(args.source_dir, args.out)
    if not written:
        print(f"no LLMServingSim v0 bundles under {args.source_dir}", file=sys.stderr)
        return 2
    for out in written:
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
