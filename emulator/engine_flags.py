"""vLLM's engine flags, as `vllm serve` spells them, shared by `serve` and `replay`.

Defaults are None where vLLM picks a device-dependent value, so `resolve()` can
apply vLLM's own rule for the simulated device.
"""
from __future__ import annotations

import argparse
import os
import re

from dataclasses import asdict

from emulator.config import KV_CACHE_DTYPES, EngineArgs
from emulator.kv_events import DEFAULT_HASH_ALGO, HASH_ALGOS
from emulator.lora import MAX_LORA_RANKS

# vLLM 0.33's MoEBackend (config/kernel.py), in its order: what --moe-backend accepts
MOE_BACKENDS = ("auto", "triton", "batched_triton", "deep_gemm", "deep_gemm_mega_moe", "cutlass", "flashinfer_trtllm",
                "flashinfer_cutlass", "flashinfer_cutedsl", "flashinfer_moe_ep_cutedsl", "flashinfer_b12x", "b12x",
                "flashinfer_moe_ep_mega_deep_gemm", "marlin", "humming", "triton_unfused", "aiter", "aiter_mega_moe",
                "aiter_triton_mxfp4_bf16", "aiter_triton_mxfp4_mxfp4", "flydsl", "hpc", "emulation", "rdna3")


def _bool_pair(parser: argparse.ArgumentParser, name: str, default: bool, help_text: str) -> None:
    dest = "enable_" + name.replace("-", "_")
    parser.add_argument(f"--enable-{name}", dest=dest, action="store_true", default=default, help=help_text)
    parser.add_argument(f"--disable-{name}", dest=dest, action="store_false")


