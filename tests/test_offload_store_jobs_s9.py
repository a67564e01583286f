"""What vLLM 0.33's OffloadingConnector times, and when:

- a store job's bytes and transfer time are recorded when the worker finds the copy finished
  (offloading/worker.py get_finished), and reach the scheduler's stats with that step's output
  (offloading/scheduler.py update_connector_output): here, when the scheduler learns the job ended, with
  the job's chunks' blocks and the copy's own time (not its wait behind earlier jobs);
- a request held back by its own store jobs is not looked up (get_num_new_matched_tokens returns before
  its lookup): no lookup_sync observation, and no async-delay clock started;
- with prefix caching off, vLLM keeps no _chunks_being_loaded: a lookup is not held back by another
  request's load, but a chunk still being stored (HIT_PENDING) holds it back all the same.

Virtual time only."""
from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from emulator.cluster import ClusterSpec, build_cluster
from emulator.config import EngineArgs
from emulator.instance import InstanceSpec
from emulator.kv_tiers import KVTier, Offload, StoreJob, TierSpec
from emulator.request import Request
from profiles.deployment import build_deployment
from server.connector_metrics import ConnectorMetrics

BANDWIDTH, LATENCY, BLOCK_BYTES, LANES = 1e9, 1e-3, 1e6, 2


def offload(in_flight: bool = True, **kwargs) -> tuple[Offload, list[tuple[float, StoreJob]]]:
    """An offload whose job listener notes (the offload's time when it heard, the job)."""
    tier = KVTier(TierSpec("cpu", 100 * BLOCK_BYTES, BANDWIDTH, LATENCY), BLOCK_BYTES)
    o = Offload([tier], stores_in_flight=in_flight, lanes=LANES, **kwargs)
    heard: list[tuple[float, StoreJob]] = []
    o.job_listeners.append(lambda job: heard.append((o.now, job)))
    return o, heard


def copy_time(blocks: int) -> float:
    return LATENCY + blocks * BLOCK_BYTES / (LANES * BANDWIDTH)


# -- store jobs: reported when they end -----------------------------------------------------------------
def test_a_store_job_is_reported_when_the_scheduler_learns_it_ended_with_its_copys_own_time():
    o, heard = offload()
    a, b = object(), object()
    o.advance(0.0)
    o.store_full_blocks([1, 2, 3, 4], 0, 4, 4, a)
    o.store_full_blocks([5, 6], 0, 2, 2, b)
    assert not heard  # prepared: nothing copied yet
    o.step_ended(0.010)  # both start, one after the other on the link
    first_end = 0.010 + copy_time(4)
    second_end = first_end + copy_time(2)
    assert not heard
    o.step_ended(first_end + 1e-4)  # the first ended; the second not yet
    assert [(at, job.num_blocks) for at, job in heard] == [(pytest.approx(first_end + 1e-4), 4)]
    o.advance(second_end)
    (_, one), (at, two) = heard
    assert at == pytest.approx(second_end) and two.num_blocks == 2
    assert one.end - one.start == pytest.approx(copy_time(4))
    assert two.end - two.start == pytest.approx(copy_time(2))  # its wait behind the first is not its time
    assert two.start == pytest.approx(first_end)


def test_a_failed_store_makes_no_job_and_a_chunk_already_held_is_not_copied_again():
    o, heard = offload()
    o.store([1, 2])
    o.idle_until(0.0)
    o.advance(1.0)
    o.store([1, 2, 3])  # 1 and 2 are held: only 3 is copied
    o.idle_until(1.0)
    o.advance(2.0)
    assert [job.num_blocks for _, job in heard] == [2, 1]
    small, _ = offload()
    small.tiers[0].capacity_blocks = 2
    failed = []
    small.job_listeners.append(failed.append)
    assert not small.store([7, 8, 9]) and small.allocation_failures == 1
    small.idle_until(0.0)
    small.advance(1.0)
    assert not failed


