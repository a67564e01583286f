"""`--skip-tokenizer-init` (and `--tokens-only`, which implies it): every route answers as vLLM 0.33's does
without a tokenizer.

Token-id completions and generate run and return no text (vLLM's no-op detokenizer: stop strings never
match); anything that must tokenize, decode or render a chat template gets the renderer's 400; chat, batch
chat and the Messages API fail vLLM's `assert tokenizer is not None` (a 500 with an empty message);
completion logprobs need return_tokens_as_token_ids, and structured outputs are refused as vLLM's
SamplingParams refuses them. /v1/models is unchanged.
"""
from __future__ import annotations

import json

import aiohttp
import pytest

from server.testing import running_server

FAST = ("--speed", "1000")
PROMPT = [128000, 9906, 1917, 374, 264]
HELLO = [{"role": "user", "content": "Hello there"}]
NO_TOKENIZER = {"error": {"message": "Tokenizer not available when `skip_tokenizer_init=True`",
                          "type": "BadRequestError", "param": None, "code": 400}}
CHAT_ASSERTION = {"error": {"message": "", "type": "InternalServerError", "param": None, "code": 500}}
UNNAMED = "Unable to get tokenizer because `skip_tokenizer_init=True`"


async def post(http: aiohttp.ClientSession, url: str, path: str, body) -> tuple[int, object]:
    async with http.post(url + path, json=body) as r:
        text = await r.text()
        return r.status, (json.loads(text) if text else None)


async def events(http: aiohttp.ClientSession, url: str, path: str, body: dict) -> list:
    """A stream's 200 and the data of each event ("[DONE]" as the string)."""
    async with http.post(url + path, json=body) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        raw = (await r.read()).decode()
    return [e[len("data: "):] if e == "data: [DONE]" else json.loads(e[len("data: "):])
            for e in raw.split("\n\n") if e]


@pytest.fixture(params=[("--skip-tokenizer-init",), ("--tokens-only",)], ids=["skip-tokenizer-init", "tokens-only"])
def no_tokenizer(request) -> tuple[str, ...]:
    return (*FAST, *request.param)


async def test_token_id_completions_run_and_return_no_text(no_tokenizer):
    async with running_server(*no_tokenizer) as server, aiohttp.ClientSession() as http:
        status, whole = await post(http, server.url, "/v1/completions",
                                   {"prompt": [PROMPT, PROMPT[:3]], "max_tokens": 4, "ignore_eos": True,
                                    "return_token_ids": True})
        stream = await events(http, server.url, "/v1/completions",
                              {"prompt": PROMPT, "max_tokens": 4, "ignore_eos": True, "stream": True})
        text = await post(http, server.url, "/v1/completions", {"prompt": "Hello", "max_tokens": 4})
        texts = await post(http, server.url, "/v1/completions", {"prompt": ["Hello", "there"], "max_tokens": 4})
    assert status == 200
    assert [c["text"] for c in whole["choices"]] == ["", ""]
    assert [len(c["token_ids"]) for c in whole["choices"]] == [4, 4]
    assert [c["prompt_token_ids"] for c in whole["choices"]] == [PROMPT, PROMPT[:3]]
    assert whole["usage"] == {"prompt_tokens": 8, "total_tokens": 16, "completion_tokens": 8,
                              "prompt_tokens_details": None, "completion_tokens_details": None}
    chunks = [e for e in stream if e != "[DONE]"]
    assert stream[-1] == "[DONE]" and len(chunks) == 4 and all(c["choices"][0]["text"] == "" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert text == (400, NO_TOKENIZER) and texts == (400, NO_TOKENIZER)


async def test_stop_strings_never_match_without_a_detokenizer():
    body = {"prompt": PROMPT, "max_tokens": 40, "ignore_eos": True, "seed": 7, "stop": ["e", " "],
            "return_token_ids": True}
    async with running_server(*FAST) as server, aiohttp.ClientSession() as http:
        _, tokenized = await post(http, server.url, "/v1/completions", body)
    async with running_server(*FAST, "--skip-tokenizer-init") as server, aiohttp.ClientSession() as http:
        _, untokenized = await post(http, server.url, "/v1/completions", body)
    assert tokenized["choices"][0]["finish_reason"] == "stop" and tokenized["choices"][0]["stop_reason"] in ("e", " ")
    choice = untokenized["choices"][0]
    assert (choice["finish_reason"], choice["stop_reason"], choice["text"]) == ("length", None, "")
    assert len(choice["token_ids"]) == 40


async def test_echo_needs_the_tokenizer_unless_token_ids_are_returned(no_tokenizer):
    async with running_server(*no_tokenizer) as server, aiohttp.ClientSession() as http:
        echo = await post(http, server.url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "echo": True})
        status, ids = await post(http, server.url, "/v1/completions",
                                 {"prompt": PROMPT, "max_tokens": 2, "echo": True, "return_token_ids": True})
    assert echo == (400, NO_TOKENIZER)
    assert status == 200 and ids["choices"][0]["text"] == "" and ids["choices"][0]["prompt_token_ids"] == PROMPT


