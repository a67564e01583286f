"""Offload stores take time, as vLLM 0.33's OffloadingConnector runs them: a step's store job starts when the
step ends, crosses the host link (latency + bytes over the GPUs' links), one job after another, and the
scheduler learns it ended at the first step output at or after its end. Until then its chunks are neither
readable (a lookup reaching one is deferred: the request is skipped this step) nor evictable. A finished
request's last offer and its LRU/ARC end come at the next step. Virtual time only."""
from __future__ import annotations

import math

import numpy as np
import pytest

from emulator.cluster import ClusterSpec, build_cluster
from emulator.config import EngineArgs
from emulator.instance import InstanceSpec
from emulator.kv_tiers import TIER_POLICIES, KVTier, Offload, TierSpec
from emulator.request import Request
from profiles.deployment import build_deployment

BANDWIDTH, LATENCY, BLOCK_BYTES, LANES = 1e9, 1e-3, 1e6, 2


def offload(capacity_blocks: int = 100, policy: str = "lru", k: int = 1) -> Offload:
    tier = TIER_POLICIES[policy](TierSpec("cpu", capacity_blocks * BLOCK_BYTES, BANDWIDTH, LATENCY), BLOCK_BYTES, k)
    return Offload([tier], blocks_per_chunk=k, stores_in_flight=True, lanes=LANES)


def transfer_time(blocks: int) -> float:
    return LATENCY + blocks * BLOCK_BYTES / (LANES * BANDWIDTH)


@pytest.mark.parametrize("policy", ["lru", "arc"])
def test_a_block_being_stored_is_not_hit_until_the_step_after_its_copy_ends(policy):
    o = offload(policy=policy)
    a, b = object(), object()
    o.advance(0.0)
    o.store_full_blocks([1, 2, 3, 4], 0, 4, 4, a)  # scheduled at 0: its step computes the blocks
    assert o.lookup([1, 2, 3, 4, 5], 0, 5, b) is None  # in the tier, not readable: deferred
    o.step_ended(0.010)  # the step ends: the job starts (vLLM submits it at the next step's start)
    end = 0.010 + transfer_time(4)
    assert o.in_flight[0].start == 0.010 and o.in_flight[0].end == pytest.approx(end)  # 13 ms
    o.step_ended(end - 1e-6)  # a step whose output comes back just before the copy ends: not yet
    assert o.lookup([1, 2, 3, 4, 5], 0, 5, b) is None and o.storing
    o.advance(end)  # the next step's output (or, idle, the next schedule) reports it
    parts = o.lookup([1, 2, 3, 4, 5], 0, 5, b)
    assert [(t.spec.name, n) for t, n in parts] == [("cpu", 4)] and not o.storing and not o.tiers[0].pins
    assert o.async_delays == [pytest.approx(end)]  # vLLM's lookup_async_delay: first deferral (at 0) to hit
    assert o.lookup([9, 1], 0, 2, b) == []  # a miss before the stored run: no deferral
    assert o.async_delays == [pytest.approx(end)]


def test_a_lookup_defers_only_when_its_run_reaches_a_chunk_in_flight():
    o = offload(k=2)
    o.store([1, 2, 3, 4])
    o.step_ended(1.0)
    o.advance(2.0)  # (1, 2) and (3, 4) are readable
    o.store([5, 6])
    assert [n for _, n in o.lookup([1, 2, 3, 4, 7, 8], 0, 6)] == [4]  # stops at a miss before (5, 6)
    assert o.lookup([1, 2, 3, 4, 5, 6], 0, 6) is None  # (5, 6) is being stored
    assert [n for _, n in o.lookup([1, 2, 3, 4, 5, 6], 0, 3)] == [2]  # a run that ends before it


def test_jobs_run_one_after_another_on_the_link():
    o = offload()
    o.store([1, 2])
    o.store([3, 4, 5, 6])
    o.step_ended(0.5)
    first, second = o.in_flight
    assert first.end == pytest.approx(0.5 + transfer_time(2))
    assert second.start == first.end and second.end == pytest.approx(first.end + transfer_time(4))
    o.advance(first.end)
    assert list(o.storing) == [3, 4, 5, 6] and o.lookup([1, 2], 0, 2) and o.lookup([3], 0, 1) is None


