"""P/D and KV tiers against untrusted input and failures: kv_transfer_params with a tp_size no prefill
can have, vLLM's kv_load_failure_policy, --kv-transfer-config checked as vLLM's KVTransferConfig, the
prefill's lease (kv_lease_duration, renewed while a decode side waits), the offload tiers' KV events
and --kv-events-config's buffer_steps. Virtual time only."""
from __future__ import annotations

import argparse
import dataclasses
import json

import aiohttp
import pytest

from emulator.cluster import ClusterSpec, FaultSpec, build_cluster
from emulator.config import ConfigError, EngineArgs, parse_kv_transfer_config
from emulator.disaggregation import LostSource, RemoteSource
from emulator.instance import InstanceSpec
from emulator.kv_events import BlockHasher, BlockStored, external_hash, request_token_ids
from emulator.kv_transfer import ExternalKV, tp_compatible
from emulator.models import load_model
from emulator.kv_stats import KVMove
from emulator.request import Request
from profiles.cluster_file import read_cluster_file
from profiles.deployment import build_deployment
from server.kv_events import KVEventPublishers, KVEventsConfig, parse_kv_events_config
from conversations import multi_turn
from pd_pair import pd_pair_file
from server.testing import free_port, running_server

MODEL = "meta-llama/Llama-3.1-8B"  # 32 attention heads, 8 KV heads
NIXL = "NixlConnector"


def deployment(policy: str | None = None, connector: str = NIXL, extra: dict | None = None, **kw):
    """Llama-8B on an H100; a kv-transfer-config only when something differs from a role-only instance's."""
    fields = {"kv_connector": connector, "kv_role": "kv_both"}
    if policy is not None:
        fields["kv_load_failure_policy"] = policy
    if extra is not None:
        fields["kv_connector_extra_config"] = extra
    config = json.dumps(fields) if fields != {"kv_connector": NIXL, "kv_role": "kv_both"} else None
    return build_deployment(MODEL, "H100", EngineArgs(max_model_len=16384, kv_transfer_config=config, **kw))


def pd_pair(prefill=None, decode=None, links=(), faults=()):
    prefill, decode = prefill or deployment(), decode or deployment()
    specs = (InstanceSpec("p0", prefill, ("llama",), "prefill", "n0"),
             InstanceSpec("d0", decode, ("llama",), "decode", "n1" if links else "n0"))
    return build_cluster(ClusterSpec(specs, "least_loaded", faults=faults, links=links))


def moves_of(sim) -> list:
    moves = []
    sim.transfers.listeners.append(moves.append)
    return moves


def prefill_over_http(sim, rid: str = "pre", prompt: int = 3000, at: float = 0.0) -> tuple[Request, dict]:
    """What a prefill pod does with do_remote_decode (server.engine_client): run the prompt for one
    token, keep its blocks, answer the params a decode pod needs."""
    request = Request(rid, prompt, 1, max_tokens=1, arrival_time=at)
    request.hold_kv = True
    sim.submit(request, instance=sim.instance("p0"))
    sim.advance(at + 5.0)
    assert request.finish_reason == "length"
    sim.transfers.hold(request, NIXL)
    return request, sim.transfers.held_params(request, "10.0.0.1", 8100)


def decode_over_http(sim, params: dict, rid: str = "dec", prompt: int = 3000, until: float = 60.0) -> Request:
    """What a decode pod does with do_remote_prefill: load the prompt's KV from the source named."""
    request = Request(rid, prompt, 20, arrival_time=sim.now)
    request.external_kv = ExternalKV(prompt, sim.transfers.remote_source(params, NIXL))
    sim.submit(request, instance=sim.instance("d0"))
    sim.advance(until)
    return request


def assert_all_blocks_free(sim) -> None:
    assert not sim.active and not sim.transfers.loads and not sim.transfers.held
    for engine in sim.engines:
        assert engine.scheduler.num_loading == 0 and not engine.scheduler.held
        assert engine.kv.num_free_blocks == engine.num_gpu_blocks - 1


# -- 1. tp_size from kv_transfer_params -----------------------------------------------------------
def test_tp_compatibility_is_the_nixl_handshakes():
    llama = load_model(MODEL)
    mla = dataclasses.replace(llama, kv_lora_rank=512)
    assert tp_compatible(1, 1, llama) and tp_compatible(4, 2, llama) and tp_compatible(2, 8, llama)
    assert not tp_compatible(4, 3, llama)        # neither divides the other (and 32 heads do not split in 3)
    assert not tp_compatible(1, 16, llama)       # reading from 16 prefill ranks, but only 8 KV heads to split
    assert not tp_compatible(1, 64, llama)       # no TP of 64 runs 32 attention heads
    for junk in (10 ** 7, 0, -2, "2", 2.0, None, True, [2]):
        assert not tp_compatible(1, junk, llama)
    assert tp_compatible(1, 16, mla)             # MLA's latent KV is never split by heads


