"""Paused for new requests (vLLM's PAUSED_NEW: /pause?mode=wait), an engine still steps for a waiting request
that holds KV blocks (its load in flight or done: kv_holding_waiting), not only for running ones; and the hybrid
manager caps a sliding-window group's blocks at admission for a request already holding some, as vLLM's
get_num_blocks_to_allocate does first (single_type_kv_cache_manager.py)."""
from __future__ import annotations

from emulator.memory import KVCacheGroups
from emulator.request import Request
from emulator.sliding_window import HybridKVCacheManager
from test_pd_hardening import assert_all_blocks_free
from test_pd_paused_engine_s9 import pd_pair


def test_a_decode_pod_paused_for_new_requests_admits_the_request_whose_load_it_runs():
    sim = pd_pair()
    decode = sim.instance("d0")
    request = Request("r", 3000, 4, prompt_token_ids=list(range(3000)))
    sim.submit(request)
    while not request.kv_loading:  # the prefill, then the decode pod's read of its KV
        sim.advance(sim.next_event_time())
    assert sim.instance_of[request.engine_index] is decode and not decode.engines[0].scheduler.running
    sim.pause("wait", decode)
    while (t := sim.next_event_time()) is not None:
        sim.advance(t)
    assert request.finish_reason == "length" and request.num_external_tokens > 0
    assert_all_blocks_free(sim)


def test_a_hybrid_request_holding_blocks_is_capped_at_the_sliding_window_on_admission():
    groups = KVCacheGroups(("sliding", "full"), 128, 18, 2 * 512)
    kv = HybridKVCacheManager(2000, 16, groups, max_model_len=8192)
    r = Request("r", 4096, 4, prompt_token_ids=list(range(4096)))
    hit, tokens_hit = kv.get_computed_blocks(r)
    assert kv.allocate_slots(r, 512, hit, tokens_hit)
    r.num_computed_tokens = 512
    full_need = 4096 // 16 - 512 // 16
    sliding_need = max(kv.sliding_cap - len(kv.tables[r][0]), 0)
    assert kv._num_blocks_to_allocate(r, 4096, [], 512, admission=True) == full_need + sliding_need
    assert kv._num_blocks_to_allocate(r, 4096, [], 512) == 2 * full_need  # uncapped outside admission