async def test_truncation_keeps_the_first_token_ids_without_a_tokenizer():
    # without a tokenizer vLLM has no default truncation side, and slices from the start
    body = {"prompt": PROMPT, "max_tokens": 1, "truncate_prompt_tokens": 2, "return_token_ids": True}
    async with running_server(*FAST, "--skip-tokenizer-init") as server, aiohttp.ClientSession() as http:
        _, first = await post(http, server.url, "/v1/completions", body)
        _, left = await post(http, server.url, "/v1/completions", {**body, "truncation_side": "left"})
    assert first["choices"][0]["prompt_token_ids"] == PROMPT[:2]
    assert left["choices"][0]["prompt_token_ids"] == PROMPT[-2:]


async def test_logprobs_need_token_ids_as_names():
    async with running_server(*FAST, "--skip-tokenizer-init") as server, aiohttp.ClientSession() as http:
        named = await post(http, server.url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 3, "logprobs": 1})
        echoed = await post(http, server.url, "/v1/completions",
                            {"prompt": PROMPT, "max_tokens": 3, "logprobs": 1, "echo": True, "return_token_ids": True})
        stream = await events(http, server.url, "/v1/completions",
                              {"prompt": PROMPT, "max_tokens": 3, "logprobs": 1, "stream": True,
                               "stream_options": {"include_usage": True}})
        status, as_ids = await post(http, server.url, "/v1/completions",
                                    {"prompt": PROMPT, "max_tokens": 3, "logprobs": 1, "ignore_eos": True,
                                     "return_tokens_as_token_ids": True, "return_token_ids": True,
                                     "prompt_logprobs": 1})
    assert named == (400, {"error": {"message": UNNAMED, "type": "BadRequestError", "param": None, "code": 400}})
    assert echoed == (400, {"error": {"message": f"{UNNAMED} (parameter=skip_tokenizer_init, value=True)",
                                      "type": "BadRequestError", "param": "skip_tokenizer_init", "code": 400}})
    assert stream == [{"error": {"message": UNNAMED, "type": "BadRequestError", "param": None, "code": 400}},
                      "[DONE]"]
    assert status == 200
    choice = as_ids["choices"][0]
    assert choice["logprobs"]["tokens"] == [f"token_id:{i}" for i in choice["token_ids"]]
    assert choice["logprobs"]["text_offset"][1] == len(f"token_id:{choice['token_ids'][0]}")
    assert choice["prompt_logprobs"][0] is None
    assert all(c["decoded_token"] is None for entry in choice["prompt_logprobs"][1:] for c in entry.values())


async def test_structured_outputs_are_refused():
    message = "Structured outputs requires a tokenizer so it can't be used with 'skip_tokenizer_init'"
    error = {"error": {"message": message, "type": "BadRequestError", "param": None, "code": 400}}
    body = {"prompt": PROMPT, "max_tokens": 3, "structured_outputs": {"choice": ["yes", "no"]}}
    async with running_server(*FAST, "--skip-tokenizer-init") as server, aiohttp.ClientSession() as http:
        whole = await post(http, server.url, "/v1/completions", body)
        schema = await post(http, server.url, "/v1/completions",
                            {"prompt": PROMPT, "response_format": {"type": "json_object"}})
        stream = await events(http, server.url, "/v1/completions", {**body, "stream": True})
    assert whole == (400, error) and schema == (400, error)
    assert stream == [error, "[DONE]"]


