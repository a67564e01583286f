"""vLLM's KV connector series on /metrics, and the emulator's series of KV tiers and P/D transfers.

Per engine, the families vLLM 0.33 registers for the KV connector its instance runs
(`KVConnectorProm` in `v1/metrics/loggers.py`, each connector's `build_prom_metrics`), with its
names, help texts, labels (`model_name`, `engine`, ...) and buckets, values in virtual time:

- OffloadingConnector (`--kv-offloading-size` with `--kv-offloading-backend native`, or named in
  `--kv-transfer-config`, alone or in a MultiConnector; `offloading/metrics.py`, `kv_offload/cpu/spec.py`):
  from the start, the deprecated
  `vllm:kv_offload_total_bytes`, `_total_time` and `_size` by `transfer_type` (CPU_to_GPU, GPU_to_CPU);
  from an engine's first load, `vllm:kv_offload_load_bytes`, `_load_time` and `_load_size`; from its
  first store, `vllm:kv_offload_store_bytes`, `_store_time`, `_store_size` and
  `vllm:kv_offload_cpu_allocation_size`; from its first step, `vllm:kv_offload_config_info` and the CPU
  tier's `vllm:kv_offload_cpu_cache_usage_perc` (chunks pinned by transfers in flight), `_write_` and
  `_read_usage_perc`, in chunks (blocks_per_chunk GPU blocks), and with store_threshold >= 2
  `vllm:kv_offload_stores_skipped`. As vLLM's workers do, every TP/PP rank
  reports its own share: a job over
  `world_size` ranks adds `world_size` size observations of its bytes / `world_size`, and its time once
  per rank. A store copies the step's newly full chunks to the CPU tier beside the compute (a store job:
  emulator.kv_tiers.StoreJob); its write stays pinned until the scheduler learns the copy ended, and only
  then, as vLLM's workers record a finished transfer (offloading/worker.py get_finished, brought to the
  scheduler's stats by that step's output), are its bytes (its chunks' blocks) and its copy's time (the
  link's latency and its bytes over the GPUs' host links, not its wait behind earlier jobs) observed.
  Every store that needs room observes its chunks in `vllm:kv_offload_cpu_allocation_size` as it is
  prepared, and one that finds none counts in `vllm:kv_offload_allocation_failure` (bound on the first).
  Each tier look-up (one per scheduling attempt of a waiting request, admitted or not, but not one held
  back by its own store jobs, which vLLM does not look up) observes its virtual duration, 0 (a look-up
  costs no virtual time), in `vllm:kv_offload_lookup_sync_delay_seconds` (bound on the first);
  `vllm:kv_offload_lookup_async_delay_seconds` observes, for each request a look-up deferred (a chunk it
  would load was still being stored, or, with prefix caching on, being loaded by another request), the
  virtual time from its first deferral to the look-up that was not deferred, or to its end
  (emulator.kv_tiers.Offload.async_delays).
- NixlConnector (`nixl/stats.py`): transfer time, post time (0: posting costs no virtual time), bytes
  and descriptors per rank-to-rank transfer, on the decode engine that pulls the KV; failed transfers
  there (its prefill was gone); on the prefill engine, requests whose KV lease expired unread and reads
  that ended after it (a decode pod in another process tells it of its read: server.kv_read_notice).
- MooncakeConnector (`mooncake/stats.py`): the prefill engine pushes, so the transfer histograms are
  its own (a decode pod in another process tells it what it read); failed receives on the decode engine,
  expired leases on the prefill one.
- LMCacheConnectorV1, LMCacheMPConnector (`--kv-offloading-backend lmcache`) and P2pNcclConnector
  (not in vLLM 0.33) export no series of their own.

The connectors are those vLLM resolves (emulator.kv_connectors): a MultiConnector of a P/D connector and
OffloadingConnector shows both sets; `--kv-offloading-size` replaces a P/D connector, whose series then
do not appear. A KV consumer (the resolved `kv_role` kv_consumer or kv_both, which `--kv-offloading-size`
sets) also gets `vllm:num_requests_kv_fetch_by_stage`. The emulator's own series, on the front door:

    vllm_emulator:kv_tier_hit_tokens_total{cluster_instance,tier}   prompt tokens loaded from the tier
    vllm_emulator:kv_tier_usage_perc{cluster_instance,tier}         share of the tier's capacity holding blocks
    vllm_emulator:kv_transfer_bytes_total{cluster_instance,direction}  P/D KV received (decode) or sent (prefill)

A pool shared by several instances (lmcache) shows its usage under each of them.

A cluster instance that fails is a dead vLLM pod (as server.metrics shows it): its engines' connector
series leave these metrics until it is restored, and the restored pod is a new process whose series start
again as a fresh engine's do (the deprecated offload series and the NIXL, Mooncake and fetch-stage series
bound at once, the rest from their first payload or step), counting only what happens from then on. The
emulator's own series count on across the fault.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from emulator.disaggregation import DEFAULT_CONNECTOR
from emulator.engine import Engine
from emulator.instance import Instance
from emulator.kv_stats import KV_FETCH_STAGES, KVMove, kv_fetch_stages
from emulator.kv_tiers import StoreJob
from emulator.simulation import Simulation

LABELS = ["model_name", "engine"]
OFFLOADING, NIXL, MOONCAKE = "OffloadingConnector", "NixlConnector", "MooncakeConnector"
LOAD, STORE = "CPU_to_GPU", "GPU_to_CPU"  # vLLM's transfer_type of the deprecated offload series

# -- buckets (vLLM's, per connector) ------------------------------------------------------------
OFFLOAD_TRANSFER_SIZE_BUCKETS = (1e6, 5e6, 10e6, 20e6, 40e6, 60e6, 80e6, 100e6, 150e6, 200e6)
CPU_ALLOCATION_SIZE_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144)
LOOKUP_SYNC_DELAY_BUCKETS = (0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1)
LOOKUP_ASYNC_DELAY_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10)
NIXL_POST_TIME_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 5.0)
XFER_TIME_BUCKETS = NIXL_POST_TIME_BUCKETS[1:]          # NIXL's and Mooncake's transfer time
XFER_BYTES_BUCKETS = tuple(2 ** (10 + i) for i in range(1, 25, 2))  # 2 KiB .. 8 GiB
DESCRIPTOR_BUCKETS = (10, 20, 30, 50, 75, 100, 200, 400, 1000, 2000, 4000, 10000, 20000, 50000)

CONFIG_INFO_KEYS = ("cpu_num_chunks", "cpu_blocks_per_chunk", "cpu_kv_cache_size_bytes", "cpu_kv_cache_size_tokens")
CONFIG_INFO_HELP = (
    "Static configuration of the KV offload managers of this engine instance. The configured offloading spec "
    "declares the label names, and each manager fills the values, so a series appears from the first scheduler "
    "step of its engine. A manager reports one series for each configuration it holds, and a label of its own "
    "tells the series apart. Each engine reports its own configuration, not the instance total.")


def connectors_of(instance: Instance) -> frozenset[str]:
    """The KV connectors vLLM runs for the instance, as it resolves them (a MultiConnector's children);
    NixlConnector for a cluster file's P/D role given without a kv-transfer-config."""
    connectors = instance.deployment.config.kv_connectors
    if not connectors.transfer and instance.role != "mixed":
        return frozenset({DEFAULT_CONNECTOR})
    return frozenset(connectors.names())


def is_kv_consumer(instance: Instance) -> bool:
    """vLLM's KVTransferConfig.is_kv_consumer: the resolved kv_role is kv_consumer or kv_both (which
    --kv-offloading-size sets); a cluster file's decode role stands for kv_consumer."""
    connectors = instance.deployment.config.kv_connectors
    if not connectors.transfer:
        return instance.role == "decode"
    return connectors.role in ("kv_consumer", "kv_both")


def _declare_offloading(registry: CollectorRegistry, stores_skipped: bool) -> dict:
    """OffloadPromMetrics' families, in vLLM's order (deprecated, then the CPU spec's, then the connector's)."""
    def counter(name, doc, extra=()):
        return Counter(name, doc, LABELS + list(extra), registry=registry)

    def gauge(name, doc, extra=()):
        return Gauge(name, doc, LABELS + list(extra), registry=registry)

    def histogram(name, doc, buckets, extra=()):
        return Histogram(name, doc, LABELS + list(extra), buckets=buckets, registry=registry)

    pinned = "Fraction of CPU KV-cache space currently pinned by "
    return {
        "total_bytes": counter("vllm:kv_offload_total_bytes", "Number of bytes offloaded by KV connector",
                               ("transfer_type",)),
        "total_time": counter("vllm:kv_offload_total_time", "Total time measured by all KV offloading operations",
                              ("transfer_type",)),
        "size": histogram("vllm:kv_offload_size", "Histogram of KV offload transfer size, in bytes.",
                          OFFLOAD_TRANSFER_SIZE_BUCKETS, ("transfer_type",)),
        "cpu_usage": gauge("vllm:kv_offload_cpu_cache_usage_perc",
                           pinned + "active transfers (0.0 = idle, 1.0 = saturated). Sustained high values indicate "
                           "transfers (stores or promotions) may be dropped due to insufficient capacity."),
        "cpu_write_usage": gauge("vllm:kv_offload_cpu_cache_write_usage_perc",
                                 pinned + "in-flight stores that have not yet completed (0.0 = idle, "
                                 "1.0 = saturated)."),
        "cpu_read_usage": gauge("vllm:kv_offload_cpu_cache_read_usage_perc",
                                pinned + "in-flight loads that have not yet completed (0.0 = idle, 1.0 = saturated)."),
        "allocation_size": histogram("vllm:kv_offload_cpu_allocation_size",
                                     "Histogram of the number of CPU chunks requested by each KV offload prepare_store "
                                     "call.", CPU_ALLOCATION_SIZE_BUCKETS),
        **({"stores_skipped": counter("vllm:kv_offload_stores_skipped", "Number of KV offload stores skipped "
                                      "because the reuse threshold was not reached.")} if stores_skipped else {}),
        "load_bytes": counter("vllm:kv_offload_load_bytes", "Total bytes loaded from offload storage to GPU."),
        "load_time": counter("vllm:kv_offload_load_time", "Total load time from offload storage to GPU, in seconds."),
        "load_size": histogram("vllm:kv_offload_load_size", "Histogram of KV offload load operation size, in bytes.",
                               OFFLOAD_TRANSFER_SIZE_BUCKETS),
        "store_bytes": counter("vllm:kv_offload_store_bytes", "Total bytes stored from GPU to offload storage."),
        "store_time": counter("vllm:kv_offload_store_time",
                              "Total store time from GPU to offload storage, in seconds."),
        "store_size": histogram("vllm:kv_offload_store_size",
                                "Histogram of KV offload store operation size, in bytes.",
                                OFFLOAD_TRANSFER_SIZE_BUCKETS),
        "lookup_sync": histogram("vllm:kv_offload_lookup_sync_delay_seconds",
                                 "Histogram of the time spent in a single offload lookup call, in seconds.",
                                 LOOKUP_SYNC_DELAY_BUCKETS),
        "lookup_async": histogram("vllm:kv_offload_lookup_async_delay_seconds",
                                  "Histogram of time between a request's offload lookup first deferring and the "
                                  "following lookup resolving, or request finish, in seconds.",
                                  LOOKUP_ASYNC_DELAY_BUCKETS),
        "allocation_failure": counter("vllm:kv_offload_allocation_failure",
                                      "Number of KV offload store allocation attempts that failed."),
        "config_info": gauge("vllm:kv_offload_config_info", CONFIG_INFO_HELP, CONFIG_INFO_KEYS),
    }


def _declare_nixl(registry: CollectorRegistry) -> dict:
    """NixlPromMetrics' families."""
    return {
        "xfer_time": Histogram("vllm:nixl_xfer_time_seconds",
                               "Histogram of transfer duration for NIXL KV Cache transfers.", LABELS,
                               buckets=XFER_TIME_BUCKETS, registry=registry),
        "post_time": Histogram("vllm:nixl_post_time_seconds",
                               "Histogram of transfer post time for NIXL KV Cache transfers.", LABELS,
                               buckets=NIXL_POST_TIME_BUCKETS, registry=registry),
        "bytes": Histogram("vllm:nixl_bytes_transferred",
                           "Histogram of bytes transferred per NIXL KV Cache transfers.", LABELS,
                           buckets=XFER_BYTES_BUCKETS, registry=registry),
        "descriptors": Histogram("vllm:nixl_num_descriptors",
                                 "Histogram of number of descriptors per NIXL  KV Cache transfers.", LABELS,
                                 buckets=DESCRIPTOR_BUCKETS, registry=registry),
        "failed": Counter("vllm:nixl_num_failed_transfers",
                          "Number of failed NIXL KV Cache transfers, including handshake and notification failures. "
                          "NOTE: KV expiry is tracked separately in vllm:nixl_num_kv_expired_reqs.", LABELS,
                          registry=registry),
        "failed_notifications": Counter("vllm:nixl_num_failed_notifications",
                                        "Number of failed NIXL KV Cache notifications. Retained for compatibility; "
                                        "these failures are also included in vllm:nixl_num_failed_transfers.",
                                        LABELS, registry=registry),
        "expired": Counter("vllm:nixl_num_kv_expired_reqs",
                           "Number of requests that had their KV expire. NOTE: This metric is tracked on the P "
                           "instance.", LABELS, registry=registry),
        "late": Counter("vllm:nixl_num_notifications_after_expiry",
                        "Number of completion notifications for requests that were no longer tracked, usually because "
                        "their KV lease expired. The KV blocks may have been reused before the transfer finished. "
                        "Counted per notification (one per remote rank), not per request.", LABELS, registry=registry),
    }


def _declare_mooncake(registry: CollectorRegistry) -> dict:
    """MooncakePromMetrics' families."""
    return {
        "xfer_time": Histogram("vllm:mooncake_xfer_time_seconds",
                               "Histogram of transfer duration for Mooncake KV Cache transfers.", LABELS,
                               buckets=XFER_TIME_BUCKETS, registry=registry),
        "bytes": Histogram("vllm:mooncake_bytes_transferred",
                           "Histogram of bytes transferred per Mooncake KV Cache transfer.", LABELS,
                           buckets=XFER_BYTES_BUCKETS, registry=registry),
        "descriptors": Histogram("vllm:mooncake_num_descriptors",
                                 "Histogram of number of descriptors per Mooncake KV Cache transfer.", LABELS,
                                 buckets=DESCRIPTOR_BUCKETS, registry=registry),
        "failed": Counter("vllm:mooncake_num_failed_transfers", "Number of failed Mooncake KV Cache transfers.",
                          LABELS, registry=registry),
        "failed_recvs": Counter("vllm:mooncake_num_failed_recvs", "Number of failed Mooncake KV Cache receives.",
                                LABELS, registry=registry),
        "expired": Counter("vllm:mooncake_num_kv_expired_reqs",
                           "Number of requests that had their KV expire. NOTE: This metric is tracked on the P "
                           "instance.", LABELS, registry=registry),
    }


def _declare_fetch(registry: CollectorRegistry) -> Gauge:
    return Gauge("vllm:num_requests_kv_fetch_by_stage",
                 "Number of waiting requests by async KV load stage. Stage labels: 'waiting_to_start' = needs an "
                 "async KV load that has not started; 'in_progress' = load started and not yet reported finished; "
                 "'completed_waiting' = load finished, request not running yet.", LABELS + ["stage"],
                 registry=registry)


class _OffloadSeries:
    """One engine's OffloadingConnector series and what they have counted so far."""

    def __init__(self, families: dict, labels: list[str], engine: Engine, max_model_len: int) -> None:
        self.families = families
        self.labels = labels
        self.engine = engine
        tier = engine.kv.offload.tiers[0]
        self.tier = tier
        self.chunk = engine.kv.offload.blocks_per_chunk  # blocks in one of vLLM's CPU chunks
        self.world = engine.config.world_size
        self.children: dict[str, object] = {}
        for transfer_type in (LOAD, STORE):  # vLLM binds the deprecated series per engine at start
            for key in ("total_bytes", "total_time", "size"):
                families[key].labels(*labels, transfer_type)
        self.offload = offload = engine.kv.offload
        # the offload's counters as far as they are counted (at a restore, what the dead process counted)
        self.skipped = offload.stores_skipped
        self.failures = offload.allocation_failures
        self.lookups = offload.lookups
        self.steps = engine.num_steps  # the engine's steps before this process started
        chunks = tier.capacity_blocks // self.chunk
        chunks_per_request = -(-max_model_len // (engine.config.block_size * self.chunk))
        self.config_info = (str(chunks), str(self.chunk), str(int(tier.capacity_blocks * tier.block_bytes)),
                            str(chunks * max_model_len // chunks_per_request))

    def child(self, key: str, *extra: str):
        """A flat series' child, bound on its first use (vLLM binds them as payloads arrive)."""
        child = self.children.get(key)
        if child is None:
            child = self.children[key] = self.families[key].labels(*self.labels, *extra)
        return child

    def transfer(self, kind: str, num_bytes: float, seconds: float) -> None:
        """A load (CPU_to_GPU) or store job ended: every rank reports its share of it."""
        prefix, transfer_type = ("load", LOAD) if kind == "load" else ("store", STORE)
        share = num_bytes / self.world
        self.child(f"{prefix}_bytes").inc(num_bytes)
        self.child(f"{prefix}_time").inc(seconds * self.world)
        size = self.child(f"{prefix}_size")
        deprecated = self.families["size"].labels(*self.labels, transfer_type)
        for _ in range(self.world):
            size.observe(share)
            deprecated.observe(share)
        self.families["total_bytes"].labels(*self.labels, transfer_type).inc(num_bytes)
        self.families["total_time"].labels(*self.labels, transfer_type).inc(seconds * self.world)

    def allocation(self, chunks: int) -> None:
        """A store asked the CPU tier for `chunks` (vLLM's prepare_store), whether it found room or not."""
        self.child("allocation_size").observe(chunks)

    def stored(self, job: StoreJob) -> None:
        """The scheduler learned a store job ended: its blocks and its copy's own time."""
        self.transfer("store", job.num_blocks * self.tier.block_bytes, job.end - job.start)

    def read(self, loading_blocks: int) -> None:
        """The gauges of vLLM's CPU manager, once the engine has stepped: chunks pinned by stores the scheduler
        has not seen complete (its _num_write_pending_chunks: the offload's store jobs queued and in flight)
        and by loads in flight, over the tier's chunks."""
        if self.engine.num_steps == self.steps:
            return  # (its manager reports from the process's first step)
        capacity = self.tier.capacity_blocks // self.chunk
        offload = self.offload
        writing = sum(len(job.keys) for job in offload.queued) + sum(len(job.keys) for job in offload.in_flight)
        usage = (writing + -(-loading_blocks // self.chunk)) / capacity if capacity else 0.0
        write = writing / capacity if capacity else 0.0
        self.child("cpu_usage").set(usage)
        self.child("cpu_write_usage").set(write)
        self.child("cpu_read_usage").set(max(usage - write, 0.0))
        self.child("config_info", *self.config_info).set(1)
        if self.offload.store_threshold >= 2:  # each step's stats add the chunks their stores skipped
            self.child("stores_skipped").inc(self.offload.stores_skipped - self.skipped)
            self.skipped = self.offload.stores_skipped
        if self.offload.allocation_failures > self.failures:
            self.child("allocation_failure").inc(self.offload.allocation_failures - self.failures)
            self.failures = self.offload.allocation_failures
        if self.offload.lookups > self.lookups:
            lookup = self.child("lookup_sync")
            for _ in range(self.offload.lookups - self.lookups):
                lookup.observe(0.0)
            self.lookups = self.offload.lookups
        if self.offload.async_delays:
            lookup = self.child("lookup_async")
            for delay in self.offload.async_delays:
                lookup.observe(delay)
            self.offload.async_delays.clear()


class _TransferSeries:
    """One engine's NIXL or Mooncake series, and the counters already carried over to them."""

    def __init__(self, families: dict, labels: list[str], seen: dict[str, int]) -> None:
        self.series = {key: family.labels(*labels) for key, family in families.items()}
        self.seen = dict(seen)  # at a restore, what the dead process counted

    def observe(self, move: KVMove) -> None:
        s = self.series
        share = move.num_bytes / move.ranks
        for _ in range(move.ranks):  # each rank-to-rank transfer, as each worker records it
            s["xfer_time"].observe(move.seconds)
            s["bytes"].observe(share)
            s["descriptors"].observe(move.descriptors)
            if "post_time" in s:
                s["post_time"].observe(0.0)

    def carry(self, key: str, series: str, total: int) -> None:
        if total > self.seen[key]:
            self.series[series].inc(total - self.seen[key])
            self.seen[key] = total


class ConnectorMetrics(Collector):
    """The KV connector series of a simulation's engines, in one registry.

    `engines` picks which engines (default: all), labelled "0".."n-1" in that order, as
    server.metrics.EngineMetrics labels them; `emulator_series` adds the vllm_emulator: series of
    every instance (the front door's)."""

    def __init__(self, sim: Simulation, registry: CollectorRegistry, engines: Sequence[int] | None = None,
                 emulator_series: bool = False) -> None:
        self.sim = sim
        self.engines = list(range(len(sim.engines))) if engines is None else list(engines)
        self.emulator_series = emulator_series
        registry.register(self)  # first: its collect() brings the families below up to date
        self.offload: dict[int, _OffloadSeries] = {}
        self.nixl: dict[int, _TransferSeries] = {}
        self.mooncake: dict[int, _TransferSeries] = {}
        self.fetch: dict[int, dict[str, Gauge]] = {}
        self._labels = {index: str(label) for label, index in enumerate(self.engines)}
        families = self._families = {}
        for index in self.engines:
            instance = sim.instance_of[index]
            connectors = connectors_of(instance)
            if OFFLOADING in connectors:
                if OFFLOADING not in families:
                    families[OFFLOADING] = _declare_offloading(registry, any(
                        sim.engines[i].kv.offload is not None and sim.engines[i].kv.offload.store_threshold >= 2
                        for i in self.engines))
                offload = sim.engines[index].kv.offload
                offload.store_listeners.append(lambda chunks, blocks, i=index: self._on_store(i, chunks))
                offload.job_listeners.append(lambda job, i=index: self._on_store_job(i, job))
            for name, declare in ((NIXL, _declare_nixl), (MOONCAKE, _declare_mooncake)):
                if name in connectors and name not in families:
                    families[name] = declare(registry)
            if is_kv_consumer(instance) and "fetch" not in families:
                families["fetch"] = _declare_fetch(registry)
            self._start(index)
        if self.offload or self.nixl or self.mooncake:
            sim.transfers.listeners.append(self._on_move)
        sim.add_engine_down_listener(self._on_engine_down)
        sim.add_restore_listener(self._on_restore)

    def _start(self, index: int) -> None:
        """The series of a vLLM process starting on the engine: those it binds at once, counting from now."""
        sim, families = self.sim, self._families
        instance, engine = sim.instance_of[index], sim.engines[index]
        labels = [instance.served_model_names[0], self._labels[index]]
        connectors = connectors_of(instance)
        stats = sim.transfers.stats[index]
        if OFFLOADING in connectors:
            self.offload[index] = _OffloadSeries(families[OFFLOADING], labels, engine,
                                                 instance.deployment.config.max_model_len)
        seen = {"failed": stats.pd_failed, "expired": stats.pd_expired, "late": stats.pd_late_reads}
        for name, table in ((NIXL, self.nixl), (MOONCAKE, self.mooncake)):
            if name in connectors:
                table[index] = _TransferSeries(families[name], labels, seen)
        if is_kv_consumer(instance):
            self.fetch[index] = {stage: families["fetch"].labels(*labels, stage) for stage in KV_FETCH_STAGES}

    # -- faults -------------------------------------------------------------------------------
    def _on_engine_down(self, engine: int, now: float) -> None:
        """Its pod died: its scrape fails, so none of its connector series is seen until a new process is up."""
        label = self._labels.get(engine)
        if label is None:
            return
        for family in self._families.values():
            for metric in family.values() if isinstance(family, dict) else (family,):
                metric.remove_by_labels({"engine": label})

    def _on_restore(self, instance: Instance) -> None:
        """A new vLLM process on the instance: its engines' connector series start afresh."""
        for engine in instance.engines:
            if engine.index in self._labels:
                self._start(engine.index)

    def _down(self, engine: int) -> bool:
        return not self.sim.instance_of[engine].up

    # -- events from the simulation -----------------------------------------------------------
    def _on_move(self, move: KVMove) -> None:
        if move.kind == "load":
            if self._down(move.engine):
                return
            series = self.offload.get(move.engine)
            if series is not None:
                series.transfer("load", move.num_bytes, move.seconds)
            return
        nixl = self.nixl.get(move.engine)  # NIXL: the decode side pulls and records
        if nixl is not None and not self._down(move.engine):
            nixl.observe(move)
        mooncake = self.mooncake.get(move.source_engine) if move.source_engine is not None else None
        if mooncake is not None and not self._down(move.source_engine):  # Mooncake: the prefill side pushes
            mooncake.observe(move)

    def _on_store(self, engine: int, chunks: int) -> None:
        if not self._down(engine):
            self.offload[engine].allocation(chunks)

    def _on_store_job(self, engine: int, job: StoreJob) -> None:
        if not self._down(engine):
            self.offload[engine].stored(job)

    # -- at each scrape ---------------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        stats = self.sim.transfers.stats
        for index in self.engines:
            if self._down(index):  # a dead pod's series are gone
                continue
            s = stats[index]
            offload, nixl, mooncake = self.offload.get(index), self.nixl.get(index), self.mooncake.get(index)
            if offload is not None:
                offload.read(s.tier_loading_blocks)
            if nixl is not None:
                nixl.carry("failed", "failed", s.pd_failed)
                nixl.carry("expired", "expired", s.pd_expired)
                nixl.carry("late", "late", s.pd_late_reads)
            if mooncake is not None:
                mooncake.carry("failed", "failed_recvs", s.pd_failed)
                mooncake.carry("expired", "expired", s.pd_expired)
            gauges = self.fetch.get(index)
            if gauges is not None:
                for stage, count in kv_fetch_stages(self.sim.engines[index]).items():
                    gauges[stage].set(count)
        if self.emulator_series:
            yield from self._emulator_series()

    def _emulator_series(self) -> Iterator[Metric]:
        stats = self.sim.transfers.stats
        hits = CounterMetricFamily("vllm_emulator:kv_tier_hit_tokens",
                                   "Prompt tokens loaded from a KV offload tier (CPU, CXL, a shared LMCache pool), "
                                   "by instance and tier.", labels=("cluster_instance", "tier"))
        usage = GaugeMetricFamily("vllm_emulator:kv_tier_usage_perc",
                                  "Share of a KV offload tier's capacity holding blocks, by instance and tier. "
                                  "1 means 100 percent usage.", labels=("cluster_instance", "tier"))
        moved = CounterMetricFamily("vllm_emulator:kv_transfer_bytes",
                                    "KV bytes moved by P/D transfers, received by a decode instance or sent by a "
                                    "prefill instance.", labels=("cluster_instance", "direction"))
        for instance in self.sim.instances:
            tiers: dict[str, list] = {}  # name -> [hit tokens, held blocks, capacity]
            seen: set[int] = set()
            for engine in instance.engines:
                if engine.kv.offload is None:
                    continue
                loaded = stats[engine.index].tier_loaded_blocks
                for tier in engine.kv.offload.tiers:
                    row = tiers.setdefault(tier.spec.name, [0, 0, 0])
                    row[0] += loaded.get(tier, 0) * engine.config.block_size
                    if id(tier) not in seen:
                        seen.add(id(tier))
                        row[1] += tier.num_held
                        row[2] += tier.capacity_blocks
            for name, (tokens, held, capacity) in tiers.items():
                hits.add_metric((instance.name, name), tokens)
                usage.add_metric((instance.name, name), held / capacity if capacity else 0.0)
            if instance.role != "mixed" or instance.deployment.config.kv_transfer:
                mine = [stats[e.index] for e in instance.engines]
                moved.add_metric((instance.name, "received"), sum(s.pd_load_bytes for s in mine))
                moved.add_metric((instance.name, "sent"), sum(s.pd_sent_bytes for s in mine))
        for family in (hits, usage, moved):
            if family.samples:  # a cluster without tiers or P/D shows none of them
                yield family