def test_without_stores_in_flight_a_store_is_reported_as_it_is_made():
    o, heard = offload(in_flight=False)
    o.now = 3.0
    o.store([1, 2, 3])
    ((at, job),) = heard
    assert at == 3.0 and job.num_blocks == 3 and job.start == 3.0
    assert job.end - job.start == pytest.approx(copy_time(3))


# -- through an engine and its /metrics ----------------------------------------------------------------------
def engine(host_bandwidth: float):
    d = build_deployment("meta-llama/Llama-3.1-8B", "H100", EngineArgs(max_model_len=1500, num_gpu_blocks_override=100,
                                                                       kv_offloading_size=4.0))
    return build_cluster(ClusterSpec((InstanceSpec("i0", d, ("m",), node="n0"),),
                                     nodes={"n0": {"host_memory_bandwidth": host_bandwidth}}))


def scrape(registry: CollectorRegistry) -> dict[str, float]:
    generate_latest(registry)  # (a scrape brings the series up to date: the next one shows them)
    return {s.name: s.value for f in text_string_to_metric_families(generate_latest(registry).decode())
            for s in f.samples if s.name.startswith("vllm:kv_offload_") and "bucket" not in s.name}


def test_the_store_series_count_a_job_once_its_copy_is_reported_not_when_it_is_prepared():
    slow = 1e8  # 0.1 GB/s: a 1,000-token prompt's 62 blocks (2 MiB each) take ~1.3 s to copy
    sim = engine(slow)
    registry = CollectorRegistry()
    ConnectorMetrics(sim, registry)
    o = sim.engines[0].kv.offload
    jobs: list[StoreJob] = []
    o.job_listeners.append(jobs.append)
    prompt = np.random.default_rng(3).integers(0, 30000, 1000)
    request = Request("a", 1000, 2, arrival_time=0.0, prompt_token_ids=prompt)
    sim.submit(request)
    while request.first_token_time is None:
        sim.advance(sim.next_event_time())
    early = scrape(registry)
    assert o.in_flight or o.queued  # its copy runs
    assert early["vllm:kv_offload_cpu_allocation_size_count"] > 0  # prepared: allocation observed
    assert "vllm:kv_offload_store_bytes_total" not in early and not jobs
    assert early["vllm:kv_offload_total_bytes_total"] == 0  # (the deprecated series, bound at start)
    while (t := sim.next_event_time()) is not None:
        sim.advance(t)
    assert jobs and not (o.in_flight or o.queued)
    late = scrape(registry)
    cpu = o.tiers[0]
    stored = sum(job.num_blocks for job in jobs) * cpu.block_bytes
    assert stored == cpu.stored * cpu.block_bytes
    assert late["vllm:kv_offload_store_bytes_total"] == late["vllm:kv_offload_store_size_sum"] == stored
    assert late["vllm:kv_offload_store_size_count"] == len(jobs)
    seconds = sum(job.end - job.start for job in jobs)
    assert seconds == pytest.approx(len(jobs) * cpu.spec.latency + stored / cpu.spec.bandwidth)
    assert late["vllm:kv_offload_store_time_total"] == pytest.approx(seconds)
    assert seconds > 1.0  # (the copy's time at the slow link, as the jobs took it)


# -- a request held back by its own store jobs ---------------------------------------------------------------
def test_a_request_held_back_by_its_own_store_jobs_is_neither_looked_up_nor_timed():
    o, _ = offload()
    a = object()
    o.admit(a)
    o.store_full_blocks([1, 2], 0, 2, 2, a)
    lookups = o.lookups
    assert o.lookup([7, 8], 0, 2, a) is None  # preempted, asked about again: vLLM delays it (transfer_jobs)
    assert o.lookups == lookups and a not in o.deferred
    o.step_ended(0.0)
    o.advance(1.0)
    assert o.lookup([7, 8], 0, 2, a) == [] and o.lookups == lookups + 1
    assert o.async_delays == []  # no deferral of its lookup was timed


