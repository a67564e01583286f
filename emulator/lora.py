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
    from emulator.request import Request

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


class PodAdapters:
    """The adapters one vLLM pod serves, as its front end (OpenAIServingModels) keeps them: name -> the
    adapter its requests run with, each `lora_int_id` taken from the pod's own counter (counted from 1; a
    failed load and a resolver attempt take one too, a reload in place keeps its id)."""

    def __init__(self) -> None:
        self.adapters: dict[str, LoRAAdapter] = {}
        self.last_id = 0  # vLLM's lora_id_counter

    def take_id(self) -> int:
        self.last_id += 1
        return self.last_id


class ServedAdapters:
    """The adapters each instance of a cluster serves: what its front door lists and routes by, as a router
    in front of vLLM pods that learns each pod's adapters from its /v1/models routes a request naming one to
    the pods listing it. An instance starts with its `--lora-modules` (extra[LORA_MODULES]), numbered from 1
    in their order as its `vllm serve` loads them; runtime loads change its table (`pod`). Each pod numbers
    its own adapters, so one name may have other ids on other pods (they label KV events; max_loras counts
    a pod's own). The front door's view of an adapter (`get`, `adapters`) is that of the first instance
    serving it; a request runs with the adapter of the instance it is placed on (`bind`). A name no
    instance serves is not routed by (a single deployment's, whose front end keeps its own registry)."""

    def __init__(self) -> None:
        self.pods: dict[str, PodAdapters] = {}  # instance name -> its adapters, in instance order
        self._modules: dict[str, list[LoRAAdapter]] = {}  # instance name -> the adapters it starts with

    @classmethod
    def of(cls, specs) -> ServedAdapters:
        """The adapters of these InstanceSpecs (their extra[LORA_MODULES]), in instance order. ValueError
        when two instances serve one name from two paths or on two base models (a front door that sends a
        name to any of its pods assumes they run the same weights)."""
        served = cls()
        first: dict[str, tuple[str, LoRAAdapter]] = {}  # adapter name -> (the first instance naming it, its adapter)
        for spec in specs:
            pod = served.pod(spec.name)
            for module in spec.extra.get(LORA_MODULES, ()):
                base = module.base_model_name if module.base_model_name in spec.served_model_names \
                    else spec.served_model_names[0]
                adapter = pod.adapters[module.name] = LoRAAdapter(module.name, pod.take_id(), module.path, base)
                instance, other = first.setdefault(module.name, (spec.name, adapter))
                if (other.path, other.base_model_name) != (adapter.path, adapter.base_model_name):
                    raise ValueError(f"instance {spec.name!r} serves LoRA adapter {module.name!r} from "
                                     f"{adapter.path} on {base}, and {instance!r} from {other.path} on "
                                     f"{other.base_model_name}: one name must be one adapter (path and base "
                                     f"model) across the cluster")
            served._modules[spec.name] = list(pod.adapters.values())
        return served

    def pod(self, instance: str) -> PodAdapters:
        """The adapters `instance` (a name) serves now (an empty table for one not met before)."""
        return self.pods.setdefault(instance, PodAdapters())

    def restart(self, instance: str) -> None:
        """`instance` starts afresh (a restored pod): its `--lora-modules` alone, numbered from 1 again."""
        pod = self.pod(instance)
        pod.adapters.clear()
        pod.last_id = 0
        for adapter in self._modules.get(instance, ()):
            pod.adapters[adapter.name] = LoRAAdapter(adapter.name, pod.take_id(), adapter.path,
                                                     adapter.base_model_name)

    @property
    def adapters(self) -> dict[str, LoRAAdapter]:
        """Every adapter served, as the front door lists them: in instance order, each as its first instance
        serves it."""
        out: dict[str, LoRAAdapter] = {}
        for pod in self.pods.values():
            for name, adapter in pod.adapters.items():
                out.setdefault(name, adapter)
        return out

    def get(self, name: str | None) -> LoRAAdapter | None:
        """Adapter `name` as the first instance serving it serves it (None: none does)."""
        if name:
            for pod in self.pods.values():
                if name in pod.adapters:
                    return pod.adapters[name]
        return None

    def serving(self, name: str) -> list[str]:
        """The instances serving adapter `name`, in instance order (none: an adapter unknown here)."""
        return [instance for instance, pod in self.pods.items() if name in pod.adapters]

    def on(self, instances: Collection[str]) -> list[LoRAAdapter]:
        """The adapters any of `instances` (names) serves, as the first of them serving each serves it."""
        out: dict[str, LoRAAdapter] = {}
        for instance, pod in self.pods.items():
            if instance in instances:
                for name, adapter in pod.adapters.items():
                    out.setdefault(name, adapter)
        return list(out.values())

    def admits(self, instance: str, lora: LoRAAdapter | None) -> bool:
        """Whether a request running with `lora` may go to `instance`: it serves the adapter (or the request
        has none, or names one no instance serves)."""
        if lora is None:
            return True
        pod = self.pods.get(instance)
        if pod is not None and lora.name in pod.adapters:
            return True
        return not any(lora.name in other.adapters for other in self.pods.values())

    def bind(self, request: Request, instance: str) -> None:
        """`request` is placed on `instance`: it runs with that pod's adapter of its name (its own id, and
        path: a changed path keys its blocks anew). One the pod no longer serves (unloaded since the request
        was routed) stays as it was, as vLLM's engine keeps running a request's adapter."""
        pod = self.pods.get(instance)
        own = pod.adapters.get(request.lora.name) if pod is not None and request.lora is not None else None
        if own is None or own is request.lora:
            return
        if own.hash_key != request.lora.hash_key:
            request.block_hashes = None
        request.lora = own
