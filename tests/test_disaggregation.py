"""Prefill/decode disaggregation and KV memory tiers: what moves, when, and that nothing is lost."""
from __future__ import annotations

import numpy as np
import pytest

from emulator.cluster import ClusterSpec, FaultSpec, build_cluster
from emulator.config import EngineArgs
from emulator.instance import InstanceSpec
from emulator.kv_transfer import kv_bytes_per_token
from emulator.request import Request
from profiles.deployment import build_deployment

MODEL = "meta-llama/Llama-3.1-8B"


@pytest.fixture(scope="module")
def h100():
    return build_deployment(MODEL, "H100", EngineArgs(max_model_len=16384))


def pd_cluster(deployment, prefill: int = 1, decode: int = 1, nodes=("n0", "n0"), links=(), faults=(),
               routing: str = "least_loaded"):
    specs = [InstanceSpec(f"p{i}", deployment, ("llama",), "prefill", nodes[0]) for i in range(prefill)]
    specs += [InstanceSpec(f"d{i}", deployment, ("llama",), "decode", nodes[1]) for i in range(decode)]
    return build_cluster(ClusterSpec(tuple(specs), routing, faults=faults, links=links))


def assert_nothing_held_or_lost(sim, requests: list[Request]) -> None:
    assert all(r.is_finished for r in requests) and not sim.active
    assert not sim.transfers.loads and not sim.transfers.held
    for engine in sim.engines:
        assert engine.is_idle and not engine.scheduler.held and engine.scheduler.num_loading == 0
        assert engine.kv.num_free_blocks == engine.num_gpu_blocks - 1
        if engine.kv.offload is not None:  # no tier block is still pinned by a load
            assert not any(tier.pins for tier in engine.kv.offload.tiers)


def inter_token_gaps(sim, requests: list[Request]) -> list[float]:
    last: dict[Request, float] = {}
    gaps: list[float] = []
    wanted = set(requests)

    def on_step(record):
        for r in record.got_token:
            if r in wanted:
                if r in last:
                    gaps.append(record.end - last[r])
                last[r] = record.end
    sim.add_listener(on_step)
    return gaps


def test_a_request_prefills_on_one_instance_and_decodes_on_the_other(h100):
    sim = pd_cluster(h100)
    requests = [Request(f"r{i}", 3000, 50, arrival_time=i * 0.2) for i in range(20)]
    sim.run(requests)
    assert_nothing_held_or_lost(sim, requests)
    p, d = sim.instances
    assert all(sim.instance_of[r.engine_index] is d for r in requests)
    assert p.num_routed == d.num_routed == 20
    # the decode side loaded every prompt (the last token is recomputed there to sample)
    assert all(r.num_external_tokens == 3000 for r in requests)
    assert all(r.num_output_tokens == 50 for r in requests)
    assert sim.transfers.num_transfers == 20 and sim.transfers.num_failed == 0


def test_round_robin_turns_the_prefill_and_the_decode_instances_each_in_their_own_turn(h100):
    # one request at a time: each is routed in, then handed over, before the next arrives
    sim = pd_cluster(h100, prefill=2, decode=2, routing="round_robin")
    requests = [Request(f"r{i}", 2000, 20, arrival_time=i * 2.0) for i in range(8)]
    sim.run(requests)
    assert_nothing_held_or_lost(sim, requests)
    assert [i.num_routed for i in sim.instances] == [4, 4, 4, 4]
    assert [sim.instance_of[r.engine_index].name for r in requests] == ["d0", "d1"] * 4


