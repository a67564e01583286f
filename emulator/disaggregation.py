"""Prefill/decode disaggregation as vLLM runs it: KV made on one instance, read by another.

Two ways in, one mechanism:
- inside a cluster (`PDProxy`): an arrival for a model that has prefill and decode instances
  first runs as a prefill of its prompt (max_tokens 1, as vLLM's P/D proxies send it) on a
  prefill instance; when that finishes, the prefill keeps its blocks and the request goes to a
  decode instance, which loads the prompt's KV from it (a side none of whose pods serves the request's
  adapter answers vLLM's 404, as the pod vLLM's toy proxy picks without looking at adapters does:
  ModelNotFound; a prefill its pod aborted goes on with no KV, which the decode instance computes);
- over HTTP (`KVTransfers.held_params` / `remote_source`): a request carrying vLLM's
  `kv_transfer_params` {"do_remote_decode": true} is such a prefill, and its response carries the
  params a decode pod needs; a request carrying {"do_remote_prefill": true, ...} loads its prompt
  from the prefill named there (in this process: its engine, its held blocks; elsewhere: over the
  cluster's network, with the token count the params give).

On the decode side the request's blocks are allocated before the load starts (admission, with
vLLM's back-pressure when they do not fit) and local prefix hits reduce what moves
(emulator.scheduler); the prefill side frees its blocks once the transfer has ended, or after
vLLM's lease (the prefill's kv_connector_extra_config.kv_lease_duration, 30 s by default) when no
decode side read them. A transfer's bytes, link and contention: emulator.kv_transfer.

A load fails when its prefill is gone (its instance failed, in this process) or the two sides'
TP degrees are incompatible (vLLM's handshake refuses them); the decode instance's
kv_load_failure_policy decides what follows, as vLLM's scheduler does: "fail" (vLLM's default)
ends the request with finish reason error, "recompute" computes its prompt locally. What each
engine sent, received, failed to load or let expire is counted in `KVTransfers.stats`
(emulator.kv_stats).
"""
from __future__ import annotations

import heapq
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from emulator.block_hash import ensure_block_hashes
from emulator.hardware import LinkSpec
from emulator.kv_stats import EngineKVStats, KVMove
from emulator.kv_transfer import (BLOCKWISE, STREAMING, ExternalKV, Link, Links, Transfer, contiguous_runs,
                                  group_transfer_bytes, kv_bytes_per_token, rank_transfers, tp_compatible,
                                  transfer_descriptors)
from emulator.kv_tiers import TierSource
from emulator.memory import kv_dtype_bytes
from emulator.request import Request
from emulator.sliding_window import HybridKVCacheManager

if TYPE_CHECKING:
    from emulator.engine import Engine
    from emulator.instance import GroupShape, Instance
    from emulator.simulation import Simulation

DEFAULT_NETWORK = LinkSpec("network", 25e9, 5e-6)  # per GPU: a 200 Gb/s NIC, when the cluster names no link
DEFAULT_CONNECTOR = "NixlConnector"
PAUSED_MESSAGE = "Generation is paused. Please retry after it resumes."  # vLLM's RequestError "engine_paused"
EXPIRED_KEPT = 1 << 16  # expired prefills remembered, for counting read notices that come too late


def model_not_found(model: str, served_names) -> str:
    """vLLM's 404 text for a model (or adapter) a pod does not serve (its serving layer's _check_model)."""
    return f"The model `{model}` does not exist. Valid aliases: {', '.join(served_names)}."


class ModelNotFound(LookupError):
    """A pod the proxy sent a request to serves neither its model nor its adapter: vLLM's 404 (its serving
    layer's _check_model, "Valid aliases": the pod's served model names), answered before its engine sees it."""

    def __init__(self, model: str, instance: Instance) -> None:
        super().__init__(model_not_found(model, instance.served_model_names))
        self.model = model
        self.instance = instance  # the pod that answered


class PodPaused(RuntimeError):
    """A pod the proxy sent a request to rejects new requests: its generation is paused (vLLM's /pause in abort or
    wait mode; Simulation.rejects_new), which answers the retryable 503 "Generation is paused" (EngineCore.
    _reject_add_while_paused), before its engine runs anything of it."""

    def __init__(self, instance: Instance) -> None:
        super().__init__(PAUSED_MESSAGE)
        self.instance = instance  # the pod that answered


@dataclass(eq=False)
class PrefillSource:
    """The KV of a finished prefill held on an engine of this simulation."""
    instance: Instance
    engine: Engine
    request: Request     # the prefill request whose blocks are held
    connector: str
    engine_id: str       # the remote_engine_id it is held under

    @property
    def key(self) -> tuple[str, str]:
        return self.engine_id, self.request.request_id


@dataclass(eq=False)
class RemoteSource:
    """The KV of a prefill in another process: only what its kv_transfer_params say is known."""
    tp_size: object      # as the params give it (checked when the load starts)
    connector: str
    params: dict         # the kv_transfer_params (where the prefill is, which request): whom a read notifies


@dataclass(eq=False)
class LostSource:
    """The KV a decode's kv_transfer_params name on an engine of this process that has failed since:
    there is nothing to read, so its load fails."""
    connector: str


