"""A pod fails while a request loads its prompt's KV from the pod's own offload tier: the load dies with the pod
(its tiers went with it), nothing escapes the event loop, every block is free, and the request ends once: with
an error, or re-routed to another pod where it runs from scratch."""
from __future__ import annotations

import pytest

from emulator.cluster import ClusterSpec, build_cluster
from emulator.config import EngineArgs
from emulator.instance import InstanceSpec
from emulator.request import Request, RequestStatus
from profiles.deployment import build_deployment

MODEL = "meta-llama/Llama-3.1-8B"
PROMPT = list(range(7, 1607))
OTHER = list(range(5000, 5640))


def _loading_from_tiers(names: tuple[str, ...], nodes: dict | None = None, cpu_gib: float = 1.0,
                        prompt: list[int] = PROMPT, push_out: bool = False, backend: str = "native"):
    """A cluster whose pod "a" (or the one both requests' session goes to) loads r1's prompt from its CPU tier:
    r0's prompt was stored there, then the GPU prefix cache was reset."""
    deployment = build_deployment(MODEL, "H100", EngineArgs(max_model_len=4096, num_gpu_blocks_override=300,
                                                            kv_offloading_size=cpu_gib,
                                                            kv_offloading_backend=backend))
    specs = tuple(InstanceSpec(n, deployment, ("m",), node="n0" if nodes else None) for n in names)
    sim = build_cluster(ClusterSpec(specs, "session_affinity", nodes=nodes or {}))
    ended: list[Request] = []
    sim.add_finish_listener(ended.append)
    r0 = Request("r0", len(prompt), 4, arrival_time=0.0, model="m", prompt_token_ids=prompt, session="s")
    sim.submit(r0)
    while (t := sim.next_event_time()) is not None:
        sim.advance(t)
    if push_out:  # another prompt's blocks push some of r0's out of the CPU tier
        other = Request("other", 640, 4, arrival_time=sim.now, model="m", prompt_token_ids=OTHER, session="s")
        sim.submit(other)
        while (t := sim.next_event_time()) is not None:
            sim.advance(t)
    engine = sim.engines[r0.engine_index]
    assert engine.kv.offload.tiers[0].num_held and engine.kv.reset_prefix_cache()
    r1 = Request("r1", len(prompt), 4, arrival_time=sim.now, model="m", prompt_token_ids=prompt, session="s")
    sim.submit(r1)
    while not r1.kv_loading:
        sim.advance(sim.next_event_time())
    assert r1.engine_index == engine.index and "r1" in sim.transfers.loads
    return sim, engine, r1, ended


def _nothing_left(sim) -> None:
    assert not sim.active and not sim.transfers.loads
    for engine in sim.engines:
        assert engine.kv.num_free_blocks == engine.num_gpu_blocks - 1 and engine.scheduler.num_loading == 0
        assert not any(tier.pins for tier in engine.kv.offload.tiers) and not engine.kv.offload.loading
        assert sim.transfers.stats[engine.index].tier_loading_blocks == 0
    assert not any(link.active for link in sim.transfers.links.links.values())


def test_a_pod_that_fails_mid_tier_load_fails_the_request_once():
    sim, engine, r1, ended = _loading_from_tiers(("a",))
    failed = sim.fail_instance(sim.instance_of[engine.index].name)
    assert failed == [r1] and r1.status == RequestStatus.FINISHED_ERROR
    while (t := sim.next_event_time()) is not None:
        sim.advance(t)
    assert ended.count(r1) == 1
    _nothing_left(sim)


def test_a_pod_that_fails_mid_tier_load_reroutes_the_request_which_computes_its_prompt_elsewhere():
    sim, engine, r1, ended = _loading_from_tiers(("a", "b"))
    assert sim.fail_instance(sim.instance_of[engine.index].name, reroute=True) == []
    assert r1.external_kv is None  # the tiers it was loading from are gone: looked up afresh where it goes
    while (t := sim.next_event_time()) is not None:
        sim.advance(t)
    assert r1.status == RequestStatus.FINISHED_LENGTH_CAPPED and r1.engine_index != engine.index
    assert ended.count(r1) == 1 and r1.num_output_tokens == 4
    _nothing_left(sim)


@pytest.mark.parametrize("reroute", [False, True])
def test_a_load_from_two_tiers_stops_on_both_links(reroute):
    """A load that reads from the CPU and the CXL tier runs one transfer per tier: both stop with the pod."""
    # a CPU tier of 51 blocks of 2 MiB: r0's 40 blocks, some of them pushed out to the CXL tier by 40 others'
    sim, engine, r1, _ = _loading_from_tiers(("a", "b"), {"n0": {"cxl_memory": 64 * 2 ** 30}}, cpu_gib=0.1,
                                             prompt=PROMPT[:640], push_out=True)
    load = sim.transfers.loads["r1"]
    assert len(load.rest) == 1
    sim.fail_instance(sim.instance_of[engine.index].name, reroute=reroute)
    while (t := sim.next_event_time()) is not None:
        sim.advance(t)
    assert r1.is_finished and all(transfer.remaining > 0 for _, transfer in load.rest)
    _nothing_left(sim)


def test_a_load_from_a_nodes_shared_pool_is_released_there_when_the_pod_fails():
    """LMCache's pool is another process, shared by the node's pods: it keeps its blocks, and no longer pins
    those the failed pod was reading; the re-routed request loads them from it on the other pod."""
    sim, engine, r1, ended = _loading_from_tiers(("a", "b"), {"n0": {}}, backend="lmcache")
    pool = engine.kv.offload
    assert pool.shared and pool.tiers[0].pins
    sim.fail_instance(sim.instance_of[engine.index].name, reroute=True)
    assert not pool.tiers[0].pins and pool.tiers[0].num_held
    while (t := sim.next_event_time()) is not None:
        sim.advance(t)
    assert r1.engine_index != engine.index and r1.num_external_tokens > 0 and ended.count(r1) == 1
    _nothing_left(sim)