def test_ttft_grows_by_the_transfer_time_on_a_slower_link(h100):
    """One request, nothing else running: the only difference between the clusters is the link."""
    def ttft(nodes, links) -> float:
        sim = pd_cluster(h100, nodes=nodes, links=links)
        request = Request("r", 8000, 10, arrival_time=0.0)
        sim.run([request])
        return request.first_token_time - request.client_arrival
    slow = {"between": ("n0", "n1"), "bandwidth": 2e9, "latency": 1e-3}
    near, far = ttft(("n0", "n0"), ()), ttft(("n0", "n1"), (slow,))
    config = h100.config
    num_bytes = 8000 * kv_bytes_per_token(h100.model, 1, 2.0)
    nvlink = h100.device.interconnect
    expected = (num_bytes / slow["bandwidth"] + slow["latency"]) - (num_bytes / nvlink.bandwidth + nvlink.latency)
    assert config.tensor_parallel_size == 1 and num_bytes == 8000 * 128 * 1024
    assert far - near == pytest.approx(expected, rel=1e-6)


def test_the_decode_pod_gets_the_request_when_its_prefill_has_answered(h100):
    """As behind vLLM's proxy: the decode pod's own latencies (its metrics) count from then, the client's
    (its record) from when it sent the request."""
    sim = pd_cluster(h100)
    prefill_ends: dict[str, float] = {}
    sim.add_finish_listener(lambda r: prefill_ends.setdefault(r.request_id, r.finish_time), prefills=True)
    request = Request("r", 8000, 10, arrival_time=1.0)
    sim.run([request])
    assert request.client_arrival == 1.0
    assert request.arrival_time == max(t for rid, t in prefill_ends.items() if rid != "r") > 1.0
    assert request.first_token_time - request.arrival_time < request.first_token_time - request.client_arrival


def test_decode_side_prefix_hits_reduce_what_moves(h100):
    sim = pd_cluster(h100)
    rng = np.random.default_rng(0)
    shared = rng.integers(0, 30000, 4096)
    first = Request("a", 5000, 5, arrival_time=0.0,
                    prompt_token_ids=np.concatenate([shared, rng.integers(0, 30000, 904)]))
    second = Request("b", 5000, 5, arrival_time=5.0,
                     prompt_token_ids=np.concatenate([shared, rng.integers(0, 30000, 904)]))
    sim.run([first, second])
    assert first.num_external_tokens == 5000
    assert second.num_cached_tokens == 4096 and second.num_external_tokens == 5000 - 4096
    assert_nothing_held_or_lost(sim, [first, second])


def test_disaggregation_lowers_decode_inter_token_p99_under_prefill_interference(h100):
    """Long prompts keep arriving while short-prompt requests decode: mixed instances interleave the
    prefills with the decodes, a decode instance never runs one."""
    def p99(sim) -> float:
        rng = np.random.default_rng(1)
        requests = []
        for i in range(300):
            long_prompt = i % 3 == 0
            requests.append(Request(f"r{i}", 12000 if long_prompt else 200, 16 if long_prompt else 200,
                                    arrival_time=float(np.round(i * 0.1 + rng.uniform(0, 0.05), 4))))
        decoders = [r for r in requests if r.num_prompt_tokens == 200]
        gaps = inter_token_gaps(sim, decoders)
        sim.run(requests)
        assert all(r.is_finished for r in requests)
        return float(np.percentile(gaps, 99))
    mixed = build_cluster(ClusterSpec(tuple(InstanceSpec(f"m{i}", h100, ("llama",)) for i in range(2)),
                                      "least_loaded"))
    disaggregated = pd_cluster(h100)
    assert p99(disaggregated) < 0.5 * p99(mixed)


def test_a_decode_instance_without_room_holds_the_request_back_and_the_prefill_keeps_its_blocks():
    small = build_deployment(MODEL, "H100", EngineArgs(max_model_len=8192, num_gpu_blocks_override=700))
    sim = pd_cluster(small)
    requests = [Request(f"r{i}", 6000, 400, arrival_time=i * 0.01) for i in range(4)]
    held_while_waiting = []
    sim.add_listener(lambda record: held_while_waiting.append(len(sim.engines[0].scheduler.held)))
    sim.run(requests)
    assert max(held_while_waiting) >= 1  # prefills finished before the decode side had room for them
    assert_nothing_held_or_lost(sim, requests)


