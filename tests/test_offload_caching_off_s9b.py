"""With prefix caching off (--no-enable-prefix-caching), vLLM 0.33's OffloadingConnector still stores: the engine
hashes a request's blocks whenever a KV connector is set (v1/engine/core.py), and the connector's store jobs
(offloading/scheduler.py _build_store_jobs) are built from each step's computed tokens with no gate on prefix
caching. Its lookups still happen too (the scheduler asks get_num_new_matched_tokens after a local hit of 0),
so a prompt stored earlier is loaded from the CPU tier, whole when it ends on a chunk's end (its last token
then recomputed). The GPU prefix cache itself stays empty. Virtual time only."""
from __future__ import annotations

import pytest

from emulator.cluster import ClusterSpec, build_cluster
from emulator.config import EngineArgs
from emulator.instance import InstanceSpec
from emulator.kv_cache import KVCacheManager
from emulator.kv_tiers import KVTier, Offload, TierSpec
from emulator.request import Request
from profiles.deployment import build_deployment
from tests.test_connectors_v033 import GIB, deployment, offloading


def replay(caching: bool, requests: list[Request], **args):
    d = build_deployment("meta-llama/Llama-3.1-8B", "H100",
                         EngineArgs(max_model_len=4096, kv_offloading_size=1.0, enable_prefix_caching=caching, **args))
    sim = build_cluster(ClusterSpec((InstanceSpec("i0", d, ("m",)),)))
    sim.run(requests)
    return sim.engines[0]


def distinct_prompts() -> list[Request]:
    return [Request(f"r{i}", 200 + 37 * i, 8, arrival_time=0.3 * i, content_seed=100 + i) for i in range(6)]


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_with_caching_off_the_tiers_store_what_they_store_with_it_on(async_scheduling):
    on = replay(True, distinct_prompts(), async_scheduling=async_scheduling)
    off = replay(False, distinct_prompts(), async_scheduling=async_scheduling)
    bs = off.kv.block_size
    prompt_blocks = sum((200 + 37 * i) // bs for i in range(6))  # offload_prompt_only: the prompts' full blocks
    assert off.kv.offload.tiers[0].num_held == on.kv.offload.tiers[0].num_held == prompt_blocks
    assert set(off.kv.offload.tiers[0].blocks) == set(on.kv.offload.tiers[0].blocks)
    assert not off.kv.pool.cached  # nothing entered the GPU prefix cache


def test_with_caching_off_a_stored_prompt_is_loaded_whole_from_the_tier():
    a = Request("a", 512, 4, content_seed=1)
    b = Request("b", 512, 4, arrival_time=1.0, content_seed=1)  # a's prompt again, a block-aligned one
    engine = replay(False, [a, b])
    assert b.num_external_tokens == 512  # all of it: vLLM looks up to num_tokens
    assert b.num_cached_tokens == 0  # no local hit
    assert engine.kv.offload.hits == 512
    assert engine.kv.external_queries == 512 + 512 and engine.kv.external_hits == 512
    assert b.num_output_tokens == 4 and b.finish_time is not None  # its last token was recomputed, and it ran


def test_with_caching_off_a_request_loads_nothing_from_a_prompt_not_yet_stored():
    a = Request("a", 512, 4, content_seed=1)
    c = Request("c", 500, 4, arrival_time=1.0, content_seed=3)
    engine = replay(False, [a, c])
    assert c.num_external_tokens == 0 and engine.kv.offload.hits == 0
    assert engine.kv.offload.lookups == 2  # each admission asked the connector


def manager(caching: bool) -> tuple[KVCacheManager, Offload]:
    kv = KVCacheManager(64, 16, enable_caching=caching)
    kv.offload = Offload([KVTier(TierSpec("cpu", 100 * 1024, 1e9, 0.0), 1024)], prompt_only=False)
    return kv, kv.offload


def test_the_manager_offers_each_newly_full_block_once_with_caching_off():
    kv, offload = manager(False)
    r = Request("r", 100, 40, content_seed=7)
    assert kv.allocate_slots(r, 40)  # 2 full blocks
    assert r.kv_num_cached == 2 and offload.tiers[0].num_held == 2
    r.num_computed_tokens = 40
    assert kv.allocate_slots(r, 40)  # 80 tokens: 5 full blocks
    assert r.kv_num_cached == 5 and offload.tiers[0].num_held == 5
    hashes = kv.block_hashes(r)
    assert set(offload.tiers[0].blocks) == set(hashes[:5])
    assert offload.requests[r].next_block == 5  # offered once each, in order
    assert not kv.pool.cached and kv.get_computed_blocks(r) == ([], 0)
    kv.free(r)
    assert r.kv_num_cached == 0 and kv.num_free_blocks == 63


def test_without_an_offload_layer_caching_off_tracks_nothing():
    kv = KVCacheManager(64, 16, enable_caching=False)
    r = Request("r", 100, 40, content_seed=7)
    assert not kv.tracks_full_blocks
    assert kv.allocate_slots(r, 80)
    assert r.kv_num_cached == 0 and not kv.pool.cached


@pytest.mark.parametrize("caching", [True, False])
def test_a_preempted_request_offers_from_its_first_chunk_again_and_stores_nothing_twice(caching):
    kv, offload = manager(caching)
    r = Request("r", 100, 40, content_seed=7)
    kv.allocate_slots(r, 64)
    held = offload.tiers[0].num_held
    kv.free(r)  # preempted (not finished)
    r.num_computed_tokens = 0
    kv.allocate_slots(r, 64)
    assert offload.requests[r].next_block == 4 and offload.tiers[0].num_held == held == 4


def store_jobs(caching: bool) -> list[tuple[float, int]]:
    """(when built, blocks) of each store job of a decode-heavy replay storing decode blocks too, decode runs on."""
    d = deployment(offloading(8 * GIB, offload_prompt_only=False), max_model_len=4608, enable_prefix_caching=caching)
    sim = build_cluster(ClusterSpec((InstanceSpec("i", d, ("llama",)),)))
    sim.loops[0].decode_runs = True
    offload = sim.engines[0].kv.offload
    jobs = []
    offload.job_listeners.append(lambda job: jobs.append((job.created, job.num_blocks)))
    sim.run([Request(f"r{i}", 300 + 50 * i, 200 + 30 * i, arrival_time=0.05 * i, content_seed=50 + i)
             for i in range(5)])
    return jobs


def test_with_caching_off_a_decode_run_offers_the_blocks_it_fills_as_its_steps_would():
    on, off = store_jobs(True), store_jobs(False)
    assert len(on) > 10 and off == on  # the same jobs, built at the same steps