async def test_chat_routes_fail_vllms_tokenizer_assertion(no_tokenizer):
    async with running_server(*no_tokenizer) as server, aiohttp.ClientSession() as http:
        chat = await post(http, server.url, "/v1/chat/completions", {"messages": HELLO, "model": "no-such-model"})
        streamed = await post(http, server.url, "/v1/chat/completions", {"messages": HELLO, "stream": True})
        batch = await post(http, server.url, "/v1/chat/completions/batch", {"messages": [HELLO]})
        messages = await post(http, server.url, "/v1/messages",
                              {"model": "meta-llama/Llama-3.1-8B", "max_tokens": 4, "messages": HELLO})
        count = await post(http, server.url, "/v1/messages/count_tokens",
                           {"model": "meta-llama/Llama-3.1-8B", "messages": HELLO})
        schema = await post(http, server.url, "/v1/chat/completions", {"messages": "not a list"})
    assert chat == (500, CHAT_ASSERTION) and streamed == (500, CHAT_ASSERTION) and batch == (500, CHAT_ASSERTION)
    assert messages == (500, {"type": "error", "error": {"type": "api_error", "message": ""}})
    assert count == (400, {"type": "error", "error": {"type": "invalid_request_error",
                                                      "message": NO_TOKENIZER["error"]["message"]}})
    assert schema[0] == 400 and schema[1]["error"]["type"] == "Bad Request"  # the body is read first


async def test_tokenizer_routes_and_responses_get_the_renderers_400(no_tokenizer):
    async with running_server(*no_tokenizer) as server, aiohttp.ClientSession() as http:
        answers = [await post(http, server.url, path, body) for path, body in (
            ("/tokenize", {"prompt": "Hello"}),
            ("/tokenize", {"messages": HELLO}),
            ("/detokenize", {"tokens": [9906]}),
            ("/v1/responses", {"input": "Hello"}))]
        unknown = await post(http, server.url, "/detokenize", {"tokens": [9906], "model": "no-such-model"})
        async with http.get(server.url + "/v1/models") as r:
            models = r.status, [m["id"] for m in (await r.json())["data"]]
    assert answers == [(400, NO_TOKENIZER)] * 4
    assert unknown[0] == 404  # the model is checked first
    assert models == (200, ["meta-llama/Llama-3.1-8B"])


async def test_scale_out_routes_without_a_tokenizer():
    async with running_server(*FAST, "--skip-tokenizer-init", "--enable-scale-out") as server, \
            aiohttp.ClientSession() as http:
        chat_render = await post(http, server.url, "/v1/chat/completions/render", {"messages": HELLO})
        text_render = await post(http, server.url, "/v1/completions/render", {"prompt": "Hello"})
        status, ids_render = await post(http, server.url, "/v1/completions/render", {"prompt": PROMPT})
        text = await post(http, server.url, "/inference/v1/generate",
                          {"token_ids": PROMPT, "sampling_params": {"max_tokens": 2}, "output_mode": "text"})
        tokens_status, tokens = await post(http, server.url, "/inference/v1/generate",
                                           {"token_ids": PROMPT, "sampling_params": {
                                               "max_tokens": 6, "stop": ["e"], "ignore_eos": True}})
        _, generated = await post(http, server.url, "/inference/v1/generate",
                                  {"token_ids": PROMPT, "sampling_params": {"max_tokens": 2}})
        derender = await post(http, server.url, "/v1/completions/derender",
                              {"generate_responses": [generated], "prompt_tokens": [len(PROMPT)]})
    assert chat_render == (400, NO_TOKENIZER) and text_render == (400, NO_TOKENIZER)
    assert status == 200 and ids_render[0]["token_ids"] == PROMPT
    assert text[0] == 400 and text[1]["error"]["message"].startswith("output_mode='text' requires a tokenizer")
    # only --tokens-only refuses stop strings on generate; here they are ignored, as vLLM's no-op detokenizer does
    assert tokens_status == 200 and len(tokens["choices"][0]["token_ids"]) == 6
    assert derender == (400, NO_TOKENIZER)


async def test_no_skip_tokenizer_init_keeps_the_tokenizer():
    async with running_server(*FAST, "--skip-tokenizer-init", "--no-skip-tokenizer-init") as server, \
            aiohttp.ClientSession() as http:
        status, body = await post(http, server.url, "/v1/completions", {"prompt": "Hello", "max_tokens": 3,
                                                                         "ignore_eos": True})
    assert status == 200 and body["choices"][0]["text"] != ""