@pytest.mark.parametrize("failing, reroute", [("p0", False), ("p0", True), ("d0", False), ("d0", True)])
def test_a_fault_mid_transfer_loses_nothing(h100, failing, reroute):
    slow = {"between": ("n0", "n1"), "bandwidth": 1e9, "latency": 1e-3}
    sim = pd_cluster(h100, 2, 2, ("n0", "n1"), (slow,), faults=(FaultSpec(failing, 3.0, None, reroute),))
    requests = [Request(f"r{i}", 4000, 100, arrival_time=i * 0.05) for i in range(120)]
    ended = []
    sim.add_finish_listener(ended.append)
    sim.run(requests)
    assert sorted(r.request_id for r in ended) == sorted(r.request_id for r in requests)  # each once
    assert_nothing_held_or_lost(sim, requests)
    errored = [r for r in requests if r.finish_reason == "error"]
    if failing == "p0":  # the KV it held is lost: loads from it fail, and vLLM's default kv_load_failure_policy
        assert errored and len(errored) == sim.transfers.num_failed  # ("fail") ends those requests with an error
    elif reroute:  # only requests that had streamed tokens cannot be retried elsewhere
        assert all(r.num_output_tokens > 0 for r in errored)
    else:
        assert errored


def test_requests_no_instance_can_take_fail_without_a_trace_or_a_debt():
    """With every instance down, arrivals fail at the door: no engine took them (engine_index None),
    the proxy keeps nothing of them, and no instance's outstanding tokens change."""
    deployment = build_deployment(MODEL, "H100", EngineArgs(max_model_len=16384))
    sim = pd_cluster(deployment, 1, 1, faults=(FaultSpec("p0", 1.0), FaultSpec("d0", 1.0)))
    requests = [Request(f"r{i}", 2000, 20, arrival_time=i * 0.5) for i in range(6)]
    sim.run(requests)
    late = [r for r in requests if r.arrival_time > 1.0]
    assert late and all(r.finish_reason == "error" and r.engine_index is None for r in late)
    assert not sim.pd.client_of and not sim.pd.prefill_of
    assert [instance.outstanding_tokens for instance in sim.instances] == [0, 0]
    assert_nothing_held_or_lost(sim, requests)


def test_a_client_whose_prefill_fails_owes_no_other_instance_anything():
    """Its prefill's instance fails mid-prefill: the client's request, which no engine took, ends without
    taking what it would have owed off another instance's outstanding tokens."""
    deployment = build_deployment(MODEL, "H100", EngineArgs(max_model_len=16384))
    sim = pd_cluster(deployment, 2, 1, faults=(FaultSpec("p1", 0.3),))
    requests = [Request(f"r{i}", 8000, 20, arrival_time=i * 0.01) for i in range(8)]
    sim.run(requests)
    failed = [r for r in requests if r.finish_reason == "error"]
    assert failed and all(r.engine_index is None for r in failed)
    assert [instance.outstanding_tokens for instance in sim.instances] == [0, 0, 0]
    assert_nothing_held_or_lost(sim, requests)


# -- KV memory tiers ----------------------------------------------------------------------------------
def conversation(rng, turns: int, first: int, per_turn: int) -> list[np.ndarray]:
    tokens = rng.integers(0, 30000, first)
    prompts = []
    for _ in range(turns):
        prompts.append(tokens)
        tokens = np.concatenate([tokens, rng.integers(0, 30000, per_turn)])
    return prompts


def multi_turn_requests(conversations: int = 40, turns: int = 4) -> list[Request]:
    rng = np.random.default_rng(2)
    chats = [conversation(rng, turns, 3000, 500) for _ in range(conversations)]
    requests = []
    for turn in range(turns):  # every conversation's turn t, then turn t + 1 a while later
        for c, chat in enumerate(chats):
            prompt = chat[turn]
            requests.append(Request(f"c{c}t{turn}", len(prompt), 50, arrival_time=turn * 30.0 + c * 0.5,
                                    prompt_token_ids=prompt))
    return requests


