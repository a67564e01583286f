"""gpt-oss (sliding-window + full layers) on P/D pods given by role alone: they stand for NIXL, which supports vLLM's
hybrid KV cache manager (nixl/connector.py NixlBaseConnector subclasses SupportsHMA, so VllmConfig keeps the
manager on: vllm/config/vllm.py's HMA runtime rules), so they keep the hybrid groups, as a mixed instance does; with
--disable-hybrid-kv-cache-manager they keep one group. Every request finishes and every block comes back."""
from __future__ import annotations

import numpy as np
import pytest

from emulator.cluster import ClusterSpec, build_cluster
from emulator.config import EngineArgs
from emulator.instance import InstanceSpec
from emulator.request import Request
from emulator.sliding_window import HybridKVCacheManager
from profiles.deployment import build_deployment


@pytest.mark.parametrize("disable", [None, True])
def test_role_only_pd_pods_of_a_hybrid_model_keep_the_hybrid_groups_and_free_everything(disable):
    d = build_deployment("openai/gpt-oss-120b", "H100", EngineArgs(max_model_len=4096, num_gpu_blocks_override=2000,
                                                                    disable_hybrid_kv_cache_manager=disable))
    assert (d.memory.groups is not None) == (disable is None)  # the model is hybrid
    sim = build_cluster(ClusterSpec((InstanceSpec("p", d, ("m",), role="prefill", node="n0"),
                                     InstanceSpec("d", d, ("m",), role="decode", node="n1"),
                                     InstanceSpec("x", d, ("m",), node="n2"))))
    assert all(isinstance(e.kv, HybridKVCacheManager) == (disable is None) for e in sim.engines)
    rng = np.random.default_rng(0)
    requests = [Request(f"r{i}", 1000, 50, arrival_time=0.1 * i, prompt_token_ids=rng.integers(0, 30000, 1000))
                for i in range(4)]
    sim.run(requests)
    assert all(r.is_finished for r in requests)
    pd = [r for r in requests if r.num_external_tokens]  # decoded on the decode pod from the prefill's KV
    assert pd and all(r.num_external_tokens >= 992 for r in pd)
    for engine in sim.engines:
        assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks - 1