def test_a_clock_started_by_a_chunk_being_stored_runs_on_to_the_lookup_that_resolves():
    o, _ = offload()
    a, b = object(), object()
    o.advance(0.0)
    o.store_full_blocks([1, 2], 0, 2, 2, a)  # A stores the prefix B wants
    o.admit(b)
    assert o.lookup([1, 2, 3], 0, 3, b) is None and o.deferred[b] == 0.0  # HIT_PENDING: timed from 0
    o.step_ended(0.5)
    o.advance(0.5 + copy_time(2))
    parts = o.lookup([1, 2, 3], 0, 3, b)
    assert [n for _, n in parts] == [2] and o.async_delays == [pytest.approx(0.5 + copy_time(2))]


# -- prefix caching off --------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_another_requests_load_holds_a_lookup_back_only_with_prefix_caching_on(prefix_caching):
    o, _ = offload(prefix_caching=prefix_caching)
    o.store([1, 2, 3])
    o.idle_until(0.0)
    o.advance(1.0)
    a, b = object(), object()
    parts = o.lookup([1, 2, 3, 4], 0, 3, a)
    o.take([1, 2, 3, 4], 0, parts)  # A loads them
    found = o.lookup([1, 2, 3, 5], 0, 3, b)
    if prefix_caching:  # B waits: once A's load is done, the blocks are in the GPU prefix cache
        assert found is None and b in o.deferred
    else:  # no GPU prefix cache to wait for: B loads them too
        assert [n for _, n in found] == [3] and not o.loading and b not in o.deferred
    o.release([1, 2, 3, 4], 0, parts)
    assert not o.loading and not o.tiers[0].pins


def test_with_prefix_caching_off_a_chunk_being_stored_still_holds_a_lookup_back():
    o, _ = offload(prefix_caching=False)
    a, b = object(), object()
    o.store_full_blocks([1, 2], 0, 2, 2, a)
    assert o.lookup([1, 2, 3], 0, 3, b) is None and b in o.deferred  # vLLM's manager: HIT_PENDING
    o.step_ended(0.0)
    o.advance(1.0)
    assert [n for _, n in o.lookup([1, 2, 3], 0, 3, b)] == [2] and o.async_delays == [1.0]


# -- a hit shorter than a chunk ------------------------------------------------------------------------------
def chunked(k: int = 4) -> Offload:
    tier = KVTier(TierSpec("cpu", 100 * BLOCK_BYTES, BANDWIDTH, LATENCY), BLOCK_BYTES, k)
    return Offload([tier], blocks_per_chunk=k, stores_in_flight=True, lanes=LANES)


def test_a_hit_shorter_than_a_chunks_blocks_is_none_as_vllm_loads_no_less():
    """3 blocks in the GPU prefix cache, chunks of 4: the rest of chunk 0 alone (1 block) is no hit (vLLM's
    new_num_hit_tokens < tokens_per_chunk); with chunk 1 too, the 5 blocks are loaded."""
    blocks = list(range(1, 13))
    o = chunked()
    o.store(blocks[:4])
    o.idle_until(0.0)
    o.advance(1.0)
    assert o.lookup(blocks, 3, 8) == []
    o.store(blocks[:8])
    o.idle_until(1.0)
    o.advance(2.0)
    assert [n for _, n in o.lookup(blocks, 3, 8)] == [5]


def test_with_less_than_a_chunk_left_nothing_is_looked_up_so_nothing_defers():
    blocks = list(range(1, 9))
    o = chunked()
    b = object()
    o.store(blocks)  # its copy in flight
    assert o.lookup(blocks, 0, 8, b) is None and o.deferred[b] == 0.0  # HIT_PENDING
    o.advance(0.5)
    assert o.lookup(blocks, 5, 3, b) == []  # 3 blocks left: vLLM returns 0 before its lookup ...
    assert o.async_delays == [0.5] and not o.deferred  # ... which resolves the deferral