def test_cpu_offload_raises_hits_and_lowers_ttft_when_gpu_kv_is_small():
    def run(offload: float | None):
        deployment = build_deployment(MODEL, "H100", EngineArgs(max_model_len=16384, num_gpu_blocks_override=1500,
                                                                kv_offloading_size=offload))
        sim = build_cluster(ClusterSpec((InstanceSpec("i", deployment, ("llama",)),)))
        requests = multi_turn_requests()
        sim.run(requests)
        assert_nothing_held_or_lost(sim, requests)
        reused = sum(r.num_cached_tokens + r.num_external_tokens for r in requests)
        ttft = np.mean([r.first_token_time - r.arrival_time for r in requests])
        return reused / sum(r.num_prompt_tokens for r in requests), ttft, sim.engines[0].kv
    plain_hits, plain_ttft, _ = run(None)
    offload_hits, offload_ttft, kv = run(64.0)
    assert offload_hits > plain_hits + 0.2
    assert offload_ttft < 0.8 * plain_ttft
    assert kv.external_hits > 0 and kv.external_queries >= kv.external_hits


def test_the_shared_pool_lets_a_second_instance_hit_on_a_first_instance_prefix():
    deployment = build_deployment(MODEL, "H100", EngineArgs(max_model_len=16384, kv_offloading_size=32.0,
                                                            kv_offloading_backend="lmcache"))
    spec = ClusterSpec(tuple(InstanceSpec(f"i{k}", deployment, ("llama",), node="n0") for k in range(2)),
                       "round_robin")
    sim = build_cluster(spec)
    a, b = sim.instances
    assert a.engines[0].kv.offload is b.engines[0].kv.offload  # one pool for the node
    prompt = np.random.default_rng(3).integers(0, 30000, 6000)
    first = Request("first", 6000, 5, arrival_time=0.0, prompt_token_ids=prompt)
    second = Request("second", 6000, 5, arrival_time=10.0, prompt_token_ids=prompt)
    sim.run([first, second])
    assert sim.instance_of[first.engine_index] is a and sim.instance_of[second.engine_index] is b
    # the whole block-aligned prompt is loaded (the connector looks up to num_tokens), its last token recomputed
    assert second.num_cached_tokens == 0 and second.num_external_tokens == 6000
    assert second.first_token_time - second.arrival_time < 0.5 * (first.first_token_time - first.arrival_time)
    assert_nothing_held_or_lost(sim, [first, second])


@pytest.mark.parametrize("backend", ["native", "lmcache"])
def test_a_restored_pod_has_lost_its_own_offloaded_kv_but_not_a_shared_pools(backend):
    """A restored pod is a new process: the blocks its CPU tier held went with the old one (its GPU
    prefix cache too); a node's LMCache pool is another process and keeps them."""
    deployment = build_deployment(MODEL, "H100", EngineArgs(max_model_len=16384, kv_offloading_size=32.0,
                                                            kv_offloading_backend=backend))

    def rerun(fault: bool) -> Request:
        faults = (FaultSpec("i", 5.0, 6.0),) if fault else ()
        sim = build_cluster(ClusterSpec((InstanceSpec("i", deployment, ("llama",), node="n0"),), faults=faults))
        prompt = np.random.default_rng(4).integers(0, 30000, 6000)
        first = Request("first", 6000, 5, arrival_time=0.0, prompt_token_ids=prompt)
        again = Request("again", 6000, 5, arrival_time=10.0, prompt_token_ids=prompt)
        sim.run([first, again])
        assert_nothing_held_or_lost(sim, [first, again])
        return again

    assert rerun(fault=False).num_cached_tokens > 0  # the GPU cache still had it
    again = rerun(fault=True)
    assert again.num_cached_tokens == 0
    assert again.num_external_tokens == (0 if backend == "native" else 6000)  # all of a block-aligned prompt


