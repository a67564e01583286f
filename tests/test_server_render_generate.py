"""vLLM 0.33's scale-out routes (render, derender, /inference/v1/generate, /inference/v1/abort_requests)
and /v1/chat/completions/batch, as the emulator serves them.

Render gives the token ids /tokenize gives for the same prompt and the sampling parameters vLLM writes;
generate runs token ids on the engine (token ids and usage back, streamed or not, kv_transfer_params
through to a P/D prefill, counted in the metrics and /load, aborted when the client leaves or when
abort_requests names it); derender turns generate's ids back into chat and completion answers, whole or
chunk by chunk with the state the client carries. Without --enable-scale-out every scale-out path is a
403, as in vLLM. The parity test (vLLM's CPU venv, skipped without it) checks the sampling parameters
against vLLM's own to_sampling_params, every shape against vLLM's own pydantic classes and the schema
errors against vLLM's own routers.
"""
from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from server.testing import running_server

MODEL = "meta-llama/Llama-3.1-8B"
FAST = ("--speed", "1000", "--generation-config", "vllm")  # vLLM's side here has no generation config
SCALE_OUT = (*FAST, "--enable-scale-out")
HELLO = [{"role": "user", "content": "Hello there"}]
REPO = Path(__file__).resolve().parents[1]
SCALE_OUT_PATHS = ["/v1/chat/completions/render", "/v1/messages/render", "/v1/completions/render",
                   "/v1/responses/render", "/v1/chat/completions/derender", "/v1/completions/derender",
                   "/inference/v1/generate", "/inference/v1/abort_requests"]
NIXL = ("--kv-transfer-config", '{"kv_connector": "NixlConnector", "kv_role": "kv_both"}')


async def post(http: aiohttp.ClientSession, url: str, path: str, body, **kwargs):
    async with http.post(url + path, json=body, **kwargs) as r:
        text = await r.text()
        return r.status, (json.loads(text) if text else None)


async def stream_events(http: aiohttp.ClientSession, url: str, path: str, body: dict) -> list:
    """The data of each SSE event ("[DONE]" as the string)."""
    async with http.post(url + path, json=body) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        raw = (await r.read()).decode()
    assert raw.endswith("data: [DONE]\n\n")
    return [e[len("data: "):] if e == "data: [DONE]" else json.loads(e[len("data: "):])
            for e in raw.split("\n\n") if e]


async def metric(http: aiohttp.ClientSession, url: str, name: str) -> float:
    async with http.get(url + "/metrics") as r:
        text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


async def until(condition, tries: int = 6000) -> None:
    """Wait (loop turns, up to a minute on a machine stalled by others) until `condition()` holds."""
    for _ in range(tries):
        if condition():
            return
        await asyncio.sleep(0.01)
    assert condition()


# -- registration ------------------------------------------------------------------------------------
async def test_scale_out_routes_are_403_without_enable_scale_out_and_batch_chat_is_served():
    async with running_server(*FAST) as server, aiohttp.ClientSession() as http:
        answers = [await post(http, server.url, path, {"anything": 1}) for path in SCALE_OUT_PATHS]
        async with http.post(server.url + "/inference/v1/generate", data=b"not json") as r:
            not_json = r.status, await r.json()
        batch, _ = await post(http, server.url, "/v1/chat/completions/batch", {"messages": [HELLO], "max_tokens": 2})
    refusal = {"error": {"message": "Scale-out endpoints are disabled. Restart vllm serve with --enable-scale-out "
                                    "to enable them.", "type": "PermissionDeniedError", "param": None, "code": 403}}
    assert answers == [(403, refusal)] * len(SCALE_OUT_PATHS) and not_json == (403, refusal)
    assert batch == 200


async def test_tokens_only_registers_the_routes_and_the_legacy_abort_and_never_detokenizes():
    async with running_server(*FAST, "--tokens-only") as server, aiohttp.ClientSession() as http:
        tokens = await post(http, server.url, "/inference/v1/generate",
                            {"token_ids": [128000, 9906], "sampling_params": {"max_tokens": 2}})
        text = await post(http, server.url, "/inference/v1/generate",
                          {"token_ids": [128000, 9906], "sampling_params": {}, "output_mode": "text"})
        stop = await post(http, server.url, "/inference/v1/generate",
                          {"token_ids": [128000, 9906], "sampling_params": {"stop": ["x"]}})
        legacy = await post(http, server.url, "/abort_requests", {"request_ids": ["nothing"]})
    assert tokens[0] == 200 and len(tokens[1]["choices"][0]["token_ids"]) <= 2
    assert text == (400, {"error": {"message": (
        "output_mode='text' requires a tokenizer, but this server does not load one (--tokens-only or "
        "--skip-tokenizer-init). Send the request to a server that loads a tokenizer, or use output_mode='tokens'."),
        "type": "BadRequestError", "param": None, "code": 400}})
    assert stop[0] == 400 and stop[1]["error"]["message"].startswith("stop strings are not supported on a "
                                                                      "--tokens-only server")
    assert legacy == (200, None)