_DECIMAL = {"k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9, "t": 10 ** 12}
_BINARY = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
_SUFFIXED = re.compile(r"(\d+(?:\.\d+)?)([kKmMgGtT])")


def human_readable_int(value: str) -> int:
    """vLLM's reading of token counts and byte sizes: 1k = 1000, 1K = 1024 (m/M, g/G, t/T likewise);
    decimals only with the lower-case (decimal) suffixes. Named as vLLM's, since argparse's
    error ("invalid human_readable_int value: ...") names the type function."""
    text = value.strip()
    match = _SUFFIXED.fullmatch(text)
    if match:
        number, suffix = match.groups()
        if suffix in _DECIMAL:
            return int(float(number) * _DECIMAL[suffix])
        if "." in number:
            raise argparse.ArgumentTypeError(f"Decimals are not allowed with binary suffixes like {suffix}. "
                                             f"Did you mean to use {number}{suffix.lower()} instead?")
        return int(number) * _BINARY[suffix]
    return int(text)  # a plain integer (ValueError: argparse's "invalid ... value")


def human_readable_int_or_auto(value: str) -> int:
    """--max-model-len: human_readable_int, or -1 / auto (fit it to the KV cache)."""
    text = value.strip()
    return -1 if text == "-1" or text.lower() == "auto" else human_readable_int(text)


def _kv_cache_dtype(value: str) -> str:
    """vLLM's argparse takes any string here and its CacheConfig refuses an unknown one with this text."""
    if value not in KV_CACHE_DTYPES:
        raise argparse.ArgumentTypeError(f"Invalid kv_cache_dtype: {value!r}. Valid values are: "
                                         f"{list(KV_CACHE_DTYPES)}")
    return value


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("vLLM engine arguments")
    g.add_argument("--max-num-seqs", type=int, default=None)
    g.add_argument("--max-num-batched-tokens", type=human_readable_int, default=None)
    g.add_argument("--max-model-len", type=human_readable_int_or_auto, default=None,
                   help="context length (1k = 1000, 1K = 1024; 25.6k, not 1.5K); -1 or auto fits it to the KV cache")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--gpu-memory-utilization", "--device-memory-utilization", type=float, default=0.92)
    g.add_argument("--num-gpu-blocks-override", type=int, default=None)
    g.add_argument("--kv-cache-memory-bytes", type=human_readable_int, default=None)
    g.add_argument("--kv-cache-dtype", type=_kv_cache_dtype, choices=KV_CACHE_DTYPES, default="auto",
                   metavar=str(sorted(KV_CACHE_DTYPES)), help="the KV cache's data type (auto: the model's)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    g.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    g.add_argument("--data-parallel-size", "-dp", type=int, default=1)
    g.add_argument("--enable-expert-parallel", "-ep", action="store_true")
    g.add_argument("--scheduling-policy", choices=["fcfs", "priority"], default="fcfs")
    g.add_argument("--long-prefill-token-threshold", type=int, default=0)
    g.add_argument("--watermark", type=float, default=0.0)
    g.add_argument("--performance-mode", choices=["balanced", "interactivity", "throughput"], default="balanced",
                   help="throughput doubles the default batch limits; interactivity captures CUDA graphs of "
                        "every batch size to 32 (small steps pad less)")
    g.add_argument("--max-num-queued-reqs", type=int, default=None)
    g.add_argument("--max-num-queued-tokens", type=human_readable_int, default=None)
    _bool_pair(g, "prefix-caching", True, "prefix caching (default on)")
    g.add_argument("--prefix-caching-hash-algo", choices=list(HASH_ALGOS), default=DEFAULT_HASH_ALGO,
                   help="how block hashes are computed (those KV events publish; the simulation keys its "
                        "prefix cache by a faster hash of the same content)")
    _bool_pair(g, "chunked-prefill", True, "chunked prefill (default on)")
    g.add_argument("--async-scheduling", dest="async_scheduling", action="store_true", default=True)
    g.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false")
    g.add_argument("--scheduler-reserve-full-isl", dest="scheduler_reserve_full_isl", action="store_true",
                   default=True)
    g.add_argument("--no-scheduler-reserve-full-isl", dest="scheduler_reserve_full_isl", action="store_false")
    g.add_argument("--enforce-eager", action="store_true",
                   help="no torch.compile and no CUDA graphs: no compile charge in the memory plan")
    g.add_argument("--optimization-level", type=int, choices=[0, 1, 2, 3], default=2,
                   help="vLLM's -O level: 0 compiles nothing and captures no CUDA graph (as --enforce-eager); "
                        "1 (piecewise CUDA graphs only) is priced as 2 and 3 (vLLM's default, full graphs)")
    g.add_argument("--compile-cache", choices=["cold", "warm"], default="cold",
                   help="state of vLLM's torch.compile cache at start-up (a first boot of a shape is cold)")
    g.add_argument("--moe-backend", choices=MOE_BACKENDS, default="auto", metavar="{" + ",".join(sorted(MOE_BACKENDS))
                   + "}", help="vLLM's MoE kernel backend; 'marlin' is priced from measured Marlin kernels, the others "
                   "as 'auto' (a start-up warning says so)")
    g.add_argument("--kv-offloading-size", type=float, default=None,
                   help="GiB of host memory for vLLM's KV cache offloading (default: off); as in vLLM, it replaces "
                        "--kv-transfer-config's connector (use a MultiConnector for P/D with offloading)")
    g.add_argument("--kv-offloading-backend", choices=["native", "lmcache"], default="native",
                   help="native: this instance's CPU tier; lmcache: a pool shared by the instances of a node")
    g.add_argument("--kv-transfer-config", default=None,
                   help="vLLM's KV connector JSON: P/D (NixlConnector, MooncakeConnector, ...), "
                        "OffloadingConnector, or a MultiConnector of both, e.g. "
                        "'{\"kv_connector\":\"NixlConnector\",\"kv_role\":\"kv_both\"}'")
    g.add_argument("--disable-hybrid-kv-cache-manager", dest="disable_hybrid_kv_cache_manager",
                   action="store_const", const=True, default=None,
                   help="one KV cache group for a model mixing sliding-window and full-attention layers (its "
                        "sliding layers allocated as full ones); default: vLLM decides (off for KV connectors "
                        "without hybrid support)")
    g.add_argument("--enable-hybrid-kv-cache-manager", dest="disable_hybrid_kv_cache_manager",
                   action="store_const", const=False,
                   help="require vLLM's hybrid KV cache manager (start-up fails with a KV connector that does "
                        "not support it)")
    g.add_argument("--enable-lora", dest="enable_lora", action="store_true", default=False,
                   help="serve LoRA adapters (vLLM's LoRAConfig; the flags below are read only with it)")
    g.add_argument("--disable-lora", dest="enable_lora", action="store_false")
    g.add_argument("--max-loras", type=int, default=1, help="adapters in one batch (vLLM's scheduler admits no "
                                                             "request of another adapter past it)")
    g.add_argument("--max-lora-rank", type=int, choices=MAX_LORA_RANKS, default=16,
                   help="the largest adapter rank (sizes the adapter slots taken from the KV cache)")
    g.add_argument("--max-cpu-loras", type=int, default=None, help="adapters kept in CPU memory (>= --max-loras)")
    g.add_argument("--cost-model", choices=["profiled", "operators", "roofline"], default=None,
                   help="force how steps are priced (default: measured model tables, else operator tables of "
                        "the device, else a roofline of its spec sheet)")


def spell_optimization_level(argv: list[str]) -> list[str]:
    """vLLM's spellings of the optimization level (FlexibleArgumentParser): `-O3`, `-O=3` and `-O 3` are
    `--optimization-level 3`."""
    spelled: list[str] = []
    for i, arg in enumerate(argv):
        if arg.startswith("-O") and arg != "-O":
            spelled += ["--optimization-level", arg[3:] if arg[2:3] == "=" else arg[2:]]
        elif arg == "-O" and i + 1 < len(argv) and argv[i + 1] in ("0", "1", "2", "3"):
            spelled.append("--optimization-level")
        else:
            spelled.append(arg)
    return spelled


def unsimulated_values(ns: argparse.Namespace) -> list[str]:
    """The engine flags' values given that change throughput or memory under vLLM and are not simulated (serve
    and replay warn of them alike): -O1, which vLLM runs with piecewise CUDA graphs only, is priced as -O2; a MoE
    backend other than auto and marlin is priced as auto."""
    values = ["-O1"] if getattr(ns, "optimization_level", 2) == 1 else []
    backend = getattr(ns, "moe_backend", "auto")
    if backend not in ("auto", "marlin"):
        values.append(f"--moe-backend {backend}")
    return values


def performance_mode_line(mode: str) -> str | None:
    """vLLM's start-up line of a --performance-mode other than balanced (VllmConfig.__post_init__)."""
    return None if mode == "balanced" else f"Performance mode set to '{mode}'."


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    return EngineArgs(
        max_num_seqs=ns.max_num_seqs,
        max_num_batched_tokens=ns.max_num_batched_tokens,
        max_model_len=ns.max_model_len,
        block_size=ns.block_size,
        gpu_memory_utilization=ns.gpu_memory_utilization,
        enable_prefix_caching=ns.enable_prefix_caching,
        prefix_caching_hash_algo=ns.prefix_caching_hash_algo,
        kv_offloading_size=ns.kv_offloading_size,
        kv_offloading_backend=ns.kv_offloading_backend,
        kv_transfer_config=ns.kv_transfer_config,
        disable_hybrid_kv_cache_manager=ns.disable_hybrid_kv_cache_manager,
        enable_chunked_prefill=ns.enable_chunked_prefill,
        num_gpu_blocks_override=ns.num_gpu_blocks_override,
        kv_cache_memory_bytes=ns.kv_cache_memory_bytes,
        tensor_parallel_size=ns.tensor_parallel_size,
        pipeline_parallel_size=ns.pipeline_parallel_size,
        data_parallel_size=ns.data_parallel_size,
        enable_expert_parallel=ns.enable_expert_parallel,
        scheduling_policy=ns.scheduling_policy,
        long_prefill_token_threshold=ns.long_prefill_token_threshold,
        watermark=ns.watermark,
        scheduler_reserve_full_isl=ns.scheduler_reserve_full_isl,
        async_scheduling=ns.async_scheduling,
        kv_cache_dtype=ns.kv_cache_dtype,
        # -O0: vLLM's CompilationMode.NONE and CUDAGraphMode.NONE, what --enforce-eager gives
        enforce_eager=ns.enforce_eager or getattr(ns, "optimization_level", 2) == 0,
        moe_backend=ns.moe_backend,
        performance_mode=ns.performance_mode,
        max_num_queued_reqs=ns.max_num_queued_reqs,
        max_num_queued_tokens=ns.max_num_queued_tokens,
        model_runner_v2=model_runner_v2(),
        enable_lora=ns.enable_lora,
        max_loras=ns.max_loras,
        max_lora_rank=ns.max_lora_rank,
        max_cpu_loras=ns.max_cpu_loras,
    )


def model_runner_v2() -> bool:
    """vLLM 0.33 runs the V2 model runner unless VLLM_USE_V2_MODEL_RUNNER turns it off (it decides how
    pipeline parallelism schedules: see EngineArgs.model_runner_v2)."""
    value = os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").strip().lower()
    return value not in ("0", "false", "no", "off")


def explicit_engine_args(ns: argparse.Namespace) -> dict:
    """The engine flags the command line set to something other than their default (a cluster's
    instances start from them)."""
    given, default = engine_args_from(ns), EngineArgs()
    return {k: v for k, v in asdict(given).items() if v != getattr(default, k)}