def test_a_cxl_tier_keeps_what_the_cpu_tier_pushes_out():
    deployment = build_deployment(MODEL, "H100", EngineArgs(max_model_len=16384, num_gpu_blocks_override=1500,
                                                            kv_offloading_size=1.0))
    nodes = {"n0": {"cxl_memory": 64 * 2 ** 30, "cxl_bandwidth": 30e9, "cxl_latency": 2e-6}}
    sim = build_cluster(ClusterSpec((InstanceSpec("i", deployment, ("llama",), node="n0"),), nodes=nodes))
    cpu, cxl = sim.engines[0].kv.offload.tiers
    assert cpu.capacity_blocks == 2 ** 30 // (128 * 1024 * 16) and cxl.spec.medium == "CXL"
    requests = multi_turn_requests(20, 3)
    sim.run(requests)
    assert cpu.evicted > 0 and 0 < cxl.stored <= cpu.evicted and cxl.loaded > 0
    assert_nothing_held_or_lost(sim, requests)


def test_a_nodes_cxl_memory_is_split_among_the_tier_chains_that_offload_there():
    native = build_deployment(MODEL, "H100", EngineArgs(max_model_len=16384, num_gpu_blocks_override=1500,
                                                        kv_offloading_size=1.0, data_parallel_size=2))
    pooled = build_deployment(MODEL, "H100", EngineArgs(max_model_len=16384, num_gpu_blocks_override=1500,
                                                        kv_offloading_size=1.0, kv_offloading_backend="lmcache"))
    nodes = {"n0": {"cxl_memory": 64 * 2 ** 30}}
    specs = (InstanceSpec("dp2", native, ("llama",), node="n0"),  # two engines: two chains
             InstanceSpec("pool-a", pooled, ("llama",), node="n0"),
             InstanceSpec("pool-b", pooled, ("llama",), node="n0"))
    sim = build_cluster(ClusterSpec(specs, nodes=nodes))
    chains = {id(e.kv.offload): e.kv.offload for e in sim.engines}
    assert len(chains) == 3  # the two lmcache instances share one pool
    block = 128 * 1024 * 16
    assert [c.tiers[1].capacity_blocks for c in chains.values()] == [64 * 2 ** 30 // 3 // block] * 3


@pytest.mark.parametrize("connector", [{"kv_offloading_size": 64.0},
                                       {"kv_transfer_config": '{"kv_connector": "NixlConnector", '
                                                              '"kv_role": "kv_producer"}'}])
def test_external_prefix_cache_queries_are_every_new_requests_prompt_less_its_local_hit(connector):
    """vLLM 0.33's connector prefix-cache stats: on an engine with a KV connector every new request admitted asks
    the connector for what the GPU prefix cache lacks (its prompt less the local hit), found or not; the hits
    are what it loads. A NIXL producer finds nothing, a CPU tier what it stored."""
    deployment = build_deployment(MODEL, "H100", EngineArgs(max_model_len=16384, num_gpu_blocks_override=8000,
                                                            **connector))  # room for some local hits
    sim = build_cluster(ClusterSpec((InstanceSpec("i", deployment, ("llama",)),)))
    requests = multi_turn_requests()
    sim.run(requests)
    kv = sim.engines[0].kv
    local = sum(r.num_prompt_tokens - r.num_cached_tokens for r in requests)
    assert kv.external_queries == local
    assert kv.external_hits == sum(r.num_external_tokens for r in requests)
    assert (kv.external_hits > 0) == ("kv_offloading_size" in connector)
    assert any(r.num_cached_tokens > 0 for r in requests)  # the local hits were taken off


def test_without_a_connector_no_external_prefix_cache_query_is_counted(h100):
    sim = build_cluster(ClusterSpec((InstanceSpec("i", h100, ("llama",)),)))
    sim.run(multi_turn_requests(conversations=4))
    assert sim.engines[0].kv.external_queries == sim.engines[0].kv.external_hits == 0
