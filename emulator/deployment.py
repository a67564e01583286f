"""From what a user names (model, hardware, vLLM engine flags) to a runnable simulation."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from emulator.config import EngineArgs, EngineConfig, resolve
from emulator.cost_selection import select_cost_model
from emulator.engine_loop import EngineLoop
from emulator.hardware import GiB, DeviceSpec, load_device
from emulator.instance import Instance
from emulator.memory import CapacityError, MemoryPlan, plan_memory
from emulator.models import ModelSpec, load_model
from emulator.router import Router
from emulator.simulation import Simulation


@dataclass
class Deployment:
    model: ModelSpec
    device: DeviceSpec
    config: EngineConfig
    memory: MemoryPlan
    cost_model: object  # step_time(BatchShape) -> seconds, describe(), extrapolation_counts()
    notes: list[str] = field(default_factory=list)  # start-up adjustments worth a log line

    @property
    def num_gpu_blocks(self) -> int:
        return self.memory.num_gpu_blocks

    def startup_lines(self) -> list[str]:
        """What vLLM prints about the KV cache at start-up, plus how steps are priced."""
        tokens = self.num_gpu_blocks * self.config.block_size
        return [
            f"Memory profiling: {self.memory.describe()}",
            *self.notes,
            f"GPU KV cache size: {tokens:,} tokens",
            f"Maximum concurrency for {self.config.max_model_len:,} tokens per request: "
            f"{tokens / self.config.max_model_len:.2f}x",
            f"Step cost: {self.cost_model.describe()}",
        ]

    @property
    def lockstep_ranks(self) -> bool:
        """Data-parallel ranks of an MoE model exchange tokens in every MoE layer, so they step together."""
        return self.model.is_moe and self.config.data_parallel_size > 1


def build_deployment(model: str, hardware: str, args: EngineArgs | None = None,
                     compile_cache: str = "cold", cost_model: str | None = None) -> Deployment:
    """`cost_model` forces one pricing level ("profiled", "operators", "roofline"); default: the best one."""
    model_spec = load_model(model)
    device = load_device(hardware)
    config = resolve(args or EngineArgs(), model_spec, device)
    memory = plan_memory(model_spec, device, config, compile_cache)
    notes = []
    if config.auto_max_model_len:  # vLLM's --max-model-len auto: the longest context the cache holds
        fitted = min(config.max_model_len, (memory.num_gpu_blocks - 1) * config.block_size)
        if fitted < 1:
            raise CapacityError("Cannot auto-fit max_model_len: not enough GPU memory available to serve even a "
                                "single token. Try increasing `gpu_memory_utilization`.")
        if fitted < config.max_model_len:
            notes.append(f"Auto-fit max_model_len: reduced from {config.max_model_len} to {fitted} to fit in "
                         f"available KV cache memory ({memory.available_bytes / GiB:.2f} GiB)")
        config = replace(config, max_model_len=fitted, auto_max_model_len=False)
    cost = select_cost_model(model_spec, device, config, cost_model, config.moe_backend)
    return Deployment(model_spec, device, config, memory, cost, notes)


def build_simulation(deployment: Deployment, routing: str = "least_loaded") -> Simulation:
    config = deployment.config
    instances = [Instance(i, config, deployment.num_gpu_blocks) for i in range(config.data_parallel_size)]
    if deployment.lockstep_ranks:
        loops = [EngineLoop(instances, deployment.cost_model, config.async_scheduling)]
    else:
        loops = [EngineLoop([i], deployment.cost_model, config.async_scheduling) for i in instances]
    return Simulation(instances, loops, Router(instances, routing))
