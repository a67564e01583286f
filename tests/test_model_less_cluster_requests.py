"""A request naming no model on a cluster whose entry is any_non_decode (LLMServingSim's router): it may go to
a non-decode instance of any model, so it goes only to those whose context holds its prompt and an output
token; one that fits none is refused with vLLM's 400, in the core and behind the server's front door, never
placed where it would never finish. Behind the server it is admitted over every such instance, checked
against the longest context among them, and answered under the model of the instance that served it."""
from __future__ import annotations

import functools
import json

import aiohttp
import pytest

from emulator.cluster import ClusterSpec, build_cluster
from emulator.config import EngineArgs
from emulator.instance import InstanceSpec
from emulator.request import Request, RequestStatus
from emulator.simulation import ContextTooLong
from profiles.deployment import build_deployment
from server.testing import running_server

LLAMA = "meta-llama/Llama-3.1-8B"


@functools.lru_cache(maxsize=None)
def _deployment(model: str, engine_args: EngineArgs):
    return build_deployment(model, "H100", engine_args)


def deployment(max_model_len: int, model: str = LLAMA, **engine):
    return _deployment(model, EngineArgs(max_model_len=max_model_len, **engine))


def two_contexts(short_args: dict | None = None, routing: str = "round_robin") -> ClusterSpec:
    """Two Llama instances (one tokenizer) whose contexts differ: `short` (1024 tokens, listed first: the
    first model) and `long` (32768)."""
    return ClusterSpec((InstanceSpec("short", deployment(1024, **(short_args or {})), ("llama-short",)),
                        InstanceSpec("long", deployment(32768), ("llama-long",))),
                       routing=routing, entry="any_non_decode")


def placed_on(sim, request: Request) -> str:
    return sim.instance_of[request.engine_index].name


# -- the core ----------------------------------------------------------------------------------------
def test_a_prompt_too_long_for_one_model_goes_to_the_instance_whose_context_holds_it():
    """Before, round robin sent the second and the fourth to `short`: the 20000-token prompt, prefilled in
    chunks, stopped at max_model_len - 1 and never finished (the run ended in the engine loop's "can never be
    scheduled"); the 5000-token one, prefilled at once, was answered with one token ("length")."""
    sim = build_cluster(two_contexts())
    batch = [Request(f"r{i}", {1: 20000, 3: 5000}.get(i, 200), 8, arrival_time=i * 1e-3) for i in range(6)]
    sim.run(batch)
    assert [placed_on(sim, r) for r in batch] == ["short", "long", "long", "long", "short", "long"]
    assert all(r.status == RequestStatus.FINISHED_LENGTH_CAPPED and r.num_output_tokens == 8 for r in batch)
    assert not sim.active


def test_a_prompt_no_context_holds_is_refused_with_vllms_message_and_leaves_nothing():
    sim = build_cluster(two_contexts())
    with pytest.raises(ContextTooLong, match=r"^The decoder prompt \(length 40000\) is longer than the maximum model "
                                             r"length of 32768\. Make sure that `max_model_len` is no smaller than "
                                             r"the number of text tokens\.$"):
        sim.submit(Request("r", 40000, 4, arrival_time=0.0))
    with pytest.raises(ContextTooLong, match=r"^The decoder prompt \(length 32768\) plus the number of requested "
                                             r"output tokens \(at least 1\) is longer than the maximum model length "
                                             r"of 32768\."):
        sim.submit(Request("r", 32768, 4, arrival_time=0.0))
    assert not sim.active and not sim.routing_decisions
    sim.submit(Request("r", 32767, 4, arrival_time=0.0))  # room for one output token
    assert placed_on(sim, sim.active["r"]) == "long"


def test_the_requests_of_one_client_request_go_where_the_longest_prompt_fits():
    sim = build_cluster(two_contexts())
    group = [Request("p0", 100, 4, arrival_time=0.0), Request("p1", 3000, 4, arrival_time=0.0)]
    sim.submit_group(group)
    assert [placed_on(sim, r) for r in group] == ["long", "long"]


