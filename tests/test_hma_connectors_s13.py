"""P/D of a model mixing sliding-window and full-attention layers (gpt-oss) with vLLM's hybrid KV cache manager
kept, as vLLM 0.33 keeps it for connectors that subclass SupportsHMA (NixlConnector, MooncakeConnector; a pod
given by its role alone stands for NIXL): the decode side allocates in every group before the load (a sliding
group only from the window of the loaded prompt on: v1/core/kv_cache_manager.py allocate_slots with
num_external_computed_tokens, single_type_kv_cache_manager.py allocate_external_computed_blocks), the prefill
side holds its blocks less the sliding ones before the window (v1/core/sched/scheduler.py _connector_finished)
until they are read, and a transfer moves the full group's blocks and only the in-window tail of the sliding
group's, cdiv(window, block_size) + 1 blocks at most (nixl/base_scheduler.py get_exchange_clipped_blocks,
blocks_per_sw; mooncake_connector.py get_sw_clipped_blocks), each group's blocks carrying its own layers.
Every request finishes and every block comes back, through failed loads and a prefill pod failing mid-transfer.
Virtual time only."""
from __future__ import annotations

import json

import numpy as np
import pytest

from emulator.cluster import ClusterSpec, FaultSpec, build_cluster
from emulator.config import EngineArgs
from emulator.instance import InstanceSpec
from emulator.kv_transfer import ExternalKV
from emulator.models import load_model
from emulator.request import Request
from emulator.sliding_window import NULL, HybridKVCacheManager
from profiles.deployment import build_deployment

MODEL = "openai/gpt-oss-120b"
GPT_OSS = load_model(MODEL)
BS = 16
SLOW = {"between": ("n0", "n1"), "bandwidth": 2e8, "latency": 1e-3}  # ~0.8 s to move a 4,000-token prompt


def deployment(connector: str | None = None, policy: str | None = None, **kw):
    fields = {}
    if connector is not None:
        fields = {"kv_connector": connector, "kv_role": "kv_both"}
        if policy is not None:
            fields["kv_load_failure_policy"] = policy
    args = EngineArgs(max_model_len=kw.pop("max_model_len", 16384), num_gpu_blocks_override=kw.pop("blocks", 3000),
                      kv_transfer_config=json.dumps(fields) if fields else None, **kw)
    return build_deployment(MODEL, "H100", args)


def pd_pair(prefill=None, decode=None, links=(SLOW,), faults=()):
    prefill, decode = prefill or deployment(), decode or deployment()
    specs = (InstanceSpec("p0", prefill, ("m",), "prefill", "n0"), InstanceSpec("d0", decode, ("m",), "decode", "n1"))
    return build_cluster(ClusterSpec(specs, "least_loaded", faults=faults, links=links))


def moves_of(sim) -> list:
    moves = []
    sim.transfers.listeners.append(moves.append)
    return moves


def prompts(n: int, length: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 30000, length) for _ in range(n)]


def assert_all_free(sim) -> None:
    assert not sim.active and not sim.transfers.loads and not sim.transfers.held
    for engine in sim.engines:
        assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks - 1
        if isinstance(engine.kv, HybridKVCacheManager):
            assert not engine.kv.tables


def _layers(kind: str) -> int:
    return sum((t == "sliding_attention") == (kind == "sliding") for t in GPT_OSS.layer_types)


