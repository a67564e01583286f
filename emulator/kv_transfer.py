"""Moving KV cache between devices: what a transfer weighs, which link it takes, how links are shared.

A transfer's bytes follow the model's KV layout on the receiving side: per token, every layer's
K and V for the KV heads each of its TP ranks holds (heads replicated when there are fewer KV
heads than ranks), so a decode instance at another TP degree than the prefill one receives its
own layout (the connector re-lays the heads); with vLLM's hybrid KV cache manager (sliding-window and
full-attention groups: emulator.sliding_window) each group's blocks carry its own layers, and a
sliding group sends only its in-window tail. Min(TP_send, TP_receive) GPU pairs move data at
once, each over its own lane of the link (an NVLink port, or a GPU's own NIC in a rail-optimised
cluster), so the link's bandwidth is per GPU and multiplied by the pairs.

A `Link` is shared: transfers in flight on it share its bandwidth equally (processor sharing),
so overlapping transfers slow each other down; each also pays the link's latency once. The
simulation keeps the links and asks them for their next completion.

Connectors, by how they move the KV (vLLM's names, `--kv-transfer-config` kv_connector):
- NixlConnector, MooncakeConnector: the decode side pulls the whole request's KV over RDMA once
  it has allocated its blocks (after the prefill finished), whole blocks (the last, part-filled one too);
- P2pNcclConnector: the prefill side pushes each layer's KV as the layer is computed (NCCL send),
  so most of the transfer overlaps the prefill: what is left when the prefill ends is what the
  link could not carry during it, and at least the last layer;
- LMCacheConnectorV1: the prefill side stores each layer to LMCache (host memory, overlapped as
  above) and the decode side retrieves it from there.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from emulator.models import ModelSpec

CONNECTORS = ("NixlConnector", "MooncakeConnector", "P2pNcclConnector", "LMCacheConnectorV1")
STREAMING = frozenset({"P2pNcclConnector", "LMCacheConnectorV1"})  # push layer by layer during the prefill
# move whole blocks (a descriptor per block region): a prompt's partly filled last block goes whole
BLOCKWISE = frozenset({"NixlConnector", "MooncakeConnector"})


@dataclass(eq=False)
class ExternalKV:
    """Where a request's prompt KV can be loaded from (emulator.scheduler takes it at admission):
    a prefix of `tokens` prompt tokens, at `source` (a prefill instance, a remote prefill, offload
    tiers: emulator.disaggregation, emulator.kv_tiers)."""
    tokens: int
    source: object
    queried: int = 0  # the prompt less its local prefix hit: the connector's query, once its load started


def kv_bytes_per_token(model: ModelSpec, tp: int, kv_dtype_bytes: float) -> float:
    """KV bytes one token occupies across the `tp` ranks of an instance (all layers, K and V)."""
    return model.num_layers * 2 * model.head_dim * model.kv_heads_per_device(tp) * tp * kv_dtype_bytes


def group_transfer_bytes(model: ModelSpec, group_layers: tuple[int, ...], group_blocks: list[int], block_size: int,
                         per_token: float) -> float:
    """Bytes of a transfer between hybrid KV caches (vLLM's hybrid KV cache manager): each group's blocks carry
    its own layers' K and V, `per_token` being every layer's (kv_bytes_per_token)."""
    return sum(blocks * block_size * per_token * layers / model.num_layers
               for blocks, layers in zip(group_blocks, group_layers))


def tp_compatible(local_tp: int, remote_tp: object, model: ModelSpec) -> bool:
    """Can a decode instance at `local_tp` read the KV of a prefill of the same model at `remote_tp` (the
    tp_size of its kv_transfer_params)? As vLLM's NIXL and Mooncake connectors check at the handshake:
    one degree divides the other (TransferTopology.tp_ratio), and a decode side reading from several
    prefill ranks needs their KV heads unreplicated (a remote TP above the KV heads fails, MLA
    excepted). The remote must also be a TP the model runs at (its attention heads divide evenly):
    no such prefill exists to shake hands with otherwise. So a tp_size a client made up fails the
    load instead of fanning out into that many rank-to-rank transfers."""
    if isinstance(remote_tp, bool) or not isinstance(remote_tp, int) or remote_tp < 1 or model.num_heads % remote_tp:
        return False
    if local_tp >= remote_tp:
        return local_tp % remote_tp == 0
    return remote_tp % local_tp == 0 and (model.is_mla or remote_tp <= model.num_kv_heads)


def rank_transfers(tp_send: int, tp_receive: int, pp: int) -> int:
    """How many rank-to-rank transfers move one request's KV: every pair of a sending and a receiving
    rank that share KV heads moves its part (max of the two TP degrees per pipeline stage)."""
    return max(tp_send, tp_receive) * pp


def transfer_descriptors(connector: str, model: ModelSpec, pp: int, blocks: int, runs: int | None = None,
                         layers_per_block: int | None = None) -> int:
    """Descriptors of one rank-to-rank transfer of `blocks` blocks, as the connector counts them: one
    per block of each region the rank registered, a region per layer for K and one for V (the
    FlashAttention layout); MooncakeConnector coalesces a run of blocks contiguous on both sides
    into one (`runs`: how many such runs, when both sides have the same layout). A hybrid KV cache
    (`layers_per_block`: its groups' layers on a rank) has a tensor per layer of a group, shared by the
    groups, so every group's blocks are in each of those regions."""
    regions = 2 * (layers_per_block or -(-model.num_layers // pp))
    if connector == "MooncakeConnector" and runs is not None:
        return regions * runs
    return regions * blocks


def contiguous_runs(source_blocks: list[int], target_blocks: list[int]) -> int:
    """Runs of consecutive block ids on both sides, pair by pair."""
    runs = 0
    for i, (s, t) in enumerate(zip(source_blocks, target_blocks)):
        if i == 0 or s != source_blocks[i - 1] + 1 or t != target_blocks[i - 1] + 1:
            runs += 1
    return runs


@dataclass(eq=False)
class Transfer:
    """One KV transfer: `remaining` bytes to move at `lanes` times the link's per-GPU bandwidth."""
    num_bytes: float
    lanes: int
    on_done: Callable[[float], None]
    remaining: float = 0.0
    started: float = 0.0
    latency_until: float = 0.0  # bytes flow once the link's latency has passed
    done_at: float | None = None

    def __post_init__(self) -> None:
        self.remaining = self.num_bytes


@dataclass(eq=False)
class Link:
    """A link shared by the transfers on it (processor sharing), per-GPU `bandwidth` in bytes/s."""
    name: str
    bandwidth: float
    latency: float
    active: list[Transfer] = field(default_factory=list)
    updated: float = 0.0
    bytes_moved: float = 0.0
    version: int = 0  # bumped whenever the next completion may have changed

    def _rate(self, transfer: Transfer) -> float:
        return transfer.lanes * self.bandwidth / len(self.active)

    def advance(self, now: float) -> None:
        """Move every active transfer's bytes up to `now`."""
        if now <= self.updated:
            return
        for t in self.active:
            flowing_from = max(self.updated, t.latency_until)
            if now > flowing_from:
                moved = min(t.remaining, self._rate(t) * (now - flowing_from))
                t.remaining -= moved
                self.bytes_moved += moved
        self.updated = now

    def start(self, transfer: Transfer, now: float) -> None:
        self.advance(now)
        transfer.started = now
        transfer.latency_until = now + self.latency
        self.active.append(transfer)
        self.version += 1

    def cancel(self, transfer: Transfer, now: float) -> None:
        self.advance(now)
        if transfer in self.active:
            self.active.remove(transfer)
            self.version += 1

    def next_completion(self) -> tuple[float, Transfer] | None:
        """When the first active transfer ends at the current sharing, and which."""
        best = None
        for t in self.active:
            at = max(self.updated, t.latency_until) + t.remaining / self._rate(t)
            if best is None or at < best[0]:
                best = (at, t)
        return best

    def complete(self, transfer: Transfer, now: float) -> None:
        self.advance(now)
        transfer.remaining = 0.0
        transfer.done_at = now
        self.active.remove(transfer)
        self.version += 1


class Links:
    """Every link of a cluster by name, created on first use."""

    def __init__(self) -> None:
        self.links: dict[str, Link] = {}

    def get(self, name: str, bandwidth: float, latency: float) -> Link:
        link = self.links.get(name)
        if link is None:
            link = self.links[name] = Link(name, bandwidth, latency)
        return link
