"""How many KV blocks fit on a device: vLLM's memory profiling, priced from physics.

vLLM (`v1/worker/gpu_worker.py::determine_available_memory`) measures at start-up

    available = ceil(total * gpu_memory_utilization) - weights - activation_peak - non_torch

and divides by the bytes of one block across the layers of a rank. We compute
each term from the model, the device and the engine arguments:

- weights: parameters per rank times their dtype, plus the rotary cos/sin cache, plus with
  --enable-lora the adapter slots vLLM allocates beside them (emulator.lora.adapter_slot_bytes);
- activation peak of the profile run (a `max_num_batched_tokens` forward, then a
  sampler run over `max_num_seqs` rows): the larger of the forward's MLP working
  set and the sampler's logits copies (bf16 logits, fp32 logits, probs and the
  random-sample buffer: 14 bytes per row and vocab entry, plus the Triton
  top-k/top-p scratch of min(2^ceil(log2 SMs), SMs) rows and the cuBLAS
  workspace), plus the fused-MoE workspace of MoE models;
- non-torch growth during profiling (kernel modules, CUDA-graph profiling,
  NCCL buffers with TP): 0.25 GiB on one GPU as vLLM 0.18/0.19 logs show, plus
  NCCL channel buffers per extra rank;
- the cold-compile charge: on the first boot of a shape (a fresh container, the
  way benchmark harnesses start vLLM) torch.compile and Triton autotuning run
  inside the profiled window and their scratch is charged as activation memory
  (vLLM issue #54383, measured on RTX 4090: 0.47 GiB at 3584 tokens x 12800 MLP
  width, i.e. 5.5 copies of the widest MLP activation). It scales with that
  tensor and is absent with a warm compile cache or `--enforce-eager`.

Sources of the constants are the vLLM code and logs named above; none of them is
fitted to a run this project calibrates against.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from emulator.config import EngineConfig
from emulator.hardware import GiB, DeviceSpec
from emulator.lora import adapter_slot_bytes
from emulator.kv_dtypes import kv_slot_bytes, packed_layers
from emulator.models import ModelSpec

MiB = 1 << 20
NON_TORCH_BYTES = int(0.25 * GiB)
NCCL_BYTES_PER_PEER = {"nvlink": int(0.6 * GiB), "other": int(0.1 * GiB)}
COLD_COMPILE_COPIES = 5.5
SAMPLER_BYTES_PER_LOGIT = 14


class CapacityError(ValueError):
    """The model does not fit, or leaves no room for one max_model_len request."""


@dataclass(frozen=True)
class MemoryPlan:
    total_bytes: int
    requested_bytes: int
    weight_bytes: int
    activation_bytes: int
    non_torch_bytes: int
    compile_bytes: int
    available_bytes: int
    block_bytes: int
    num_gpu_blocks: int
    blocks_overridden: bool = False  # --num-gpu-blocks-override set num_gpu_blocks
    groups: KVCacheGroups | None = None  # vLLM's hybrid allocator groups; None: one full-attention group

    @property
    def kv_cache_bytes(self) -> int:
        """The memory the KV cache plans against: the profiled memory, or, with --num-gpu-blocks-override,
        the override times the bytes of a block (vLLM's get_kv_cache_configs)."""
        return self.num_gpu_blocks * self.block_bytes if self.blocks_overridden else self.available_bytes

    def blocks_per_request(self, max_model_len: int, block_size: int) -> int:
        """Blocks one max_model_len request takes from the pool, all groups together."""
        if self.groups is None:
            return cdiv(max_model_len, block_size)
        return self.groups.blocks_per_request(max_model_len, block_size)

    def capacity(self, max_model_len: int, block_size: int) -> tuple[int, float]:
        """vLLM's logged "GPU KV cache size" (tokens) and "Maximum concurrency" (v1/core/kv_cache_utils.py
        get_kv_cache_capacity): the pool's blocks over one max_model_len request's blocks in every group."""
        concurrency = self.num_gpu_blocks / self.blocks_per_request(max_model_len, block_size)
        return int(concurrency * max_model_len), concurrency

    def fit_max_model_len(self, max_model_len: int, block_size: int) -> int:
        """The longest context one request can have (vLLM's --max-model-len auto, _auto_fit_max_model_len):
        its blocks in every group must fit the KV memory less the null block; 0 when not even one token does."""
        usable = self.kv_cache_bytes - self.block_bytes
        if self.groups is None:
            return min(max_model_len, max(usable // self.block_bytes, 0) * block_size)
        return self.groups.max_model_len_within(usable // self.block_bytes, max_model_len, block_size)

    def describe(self) -> str:
        g = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
        return (f"total {g(self.total_bytes)} x utilization = {g(self.requested_bytes)}; "
                f"weights {g(self.weight_bytes)}, "
                f"activation peak {g(self.activation_bytes)}, non-torch {g(self.non_torch_bytes)}, "
                f"compile {g(self.compile_bytes)}; KV cache {g(self.available_bytes)} "
                f"= {max(self.available_bytes // self.block_bytes, 0)} blocks of {self.block_bytes // 1024} KiB"
                + (f", overridden to {self.num_gpu_blocks} blocks ({g(self.kv_cache_bytes)})"
                   if self.blocks_overridden else ""))


def kv_dtype_bytes(model: ModelSpec, kv_cache_dtype: str) -> float:
    """Bytes of the KV cache per K/V value (MLA: per latent value) under `kv_cache_dtype`, scales and packing
    included, averaged over the layers (a packed dtype leaves its boundary layers at the model dtype)."""
    if kv_cache_dtype == "auto":
        return model.activation_bytes
    values = model.kv_lora_rank + model.qk_rope_head_dim if model.is_mla else 2 * model.head_dim
    skipped = packed_layers(model, kv_cache_dtype)
    total = (skipped * kv_slot_bytes(model, "auto")
             + (model.num_layers - skipped) * kv_slot_bytes(model, kv_cache_dtype))
    return total / (model.num_layers * values)


def block_bytes(model: ModelSpec, config: EngineConfig) -> int:
    """Bytes of one KV block on one rank: its layers' K and V. With vLLM's hybrid allocator
    (sliding-window layers beside full ones) a block holds one group's layers: the largest
    group's on the rank with most of them (every rank gets as many blocks as the smallest)."""
    layers = math.ceil(model.num_layers / config.pipeline_parallel_size)
    groups = kv_cache_groups(model, config)
    if groups is not None:
        layers = groups.layers_per_block
    # (else a hybrid model's sliding layers are allocated as full-attention ones, in the one group with the others:
    # vLLM's unify_hybrid_kv_cache_specs with the hybrid KV cache manager off)
    heads = 1 if model.is_mla else model.kv_heads_per_device(config.tensor_parallel_size)
    page = heads * kv_slot_bytes(model, config.kv_cache_dtype) * config.block_size  # one layer's
    skipped = packed_layers(model, config.kv_cache_dtype)
    if skipped and groups is None:
        # every full-attention layer shares one block table, a block's bytes are the sum of the layers' pages
        # (UniformTypeKVCacheSpecs): the boundary layers' at the model dtype (one pipeline stage: config.py)
        full = heads * kv_slot_bytes(model, "auto") * config.block_size
        return skipped * full + (model.num_layers - skipped) * page
    return page * layers


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pp_stage_sizes(num_layers: int, pp: int) -> list[int]:
    """Layers of each pipeline stage (vLLM's get_pp_indices): the remainder goes to the stages before the last."""
    stages = [num_layers // pp] * pp
    for i in range(2, num_layers % pp + 2):
        stages[-i] += 1
    return stages


@dataclass(frozen=True)
class KVCacheGroups:
    """vLLM's KV cache groups for a model mixing sliding-window and full-attention layers
    (v1/core/kv_cache_planning.py _get_kv_cache_groups_uniform_page_size): the layers of each kind
    are split into groups of equal size, each group with its own block table, all drawn from one
    pool of blocks sized for one group's layers. A sliding group frees the blocks that fall out of
    its window (v1/core/single_type_kv_cache_manager.py SlidingWindowManager)."""
    kinds: tuple[str, ...]  # per group, in vLLM's order (that of the groups' first layers): "sliding" | "full"
    sliding_window: int
    layers_per_block: int  # layers of the largest group on the rank holding most of them
    max_in_flight_tokens: int  # tokens scheduled but not yet processed (VllmConfig.max_in_flight_tokens)
    layers: tuple[int, ...] = ()  # per group, its layers over every pipeline stage (what a KV transfer moves)

    def transfer_blocks(self, block_size: int) -> tuple[int, ...]:
        """Per group, the most blocks a P/D connector moves of a request (0: all it has): a sliding group's
        in-window tail, cdiv(window, block_size) + 1 for a window that starts mid-block (NIXL's and Mooncake's
        blocks_per_sw, nixl/base_scheduler.py get_exchange_clipped_blocks)."""
        tail = cdiv(self.sliding_window, block_size) + 1
        return tuple(tail if kind == "sliding" else 0 for kind in self.kinds)

    def sliding_blocks_per_request(self, max_model_len: int, block_size: int) -> int:
        """A sliding group's admission cap (SlidingWindowSpec.max_admission_blocks_per_request): the window
        less one plus the tokens in flight, and one block more for a window that starts mid-block."""
        return cdiv(min(self.sliding_window - 1 + self.max_in_flight_tokens, max_model_len), block_size) + 1

    def blocks_per_request(self, max_model_len: int, block_size: int) -> int:
        sliding = self.sliding_blocks_per_request(max_model_len, block_size)
        full = cdiv(max_model_len, block_size)
        return sum(sliding if kind == "sliding" else full for kind in self.kinds)

    def max_model_len_within(self, blocks: int, max_model_len: int, block_size: int) -> int:
        """The longest context (at most `max_model_len`) whose blocks in every group fit `blocks`: vLLM's
        binary search (_estimate_max_model_len_from_groups); 0 when not even one token fits."""
        if self.blocks_per_request(1, block_size) > blocks:
            return 0
        low, high = 1, max_model_len
        while low < high:
            mid = (low + high + 1) // 2
            if self.blocks_per_request(mid, block_size) <= blocks:
                low = mid
            else:
                high = mid - 1
        return low


def kv_cache_groups(model: ModelSpec, config: EngineConfig) -> KVCacheGroups | None:
    """vLLM's hybrid KV cache groups for a model with both sliding-window and full-attention layers; None (one
    group) for any other model, and where vLLM's hybrid KV cache manager is off (--disable-hybrid-kv-cache-manager,
    or KV connectors that do not support it: EngineConfig.hybrid_kv_cache_manager). The memory plan and the
    logged capacity follow them; with KV offloading an engine still runs one group of blocks that size
    (`engine_kv_groups`)."""
    if not model.mixes_sliding_window or not config.hybrid_kv_cache_manager:
        return None
    types = model.layer_types or ("sliding_attention",) * model.num_layers
    by_kind: dict[str, list[int]] = {}  # in the order of each kind's first layer, as vLLM groups them
    for i, t in enumerate(types):
        by_kind.setdefault("sliding" if t == "sliding_attention" else "full", []).append(i)
    sizes = [len(layers) for layers in by_kind.values()]
    group_size = max(sizes) if max(sizes) < min(sizes) * 1.5 else min(sizes)  # vLLM pads the smaller kind
    groups = []  # (kind, its layers): group i of a kind takes every n-th layer from the i-th
    for kind, layers in by_kind.items():
        n = cdiv(len(layers), group_size)
        groups += [(kind, layers[i::n]) for i in range(n)]
    pp = config.pipeline_parallel_size
    per_stage, start = [], 0
    for n in pp_stage_sizes(len(types), pp):
        per_stage.append(max(sum(start <= layer < start + n for layer in layers) for _, layers in groups))
        start += n
    concurrent = pp + 1 if config.async_scheduling else pp  # VllmConfig.max_concurrent_batches
    return KVCacheGroups(tuple(kind for kind, _ in groups), model.sliding_window, max(per_stage),
                         concurrent * config.max_num_batched_tokens, tuple(len(layers) for _, layers in groups))


def engine_kv_groups(groups: KVCacheGroups | None, config: EngineConfig) -> KVCacheGroups | None:
    """The KV cache groups an engine runs: vLLM's (`kv_cache_groups`), but one group with KV offloading, whose
    tiers store one group's blocks here (vLLM's OffloadingConnector offloads per group: not simulated); its blocks
    keep vLLM's size, and a request takes them for its full-attention layers only."""
    return None if config.kv_connectors.offload else groups


def weight_bytes_per_rank(model: ModelSpec, config: EngineConfig) -> int:
    """With data parallelism vLLM shards an MoE model's experts over all TP x DP ranks
    (split whole with expert parallelism, each one sliced without); the rest over TP."""
    tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
    total = model.weight_bytes()
    if model.is_moe:
        experts = model.expert_weight_bytes()
        total = (total - experts) / tp + experts / (tp * config.data_parallel_size)
    else:
        total /= tp
    rotary_dim = model.qk_rope_head_dim or model.head_dim
    rope_cache = model.max_position_embeddings * rotary_dim * model.activation_bytes
    return int(total / pp + rope_cache)


def activation_peak(model: ModelSpec, device: DeviceSpec, config: EngineConfig) -> int:
    tokens, seqs, tp = config.max_num_batched_tokens, config.max_num_seqs, config.tensor_parallel_size
    act = model.activation_bytes
    vocab = model.vocab_size / tp
    cublas = 32 * MiB if device.arch.startswith("sm") and int(device.arch[2:]) >= 90 else 8_519_680
    sms = max(device.sm_count, 1)
    triton_rows = min(1 << (min(sms, seqs) - 1).bit_length(), sms)
    hidden = model.hidden_size
    sampler = (seqs * vocab * SAMPLER_BYTES_PER_LOGIT + triton_rows * vocab * 4
               + tokens * hidden * act + 2 * seqs * hidden * act + cublas)
    mlp_width = max(model.intermediate_size if not model.is_moe or model.num_dense_layers else 0,
                    model.shared_expert_intermediate_size) / tp
    forward = tokens * 3 * mlp_width * act + 4 * tokens * hidden * act + cublas
    peak = max(sampler, forward)
    if model.is_moe:  # fused-MoE workspaces, sized for all tokens gathered over the DP group
        gathered = tokens * (config.data_parallel_size if config.enable_expert_parallel else 1)
        k, width = model.num_experts_per_tok, model.moe_intermediate_size / tp
        peak += gathered * k * (max(width, hidden) + max(2 * width, hidden)) * act
    return int(peak)


def compile_charge(model: ModelSpec, config: EngineConfig, compile_cache: str) -> int:
    if compile_cache == "warm" or config.enforce_eager:
        return 0
    width = max(model.intermediate_size if not model.is_moe
                else model.moe_intermediate_size * model.num_experts_per_tok,
                model.hidden_size) / config.tensor_parallel_size
    return int(COLD_COMPILE_COPIES * config.max_num_batched_tokens * width * model.activation_bytes)


def plan_memory(model: ModelSpec, device: DeviceSpec, config: EngineConfig,
                compile_cache: str = "cold") -> MemoryPlan:
    """Size the KV cache the way vLLM does at start-up (see the module docstring)."""
    if compile_cache not in ("cold", "warm"):
        raise ValueError(f"compile_cache must be cold or warm; got {compile_cache!r}")
    blk = block_bytes(model, config)
    requested = math.ceil(device.memory_bytes * config.gpu_memory_utilization)
    weights = weight_bytes_per_rank(model, config)
    if config.lora is not None:
        weights += adapter_slot_bytes(model, config.lora, config)
    activation = activation_peak(model, device, config)
    peers = config.tensor_parallel_size * config.pipeline_parallel_size - 1
    link = "nvlink" if device.interconnect.name.startswith("nvlink") else "other"
    non_torch = NON_TORCH_BYTES + peers * NCCL_BYTES_PER_PEER[link]
    compile_bytes = compile_charge(model, config, compile_cache)
    if config.kv_cache_memory_bytes:
        available = config.kv_cache_memory_bytes
    else:
        available = requested - weights - activation - non_torch - compile_bytes
    blocks = config.num_gpu_blocks_override or max(int(available // blk), 0)
    groups = kv_cache_groups(model, config)
    plan = MemoryPlan(device.memory_bytes, requested, weights, activation, non_torch, compile_bytes,
                      available, blk, blocks, bool(config.num_gpu_blocks_override), groups)
    if available <= 0 and not config.num_gpu_blocks_override:
        raise CapacityError(
            "No available memory for the cache blocks. Try increasing `gpu_memory_utilization` when initializing "
            "the engine (this flag also controls CPU memory reservation on the CPU backend, despite its name). "
            "See https://docs.vllm.ai/en/latest/configuration/conserving_memory/ for more details. "
            f"(Simulated: {model.name} needs {weights / GiB:.2f} GiB of weights per GPU; {device.name} offers "
            f"{requested / GiB:.2f} GiB at gpu_memory_utilization={config.gpu_memory_utilization}: use more GPUs "
            "with tensor parallelism, or a larger device.)")
    max_tokens = (blocks - 1) * config.block_size  # block 0 is the null block: a longer request could never run
    too_long = config.max_model_len > max_tokens
    if groups is not None:  # a request takes blocks in every group (_max_memory_usage_bytes_from_groups)
        max_tokens = plan.fit_max_model_len(config.max_model_len, config.block_size)
        too_long = plan.blocks_per_request(config.max_model_len, config.block_size) * blk > plan.kv_cache_bytes - blk
    if too_long and not config.auto_max_model_len:
        # vLLM checks against the KV memory less the null block's, and needs whole blocks for the context
        usable = plan.kv_cache_bytes - blk
        needed = plan.blocks_per_request(config.max_model_len, config.block_size) * blk
        estimate = (f"Based on the available memory, the estimated maximum model length is {max_tokens}. "
                    if max_tokens > 0 else "")
        remedy = ("raise --num-gpu-blocks-override, or pass" if config.num_gpu_blocks_override
                  else "pass --max-model-len auto to fit the context to the KV cache, or")
        raise CapacityError(
            f"To serve at least one request with the model's max seq len ({config.max_model_len}), "
            f"({_gib(needed)} GiB KV cache is needed, which is larger than the available KV cache memory "
            f"({_gib(usable)} GiB). {estimate}Try increasing `gpu_memory_utilization` (which also controls CPU "
            "memory on the CPU backend) or decreasing `max_model_len` when initializing the engine. "
            "See https://docs.vllm.ai/en/latest/configuration/conserving_memory/ for more details. "
            f"(Simulated: {model.name} on {device.name}; {remedy} --max-model-len {max(max_tokens, 1)} or less.)")
    return plan


def _gib(n: int) -> str:
    """vLLM's format_gib: GiB rounded to two places, as Python prints the float."""
    return f"{round(n / GiB, 2)}"
