"""A request whose offload hit reaches a chunk another request is loading is deferred, as vLLM 0.33's
OffloadingConnector scheduler does with prefix caching on (get_num_new_matched_tokens returns None when a key
of offload_keys[computed // chunk : cdiv(computed + hit, chunk)] is in _chunks_being_loaded, which
update_state_after_alloc fills with a load's keys and a finished load empties): once that load is done its
blocks are in the GPU prefix cache, and the request hits them there. Virtual time only."""
from __future__ import annotations

import random

import numpy as np

from emulator.cluster import ClusterSpec, build_cluster
from emulator.config import EngineArgs
from emulator.instance import InstanceSpec
from emulator.kv_tiers import KVTier, Offload, TierSpec
from emulator.request import Request
from profiles.deployment import build_deployment


def offload(k: int = 1) -> Offload:
    return Offload([KVTier(TierSpec("cpu", 1000, 1e9, 0.0), 1.0, k)], blocks_per_chunk=k)


def test_a_hit_on_a_chunk_another_request_is_loading_is_deferred_until_that_load_ends():
    o = offload()
    o.store([1, 2, 3, 4])
    a, b = object(), object()
    parts = o.lookup([1, 2, 3, 4, 9], 0, 4, a)
    o.take([1, 2, 3, 4, 9], 0, parts)  # A loads 1..4
    assert o.lookup([1, 2, 7], 0, 2, b) is None and b in o.deferred  # B's hit reaches 1 and 2: deferred
    assert o.lookup([5, 1, 2], 0, 2, b) == []  # a miss at once: nothing to wait for
    o.release([1, 2, 3, 4, 9], 0, parts)
    assert [n for _, n in o.lookup([1, 2, 7], 0, 2, b)] == [2] and not o.loading


def test_the_chunks_checked_are_those_of_the_hit_from_the_one_the_gpu_hit_ends_in():
    o = offload(k=2)
    blocks = [1, 2, 3, 4, 5, 6, 7, 8]
    o.store(blocks)
    a, b, c = object(), object(), object()
    parts = o.lookup(blocks, 3, 3, a)  # A's GPU hit ends mid-chunk (3 blocks): it loads 4 (chunk 1), 5 and 6
    assert [n for _, n in parts] == [3]
    o.take(blocks, 3, parts)
    assert o.loading == {4: 1, 6: 1}
    assert o.lookup(blocks, 0, 2, b) is not None  # chunk 0 only: not A's
    assert o.lookup(blocks, 2, 2, b) is None  # from chunk 1 on: A's
    assert o.lookup(blocks, 6, 2, c) is not None  # chunk 3 only
    o.release(blocks, 3, parts)
    assert not o.loading


class VllmLoadDeferral:
    """vLLM's rule, transcribed: the keys being loaded (a multiset), and a look-up with a hit deferred when a
    key of the hit's chunks, from the one holding the first block looked up, is among them."""

    def __init__(self, k: int) -> None:
        self.k, self.loading = k, {}

    def deferred(self, keys: list[int], start: int, hit: int) -> bool:
        k = self.k
        chunk_keys = keys[k - 1::k][start // k:-(-(start + hit) // k)]
        return hit > 0 and any(key in self.loading for key in chunk_keys)

    def load(self, keys: list[int], start: int, end: int) -> list[int]:
        k = self.k
        loaded = keys[k - 1::k][start // k:end // k]
        for key in loaded:
            self.loading[key] = self.loading.get(key, 0) + 1
        return loaded

    def release(self, loaded: list[int]) -> None:
        for key in loaded:
            self.loading[key] -= 1
            if not self.loading[key]:
                del self.loading[key]


def test_deferrals_follow_vllms_rule_op_by_op():
    for k in (1, 2, 4):
        rng, o, rule = random.Random(k), offload(k), VllmLoadDeferral(k)
        documents = [list(range(100 * d, 100 * d + 16)) for d in range(4)]
        for doc in documents:
            o.store(doc[:rng.randrange(1, 5) * k])
        loads, deferrals = [], 0
        for step in range(300):
            if loads and rng.random() < 0.2:
                keys, start, parts, loaded = loads.pop(rng.randrange(len(loads)))
                o.release(keys, start, parts)
                rule.release(loaded)
                continue
            keys, request = rng.choice(documents), object()
            start = rng.randrange(0, 6)
            ours = o.lookup(keys, start, 12 - start, request)
            plain = Offload(o.tiers, blocks_per_chunk=k).lookup(keys, start, 12 - start)  # (no loads: no deferral)
            hit = sum(n for _, n in plain)
            assert (ours is None) == rule.deferred(keys, start, hit), (k, step)
            deferrals += ours is None
            if ours:
                o.take(keys, start, ours)
                loads.append((keys, start, ours, rule.load(keys, start, start + hit)))
            assert o.loading == rule.loading
        assert deferrals > 10


def test_a_request_sharing_a_prefix_with_a_load_in_flight_waits_for_it_then_hits_the_gpu_cache():
    d = build_deployment("meta-llama/Llama-3.1-8B", "H100", EngineArgs(max_model_len=1500, num_gpu_blocks_override=160,
                                                                        kv_offloading_size=4.0))
    sim = build_cluster(ClusterSpec((InstanceSpec("i0", d, ("m",), node="n0"),),
                                    nodes={"n0": {"host_memory_bandwidth": 1e9}}))
    rng = np.random.default_rng(5)
    prompt = rng.integers(0, 30000, 1000)
    requests = [Request("a", 1000, 2, arrival_time=0.0, prompt_token_ids=prompt),
                Request("c", 1400, 2, arrival_time=1.0, prompt_token_ids=rng.integers(0, 30000, 1400)),
                Request("e", 1400, 2, arrival_time=2.0, prompt_token_ids=rng.integers(0, 30000, 1400)),
                Request("a2", 1000, 2, arrival_time=5.0, prompt_token_ids=prompt),  # loads A's blocks from CPU
                Request("b2", 1000, 2, arrival_time=5.0, prompt_token_ids=prompt)]  # ... which it waits for
    sim.run(requests)
    r = {request.request_id: request for request in requests}
    o = sim.engines[0].kv.offload
    assert r["a2"].num_external_tokens >= 40 * 16  # (C and E took A's blocks out of the GPU cache)
    load_end = r["a2"].scheduled_time
    assert r["b2"].num_external_tokens == 0 and r["b2"].scheduled_time >= load_end  # a GPU hit after A2's load
    assert len(o.async_delays) == 1 and o.async_delays[0] > 0 and not o.loading
