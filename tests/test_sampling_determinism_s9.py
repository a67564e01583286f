"""What a request says is as reproducible as vLLM's sampler makes it (generation.py OutputPlanner.rng_for):
greedy sampling (temperature 0) says the same for the same prompt and parameters, whatever its seed and for each
of its n choices; a seed fixes the random stream, which still depends on the prompt (another prompt, another
text), and vLLM's child c of n > 1 samples with seed + c; an unseeded random request stays random. Virtual time."""
from __future__ import annotations

import numpy as np
import pytest

from emulator.cluster import ClusterSpec, build_cluster
from emulator.config import EngineArgs
from emulator.instance import InstanceSpec
from profiles.deployment import build_deployment
from server.engine_client import EngineClient
from server.generation import OutputPlanner, Sampling, StopRules
from server.jobs import Job
from server.protocol import ChatCompletionRequest, CompletionRequest

POOL = [(10 + i, f" w{i}") for i in range(40)] + [(90, "."), (91, ",")]
EOS = 2
PROMPT_A, PROMPT_B = list(range(100, 140)), list(range(200, 240))


def _planner() -> OutputPlanner:
    return OutputPlanner(POOL, EOS, seed=0)


def _said(planner: OutputPlanner, rng: np.random.Generator, max_tokens: int = 400):
    plan = planner.plan(max_tokens, StopRules(), rng, reply=True)
    return plan.token_ids.tolist(), plan.pieces


GREEDY = Sampling(temperature=0.0)


def test_greedy_sampling_follows_the_prompt_and_parameters_only():
    planner = _planner()
    first = _said(planner, planner.rng_for(None, 0, PROMPT_A, GREEDY))
    assert _said(planner, planner.rng_for(None, 0, PROMPT_A, GREEDY)) == first
    # vLLM's greedy sampler uses no generator: a seed and the choice index change nothing
    assert _said(planner, planner.rng_for(42, 3, PROMPT_A, GREEDY)) == first
    assert _said(planner, planner.rng_for(None, 0, PROMPT_B, GREEDY)) != first
    # top-p/top-k/min-p play no part in greedy sampling; a penalty or a logit bias does
    assert _said(planner, planner.rng_for(None, 0, PROMPT_A, Sampling(0.0, top_p=0.5, top_k=5))) == first
    assert _said(planner, planner.rng_for(None, 0, PROMPT_A, Sampling(0.0, presence_penalty=1.0))) != first
    assert _said(planner, planner.rng_for(None, 0, PROMPT_A, Sampling(0.0, logit_bias=((11, 5.0),)))) != first
    assert _said(planner, planner.rng_for(None, 0, PROMPT_A, GREEDY, model="other")) != first


def test_a_seed_fixes_the_stream_of_each_prompt_not_the_text():
    planner = _planner()
    a = _said(planner, planner.rng_for(42, 0, PROMPT_A))
    assert _said(planner, planner.rng_for(42, 0, PROMPT_A)) == a
    assert _said(planner, planner.rng_for(42, 0, PROMPT_B)) != a
    assert _said(planner, planner.rng_for(43, 0, PROMPT_A)) != a
    # a sampling parameter that changes the distribution changes what the seeded stream picks
    assert _said(planner, planner.rng_for(42, 0, PROMPT_A, Sampling(temperature=0.7))) != a
    # vLLM's ParentRequest: child c of n > 1 samples with seed + c
    assert _said(planner, planner.rng_for(42, 1, PROMPT_A)) == _said(planner, planner.rng_for(43, 0, PROMPT_A))


def test_unseeded_random_sampling_stays_random():
    planner = _planner()
    outputs = {tuple(_said(planner, planner.rng_for(None, 0, PROMPT_A))[0]) for _ in range(5)}
    assert len(outputs) == 5
    assert planner.rng_for(None, 0, PROMPT_A, Sampling()) is planner.rng_for(None, 0, PROMPT_B)


def test_a_tiny_positive_temperature_is_not_greedy():
    """vLLM raises a temperature in (0, 0.01) to 0.01, which samples; only 0 is greedy (below _SAMPLING_EPS)."""
    assert Sampling.of(ChatCompletionRequest(model="m", messages=[], temperature=0)).greedy
    tiny = Sampling.of(ChatCompletionRequest(model="m", messages=[], temperature=1e-6))
    assert not tiny.greedy and tiny.temperature == 0.01
    unset = Sampling.of(CompletionRequest(model="m", prompt="x"))
    assert unset == Sampling() and not unset.greedy  # vLLM's default temperature, 1.0
    # unset fields of a request read as vLLM's defaults
    assert Sampling.of(CompletionRequest(model="m", prompt="x", temperature=0, top_k=-1, top_p=None)) == GREEDY


