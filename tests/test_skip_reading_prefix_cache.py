"""vLLM's skip_reading_prefix_cache: a request that asks for prompt logprobs (SamplingParams sets the flag then,
v1/request.py get_skip_reading_prefix_cache) computes its whole prompt. The KV cache manager looks nothing up
for it and does not count it in the prefix-cache stats (kv_cache_manager.py prefix_cache_lookup_enabled); the
scheduler takes no external tokens for it (scheduler.py, after get_num_new_matched_tokens), so an offload tier
loads it nothing and a P/D decode side recomputes its prompt, its prefill's blocks freed by an empty read.
Virtual time and HTTP answers only."""
from __future__ import annotations

import aiohttp
import numpy as np
import pytest

from emulator.cluster import ClusterSpec, build_cluster
from emulator.config import EngineArgs
from emulator.instance import InstanceSpec
from emulator.request import Request
from profiles.deployment import build_deployment
from server.testing import running_server
from tests.test_disaggregation import assert_nothing_held_or_lost, pd_cluster

MODEL = "meta-llama/Llama-3.1-8B"
PROMPT = np.random.default_rng(7).integers(0, 30000, 5000)


@pytest.fixture(scope="module")
def h100():
    return build_deployment(MODEL, "H100", EngineArgs(max_model_len=16384))


def ttft(request: Request) -> float:
    return request.first_token_time - request.arrival_time


def test_a_request_that_skips_reading_computes_its_whole_prompt_and_is_not_counted(h100):
    sim = build_cluster(ClusterSpec((InstanceSpec("i", h100, ("llama",)),)))
    first = Request("first", 5000, 5, arrival_time=0.0, prompt_token_ids=PROMPT)
    skipping = Request("skipping", 5000, 5, arrival_time=10.0, prompt_token_ids=PROMPT, skip_reading_prefix_cache=True)
    reading = Request("reading", 5000, 5, arrival_time=20.0, prompt_token_ids=PROMPT)
    sim.run([first, skipping, reading])
    assert first.num_cached_tokens == skipping.num_cached_tokens == 0
    assert reading.num_cached_tokens == 4992  # what `skipping` left cached is there for the next one
    assert ttft(skipping) == pytest.approx(ttft(first), rel=1e-9)  # the same cold prefill
    assert ttft(reading) < 0.5 * ttft(first)
    kv = sim.engines[0].kv
    assert (kv.prefix_requests, kv.prefix_queries, kv.prefix_hits) == (2, 10000, 4992)  # `skipping`: not counted
    assert_nothing_held_or_lost(sim, [first, skipping, reading])


def test_an_offload_tier_loads_nothing_for_a_request_that_skips_reading():
    deployment = build_deployment(MODEL, "H100", EngineArgs(max_model_len=8192, num_gpu_blocks_override=600,
                                                            kv_offloading_size=16.0))
    sim = build_cluster(ClusterSpec((InstanceSpec("i", deployment, ("llama",)),)))
    rng = np.random.default_rng(1)

    def others(start: float) -> list[Request]:  # two other prompts push the first out of the GPU's 600 blocks
        return [Request(f"other{start + 5 * i:g}", 5000, 5, arrival_time=start + 5 * i,
                        prompt_token_ids=rng.integers(0, 30000, 5000)) for i in range(2)]
    skipping = Request("skipping", 5000, 5, arrival_time=20.0, prompt_token_ids=PROMPT, skip_reading_prefix_cache=True)
    reading = Request("reading", 5000, 5, arrival_time=40.0, prompt_token_ids=PROMPT)
    requests = [Request("first", 5000, 5, arrival_time=0.0, prompt_token_ids=PROMPT), *others(5.0), skipping,
                *others(25.0), reading]
    kv = sim.engines[0].kv
    lookups: dict[str, int] = {}  # the connector's lookups so far, as each request ends (one at a time)
    sim.add_finish_listener(lambda r: lookups.setdefault(r.request_id, kv.offload.lookups))
    sim.run(requests)
    assert skipping.num_cached_tokens == skipping.num_external_tokens == 0
    assert reading.num_cached_tokens == 0 and reading.num_external_tokens == 4992  # the tier had it all along
    assert ttft(reading) < 0.5 * ttft(skipping)
    assert lookups["skipping"] == lookups["other10"]  # the connector returned before its lookup
    assert lookups["reading"] == lookups["other30"] + 1
    # the connector's stats count the skipping request's query, all of its prompt, with no hit
    assert kv.external_requests == 7 and kv.external_queries == 35000 and kv.external_hits == 4992
    assert_nothing_held_or_lost(sim, requests)


