"""Engine arguments with vLLM 0.33's names and defaults.

`EngineArgs` holds what a user passed (None = "vLLM decides"); `resolve()` fills
the defaults vLLM would pick for the simulated device and validates them the way
vLLM's config classes do, with vLLM's error messages.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace

from emulator.hardware import GiB, DeviceSpec
from emulator.kv_connectors import (EVICTION_POLICIES, LMCACHE_MP, MULTI, NIXL, NO_KV_CONNECTORS, OFFLOAD_CONNECTORS,
                                    PD_CONNECTORS, SIMULATED, VLLM_CONNECTORS, KVConnectors, children,
                                    nixl_pipeline_refusal, split, with_offloading)
from emulator.kv_dtypes import PACKED_KV_DTYPES, packed_block_size
from emulator.kv_events import DEFAULT_HASH_ALGO, HASH_ALGOS, XXHASH_MISSING, hash_algo_available
from emulator.lora import MAX_LORA_RANKS, MAX_LORA_VOCAB, LoRAConfig
from emulator.models import ModelSpec


def _log():
    """This module's logger: logging is imported when a check has something to say, not by every run."""
    import logging
    return logging.getLogger("vllm_emulator.config")


# vLLM 0.33's --kv-cache-dtype values (vllm/config/cache.py CacheDType, in its order): any other is refused at
# start-up by CacheConfig, not by argparse (a platform may register more)
KV_CACHE_DTYPES = ("auto", "float16", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2", "fp8_inc", "fp8_ds_mla",
                   "nvfp4_ds_mla", "turboquant_k8v4", "turboquant_4bit_nc", "turboquant_k3v4_nc",
                   "turboquant_3bit_nc", "octave_k3v4", "octave_k3v3", "octave_k3v3_compact", "ultraquant_4bit",
                   "int4_per_token_head", "int8_per_token_head", "fp8_per_token_head", "nvfp4", "nvfp4_4over6")
# vLLM's Octave layouts (ROCm only: its ROCM_OCTAVE backend, Hadamard-rotated codes with a RoPE split) are not priced
_UNPRICED_KV_DTYPES = ("octave_",)
# The model dtype names that are float16 / bfloat16 (the only KV dtypes vLLM checks against the model's)
_FLOAT_NAMES = {"float16": "float16", "fp16": "float16", "half": "float16", "bfloat16": "bfloat16",
                "bf16": "bfloat16"}


class ConfigError(ValueError):
    """An engine argument vLLM itself would reject."""


@dataclass(frozen=True)
class EngineArgs:
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None  # -1: fit the context to the KV cache (vLLM's "auto")
    block_size: int = 16
    gpu_memory_utilization: float = 0.92
    enable_prefix_caching: bool = True
    prefix_caching_hash_algo: str = DEFAULT_HASH_ALGO  # the block hashes KV events publish
    enable_chunked_prefill: bool = True
    num_gpu_blocks_override: int | None = None
    kv_cache_memory_bytes: int | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False
    scheduling_policy: str = "fcfs"
    long_prefill_token_threshold: int = 0
    watermark: float = 0.0
    scheduler_reserve_full_isl: bool = True
    async_scheduling: bool = True
    kv_cache_dtype: str = "auto"
    enforce_eager: bool = False
    moe_backend: str = "auto"  # vLLM's --moe-backend; "marlin" is priced from its own kernel tables
    performance_mode: str = "balanced"
    max_num_queued_reqs: int | None = None
    max_num_queued_tokens: int | None = None
    kv_offloading_size: float | None = None  # GiB of host memory for vLLM's KV offloading (None: off)
    kv_offloading_backend: str = "native"  # native (this instance's CPU tier) | lmcache (a node's shared pool)
    kv_transfer_config: str | None = None  # vLLM's --kv-transfer-config JSON (P/D connector and role)
    # vLLM's --disable-hybrid-kv-cache-manager (True) / --enable-hybrid-kv-cache-manager (False); None: vLLM decides
    disable_hybrid_kv_cache_manager: bool | None = None
    # vLLM 0.33's default V2 model runner keeps async scheduling with pipeline parallelism (a batch queue
    # of PP + 1); its V1 runner (VLLM_USE_V2_MODEL_RUNNER=0) turns async scheduling off there
    model_runner_v2: bool = True
    # vLLM's LoRAConfig flags (read only with --enable-lora); max_cpu_loras None (or 0): max_loras
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None

    def with_(self, **changes) -> "EngineArgs":
        return replace(self, **changes)


