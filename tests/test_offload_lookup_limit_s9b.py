"""How far vLLM 0.33's OffloadingConnector looks a request up, and which lookups it records:

- up to the request's num_tokens (offloading/scheduler.py _lookup_complete_chunks: max_hit_size_tokens starts
  at num_tokens, for full attention), in whole chunks: a prompt that ends on a chunk's end loads whole, and
  its last token is recomputed once the load is done (v1/core/sched/scheduler.py _update_waiting_for_remote_kv),
  where the GPU prefix cache stops one token short (its hit leaves one token to compute);
- a request whose own store jobs are in flight is not looked up (get_num_new_matched_tokens returns None
  before its lookup): a decode run's steps count no lookup of such a waiting head.

Virtual time only."""
from __future__ import annotations

import pytest

from emulator.cluster import ClusterSpec, build_cluster
from emulator.config import EngineArgs
from emulator.instance import InstanceSpec
from emulator.kv_tiers import KVTier, Offload, RequestOffload, TierSpec
from emulator.request import Request
from profiles.deployment import build_deployment


def simulation(caching: bool = True, **args):
    d = build_deployment("meta-llama/Llama-3.1-8B", "H100",
                         EngineArgs(max_model_len=4096, kv_offloading_size=1.0, enable_prefix_caching=caching, **args))
    return build_cluster(ClusterSpec((InstanceSpec("i0", d, ("m",)),)))


def test_a_block_aligned_prompt_loads_its_last_block_beyond_the_gpu_hit():
    sim = simulation()
    a = Request("a", 512, 4, content_seed=1)
    b = Request("b", 512, 4, arrival_time=1.0, content_seed=1)
    sim.run([a, b])
    assert b.num_cached_tokens == 496  # the GPU hit leaves the last block's tokens to compute ...
    assert b.num_external_tokens == 16  # ... and the tier holds that block: it is loaded, its last token recomputed
    assert sim.engines[0].kv.offload.hits == 16
    assert b.num_output_tokens == 4 and b.finish_time is not None


def test_a_prompt_ending_inside_a_block_loads_nothing_past_the_gpu_hit():
    sim = simulation()
    a = Request("a", 500, 4, content_seed=1)
    b = Request("b", 500, 4, arrival_time=1.0, content_seed=1)
    sim.run([a, b])
    assert b.num_cached_tokens == 496 and b.num_external_tokens == 0  # block 31 is not full: it has no hash


def chunked_offload(k: int) -> tuple[Offload, list[int]]:
    tier = KVTier(TierSpec("cpu", 100 * 1024, 1e9, 0.0), 1024)
    o = Offload([tier], blocks_per_chunk=k)
    hashes = list(range(100, 112))
    o.store(hashes)
    return o, hashes


@pytest.mark.parametrize("start, limit, expected", [
    (0, 12, 12),  # every block: the request's whole prompt
    (0, 11, 10),  # the last partial chunk has no key
    (2, 9, 8),    # from a chunk's start to the last whole chunk's end
    (1, 4, 3),    # a GPU hit inside a chunk: the rest of that chunk, and the next
    (1, 2, 0),    # the chunks end at block 2: under a chunk's worth of blocks left, nothing is looked up
])
def test_a_lookup_reaches_the_last_whole_chunk_within_its_limit(start, limit, expected):
    o, hashes = chunked_offload(2)
    parts = o.lookup(hashes, start, limit)
    assert sum(n for _, n in parts) == expected
    assert o.lookups == 1


def waiting_head():
    sim = simulation()
    scheduler = sim.engines[0].scheduler
    head = Request("head", 300, 4, content_seed=5)
    scheduler.add_request(head)
    return scheduler, scheduler.kv.offload, head


def test_a_decode_run_counts_no_lookup_of_a_head_its_own_store_jobs_hold_back():
    scheduler, offload, head = waiting_head()
    offload.requests[head] = RequestOffload(jobs=1)  # a preempted request whose stores are still being copied
    scheduler.blocked_lookups(7)
    assert offload.lookups == 0
    assert offload.lookup(scheduler.kv.block_hashes(head), 0, 18, head) is None and offload.lookups == 0
    offload.requests[head].jobs = 0  # its copies ended: each step asks about it again
    scheduler.blocked_lookups(7)
    assert offload.lookups == 7
