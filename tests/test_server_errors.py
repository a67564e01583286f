"""Unhappy paths: vLLM 0.33's status codes and error bodies, byte for byte where vLLM's are known.

Expected bodies marked "(vLLM)" were produced by vLLM 0.33's own request classes and
exception handlers (FastAPI app with vLLM's models and `init_exception_handler`);
the others are the messages in vLLM's source (`sampling_params.py`,
`renderers/params.py`, `serve/engine/serving.py`, `v1/engine/async_llm.py`).
"""
from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
import pytest_asyncio

from server.testing import running_server

MODEL = "meta-llama/Llama-3.1-8B"
ARGS = ("--speed", "1000", "--max-model-len", "64")


def error(message: str, err_type: str = "BadRequestError", param: str | None = None, code: int = 400) -> dict:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


async def post(server, path: str, body, headers=None) -> tuple[int, object]:
    if isinstance(body, str) and headers is None:
        headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:
        kwargs = {"data": body} if isinstance(body, (str, bytes)) else {"json": body}
        async with http.post(server.url + path, headers=headers, **kwargs) as r:
            text = await r.text()
            return r.status, json.loads(text)


CASES = [
    ("bad json (vLLM)", "/v1/completions", "not json", 400, error(
        "1 validation error:\n  {'type': 'json_invalid', 'loc': 'body.0', 'msg': 'JSON decode error', "
        "'input': '<dict of 0 items>', 'ctx': {'error': 'Expecting value'}}", "Bad Request", "body.0")),
    ("wrong type (vLLM)", "/v1/completions", {"prompt": "hi", "max_tokens": "abc"}, 400, error(
        "1 validation error:\n  {'type': 'int_parsing', 'loc': 'body.max_tokens', 'msg': 'Input should be a valid "
        "integer, unable to parse string as an integer', 'input': 'abc'}", "Bad Request", "body.max_tokens")),
    ("fractional int (vLLM)", "/v1/completions", {"prompt": "hi", "max_tokens": 1.5}, 400, error(
        "1 validation error:\n  {'type': 'int_from_float', 'loc': 'body.max_tokens', 'msg': 'Input should be a valid "
        "integer, got a number with a fractional part', 'input': '1.5'}", "Bad Request", "body.max_tokens")),
    ("bad bool (vLLM)", "/v1/completions", {"prompt": "hi", "stream": "maybe"}, 400, error(
        "1 validation error:\n  {'type': 'bool_parsing', 'loc': 'body.stream', 'msg': 'Input should be a valid "
        "boolean, unable to interpret input', 'input': 'maybe'}", "Bad Request", "body.stream")),
    ("prompt of wrong type (vLLM)", "/v1/completions", {"prompt": 5}, 400, error(
        "4 validation errors:\n  {'type': 'list_type', 'loc': 'body.prompt', 'msg': 'Input should be a valid list', "
        "'input': '5'}\n  {'type': 'list_type', 'loc': 'body.prompt', 'msg': 'Input should be a valid list', "
        "'input': '5'}\n  {'type': 'string_type', 'loc': 'body.prompt', 'msg': 'Input should be a valid string', "
        "'input': '5'}\n  {'type': 'list_type', 'loc': 'body.prompt', 'msg': 'Input should be a valid list', "
        "'input': '5'}", "Bad Request", "body.prompt")),
    ("missing prompt (vLLM)", "/v1/completions", {}, 400, error(
        "Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)", param="prompt")),
    ("body not an object (vLLM)", "/v1/completions", [1, 2], 400, error(
        "1 validation error:\n  {'type': 'model_attributes_type', 'loc': 'body', 'msg': 'Input should be a valid "
        "dictionary or object to extract fields from', 'input': '<list of 2 items>'}", "Bad Request", "body")),
    ("stream_options without stream (vLLM)", "/v1/completions",
     {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, error(
         "Stream options can only be defined when `stream=True`. (parameter=stream_options)",
         param="stream_options")),
    ("too many stop strings (vLLM)", "/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400,
     error("2 validation errors:\n  {'type': 'string_type', 'loc': 'body.stop', 'msg': 'Input should be a valid "
           "string', 'input': '<list of 5 items>'}\n  {'type': 'too_long', 'loc': 'body.stop', 'msg': 'List should "
           "have at most 4 items after validation, not 5', 'input': '<list of 5 items>', 'ctx': {'field_type': "
           "'List', 'max_length': 4, 'actual_length': 5}}", "Bad Request", "body.stop")),
    ("negative logprobs (vLLM)", "/v1/completions", {"prompt": "hi", "logprobs": -3}, 400, error(
        "`logprobs` must be a positive value or -1. (parameter=logprobs, value=-3)", param="logprobs")),
    ("chat messages missing (vLLM)", "/v1/chat/completions", {}, 400, error(
        "1 validation error:\n  {'type': 'missing', 'loc': 'body.messages', 'msg': 'Field required', "
        "'input': '<dict of 0 items>'}", "Bad Request", "body.messages")),
    ("chat messages not a list (vLLM)", "/v1/chat/completions", {"messages": "hi"}, 400, error(
        "1 validation error:\n  {'type': 'list_type', 'loc': 'body.messages', 'msg': 'Input should be a valid list', "
        "'input': 'hi'}", "Bad Request", "body.messages")),
    ("chat stream_options without stream (vLLM)", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}}, 400, error(
         "Stream options can only be defined when `stream=True`. (parameter=stream_options)",
         param="stream_options")),
    ("top_logprobs without logprobs (vLLM)", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 5}, 400, error(
         "when using `top_logprobs`, `logprobs` must be set to true. (parameter=top_logprobs)",
         param="top_logprobs")),
    ("max_completion_tokens wrong type (vLLM)", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": "x"}, 400, error(
         "1 validation error:\n  {'type': 'int_parsing', 'loc': 'body.max_completion_tokens', 'msg': 'Input should be "
         "a valid integer, unable to parse string as an integer', 'input': 'x'}", "Bad Request",
         "body.max_completion_tokens")),
    ("unknown model", "/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, error(
        f"The model `gpt-4` does not exist. Valid aliases: {MODEL}.", "NotFoundError", "model", 404)),
    ("unknown model on tokenize", "/tokenize", {"model": "x", "prompt": "hi"}, 404, error(
        f"The model `x` does not exist. Valid aliases: {MODEL}.", "NotFoundError", "model", 404)),
    ("prompt longer than max_model_len", "/v1/completions", {"prompt": list(range(1, 71))}, 400, error(
        "This model's maximum context length is 64 tokens. However, your prompt contains 70 input tokens, which "
        "exceeds this limit even without any output tokens. Please reduce the length of the input prompt. "
        "(parameter=input_tokens, value=70)", param="input_tokens")),
    ("prompt text far longer than max_model_len", "/v1/completions", {"prompt": "x" * 9000}, 400, error(
        "This model's maximum context length is 64 tokens. However, your prompt contains 9000 characters (more than "
        "8192 characters, which is the upper bound for 64 input tokens). Please reduce the length of the input "
        "prompt. (parameter=input_text, value=9000)", param="input_text")),
    ("prompt text longer than max_model_len", "/v1/completions", {"prompt": "hello " * 100}, 400, error(
        # vLLM's tokenizer stops one token past the context: "at least" max_model_len + 1
        "This model's maximum context length is 64 tokens. However, your prompt contains at least 65 input tokens, "
        "which exceeds this limit even without any output tokens. Please reduce the length of the input prompt. "
        "(parameter=input_tokens, value=65)", param="input_tokens")),
    ("prompt of exactly max_model_len", "/v1/completions", {"prompt": list(range(1, 65))}, 400, error(
        "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)", param="max_tokens")),
    ("max_tokens above max_model_len", "/v1/completions", {"prompt": "hi", "max_tokens": 100}, 400, error(
        "max_tokens=100 cannot be greater than max_model_len=64. Please request fewer output tokens. "
        "(parameter=max_tokens, value=100)", param="max_tokens")),
    ("chat max_completion_tokens above max_model_len", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 65}, 400, error(
         "max_completion_tokens=65 cannot be greater than max_model_len=64. Please request fewer output tokens. "
         "(parameter=max_completion_tokens, value=65)", param="max_completion_tokens")),
    ("n = 0", "/v1/completions", {"prompt": "hi", "n": 0}, 400, error("n must be at least 1, got 0.")),
    ("negative temperature", "/v1/completions", {"prompt": "hi", "temperature": -1}, 400, error(
        "temperature must be non-negative, got -1.0. (parameter=temperature, value=-1.0)", param="temperature")),
    ("top_p of 0", "/v1/completions", {"prompt": "hi", "top_p": 0}, 400, error(
        "top_p must be in (0, 1], got 0.0. (parameter=top_p, value=0.0)", param="top_p")),
    ("min_tokens above max_tokens", "/v1/completions", {"prompt": "hi", "max_tokens": 4, "min_tokens": 5}, 400,
     error("min_tokens must be less than or equal to max_tokens=4, got 5.")),
    ("empty stop string", "/v1/completions", {"prompt": "hi", "stop": [""]}, 400,
     error("stop cannot contain an empty string.")),
    ("too many logprobs", "/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, error(
        "Requested sample logprobs of 21, which is greater than max allowed: 20 (parameter=logprobs, value=21)",
        param="logprobs")),
    ("token id outside the vocabulary", "/v1/completions", {"prompt": [1, 999999]}, 400,
     error("Token id 999999 is out of vocabulary")),
    ("beam search with stream", "/v1/completions", {"prompt": "hi", "use_beam_search": True, "stream": True}, 400,
     error("Streaming is not currently supported with beam search")),
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server():
    async with running_server(*ARGS) as running:
        yield running


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("name,path,body,status,expected", CASES, ids=[c[0] for c in CASES])
async def test_bad_request_gets_vllms_status_and_body(server, name, path, body, status, expected):
    assert await post(server, path, body) == (status, expected)
    # nothing was left behind in the engine
    assert server.engine.num_unfinished == 0
    assert all(e.num_running == 0 and e.num_waiting == 0 for e in server.engine.sim.engines)