@dataclass(frozen=True)
class EngineConfig:
    """Resolved engine arguments: every field has its final value."""
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    block_size: int
    gpu_memory_utilization: float
    enable_prefix_caching: bool
    enable_chunked_prefill: bool
    num_gpu_blocks_override: int | None
    kv_cache_memory_bytes: int | None
    tensor_parallel_size: int
    pipeline_parallel_size: int
    data_parallel_size: int
    enable_expert_parallel: bool
    scheduling_policy: str
    long_prefill_token_threshold: int
    watermark: float
    scheduler_reserve_full_isl: bool
    async_scheduling: bool
    kv_cache_dtype: str
    enforce_eager: bool = False
    performance_mode: str = "balanced"  # interactivity: CUDA graphs of every batch size to 32 (cost.base)
    moe_backend: str = "auto"
    max_num_queued_reqs: int | None = None
    max_num_queued_tokens: int | None = None
    auto_max_model_len: bool = False  # shrink max_model_len to what the KV cache holds, once sized
    kv_offloading_size: float | None = None
    kv_offloading_backend: str = "native"
    kv_transfer_config: str | None = None
    prefix_caching_hash_algo: str = DEFAULT_HASH_ALGO
    disable_hybrid_kv_cache_manager: bool | None = None  # as given (None: vLLM decides; see hybrid_kv_cache_manager)
    # the connectors vLLM runs for kv_transfer_config and the offloading flags (derived from them)
    kv_connectors: KVConnectors = field(default=NO_KV_CONNECTORS, compare=False)
    lora: LoRAConfig | None = None  # None: LoRA off (no --enable-lora)

    @property
    def kv_transfer(self) -> dict:
        """The P/D connector's KVTransferConfig: --kv-transfer-config's own connector, or a MultiConnector's
        P/D child ({} when the instance runs none, as when --kv-offloading-size replaced it)."""
        return self.kv_connectors.pd

    @property
    def kv_load_failure_policy(self) -> str:
        """What a failed KV load does (vLLM's kv_load_failure_policy, the top-level config's): "fail" ends
        the request with an error, "recompute" computes the prompt locally."""
        return self.kv_connectors.transfer.get("kv_load_failure_policy", DEFAULT_KV_LOAD_FAILURE_POLICY)

    @property
    def kv_lease_duration(self) -> float:
        """Seconds a finished prefill keeps its blocks for a decode side that has not read them: NIXL's
        kv_connector_extra_config.kv_lease_duration, MooncakeConnector's request timeout."""
        config = self.kv_transfer
        if config.get("kv_connector") == "MooncakeConnector":
            return MOONCAKE_ABORT_REQUEST_TIMEOUT
        return config.get("kv_connector_extra_config", {}).get("kv_lease_duration", DEFAULT_KV_LEASE_DURATION)

    @property
    def hybrid_kv_cache_manager(self) -> bool:
        """Whether vLLM runs its hybrid KV cache manager (VllmConfig.__post_init__'s HMA rules, vllm/config/vllm.py):
        off when --disable-hybrid-kv-cache-manager says so, or, with no preference, when the KV connectors do
        not all support it; an explicit --enable-hybrid-kv-cache-manager with such connectors does not start
        (`resolve`). A model without both sliding-window and full-attention layers has one group either way."""
        if self.disable_hybrid_kv_cache_manager is not None:
            return not self.disable_hybrid_kv_cache_manager
        return self.kv_connectors.supports_hma

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


def batch_defaults(device: DeviceSpec) -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens) vLLM's `serve` picks for a device."""
    if device.kind == "tpu":
        return 256, {"TPUv6e": 1024, "TPUv5e": 512}.get(device.name, 2048)
    if device.memory_bytes >= 160 * GiB:
        return 1024, 16384
    if device.memory_bytes >= 70 * GiB and not device.name.upper().startswith("A100"):
        return 1024, 8192
    return 256, 2048


