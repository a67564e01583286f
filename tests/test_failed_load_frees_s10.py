"""A P/D load that fails with no valid token before it (no local prefix hit) gives the decode side's blocks
back, as vLLM's _update_waiting_for_remote_kv frees them under kv_load_failure_policy "recompute"; the
request's next admission then looks its prefix up afresh, and vLLM counts that lookup (and the connector's)
again. A failed load behind a local hit keeps the hit's blocks. Virtual time only."""
from __future__ import annotations

import numpy as np

from emulator.cluster import FaultSpec
from emulator.request import Request
from test_pd_hardening import deployment, pd_pair

SLOW = {"between": ("n0", "n1"), "bandwidth": 1e9, "latency": 1e-3}  # ~0.5 s to move a 4,000-token prompt


def _run(requests: list[Request], fault_at: float):
    sim = pd_pair(decode=deployment("recompute"), links=(SLOW,), faults=(FaultSpec("p0", fault_at, None, False),))
    sim.run(requests)
    return sim, sim.instances[1].engines[0]


def test_a_failed_load_with_nothing_valid_frees_the_blocks_and_is_looked_up_again():
    request = Request("r", 4000, 20, arrival_time=0.0)
    sim, decode = _run([request], 0.6)  # mid-transfer
    assert sim.transfers.num_failed == 1
    assert request.finish_reason == "length" and request.num_external_tokens == 0
    kv = decode.kv
    # looked up when its load started, and again when it was admitted with its blocks given back
    assert kv.prefix_requests == 2 and kv.prefix_queries == 8000
    assert kv.external_requests == 2 and kv.external_hits == 4000  # (the load's, counted when it began)
    assert kv.num_free_blocks == decode.num_gpu_blocks - 1


def test_a_failed_load_behind_a_local_hit_keeps_the_hits_blocks():
    prompt = np.random.default_rng(0).integers(0, 30000, 4000)
    first = Request("first", 2048, 2, arrival_time=0.0, prompt_token_ids=prompt[:2048].copy())
    second = Request("second", 4000, 20, arrival_time=1.0, prompt_token_ids=prompt)
    sim, decode = _run([first, second], 1.2)  # the second's transfer of what the decode side lacks
    assert sim.transfers.num_failed >= 1
    assert second.finish_reason == "length" and second.num_external_tokens == 0
    assert second.num_cached_tokens == 2048  # the decode side's own hit, kept through the failed load
    assert decode.kv.num_free_blocks == decode.num_gpu_blocks - 1
