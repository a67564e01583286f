"""Three rules of vLLM 0.33 around the hybrid KV cache manager (HMA) with KV connectors, found in review:
- KV offloading keeps HMA on in vLLM (OffloadingConnector subclasses SupportsHMA), whose blocks hold one group's
  layers; the emulator runs one group there, of blocks that size (not the all-layer blocks of HMA off), so the
  GPU holds as many blocks as vLLM's;
- NixlConnector is vLLM's pull connector, whose worker refuses pipeline parallelism with a hybrid layout
  (nixl/base_worker.py: NotImplementedError), also for a pod given by its P/D role alone (it stands for NIXL);
- NIXL's handshake wants as many KV layer regions on both sides (base_worker.py "Number of KV layers must match
  between prefill and decode"): a hybrid prefill and a decode with HMA off fail the load, which the decode's
  kv_load_failure_policy then settles, with every block freed."""
from __future__ import annotations

import json

import pytest

from emulator.cluster import ClusterSpec, build_cluster
from emulator.config import ConfigError, EngineArgs
from emulator.instance import InstanceSpec
from emulator.kv_connectors import NIXL_PP_HMA
from emulator.request import Request
from profiles.deployment import build_deployment
from test_hma_connectors_s13 import SLOW, assert_all_free, deployment, prompts

GPT_OSS, LLAMA = "openai/gpt-oss-120b", "meta-llama/Llama-3.1-8B"
NIXL = json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_both"})


def blocks(model: str = GPT_OSS, **args) -> int:
    return build_deployment(model, "H100", EngineArgs(max_model_len=8192, **args)).num_gpu_blocks


def test_offloading_on_a_hybrid_model_keeps_vllms_block_size():
    hybrid = blocks()
    assert blocks(kv_offloading_size=8.0) == hybrid
    # HMA off: a block holds all 36 layers, half as many fit
    assert blocks(kv_offloading_size=8.0, disable_hybrid_kv_cache_manager=True) == blocks(
        disable_hybrid_kv_cache_manager=True) == pytest.approx(hybrid / 2, abs=1)


def test_nixl_refuses_pipeline_parallelism_with_a_hybrid_layout():
    with pytest.raises(ConfigError, match="does not support pipeline_parallel_size > 1 with hybrid"):
        blocks(kv_transfer_config=NIXL, pipeline_parallel_size=2)
    assert str(NIXL_PP_HMA).startswith("NixlConnector (pull)")
    blocks(kv_transfer_config=NIXL, pipeline_parallel_size=2, disable_hybrid_kv_cache_manager=True)  # one group
    blocks(LLAMA, kv_transfer_config=NIXL, pipeline_parallel_size=2)  # no sliding layers
    blocks(pipeline_parallel_size=2)  # no connector


def test_a_pod_given_by_its_role_alone_stands_for_nixl_there_too():
    d = build_deployment(GPT_OSS, "H100", EngineArgs(max_model_len=8192, pipeline_parallel_size=2))
    with pytest.raises(ValueError, match="instance 'p0': NixlConnector \\(pull\\)"):
        ClusterSpec((InstanceSpec("p0", d, ("m",), "prefill", "n0"), InstanceSpec("d0", d, ("m",), "decode", "n1")))
    ClusterSpec((InstanceSpec("x0", d, ("m",), "mixed", "n0"),))  # a mixed pod runs no connector


@pytest.mark.parametrize("policy, reason", [("fail", "error"), ("recompute", "length")])
def test_a_hybrid_prefill_and_a_one_group_decode_fail_nixls_handshake(policy, reason):
    prefill = deployment()
    decode = deployment("NixlConnector", policy, disable_hybrid_kv_cache_manager=True)
    assert prefill.memory.groups is not None and decode.memory.groups is None
    specs = (InstanceSpec("p0", prefill, ("m",), "prefill", "n0"), InstanceSpec("d0", decode, ("m",), "decode", "n1"))
    sim = build_cluster(ClusterSpec(specs, "least_loaded", links=(SLOW,)))
    requests = [Request(f"r{i}", 2000, 8, arrival_time=0.1 * i, prompt_token_ids=p)
                for i, p in enumerate(prompts(3, 2000))]
    sim.run(requests)
    assert all(r.finish_reason == reason for r in requests)
    stats = sim.transfers.stats[sim.engines[1].index]
    assert stats.pd_failed == 3
    assert_all_free(sim)
    # the same decode pod with HMA on reads them
    sim = build_cluster(ClusterSpec((specs[0], InstanceSpec("d0", deployment("NixlConnector", policy), ("m",),
                                                                     "decode", "n1")), "least_loaded", links=(SLOW,)))
    requests = [Request(f"r{i}", 2000, 8, arrival_time=0.1 * i, prompt_token_ids=p)
                for i, p in enumerate(prompts(3, 2000))]
    sim.run(requests)
    assert all(r.finish_reason == "length" and r.num_external_tokens == 2000 for r in requests)
    assert_all_free(sim)
