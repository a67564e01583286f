"""What a simulation's KV connectors moved, counted per engine, and replay's summary of it.

The counters (`EngineKVStats`) are running totals that emulator.disaggregation keeps as P/D
transfers and loads from offload tiers start and end; the tiers themselves count what they stored,
loaded and evicted (emulator.kv_tiers). A finished transfer is also handed, as a `KVMove`, to the
listeners of `KVTransfers` (the server's connector metrics, replay's `TransferTimes`), and each
store to an `Offload`'s store listeners: a replay nobody listens to pays a few additions per
transfer and nothing per store.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from emulator.engine import Engine
    from emulator.simulation import Simulation

# vLLM's waiting requests with an async KV load, by stage (v1/metrics/stats.py KV_FETCH_STAGES)
KV_FETCH_STAGES = ("waiting_to_start", "in_progress", "completed_waiting")


@dataclass(eq=False)
class EngineKVStats:
    """One engine's KV connector traffic since the start, as vLLM's connectors count it."""
    # loads from its offload tiers (vLLM's OffloadingConnector: CPU_to_GPU jobs)
    tier_loads: int = 0
    tier_load_bytes: float = 0.0
    tier_load_seconds: float = 0.0       # start to end of each load, summed
    tier_loaded_blocks: dict = field(default_factory=dict)  # KVTier -> blocks loaded from it
    tier_loading_blocks: int = 0         # blocks of its nearest tier that loads in flight are reading
    # P/D, the decode side: KV loaded from a prefill
    pd_loads: int = 0
    pd_load_bytes: float = 0.0
    pd_load_seconds: float = 0.0         # start to end of each transfer, summed
    pd_failed: int = 0                   # loads that failed (prefill gone, TPs refused): per kv_load_failure_policy
    pd_query_tokens: int = 0             # tokens asked of a prefill (prompts less their local prefix hits)
    # P/D, the prefill side: its finished prefills, held for a decode side
    pd_sent: int = 0                     # transfers a decode side of this simulation read from it
    pd_sent_bytes: float = 0.0
    pd_expired: int = 0                  # held prefills whose lease ran out before a decode side read them
    pd_late_reads: int = 0               # rank-to-rank reads that ended after the prefill's lease had


@dataclass(frozen=True, slots=True)
class KVMove:
    """One finished KV transfer into an engine's GPUs, for listeners."""
    kind: str                  # "pd": from a prefill; "load": from the engine's offload tiers
    engine: int | None         # the engine that received it (None: another process: a remote read's notice)
    source_engine: int | None  # pd: the prefill's engine in this simulation (None: another process)
    connector: str             # vLLM's connector name (tier loads: OffloadingConnector)
    num_bytes: float
    seconds: float             # from the start of the transfer to its end
    blocks: int                # blocks of the receiving engine it filled
    ranks: int                 # rank-to-rank transfers it ran as (each of vLLM's workers reports its own)
    descriptors: int           # per rank-to-rank transfer, as the connector counts them


class TransferTimes:
    """The duration of every P/D transfer of a run, by receiving engine (replay's summary needs
    their percentiles; a long-running server keeps histograms instead)."""

    def __init__(self, sim: Simulation) -> None:
        self.by_engine: dict[int, list[float]] = {}
        sim.transfers.listeners.append(self._on_move)

    def _on_move(self, move: KVMove) -> None:
        if move.kind == "pd" and move.engine is not None:
            self.by_engine.setdefault(move.engine, []).append(move.seconds)


def kv_fetch_stages(engine: Engine) -> dict[str, int]:
    """The engine's waiting requests with a KV load, by vLLM's stage: not started yet (no room for
    its blocks), in flight, or loaded and not yet running."""
    counts = dict.fromkeys(KV_FETCH_STAGES, 0)
    for request in engine.scheduler.waiting:
        if request.kv_loading:
            counts["in_progress"] += 1
        elif request.kv_blocks is not None:
            counts["completed_waiting"] += 1
        elif request.external_kv is not None:
            counts["waiting_to_start"] += 1
    return counts


def has_pd(sim: Simulation) -> bool:
    """Does the simulation disaggregate: an instance with a P/D role or a KV connector configured?"""
    return any(i.role != "mixed" or i.deployment.config.kv_transfer for i in sim.instances)