@dataclass(eq=False)
class _Load:
    request: Request
    engine: Engine
    transfer: Transfer
    link: Link
    # what it is counted as when it ends (emulator.kv_stats)
    kind: str = "pd"                  # pd | load (from offload tiers)
    num_bytes: float = 0.0            # the whole load (a tier load runs as one transfer per tier)
    blocks: int = 0
    ranks: int = 1
    descriptors: int = 0
    connector: str = ""
    source_engine: int | None = None  # pd: the prefill's engine, when it is in this simulation
    pinned: int = 0                   # load: blocks of the engine's nearest tier it reads
    rest: list[tuple[Link, Transfer]] = field(default_factory=list)  # load: the transfers of its other tiers

    def stop(self, now: float) -> list[Link]:
        """Take its transfers off their links (it was cancelled); returns the links, to be watched again."""
        for link, transfer in [(self.link, self.transfer), *self.rest]:
            link.cancel(transfer, now)
        return [self.link, *(link for link, _ in self.rest)]


class KVTransfers:
    """The KV transfers of a simulation: starting them on the right link, ending them, freeing what
    they held."""

    def __init__(self, sim: Simulation, nodes_links: tuple = ()) -> None:
        self.sim = sim
        self.links = Links()
        self.node_links = {frozenset(link["between"]): link for link in nodes_links}
        self.loads: dict[str, _Load] = {}  # by decode request id (one in use until its read ends, aborted or not)
        self.held: dict[tuple[str, str], PrefillSource] = {}  # (engine id, request id) -> a finished prefill
        self._engine_ids = [""] * len(sim.engines)  # by engine index, for each instance's present life
        for instance in sim.instances:
            self._draw_engine_ids(instance)
        self.lost_engine_ids: set[str] = set()  # engine ids of engines that failed since (and were not reused)
        self.lost_prefills: set[tuple[str, str]] = set()  # the keys of prefills held when their instance failed
        self.bytes_moved = 0.0
        self.num_transfers = 0
        self.num_failed = 0
        self.stats = [EngineKVStats() for _ in sim.engines]  # by engine index
        self.listeners: list[Callable[[KVMove], None]] = []  # get every transfer that ends
        # get the kv_transfer_params and the transfer of every read of a prefill in another process (a
        # server tells that process: read_elsewhere there); no transfer: a decode request aborted before its load
        # began, whose prefill is to be freed unread
        self.remote_read_listeners: list[Callable[[dict, KVMove | None], None]] = []
        # prefills whose lease ran out or that were freed unread (an empty read's notice), by key -> their engine:
        # the prefill side no longer tracks them, so a read notice after that is counted late
        self.expired: dict[tuple[str, str], int] = {}
        self._per_token: list[float | None] = [None] * len(sim.engines)  # KV bytes per token, by engine index
        self._pairs: dict[tuple[int, int], tuple[Link, int, bool]] = {}  # (sender, receiver) engine index -> _pair
        # the prefills' leases, a heap of (end, event order, source): the earliest one still held has a cluster
        # event (at its own place among the events), not every one: most prefills are read within milliseconds and
        # would leave an event that does nothing 30 s later
        self._leases: list[tuple[float, int, PrefillSource]] = []
        self._lease_events: set[tuple[float, int]] = set()  # (end, order) of the leases with an event queued

    # -- the prefill side ------------------------------------------------------------------
    def engine_id(self, engine: Engine) -> str:
        """vLLM's remote_engine_id of an engine (its kv_transfer_config.engine_id)."""
        return self._engine_ids[engine.index]

    def _draw_engine_ids(self, instance: Instance) -> None:
        """The engine ids of a (re)started instance, as vLLM sets them: the kv-transfer-config's engine_id
        where it names one (the cluster file gives each instance its own), else a fresh uuid4 (so a
        restarted pod has a new one); a data-parallel pod's ranks append _dp<rank> (vLLM's EngineCore)."""
        config = instance.deployment.config
        base = config.kv_transfer.get("engine_id") or str(uuid.uuid4())
        for rank, engine in enumerate(instance.engines):
            self._engine_ids[engine.index] = f"{base}_dp{rank}" if config.data_parallel_size > 1 else base

    def hold(self, request: Request, connector: str) -> PrefillSource:
        """A prefill finished and keeps its blocks for a decode side (released on read or after the
        prefill's lease)."""
        engine = self.sim.engines[request.engine_index]
        source = PrefillSource(self.sim.instance_of[engine.index], engine, request, connector, self.engine_id(engine))
        self.held[source.key] = source
        self._lease(self.sim.now + engine.config.kv_lease_duration, source)
        return source

    def _lease(self, end: float, source: PrefillSource) -> None:
        """The prefill's lease runs out at `end` (in the order of an event scheduled now among those at `end`)."""
        entry = (end, self.sim.event_order(), source)
        heapq.heappush(self._leases, entry)
        if not self._lease_events or entry[:2] < min(self._lease_events):  # (else an earlier event gets to it)
            self._queue(entry[:2])

    def _queue(self, key: tuple[float, int]) -> None:
        self._lease_events.add(key)
        self.sim.schedule(key[0], lambda: self._lease_due(key), key[1])

    def _lease_due(self, key: tuple[float, int]) -> None:
        """A lease event: the lease it is for runs out, if its prefill is still held; then the earliest lease of a
        prefill still held gets an event, unless an earlier one is queued (leases read meanwhile are dropped)."""
        self._lease_events.discard(key)
        leases = self._leases
        self._drop_read()
        if leases and leases[0][:2] == key:
            self._lease_ended(heapq.heappop(leases)[2])
            self._drop_read()
        if leases and (not self._lease_events or leases[0][:2] < min(self._lease_events)):
            self._queue(leases[0][:2])

    def _drop_read(self) -> None:
        """Forget the earliest leases of prefills no longer held."""
        leases = self._leases
        while leases and not self._holds(leases[0][2]):
            heapq.heappop(leases)

    def _holds(self, source: PrefillSource) -> bool:
        """Is this prefill (not another one since under its key) still held?"""
        return self.held.get(source.key) is source

    def _lease_ended(self, source: PrefillSource) -> None:
        if not self._holds(source):
            return
        lease = source.engine.config.kv_lease_duration
        mooncake = source.engine.config.kv_transfer.get("kv_connector") == "MooncakeConnector"
        renewal = lease if mooncake else lease * 2 // 3  # NIXL: each heartbeat extends it by 2/3 of the lease
        if renewal > 0 and self._awaited(source, mooncake):
            self._lease(self.sim.now + renewal, source)
            return
        self.stats[source.engine.index].pd_expired += 1  # no decode side read it in time
        self._untracked(source)
        self.release(source)

    def _untracked(self, source: PrefillSource) -> None:
        """The prefill side stops tracking a prefill it frees unread: a read notice for it from now on is counted
        late (vLLM's prefill worker: a notification for a request it no longer tracks)."""
        self.expired[source.key] = source.engine.index
        if len(self.expired) > EXPIRED_KEPT:  # a server runs for days: forget the oldest
            del self.expired[next(iter(self.expired))]

    def _awaited(self, source: PrefillSource, mooncake: bool) -> bool:
        """Does a decode side here still want the prefill's KV? NIXL's decode side sends heartbeats
        renewing the lease from the request's arrival until its load ends, in the connector metadata of each
        step its engine runs (none while it is paused with nothing running: /sleep, /pause, so the lease may run
        out meanwhile); Mooncake's prefill side frees nothing it is sending."""
        if mooncake:
            return any(load.request.external_kv.source is source for load in self.loads.values())
        return any(request.external_kv is not None and request.external_kv.source is source
                   and (request.engine_index is None or self.sim.is_stepping(self.sim.engines[request.engine_index]))
                   for request in self.sim.active.values())

    def held_params(self, request: Request, host: str = "localhost", port: int = 0) -> dict:
        """vLLM's kv_transfer_params in a finished prefill's response (NixlConnector's request_finished)."""
        engine = self.sim.engines[request.engine_index]
        config = engine.config
        kv = engine.kv  # (a hybrid KV cache's: per group, a sliding group's in-window tail)
        hybrid = isinstance(kv, HybridKVCacheManager)
        blocks = kv.group_block_ids(request) if hybrid else [list(request.kv_blocks or [])]
        return {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": blocks,
                "remote_engine_id": self.engine_id(engine), "remote_request_id": request.request_id,
                "remote_host": host, "remote_port": port, "tp_size": config.tensor_parallel_size,
                "dcp_size": 1, "pp_size": config.pipeline_parallel_size,
                "remote_num_tokens": request.num_computed_tokens, "remote_blocks_expiry_time": None,
                "remote_registration_generation": 0, "transfer_mode": "pull",
                # vLLM's scheduler adds the prefill's cached tokens, for the decode side's usage
                "remote_prefill_cached_tokens": request.num_prompt_tokens_not_computed}

    def remote_source(self, params: dict, connector: str) -> PrefillSource | RemoteSource | LostSource:
        """The source a decode request's kv_transfer_params name: a held prefill here, one on an engine
        here that has failed since, or one elsewhere (vLLM's default tp_size when they give none: 1)."""
        key = (str(params.get("remote_engine_id")), str(params.get("remote_request_id")))
        source = self.held.get(key)
        if source is not None:
            return source
        if key[0] in self.lost_engine_ids or key in self.lost_prefills:
            return LostSource(connector)
        return RemoteSource(params.get("tp_size", 1), connector, params)

    def read_elsewhere(self, engine_id: str, request_id: str, move: KVMove | None = None) -> bool:
        """A decode side in another process has read a prefill held here (vLLM's NIXL notification):
        free its blocks now, and count what it read on this side (`move`, as the decode side measured it:
        the sender's bytes, a Mooncake prefill's push; None: an empty read, which frees them unread). False if
        nothing is held under those names (already read, or no longer tracked: a notice after the lease ran out
        or after an empty read freed them is counted late, per rank, as vLLM's prefill worker counts a
        notification for a request it no longer tracks)."""
        key = (engine_id, request_id)
        source = self.held.get(key)
        if source is None:
            expired = self.expired.pop(key, None)
            if expired is not None:
                self.stats[expired].pd_late_reads += move.ranks if move is not None else 1
            return False
        self.release(source)
        if move is None:  # an empty read's notice: freed unread (a second one, as vLLM may send, is counted late)
            self._untracked(source)
        else:
            sender = self.stats[source.engine.index]
            sender.pd_sent += 1
            sender.pd_sent_bytes += move.num_bytes
            move = replace(move, engine=None, source_engine=source.engine.index)
            for listener in self.listeners:
                listener(move)
        return True

    def release(self, source: PrefillSource) -> None:
        """The prefill's blocks are free again (read by the decode side, or the lease ran out)."""
        if self.held.pop(source.key, None) is None:
            return
        self.sim.settle_engine(source.engine)
        if source.engine.release_held(source.request):
            self.sim.blocks_freed(source.engine)

    # -- the decode side ---------------------------------------------------------------------
    def rejected(self, params: dict, connector: str) -> None:
        """A decode pod's front end turned away a request whose kv_transfer_params load a prefill's KV
        (do_remote_prefill) before its engine had it: vLLM's notify_kv_transfer_request_rejected submits it
        pre-aborted, so that its connector's request_finished, seeing do_remote_prefill still set, has the
        prefill side told of an empty read, which frees the prefill's blocks unread (held here: at once;
        elsewhere: the remote_read_listeners tell its process, with no transfer)."""
        source = self.remote_source(params, connector)
        if isinstance(source, PrefillSource):
            self.release(source)
        elif isinstance(source, RemoteSource):
            self._notify_unread(source)

    def unread(self, source: object) -> None:
        """A decode side admitted its request without reading the prefill's KV (its own prefix cache held
        all of it, or the request skips reading cached KV: prompt logprobs). vLLM's NIXL connector still
        queues the read, of no blocks (update_state_after_alloc with no external tokens), and its worker's
        notification of that empty read frees the prefill's blocks: released here, or a notice to its process."""
        if isinstance(source, PrefillSource):
            self.release(source)
        elif isinstance(source, RemoteSource):
            self._notify_unread(source)

    def _notify_unread(self, source: RemoteSource) -> None:
        """Tell a prefill in another process that its blocks were not read (an empty read's notice)."""
        for notify in self.remote_read_listeners:
            notify(source.params, None)

    def start(self, request: Request, engine: Engine, tokens: int, now: float) -> None:
        """An engine allocated a request's blocks: move `tokens` of its prompt's KV to them."""
        source = request.external_kv.source
        per_token = self._bytes_per_token(engine)
        if isinstance(source, TierSource):
            self._load_from_tiers(request, engine, source, per_token, now)
            return
        self.stats[engine.index].pd_query_tokens += request.external_kv.queried  # (0 when resumed: not counted)
        d = self.sim.instance_of[engine.index].deployment
        tp, pp, block_size = d.config.tensor_parallel_size, d.config.pipeline_parallel_size, engine.config.block_size
        blocks = -(-tokens // block_size)
        if isinstance(source, PrefillSource):
            there = source.instance.up and source.key in self.held
            link, source_tp, compatible = self._pair(source.engine, engine)
        elif isinstance(source, RemoteSource):
            there, source_tp = True, source.tp_size
            compatible = tp_compatible(tp, source_tp, d.model)
        else:  # LostSource
            there = compatible = False
        if not there or not compatible:
            self._finish(request, engine, ok=False)  # its prefill is gone, or the handshake refuses the TPs
            return
        lanes = min(source_tp, tp)
        kv, layers_per_block, moving = engine.kv, None, None
        if isinstance(kv, HybridKVCacheManager):  # each group's blocks, a sliding group's in-window tail only
            moving = kv.loading_blocks(request)
            blocks, layers_per_block = sum(map(len, moving)), kv.groups.layers_per_block
            num_bytes = group_transfer_bytes(d.model, kv.groups.layers, [len(m) for m in moving], block_size,
                                             per_token)
        else:
            num_bytes = (blocks * block_size if source.connector in BLOCKWISE else tokens) * per_token
        if isinstance(source, PrefillSource):
            prefill = source.request
            overlap = (prefill.finish_time - prefill.scheduled_time
                       if source.connector in STREAMING and prefill.scheduled_time is not None else 0.0)
            runs = None
            if source.connector == "MooncakeConnector" and source_tp == tp and \
                    source.engine.config.block_size == block_size:  # it coalesces runs when the layouts match
                if moving is None:
                    hit = (request.num_computed_tokens - tokens) // block_size  # blocks it had locally
                    runs = contiguous_runs(prefill.kv_blocks[hit:hit + blocks], request.kv_blocks[hit:hit + blocks])
                elif isinstance(source.engine.kv, HybridKVCacheManager):  # group by group, the tails paired
                    sent = source.engine.kv.group_block_ids(prefill)
                    runs = sum(contiguous_runs(s[max(len(s) - len(m), 0):], m) for s, m in zip(sent, moving))
            source_engine = source.engine.index
        else:
            link = self.links.get("network", self._network().bandwidth, self._network().latency)
            overlap = 0.0
            runs = None
            source_engine = None
        transfer = Transfer(num_bytes, lanes, lambda t, r=request, e=engine: self._done(r, e, t))
        if overlap > 0:  # pushed layer by layer during the prefill: what the link carried then is done
            last_layer = num_bytes / d.model.num_layers
            transfer.remaining = max(last_layer, num_bytes - lanes * link.bandwidth * overlap)
        self.loads[request.request_id] = _Load(
            request, engine, transfer, link, "pd", num_bytes, blocks, rank_transfers(source_tp, tp, pp),
            transfer_descriptors(source.connector, d.model, pp, blocks, runs, layers_per_block), source.connector,
            source_engine)
        self.num_transfers += 1
        link.start(transfer, now)
        self.sim.watch_link(link)

    def _bytes_per_token(self, engine: Engine) -> float:
        """KV bytes per token in the engine's layout (its deployment's: kept, as it never changes)."""
        per_token = self._per_token[engine.index]
        if per_token is None:
            d = self.sim.instance_of[engine.index].deployment
            per_token = self._per_token[engine.index] = kv_bytes_per_token(
                d.model, d.config.tensor_parallel_size, kv_dtype_bytes(d.model, d.config.kv_cache_dtype))
        return per_token

    def _pair(self, sender: Engine, receiver: Engine) -> tuple[Link, int, bool]:
        """What a read from `sender` into `receiver` takes, kept per pair (their deployments and nodes never change):
        the link, the sender's TP and whether the two sides can exchange KV: their TPs (the handshake), and the
        same KV layout in vLLM, hybrid groups on both or one group on both (with offloading an engine here runs one
        group of vLLM's layout: memory.engine_kv_groups). NIXL's handshake wants as many layer regions
        (nixl/base_worker.py "Number of KV layers must match between prefill and decode"), Mooncake's sender as
        many groups (mooncake_connector.py "KV group count mismatch")."""
        pair = self._pairs.get((sender.index, receiver.index))
        if pair is None:
            a, b = self.sim.instance_of[sender.index], self.sim.instance_of[receiver.index]
            source_tp = a.deployment.config.tensor_parallel_size
            same_layout = (a.deployment.memory.groups is None) == (b.deployment.memory.groups is None)
            pair = self._pairs[sender.index, receiver.index] = (
                self._link(a, b), source_tp,
                same_layout and tp_compatible(b.deployment.config.tensor_parallel_size, source_tp, b.deployment.model))
        return pair

    def _load_from_tiers(self, request: Request, engine: Engine, source: TierSource, per_token: float,
                         now: float) -> None:
        """One transfer per tier over its link to this engine's GPUs; loaded when the last ends (the
        scheduler took the blocks from the tiers when it decided the load)."""
        lanes = engine.config.tensor_parallel_size
        block_tokens = engine.config.block_size
        left = [len(source.parts)]
        first = None
        stats = self.stats[engine.index]
        nearest = source.offload.tiers[0]
        total_blocks = pinned = 0

        def part_done(t: float, r=request, e=engine) -> None:
            left[0] -= 1
            if left[0] == 0:
                self._done(r, e, t)
        for tier, blocks in source.parts:
            link = self.links.get(f"{tier.spec.name}->gpu{engine.index}", tier.spec.bandwidth, tier.spec.latency)
            transfer = Transfer(blocks * block_tokens * per_token, lanes, part_done)
            source.offload.hits += blocks * block_tokens
            stats.tier_loaded_blocks[tier] = stats.tier_loaded_blocks.get(tier, 0) + blocks
            total_blocks += blocks
            if tier is nearest:
                pinned += blocks
            if first is None:
                first = _Load(request, engine, transfer, link, "load", connector="OffloadingConnector",
                              ranks=engine.config.world_size)
            else:
                first.rest.append((link, transfer))
            link.start(transfer, now)
            self.sim.watch_link(link)
        first.num_bytes = total_blocks * block_tokens * per_token
        first.blocks = total_blocks
        first.pinned = pinned
        stats.tier_loading_blocks += pinned
        self.loads[request.request_id] = first
        self.num_transfers += 1

    def _load_of(self, request: Request, take: bool = False) -> _Load | None:
        """The request's load in flight (`take`: no longer tracked), if any: a load under its id is another
        request's where that id was used again (Simulation.submit refuses it while a read under it runs)."""
        load = self.loads.get(request.request_id)
        if load is None or load.request is not request:
            return None
        if take:
            del self.loads[request.request_id]
        return load

    def _done(self, request: Request, engine: Engine, now: float) -> None:
        load = self._load_of(request)
        if load is None:
            return
        self.bytes_moved += load.num_bytes
        self._count(load, now)
        self._finish(request, engine, ok=True)

    def _count(self, load: _Load, now: float) -> None:
        """A transfer ended: add it to its engines' counters and hand it to the listeners."""
        seconds = now - load.transfer.started
        stats = self.stats[load.engine.index]
        if load.kind == "load":
            stats.tier_loads += 1
            stats.tier_load_bytes += load.num_bytes
            stats.tier_load_seconds += seconds
        else:
            stats.pd_loads += 1
            stats.pd_load_bytes += load.num_bytes
            stats.pd_load_seconds += seconds
            if load.source_engine is not None:
                sender = self.stats[load.source_engine]
                sender.pd_sent += 1
                sender.pd_sent_bytes += load.num_bytes
                if load.request.external_kv.source.key not in self.held:
                    sender.pd_late_reads += load.ranks  # vLLM counts one notification per rank
        if self.listeners:
            move = KVMove(load.kind, load.engine.index, load.source_engine, load.connector, load.num_bytes, seconds,
                          load.blocks, load.ranks, load.descriptors)
            for listener in self.listeners:
                listener(move)

    def _finish(self, request: Request, engine: Engine, ok: bool) -> None:
        load = self._load_of(request, take=True)
        source = request.external_kv.source if request.external_kv is not None else None
        if load is not None:
            self._unpin(load, source)
        if not ok:
            self.num_failed += 1
            self.stats[engine.index].pd_failed += 1
        if request.kv_loading:
            self.sim.settle_engine(engine)
            if ok or engine.config.kv_load_failure_policy == "recompute":
                engine.external_kv_loaded(request, ok)
            else:
                self._end_with_error(request)
            self.sim.wake_engine(engine)
        if load is not None and request.is_finished:  # aborted while it read: its blocks are free now (abort)
            self.sim.settle_engine(engine)
            if engine.release_held(request):
                self.sim.wake_engine(engine)
        if load is not None and isinstance(source, PrefillSource):
            self.release(source)
        if load is not None and ok and isinstance(source, RemoteSource) and self.remote_read_listeners:
            move = KVMove(load.kind, engine.index, None, load.connector, load.num_bytes,
                          self.sim.now - load.transfer.started, load.blocks, load.ranks, load.descriptors)
            for notify in self.remote_read_listeners:  # the prefill's process frees its blocks on hearing it
                notify(source.params, move)

    def _end_with_error(self, request: Request) -> None:
        """kv_load_failure_policy "fail": the request ends with finish reason error and its blocks are
        freed (vLLM's scheduler finishes it FINISHED_ERROR), as a request on a failed instance ends."""
        request.external_kv = None
        self.sim.fail_placed(request)

    def abort(self, request: Request) -> bool:
        """The request was aborted. A load of its prompt's KV that is under way goes on to its end, as vLLM's
        worker, which nothing stops mid-transfer, finishes it, while the scheduler keeps the request's own blocks
        until then (finish_requests' delay_free_blocks for a request WAITING_FOR_REMOTE_KVS, freed when the worker
        reports it received): True, and the engine is to hold them (_finish frees them). A read from a prefill
        then notifies the prefill side (which frees its blocks then: released here, or a notice to its process);
        a load from offload tiers keeps the tiers' blocks pinned until then (the OffloadingConnector completes a
        load job only when its worker reports it done). Anything else is dropped now (cancel): False."""
        if self._load_of(request) is not None:
            return True
        self.cancel(request)
        return False

    def cancel(self, request: Request, release: bool = True) -> None:
        """The decode request is gone (aborted, failed): drop its transfer and (`release`) free the
        prefill's blocks; without, another decode instance may still read them (a retry). A prefill in another
        process is told when its decode pod, up, aborts the request before its load began: vLLM's NIXL
        request_finished, seeing do_remote_prefill still set, has its worker send the prefill side the
        notification of an empty read, which frees its blocks (a failed pod tells nothing: the lease frees them)."""
        load = self._load_of(request, take=True)
        source = request.external_kv.source if request.external_kv is not None else None
        if release and load is None and not request.kv_loading and isinstance(source, RemoteSource) \
                and self.sim.instance_of[request.engine_index].up:
            self._notify_unread(source)
        if load is not None:
            self._drop(load, source)
        if release and isinstance(source, PrefillSource):
            self.release(source)

    def _drop(self, load: _Load, source, unpin_tiers: bool = True) -> None:
        """End a load no longer tracked: its transfers stop, its tier blocks stop counting as loading and
        (`unpin_tiers`) a tier load's pins are released."""
        self._stop(load)
        self._unpin(load, source, unpin_tiers)

    def _unpin(self, load: _Load, source, unpin_tiers: bool = True) -> None:
        """A load's tier blocks stop counting as loading and (`unpin_tiers`) a tier load's pins are released."""
        self.stats[load.engine.index].tier_loading_blocks -= load.pinned
        if unpin_tiers and isinstance(source, TierSource):
            source.offload.release(load.engine.kv.block_hashes(load.request), source.start, source.parts)

    def source_lost(self, instance: Instance) -> None:
        """An instance failed. The reads it ran for requests aborted meanwhile end with it (a failed pod tells
        no prefill elsewhere). As a prefill instance: transfers from it fail (each as its decode side's
        kv_load_failure_policy says), requests that have not started loading will fail when they do
        ("fail") or lose their external KV now ("recompute"), and what it held is gone: the engine ids of
        its next life are new (unless its kv-transfer-config names one, which vLLM keeps). Its engines' loads from
        their offload tiers end with it too: their own tiers are gone already (Engine.drain), so nothing is
        unpinned there; a node's shared pool, another process, is told the read ended."""
        for load in list(self.loads.values()):
            if self.sim.instance_of[load.engine.index] is not instance:
                continue
            request = load.request
            source = request.external_kv.source if request.external_kv is not None else None
            if isinstance(source, TierSource):  # a tier load: what it read is local to this engine
                del self.loads[request.request_id]
                self._drop(load, source, unpin_tiers=source.offload.shared)
                request.external_kv = None  # a retry elsewhere looks its prefix up afresh
            elif request.is_finished:  # a read it ran for a request aborted meanwhile: gone
                del self.loads[request.request_id]
                self._stop(load)
                if isinstance(source, PrefillSource):  # (as cancel frees one read here)
                    self.release(source)
        retired = [self.engine_id(engine) for engine in instance.engines]
        self._draw_engine_ids(instance)
        self.lost_engine_ids.update(set(retired) - {self.engine_id(engine) for engine in instance.engines})
        for load in list(self.loads.values()):
            source = load.request.external_kv.source if load.request.external_kv is not None else None
            if isinstance(source, PrefillSource) and source.instance is instance:
                self._stop(load)
                self._finish(load.request, load.engine, ok=False)
        for key, source in list(self.held.items()):
            if source.instance is instance:
                del self.held[key]
                self.lost_prefills.add(key)
        for request in self.sim.active.values():
            kv = request.external_kv
            if kv is not None and isinstance(kv.source, TierSource) and request.engine_index is not None \
                    and self.sim.instance_of[request.engine_index] is instance:
                request.external_kv = None  # what a waiting request found in its tiers: looked up afresh elsewhere
            elif kv is not None and not request.kv_loading and isinstance(kv.source, PrefillSource) \
                    and kv.source.instance is instance \
                    and self.sim.engines[request.engine_index].config.kv_load_failure_policy == "recompute":
                request.external_kv = None

    def _stop(self, load: _Load) -> None:
        for link in load.stop(self.sim.now):
            self.sim.watch_link(link)

    # -- links ---------------------------------------------------------------------------------
    def _network(self) -> LinkSpec:
        return DEFAULT_NETWORK

    def _link(self, a: Instance, b: Instance) -> Link:
        """The link a transfer between two instances takes: their GPUs' interconnect on one node, the
        nodes' link (the cluster file's, else a default network) between nodes."""
        if a.spec.node is not None and a.spec.node == b.spec.node:
            spec = min((a.deployment.device.interconnect, b.deployment.device.interconnect),
                       key=lambda link: link.bandwidth)
            return self.links.get(f"{a.name}<->{b.name}", spec.bandwidth, spec.latency)
        between = self.node_links.get(frozenset((a.spec.node, b.spec.node)))
        if between is not None:
            return self.links.get(f"{a.spec.node}<->{b.spec.node}", between["bandwidth"], between["latency"])
        return self.links.get("network", self._network().bandwidth, self._network().latency)


@dataclass(eq=False)
class PDGroup:
    """The requests of one client request (its prompts and choices), which the proxy sends on together as
    vLLM's toy P/D proxy sends one HTTP request: to one prefill instance (picked for the first of them,
    among those whose front end takes all: `shape`, `longest`), and, once the prefill pod has answered for
    all of them, to one decode instance."""
    prefill: Instance | None = None
    decode: Instance | None = None
    shape: GroupShape = ()            # (choices, prompt length) of each prompt, for the prefill pod's queue bounds
    longest: int | None = None        # the longest prompt, which the prefill pod's context must hold
    members: list[Request] = field(default_factory=list)  # the client's requests, in order
    running: int = 0                  # prefills still running
    # (client's request, its finished prefill, the KV it holds: None if aborted or failed), waiting for the others
    ready: list[tuple[Request, Request, PrefillSource | None]] = field(default_factory=list)
    failed: bool = False              # a prefill ended without its token: the prefill pod's answer is an error


class PDProxy:
    """The proxy a cluster file can be its own: prefill on a prefill instance, then decode on a
    decode instance (each picked by the cluster's routing policy among its role, once for the requests
    of one client request: PDGroup). As vLLM's toy proxy waits for the prefill pod's whole response
    before it sends the decode pod the request, the requests of one group go on to decode together, when
    the last of their prefills has finished."""

    def __init__(self, sim: Simulation, transfers: KVTransfers) -> None:
        self.sim = sim
        self.transfers = transfers
        self.client_of: dict[str, Request] = {}  # running prefill's request id -> the client's request
        self.prefill_of: dict[str, Request] = {}  # client request id -> its running prefill request
        self.group_of: dict[str, PDGroup] = {}  # client request id -> its group, until it reaches a decode instance
        # client request id -> the 404 of the decode pod that did not know its adapter (or the 503 of one whose
        # generation is paused), while the request ends (for the finish listeners: a server answers it)
        self.refused: dict[str, ModelNotFound | PodPaused] = {}
        # get each client request whose prefill pod has answered with its KV held, as the proxy goes on to a decode
        # pod (a server's front door opens its stream then, as vLLM's toy proxy sends its headers)
        self.answered_listeners: list[Callable[[Request], None]] = []

    def serves(self, model: str | None) -> bool:
        """Does the model have both prefill and decode instances up?"""
        of_role = self.sim.of_role
        return any(i.up for i in of_role(model, "prefill")) and any(i.up for i in of_role(model, "decode"))

    def start(self, request: Request, instance: Instance | None = None, group: PDGroup | None = None,
              pinned_engine: int | None = None) -> Engine:
        """An arrival: run its prompt as a prefill (max_tokens 1) on a prefill instance (`instance`, else its
        `group`'s, else the one the routing policy picks, which the rest of its group then follows). Where the
        policy picked that instance for the client's request and picks engines too (emulator.routing's
        PicksEngine), the prefill goes to the rank it picked; `pinned_engine` (a rank of that instance: vLLM's
        X-data-parallel-rank) wins over it."""
        group = group or PDGroup()
        if instance is not None:
            group.prefill = instance
        prefill = Request(f"{request.request_id}@prefill", request.num_prompt_tokens, 1, max_tokens=1,
                          arrival_time=request.arrival_time, prompt_token_ids=request.prompt_token_ids,
                          output_token_ids=request.output_token_ids, content_seed=request.content_seed,
                          priority=request.priority, model=request.model, session=request.session,
                          cache_salt=request.cache_salt, lora=request.lora,  # the proxy sends the adapter on
                          session_id=request.session_id, kv_cache_report_mode=request.kv_cache_report_mode,
                          skip_reading_prefix_cache=request.skip_reading_prefix_cache)  # (the body goes on whole)
        prefill.hold_kv = True
        self.client_of[prefill.request_id] = request
        self.prefill_of[request.request_id] = prefill
        # the prefill's blocks are the first of its client's (same content): hash the client's once
        candidates = [group.prefill] if group.prefill is not None else self.sim.candidates(request.model, "prefill")
        if candidates:
            block_size = candidates[0].block_size
            hashes = ensure_block_hashes(request, block_size)
            prefill.block_hashes = hashes[:(prefill.num_prompt_tokens + 1) // block_size]
            prefill.hash_block_size = block_size
        try:
            pinned = None
            if group.prefill is None:
                refusal = self._unserved(prefill, "prefill", group.longest)
                if refusal is not None:
                    raise refusal
                group.prefill = self.sim.route(prefill, "prefill", admit=group.shape, prompt_len=group.longest)
            elif hasattr(self.sim.routing, "rank_for"):  # the policy picked a member for the client's request
                pinned = self.sim.routing.rank_for(request, group.prefill)
            if self.sim.rejects_new(group.prefill):  # (its answer: the 503 the proxy relays)
                raise PodPaused(group.prefill)
            engine = self.sim.place(prefill, group.prefill, pinned if pinned_engine is None else pinned_engine)
        except BaseException:  # no prefill instance took it: nothing of it stays
            self.drop(request)
            raise
        self.group_of[request.request_id] = group
        group.members.append(request)
        group.running += 1
        return engine

    def is_prefill(self, request: Request) -> bool:
        return request.request_id in self.client_of

    def in_prefill(self, request: Request) -> bool:
        """Is a client's request still with its prefill pod (its prefill running, or done and waiting for
        those of its group)?"""
        return request.request_id in self.group_of

    def prefill_finished(self, prefill: Request) -> None:
        """Its prefill is done and holds the prompt's KV: the client's request goes to a decode instance
        with the others of its group, once their prefills are done too."""
        request = self.client_of.pop(prefill.request_id)
        del self.prefill_of[request.request_id]
        group = self.group_of[request.request_id]
        group.running -= 1
        source = None
        if prefill.finish_reason in ("stop", "length"):
            # held from now, under the prefill pod's lease (no decode side asks for it before the hand-over)
            connector = group.prefill.deployment.config.kv_transfer.get("kv_connector", DEFAULT_CONNECTOR)
            source = self.transfers.hold(prefill, connector)
        elif prefill.finish_reason != "abort":  # an error: the pod's answer is vLLM's 500, which the proxy raises
            group.failed = True
        # (aborted by its pod: a 200 with finish_reason abort and no kv_transfer_params, vLLM's NIXL request_finished
        # giving none for it; the toy proxy sends the decode pod the client's request without them, so that pod
        # computes the whole prompt itself)
        group.ready.append((request, prefill, source))
        self.go_on(group)

    def go_on(self, group: PDGroup) -> None:
        """The prefill pod has answered for the whole group (no prefill of it runs): send what is left of it
        to one decode instance, the one the routing policy picks for its first (among those whose context
        holds its longest prompt), each request loading its prompt's KV from its own prefill (one whose prefill
        its pod aborted computes its prompt there)."""
        if group.running or not group.ready:
            return
        ready, group.ready = group.ready, []
        for request, _, _ in ready:
            del self.group_of[request.request_id]
        target = refusal = None
        if not group.failed:  # (else the prefill pod's answer is an error, which the proxy passes on: no decode)
            for listener in self.answered_listeners:
                for request, _, _ in ready:
                    listener(request)
            try:
                longest = max(request.num_prompt_tokens for request, _, _ in ready)
                refusal = self._unserved(ready[0][0], "decode", longest)
                target = group.decode
                if refusal is None and (target is None or not target.up or not target.fits(longest)):
                    target = group.decode = self.sim.route(ready[0][0], "decode", prompt_len=longest)
            except RuntimeError:  # no decode instance is up (or holds them)
                target = None
            if target is not None and refusal is None and self.sim.rejects_new(target):
                refusal = PodPaused(target)  # (its engine takes each request aborted: their prefills freed unread)
        if target is None or refusal is not None:  # their prefills' blocks are free again
            for request, _, source in ready:
                if source is not None:
                    self.transfers.release(source)
                if refusal is not None:  # the decode pod's 404 (or paused pod's 503): the error its client reads
                    request.error = str(refusal)
                    self.refused[request.request_id] = refusal
                self.sim.fail_request(request)
                self.refused.pop(request.request_id, None)
            return
        # the KV moves as the decode side's connector moves it
        connector = target.deployment.config.kv_transfer.get("kv_connector", DEFAULT_CONNECTOR)
        for request, prefill, source in ready:
            if source is not None:  # (none: its prefill was aborted, prefill_finished)
                source.connector = connector
                request.external_kv = ExternalKV(prefill.num_prompt_tokens, source)
                request.remote_prefill_cached_tokens = prefill.num_prompt_tokens_not_computed  # as the params carry it
            # the decode pod gets the request now, when the proxy has its prefill's answer: its own latencies
            # count from here (vLLM's arrival_time is the pod's), the client's from when it sent it
            request.reach_pod(self.sim.now)
            self.sim.place(request, target)

    def _unserved(self, request: Request, role: str, prompt_len: int | None) -> ModelNotFound | None:
        """The 404 a pod of `role` answers when pods of that role are up for the request's model and hold its
        prompt (`prompt_len`, default its own), but none serves its adapter by name now (loaded at runtime on
        the other side's pods alone, or unloaded while its prefill ran): vLLM's toy proxy picks the pod without
        looking at adapters (one routing decision, the policy's pick among them). None otherwise."""
        lora = request.lora
        if lora is None:
            return None
        prompt_len = request.num_prompt_tokens if prompt_len is None else prompt_len
        pods = [i for i in self.sim.candidates(request.model, role) if i.fits(prompt_len)]
        if not pods or any(lora.name in self.sim.adapters.pod(i.name).adapters for i in pods):
            return None
        request.lora = None  # routed as by a proxy that knows no adapters
        try:
            pod = self.sim.route(request, role, prompt_len=prompt_len)
        finally:
            request.lora = lora
        return ModelNotFound(lora.name, pod)

    def drop(self, request: Request) -> tuple[Request | None, PDGroup | None]:
        """The client's request ends (or leaves its prefill instance) while with its prefill pod: its prefill
        request if it still runs (to abort), and its group (whose others may go on without it: go_on). A
        finished prefill it waited with frees its blocks."""
        group = self.group_of.pop(request.request_id, None)  # (none yet when its own placement failed)
        prefill = self.prefill_of.pop(request.request_id, None)
        if prefill is not None:
            del self.client_of[prefill.request_id]
            if group is not None:
                group.running -= 1
        elif group is not None:
            for entry in group.ready:
                if entry[0] is request:
                    group.ready.remove(entry)
                    if entry[2] is not None:
                        self.transfers.release(entry[2])
                    break
        return prefill, group

    def lose(self, group: PDGroup) -> list[Request]:
        """Its prefill instance failed: every request of the group still with it leaves it (dropped); returns
        them, in order."""
        left = [request for request in group.members if request.request_id in self.group_of]
        for request in left:
            self.drop(request)
        return left
