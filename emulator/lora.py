"""LoRA adapters as vLLM 0.33 runs them: the engine's LoRA config, the adapter a request runs with, and the
GPU memory vLLM sets aside for adapter slots.

An adapter is vLLM's LoRARequest as the engine sees it: a name, an integer id the front end assigns
(`lora_int_id`, counted from 1) and a path. The engine uses the id to count the adapters of a batch
(`max_loras` of them at most, `v1/core/sched/scheduler.py`), and the name and path to keep prefix caches
apart: every block of a LoRA request is hashed with the extra key ("lora", name, path)
(`v1/core/kv_cache_utils.py` `_gen_lora_extra_hash_keys`).

Memory (`lora/layers/*.py` `create_lora_weights`): at load time vLLM wraps every linear layer, the
token embedding and the LM head in a LoRA layer holding `max_loras` zeroed slots of `max_lora_rank`
A and B matrices in the model's dtype, allocated with the weights and so taken from the KV cache.
Per rank and slot: a column-parallel layer (q/k/v, gate/up) keeps A whole (rank x input, one per fused
slice) and B sharded (output/tp x rank); a row-parallel one (o, down) keeps A sharded (rank x input/tp)
and B whole (output x rank); the embedding and the LM head keep rank x (vocab + hidden) each. The
experts of a MoE layer hold per-expert slots of their own (`lora/layers/fused_moe.py`, the per-expert 2D
layout): A of gate/up (rank x hidden each) and B of down (hidden x rank) whole, the others sliced to the
rank's intermediate size; the router is a replicated linear layer.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from emulator.config import EngineConfig
    from emulator.models import ModelSpec

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's MaxLoRARanks
MAX_LORA_VOCAB = 258048  # vLLM's LogitsProcessorWithLoRA refuses a larger vocabulary


@dataclass(frozen=True)
class LoRAConfig:
    """vLLM's LoRAConfig, resolved: adapters in one batch, their largest rank, adapters kept in CPU memory."""
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int = 1


@dataclass(frozen=True, slots=True)
class LoRAAdapter:
    """The adapter a request runs with (vLLM's LoRARequest): `lora_id` is the front end's lora_int_id."""
    name: str
    lora_id: int
    path: str
    base_model_name: str | None = None

    @property
    def hash_key(self) -> tuple[str, str, str]:
        """The extra key vLLM hashes each of the request's blocks with."""
        return ("lora", self.name, self.path)


@dataclass(frozen=True)
class LoRAModulePath:
    """One `--lora-modules` entry (vLLM's LoRAModulePath)."""
    name: str
    path: str
    base_model_name: str | None = None
    is_3d_lora_weight: bool = False


def parse_lora_modules(items: Sequence[str]) -> list[LoRAModulePath]:
    """`--lora-modules` as vLLM's LoRAParserAction reads it: `name=path`, or a JSON object with `name`,
    `path` and optionally `base_model_name`. ValueError with vLLM's message for a bad entry."""
    modules = []
    for item in items:
        if not item:
            continue
        if "=" in item and "," not in item:
            name, path = item.split("=", 1)
            modules.append(LoRAModulePath(name, path))
            continue
        try:
            fields = json.loads(item)
        except json.JSONDecodeError:
            raise ValueError(f"Invalid JSON format for --lora-modules: {item}") from None
        try:
            if not isinstance(fields, dict):
                raise TypeError(f"{LoRAModulePath.__qualname__}() argument after ** must be a mapping, "
                                f"not {type(fields).__name__}")
            modules.append(LoRAModulePath(**fields))
        except TypeError as exc:
            raise ValueError(f"Invalid fields for --lora-modules: {item} - {exc}") from None
    return modules


def adapter_slot_bytes(model: ModelSpec, lora: LoRAConfig, config: EngineConfig) -> int:
    """Bytes of one rank's `max_loras` adapter slots, in the model's dtype (see the module docstring)."""
    r = lora.max_lora_rank
    tp, pp, dp = config.tensor_parallel_size, config.pipeline_parallel_size, config.data_parallel_size
    h, q, kv = model.hidden_size, model.q_size, model.kv_size

    def mlp(width: float) -> float:  # gate_up (two slices of A, B of this rank's rows) and down
        return r * (2 * h + 2 * width / tp) + r * (width / tp + h)

    attention = r * (3 * h + (q + 2 * kv) / tp) + r * (q / tp + h)  # qkv_proj, o_proj
    total = attention * math.ceil(model.num_layers / pp)
    if model.is_moe:  # experts over TP x DP ranks: whole with expert parallelism, each one sliced without
        ranks = tp * dp
        experts, width = ((model.num_experts / ranks, model.moe_intermediate_size) if config.enable_expert_parallel
                          else (model.num_experts, model.moe_intermediate_size / ranks))
        moe = experts * r * (3 * h + 3 * width) + r * (h + model.num_experts)  # the experts, the router
        if model.shared_expert_intermediate_size:
            moe += mlp(model.shared_expert_intermediate_size)
        total += moe * math.ceil(model.num_moe_layers / pp) + mlp(model.intermediate_size) * math.ceil(
            model.num_dense_layers / pp)
    else:
        total += mlp(model.intermediate_size) * math.ceil(model.num_layers / pp)
    total += 2 * r * (model.vocab_size + h)  # token embedding and LM head
    return int(total * lora.max_loras * model.activation_bytes)