@pytest.mark.parametrize("policy", [None, "fail", "recompute"])
def test_a_huge_tp_size_fails_the_load_without_fanning_out(policy):
    sim = pd_pair(decode=deployment(policy))
    moves = moves_of(sim)
    params = {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "elsewhere",
              "remote_request_id": "x", "remote_block_ids": [[1, 2, 3]], "remote_host": "10.0.0.9",
              "remote_port": 5600, "tp_size": 10 ** 7}
    assert isinstance(sim.transfers.remote_source(params, NIXL), RemoteSource)
    request = decode_over_http(sim, params, prompt=800)
    assert request.is_finished and sim.transfers.num_failed == 1 and sim.transfers.stats[1].pd_failed == 1
    assert not moves and sim.transfers.bytes_moved == 0  # no transfer ran, let alone 10**7 of them
    if policy == "recompute":
        assert request.finish_reason == "length" and request.num_external_tokens == 0
        assert request.num_output_tokens == 20
    else:  # vLLM 0.33's default policy is "fail"
        assert request.finish_reason == "error" and request.num_output_tokens == 0
    assert_all_blocks_free(sim)


def test_a_compatible_remote_tp_moves_one_transfer_per_rank_pair():
    sim = pd_pair()
    moves = moves_of(sim)
    params = {"do_remote_prefill": True, "remote_engine_id": "elsewhere", "remote_request_id": "x", "tp_size": 4}
    request = decode_over_http(sim, params, prompt=800)
    assert request.finish_reason == "length" and request.num_external_tokens == 800
    assert [m.ranks for m in moves] == [4] and sim.transfers.num_failed == 0
    missing_tp = {"do_remote_prefill": True, "remote_engine_id": "elsewhere", "remote_request_id": "y"}
    assert sim.transfers.remote_source(missing_tp, NIXL).tp_size == 1  # vLLM's default for a missing tp_size


@pytest.mark.parametrize("prefill_tp, ok", [(4, True), (8, False)])
def test_a_decode_instance_reading_from_more_prefill_ranks_than_kv_heads_fails_every_load(prefill_tp, ok):
    """Qwen3-30B-A3B has 4 KV heads: a TP-1 decode side can read from a TP-4 prefill, not from a TP-8
    one (its KV heads are replicated), as vLLM's NIXL handshake refuses it."""
    model = "Qwen/Qwen3-30B-A3B"
    p = build_deployment(model, "H100", EngineArgs(max_model_len=4096, tensor_parallel_size=prefill_tp))
    d = build_deployment(model, "H100", EngineArgs(max_model_len=4096))
    sim = pd_pair(p, d)
    requests = [Request(f"r{i}", 1000, 5, arrival_time=i * 0.1) for i in range(3)]
    sim.run(requests)
    assert all(r.finish_reason == ("length" if ok else "error") for r in requests)
    assert sim.transfers.num_failed == (0 if ok else 3)
    assert_all_blocks_free(sim)


async def test_over_http_a_huge_tp_size_answers_vllms_internal_error_and_the_pod_keeps_serving(tmp_path):
    port_p, port_d = free_port(), free_port()
    path = pd_pair_file(tmp_path, port_p, port_d, model=MODEL, prefill="p", decode="d")
    params = {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "elsewhere",
              "remote_request_id": "x", "remote_block_ids": [[1, 2, 3]], "remote_host": "10.0.0.9",
              "remote_port": 5600, "tp_size": 10 ** 7}
    async with running_server("--speed", "200", deployment=read_cluster_file(path)[0]) as server:
        decode_url = server.urls[2]
        async with aiohttp.ClientSession() as http:
            payload = {"prompt": list(range(100, 600)), "max_tokens": 5, "ignore_eos": True}
            async with http.post(decode_url + "/v1/completions", json=dict(payload, kv_transfer_params=params)) as r:
                assert r.status == 500
                assert (await r.json())["error"]["type"] == "InternalServerError"
            async with http.post(decode_url + "/v1/completions", json=payload) as r:
                assert r.status == 200
            async with http.get(decode_url + "/metrics") as r:
                metrics = await r.text()
        failed = [line for line in metrics.splitlines() if line.startswith("vllm:nixl_num_failed_transfers_total{")]
        assert len(failed) == 1 and failed[0].endswith(" 1.0")
        assert_all_blocks_free(server.engine.sim)