@pytest.mark.parametrize("policy", ["lru", "arc"])
def test_a_chunk_in_flight_is_not_evicted_and_a_store_needing_its_room_fails_until_the_copy_ends(policy):
    o = offload(capacity_blocks=4, policy=policy)
    a, b = object(), object()
    o.store_full_blocks([1, 2, 3, 4], 0, 4, 4, a)
    o.store_full_blocks([5, 6], 0, 2, 2, b)
    assert o.allocation_failures == 1 and b in o.failed and o.tiers[0].num_held == 4  # nothing evictable
    o.retry(b, [5, 6], 2, 2)  # (the step's own retry passes over a store that failed in it)
    o.step_ended(0.1)
    o.retry(b, [5, 6], 2, 2)  # the next step: A's copy is still in flight
    assert o.allocation_failures == 2 and all(o.tiers[0].holds(h) for h in (1, 2, 3, 4))
    o.advance(o.in_flight[-1].end)
    o.retry(b, [5, 6], 2, 2)
    assert b not in o.failed and o.tiers[0].holds(5) and o.tiers[0].holds(6) and o.tiers[0].num_held == 4
    assert o.lookup([5], 0, 1) is None  # B's own copy is in flight now


def test_a_finished_requests_failed_store_is_offered_again_at_the_next_step_not_when_it_is_freed():
    o = offload(capacity_blocks=2)
    a, b = object(), object()
    o.advance(0.0)
    o.store_full_blocks([1, 2], 0, 2, 2, a)
    o.store_full_blocks([3, 4], 0, 2, 2, b)  # no room: A's copy is in flight
    o.retry(b, [3, 4], 2, 2)
    o.step_ended(0.1)  # A's copy: 0.1 to 0.102
    o.advance(0.1)
    o.retry(b, [3, 4], 2, 2)
    assert o.allocation_failures == 2
    o.step_ended(0.2)  # the output that finishes B (A's copy is reported first) ...
    o.request_finished(b, [3, 4], 2, 2)
    assert o.step_work and not o.tiers[0].holds(3)  # ... frees it: nothing offered yet
    o.advance(0.2)  # the next schedule ...
    assert not o.tiers[0].holds(3)
    o.finish_requests()  # ... at its end, after its own offers (vLLM's finished_req_ids)
    assert o.tiers[0].holds(3) and o.tiers[0].holds(4) and not o.failed and not o.step_work
    assert o.allocation_failures == 2 and o.queued[0].created == 0.2


def test_an_idle_engine_applies_what_finished_before_its_next_schedule_as_of_then():
    """vLLM steps on while store jobs are pending: a request that finished before an idle gap made its last
    offer at once, and that offer's copy ended during the gap."""
    o = offload(capacity_blocks=2)
    a, b = object(), object()
    o.store_full_blocks([1, 2], 0, 2, 2, a)
    o.store_full_blocks([3, 4], 0, 2, 2, b)
    o.step_ended(0.1)
    o.advance(0.1)
    o.request_finished(b, [3, 4], 2, 2)  # (its failed store still owed)
    o.step_ended(0.2)  # A's copy ended: B's last offer at the next step
    o.advance(5.0)  # the next arrival, long after
    assert o.tiers[0].holds(3) and not o.failed and not o.finishing
    assert o.lookup([3, 4], 0, 2) and not o.storing  # its copy, started at 0.2, ended long ago


def test_a_request_with_its_own_store_in_flight_is_deferred_when_it_comes_back():
    o = offload()
    a = object()
    o.admit(a)
    o.store_full_blocks([1, 2], 0, 2, 2, a)
    lookups = o.lookups
    assert o.lookup([7, 8], 0, 2, a) is None  # preempted, looked up again: vLLM delays it (transfer_jobs) ...
    o.step_ended(0.0)
    o.advance(1.0)
    assert o.lookup([7, 8], 0, 2, a) == [] and o.lookups == lookups + 1  # ... before its lookup: not one,
    assert o.async_delays == []  # and no async delay timed


def test_clear_drops_the_jobs_in_flight():
    o = offload()
    o.store([1, 2])
    o.step_ended(0.0)
    o.clear()
    assert not (o.in_flight or o.storing or o.queued or o.tiers[0].pins) and o.link_free == 0.0


def test_stores_complete_at_once_without_stores_in_flight():
    o = Offload([KVTier(TierSpec("cpu", 10, 1e9, 0.0), 1.0)])
    o.store([1, 2])
    assert o.lookup([1, 2], 0, 2) and not o.storing and not o.queued