def test_a_pd_decode_that_skips_reading_recomputes_the_prompt_and_frees_the_prefills_blocks(h100):
    sim = pd_cluster(h100)
    prefill_engine = sim.instances[0].engines[0]
    free_when_decode_admits: list[int] = []
    skipping = Request("skipping", 5000, 5, arrival_time=0.0, prompt_token_ids=PROMPT, skip_reading_prefix_cache=True)

    def on_step(record):  # the decode's first step: the prefill's blocks are free by then (an empty read)
        if skipping in record.scheduled and not free_when_decode_admits and record.engine != prefill_engine.index:
            free_when_decode_admits.append(prefill_engine.kv.num_free_blocks)
    sim.add_listener(on_step)
    loading = Request("loading", 5000, 5, arrival_time=20.0, prompt_token_ids=PROMPT[::-1].copy())
    sim.run([skipping, loading])
    assert skipping.num_external_tokens == 0 and loading.num_external_tokens == 5000
    assert sim.transfers.num_transfers == 1  # only `loading` moved its KV
    assert free_when_decode_admits == [prefill_engine.num_gpu_blocks - 1]
    assert ttft(skipping) > ttft(loading)  # its decode side computed the prompt again
    assert_nothing_held_or_lost(sim, [skipping, loading])


@pytest.mark.parametrize("ask", [{"prompt_logprobs": 0}, {"echo": True, "logprobs": 1}])
async def test_a_completion_asking_for_prompt_logprobs_reports_no_cached_tokens(ask):
    async with running_server("--speed", "1000", "--enable-prompt-tokens-details") as server:
        async with aiohttp.ClientSession() as http:
            prompt = "the same long prompt " * 40
            cached = []
            for extra in ({}, ask, {}):
                payload = {"prompt": prompt, "max_tokens": 2, **extra}
                async with http.post(server.url + "/v1/completions", json=payload) as r:
                    body = await r.json()
                    assert r.status == 200, body
                    cached.append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert cached[0] == cached[1] == 0 and cached[2] > 0


async def test_a_chat_with_echo_skips_reading_and_generate_follows_its_sampling_params():
    async with running_server("--speed", "1000", "--enable-prompt-tokens-details", "--enable-scale-out") as server:
        async with aiohttp.ClientSession() as http:
            messages = [{"role": "user", "content": "the same long question " * 40}]
            cached = []
            for extra in ({}, {"echo": True}, {}):  # echo asks for prompt logprobs: top_logprobs is 0 by default
                payload = {"messages": messages, "max_tokens": 2, **extra}
                async with http.post(server.url + "/v1/chat/completions", json=payload) as r:
                    body = await r.json()
                    assert r.status == 200, body
                    cached.append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
            generated = []
            for params in ({"max_tokens": 2, "skip_reading_prefix_cache": True}, {"max_tokens": 2}):
                payload = {"token_ids": list(range(1000, 1400)), "sampling_params": params}
                async with http.post(server.url + "/inference/v1/generate", json=payload) as r:
                    body = await r.json()
                    assert r.status == 200, body
                    generated.append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert cached[0] == cached[1] == 0 and cached[2] > 0
    assert generated[0] == 0 and generated[1] > 0


def test_in_a_cluster_the_prefill_side_skips_reading_too(h100):
    # the P/D proxy sends the request's body on to the prefill pod: its prompt logprobs, hence the flag, go too
    sim = pd_cluster(h100)
    first = Request("first", 5000, 5, arrival_time=0.0, prompt_token_ids=PROMPT)
    skipping = Request("skipping", 5000, 5, arrival_time=10.0, prompt_token_ids=PROMPT, skip_reading_prefix_cache=True)
    sim.run([first, skipping])
    kv = sim.instances[0].engines[0].kv
    assert (kv.prefix_requests, kv.prefix_queries, kv.prefix_hits) == (1, 5000, 0)  # `first`'s lookup alone
    assert not skipping.remote_prefill_cached_tokens and skipping.num_cached_tokens == 0
    assert_nothing_held_or_lost(sim, [first, skipping])


def test_the_prefill_is_told_of_the_empty_read_only_once_the_decode_side_admits_the_request():
    # vLLM's NIXL queues the read of no blocks in update_state_after_alloc, after the blocks are allocated: a decode
    # side whose one sequence slot is busy keeps the request waiting, and the prefill keeps its blocks meanwhile
    prefill = build_deployment(MODEL, "H100", EngineArgs(max_model_len=16384))
    decode = build_deployment(MODEL, "H100", EngineArgs(max_model_len=16384, max_num_seqs=1))
    sim = build_cluster(ClusterSpec((InstanceSpec("p0", prefill, ("llama",), "prefill", "n0"),
                                     InstanceSpec("d0", decode, ("llama",), "decode", "n0"))))
    busy = Request("busy", 100, 3000, arrival_time=0.0)
    skipping = Request("skipping", 5000, 5, arrival_time=0.5, prompt_token_ids=PROMPT, skip_reading_prefix_cache=True)
    prefill_engine, decode_engine = sim.instances[0].engines[0], sim.instances[1].engines[0]
    held_while_waiting: list[int] = []  # the prefill's blocks in use, at each decode step while `skipping` waits

    def on_step(record):
        if record.engine == decode_engine.index == skipping.engine_index and skipping.scheduled_time is None:
            held_while_waiting.append(prefill_engine.num_gpu_blocks - 1 - prefill_engine.kv.num_free_blocks)
    sim.add_listener(on_step)
    sim.run([busy, skipping])
    assert skipping.scheduled_time > busy.finish_time - 0.1  # it waited for `busy` to end
    assert held_while_waiting and min(held_while_waiting) == 313  # its whole prompt, held until then
    assert skipping.num_external_tokens == 0
    assert_nothing_held_or_lost(sim, [busy, skipping])
