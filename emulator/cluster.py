"""A simulated cluster: instances on one virtual clock behind a routing policy, with scheduled faults.

`ClusterSpec` is what a cluster file resolves to (profiles.cluster_file reads the files);
`build_cluster` turns it into a Simulation. Every instance is its own deployment (memory
plan, KV capacity, cost model); engines are numbered across the cluster in instance order.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from emulator.deployment import Deployment
from emulator.engine import Engine
from emulator.engine_loop import EngineLoop
from emulator.instance import Instance, InstanceSpec
from emulator.kv_connectors import nixl_pipeline_refusal
from emulator.kv_tiers import TIER_POLICIES, KVTier, Offload, TierSpec
from emulator.kv_transfer import kv_bytes_per_token
from emulator.lora import LORA_MODULES, LoRAModulePath
from emulator.memory import engine_kv_groups, kv_dtype_bytes
from emulator.simulation import Simulation


@dataclass(frozen=True)
class FaultSpec:
    """Instance `instance` fails at virtual time `at` (and comes back at `restore_at`, if given).
    `reroute`: requests that have produced no token yet go to another instance instead of failing."""
    instance: str
    at: float
    restore_at: float | None = None
    reroute: bool = False

    def __post_init__(self) -> None:
        if not self.at >= 0:
            raise ValueError(f"fault of {self.instance!r}: `at` must be a time >= 0; got {self.at}")
        if self.restore_at is not None and not self.restore_at > self.at:
            raise ValueError(f"fault of {self.instance!r}: `restore_at` ({self.restore_at}) must come after `at` "
                             f"({self.at})")


@dataclass(frozen=True)
class ClusterSpec:
    instances: tuple[InstanceSpec, ...]
    routing: str = "least_loaded"
    routing_params: dict = field(default_factory=dict)
    faults: tuple[FaultSpec, ...] = ()
    nodes: dict = field(default_factory=dict)   # node name -> settings later features read (host memory, power)
    links: tuple = ()                            # links between nodes and devices (bandwidth, latency)
    entry: str = "by_role"                       # where a routed request enters (emulator.simulation.ENTRIES)

    def __post_init__(self) -> None:
        if not self.instances:
            raise ValueError("a cluster needs at least one instance")
        names = [i.name for i in self.instances]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"instance names must be unique; repeated: {', '.join(duplicates)}")
        for fault in self.faults:
            if fault.instance not in names:
                raise ValueError(f"fault names instance {fault.instance!r}, which the cluster does not have")
        for spec in self.instances:  # a P/D pod given by its role alone stands for NIXL (see build_instances)
            config = spec.deployment.config
            if spec.role == "mixed" or config.kv_connectors.pd_connector:
                continue
            refusal = nixl_pipeline_refusal(config.pipeline_parallel_size, spec.deployment.memory.groups is not None,
                                            spec.role == "decode")
            if refusal:
                raise ValueError(f"instance {spec.name!r}: {refusal}")


def build_instances(specs: tuple[InstanceSpec, ...] | list[InstanceSpec], nodes: dict | None = None) -> list[Instance]:
    """Engines and loops for every instance; an MoE data-parallel group steps in lockstep (one loop).
    `nodes`: the cluster's node settings (a CXL tier below the CPU one, the host memory offloading uses)."""
    nodes = nodes or {}
    instances, next_engine = [], 0
    pools: dict[tuple, Offload] = {}
    cxl_shares = _cxl_shares(specs)
    for index, spec in enumerate(specs):
        config = spec.deployment.config
        # A P/D pod given by its role alone stands for NIXL, which keeps vLLM's hybrid KV groups as the memory plan
        # laid them out (memory.kv_cache_groups: one group where the connector or the flags turn them off; the
        # engine runs one group with offloading: memory.engine_kv_groups)
        groups = engine_kv_groups(spec.deployment.memory.groups, config)
        engines = [Engine(next_engine + rank, config, spec.deployment.num_gpu_blocks, groups)
                   for rank in range(config.data_parallel_size)]
        for engine in engines:
            engine.kv.offload = _offload(spec, nodes.get(spec.node, {}), pools, cxl_shares.get(spec.node, 1))
        next_engine += len(engines)
        cost = spec.deployment.cost_model
        if spec.deployment.lockstep_engines:
            loops = [EngineLoop(engines, cost, config.async_scheduling)]
        else:
            loops = [EngineLoop([e], cost, config.async_scheduling) for e in engines]
        instances.append(Instance(index, spec, engines, loops))
    return instances