# -- through an engine -------------------------------------------------------------------------------------
def engine_run(host_bandwidth: float, before=None) -> tuple[dict[str, Request], Offload, object]:
    """A 1,000-token prompt A, then C (another 1,400 tokens) takes most of a 100-block GPU, evicting A's
    blocks from its prefix cache; then B repeats A's prompt, and D, a short prompt, comes after it. With a
    slow host link A's store is still in flight when B is looked up. `before(sim)` is called before the run."""
    d = build_deployment("meta-llama/Llama-3.1-8B", "H100", EngineArgs(max_model_len=1500, num_gpu_blocks_override=100,
                                                                       kv_offloading_size=4.0))
    sim = build_cluster(ClusterSpec((InstanceSpec("i0", d, ("m",), node="n0"),),
                                    nodes={"n0": {"host_memory_bandwidth": host_bandwidth}}))
    rng = np.random.default_rng(3)
    prompt_a, prompt_c = rng.integers(0, 30000, 1000), rng.integers(0, 30000, 1400)
    requests = [Request("a", 1000, 2, arrival_time=0.0, prompt_token_ids=prompt_a),
                Request("c", 1400, 2, arrival_time=0.3, prompt_token_ids=prompt_c),
                Request("b", 1000, 2, arrival_time=0.6, prompt_token_ids=prompt_a),
                Request("d", 100, 2, arrival_time=0.65, prompt_token_ids=rng.integers(0, 30000, 100))]
    if before is not None:
        before(sim)
    sim.run(requests)
    return {r.request_id: r for r in requests}, sim.engines[0].kv.offload, sim


def test_a_request_waits_for_the_store_its_prefix_is_in_then_loads_it():
    slow = 1e8  # 0.1 GB/s: A's 62 blocks (2 MiB each) take ~1.3 s to store
    requests, o, sim = engine_run(slow)
    a, b = requests["a"], requests["b"]
    assert all(r.is_finished for r in requests.values())
    block_bytes = o.tiers[0].block_bytes
    store_end = a.first_token_time + 62 * block_bytes / slow  # (at least: its chunks' copies, one after another)
    assert b.scheduled_time >= store_end - 0.05 and b.num_external_tokens >= 40 * 16  # then loaded
    assert requests["d"].scheduled_time < 0.7  # B is skipped while deferred, not head-of-line
    assert len(o.async_delays) == 1 and o.async_delays[0] == pytest.approx(store_end - 0.6, abs=0.05)  # then
    # its load: the same link's other direction, the blocks after those still in the GPU cache
    assert b.scheduled_time == pytest.approx(store_end + b.num_external_tokens // 16 * block_bytes / slow, abs=0.05)
    fast, fo, _ = engine_run(1e11)
    assert fast["b"].num_external_tokens >= 40 * 16 and fast["b"].scheduled_time < 0.7  # (before D: D took
    # some of A's blocks still in the GPU cache in the slow run, so B loads more there)
    assert not fo.async_delays
    for offload_ in (o, fo):  # conservation: nothing pinned or owed once the copies have ended
        offload_.advance(math.inf)
        tier = offload_.tiers[0]
        assert not (tier.pins or offload_.storing or offload_.queued or offload_.in_flight or offload_.failed)
        assert tier.stored - tier.evicted == tier.num_held
    assert sim.engines[0].kv.num_free_blocks == sim.engines[0].kv.pool.num_blocks - 1


def test_the_deferral_is_observed_in_vllms_lookup_async_delay_histogram():
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from server.connector_metrics import ConnectorMetrics
    registry = CollectorRegistry()
    requests, o, sim = engine_run(1e8, lambda sim: ConnectorMetrics(sim, registry))
    delay = o.async_delays[0]
    generate_latest(registry)  # (a scrape brings the series up to date: the next one shows them)
    found = {s.name: s.value for family in text_string_to_metric_families(generate_latest(registry).decode())
             for s in family.samples if s.name.startswith("vllm:kv_offload_lookup_async_delay_seconds")}
    assert found["vllm:kv_offload_lookup_async_delay_seconds_count"] == 1
    assert found["vllm:kv_offload_lookup_async_delay_seconds_sum"] == pytest.approx(delay) and not o.async_delays


def test_an_aborted_request_ends_its_offload_state_as_a_finished_one_does():
    """vLLM's _free_request tells the connector of an aborted request too: nothing of it stays in the tiers'
    books (a long-running server's clients leave all the time)."""
    d = build_deployment("meta-llama/Llama-3.1-8B", "H100", EngineArgs(max_model_len=1500, num_gpu_blocks_override=100,
                                                                        kv_offloading_size=4.0))
    sim = build_cluster(ClusterSpec((InstanceSpec("i0", d, ("m",), node="n0"),),
                                    nodes={"n0": {"host_memory_bandwidth": 1e9}}))
    rng = np.random.default_rng(3)
    for i in range(5):
        sim.submit(Request(f"a{i}", 600, 200, arrival_time=0.5 * i, prompt_token_ids=rng.integers(0, 30000, 600)))
        sim.advance(0.5 * (i + 1))
        assert sim.abort(f"a{i}")
    sim.advance(100.0)
    o = sim.engines[0].kv.offload
    tier = o.tiers[0]
    assert not o.requests and not o.failed and not o.deferred and not o.finishing
    assert tier._runs == 0 and not tier._passed and not tier._run_of
    assert tier.stored > 0  # the requests did offer blocks before they left
