"""One deployment: a model on a device type with vLLM's engine arguments, sized and priced.

`plan_deployment` resolves the engine arguments for the device, sizes the KV cache
the way vLLM does and fits `--max-model-len auto`; the step cost model, which needs
the resolved configuration, is made by the caller's `price` function (the shipped
tables live above the core: profiles.deployment.build_deployment wires them in).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from emulator.config import EngineArgs, EngineConfig, resolve
from emulator.cost.base import CostModel
from emulator.hardware import GiB, DeviceSpec
from emulator.memory import CapacityError, MemoryPlan, plan_memory
from emulator.models import ModelSpec


@dataclass
class Deployment:
    model: ModelSpec
    device: DeviceSpec
    config: EngineConfig
    memory: MemoryPlan
    cost_model: CostModel
    notes: list[str] = field(default_factory=list)  # start-up adjustments worth a log line

    @property
    def num_gpu_blocks(self) -> int:
        return self.memory.num_gpu_blocks

    def startup_lines(self) -> list[str]:
        """What vLLM prints about the KV cache at start-up, plus how steps are priced."""
        tokens, concurrency = self.memory.capacity(self.config.max_model_len, self.config.block_size)
        return [
            f"Memory profiling: {self.memory.describe()}",
            *self.notes,
            f"GPU KV cache size: {tokens:,} tokens, "  # one line, as vLLM 0.33 logs it (update_kv_cache_capacity)
            f"Maximum concurrency for {self.config.max_model_len:,} tokens per request: {concurrency:.2f}x",
            f"Step cost: {self.cost_model.describe()}",
        ]

    @property
    def lockstep_engines(self) -> bool:
        """Data-parallel engines of an MoE model exchange tokens in every MoE layer, so they step together."""
        return self.model.is_moe and self.config.data_parallel_size > 1


def plan_deployment(model: ModelSpec, device: DeviceSpec, args: EngineArgs,
                    price: Callable[[EngineConfig], CostModel], compile_cache: str = "cold") -> Deployment:
    """Resolve, size and price a deployment; `price` makes the cost model for the final configuration."""
    config = resolve(args, model, device)
    memory = plan_memory(model, device, config, compile_cache)
    notes = []
    if config.auto_max_model_len:  # vLLM's --max-model-len auto: the longest context the cache holds
        fitted = memory.fit_max_model_len(config.max_model_len, config.block_size)
        if fitted < 1:
            raise CapacityError("Cannot auto-fit max_model_len: not enough GPU memory available to serve even a "
                                "single token. Try increasing `gpu_memory_utilization`.")
        if fitted < config.max_model_len:
            usable = round((memory.kv_cache_bytes - memory.block_bytes) / GiB, 2)  # vLLM's: less the null block
            notes.append(f"Auto-fit max_model_len: reduced from {config.max_model_len} to {fitted} to fit in "
                         f"available KV cache memory ({usable} GiB GPU)")
        config = replace(config, max_model_len=fitted, auto_max_model_len=False)
    return Deployment(model, device, config, memory, price(config), notes)