def resolve(args: EngineArgs, model: ModelSpec, device: DeviceSpec) -> EngineConfig:
    """Fill vLLM's defaults for `device` and check the combination like vLLM does."""
    auto = args.max_model_len == -1
    max_model_len = model.max_position_embeddings if auto or not args.max_model_len else args.max_model_len
    if max_model_len > model.max_position_embeddings:
        _long_max_model_len(max_model_len, model)
    default_seqs, default_tokens = batch_defaults(device)
    max_num_seqs = args.max_num_seqs if args.max_num_seqs is not None else default_seqs
    if args.max_num_batched_tokens is not None:
        max_batched = args.max_num_batched_tokens
    else:
        max_batched = default_tokens
        if args.performance_mode == "throughput":
            max_batched *= 2
        if not args.enable_chunked_prefill:
            max_batched = max(max_model_len, max_batched)
        max_batched = min(max_batched, max_num_seqs * max_model_len)
    if args.max_num_seqs is None:
        if args.performance_mode == "throughput":
            max_num_seqs *= 2
        max_num_seqs = min(max_num_seqs, max_batched)
    _check(args, max_model_len, max_num_seqs, max_batched, model)
    connectors = kv_connectors(args)
    _check_hybrid_kv_cache_manager(args, connectors, model)
    block_size = packed_block_size(model, args.kv_cache_dtype, args.block_size)
    if block_size != args.block_size:
        _log().info("Setting attention block size to %d tokens so the quantized primary KV page covers the "
                 "higher-precision padded-spec page.", block_size)
    return EngineConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_batched,
        max_model_len=max_model_len,
        block_size=block_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=args.enable_prefix_caching,
        enable_chunked_prefill=args.enable_chunked_prefill,
        num_gpu_blocks_override=args.num_gpu_blocks_override,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        data_parallel_size=args.data_parallel_size,
        enable_expert_parallel=args.enable_expert_parallel,
        scheduling_policy=args.scheduling_policy,
        long_prefill_token_threshold=args.long_prefill_token_threshold,
        watermark=args.watermark,
        scheduler_reserve_full_isl=args.scheduler_reserve_full_isl,
        async_scheduling=args.async_scheduling and (args.pipeline_parallel_size == 1 or args.model_runner_v2),
        kv_cache_dtype=args.kv_cache_dtype,
        enforce_eager=args.enforce_eager,
        performance_mode=args.performance_mode,
        moe_backend=args.moe_backend,
        max_num_queued_reqs=args.max_num_queued_reqs,
        max_num_queued_tokens=args.max_num_queued_tokens,
        auto_max_model_len=auto,
        prefix_caching_hash_algo=args.prefix_caching_hash_algo,
        kv_offloading_size=args.kv_offloading_size,
        kv_offloading_backend=args.kv_offloading_backend,
        kv_transfer_config=args.kv_transfer_config,
        kv_connectors=connectors,
        lora=lora_config(args, model),
        disable_hybrid_kv_cache_manager=args.disable_hybrid_kv_cache_manager,
    )


def _check_hybrid_kv_cache_manager(args: EngineArgs, connectors: KVConnectors, model: ModelSpec) -> None:
    """--enable-hybrid-kv-cache-manager with a KV connector that does not support it: vLLM's engine core refuses
    to create the connector (KVConnectorFactory.create_connector, kv_connector/factory.py), whatever the model.
    (VllmConfig's own refusal, for a platform or chunked local attention that needs it off, has no case here:
    every simulated platform supports it and no simulated model has chunked local attention.) NIXL's worker refuses
    pipeline parallelism with the hybrid layout, and on a consumer (decode) side. With KV offloading a model with
    sliding-window layers runs one KV cache group here (emulator.memory.engine_kv_groups)."""
    if not connectors.connector:
        return
    explicit = args.disable_hybrid_kv_cache_manager is False
    if explicit and not connectors.supports_hma:
        raise ConfigError(f"Connector {connectors.connector} does not support HMA but HMA is enabled. Please set "
                          "`--disable-hybrid-kv-cache-manager`.")
    # vLLM lays the model out in hybrid groups
    hybrid = model.mixes_sliding_window and not args.disable_hybrid_kv_cache_manager and connectors.supports_hma
    refusal = nixl_pipeline_refusal(args.pipeline_parallel_size, hybrid, connectors.role == "kv_consumer")
    if refusal and NIXL in connectors.names():
        raise ConfigError(refusal)
    if not hybrid or connectors.offload is None:
        return
    if explicit:
        raise ConfigError("--enable-hybrid-kv-cache-manager with KV offloading is not simulated for a model with "
                          "sliding-window layers: the emulator's offload tiers keep one KV cache group (vLLM's "
                          "OffloadingConnector keeps the hybrid groups); drop the flag to run one group")
    _log().warning("KV offloading on %s runs one KV cache group here, of blocks sized as vLLM's hybrid ones, which "
                   "a request takes for its full-attention layers only: vLLM's OffloadingConnector keeps the hybrid "
                   "groups of its sliding-window and full-attention layers, which is not simulated", model.name)


def allow_long_max_model_len() -> bool:
    """vLLM's VLLM_ALLOW_LONG_MAX_MODEL_LEN (envs.py): "1" or "true" (any case) turns the refusal into a warning."""
    return os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "0").strip().lower() in ("1", "true")


