"""Rules of vLLM 0.33 around the hybrid KV cache manager (HMA) with KV connectors, found in two reviews:
- KV offloading keeps HMA on in vLLM (OffloadingConnector subclasses SupportsHMA): its groups plan the memory
  (blocks holding one group's layers, the logged capacity) while the emulator's engine runs one group of blocks
  that size (memory.engine_kv_groups), and a P/D peer sees vLLM's hybrid layout;
- NixlConnector is vLLM's pull connector, whose worker refuses pipeline parallelism with a hybrid layout, and on
  a consumer side whatever the model (nixl/base_worker.py: NotImplementedError), also for a pod given by its P/D
  role alone (it stands for NIXL, with offloading too);
- the two sides of a read need the same layout: NIXL's handshake wants as many KV layer regions (base_worker.py
  "Number of KV layers must match between prefill and decode"), Mooncake's sender as many groups
  (mooncake_connector.py "KV group count mismatch"): a hybrid prefill and a decode with HMA off fail the load,
  which the decode's kv_load_failure_policy then settles, with every block freed."""
from __future__ import annotations

import json

import pytest

from emulator.cluster import ClusterSpec, build_cluster
from emulator.config import ConfigError, EngineArgs
from emulator.instance import InstanceSpec
from emulator.kv_connectors import NIXL_PP_HMA
from emulator.request import Request
from emulator.sliding_window import HybridKVCacheManager
from profiles.deployment import build_deployment
from test_hma_connectors_s13 import SLOW, assert_all_free, deployment, prompts

GPT_OSS, LLAMA = "openai/gpt-oss-120b", "meta-llama/Llama-3.1-8B"
NIXL = json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_both"})


def blocks(model: str = GPT_OSS, **args) -> int:
    return build_deployment(model, "H100", EngineArgs(max_model_len=8192, **args)).num_gpu_blocks


def test_offloading_on_a_hybrid_model_keeps_vllms_block_size_and_logged_capacity():
    hybrid = blocks()
    assert blocks(kv_offloading_size=8.0) == hybrid
    plain, offload = (build_deployment(GPT_OSS, "H100", EngineArgs(max_model_len=8192, **args))
                      for args in ({}, {"kv_offloading_size": 8.0}))
    assert offload.memory.capacity(8192, 16) == plain.memory.capacity(8192, 16)  # vLLM's logged lines
    assert offload.memory.groups == plain.memory.groups
    sim = build_cluster(ClusterSpec((InstanceSpec("x0", offload, ("m",), "mixed", "n0"),)))
    assert not isinstance(sim.engines[0].kv, HybridKVCacheManager)  # the engine runs one group
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


def test_nixl_refuses_pipeline_parallelism_on_a_consumer_whatever_the_model():
    consumer = json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_consumer"})
    with pytest.raises(ConfigError, match="^NixlPushConnector consumer \\(decode\\) does not support"):
        blocks(LLAMA, kv_transfer_config=consumer, pipeline_parallel_size=2)
    blocks(LLAMA, kv_transfer_config=NIXL, pipeline_parallel_size=2)  # kv_both
    blocks(LLAMA, kv_transfer_config=consumer)


def test_a_pod_given_by_its_role_alone_stands_for_nixl_there_too():
    for args in ({}, {"kv_offloading_size": 8.0}):  # (NIXL and offloading: vLLM keeps HMA on)
        d = build_deployment(GPT_OSS, "H100", EngineArgs(max_model_len=8192, pipeline_parallel_size=2, **args))
        with pytest.raises(ValueError, match="instance 'p0': NixlConnector \\(pull\\)"):
            ClusterSpec((InstanceSpec("p0", d, ("m",), "prefill", "n0"),
                         InstanceSpec("d0", d, ("m",), "decode", "n1")))
        ClusterSpec((InstanceSpec("x0", d, ("m",), "mixed", "n0"),))  # a mixed pod runs no connector
    llama = build_deployment(LLAMA, "H100", EngineArgs(max_model_len=8192, pipeline_parallel_size=2))
    ClusterSpec((InstanceSpec("p0", llama, ("m",), "prefill", "n0"),))
    with pytest.raises(ValueError, match="instance 'd0': NixlPushConnector consumer"):
        ClusterSpec((InstanceSpec("p0", llama, ("m",), "prefill", "n0"),
                     InstanceSpec("d0", llama, ("m",), "decode", "n1")))


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


def _pair_reads(prefill, decode) -> list[Request]:
    specs = (InstanceSpec("p0", prefill, ("m",), "prefill", "n0"), InstanceSpec("d0", decode, ("m",), "decode", "n1"))
    sim = build_cluster(ClusterSpec(specs, "least_loaded", links=(SLOW,)))
    requests = [Request(f"r{i}", 2000, 8, arrival_time=0.1 * i, prompt_token_ids=p)
                for i, p in enumerate(prompts(3, 2000))]
    sim.run(requests)
    assert_all_free(sim)
    return requests


def test_offloading_on_one_side_keeps_vllms_hybrid_layout_for_the_handshake():
    """NIXL+offloading on one side, NIXL alone on the other: both hybrid in vLLM, so the reads go through."""
    both = json.dumps({"kv_connector": "MultiConnector", "kv_role": "kv_both", "kv_connector_extra_config": {
        "connectors": [{"kv_connector": "NixlConnector", "kv_role": "kv_both"},
                       {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
                        "kv_connector_extra_config": {"cpu_bytes_to_use": 1 << 30}}]}})
    offloading = build_deployment(GPT_OSS, "H100", EngineArgs(max_model_len=16384, num_gpu_blocks_override=3000,
                                                              kv_transfer_config=both))
    for prefill, decode in ((deployment("NixlConnector"), offloading), (offloading, deployment("NixlConnector"))):
        assert all(r.finish_reason == "length" and r.num_external_tokens == 2000
                   for r in _pair_reads(prefill, decode))


def test_mooncake_fails_a_hybrid_prefill_read_by_a_one_group_decode():
    """Mooncake's sender compares the group counts (mooncake_connector.py "KV group count mismatch")."""
    requests = _pair_reads(deployment("MooncakeConnector"),
                           deployment("MooncakeConnector", "fail", disable_hybrid_kv_cache_manager=True))
    assert all(r.finish_reason == "error" for r in requests)