# -- replay's summary ------------------------------------------------------------------------
def kv_summary(sim: Simulation, times: TransferTimes) -> dict:
    """summary.json's `kv_tiers` (when an engine offloads) and `kv_transfers` (when the simulation
    disaggregates) sections; nothing otherwise."""
    out = {}
    if any(e.kv.offload is not None for e in sim.engines):
        out["kv_tiers"] = kv_tiers_summary(sim)
    if has_pd(sim):
        out["kv_transfers"] = kv_transfers_summary(sim, times)
    return out


def kv_tiers_summary(sim: Simulation) -> dict:
    """Per tier name and per instance: blocks stored, loaded and evicted, capacity, usage at the end,
    prompt tokens loaded from the tier (hits) over the prompt tokens looked up in the tiers.

    A pool shared by several instances (lmcache) counts its stores, evictions and usage once per
    tier name; under each instance it shows the pool's, with `shared`."""
    stats = sim.transfers.stats
    by_instance: dict[str, dict] = {}
    by_tier: dict[str, dict] = {}
    counted: set[int] = set()  # tiers already in by_tier
    for instance in sim.instances:
        rows: dict[str, dict] = {}
        seen: set[int] = set()
        for engine in instance.engines:
            offload = engine.kv.offload
            if offload is None:
                continue
            s = stats[engine.index]
            queried = engine.kv.external_queries - s.pd_query_tokens
            for tier in offload.tiers:
                name = tier.spec.name
                hits = s.tier_loaded_blocks.get(tier, 0) * engine.config.block_size
                for table, fresh in ((rows, id(tier) not in seen), (by_tier, id(tier) not in counted)):
                    row = table.setdefault(name, _tier_row(offload.shared))
                    row["loaded_blocks"] += s.tier_loaded_blocks.get(tier, 0)
                    row["hit_tokens"] += hits
                    row["queried_tokens"] += queried
                    if fresh:
                        row["capacity_blocks"] += tier.capacity_blocks
                        row["held_blocks"] += tier.num_held
                        row["stored_blocks"] += tier.stored
                        row["evicted_blocks"] += tier.evicted
                seen.add(id(tier))
                counted.add(id(tier))
        if rows:
            by_instance[instance.name] = {name: _finish_row(row) for name, row in rows.items()}
    return {"by_tier": {name: _finish_row(row) for name, row in by_tier.items()}, "by_instance": by_instance}


def _tier_row(shared: bool) -> dict:
    return {"shared": shared, "capacity_blocks": 0, "held_blocks": 0, "stored_blocks": 0, "loaded_blocks": 0,
            "evicted_blocks": 0, "hit_tokens": 0, "queried_tokens": 0}


def _finish_row(row: dict) -> dict:
    row["hit_rate"] = row["hit_tokens"] / row["queried_tokens"] if row["queried_tokens"] else 0.0
    row["usage"] = row["held_blocks"] / row["capacity_blocks"] if row["capacity_blocks"] else 0.0
    return row


def kv_transfers_summary(sim: Simulation, times: TransferTimes) -> dict:
    """P/D transfers, in all and per receiving instance: how many ended, bytes, how many failed (the
    request ended with an error, or recomputed its prompt: kv_load_failure_policy), leases that ran out
    unread (counted on the prefill's instance), and the time from a transfer's start to its end (mean, p99)."""
    stats = sim.transfers.stats
    by_instance = {}
    for instance in sim.instances:
        mine = [stats[e.index] for e in instance.engines]
        seconds = [t for e in instance.engines for t in times.by_engine.get(e.index, ())]
        row = _transfer_row(mine, seconds)
        if row["count"] or row["failed"] or row["expired_leases"]:
            by_instance[instance.name] = row
    everything = [t for ts in times.by_engine.values() for t in ts]
    total = _transfer_row(stats, everything)
    total["by_instance"] = by_instance
    return total


def _transfer_row(stats: list[EngineKVStats], seconds: list[float]) -> dict:
    a = np.asarray(seconds, dtype=float)
    return {"count": sum(s.pd_loads for s in stats), "bytes": round(sum(s.pd_load_bytes for s in stats)),
            "failed": sum(s.pd_failed for s in stats), "expired_leases": sum(s.pd_expired for s in stats),
            "mean_s": float(a.mean()) if len(a) else None,
            "p99_s": float(np.percentile(a, 99)) if len(a) else None}