def test_an_instance_own_port_or_a_named_model_too_short_for_the_prompt_refuses_it():
    sim = build_cluster(two_contexts())
    with pytest.raises(ContextTooLong, match="maximum model length of 1024"):
        sim.submit(Request("direct", 2000, 4, arrival_time=0.0), instance=sim.instance("short"))
    with pytest.raises(ContextTooLong, match="maximum model length of 1024"):
        sim.submit(Request("named", 2000, 4, arrival_time=0.0, model="llama-short"))
    assert not sim.active


def test_offline_an_arrival_no_context_holds_fails_with_the_message_and_the_run_goes_on():
    sim = build_cluster(two_contexts())
    batch = [Request("big", 40000, 4, arrival_time=0.0), Request("ok", 500, 4, arrival_time=1e-3)]
    sim.run(batch)
    assert batch[0].status == RequestStatus.FINISHED_ERROR and batch[0].engine_index is None
    assert batch[0].error.startswith("The decoder prompt (length 40000) is longer than the maximum model length "
                                     "of 32768")
    assert batch[1].num_output_tokens == 4


def test_a_fault_reroutes_a_request_only_where_it_fits():
    sim = build_cluster(ClusterSpec(
        tuple(InstanceSpec(name, deployment(mml), ("llama",))
              for name, mml in (("a", 32768), ("b", 1024), ("c", 32768))),
        routing="round_robin", entry="any_non_decode"))
    first = Request("r", 3000, 4, arrival_time=0.0)
    sim.submit(first)
    assert placed_on(sim, first) == "a"
    sim.fail_instance("a", reroute=True)
    assert placed_on(sim, first) == "c"  # not b: its context is too short
    sim.fail_instance("c", reroute=True)
    assert first.status == RequestStatus.FINISHED_ERROR  # nowhere left that holds it: it fails, no hang


# -- behind the server ---------------------------------------------------------------------------------
async def _complete(http, url: str, prompt, model: str | None = None, **extra):
    payload = {"prompt": prompt, "max_tokens": 4, "ignore_eos": True, **extra}
    if model is not None:
        payload["model"] = model
    async with http.post(url + "/v1/completions", json=payload) as r:
        return r.status, await r.json()


async def test_the_front_door_routes_a_model_less_request_where_it_fits_and_names_that_model():
    async with running_server("--speed", "200", deployment=two_contexts()) as server:
        sim = server.engine.sim
        async with aiohttp.ClientSession() as http:
            answers = [await _complete(http, server.url, list(range(100, 100 + n))) for n in (64, 64, 2000, 64)]
            assert [status for status, _ in answers] == [200] * 4
            # round robin over both models' instances; the 2000-token prompt only fits `long`
            assert [body["model"] for _, body in answers] == ["llama-short", "llama-long", "llama-long", "llama-short"]
            assert dict(sim.routing_decisions) == {"short": 2, "long": 2}
            status, body = await _complete(http, server.url, list(range(100, 100 + 2000)), max_tokens=3000)
            assert status == 200 and body["usage"]["completion_tokens"] == 3000  # past the first model's context
            # a prompt no instance holds: vLLM's renderer 400 against the longest context
            status, body = await _complete(http, server.url, list(range(100, 100 + 40000)))
            assert status == 400
            assert body["error"]["message"].startswith("This model's maximum context length is 32768 tokens. However, "
                                                       "your prompt contains 40000 input tokens")
            # naming a model still means that model's context
            status, body = await _complete(http, server.url, list(range(100, 100 + 2000)), "llama-short")
            assert status == 400 and "maximum context length is 1024 tokens" in body["error"]["message"]
            # its own instance down: the model-less long prompt has nowhere to go that holds it (the core's 400)
            sim.fail_instance("long")
            status, body = await _complete(http, server.url, list(range(100, 100 + 2000)))
            assert status == 400 and "maximum context length is 1024 tokens" in body["error"]["message"]