def _pool_key(spec: InstanceSpec) -> tuple:
    """What the engines sharing one LMCache-like pool have in common: node, model, block size and bytes."""
    d = spec.deployment
    config = d.config
    block_bytes = kv_bytes_per_token(d.model, config.tensor_parallel_size,
                                     kv_dtype_bytes(d.model, config.kv_cache_dtype)) * config.block_size
    return spec.node or spec.name, d.model.name, config.block_size, block_bytes


def _cxl_shares(specs) -> dict[str | None, int]:
    """Per node: how many tier chains offload there (each engine's, or one per shared pool); the node's
    CXL memory is split evenly among them."""
    owners: dict[str | None, set] = {}
    for spec in specs:
        config = spec.deployment.config
        if config.kv_connectors.offload is None:
            continue
        if config.kv_connectors.offload.backend == "lmcache":
            owners.setdefault(spec.node, set()).add(_pool_key(spec))
        else:
            owners.setdefault(spec.node, set()).update((spec.name, rank) for rank in range(config.data_parallel_size))
    return {node: len(chains) for node, chains in owners.items()}


def _offload(spec: InstanceSpec, node: dict, pools: dict[tuple, Offload], cxl_share: int = 1) -> Offload | None:
    """An engine's KV offloading tiers (its OffloadingConnector, as --kv-offloading-size or
    --kv-transfer-config configures it: emulator.kv_connectors): a CPU tier of cpu_bytes_to_use over the
    device's host link, then its share of the node's CXL memory if it has some (`cxl_share`: the chains
    splitting it); with the lmcache backend one pool shared by every instance of the node serving the same
    model with the same blocks."""
    d = spec.deployment
    config = d.config
    settings = config.kv_connectors.offload
    if settings is None:
        return None
    key = _pool_key(spec)
    block_bytes = key[3]
    shared = settings.backend == "lmcache"
    if shared and key in pools:
        return pools[key]
    host = d.device.host_link
    name = "lmcache" if shared else "cpu"
    # over the device's host link, no faster than the node's DRAM when the file gives its bandwidth
    bandwidth = min(host.bandwidth, node.get("host_memory_bandwidth", host.bandwidth))
    tiers = [TIER_POLICIES[settings.eviction_policy](TierSpec(name, settings.capacity_bytes, bandwidth, host.latency),
                                                     block_bytes, settings.blocks_per_chunk)]
    if node.get("cxl_memory"):
        tiers.append(KVTier(TierSpec("cxl", node["cxl_memory"] / cxl_share, node.get("cxl_bandwidth", host.bandwidth),
                                     node.get("cxl_latency", host.latency), "CXL"), block_bytes))
    offload = Offload(tiers, shared, settings.prompt_only, settings.blocks_per_chunk, settings.store_threshold,
                      settings.max_tracker_size, stores_in_flight=not shared, lanes=config.tensor_parallel_size,
                      prefix_caching=config.enable_prefix_caching)
    if shared:
        pools[key] = offload
    return offload


def build_cluster(spec: ClusterSpec) -> Simulation:
    from emulator.routing import make_policy  # only a cluster routes: a deployment starts faster without it
    sim = Simulation(build_instances(spec.instances, spec.nodes), make_policy(spec.routing, **spec.routing_params),
                     spec.links, spec.entry)
    for fault in spec.faults:
        sim.schedule(fault.at, lambda f=fault: sim.fail_instance(f.instance, f.reroute))
        if fault.restore_at is not None:
            sim.schedule(fault.restore_at, lambda f=fault: sim.restore_instance(f.instance))
    return sim


def build_simulation(deployment: Deployment, routing: str = "least_loaded",
                     served_model_names: tuple[str, ...] | None = None,
                     lora_modules: tuple[LoRAModulePath, ...] = ()) -> Simulation:
    """One deployment (one `vllm serve`): its data-parallel engines behind vLLM's balancer
    (`routing`: least_loaded, vLLM's, or round_robin). `lora_modules`: its `--lora-modules`, for a driver
    that takes adapters from the simulation (`Simulation.adapters`; the server keeps its own registry)."""
    names = served_model_names or (deployment.model.name,)
    spec = InstanceSpec("0", deployment, tuple(names), dp_routing=routing,
                        extra={LORA_MODULES: tuple(lora_modules)} if lora_modules else {})
    return Simulation(build_instances([spec]))