def test_a_transfer_moves_the_full_groups_blocks_and_the_sliding_groups_window_tail():
    sim = pd_pair()
    assert all(isinstance(e.kv, HybridKVCacheManager) for e in sim.engines)
    moves = moves_of(sim)
    request = Request("r", 1000, 20, arrival_time=0.0, prompt_token_ids=prompts(1, 1000)[0])
    sim.run([request])
    assert request.finish_reason == "length" and len(moves) == 1
    tokens = request.num_external_tokens
    assert tokens == 1000
    # by hand, from the model: K and V of 8 heads of 64 in bf16 per layer and token; 18 sliding layers of a
    # 128-token window, 18 full ones
    per_layer = 2 * GPT_OSS.num_kv_heads * GPT_OSS.head_dim * 2
    assert (per_layer, GPT_OSS.sliding_window, _layers("sliding"), _layers("full")) == (2048, 128, 18, 18)
    full_blocks = -(-1000 // BS)                                    # 63
    skipped = (1000 - 128 + 1) // BS                                # 54 blocks wholly before the window: null
    sliding_blocks = min(full_blocks - skipped, -(-128 // BS) + 1)  # 9 (blocks_per_sw: 9)
    assert (full_blocks, sliding_blocks) == (63, 9)
    expected = BS * per_layer * (18 * full_blocks + 18 * sliding_blocks)
    assert expected == 42_467_328
    move = moves[0]
    assert move.num_bytes == expected and move.blocks == 72
    assert move.descriptors == 2 * 18 * 72  # a region per shared layer tensor, K and V, each group's blocks in it
    # with the manager off: one group, every layer in every block
    sim = pd_pair(deployment(disable_hybrid_kv_cache_manager=True), deployment(disable_hybrid_kv_cache_manager=True))
    moves = moves_of(sim)
    sim.run([Request("r", 1000, 20, arrival_time=0.0, prompt_token_ids=prompts(1, 1000)[0])])
    assert moves[0].num_bytes == full_blocks * BS * 36 * per_layer == 74_317_824
    assert moves[0].blocks == 63 and moves[0].descriptors == 2 * 36 * 63
    assert_all_free(sim)


def test_the_decode_side_allocates_every_group_before_the_load_and_the_prefill_holds_its_window():
    sim = pd_pair()
    prefill, decode = sim.engines
    request = Request("r", 4000, 20, arrival_time=0.0, prompt_token_ids=prompts(1, 4000)[0])
    sim.submit(request)
    seen = {}

    def look():
        load = sim.transfers.loads.get("r")
        if load is not None and not seen:
            seen["decode"] = [list(t) for t in decode.kv.tables[load.request]]
            held = next(iter(prefill.scheduler.held.values()))
            seen["prefill"] = [list(t) for t in prefill.kv.tables[held]]
            seen["sent"] = prefill.kv.group_block_ids(held)
            seen["free"] = (prefill.kv.num_free_blocks, decode.kv.num_free_blocks)
    for t in np.arange(0.05, 5.0, 0.05):
        sim.advance(float(t))
        look()
    sliding, full = seen["decode"]
    assert len(full) == len(sliding) == 250 and NULL not in full
    skipped = (4000 - 128 + 1) // BS  # 242: the null block in the sliding table
    assert sliding[:skipped] == [NULL] * skipped and NULL not in sliding[skipped:]
    assert seen["free"][1] == 3000 - 1 - 250 - (250 - skipped)
    p_sliding, p_full = seen["prefill"]
    assert len(p_full) == 250 and NULL not in p_full
    # the prefill freed the sliding blocks before the window of its 4000 processed tokens when it finished
    assert len([b for b in p_sliding if b != NULL]) == 250 - skipped
    # what NIXL names: the sliding table's last cdiv(128, 16) + 1 = 9 entries as they are (its 8 blocks after a
    # null one, vLLM's get_exchange_clipped_blocks), every full block
    assert [len(b) for b in seen["sent"]] == [9, 250] and seen["sent"][0] == p_sliding[-9:]
    assert seen["sent"][0].count(NULL) == 1 == 9 - (250 - skipped)
    sim.advance(60.0)
    assert request.finish_reason == "length" and request.num_external_tokens == 4000
    assert_all_free(sim)


def test_held_params_name_each_groups_blocks():
    sim = pd_pair()
    request = Request("pre", 3000, 1, max_tokens=1, arrival_time=0.0, prompt_token_ids=prompts(1, 3000)[0])
    request.hold_kv = True
    sim.submit(request, instance=sim.instance("p0"))
    sim.advance(5.0)
    sim.transfers.hold(request, "NixlConnector")
    params = sim.transfers.held_params(request, "10.0.0.1", 8100)
    sliding, full = params["remote_block_ids"]
    assert len(full) == -(-3000 // BS) and len(sliding) == 9  # clipped to the window's blocks_per_sw
    decode = Request("dec", 3000, 20, arrival_time=sim.now, prompt_token_ids=prompts(1, 3000)[0])
    decode.external_kv = ExternalKV(3000, sim.transfers.remote_source(params, "NixlConnector"))
    sim.submit(decode, instance=sim.instance("d0"))
    sim.advance(60.0)
    assert decode.finish_reason == "length" and decode.num_external_tokens == 3000
    assert_all_free(sim)


@pytest.mark.parametrize("connector", ["NixlConnector", "MooncakeConnector"])
def test_explicit_hma_connectors_keep_the_groups_under_back_pressure(connector):
    # a decode pod with room for a few prompts at once: loads wait for blocks (vLLM's back-pressure)
    sim = pd_pair(deployment(connector), deployment(connector, blocks=1100, max_model_len=8192))
    peak = []
    decode = sim.engines[1]
    sim.transfers.listeners.append(lambda move: peak.append(decode.kv.pool.num_blocks - decode.kv.num_free_blocks))
    assert all(isinstance(e.kv, HybridKVCacheManager) for e in sim.engines)
    moves = moves_of(sim)
    requests = [Request(f"r{i}", 3000, 200, arrival_time=0.02 * i, prompt_token_ids=p)
                for i, p in enumerate(prompts(12, 3000, seed=1))]
    sim.run(requests)
    assert all(r.finish_reason == "length" and r.num_external_tokens == 3000 for r in requests)
    assert len(moves) == 12 and max(peak) > 1100 // 2  # the decode pod was short of blocks
    for move in moves:  # 188 full blocks, the sliding tail
        assert move.blocks == 188 + 9 and move.num_bytes == BS * 2048 * 18 * (188 + 9)
        if connector == "MooncakeConnector":  # runs of blocks contiguous on both sides, group by group
            assert move.descriptors % (2 * 18) == 0 and move.descriptors <= 2 * 18 * move.blocks
    assert_all_free(sim)


def _faulted(policy: str | None):
    sim = pd_pair(decode=deployment("NixlConnector", policy), faults=(FaultSpec("p0", 2.0, None, False),))
    requests = [Request(f"r{i}", 4000, 20, arrival_time=i * 0.1, prompt_token_ids=p)
                for i, p in enumerate(prompts(30, 4000, seed=2))]
    ended = []
    sim.add_finish_listener(ended.append)
    sim.run(requests)
    assert sorted(r.request_id for r in ended) == sorted(r.request_id for r in requests)  # each once
    assert sim.transfers.num_failed > 0
    assert_all_free(sim)
    return sim, {r.request_id for r in requests if r.finish_reason == "error"}


def test_a_prefill_pod_failing_mid_transfer_leaks_no_block_under_either_policy():
    fail, errored = _faulted(None)  # vLLM's default "fail"
    recompute, errored_too = _faulted("recompute")
    # the same run up to the fault: those still on the prefill pod fail either way; those whose load failed end
    # with an error under "fail", and compute their prompts under "recompute"
    assert fail.transfers.num_failed == recompute.transfers.num_failed
    assert errored_too < errored and len(errored - errored_too) == fail.transfers.num_failed


def test_a_failed_load_behind_a_local_hit_recomputes_and_frees_every_group():
    prompt = prompts(1, 4000, seed=3)[0]
    # (2050 tokens: the decode side caches the sliding blocks up to its prompt's last block, the window's run
    # before the 2048-token prefix the second shares)
    first = Request("first", 2050, 2, arrival_time=0.0, prompt_token_ids=prompt[:2050].copy())
    second = Request("second", 4000, 20, arrival_time=1.0, prompt_token_ids=prompt)
    sim = pd_pair(decode=deployment("NixlConnector", "recompute"), faults=(FaultSpec("p0", 1.2, None, False),))
    sim.run([first, second])
    assert sim.transfers.num_failed >= 1
    assert second.finish_reason == "length" and second.num_external_tokens == 0
    assert second.num_cached_tokens == 2048  # the decode side's own hit, kept through the failed load
    assert_all_free(sim)