# -- 2. kv_load_failure_policy ------------------------------------------------------------------
@pytest.mark.parametrize("policy", [None, "recompute"])
def test_a_decode_naming_a_prefill_engine_that_failed_is_a_failed_load(policy):
    sim = pd_pair(decode=deployment(policy))
    prefill, params = prefill_over_http(sim)
    sim.fail_instance("p0")
    source = sim.transfers.remote_source(params, NIXL)
    assert isinstance(source, LostSource)  # not a silent read from "another process"
    request = decode_over_http(sim, params)
    assert sim.transfers.num_failed == 1
    if policy == "recompute":
        assert request.finish_reason == "length" and request.num_external_tokens == 0
    else:
        assert request.finish_reason == "error"
    sim.restore_instance("p0")  # a restarted pod is a new vLLM: a new engine id; the old one stays lost
    again, fresh = prefill_over_http(sim, "pre2", at=sim.now)
    assert fresh["remote_engine_id"] != params["remote_engine_id"]
    assert isinstance(sim.transfers.remote_source(params, NIXL), LostSource)
    second = decode_over_http(sim, fresh, "dec2", until=sim.now + 60)
    assert second.finish_reason == "length" and second.num_external_tokens == 3000
    assert_all_blocks_free(sim)


@pytest.mark.parametrize("policy", [None, "recompute"])
def test_a_prefill_instance_failing_mid_transfer_ends_its_readers_as_the_policy_says(policy):
    slow = {"between": ("n0", "n1"), "bandwidth": 1e9, "latency": 1e-3}
    sim = pd_pair(decode=deployment(policy), links=(slow,), faults=(FaultSpec("p0", 2.0, None, False),))
    requests = [Request(f"r{i}", 4000, 20, arrival_time=i * 0.1) for i in range(30)]
    ended = []
    sim.add_finish_listener(ended.append)
    sim.run(requests)
    assert sorted(r.request_id for r in ended) == sorted(r.request_id for r in requests)  # each once
    errored = [r for r in requests if r.finish_reason == "error"]
    failed = sim.transfers.num_failed
    assert failed > 0
    if policy == "recompute":
        assert not errored
    else:  # every request whose load failed ends with an error: vLLM's FINISHED_ERROR
        assert len(errored) == failed and all(r.num_output_tokens == 0 for r in errored)
    assert_all_blocks_free(sim)


# -- 3. --kv-transfer-config as vLLM's KVTransferConfig -------------------------------------------
def test_kv_transfer_config_is_checked_as_vllm_checks_it():
    def error(config: dict) -> str:
        with pytest.raises(ConfigError) as info:
            parse_kv_transfer_config(json.dumps(config))
        return str(info.value)
    assert error({"kv_connector": NIXL, "kv_role": "kv_both", "kv_lease": 5}) == (
        "1 validation error for KVTransferConfig\nkv_lease\n  Unexpected keyword argument "
        "[type=unexpected_keyword_argument, input_value=5, input_type=int]")
    assert error({"kv_connector": NIXL}) == (
        "1 validation error for KVTransferConfig\n  Value error, Please specify kv_role when kv_connector is set, "
        "supported roles are ('kv_producer', 'kv_both', 'kv_consumer') [type=value_error, "
        "input_value=ArgsKwargs((), {'kv_connector': 'NixlConnector'}), input_type=ArgsKwargs]")
    assert error({"kv_connector": NIXL, "kv_role": "kv_both", "kv_load_failure_policy": "retry"}) == (
        "1 validation error for KVTransferConfig\nkv_load_failure_policy\n  Input should be 'recompute' or 'fail' "
        "[type=literal_error, input_value='retry', input_type=str]")
    two = error({"kv_connector": 5, "kv_role": "producer"})
    assert two.startswith("2 validation errors for KVTransferConfig\nkv_connector\n  Input should be a valid string")
    assert "kv_role\n  Input should be 'kv_producer', 'kv_both' or 'kv_consumer'" in two
    assert "Input should be a valid integer, unable to parse string" in error(
        {"kv_connector": NIXL, "kv_role": "kv_both", "kv_port": "x"})
    assert "kv_lease_duration must be a positive number" in error(
        {"kv_connector": NIXL, "kv_role": "kv_both", "kv_connector_extra_config": {"kv_lease_duration": "long"}})
    for connector in ("NixlConnector", "MooncakeConnector", "P2pNcclConnector", "LMCacheConnectorV1"):
        config = {"kv_connector": connector, "kv_role": "kv_consumer", "kv_port": "14579", "engine_id": None,
                  "kv_buffer_device": "cuda", "enable_permute_local_kv": "false", "kv_load_failure_policy": "fail",
                  "kv_connector_extra_config": {"kv_lease_duration": 12}}
        assert parse_kv_transfer_config(json.dumps(config)) == config
    with pytest.raises(ConfigError, match="Unexpected keyword argument"):  # at start-up, with the engine args
        build_deployment(MODEL, "H100", EngineArgs(kv_transfer_config='{"kv_connector": "NixlConnector", '
                                                                      '"kv_role": "kv_both", "typo": 1}'))