def _long_max_model_len(max_model_len: int, model: ModelSpec) -> None:
    """vLLM's check of a --max-model-len past the model's (ModelConfig's _get_and_verify_max_len): refused,
    or only warned of under VLLM_ALLOW_LONG_MAX_MODEL_LEN. A config.json's model_max_length is not read
    here (None: as in the configs of the models shipped)."""
    msg = (f"User-specified max_model_len ({max_model_len}) is greater than the derived max_model_len "
           f"(max_position_embeddings={model.max_position_embeddings} or model_max_length=None in model's "
           "config.json).")
    warning = ("VLLM_ALLOW_LONG_MAX_MODEL_LEN must be used with extreme caution. If the model uses relative "
               "position encoding (RoPE), positions exceeding derived_max_model_len lead to nan. If the model "
               "uses absolute position encoding, positions exceeding derived_max_model_len will cause a CUDA "
               "array out-of-bounds error.")
    if not allow_long_max_model_len():
        raise ConfigError(f"{msg} To allow overriding this maximum, set the env var "
                          f"VLLM_ALLOW_LONG_MAX_MODEL_LEN=1. {warning}")
    _log().warning("%s %s", msg, warning)


def _check_kv_cache_dtype(kv_cache_dtype: str, model: ModelSpec, pipeline_parallel_size: int = 1) -> None:
    """vLLM's checks of --kv-cache-dtype: CacheConfig's known values, and VllmConfig's
    _reject_mismatched_float_kv_cache (an explicit float16 / bfloat16 must be the model's dtype)."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ConfigError(f"Invalid kv_cache_dtype: {kv_cache_dtype!r}. Valid values are: {list(KV_CACHE_DTYPES)}")
    # Accepted where vLLM fails only on the GPU, at start-up, when its attention selector finds no backend
    # (the memory plan prices the page vLLM's spec would have): nvfp4 / nvfp4_4over6 away from Blackwell
    # (FlashInfer's TRT-LLM kernels, SM100 family), fp8_ds_mla / nvfp4_ds_mla without a sparse MLA model
    # (FlashMLA / FlashInfer sparse MLA), *_per_token_head and the packed dtypes on an MLA model (Triton and
    # TurboQuant attention are not MLA backends), ultraquant_4bit on any NVIDIA GPU (its backend is in ROCm's
    # list only), turboquant_* on Blackwell (its boundary layers' FlashInfer shares no KV layout with it),
    # fp8_inc (Intel Gaudi's: no CUDA attention backend lists it).
    if kv_cache_dtype.startswith(_UNPRICED_KV_DTYPES):
        raise ConfigError(f"kv_cache_dtype {kv_cache_dtype!r} is not simulated: the emulator has no price for "
                          "its packed Octave layout (vLLM's ROCM_OCTAVE attention, ROCm only)")
    if kv_cache_dtype in PACKED_KV_DTYPES and 0 < model.num_sliding_layers:
        raise ConfigError(f"kv_cache_dtype {kv_cache_dtype!r} is not simulated for a model with sliding-window "
                          "layers: vLLM pads its unpacked boundary and sliding pages into the packed layers' "
                          "block, which the emulator's hybrid KV groups do not lay out")
    if kv_cache_dtype in PACKED_KV_DTYPES and pipeline_parallel_size > 1:
        raise ConfigError(f"kv_cache_dtype {kv_cache_dtype!r} is not simulated with pipeline parallelism: vLLM "
                          "sizes each stage's block with the backend of the stage's first layer (unpacked on the "
                          "first stage, packed on the others), and the emulator runs one block size")
    if kv_cache_dtype in ("float16", "bfloat16"):
        model_dtype = _FLOAT_NAMES.get(model.dtype, model.dtype)
        if model_dtype != kv_cache_dtype:
            allowed = f"`auto` or `{model_dtype}`" if model_dtype in ("float16", "bfloat16") else "`auto`"
            raise ConfigError(f'kv_cache_dtype="{kv_cache_dtype}" is incompatible with dtype="{model_dtype}". '
                              f"Please set `--kv-cache-dtype` to {allowed}.")


def _check(args: EngineArgs, max_model_len: int, max_num_seqs: int, max_batched: int, model: ModelSpec) -> None:
    if max_num_seqs < 1 or max_batched < 1:
        raise ConfigError("max_num_seqs and max_num_batched_tokens must be at least 1")
    if max_batched < max_num_seqs:
        raise ConfigError(
            f"max_num_batched_tokens ({max_batched}) must be greater than or equal to "
            f"max_num_seqs ({max_num_seqs}).")
    if not args.enable_chunked_prefill and max_batched < max_model_len:
        raise ConfigError(
            f"max_num_batched_tokens ({max_batched}) is smaller than max_model_len ({max_model_len}). "
            "This effectively limits the maximum sequence length to max_num_batched_tokens and makes vLLM "
            "reject longer sequences. Please increase max_num_batched_tokens or decrease max_model_len.")
    if args.long_prefill_token_threshold > max_model_len:  # vLLM's SchedulerConfig.verify_max_model_len
        raise ConfigError(f"long_prefill_token_threshold ({args.long_prefill_token_threshold}) cannot be greater "
                          f"than the max_model_len ({max_model_len}).")
    _check_kv_cache_dtype(args.kv_cache_dtype, model, args.pipeline_parallel_size)
    if args.block_size not in (1, 8, 16, 32, 64, 128, 256):
        raise ConfigError(f"block_size must be one of 1, 8, 16, 32, 64, 128, 256; got {args.block_size}")
    if not 0.0 < args.gpu_memory_utilization <= 1.0:
        raise ConfigError(f"gpu_memory_utilization must be in (0, 1]; got {args.gpu_memory_utilization}")
    if args.prefix_caching_hash_algo not in HASH_ALGOS:
        raise ConfigError(f"prefix_caching_hash_algo must be one of {', '.join(HASH_ALGOS)}; "
                          f"got {args.prefix_caching_hash_algo!r}")
    if not hash_algo_available(args.prefix_caching_hash_algo) and (
            args.enable_prefix_caching or args.kv_transfer_config or args.kv_offloading_size):
        raise ConfigError(XXHASH_MISSING)  # vLLM's engine hashes blocks then, and fails to start without xxhash
    if args.scheduling_policy not in ("fcfs", "priority"):
        raise ConfigError(f"scheduling_policy must be 'fcfs' or 'priority'; got {args.scheduling_policy!r}")
    for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"{name} must be at least 1")
    if model.num_heads % args.tensor_parallel_size:
        raise ConfigError(
            f"Total number of attention heads ({model.num_heads}) must be divisible by tensor parallel "
            f"size ({args.tensor_parallel_size}).")
    if model.is_moe and model.weight_block_size and not args.enable_expert_parallel:
        # Block-FP8 experts split over TP (x DP, without EP) need whole scale blocks in each rank's slice,
        # as vLLM's fp8 MoE checks at load.
        block_n, block_k = model.weight_block_size
        per_rank = model.moe_intermediate_size // (args.tensor_parallel_size * args.data_parallel_size)
        if per_rank % block_n:
            raise ConfigError(
                f"The output_size of gate's and up's weight = {per_rank} is not divisible by weight "
                f"quantization block_n = {block_n}.")
        if args.tensor_parallel_size > 1 and per_rank % block_k:
            raise ConfigError(
                f"The input_size of down's weight = {per_rank} is not divisible by weight quantization "
                f"block_k = {block_k}.")
    if args.kv_offloading_size is not None and not args.kv_offloading_size > 0:
        raise ConfigError(f"kv_offloading_size must be a positive number of GiB; got {args.kv_offloading_size}")
    if args.kv_offloading_backend not in ("native", "lmcache"):
        raise ConfigError(f"kv_offloading_backend must be 'native' or 'lmcache'; got {args.kv_offloading_backend!r}")
    if model.num_layers < args.pipeline_parallel_size:
        raise ConfigError(
            f"pipeline_parallel_size ({args.pipeline_parallel_size}) exceeds the number of layers "
            f"({model.num_layers}).")


def lora_config(args: EngineArgs, model: ModelSpec) -> LoRAConfig | None:
    """vLLM's LoRAConfig for --enable-lora (None without it: the other LoRA flags are then ignored, as by
    vLLM), checked as its pydantic config and LoRA layers check it, with their messages."""
    if not args.enable_lora:
        return None
    errors = []
    if args.max_lora_rank not in MAX_LORA_RANKS:
        choices = ", ".join(map(str, MAX_LORA_RANKS[:-1])) + f" or {MAX_LORA_RANKS[-1]}"
        errors.append(("max_lora_rank", f"Input should be {choices}", "literal_error", repr(args.max_lora_rank),
                       type(args.max_lora_rank).__name__))
    if args.max_loras < 1:
        errors.append(("max_loras", "Input should be greater than or equal to 1", "greater_than_equal",
                       repr(args.max_loras), type(args.max_loras).__name__))
    if errors:
        raise _pydantic_error(errors, "LoRAConfig")
    max_cpu_loras = args.max_cpu_loras if args.max_cpu_loras and args.max_cpu_loras > 0 else args.max_loras
    if max_cpu_loras < args.max_loras:
        raise _pydantic_error([("", f"Value error, max_cpu_loras ({max_cpu_loras}) must be >= max_loras "
                                    f"({args.max_loras}).", "value_error", "ArgsKwargs(...)", "ArgsKwargs")],
                              "LoRAConfig")
    if model.vocab_size > MAX_LORA_VOCAB:
        raise ConfigError(f"When using LoRA, vocab size must be <= {MAX_LORA_VOCAB}")
    return LoRAConfig(args.max_loras, args.max_lora_rank, max_cpu_loras)


KV_ROLES = ("kv_producer", "kv_both", "kv_consumer")  # vLLM's KVRole, in its order
KV_LOAD_FAILURE_POLICIES = ("recompute", "fail")
DEFAULT_KV_LOAD_FAILURE_POLICY = "fail"  # vLLM 0.33's default: a failed KV load ends the request with an error
DEFAULT_KV_LEASE_DURATION = 30  # NixlConnector's kv_connector_extra_config.kv_lease_duration, in seconds
MOONCAKE_ABORT_REQUEST_TIMEOUT = 480  # VLLM_MOONCAKE_ABORT_REQUEST_TIMEOUT's default: its prefill side's lease
# vLLM's KVTransferConfig fields -> (the type its pydantic dataclass checks: a tuple is a Literal's values,
# whether None is accepted)
_KV_TRANSFER_FIELDS = {
    "kv_connector": (str, True), "engine_id": (str, True), "kv_buffer_device": (str, False),
    "kv_role": (KV_ROLES, True), "kv_port": (int, False), "kv_connector_extra_config": (dict, False),
    "kv_connector_module_path": (str, True), "enable_permute_local_kv": (bool, False),
    "kv_load_failure_policy": (KV_LOAD_FAILURE_POLICIES, False),
}


def _pydantic_error(errors: list[tuple[str, str, str, str, str]], title: str = "KVTransferConfig") -> ConfigError:
    """vLLM's error for a bad KVTransferConfig, worded as pydantic words it: one entry per (field, message,
    error type, input's repr, input's type). `title`: the class pydantic names, VllmConfig for what only
    fails when vLLM builds its whole config (a MultiConnector's children, the connector's name)."""
    lines = [f"{len(errors)} validation error{'s' if len(errors) > 1 else ''} for {title}"]
    for name, message, kind, value, value_type in errors:
        if name:
            lines.append(name)
        lines.append(f"  {message} [type={kind}" + (f", input_value={value}" if value else "")
                     + f", input_type={value_type}]")
    return ConfigError("\n".join(lines))


def _vllm_config_error(message: str) -> ConfigError:
    """A ValueError vLLM raises while it builds its VllmConfig, as pydantic reports it."""
    return _pydantic_error([("", f"Value error, {message}", "value_error", "", "ArgsKwargs")], "VllmConfig")


def _field_error(expected: object, value: object) -> tuple[str, str] | None:
    """(message, pydantic error type) when `value` is not what a field of type `expected` takes (pydantic's
    lax mode: numeric strings are integers, "true"/"false"/0/1 are booleans), else None."""
    if isinstance(expected, tuple):
        if value in expected and isinstance(value, str):
            return None
        choices = [repr(c) for c in expected]
        return f"Input should be {', '.join(choices[:-1])} or {choices[-1]}", "literal_error"
    if expected is str:
        return None if isinstance(value, str) else ("Input should be a valid string", "string_type")
    if expected is dict:
        return None if isinstance(value, dict) else ("Input should be a valid dictionary", "dict_type")
    if expected is bool:
        if isinstance(value, (int, float)) and value in (0, 1):
            return None
        if isinstance(value, str):
            if value.lower() in ("0", "off", "f", "false", "n", "no", "1", "on", "t", "true", "y", "yes"):
                return None
            return "Input should be a valid boolean, unable to interpret input", "bool_parsing"
        return "Input should be a valid boolean", "bool_type"
    # int
    if isinstance(value, int):
        return None
    if isinstance(value, float):
        return None if value.is_integer() else ("Input should be a valid integer, got a number with a "
                                                "fractional part", "int_from_float")
    if isinstance(value, str):
        try:
            int(value.strip())
            return None
        except ValueError:
            return "Input should be a valid integer, unable to parse string as an integer", "int_parsing"
    return "Input should be a valid integer", "int_type"


def _check_fields(config: object, title: str) -> dict:
    """A KVTransferConfig's fields, checked as vLLM's pydantic dataclass checks them (extra fields
    forbidden, field types, kv_role with a connector)."""
    if not isinstance(config, dict):
        raise ConfigError(f"{'--kv-transfer-config' if title == 'KVTransferConfig' else 'a MultiConnector child'} "
                          "must be a JSON object")
    errors = []
    for name, value in config.items():
        if name not in _KV_TRANSFER_FIELDS:
            errors.append((name, "Unexpected keyword argument", "unexpected_keyword_argument", repr(value),
                           type(value).__name__))
            continue
        expected, nullable = _KV_TRANSFER_FIELDS[name]
        problem = None if value is None and nullable else _field_error(expected, value)
        if problem is not None:
            errors.append((name, *problem, repr(value), type(value).__name__))
    if errors:
        raise _pydantic_error(errors, title)
    if config.get("kv_connector") is not None and config.get("kv_role") is None:
        raise _pydantic_error([("", "Value error, Please specify kv_role when kv_connector is set, supported "
                                    f"roles are {KV_ROLES}", "value_error", f"ArgsKwargs((), {config!r})",
                                "ArgsKwargs")], title)
    return config


def parse_kv_transfer_config(text: str) -> dict:
    """vLLM's KVTransferConfig from --kv-transfer-config's JSON, checked as vLLM checks it when it reads
    the flag. Which connector it names is checked once the offloading flags are applied (`kv_connectors`):
    --kv-offloading-size replaces it, so vLLM never looks at it then."""
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"--kv-transfer-config is not valid JSON: {exc}") from None
    _check_lease(_check_fields(config, "KVTransferConfig"))
    return config


def kv_connectors(args: EngineArgs) -> KVConnectors:
    """The KV connectors vLLM 0.33 runs for these arguments (emulator.kv_connectors), checked as vLLM
    checks them while it builds its config and starts its connectors, plus what the emulator simulates.
    Warns when --kv-offloading-size replaces a P/D connector: that instance does no P/D, as in vLLM."""
    given = parse_kv_transfer_config(args.kv_transfer_config) if args.kv_transfer_config is not None else None
    resolved = with_offloading(given, args.kv_offloading_size, args.kv_offloading_backend)
    if resolved is None:
        return NO_KV_CONNECTORS
    _check_connectors(resolved, given is not resolved, args.block_size)
    connectors = split(given, resolved, args.kv_offloading_size, args.block_size)
    if connectors.replaced:
        _log().warning("--kv-offloading-size replaces --kv-transfer-config's %s with %s (kv_role kv_both), as vLLM "
                    "0.33 does: this instance does no P/D. For P/D with KV offloading, drop --kv-offloading-size and "
                    "make kv_connector a MultiConnector whose kv_connector_extra_config.connectors lists the %s "
                    "config, then {\"kv_connector\": \"OffloadingConnector\", \"kv_role\": \"kv_both\", "
                    "\"kv_connector_extra_config\": {\"cpu_bytes_to_use\": BYTES}}.", connectors.replaced,
                    connectors.connector, connectors.replaced)
    return connectors


def _check_connectors(transfer: dict, by_flags: bool, block_size: int) -> None:
    """The connector names of a resolved KVTransferConfig, a MultiConnector's children (each a
    KVTransferConfig of its own), and the extra config of the connectors the emulator simulates.
    `by_flags`: --kv-offloading-size chose the connector."""
    name = transfer.get("kv_connector")
    if name is None:  # KVTransferConfig takes a kv_role alone; vLLM fails when it looks the connector up
        raise _vllm_config_error("Connector name is not set in KVTransferConfig")
    if name == LMCACHE_MP and by_flags:
        return  # --kv-offloading-backend lmcache: the emulator's node pool
    _check_name(name)
    if name == MULTI:
        connectors = transfer.get("kv_connector_extra_config", {}).get("connectors")
        if not isinstance(connectors, list):
            raise ConfigError("MultiConnector: kv_connector_extra_config.connectors must be a list of KV connector "
                              f"configs (KVTransferConfig fields); got {connectors!r}")
        kinds = []
        for child in connectors:
            child_name = _check_fields(child, "VllmConfig").get("kv_connector")
            if child_name is None:
                raise _vllm_config_error("Connector name is not set in KVTransferConfig")
            _check_name(child_name)
            _check_lease(child)
            if child_name == MULTI:
                raise ConfigError("MultiConnector: a MultiConnector inside another is not simulated")
            kinds.append("pd" if child_name in PD_CONNECTORS else "offload")
        if kinds.count("pd") > 1 or kinds.count("offload") > 1:
            raise ConfigError(f"MultiConnector: {', '.join(c['kv_connector'] for c in connectors)}: the emulator "
                              "simulates one P/D connector and one OffloadingConnector at most")
        if kinds == ["offload", "pd"]:  # vLLM loads from the first child that has the tokens
            raise ConfigError("MultiConnector: the emulator loads a request's KV from its P/D connector ahead of "
                              "the OffloadingConnector; list the P/D connector first")
    for child in children(transfer):
        if child.get("kv_connector") in OFFLOAD_CONNECTORS:
            _check_offloading(child.get("kv_connector_extra_config", {}), block_size)


def _check_lease(config: dict) -> None:
    """The emulator's check of a P/D connector's kv_lease_duration (NIXL's; a number of seconds)."""
    lease = config.get("kv_connector_extra_config", {}).get("kv_lease_duration", DEFAULT_KV_LEASE_DURATION)
    if isinstance(lease, bool) or not isinstance(lease, (int, float)) or not lease > 0:
        raise ConfigError(f"kv_connector_extra_config.kv_lease_duration must be a positive number of seconds; "
                          f"got {lease!r}")


def _check_name(name: str) -> None:
    if name not in VLLM_CONNECTORS:
        raise _vllm_config_error(f"Unsupported connector type: {name}")
    if name == LMCACHE_MP:
        raise ConfigError("kv_connector 'LMCacheMPConnector' is simulated through --kv-offloading-size N "
                          "--kv-offloading-backend lmcache (N GiB: the LMCache pool of the node)")
    if name not in SIMULATED:
        raise ConfigError(f"kv_connector {name!r} is not simulated; choose one of {', '.join(SIMULATED)}")


def _check_offloading(extra: dict, block_size: int) -> None:
    """OffloadingConnector's kv_connector_extra_config, as vLLM's CPU offloading reads it at start-up
    (kv_offload/cpu/spec.py, offloading/config.py), with vLLM's messages."""
    if not extra.get("cpu_bytes_to_use"):
        raise ConfigError("cpu_bytes_to_use must be specified in kv_connector_extra_config")
    cpu_bytes = _integer(extra, "cpu_bytes_to_use")
    if cpu_bytes <= 0:
        raise ConfigError(f"kv_connector_extra_config.cpu_bytes_to_use must be a positive number of bytes; "
                          f"got {extra['cpu_bytes_to_use']!r}")
    if extra.get("blocks_per_chunk") is not None and extra.get("block_size") is not None:
        raise ConfigError("Specify only one of 'block_size' or 'blocks_per_chunk' in kv_connector_extra_config.")
    chunk_blocks, chunk_tokens = _integer(extra, "blocks_per_chunk"), _integer(extra, "block_size")
    if chunk_blocks is not None and chunk_blocks <= 0:
        raise ConfigError("'blocks_per_chunk' must be greater than 0.")
    if chunk_tokens is not None and (chunk_tokens <= 0 or chunk_tokens % block_size):
        rounded = max(block_size, -(-chunk_tokens // block_size) * block_size)
        raise ConfigError(f"'block_size'={chunk_tokens} in kv_connector_extra_config must be a multiple of the GPU "
                          f"KV cache block size ({block_size} tokens). Use {rounded} instead, or set "
                          "'blocks_per_chunk' to express the chunk size in blocks.")
    spec = extra.get("spec_name", "CPUOffloadingSpec")
    if spec != "CPUOffloadingSpec":
        raise ConfigError(f"kv_connector_extra_config.spec_name {spec!r} is not simulated (CPUOffloadingSpec is)")
    policy = extra.get("eviction_policy", "lru")
    if policy not in EVICTION_POLICIES:
        if extra.get("cache_policy_module_path") is None:
            raise ConfigError(f"Unknown cache policy: {policy!r}. Supported: {list(EVICTION_POLICIES)}. For an "
                              "out-of-tree policy, also set cache_policy_module_path.")
        raise ConfigError(f"kv_connector_extra_config.eviction_policy {policy!r} (an out-of-tree cache policy) is "
                          f"not simulated ({' and '.join(EVICTION_POLICIES)} are)")
    for key in ("store_threshold", "max_tracker_size"):  # vLLM takes int() of both at start-up
        if key in extra and _integer(extra, key) is None:
            raise ConfigError(f"kv_connector_extra_config.{key} must be an integer; got None")
    if (_integer(extra, "sync_load_budget_bytes") or 0) > 0:  # vLLM: int(...), 0 (or less) loads no hit in-step
        raise ConfigError("kv_connector_extra_config.sync_load_budget_bytes (loads within the step) is not "
                          "simulated; leave it 0")


def _integer(extra: dict, key: str) -> int | None:
    """An extra config value as vLLM reads it, int(value) (None when absent)."""
    value = extra.get(key)
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"kv_connector_extra_config.{key} must be an integer; got {value!r}") from None