def test_the_drawn_lengths_are_the_distributions_whatever_the_seed_derivation():
    """The engine's timing follows the output lengths: seeded and greedy draws keep the trace's distribution."""
    planner = _planner()
    seeded = [planner.plan(2000, StopRules(), planner.rng_for(s, 0, PROMPT_A)).length for s in range(400)]
    greedy = [planner.plan(2000, StopRules(), planner.rng_for(None, 0, list(range(p, p + 30)), GREEDY)).length
              for p in range(400)]
    unseeded = [planner.plan(2000, StopRules(), planner.rng_for(None, 0)).length for _ in range(400)]
    for lengths in (seeded, greedy):
        assert abs(np.median(lengths) - np.median(unseeded)) < 40
        assert 1 <= min(lengths) and max(lengths) <= 1000


def _client() -> EngineClient:
    deployment = build_deployment("meta-llama/Llama-3.1-8B", "H100", EngineArgs(max_model_len=4096))
    sim = build_cluster(ClusterSpec((InstanceSpec("a", deployment, ("m",)),)))
    return EngineClient(sim, {"m": _planner()}, 1.0)


def _start(client: EngineClient, prompt: list[int], n: int, seed: int | None, sampling) -> list[list[int]]:
    job = Job([prompt])
    client.start(job, ["req"], n, [300], StopRules(), seed=seed, priority=0, arrival=0.0, pinned_engine=None,
                 reply=True, model="m", sampling=sampling)
    return [c.plan.token_ids.tolist() for c in job.choices]


async def test_the_engine_client_plans_n_choices_as_vllms_children():
    client = _client()
    greedy = CompletionRequest(model="m", prompt="x", temperature=0, n=3)
    children = _start(client, PROMPT_A, 3, None, greedy)
    assert children[0] == children[1] == children[2]  # greedy children are identical
    assert _start(client, PROMPT_A, 1, 7, greedy) == children[:1]
    seeded = CompletionRequest(model="m", prompt="x", n=2, seed=42)
    pair = _start(client, PROMPT_A, 2, 42, seeded)
    assert pair[0] != pair[1]
    assert _start(client, PROMPT_A, 1, 43, seeded) == pair[1:]  # child 1 samples with seed 43
    assert _start(client, PROMPT_A, 2, 42, seeded) == pair
    assert _start(client, PROMPT_B, 2, 42, seeded) != pair


@pytest.mark.parametrize("sampling", [None, CompletionRequest(model="m", prompt="x")])
async def test_the_engine_client_without_a_seed_samples_at_random(sampling):
    client = _client()
    outputs = {tuple(_start(client, PROMPT_A, 1, None, sampling)[0]) for _ in range(4)}
    assert len(outputs) == 4


# -- through the server ---------------------------------------------------------------------------------------
async def _texts(http, url: str, path: str, body: dict) -> list[str]:
    async with http.post(url + path, json=body) as r:
        assert r.status == 200, await r.text()
        answer = await r.json()
    return [c["text"] if "text" in c else c["message"]["content"] for c in answer["choices"]]


async def test_a_seeded_request_says_what_its_prompt_and_seed_make_it_say():
    from server.testing import running_server
    import aiohttp

    async with running_server("--speed", "1000") as server, aiohttp.ClientSession() as http:
        body = {"prompt": "Tell me a story", "max_tokens": 400, "seed": 42}
        first = await _texts(http, server.url, "/v1/completions", body)
        assert await _texts(http, server.url, "/v1/completions", body) == first
        assert await _texts(http, server.url, "/v1/completions", {**body, "prompt": "Write a poem"}) != first
        pair = await _texts(http, server.url, "/v1/completions", {**body, "n": 2})
        assert pair[0] == first[0] and pair[1] != pair[0]
        assert await _texts(http, server.url, "/v1/completions", {**body, "seed": 43}) == pair[1:]


async def test_greedy_chat_repeats_itself_whatever_its_seed():
    """(vLLM refuses n > 1 with greedy sampling: its children would all say the same.)"""
    from server.testing import running_server
    import aiohttp

    async with running_server("--speed", "1000") as server, aiohttp.ClientSession() as http:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 400, "temperature": 0}
        first = await _texts(http, server.url, "/v1/chat/completions", body)
        assert await _texts(http, server.url, "/v1/chat/completions", body) == first
        assert await _texts(http, server.url, "/v1/chat/completions", {**body, "seed": 9, "top_p": 0.5}) == first
        other = {**body, "messages": [{"role": "user", "content": "bye"}]}
        assert await _texts(http, server.url, "/v1/chat/completions", other) != first


def test_greedy_output_cut_by_a_lower_max_tokens_is_a_prefix():
    """As vLLM's greedy decoding: the same prompt with a lower max_tokens says the first tokens of the longer reply."""
    planner = _planner()
    for p in range(20):
        prompt = list(range(p, p + 30))
        long = planner.plan(2000, StopRules(), planner.rng_for(None, 0, prompt, GREEDY), reply=True)
        cut = planner.plan(12, StopRules(), planner.rng_for(None, 0, prompt, GREEDY), reply=True)
        if long.length > 12:
            assert cut.token_ids.tolist() == long.token_ids[:12].tolist() and cut.pieces == long.pieces[:12]
            assert not cut.ends_with_stop
