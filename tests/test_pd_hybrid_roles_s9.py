"""gpt-oss (sliding-window + full layers) on P/D pods given by role alone: they keep one KV group, as pods with an
explicit connector do (their transfers move one group's blocks); a mixed instance keeps vLLM's hybrid groups."""
from __future__ import annotations

import numpy as np

from emulator.cluster import ClusterSpec, build_cluster
from emulator.config import EngineArgs
from emulator.instance import InstanceSpec
from emulator.request import Request
from emulator.sliding_window import HybridKVCacheManager
from profiles.deployment import build_deployment


def test_role_only_pd_pods_of_a_hybrid_model_keep_one_group_and_free_everything():
    d = build_deployment("openai/gpt-oss-120b", "H100", EngineArgs(max_model_len=4096, num_gpu_blocks_override=2000))
    assert d.memory.groups is not None  # the model is hybrid
    sim = build_cluster(ClusterSpec((InstanceSpec("p", d, ("m",), role="prefill", node="n0"),
                                     InstanceSpec("d", d, ("m",), role="decode", node="n1"),
                                     InstanceSpec("x", d, ("m",), node="n2"))))
    prefill, decode, mixed = sim.engines
    assert not isinstance(prefill.kv, HybridKVCacheManager) and not isinstance(decode.kv, HybridKVCacheManager)
    assert isinstance(mixed.kv, HybridKVCacheManager)
    rng = np.random.default_rng(0)
    requests = [Request(f"r{i}", 1000, 50, arrival_time=0.1 * i, prompt_token_ids=rng.integers(0, 30000, 1000))
                for i in range(4)]
    sim.run(requests)
    assert all(r.is_finished for r in requests)
    pd = [r for r in requests if r.num_external_tokens]  # decoded on the decode pod from the prefill's KV
    assert pd and all(r.num_external_tokens >= 992 for r in pd)
    for engine in sim.engines:
        assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks - 1