def test_policy_and_lease_follow_the_config_with_vllms_defaults():
    assert deployment().config.kv_load_failure_policy == "fail"
    assert deployment("recompute").config.kv_load_failure_policy == "recompute"
    assert deployment().config.kv_lease_duration == 30
    assert deployment(extra={"kv_lease_duration": 7}).config.kv_lease_duration == 7
    assert deployment(connector="MooncakeConnector").config.kv_lease_duration == 480  # its request timeout


def test_an_unread_prefill_is_freed_when_its_kv_lease_duration_runs_out():
    sim = pd_pair(prefill=deployment(extra={"kv_lease_duration": 5}))
    prefill_over_http(sim)  # nobody reads it
    held_at = sim.now
    sim.advance(held_at + 4.9)
    assert sim.transfers.held and sim.engines[0].scheduler.held
    sim.advance(held_at + 5.01)
    assert not sim.transfers.held and sim.transfers.stats[0].pd_expired == 1
    assert_all_blocks_free(sim)


def test_a_read_notice_from_another_process_counts_on_the_prefill_side():
    """A decode pod in another process read it (server.kv_read_notice): the prefill side frees the blocks
    and counts what was sent; a notice after the lease ran out is a late read, one per rank (vLLM's
    prefill worker counts a notification for a request it no longer tracks)."""
    sim = pd_pair(prefill=deployment(extra={"kv_lease_duration": 5}))
    moves = moves_of(sim)
    read = KVMove("pd", None, None, NIXL, 188 * 16 * 131072.0, 0.01, 188, 1, 188 * 64)
    _, params = prefill_over_http(sim, "first")
    assert sim.transfers.read_elsewhere(params["remote_engine_id"], params["remote_request_id"], read)
    stats = sim.transfers.stats[0]
    assert stats.pd_sent == 1 and stats.pd_sent_bytes == read.num_bytes and stats.pd_late_reads == 0
    assert [(m.engine, m.source_engine, m.num_bytes) for m in moves] == [(None, 0, read.num_bytes)]
    _, params = prefill_over_http(sim, "second", at=sim.now)
    sim.advance(sim.now + 6.0)  # nobody read it in time
    assert stats.pd_expired == 1
    late = KVMove("pd", None, None, NIXL, 0.0, 0.01, 188, 2, 188 * 64)  # a TP 2 decode side: two ranks read
    assert not sim.transfers.read_elsewhere(params["remote_engine_id"], params["remote_request_id"], late)
    assert stats.pd_late_reads == 2 and stats.pd_sent == 1
    assert not sim.transfers.read_elsewhere(params["remote_engine_id"], params["remote_request_id"], late)
    assert stats.pd_late_reads == 2  # counted once
    assert_all_blocks_free(sim)


def test_a_decode_side_reading_keeps_the_lease_alive_as_nixl_heartbeats_do():
    """The transfer outlasts the lease: NIXL's decode side renews it (every lease/6, by 2/3 of it) from the
    request's arrival until its load ends, so the prefill's blocks are not freed under the read."""
    slow = {"between": ("n0", "n1"), "bandwidth": 1e8, "latency": 1e-3}
    sim = pd_pair(prefill=deployment(extra={"kv_lease_duration": 2}), links=(slow,))
    request = Request("r", 3000, 10, arrival_time=0.0)
    sim.run([request])
    assert request.finish_reason == "length" and request.num_external_tokens == 3000
    stats = sim.transfers.stats[0]
    assert sim.transfers.stats[1].pd_load_seconds > 3.0  # 393 MB at 100 MB/s
    assert stats.pd_expired == 0 and stats.pd_late_reads == 0 and stats.pd_sent == 1
    assert_all_blocks_free(sim)


