"""The front door routes an HTTP request once: all its engine requests (its n choices, its prompts) go to the
instance the routing policy picks for the first, as a router or gateway sends one request to one vLLM pod;
inside that instance vLLM's own balancer still places each child on a data-parallel engine. One routing
decision per HTTP request; an instance takes all of them or none; with P/D, one prefill and one decode
instance for all of them."""
from __future__ import annotations

import re

import aiohttp
import numpy as np
import pytest

import front_door
from emulator.cluster import ClusterSpec, build_cluster
from emulator.config import EngineArgs
from emulator.instance import InstanceSpec
from emulator.request import Request
from emulator.simulation import AdmissionRefused
from profiles.deployment import build_deployment
from server.testing import running_server

LLAMA = "meta-llama/Llama-3.1-8B"
BUSY = ("The engine is currently busy and cannot accept new requests. Please try again later or on a "
        "different instance.")


@pytest.fixture(scope="module")
def h100():
    return build_deployment(LLAMA, "H100", EngineArgs(max_model_len=8192))


@pytest.fixture(scope="module")
def h100_bounded():
    return build_deployment(LLAMA, "H100", EngineArgs(max_model_len=8192, max_num_queued_reqs=3))


def cluster(deployment, n: int = 4, routing: str = "round_robin"):
    return build_cluster(ClusterSpec(tuple(InstanceSpec(f"i{k}", deployment, ("llama",)) for k in range(n)),
                                     routing))


def children(stem: str, n: int, prompt_len: int = 300, output_len: int = 20) -> list[Request]:
    """The engine requests of one HTTP request with n choices (vLLM's child ids "c_<id>"), one prompt."""
    prompt = np.arange(prompt_len, dtype=np.int64)
    return [Request(f"{c}_{stem}", prompt_len, output_len, max_tokens=output_len, prompt_token_ids=prompt)
            for c in range(n)]


def instance_of(sim, request: Request) -> str:
    return sim.instance_of[request.engine_index].name


def assert_all_accounted_for(sim, requests: list[Request]) -> None:
    assert all(r.is_finished for r in requests) and not sim.active
    assert not sim.transfers.loads and not sim.transfers.held and not sim.pd.group_of
    for engine in sim.engines:
        assert engine.is_idle and engine.kv.num_free_blocks == engine.num_gpu_blocks - 1


# -- the core: Simulation.submit_group ------------------------------------------------------------------
def test_the_children_of_one_request_land_on_one_instance_with_one_routing_decision(h100):
    sim = cluster(h100)
    choices = children("cmpl-a", 4)
    prompts = [Request(f"cmpl-b-{p}", 200 + p, 10, prompt_token_ids=np.arange(200 + p) + 1000 * p) for p in range(3)]
    sim.submit_group(choices)
    sim.submit_group(prompts)
    assert {instance_of(sim, r) for r in choices} == {"i0"}
    assert {instance_of(sim, r) for r in prompts} == {"i1"}  # round robin: one turn per HTTP request
    assert dict(sim.routing_decisions) == {"i0": 1, "i1": 1}
    assert [i.num_routed for i in sim.instances] == [4, 3, 0, 0]
    sim.run([])
    assert_all_accounted_for(sim, choices + prompts)


def test_a_single_request_is_still_one_decision_per_request(h100):
    sim = cluster(h100)
    singles = [Request(f"r{k}", 100, 5, arrival_time=0.01 * k) for k in range(6)]
    sim.run(singles)
    assert [instance_of(sim, r) for r in singles] == ["i0", "i1", "i2", "i3", "i0", "i1"]
    assert dict(sim.routing_decisions) == {"i0": 2, "i1": 2, "i2": 1, "i3": 1}


def test_inside_the_instance_vllms_balancer_places_each_child_on_a_data_parallel_engine():
    dp2 = build_deployment(LLAMA, "H100", EngineArgs(max_model_len=8192, data_parallel_size=2))
    sim = cluster(dp2, n=2)
    choices = children("cmpl-dp", 4)
    sim.submit_group(choices)
    assert {instance_of(sim, r) for r in choices} == {"i0"}
    assert sorted(r.engine_index for r in choices) == [0, 0, 1, 1]  # i0's two engines, as AsyncLLM's DP client
    sim.run([])
    assert_all_accounted_for(sim, choices)


