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
from collections.abc import Collection, Sequence
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


LORA_NOT_ENABLED = "LoRA is not enabled. Use --enable-lora to enable LoRA."  # vLLM's engine, adding an adapter
LORA_MODULES = "lora_modules"  # an InstanceSpec.extra key: the instance's `--lora-modules`, LoRAModulePath each


class ServedAdapters:
    """The adapters a cluster serves, and which of its instances serve each: what its front door lists and
    routes by, as a gateway in front of vLLM pods routes a request naming an adapter to the pods whose
    /v1/models list it.

    An adapter has one path and one base model across the cluster (a front door that sends a name to any
    of its pods assumes they run the same weights), and one `lora_int_id`, counted from 1 in the order the
    instances first name the adapters: the ids vLLM pods give when they load their adapters in that order
    (pods listing other subsets number theirs apart; the ids only label KV events, max_loras counts names).
    An adapter unknown here is not routed by (a single deployment's, whose front end keeps its own)."""

    def __init__(self) -> None:
        self.adapters: dict[str, LoRAAdapter] = {}
        self._instances: dict[str, list[str]] = {}  # adapter name -> the instances serving it, in instance order

    @classmethod
    def of(cls, specs) -> ServedAdapters:
        """The adapters of these InstanceSpecs (their extra[LORA_MODULES]), in instance order. ValueError
        when two instances serve one name from two paths or on two base models."""
        served = cls()
        for spec in specs:
            for module in spec.extra.get(LORA_MODULES, ()):
                base = module.base_model_name if module.base_model_name in spec.served_model_names \
                    else spec.served_model_names[0]
                served.add(spec.name, module.name, module.path, base)
        return served

    def add(self, instance: str, name: str, path: str, base_model_name: str) -> LoRAAdapter:
        """`instance` serves adapter `name` from `path` on top of its served model `base_model_name`."""
        adapter = self.adapters.get(name)
        if adapter is None:
            adapter = self.adapters[name] = LoRAAdapter(name, len(self.adapters) + 1, path, base_model_name)
        elif (adapter.path, adapter.base_model_name) != (path, base_model_name):
            first = self._instances[name][0]
            raise ValueError(f"instance {instance!r} serves LoRA adapter {name!r} from {path} on "
                             f"{base_model_name}, and {first!r} from {adapter.path} on {adapter.base_model_name}: "
                             f"one name must be one adapter (path and base model) across the cluster")
        instances = self._instances.setdefault(name, [])
        if instance not in instances:
            instances.append(instance)
        return adapter

    def get(self, name: str | None) -> LoRAAdapter | None:
        return self.adapters.get(name) if name else None

    def serving(self, name: str) -> list[str]:
        """The instances serving adapter `name`, in instance order (none: an adapter unknown here)."""
        return list(self._instances.get(name, ()))

    def on(self, instances: Collection[str]) -> list[LoRAAdapter]:
        """The adapters any of `instances` (names) serves, in the order they were added."""
        return [a for name, a in self.adapters.items() if any(i in instances for i in self._instances[name])]

    def admits(self, instance: str, lora: LoRAAdapter | None) -> bool:
        """Whether a request running with `lora` may go to `instance`: it serves the adapter (or the request
        has none, or names one this table does not route)."""
        return lora is None or lora.name not in self._instances or instance in self._instances[lora.name]