# -- render --------------------------------------------------------------------------------------------
async def test_chat_and_messages_render_give_the_token_ids_tokenize_gives():
    async with running_server(*SCALE_OUT) as server, aiohttp.ClientSession() as http:
        status, rendered = await post(http, server.url, "/v1/chat/completions/render",
                                      {"model": MODEL, "messages": HELLO, "max_tokens": 5, "temperature": 0.5,
                                       "kv_transfer_params": {"do_remote_decode": True}},
                                      headers={"X-Request-Id": "abc"})
        _, tokenized = await post(http, server.url, "/tokenize", {"model": MODEL, "messages": HELLO})
        _, messages = await post(http, server.url, "/v1/messages/render",
                                 {"model": MODEL, "messages": HELLO, "max_tokens": 7})
        _, streamed = await post(http, server.url, "/v1/chat/completions/render",
                                 {"messages": HELLO, "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200 and rendered["request_id"] == "chatcmpl-abc"
    assert rendered["token_ids"] == tokenized["tokens"] == messages["token_ids"]
    assert list(rendered) == ["request_id", "token_ids", "token_offsets", "features", "content_parts",
                              "sampling_params", "model", "reasoning_ended", "reasoning_parser_kwargs",
                              "return_token_ids", "output_mode", "parse_context", "stream", "stream_options",
                              "cache_salt", "priority", "kv_transfer_params", "ec_transfer_params"]
    assert rendered["sampling_params"] == {
        "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "temperature": 0.5,
        "top_p": 1.0, "min_p": 0.0, "stop": [], "stop_token_ids": [], "max_tokens": 5, "output_kind": 2,
        "skip_clone": True, "bad_words": [], "skip_reading_prefix_cache": False}
    assert rendered["kv_transfer_params"] == {"do_remote_decode": True}  # moved out of the sampling parameters
    assert rendered["parse_context"] == {"tools": None, "tool_choice": "none", "parallel_tool_calls": True,
                                         "include_reasoning": True, "history_tool_call_cnt": 0,
                                         "chat_template_kwargs": {"add_generation_prompt": True,
                                                                  "continue_final_message": False}}
    assert messages["sampling_params"]["max_tokens"] == 7
    # no max_tokens: what the context leaves; a stream asks the engine for deltas
    assert streamed["sampling_params"]["max_tokens"] == 131072 - len(tokenized["tokens"])
    assert streamed["sampling_params"]["output_kind"] == 1 and streamed["stream"] is True
    assert streamed["stream_options"] == {"include_usage": True, "continuous_usage_stats": False}


async def test_completion_render_gives_one_generate_request_per_prompt():
    async with running_server(*SCALE_OUT) as server, aiohttp.ClientSession() as http:
        status, rendered = await post(http, server.url, "/v1/completions/render",
                                      {"prompt": ["Hello world", "Good morning to you"], "max_tokens": 4,
                                       "seed": 3, "stop": "abc"}, headers={"X-Request-Id": "r"})
        counts = [(await post(http, server.url, "/tokenize", {"prompt": p}))[1]["tokens"]
                  for p in ("Hello world", "Good morning to you")]
        _, single = await post(http, server.url, "/v1/completions/render", {"prompt": [1, 2, 3]})
    assert status == 200 and [r["request_id"] for r in rendered] == ["cmpl-r-0", "cmpl-r-1"]
    assert [r["token_ids"] for r in rendered] == counts
    params = rendered[0]["sampling_params"]
    assert params["seed"] == 3 and params["stop"] == ["abc"] and params["output_text_buffer_length"] == 2
    assert params["max_tokens"] == 4 and rendered[0]["parse_context"] is None
    assert len(single) == 1 and single[0]["token_ids"] == [1, 2, 3] and "max_tokens" not in single[0]["sampling_params"]


async def test_responses_render_is_stateless():
    async with running_server(*SCALE_OUT) as server, aiohttp.ClientSession() as http:
        status, rendered = await post(http, server.url, "/v1/responses/render",
                                      {"model": MODEL, "input": "Hello there", "max_output_tokens": 9})
        _, tokenized = await post(http, server.url, "/tokenize",
                                  {"model": MODEL, "messages": HELLO, "add_special_tokens": True})
        refused = await post(http, server.url, "/v1/responses/render",
                             {"input": "hi", "previous_response_id": "resp_1"})
    assert status == 200 and rendered["request_id"].startswith("resp_")
    assert rendered["token_ids"] == tokenized["tokens"]  # the Responses path adds the special tokens
    assert rendered["sampling_params"]["max_tokens"] == 9 and rendered["sampling_params"]["extra_args"] == {}
    assert refused == (400, {"error": {
        "message": "previous_response_id is not supported by the stateless render endpoint.",
        "type": "invalid_request_error", "param": "previous_response_id", "code": 400}})


# -- generate ------------------------------------------------------------------------------------------
async def test_generate_returns_the_token_ids_and_usage_it_ran():
    async with running_server(*SCALE_OUT) as server, aiohttp.ClientSession() as http:
        before = await metric(http, server.url, "vllm:request_success_total")
        status, answer = await post(http, server.url, "/inference/v1/generate", {
            "token_ids": list(range(1000, 1040)), "request_id": "g1", "return_token_ids": True,
            "sampling_params": {"max_tokens": 7, "ignore_eos": True, "n": 2, "logprobs": 2}})
        after = await metric(http, server.url, "vllm:request_success_total")
        prompt_tokens = await metric(http, server.url, "vllm:prompt_tokens_total")
    assert status == 200 and answer["request_id"] == "generate-tokens-g1" and answer["output_mode"] == "tokens"
    assert answer["usage"] == {"prompt_tokens": 40, "total_tokens": 54, "completion_tokens": 14,
                               "prompt_tokens_details": None, "completion_tokens_details": None}
    assert answer["prompt_token_ids"] == list(range(1000, 1040)) and answer["model"] == MODEL
    assert [c["index"] for c in answer["choices"]] == [0, 1]
    for choice in answer["choices"]:
        assert len(choice["token_ids"]) == 7 and choice["finish_reason"] == "length" and choice["stop_reason"] is None
        content = choice["logprobs"]["content"]
        assert [e["token_id"] for e in content] == choice["token_ids"]
        assert all(e["rank"] == 1 and len(e["top_logprobs"]) == 2 and e["top_logprobs"][0]["token_id"] == e["token_id"]
                   for e in content)
    assert after - before == 2 and prompt_tokens == 80  # the engine counted both choices


async def test_generate_streams_the_ids_it_would_answer_whole():
    body = {"token_ids": [128000, 9906, 1070], "sampling_params": {"max_tokens": 6, "seed": 11, "min_tokens": 6},
            "output_mode": "text", "request_id": "s"}
    async with running_server(*SCALE_OUT) as server, aiohttp.ClientSession() as http:
        _, whole = await post(http, server.url, "/inference/v1/generate", body)
        events = await stream_events(http, server.url, "/inference/v1/generate", {
            **body, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "return_token_ids": True})
    chunks, usage, done = events[:-2], events[-2], events[-1]
    assert done == "[DONE]" and usage == {"request_id": "generate-tokens-s", "usage": {
        "prompt_tokens": 3, "total_tokens": 9, "completion_tokens": 6}, "output_mode": "text", "choices": []}
    assert list(chunks[0]) == ["request_id", "usage", "prompt_token_ids", "output_mode", "choices"]
    assert chunks[0]["prompt_token_ids"] == [128000, 9906, 1070] and "prompt_token_ids" not in chunks[1]
    assert [c["usage"]["completion_tokens"] for c in chunks] == list(range(1, 7))
    ids = [i for c in chunks for i in c["choices"][0]["token_ids"]]
    assert ids == whole["choices"][0]["token_ids"]  # the same seed, the same output
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 5 + ["length"]


async def test_generate_hits_the_prefix_cache_unless_salted():
    body = {"token_ids": list(range(1000, 1100)), "sampling_params": {"max_tokens": 2}}
    async with running_server(*SCALE_OUT, "--enable-prompt-tokens-details") as server, \
            aiohttp.ClientSession() as http:
        answers = [await post(http, server.url, "/inference/v1/generate", b)
                   for b in (body, body, {**body, "cache_salt": "tenant-b"})]
    cached = [a["usage"]["prompt_tokens_details"]["cached_tokens"] for _, a in answers]
    assert cached == [0, 96, 0]  # the full blocks of the first; none for another tenant's salt
    assert answers[0][1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 0, "created_cache_tokens": None,
                                                               "multimodal_tokens": None}


async def test_generate_passes_kv_transfer_params_to_a_pd_prefill():
    async with running_server(*SCALE_OUT, *NIXL) as server, aiohttp.ClientSession() as http:
        status, answer = await post(http, server.url, "/inference/v1/generate", {
            "token_ids": list(range(100, 400)), "sampling_params": {"max_tokens": 1},
            "kv_transfer_params": {"do_remote_decode": True}}, headers={"X-Request-Id": "pd"})
        held = list(server.engine.sim.transfers.held)
    params = answer["kv_transfer_params"]
    assert status == 200 and params["do_remote_prefill"] is True and params["remote_num_tokens"] == 300
    assert re.fullmatch(r"generate-tokens-pd-[0-9a-f]{8}", params["remote_request_id"])
    assert [request_id for _, request_id in held] == [params["remote_request_id"]]  # its blocks wait for a decode


async def test_a_client_leaving_a_generate_stream_leaves_nothing_running():
    async with running_server("--speed", "2", "--enable-scale-out") as server, aiohttp.ClientSession() as http:
        response = await http.post(server.url + "/inference/v1/generate", json={
            "token_ids": list(range(1000, 1100)), "stream": True,
            "sampling_params": {"max_tokens": 5000, "ignore_eos": True}})
        async for _ in response.content.iter_any():
            break  # the first chunk: it runs
        response.close()
        await until(lambda: server.engine.num_unfinished == 0)
        kv_usage = await metric(http, server.url, "vllm:kv_cache_usage_perc")
    engine = server.engine.sim.engines[0]
    assert not server.engine.sim.active and engine.num_running == 0 and engine.kv.usage == 0 and kv_usage == 0


async def test_abort_requests_ends_a_running_generate_and_load_tracks_it():
    async with running_server("--speed", "2", "--enable-scale-out", "--enable-server-load-tracking") as server, \
            aiohttp.ClientSession() as http:
        task = asyncio.ensure_future(post(http, server.url, "/inference/v1/generate", {
            "token_ids": list(range(1000, 1100)), "request_id": "victim",
            "sampling_params": {"max_tokens": 5000, "ignore_eos": True}}))
        running = server.engine.sim.engines[0].scheduler.running  # the victim, with a first token out (not timed)
        await until(lambda: len(running) == 1 and running[0].num_output_tokens > 0)
        async with http.get(server.url + "/load") as r:
            load_during = (await r.json())["server_load"]
        aborted = await post(http, server.url, "/inference/v1/abort_requests",
                             {"request_ids": ["generate-tokens-victim"]})
        status, answer = await task
        async with http.get(server.url + "/load") as r:
            load_after = (await r.json())["server_load"]
        missing = await post(http, server.url, "/inference/v1/abort_requests", {"ids": []})
    assert aborted == (200, None) and load_during == 1 and load_after == 0
    assert status == 200 and answer["choices"][0]["finish_reason"] == "abort"
    assert 0 < len(answer["choices"][0]["token_ids"]) < 5000
    assert missing == (400, {"error": {"message": "Missing 'request_ids' in request body", "type": "Bad Request",
                                       "param": None, "code": 400}})


@pytest.mark.parametrize("body, message, param", [
    ({"token_ids": [1], "sampling_params": {"temperature": -1}},
     "temperature must be non-negative, got -1.0. (parameter=temperature, value=-1.0)", "temperature"),
    ({"token_ids": [], "sampling_params": {}},
     "1 validation error:\n  {'type': 'too_short', 'loc': 'body.token_ids', 'msg': 'List should have at least 1 "
     "item after validation, not 0', 'input': '<list of 0 items>', 'ctx': {'field_type': 'List', 'min_length': 1, "
     "'actual_length': 0}}", "body.token_ids"),
    ({"token_ids": [1], "sampling_params": "x"},
     "2 validation errors:\n  {'type': 'is_instance_of', 'loc': 'body.sampling_params', 'msg': 'Input should be an "
     "instance of SamplingParams', 'input': 'x', 'ctx': {'class': 'SamplingParams'}}\n  {'type': 'dict_type', "
     "'loc': 'body.sampling_params', 'msg': 'Input should be a valid dictionary', 'input': 'x'}",
     "body.sampling_params"),
    ({"token_ids": [1], "sampling_params": {"temperature": 0, "n": 2}},
     "n must be 1 when using greedy sampling, got 2.", None),
    ({"token_ids": [1], "sampling_params": {"logprobs": 21}},
     "Requested sample logprobs of 21, which is greater than max allowed: 20 (parameter=logprobs, value=21)",
     "logprobs"),
    ({"token_ids": [10**7], "sampling_params": {}}, "Token id 10000000 is out of vocabulary", None),
    ({"token_ids": [1] * 131072, "sampling_params": {}},
     "The decoder prompt (length 131072) plus the number of requested output tokens (at least 1) is longer than the "
     "maximum model length of 131072. Make sure that `max_model_len` is no smaller than the number of text tokens "
     "(prompt + requested output tokens).", None),
    ({"token_ids": [1], "sampling_params": {}, "output_mode": "derender", "stream": True},
     "output_mode='derender' does not support stream=true.", None),
])
async def test_bad_generate_requests_get_vllms_400(body, message, param):
    async with running_server(*SCALE_OUT) as server, aiohttp.ClientSession() as http:
        status, answer = await post(http, server.url, "/inference/v1/generate", body)
        unknown = await post(http, server.url, "/inference/v1/generate",
                             {"token_ids": [1], "sampling_params": {}, "model": "nope"})
    assert status == 400 and answer["error"]["message"] == message and answer["error"]["param"] == param
    assert unknown[0] == 404 and unknown[1]["error"]["type"] == "NotFoundError"


# -- derender -------------------------------------------------------------------------------------------
async def test_derender_inverts_render():
    """A rendered prompt's ids, derendered as if generated, are its text again (the BOS skipped as special)."""
    async with running_server(*SCALE_OUT) as server, aiohttp.ClientSession() as http:
        _, rendered = await post(http, server.url, "/v1/completions/render", {"prompt": "Hello world, café"})
        ids = rendered[0]["token_ids"]
        generated = {"request_id": "x", "choices": [{"index": 0, "token_ids": ids, "finish_reason": "length"}]}
        _, completion = await post(http, server.url, "/v1/completions/derender", {"generate_responses": [generated]})
        _, chat = await post(http, server.url, "/v1/chat/completions/derender", {"generate_response": generated})
    assert completion["choices"][0]["text"] == chat["choices"][0]["message"]["content"] == "Hello world, café"
    assert completion["object"] == "text_completion" and chat["object"] == "chat.completion"


async def test_render_generate_derender_answers_as_chat_does():
    """The disaggregated path: render, generate (ids only), derender, whole and chunk by chunk."""
    async with running_server(*SCALE_OUT) as server, aiohttp.ClientSession() as http:
        _, rendered = await post(http, server.url, "/v1/chat/completions/render", {
            "model": MODEL, "messages": HELLO, "max_tokens": 8, "seed": 5, "stop": ["zzz"],
            "return_token_ids": True})
        _, text = await post(http, server.url, "/inference/v1/generate", {**rendered, "output_mode": "text"})
        _, ids = await post(http, server.url, "/inference/v1/generate", rendered)
        _, whole = await post(http, server.url, "/v1/chat/completions/derender", {
            "generate_response": ids, "prompt_token_ids": rendered["token_ids"],
            "prompt_tokens": len(rendered["token_ids"]), "chat_request": {"messages": HELLO, "return_token_ids": True}})
        _, as_message = await post(http, server.url, "/inference/v1/generate", {**rendered, "output_mode": "derender"})
        events = await stream_events(http, server.url, "/inference/v1/generate", {
            **rendered, "stream": True, "stream_options": {"include_usage": True}})
        state, deltas, roles, finish = None, [], [], None
        for event in events[:-1]:
            status, derendered = await post(http, server.url, "/v1/chat/completions/derender", {
                "stream": True, "generate_chunk": event, "stream_state": state,
                "prompt_token_ids": rendered["token_ids"], "prompt_tokens": len(rendered["token_ids"])})
            assert status == 200 and derendered["chunk"]["object"] == "chat.completion.chunk"
            state = derendered["stream_state"]
            for choice in derendered["chunk"]["choices"]:
                deltas.append(choice["delta"]["content"] or "")
                roles.append(choice["delta"]["role"])
                finish = choice["finish_reason"] or finish
        usage = derendered["chunk"]["usage"]
    expected = text["choices"][0]["text"]
    assert expected and whole["choices"][0]["message"]["content"] == expected
    assert as_message["choices"][0]["message"]["content"] == expected
    assert whole["choices"][0]["token_ids"] == ids["choices"][0]["token_ids"]
    assert whole["prompt_token_ids"] == rendered["token_ids"]  # render asked generate to return them
    assert whole["usage"]["prompt_tokens"] == len(rendered["token_ids"])
    assert "".join(deltas) == expected and roles[0] == "assistant" and set(roles[1:]) == {None}
    assert finish == ids["choices"][0]["finish_reason"]
    assert usage["completion_tokens"] == len(ids["choices"][0]["token_ids"])
    assert len(state["prev_tokens"]) <= 8  # the window the client carries stays small


async def test_completion_derender_of_each_stream_chunk_adds_up_to_the_text():
    async with running_server(*SCALE_OUT) as server, aiohttp.ClientSession() as http:
        _, rendered = await post(http, server.url, "/v1/completions/render",
                                 {"prompt": "Once upon a time", "max_tokens": 9, "seed": 2, "logprobs": 1})
        body = rendered[0]
        _, text = await post(http, server.url, "/inference/v1/generate", {**body, "output_mode": "text"})
        events = await stream_events(http, server.url, "/inference/v1/generate", {**body, "stream": True})
        state, pieces, offsets = None, [], []
        for event in events[:-1]:
            status, derendered = await post(http, server.url, "/v1/completions/derender", {
                "stream": True, "generate_chunk": event, "stream_state": state, "prompt_token_ids": body["token_ids"],
                "completion_request": {"prompt": "Once upon a time", "logprobs": 1}})
            assert status == 200, derendered
            state = derendered["stream_state"]
            for choice in derendered["chunk"]["choices"]:
                pieces.append(choice["text"])
                offsets += choice["logprobs"]["text_offset"]
    expected = text["choices"][0]["text"]
    assert "".join(pieces) == expected
    assert offsets == [sum(len(p) for p in pieces[:i]) for i in range(len(pieces))]  # absolute across calls
    assert state["logprob_text_offset"] == len(expected)


async def test_a_forced_tool_call_is_rendered_generated_and_derendered_as_chat_answers_it():
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    chat = {"model": MODEL, "messages": HELLO, "max_tokens": 4000, "tools": tools, "tool_choice": "required", "seed": 4}
    async with running_server(*SCALE_OUT, "--enable-auto-tool-choice", "--tool-call-parser", "llama3_json") as server, \
            aiohttp.ClientSession() as http:
        _, rendered = await post(http, server.url, "/v1/chat/completions/render", chat)
        _, parsed = await post(http, server.url, "/inference/v1/generate", {**rendered, "output_mode": "derender"})
        _, ids = await post(http, server.url, "/inference/v1/generate", rendered)
        _, whole = await post(http, server.url, "/v1/chat/completions/derender",
                              {"generate_response": ids, "chat_request": chat})
        plain = await post(http, server.url, "/v1/chat/completions/derender", {"generate_response": ids})
        chunked = {**rendered["sampling_params"], "stream_interval": 40}  # a few chunks: each call replays the last
        events = await stream_events(http, server.url, "/inference/v1/generate",
                                     {**rendered, "sampling_params": chunked, "stream": True})
        state, deltas, finish = None, [], None
        for event in events[:-1]:
            status, derendered = await post(http, server.url, "/v1/chat/completions/derender", {
                "stream": True, "generate_chunk": event, "stream_state": state, "chat_request": chat,
                "prompt_token_ids": rendered["token_ids"]})
            assert status == 200, derendered
            state = derendered["stream_state"]
            choice = derendered["chunk"]["choices"][0]
            deltas += choice["delta"].get("tool_calls") or []
            finish = choice["finish_reason"] or finish
    tag = json.loads(rendered["sampling_params"]["structured_outputs"]["structural_tag"])  # llama3_json's
    assert tag["format"]["type"] == "triggered_tags" and rendered["parse_context"]["tool_choice"] == "required"
    calls = whole["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    assert whole["choices"][0]["finish_reason"] == "tool_calls"
    assert whole["choices"][0]["message"]["content"] == "" and json.loads(calls[0]["function"]["arguments"])["city"]
    assert [c["function"] for c in parsed["choices"][0]["message"]["tool_calls"]] == [c["function"] for c in calls]
    assert "".join(d["function"]["arguments"] for d in deltas) == calls[0]["function"]["arguments"]
    assert [d["id"] for d in deltas if "id" in d] == [state["last_tool_call_ids"][0]] and finish == "tool_calls"
    assert plain[0] == 400 and plain[1]["error"]["message"].startswith("chat_request is required when a tool")


R_TOOLS = [{"type": "function", "name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
    {"type": "function", "name": "add", "strict": True, "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}]
FORCED_RESPONSES = [  # [tool parser, Responses body]
    ("hermes", {"input": "Hello", "tools": R_TOOLS, "tool_choice": "required"}),
    ("hermes", {"input": "Hello", "tools": R_TOOLS, "tool_choice": {"type": "function", "name": "add"},
                "text": {"format": {"type": "json_object"}}}),  # the forced call's tag replaces text.format
    ("hermes", {"input": "Hello", "tools": R_TOOLS, "tool_choice": "auto"}),  # a strict tool: a tag allowing text
    ("hermes", {"input": "Hello", "tools": R_TOOLS, "tool_choice": "none"}),
    ("llama3_json", {"input": "Hello", "tools": R_TOOLS, "tool_choice": "required", "parallel_tool_calls": False}),
    ("pythonic", {"input": "Hello", "tools": R_TOOLS, "tool_choice": {"type": "function", "name": "get_weather"}}),
]


async def _render_forced_responses() -> list[dict]:
    """Each FORCED_RESPONSES body rendered by a server with its tool parser."""
    rendered = []
    for parser in dict.fromkeys(p for p, _ in FORCED_RESPONSES):
        async with running_server(*SCALE_OUT, "--enable-auto-tool-choice", "--tool-call-parser", parser) as server, \
                aiohttp.ClientSession() as http:
            for case_parser, body in FORCED_RESPONSES:
                if case_parser == parser:
                    status, answer = await post(http, server.url, "/v1/responses/render", body)
                    assert status == 200, answer
                    rendered.append({"path": "/v1/responses/render", "body": body, "tool_parser": parser,
                                     "ours": answer})
    return sorted(rendered, key=lambda r: [b for _, b in FORCED_RESPONSES].index(r["body"]))


async def test_responses_render_applies_the_tool_parsers_forced_call():
    hermes_required, hermes_named, hermes_auto, hermes_none, llama, pythonic = [
        r["ours"]["sampling_params"] for r in await _render_forced_responses()]
    tag = json.loads(hermes_required["structured_outputs"]["structural_tag"])  # hermes' tags, either tool
    assert tag["format"]["type"] == "tags_with_separator" and len(tag["format"]["tags"]) == 4
    assert hermes_required["skip_special_tokens"] is False and hermes_auto["skip_special_tokens"] is False
    named = json.loads(hermes_named["structured_outputs"]["structural_tag"])
    assert named["format"]["stop_after_first"] and {t["begin"].split('"')[3] for t in named["format"]["tags"]} == {
        "add"} and named["format"]["tags"][0]["content"]["json_schema"] == R_TOOLS[1]["parameters"]  # strict
    auto = json.loads(hermes_auto["structured_outputs"]["structural_tag"])["format"]
    assert auto["type"] == "triggered_tags" and auto["at_least_one"] is False
    assert "structured_outputs" not in hermes_none and "skip_special_tokens" not in hermes_none  # the default
    assert json.loads(llama["structured_outputs"]["structural_tag"])["format"]["stop_after_first"] is True
    assert "skip_special_tokens" not in llama
    assert pythonic["structured_outputs"]["json"] == R_TOOLS[0]["parameters"]  # no tag: the call's JSON schema


@pytest.mark.vllm
async def test_responses_render_of_a_forced_call_equals_vllms():
    python = _vllm_python()
    job = {"render": await _render_forced_responses()}
    done = subprocess.run([python, str(REPO / "tests" / "render_generate_vllm_side.py")], input=json.dumps(job),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    vllm = json.loads(done.stdout.strip().splitlines()[-1])
    for case, theirs in zip(job["render"], vllm["render"], strict=True):
        assert case["ours"]["sampling_params"] == theirs["sampling_params"], case
        assert case["ours"] == theirs["validated"], case


async def test_bad_derender_requests_get_vllms_400():
    chunk = {"request_id": "x", "choices": [{"index": 0, "token_ids": [1]}]}
    async with running_server(*SCALE_OUT) as server, aiohttp.ClientSession() as http:
        stop = await post(http, server.url, "/v1/chat/completions/derender", {
            "stream": True, "generate_chunk": chunk, "chat_request": {"messages": HELLO, "stop": ["x"]}})
        empty = await post(http, server.url, "/v1/completions/derender", {"generate_responses": []})
        no_ids = await post(http, server.url, "/v1/chat/completions/derender",
                            {"generate_response": {"choices": [{"index": 0}]}})
        bad_state = await post(http, server.url, "/v1/chat/completions/derender", {
            "stream": True, "generate_chunk": chunk, "stream_state": {"output_chunk_lens": [2]}})
    assert stop[0] == 400 and stop[1]["error"]["message"].startswith("stop strings are not supported by streaming")
    assert empty == (400, {"error": {"message": "generate_responses must not be empty", "type": "BadRequestError",
                                     "param": None, "code": 400}})
    assert no_ids[0] == 400 and no_ids[1]["error"]["message"] == "choice 0 has empty or null token_ids"
    assert bad_state[0] == 400 and bad_state[1]["error"]["type"] == "Bad Request"
    assert "output_chunk_lens must sum to len(output_token_ids)" in bad_state[1]["error"]["message"]


# -- batch chat ----------------------------------------------------------------------------------------------
async def test_batch_chat_answers_each_conversation():
    conversations = [HELLO, [{"role": "user", "content": "What is the weather like today?"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]]
    async with running_server(*FAST) as server, aiohttp.ClientSession() as http:
        before = await metric(http, server.url, "vllm:request_success_total")
        status, answer = await post(http, server.url, "/v1/chat/completions/batch",
                                    {"model": MODEL, "messages": conversations, "max_tokens": 5, "logprobs": True,
                                     "top_logprobs": 1}, headers={"X-Request-Id": "b"})
        after = await metric(http, server.url, "vllm:request_success_total")
        counts = [(await post(http, server.url, "/tokenize", {"messages": c}))[1]["count"] for c in conversations]
        refusals = [await post(http, server.url, "/v1/chat/completions/batch", body) for body in (
            {"messages": [HELLO], "n": 2}, {"messages": []}, {"messages": [HELLO], "use_beam_search": True})]
    assert status == 200 and answer["id"] == "chatcmpl-b" and answer["object"] == "chat.completion"
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2] and after - before == 3
    assert all(c["message"]["content"] and len(c["logprobs"]["content"]) <= 5 for c in answer["choices"])
    assert answer["usage"]["prompt_tokens"] == sum(counts)
    assert [s for s, _ in refusals] == [400, 400, 400]
    assert refusals[0][1]["error"]["message"] == ("Batch chat completions do not support `n > 1`. Please set `n` "
                                                  "to 1. (parameter=n, value=2)")
    assert refusals[1][1]["error"]["param"] == "body.messages"


# -- parity with vLLM's own classes --------------------------------------------------------------------
RENDER_CASES = [
    ("/v1/chat/completions/render", {"messages": HELLO, "max_tokens": 5}),
    ("/v1/chat/completions/render", {"messages": HELLO, "temperature": 0, "seed": 3, "stop": "abc", "n": 1,
                                     "logprobs": True, "top_logprobs": 2, "stream": True, "ignore_eos": True,
                                     "min_tokens": 2, "response_format": {"type": "json_object"}}),
    ("/v1/chat/completions/render", {"messages": HELLO, "max_completion_tokens": 9, "logit_bias": {"5": 200},
                                     "stop_token_ids": [7, 7, 8], "echo": True, "prompt_logprobs": 1,
                                     "kv_transfer_params": {"do_remote_decode": True}}),
    ("/v1/completions/render", {"prompt": "Hello world", "echo": True, "logprobs": 3, "stream": True}),
    ("/v1/completions/render", {"prompt": [[1, 2, 3], [4, 5]], "n": 2, "temperature": 0.001,
                                "structured_outputs": {"regex": "[a-z]+"}}),
    ("/v1/messages/render", {"model": MODEL, "messages": HELLO, "max_tokens": 6, "stop_sequences": ["x"], "top_k": 3,
                             "stream": True}),
    ("/v1/responses/render", {"input": "Hello there", "max_output_tokens": 7, "temperature": 0.2}),
    ("/v1/responses/render", {"input": "Hi", "include": ["message.output_text.logprobs"], "top_logprobs": 2,
                              "text": {"format": {"type": "json_object"}}, "kv_transfer_params": {"x": 1}}),
]
GENERATE_CASES = [
    {"token_ids": [128000, 9906], "sampling_params": {"max_tokens": 4, "logprobs": 1}, "return_token_ids": True},
    {"token_ids": [128000, 9906], "sampling_params": {"max_tokens": 4, "logprobs": 2, "prompt_logprobs": 1},
     "output_mode": "text"},
    {"token_ids": [128000, 9906], "sampling_params": {"max_tokens": 4, "n": 2}, "output_mode": "derender"},
    {"token_ids": [128000, 9906], "sampling_params": {"max_tokens": 4, "logprobs": 1}, "stream": True,
     "stream_options": {"include_usage": True, "continuous_usage_stats": True}, "return_token_ids": True},
    {"token_ids": [128000, 9906], "sampling_params": {"max_tokens": 3}, "stream": True, "output_mode": "text"},
]
ERROR_CASES = [
    ("/inference/v1/generate", {"token_ids": [1], "sampling_params": {"n": "x", "top_k": "y"}, "stream": "q"}),
    ("/inference/v1/generate", {"token_ids": [1], "sampling_params": {"output_kind": 7}}),
    ("/inference/v1/generate", {"token_ids": [1], "sampling_params": {"structured_outputs": {}}}),
    ("/inference/v1/generate", {"token_ids": [1], "sampling_params": {}, "priority": "x", "cache_salt": "a/b"}),
    ("/inference/v1/generate", {"sampling_params": {"max_tokens": 0}}),
    ("/inference/v1/generate", {"token_ids": [1], "sampling_params": {"min_tokens": 5, "max_tokens": 3}}),
    ("/v1/chat/completions/batch", {"messages": [[]]}),
    ("/v1/chat/completions/batch", {"messages": [HELLO], "logprob_token_ids": [1]}),
    ("/v1/completions/derender", {"generate_responses": [], "prompt_tokens": [1]}),
    ("/v1/chat/completions/derender", {"stream": True, "generate_chunk": {"choices": []},
                                       "stream_state": {"prev_tokens": ["a"] * 1025}}),
]


def _vllm_python() -> str:
    sys.path.insert(0, str(REPO / "bench"))
    from scheduler_diff import find_vllm_python
    python = find_vllm_python(None)
    if python is None:
        pytest.skip("no vLLM CPU venv ($VLLM_CPU_VENV, ../.vllm-cpu, /work/venvs/vllm-cpu)")
    return python


@pytest.mark.vllm
async def test_parity_with_vllms_scale_out_classes():
    python = _vllm_python()
    job: dict = {"render": [], "generate": [], "stream": [], "derender": [], "derender_stream": [], "batch": [],
                 "errors": []}
    ours_errors = []
    async with running_server(*SCALE_OUT) as server, aiohttp.ClientSession() as http:
        for path, body in RENDER_CASES:
            status, rendered = await post(http, server.url, path, body)
            assert status == 200, rendered
            for generate_request in rendered if isinstance(rendered, list) else [rendered]:
                job["render"].append({"path": path, "body": body, "ours": generate_request})
        for body in GENERATE_CASES:
            if body.get("stream"):
                events = await stream_events(http, server.url, "/inference/v1/generate", body)
                job["stream"].append({"mode": body.get("output_mode", "tokens"), "events": events[:-1]})
            else:
                status, answer = await post(http, server.url, "/inference/v1/generate", body)
                assert status == 200, answer
                job["generate"].append(answer)
        _, ids = await post(http, server.url, "/inference/v1/generate", GENERATE_CASES[0])
        for path, body in (("/v1/chat/completions/derender", {"generate_response": ids}),
                           ("/v1/completions/derender", {"generate_responses": [ids, ids], "prompt_tokens": [2, 2]})):
            status, answer = await post(http, server.url, path, body)
            assert status == 200, answer
            job["derender"].append({"kind": "chat" if "chat" in path else "completion", "answer": answer})
        chunk = next(e for e in job["stream"][0]["events"] if e["choices"])
        for path in ("/v1/chat/completions/derender", "/v1/completions/derender"):
            status, answer = await post(http, server.url, path, {"stream": True, "generate_chunk": chunk})
            assert status == 200, answer
            job["derender_stream"].append({"kind": "chat" if "chat" in path else "completion", "answer": answer})
        status, answer = await post(http, server.url, "/v1/chat/completions/batch", {"messages": [HELLO, HELLO]})
        job["batch"].append(answer)
        for path, body in ERROR_CASES:
            ours_errors.append(await post(http, server.url, path, body))
            job["errors"].append({"path": path, "body": body})
    done = subprocess.run([python, str(REPO / "tests" / "render_generate_vllm_side.py")], input=json.dumps(job),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    vllm = json.loads(done.stdout.strip().splitlines()[-1])
    for case, theirs in zip(job["render"], vllm["render"]):
        assert case["ours"]["sampling_params"] == theirs["sampling_params"], case
        assert case["ours"] == theirs["validated"], case  # vLLM's GenerateRequest reads it back unchanged
    assert vllm["generate"] == job["generate"]
    assert vllm["stream"] == [case["events"] for case in job["stream"]]
    assert vllm["derender"] == [case["answer"] for case in job["derender"]]
    assert vllm["derender_stream"] == [case["answer"] for case in job["derender_stream"]]
    assert vllm["batch"] == job["batch"]
    assert ours_errors == [tuple(e) for e in vllm["errors"]]
