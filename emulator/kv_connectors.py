"""An instance's KV connectors as vLLM 0.33 resolves them, split into what the emulator simulates.

vLLM reads `--kv-transfer-config` into a KVTransferConfig (vllm/config/kv_transfer.py), then VllmConfig
applies the offloading flags (`_post_init_kv_transfer_config`, vllm/config/vllm.py): with
`--kv-offloading-size` set, the connector is REPLACED, whatever it was, by OffloadingConnector (backend
native; its kv_connector_extra_config gains cpu_bytes_to_use, the size in bytes) or LMCacheMPConnector
(backend lmcache), and kv_role becomes kv_both. So `--kv-transfer-config '{"kv_connector":
"NixlConnector", ...}' --kv-offloading-size 8` offloads and does no P/D. P/D with offloading is a
MultiConnector (kv_connector/v1/multi_connector.py): its kv_connector_extra_config.connectors lists
KVTransferConfigs of its own, say NixlConnector then OffloadingConnector, the way llm-d deploys it; a
request's KV is loaded by the first of them that has some, and stored by all.

`KVConnectors` is that resolved config split into the parts the emulator simulates: `pd`, the P/D
connector's own config (emulator.disaggregation moves the KV as it says), and `offload`, the tier a
CPU offloading connector fills (emulator.kv_tiers, built by emulator.cluster).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from emulator.hardware import GiB

NIXL, MOONCAKE, P2P_NCCL, LMCACHE = "NixlConnector", "MooncakeConnector", "P2pNcclConnector", "LMCacheConnectorV1"
OFFLOADING, LMCACHE_MP, MULTI = "OffloadingConnector", "LMCacheMPConnector", "MultiConnector"
PD_CONNECTORS = (NIXL, MOONCAKE, P2P_NCCL, LMCACHE)  # move a prefill's KV to a decode instance
OFFLOAD_CONNECTORS = (OFFLOADING,)                    # copy KV to a CPU tier and load it back
SIMULATED = (*PD_CONNECTORS, OFFLOADING, MULTI)       # what --kv-transfer-config may name
# the connectors vLLM 0.33 registers (KVConnectorFactory); others are "Unsupported connector type"
VLLM_CONNECTORS = frozenset({
    "ExampleConnector", "ExampleHiddenStatesConnector", LMCACHE, LMCACHE_MP, NIXL, "NixlPullConnector",
    "NixlPushConnector", MULTI, "HiSparseConnector", "MoRIIOConnector", OFFLOADING, "DecodeBenchConnector",
    MOONCAKE, "MooncakeStoreConnector", "FlexKVConnectorV1", "SimpleCPUOffloadConnector", "HF3FSKVConnector",
    P2P_NCCL})  # P2pNcclConnector: gone from vLLM 0.33, simulated for older deployments
# the connectors whose class subclasses vLLM's SupportsHMA (kv_connector/v1/base.py): they run with the hybrid KV
# cache manager (nixl/connector.py NixlBaseConnector, mooncake_connector.py, offloading_connector.py; a
# MultiConnector when all its children do). LMCacheConnectorV1, the builtin LMCacheMPConnector and the old
# P2pNcclConnector do not: vLLM turns the hybrid KV cache manager off for them
HMA_CONNECTORS = frozenset({NIXL, "NixlPullConnector", "NixlPushConnector", MOONCAKE, OFFLOADING})
# vLLM's NIXL worker's refusals of pipeline parallelism (see nixl_pipeline_refusal)
NIXL_PP_HMA = ("NixlConnector (pull) does not support pipeline_parallel_size > 1 with hybrid KV cache layouts "
               "(HMA); use NixlPushConnector for PP + HMA.")
NIXL_PP_CONSUMER = "NixlPushConnector consumer (decode) does not support pipeline_parallel_size > 1."
EVICTION_POLICIES = ("lru", "arc")  # OffloadingConnector's eviction_policy: vLLM's CachePolicyFactory, in its order


@dataclass(frozen=True)
class OffloadSpec:
    """The CPU tier an offloading connector fills, per engine (lmcache: one pool per node and model)."""
    backend: str                # native: OffloadingConnector's own tier | lmcache: LMCacheMPConnector's pool
    capacity_bytes: float       # OffloadingConnector's cpu_bytes_to_use; lmcache: --kv-offloading-size
    prompt_only: bool = False   # OffloadingConnector's offload_prompt_only: decode blocks are not stored
    blocks_per_chunk: int = 1   # GPU blocks stored, looked up and loaded as one (its block_size / blocks_per_chunk)
    eviction_policy: str = "lru"  # how its CPU tier evicts: lru | arc (emulator.kv_tiers.TIER_POLICIES)
    store_threshold: int = 0    # a chunk is stored once offered this many times (< 2: at once)
    max_tracker_size: int = 64_000  # the chunks whose offers store_threshold counts


@dataclass(frozen=True)
class KVConnectors:
    """What an instance runs: `transfer`, vLLM's resolved KVTransferConfig as given fields ({}: none);
    `pd`, the P/D connector's own config (the top-level one, or a MultiConnector's child; {}: none);
    `offload`, its CPU tier (None: none); `replaced`, the P/D connector --kv-offloading-size replaced."""
    transfer: dict = field(default_factory=dict)
    pd: dict = field(default_factory=dict)
    offload: OffloadSpec | None = None
    replaced: str | None = None

    @property
    def connector(self) -> str | None:
        """The kv_connector vLLM creates (MultiConnector for several)."""
        return self.transfer.get("kv_connector")

    @property
    def role(self) -> str | None:
        """The resolved kv_role (vLLM's is_kv_consumer and is_kv_producer read it)."""
        return self.transfer.get("kv_role")

    @property
    def pd_connector(self) -> str | None:
        return self.pd.get("kv_connector")

    @property
    def supports_hma(self) -> bool:
        """Whether the connectors run with vLLM's hybrid KV cache manager (KVConnectorFactory.supports_hma_config:
        a MultiConnector only when it has children and every one does); True with none."""
        if not self.transfer:
            return True
        names = self.names()
        return bool(names) and all(name in HMA_CONNECTORS for name in names)

    def names(self) -> tuple[str, ...]:
        """The connectors that run: the kv_connector, or a MultiConnector's children in order."""
        return tuple(c.get("kv_connector") for c in children(self.transfer)) if self.transfer else ()


NO_KV_CONNECTORS = KVConnectors()


def nixl_pipeline_refusal(pipeline_parallel_size: int, hybrid: bool, consumer: bool) -> str | None:
    """Why vLLM's NIXL worker would not start (nixl/base_worker.py; None: it starts): with pipeline parallelism,
    NixlConnector, the pull connector (its _supports_pp_hma is False), refuses a hybrid KV cache layout, and any
    NIXL worker a consumer (decode) side, whatever the model."""
    if pipeline_parallel_size == 1:
        return None
    return NIXL_PP_HMA if hybrid else NIXL_PP_CONSUMER if consumer else None


def children(transfer: dict) -> list[dict]:
    """The KVTransferConfigs that run: a MultiConnector's connectors, else the config itself."""
    if transfer.get("kv_connector") == MULTI:
        return transfer.get("kv_connector_extra_config", {}).get("connectors", [])
    return [transfer]


def with_offloading(transfer: dict | None, offloading_size: float | None, backend: str) -> dict | None:
    """vLLM's `_post_init_kv_transfer_config`: --kv-offloading-size replaces the connector (a new
    KVTransferConfig when none was given) and makes kv_role kv_both; the rest of the config stays."""
    if offloading_size is None:
        return transfer
    resolved = dict(transfer or {})
    if backend == "native":
        resolved["kv_connector"] = OFFLOADING
        resolved["kv_connector_extra_config"] = {**resolved.get("kv_connector_extra_config", {}),
                                                 "cpu_bytes_to_use": offloading_size * GiB}
    else:
        resolved["kv_connector"] = LMCACHE_MP
    resolved["kv_role"] = "kv_both"
    return resolved


def pd_part(transfer: dict | None) -> dict:
    """The P/D connector's config in a (checked) KVTransferConfig, {} when it has none."""
    return next((c for c in children(transfer) if c.get("kv_connector") in PD_CONNECTORS), {}) if transfer else {}


def split(given: dict | None, resolved: dict | None, offloading_size: float | None, block_size: int) -> KVConnectors:
    """The parts of a checked KVTransferConfig, `resolved` from `given` by `with_offloading`, on an
    engine of `block_size`-token blocks."""
    if resolved is None:
        return NO_KV_CONNECTORS
    offload = None
    if resolved.get("kv_connector") == LMCACHE_MP:  # vLLM leaves the pool's size to the LMCache server
        offload = OffloadSpec("lmcache", offloading_size * GiB)
    for child in children(resolved):
        if child.get("kv_connector") == OFFLOADING:
            extra = child.get("kv_connector_extra_config", {})
            offload = OffloadSpec("native", int(extra["cpu_bytes_to_use"]),
                                  bool(extra.get("offload_prompt_only", True)), blocks_per_chunk(extra, block_size),
                                  extra.get("eviction_policy", "lru"), int(extra.get("store_threshold", 0)),
                                  int(extra.get("max_tracker_size", 64_000)))
    replaced = pd_part(given).get("kv_connector") if offloading_size is not None else None
    return KVConnectors(resolved, pd_part(resolved), offload, replaced)


def blocks_per_chunk(extra: dict, gpu_block_size: int) -> int:
    """GPU blocks per offloaded chunk, from OffloadingConnector's block_size (tokens) or blocks_per_chunk
    (checked: emulator.config)."""
    if extra.get("blocks_per_chunk") is not None:
        return int(extra["blocks_per_chunk"])
    if extra.get("block_size") is not None:
        return int(extra["block_size"]) // gpu_block_size
    return 1