@pytest.mark.asyncio(loop_scope="module")
async def test_content_type_must_be_json(server):
    assert await post(server, "/v1/completions", json.dumps({"prompt": "hi"}),
                      headers={"Content-Type": "text/plain"}) == (400, error(
        "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed", "Bad Request"))


@pytest.mark.asyncio(loop_scope="module")
async def test_unknown_route_and_wrong_method_get_fastapis_bodies(server):
    async with aiohttp.ClientSession() as http:
        async with http.get(server.url + "/nope") as r:
            assert (r.status, await r.json()) == (404, {"detail": "Not Found"})
        async with http.get(server.url + "/v1/completions") as r:
            assert (r.status, await r.json()) == (405, {"detail": "Method Not Allowed"})


@pytest.mark.asyncio(loop_scope="module")
async def test_chat_content_part_that_is_not_text_is_refused(server):
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    status, answer = await post(server, "/v1/chat/completions", body)
    assert status == 400 and answer["error"]["type"] == "BadRequestError" and "image_url" in answer["error"]["message"]


async def test_api_key_guards_v1_routes_only():
    async with running_server(*ARGS, "--api-key", "secret") as server, aiohttp.ClientSession() as http:
        async with http.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}) as r:
            assert (r.status, await r.json()) == (401, {"error": "Unauthorized"})
        async with http.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1},
                             headers={"Authorization": "Bearer secret"}) as r:
            assert r.status == 200
        async with http.get(server.url + "/health") as r:
            assert r.status == 200
        async with http.get(server.url + "/v1/models", headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 401


async def test_queue_limit_answers_503_and_counts_the_rejection():
    async with running_server("--speed", "1", "--max-num-queued-reqs", "2") as server, \
            aiohttp.ClientSession() as http:
        payload = {"prompt": "hi", "max_tokens": 3000, "ignore_eos": True}  # ~20 s: held while the test asks
        held = [asyncio.ensure_future(http.post(server.url + "/v1/completions", json=payload)) for _ in range(2)]
        while server.engine.num_unfinished < 2:
            await asyncio.sleep(0.01)
        rejected = await post(server, "/v1/completions", payload)
        # as vLLM, admission is checked before the prompt (vLLM's _preflight): a full queue answers 503 even for
        # a prompt that would be refused; a body that fails the schema still gets its 400
        too_long = await post(server, "/v1/completions", {"prompt": list(range(1, 200_000)), "max_tokens": 1})
        schema = await post(server, "/v1/completions", {"prompt": 5})
        async with http.get(server.url + "/metrics") as r:
            metrics = await r.text()
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)
    busy = (503, error("The engine is currently busy and cannot accept new requests. Please try again later or "
                       "on a different instance.", "Service Unavailable", None, 503))
    assert rejected == busy and too_long == busy
    assert schema[0] == 400
    assert (f'vllm:admission_rejections_total{{model_name="{MODEL}",reason="max_num_queued_reqs"}} 2.0'
            in metrics)


async def test_prefill_token_backlog_limit_answers_503():
    async with running_server("--speed", "0.01", "--max-num-queued-tokens", "10") as server, \
            aiohttp.ClientSession() as http:
        payload = {"prompt": "a fairly long prompt with many more tokens than the backlog allows", "max_tokens": 5}
        held = asyncio.ensure_future(http.post(server.url + "/v1/completions", json=payload))
        while server.engine.num_unfinished < 1:
            await asyncio.sleep(0.01)
        rejected = await post(server, "/v1/completions", payload)
        held.cancel()
        await asyncio.gather(held, return_exceptions=True)
    assert rejected == (503, error(
        "The engine has reached its prefill token backlog limit. Please try again later or on a different instance.",
        "Service Unavailable", None, 503))


async def test_data_parallel_rank_out_of_range():
    async with running_server(*ARGS, "--data-parallel-size", "2") as server:
        assert await post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 1},
                          headers={"X-data-parallel-rank": "2"}) == (400, error(
            "data_parallel_rank 2 is out of range [0, 2)."))