def test_outstanding_tokens_count_every_child_of_the_group(h100):
    sim = cluster(h100, n=2, routing="least_outstanding_tokens")
    group = children("cmpl-big", 3, prompt_len=400, output_len=50)
    sim.submit_group(group)
    single = Request("cmpl-small", 500, 50, max_tokens=50)
    sim.submit(single)
    assert sim.instances[0].outstanding_tokens == 3 * (400 + 50)
    assert instance_of(sim, single) == "i1"  # i0 owes all three children's tokens
    sim.run([])
    assert [i.outstanding_tokens for i in sim.instances] == [0, 0]


def test_a_group_an_instance_cannot_take_whole_goes_whole_to_one_that_can(h100_bounded):
    sim = cluster(h100_bounded, n=2)
    a, _ = sim.instances
    sim.submit_group(children("cmpl-pod", 2), instance=a)  # on a's own port: a holds 2 of its 3
    group = children("cmpl-front", 2)
    sim.submit_group(group)  # round robin's turn is a's, but 2 + 2 > 3
    assert {instance_of(sim, r) for r in group} == {"i1"}
    assert dict(sim.routing_decisions) == {"i1": 1}


def test_a_group_no_instance_can_take_whole_is_refused_with_nothing_left_behind(h100_bounded):
    sim = cluster(h100_bounded)
    group = children("cmpl-n4", 4)
    with pytest.raises(AdmissionRefused, match="currently busy") as refused:
        sim.submit_group(group)
    assert refused.value.bound == "max_num_queued_reqs"
    assert not sim.active and not sim.routing_decisions
    assert all(r.engine_index is None for r in group)
    assert all(i.outstanding_tokens == 0 and i.num_routed == 0 for i in sim.instances)
    assert all(e.kv.num_free_blocks == e.num_gpu_blocks - 1 and e.is_idle for e in sim.engines)


def test_a_pd_cluster_sends_a_group_to_one_prefill_and_one_decode_instance(h100):
    specs = tuple(InstanceSpec(f"{role[0]}{k}", h100, ("llama",), role, "n0") for role in ("prefill", "decode")
                  for k in range(2))
    sim = build_cluster(ClusterSpec(specs, "round_robin"))
    prefills: list[Request] = []
    sim.add_finish_listener(lambda r: prefills.append(r) if r.request_id.endswith("@prefill") else None,
                            prefills=True)
    first, second = children("cmpl-pd", 2, prompt_len=600), children("cmpl-pd2", 2, prompt_len=600)
    sim.submit_group(first)
    sim.submit_group(second)
    sim.run([])
    by_client = {r.request_id.removesuffix("@prefill"): instance_of(sim, r) for r in prefills}
    assert [by_client[r.request_id] for r in first + second] == ["p0", "p0", "p1", "p1"]
    assert [instance_of(sim, r) for r in first + second] == ["d0", "d0", "d1", "d1"]
    assert dict(sim.routing_decisions) == {"p0": 1, "p1": 1, "d0": 1, "d1": 1}
    assert all(r.finish_reason == "length" for r in first + second)
    assert_all_accounted_for(sim, first + second)


def test_a_group_whose_placement_fails_midway_leaves_nothing_behind(h100, monkeypatch):
    sim = cluster(h100)
    a = sim.instances[0]
    pick, picked = a.pick_engine, []

    def dies_at_the_second(request, now, pinned=None):
        picked.append(request)
        if len(picked) == 2:
            raise RuntimeError("engine core died")
        return pick(request, now, pinned)
    monkeypatch.setattr(a, "pick_engine", dies_at_the_second)
    group = children("cmpl-midway", 3)
    with pytest.raises(RuntimeError, match="engine core died"):
        sim.submit_group(group)
    assert not sim.active and group[0].finish_reason == "abort"
    assert a.outstanding_tokens == 0
    monkeypatch.undo()
    sim.run([])
    assert all(e.kv.num_free_blocks == e.num_gpu_blocks - 1 and e.is_idle for e in sim.engines)