async def test_a_model_less_request_is_admitted_while_any_models_instance_takes_it():
    """`short` (the first model) is at its queue bound: the request still goes in, to `long`; only when every
    instance it could go to refuses is it vLLM's 503."""
    spec = two_contexts({"max_num_queued_reqs": 1}, routing="least_loaded")
    async with running_server("--speed", "0.25", deployment=spec) as server:  # the held stream lasts ~25 s
        sim = server.engine.sim
        async with aiohttp.ClientSession() as http:
            hold = http.post(server.url + "/v1/completions",
                             json={"model": "llama-short", "prompt": list(range(100, 164)), "max_tokens": 900,
                                   "ignore_eos": True, "stream": True})
            held = await hold.__aenter__()  # on `short` (its stream opened) until its 900 tokens are out
            try:
                assert sim.routing_decisions["short"] == 1
                status, _ = await _complete(http, server.url, list(range(100, 164)), "llama-short")
                assert status == 503  # naming the first model: its one instance is at the bound
                status, body = await _complete(http, server.url, list(range(100, 164)))
                assert status == 200 and body["model"] == "llama-long"
            finally:
                held.close()
                await hold.__aexit__(None, None, None)


async def test_a_model_less_request_stays_the_first_models_where_the_models_tokenize_differently():
    spec = ClusterSpec((InstanceSpec("llama", deployment(1024), ("llama",)),
                        InstanceSpec("qwen", deployment(32768, "Qwen/Qwen3-30B-A3B"), ("qwen",))),
                       routing="round_robin", entry="any_non_decode")
    async with running_server("--speed", "200", deployment=spec) as server:
        async with aiohttp.ClientSession() as http:
            answers = [await _complete(http, server.url, list(range(100, 164))) for _ in range(3)]
            assert [(status, body["model"]) for status, body in answers] == [(200, "llama")] * 3
            assert dict(server.engine.sim.routing_decisions) == {"llama": 3}
            status, body = await _complete(http, server.url, list(range(100, 100 + 2000)))
            assert status == 400 and "maximum context length is 1024 tokens" in body["error"]["message"]


async def _stream(http, url: str, route: str, payload: dict) -> list[dict]:
    """The JSON chunks of one stream (its [DONE] left out)."""
    async with http.post(url + route, json={**payload, "stream": True, "stream_options": {"include_usage": True},
                                            "max_tokens": 4, "ignore_eos": True}) as r:
        assert r.status == 200
        lines = [line for line in (await r.text()).splitlines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


async def test_a_model_less_stream_names_the_model_of_the_instance_that_served_it():
    """Every chunk, the usage chunk too, names the model the request took where it went (not the first model,
    as before: the chunk header was built before the core placed it)."""
    async with running_server("--speed", "200", deployment=two_contexts()) as server:
        async with aiohttp.ClientSession() as http:
            streams = []
            for route, payload in [("/v1/completions", {"prompt": list(range(100, 164))}),
                                   ("/v1/completions", {"prompt": list(range(100, 164))}),
                                   ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
                                   ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
                                   ("/v1/completions", {"prompt": list(range(100, 100 + 2000))})]:
                chunks = await _stream(http, server.url, route, payload)
                assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
                streams.append({chunk["model"] for chunk in chunks})
            # round robin over both models' instances; the 2000-token prompt only fits `long`
            assert streams == [{"llama-short"}, {"llama-long"}, {"llama-short"}, {"llama-long"}, {"llama-long"}]
            assert dict(server.engine.sim.routing_decisions) == {"short": 2, "long": 3}


async def _respond(http, url: str, stream: bool) -> set[str]:
    """The models a Responses answer names: its body's, or every one its stream's events carry."""
    payload = {"input": "Hi", "max_output_tokens": 4, "ignore_eos": True, "stream": stream}
    async with http.post(url + "/v1/responses", json=payload) as r:
        assert r.status == 200
        if not stream:
            return {(await r.json())["model"]}
        events = [json.loads(line[len("data: "):]) for line in (await r.text()).splitlines()
                  if line.startswith("data: ")]
    assert events[0]["type"] == "response.created" and events[-1]["type"] == "response.incomplete"
    return {event["response"]["model"] for event in events if "response" in event}


async def test_a_model_less_responses_request_names_the_model_of_the_instance_that_served_it():
    """As chat and completions: streamed or not, not the first model (its response.created was built before
    the core placed the request)."""
    async with running_server("--speed", "200", deployment=two_contexts()) as server:
        async with aiohttp.ClientSession() as http:
            models = [await _respond(http, server.url, stream) for stream in (False, False, True, True)]
        assert models == [{"llama-short"}, {"llama-long"}, {"llama-short"}, {"llama-long"}]
        assert dict(server.engine.sim.routing_decisions) == {"short": 2, "long": 2}