# -- 4. the offload tiers' KV events ----------------------------------------------------------------
CHATS = {"first": 1500, "added": 300, "output": 30, "turn_gap": 20.0, "stagger": 0.3, "model": None}


def published(sim) -> tuple[list[list], KVEventPublishers]:
    """KVEventPublishers on every engine, its batches captured instead of sent."""
    batches: list[list] = []
    publishers = KVEventPublishers(KVEventsConfig(enable_kv_cache_events=True, endpoint="inproc://pd-hardening"),
                                   sim, epoch_of=lambda t: t)
    for publisher in publishers.publishers:
        publisher.close()
        publisher.publish = lambda ts, events: batches.append(events)
    return batches, publishers


def test_cpu_and_cxl_tiers_publish_their_blocks_with_vllms_hashes_after_the_gpu_events():
    d = build_deployment(MODEL, "H100", EngineArgs(max_model_len=8192, num_gpu_blocks_override=600,
                                                   kv_offloading_size=0.5))
    nodes = {"n0": {"cxl_memory": 2 ** 30}}
    sim = build_cluster(ClusterSpec((InstanceSpec("i", d, ("llama",), node="n0"),), nodes=nodes))
    batches, publishers = published(sim)
    requests = multi_turn(12, 3, **CHATS)
    hasher = BlockHasher("sha256")  # vLLM's hashes of the requests' tokens (the engine drops them on arrival)
    vllm = {external_hash(h) for r in requests for h in hasher.chain(request_token_ids(r, 16).tolist(), 16)}
    sim.run(requests)
    publishers.close()
    cpu, cxl = sim.engines[0].kv.offload.tiers
    assert cpu.evicted > 0 and cxl.stored > 0
    held: dict[str, set] = {"GPU": set(), "CPU": set(), "CXL": set()}
    ever_on_gpu: set = set()
    counts = {"CPU": 0, "CXL": 0}
    for batch in batches:
        media = [e.medium for e in batch]
        first_tier = next((i for i, m in enumerate(media) if m != "GPU"), len(media))
        assert all(m == "GPU" for m in media[:first_tier]) and "GPU" not in media[first_tier:]
        for event in batch:
            if isinstance(event, BlockStored):
                if event.medium != "GPU":  # vLLM's OffloadingConnector placeholder: one hash, no payload
                    assert len(event.block_hashes) == 1 and event.parent_block_hash is None
                    assert event.token_ids == [] and event.block_size == 0 and event.kv_cache_spec_kind is None
                    assert event.block_hashes[0] in ever_on_gpu | held["CPU"]
                    counts[event.medium] += 1
                assert not held[event.medium] & set(event.block_hashes)
                held[event.medium] |= set(event.block_hashes)
                if event.medium == "GPU":
                    ever_on_gpu |= set(event.block_hashes)
            else:
                assert set(event.block_hashes) <= held[event.medium]  # only what it holds leaves
                held[event.medium] -= set(event.block_hashes)
    assert counts == {"CPU": cpu.stored, "CXL": cxl.stored}
    assert len(held["CPU"]) == len(cpu.blocks) and len(held["CXL"]) == len(cxl.blocks)
    assert held["CPU"] | held["CXL"] <= vllm


def test_a_pool_shared_by_a_node_publishes_no_tier_events():
    d = build_deployment(MODEL, "H100", EngineArgs(max_model_len=16384, kv_offloading_size=1.0,
                                                   kv_offloading_backend="lmcache"))
    sim = build_cluster(ClusterSpec((InstanceSpec("i", d, ("llama",), node="n0"),)))
    batches, publishers = published(sim)
    sim.run(multi_turn(2, 2, **CHATS))
    publishers.close()
    assert batches and all(e.medium == "GPU" for batch in batches for e in batch if hasattr(e, "medium"))
    assert sim.engines[0].kv.offload.tiers[0].stored > 0 and sim.engines[0].kv.offload.on_change is None


# -- 5. --kv-events-config --------------------------------------------------------------------------
def test_a_negative_buffer_steps_is_a_clean_start_up_error():
    with pytest.raises(argparse.ArgumentTypeError, match="buffer_steps must be non-negative"):
        parse_kv_events_config('{"enable_kv_cache_events": true, "buffer_steps": -1}')
    assert parse_kv_events_config('{"enable_kv_cache_events": true, "buffer_steps": 0}').buffer_steps == 0