def test_ids_repeated_within_a_group_are_refused_before_anything_is_placed(h100):
    sim = cluster(h100)
    twice = [Request("same", 100, 5), Request("same", 100, 5)]
    with pytest.raises(ValueError, match="already in use"):
        sim.submit_group(twice)
    assert not sim.active and not sim.routing_decisions


# -- the server's front door -----------------------------------------------------------------------------
def _series(metrics: str, name: str) -> dict[str, float]:
    """label set -> value of one series family."""
    return {labels: float(value) for labels, value in re.findall(rf'^{re.escape(name)}\{{([^}}]*)}} (\S+)$',
                                                                 metrics, re.M)}


def _by(series: dict[str, float], label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for labels, value in series.items():
        key = re.search(rf'{label}="([^"]*)"', labels).group(1)
        out[key] = out.get(key, 0.0) + value
    return out


FOUR = f"""
engine: {{max-model-len: 4096}}
routing: round_robin
instances:
  - {{name: i, model: {LLAMA}, served_model_name: m, hardware: H100, count: 4}}
"""


async def test_the_front_door_sends_n_choices_and_a_prompt_list_each_to_one_instance(tmp_path):
    path = front_door.cluster_file(tmp_path, FOUR)
    async with running_server("--cluster", path, "--speed", "1000") as server, aiohttp.ClientSession() as http:
        async with http.post(server.url + "/v1/completions", json={
                "prompt": "hello there", "n": 4, "max_tokens": 6, "ignore_eos": True}) as r:
            assert r.status == 200 and len((await r.json())["choices"]) == 4
        async with http.post(server.url + "/v1/completions", json={
                "prompt": ["one", "two two", "three three three"], "max_tokens": 6, "ignore_eos": True}) as r:
            assert r.status == 200 and len((await r.json())["choices"]) == 3
        async with http.get(server.url + "/metrics") as r:
            metrics = await r.text()
    routed = _by(_series(metrics, "vllm_emulator:routing_decisions_total"), "cluster_instance")
    finished = _by(_series(metrics, "vllm:request_success_total"), "engine")
    assert sorted(routed.values()) == [0, 0, 1, 1]  # one decision per HTTP request
    assert sorted(finished.values()) == [0, 0, 3, 4]  # each request's children all on one instance


async def test_a_refused_prompt_list_answers_once_and_leaves_nothing_behind(tmp_path):
    path = front_door.cluster_file(tmp_path, FOUR.replace("max-model-len: 4096", "max-model-len: 4096, "
                                                                                   "max-num-queued-reqs: 2"))
    async with running_server("--cluster", path, "--speed", "1000") as server, aiohttp.ClientSession() as http:
        # the n check lets it in (1 <= 2, as vLLM's serving layer checks once); its 3 prompts fit no instance
        async with http.post(server.url + "/v1/completions", json={
                "prompt": ["one", "two", "three"], "max_tokens": 6}) as r:
            status, body = r.status, await r.json()
        async with http.get(server.url + "/load") as r:
            load = (await r.json())["server_load"]
        async with http.get(server.url + "/metrics") as r:
            metrics = await r.text()
        engine = server.engine
        leftovers = front_door.leftovers(engine)
        async with http.post(server.url + "/v1/completions", json={"prompt": ["one", "two"], "max_tokens": 6}) as r:
            fits = r.status
    assert status == 503 and body["error"]["message"] == BUSY
    assert load == 0 and leftovers == (0, 0, 0, [True] * 4)
    assert _by(_series(metrics, "vllm:admission_rejections_total"), "reason") == {"max_num_queued_reqs": 1.0,
                                                                                  "max_num_queued_tokens": 0.0}
    assert sum(_series(metrics, "vllm_emulator:routing_decisions_total").values()) == 0
    assert fits == 200


# -- the queue bounds, checked per prompt as vLLM's AsyncLLM.add_request checks them -----------------------
BACKLOG = ("The engine has reached its prefill token backlog limit. Please try again later or on a different "
           "instance.")


def prompt_list(stem: str, lengths: list[int], choices: int = 1) -> list[Request]:
    """The engine requests of one HTTP request with a prompt list (each prompt's choices share its token ids)."""
    requests = []
    for p, length in enumerate(lengths):
        prompt = np.arange(length, dtype=np.int64) + 1000 * p
        requests += [Request(f"{c}_{stem}-{p}" if choices > 1 else f"{stem}-{p}", length, 8, max_tokens=8,
                             prompt_token_ids=prompt) for c in range(choices)]
    return requests


@pytest.fixture(scope="module")
def h100_token_bound():
    return build_deployment(LLAMA, "H100", EngineArgs(max_model_len=8192, max_num_queued_tokens=500))


@pytest.mark.parametrize("lengths, choices, refused", [
    ([250, 249, 4000], 1, False),  # before the last prompt: 499 < 500 tokens queued
    ([250, 250, 10], 1, True),     # before the last: 500, at the bound
    ([300], 4, False),             # one prompt: one check for its 4 choices (then 1200 are queued)
    ([300, 10], 2, True),          # its first prompt's 2 choices queue 600 before the second is checked
])
def test_max_num_queued_tokens_is_checked_before_each_prompt_of_a_prompt_list(h100_token_bound, lengths, choices,
                                                                              refused):
    sim = cluster(h100_token_bound, n=2)
    group = prompt_list("cmpl-list", lengths, choices)
    if not refused:
        sim.submit_group(group)
        assert {instance_of(sim, r) for r in group} == {"i0"}
        sim.run([])
        assert_all_accounted_for(sim, group)
        return
    with pytest.raises(AdmissionRefused) as refusal:
        sim.submit_group(group)
    assert refusal.value.bound == "max_num_queued_tokens" and str(refusal.value) == BACKLOG
    assert not sim.active and not sim.routing_decisions  # every instance refuses it: no decision, nothing left
    assert all(r.engine_index is None and not r.is_finished for r in group)
    assert all(i.outstanding_tokens == 0 and i.num_routed == 0 for i in sim.instances)
    sim.run([])
    assert all(e.is_idle and e.kv.num_free_blocks == e.num_gpu_blocks - 1 for e in sim.engines)


def test_a_prompt_list_one_instance_refuses_midway_goes_whole_to_one_that_takes_it(h100_token_bound):
    sim = cluster(h100_token_bound, n=2)
    a, _ = sim.instances
    sim.submit_group(prompt_list("cmpl-pod", [200]), instance=a)  # on a's own port: 200 prompt tokens queued
    group = prompt_list("cmpl-front", [200, 100, 10])
    sim.submit_group(group)  # round robin's turn is a's, whose checks see 200, 400, then 500: refused at the third
    assert {instance_of(sim, r) for r in group} == {"i1"}  # i1 sees 0, 200, 300
    assert dict(sim.routing_decisions) == {"i1": 1}
    sim.run([])
    assert_all_accounted_for(sim, group)


async def test_a_prompt_list_over_the_token_backlog_is_refused_by_a_later_prompt_with_vllms_503(tmp_path):
    path = front_door.cluster_file(tmp_path, FOUR.replace("max-model-len: 4096", "max-model-len: 4096, "
                                                                                   "max-num-queued-tokens: 6"))
    async with running_server("--cluster", path, "--speed", "1000") as server, aiohttp.ClientSession() as http:
        # the serving layer's check passes (nothing queued); the second prompt's sees the first's 6 tokens
        async with http.post(server.url + "/v1/completions", json={
                "prompt": [[11, 12, 13, 14, 15, 16], [17]], "max_tokens": 4}) as r:
            status, body = r.status, await r.json()
        async with http.get(server.url + "/metrics") as r:
            metrics = await r.text()
        engine = server.engine
        leftovers = front_door.leftovers(engine)
        async with http.post(server.url + "/v1/completions", json={
                "prompt": [[11, 12, 13, 14, 15], [17]], "max_tokens": 4}) as r:
            fits = r.status  # 5 < 6 before the second prompt
    assert status == 503 and body["error"]["message"] == BACKLOG and body["error"]["code"] == 503
    assert leftovers == (0, 0, 0, [True] * 4)
    assert _by(_series(metrics, "vllm:admission_rejections_total"), "reason") == {"max_num_queued_reqs": 0.0,
                                                                                  "max_num_queued_tokens": 1.0}
    assert sum(_series(metrics, "vllm:request_success_total").values()) == 0
    assert fits == 200
