"""The Anthropic Messages API (/v1/messages, /v1/messages/count_tokens) as vLLM 0.33 serves it: with the
official `anthropic` SDK; the event stream's order and fields; token counts equal to /tokenize of the
rendered chat; errors before the handler in vLLM's OpenAI shape and after it in Anthropic's; the API key;
a client that leaves frees its blocks; the metrics count the requests. The parity test (vLLM's CPU venv,
skipped without it) checks the conversion to a chat request and every answer byte for byte against
vLLM's own converters applied to the emulator's chat answers."""
from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from server.messages_protocol import AnthropicCountTokensRequest, AnthropicMessagesRequest
from server.messages_request import to_chat_request
from server.testing import free_port, running_server
import front_door

MODEL = "meta-llama/Llama-3.1-8B"
FAST = ("--speed", "1000")
TOOLS_ON = ("--enable-auto-tool-choice", "--tool-call-parser", "llama3_json")
HELLO = [{"role": "user", "content": "Hello there"}]
WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
ADD = {"name": "add", "input_schema": {"properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                                       "required": ["a", "b"]}}
REPO = Path(__file__).resolve().parents[1]


async def post(http: aiohttp.ClientSession, url: str, body, path: str = "/v1/messages", **kwargs):
    async with http.post(url + path, json=body, **kwargs) as r:
        return r.status, await r.json()


def events_of(raw: str) -> list[tuple[str, dict]]:
    """An Anthropic SSE body as (event name, data) pairs, checking each event's framing."""
    out = []
    for block in raw.split("\n\n")[:-1]:
        name, data = block.split("\n")
        assert name.startswith("event: ") and data.startswith("data: ")
        out.append((name[len("event: "):], json.loads(data[len("data: "):])))
    assert raw.endswith("\n\n")
    return out


async def stream(http: aiohttp.ClientSession, url: str, body: dict) -> list[tuple[str, dict]]:
    async with http.post(url + "/v1/messages", json={**body, "stream": True}) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        return events_of((await r.read()).decode())


# -- the SDK ---------------------------------------------------------------------------------------
async def test_the_anthropic_sdk_creates_streams_and_counts():
    anthropic = pytest.importorskip("anthropic")
    async with running_server(*FAST) as server:
        client = anthropic.AsyncAnthropic(base_url=server.url, api_key="unused", max_retries=0)
        try:
            message = await client.messages.create(model=MODEL, max_tokens=8, messages=HELLO, system="Be brief.")
            assert message.id.startswith("chatcmpl-") and message.type == "message" and message.role == "assistant"
            assert message.model == MODEL and [block.type for block in message.content] == ["text"]
            assert message.stop_reason in ("end_turn", "max_tokens") and message.stop_sequence is None
            counted = await client.messages.count_tokens(model=MODEL, messages=HELLO, system="Be brief.")
            assert message.usage.input_tokens == counted.input_tokens > 0
            assert 0 < message.usage.output_tokens <= 8

            async with client.messages.stream(model=MODEL, max_tokens=6, messages=HELLO) as events:
                kinds = [event.type async for event in events]
                final = await events.get_final_message()
            assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
            assert final.content[0].text and final.usage.output_tokens <= 6
            assert final.stop_reason in ("end_turn", "max_tokens")

            with pytest.raises(anthropic.NotFoundError) as refused:
                await client.messages.create(model="nope", max_tokens=4, messages=HELLO)
            assert refused.value.body == {"type": "error", "error": {
                "type": "not_found_error", "message": f"The model `nope` does not exist. Valid aliases: {MODEL}."}}
        finally:
            await client.close()


# -- the message and its stream ----------------------------------------------------------------------
async def test_a_message_has_vllms_fields_and_usage():
    async with running_server(*FAST) as server:
        async with aiohttp.ClientSession() as http:
            status, body = await post(http, server.url, {"model": MODEL, "max_tokens": 5, "messages": HELLO},
                                      headers={"X-Request-Id": "abc"})
            _, tokenized = await post(http, server.url, {"model": MODEL, "messages": HELLO}, "/tokenize")
    assert status == 200 and list(body) == ["id", "type", "role", "content", "model", "stop_reason", "usage"]
    assert body["id"] == "chatcmpl-abc"  # vLLM keeps the chat response's id (no msg_ id)
    assert body["usage"] == {"input_tokens": tokenized["count"], "output_tokens": body["usage"]["output_tokens"]}
    assert body["content"] == [{"type": "text", "text": body["content"][0]["text"]}] and body["content"][0]["text"]
    assert body["stop_reason"] == ("max_tokens" if body["usage"]["output_tokens"] == 5 else "end_turn")


async def test_the_stream_sends_vllms_events_in_order():
    async with running_server(*FAST) as server:
        async with aiohttp.ClientSession() as http:
            events = await stream(http, server.url, {"model": MODEL, "max_tokens": 7, "messages": HELLO,
                                                     "system": [{"type": "text", "text": "Be brief."}]})
            _, tokenized = await post(http, server.url, {"model": MODEL, "messages": [
                {"role": "system", "content": "Be brief."}, *HELLO]}, "/tokenize")
    names = [name for name, _ in events]
    deltas = len(names) - 5
    assert names == ["message_start", "content_block_start", *["content_block_delta"] * deltas,
                     "content_block_stop", "message_delta", "message_stop"] and deltas >= 1
    assert all(data["type"] == name for name, data in events)  # the event line names the data's type
    start = events[0][1]["message"]
    assert start == {"id": start["id"], "type": "message", "role": "assistant", "content": [], "model": MODEL,
                     "stop_reason": None, "stop_sequence": None,
                     "usage": {"input_tokens": tokenized["count"], "output_tokens": 0}}
    assert events[1][1] == {"type": "content_block_start", "content_block": {"type": "text", "text": ""}, "index": 0}
    for _, data in events[2:2 + deltas]:
        assert list(data) == ["type", "delta", "index"] and data["index"] == 0 and data["delta"]["text"]
        assert data["delta"]["type"] == "text_delta"
    assert events[-3][1] == {"type": "content_block_stop", "index": 0}
    end = events[-2][1]
    assert end["delta"] == {"stop_reason": "max_tokens" if deltas == 7 else "end_turn", "stop_sequence": None}
    assert end["usage"] == {"input_tokens": tokenized["count"], "output_tokens": deltas}
    assert events[-1][1] == {"type": "message_stop"}


async def test_a_stop_sequence_ends_the_message_and_is_named():
    async with running_server(*FAST) as server:
        async with aiohttp.ClientSession() as http:
            body = {"model": MODEL, "max_tokens": 300, "messages": HELLO, "stop_sequences": [",", ".", " the"]}
            answers = [await post(http, server.url, body) for _ in range(4)]
            streamed = await stream(http, server.url, body)
    stopped = [a for _, a in answers if a["stop_reason"] == "stop_sequence"]
    assert stopped  # short common words: most replies hold one
    for answer in stopped:
        assert answer["stop_sequence"] in body["stop_sequences"]
        assert not any(s in answer["content"][0]["text"] for s in body["stop_sequences"])
    for _, answer in answers:
        assert answer["stop_reason"] in ("stop_sequence", "end_turn") and ("stop_sequence" in answer) == (
            answer["stop_reason"] == "stop_sequence")
    delta = streamed[-2][1]["delta"]
    assert delta["stop_reason"] in ("stop_sequence", "end_turn")
    assert (delta["stop_sequence"] in body["stop_sequences"]) == (delta["stop_reason"] == "stop_sequence")


async def test_a_forced_tool_is_a_tool_use_block():
    async with running_server(*FAST, *TOOLS_ON) as server:
        async with aiohttp.ClientSession() as http:
            body = {"model": MODEL, "max_tokens": 2000, "messages": HELLO, "tools": [WEATHER, ADD],
                    "tool_choice": {"type": "tool", "name": "add"}}
            status, answer = await post(http, server.url, body)
            events = await stream(http, server.url, body)
            _, auto = await post(http, server.url, {**body, "tool_choice": {"type": "auto"}})
            _, missing = await post(http, server.url, {**body, "tool_choice": {"type": "tool", "name": "nope"}})
            _, no_tools = await post(http, server.url, {"model": MODEL, "max_tokens": 9, "messages": HELLO,
                                                        "tool_choice": {"type": "any"}})
    assert status == 200 and answer["stop_reason"] == "tool_use" and len(answer["content"]) == 1
    block = answer["content"][0]
    assert list(block) == ["type", "id", "name", "input"] and block["type"] == "tool_use" and block["name"] == "add"
    assert block["id"].startswith("chatcmpl-tool-") and set(block["input"]) == {"a", "b"}
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "content_block_start"] and names[-3:] == [
        "content_block_stop", "message_delta", "message_stop"]
    start = events[1][1]["content_block"]
    assert start == {"type": "tool_use", "id": start["id"], "name": "add", "input": {}}
    arguments = "".join(data["delta"]["partial_json"] for name, data in events if name == "content_block_delta")
    assert set(json.loads(arguments)) == {"a", "b"}
    assert events[-2][1]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert [b["type"] for b in auto["content"]] == ["text"]  # "auto": the synthetic model answers in text
    assert missing == {"type": "error", "error": {"type": "invalid_request_error",
                                                  "message": "Tool 'nope' has not been passed in `tools`."}}
    assert no_tools == {"type": "error", "error": {"type": "invalid_request_error",
                                                   "message": "When using `tool_choice`, `tools` must be set."}}


# -- token counts ---------------------------------------------------------------------------------------
async def test_count_tokens_is_the_tokenized_rendered_chat():
    conversation = [{"role": "user", "content": "What is the weather in Paris?"},
                    {"role": "assistant", "content": [{"type": "text", "text": "Let me look."}]},
                    {"role": "user", "content": [{"type": "text", "text": "Thanks!"}]}]
    async with running_server(*FAST) as server:
        async with aiohttp.ClientSession() as http:
            status, counted = await post(http, server.url, {
                "model": MODEL, "system": "You are terse.", "messages": conversation, "tools": [WEATHER],
                "tool_choice": {"type": "none"}}, "/v1/messages/count_tokens")
            tool = {"type": "function", "function": {"name": WEATHER["name"], "description": WEATHER["description"],
                                                     "parameters": WEATHER["input_schema"]}}
            _, tokenized = await post(http, server.url, {"model": MODEL, "tools": [tool], "messages": [
                {"role": "system", "content": "You are terse."}, conversation[0],
                {"role": "assistant", "content": "Let me look."}, {"role": "user", "content": "Thanks!"}]},
                "/tokenize")
            _, refused = await post(http, server.url, {"model": MODEL, "messages": HELLO, "tools": [WEATHER]},
                                    "/v1/messages/count_tokens")
    assert status == 200 and counted == {"input_tokens": tokenized["count"],
                                         "context_management": {"original_input_tokens": tokenized["count"]}}
    # tools alone mean tool_choice "auto", which vLLM refuses without a tool parser (a count too)
    assert refused == {"type": "error", "error": {"type": "invalid_request_error", "message": (
        '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set')}}


# -- errors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, message", [
    ({"model": MODEL, "messages": HELLO},
     "1 validation error:\n  {'type': 'missing', 'loc': 'body.max_tokens', 'msg': 'Field required', "
     "'input': '<dict of 2 items>'}"),
    ({"model": MODEL, "max_tokens": 3, "messages": [{"role": "bot", "content": "hi"}]},
     "1 validation error:\n  {'type': 'literal_error', 'loc': 'body.messages.0.role', 'msg': \"Input should be "
     "'user', 'assistant' or 'system'\", 'input': 'bot', 'ctx': {'expected': \"'user', 'assistant' or 'system'\"}}"),
    ({"model": MODEL, "max_tokens": 0, "messages": HELLO},
     "1 validation error:\n  {'type': 'value_error', 'loc': 'body.max_tokens', 'msg': 'Value error, max_tokens must "
     "be positive', 'input': '0', 'ctx': {'error': ValueError('max_tokens must be positive')}}"),
])
async def test_a_body_that_fails_validation_gets_vllms_openai_shaped_400(body, message):
    async with running_server(*FAST) as server:
        async with aiohttp.ClientSession() as http:
            status, answer = await post(http, server.url, body)
            async with http.post(server.url + "/v1/messages", data=b'{"model": ',
                                 headers={"Content-Type": "application/json"}) as r:
                not_json = r.status, await r.json()
    assert status == 400 and answer["error"]["message"] == message and answer["error"]["type"] == "Bad Request"
    assert not_json[0] == 400 and not_json[1]["error"]["message"].startswith(
        "1 validation error:\n  {'type': 'json_invalid', 'loc': 'body.10', 'msg': 'JSON decode error'")


@pytest.mark.parametrize("body, status, message", [
    ({"model": MODEL, "max_tokens": 200_000, "messages": HELLO}, 400,
     "max_completion_tokens=200000 cannot be greater than max_model_len=131072. Please request fewer output tokens. "
     "(parameter=max_completion_tokens, value=200000)"),
    ({"model": MODEL, "max_tokens": 4000, "messages": HELLO, "thinking": {"type": "enabled", "budget_tokens": 2000}},
     400, "thinking_token_budget is set but reasoning_config is not configured. Please set --reasoning-parser and/or "
          "--reasoning-config to use thinking_token_budget."),
    ({"model": MODEL, "max_tokens": 4, "messages": HELLO, "tools": [WEATHER], "tool_choice": {"type": "any"}}, 400,
     'tool_choice="required" requires --tool-call-parser to be set'),
    ({"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}]}]}, 400,
     "The simulated model takes text only; messages[0] has a content part of type 'image_url'. (parameter=messages)"),
    ({"model": "other", "max_tokens": 4, "messages": HELLO}, 404,
     f"The model `other` does not exist. Valid aliases: {MODEL}."),
])
async def test_errors_after_validation_are_answered_in_anthropics_shape(body, status, message):
    kinds = {400: "invalid_request_error", 404: "not_found_error"}
    async with running_server(*FAST) as server:
        async with aiohttp.ClientSession() as http:
            answers = [await post(http, server.url, {**body, "stream": streamed}) for streamed in (False, True)]
    for answer in answers:
        assert answer == (status, {"type": "error", "error": {"type": kinds[status], "message": message}})


async def test_the_api_key_is_a_bearer_token_as_in_vllm():
    async with running_server(*FAST, "--api-key", "sk-test") as server:
        async with aiohttp.ClientSession() as http:
            body = {"model": MODEL, "max_tokens": 2, "messages": HELLO}
            x_api_key = await post(http, server.url, body, headers={"x-api-key": "sk-test"})
            bearer = await post(http, server.url, body, headers={"Authorization": "Bearer sk-test"})
            count = await post(http, server.url, {"model": MODEL, "messages": HELLO}, "/v1/messages/count_tokens",
                               headers={"Authorization": "Bearer sk-test"})
    assert x_api_key == (401, {"error": "Unauthorized"})  # vLLM's middleware reads Authorization only
    assert bearer[0] == 200 and count[0] == 200


# -- the engine's side ------------------------------------------------------------------------------------
async def test_a_request_whose_instance_fails_gets_anthropics_api_error(tmp_path, dev_mode):
    cluster = front_door.cluster_file(tmp_path, f"""
engine: {{max-model-len: 4096}}
instances:
  - {{name: a, model: {MODEL}, served_model_name: m, hardware: H100, port: {free_port()}}}
""")
    async with running_server("--cluster", cluster, "--speed", "5") as server, aiohttp.ClientSession() as http:
        body = {"model": "m", "max_tokens": 3000, "messages": HELLO}
        plain = asyncio.ensure_future(post(http, server.url, body))
        async with http.post(server.url + "/v1/messages", json={**body, "stream": True}) as r:
            while sum(1 for request in server.engine.sim.active.values() if request.num_output_tokens) < 2:
                await asyncio.sleep(0.01)
            async with http.post(server.url + "/emulator/instances/a/fail") as failed:
                assert (await failed.json())["failed_requests"] == 2
            events = events_of((await r.read()).decode())
        status, answer = await plain
    error = {"type": "error", "error": {"type": "api_error", "message": "Internal server error"}}
    assert (status, answer) == (500, error)
    # vLLM's converter stops the open block, sends the error and ends there (no message_delta, no message_stop)
    assert [name for name, _ in events[-2:]] == ["content_block_stop", "error"] and events[-1][1] == error


async def test_shutdown_ends_a_stream_with_no_stop_reason():
    async with running_server("--speed", "1") as server, aiohttp.ClientSession() as http:
        body = {"model": MODEL, "max_tokens": 100_000, "messages": HELLO, "stream": True}
        async with http.post(server.url + "/v1/messages", json=body) as r:
            raw = b""
            while b"content_block_delta" not in raw:
                raw += await r.content.readany()
            await server.running.shutdown(0)
            events = events_of((raw + await r.read()).decode())
    assert [name for name, _ in events[-3:]] == ["content_block_stop", "message_delta", "message_stop"]
    assert events[-2][1]["delta"] == {"stop_reason": None, "stop_sequence": None}  # vLLM's answer to "abort"


async def test_a_client_that_leaves_a_stream_frees_its_blocks():
    async with running_server("--speed", "5") as server:
        async with aiohttp.ClientSession() as http:
            body = {"model": MODEL, "max_tokens": 5000, "messages": HELLO, "stream": True}
            response = await http.post(server.url + "/v1/messages", json=body)
            async for _ in response.content.iter_any():
                break
            response.close()
            for _ in range(2000):  # the server notices the disconnect on its next loop turn (a busy machine: later)
                if server.engine.num_unfinished == 0:
                    break
                await asyncio.sleep(0.01)
        engine = server.engine.sim.engines[0]
        result = server.engine.num_unfinished, engine.num_running, engine.kv.usage
    assert result == (0, 0, 0)


async def test_the_metrics_and_load_count_messages():
    async with running_server(*FAST, "--enable-server-load-tracking") as server:
        async with aiohttp.ClientSession() as http:
            body = {"model": MODEL, "max_tokens": 3, "messages": HELLO}
            await post(http, server.url, body)
            await stream(http, server.url, body)
            await post(http, server.url, {"model": MODEL, "messages": HELLO}, "/v1/messages/count_tokens")
            async with http.get(server.url + "/load") as r:
                load = await r.json()
            async with http.get(server.url + "/metrics") as r:
                metrics = await r.text()
    assert load == {"server_load": 0}
    assert 'http_requests_total{handler="/v1/messages",method="POST",status="2xx"} 2.0' in metrics
    assert 'http_requests_total{handler="/v1/messages/count_tokens",method="POST",status="2xx"} 1.0' in metrics
    served = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                 if line.startswith("vllm:request_success_total{"))
    assert served == 2


# -- parity with vLLM's own converters --------------------------------------------------------------------
PARITY_CASES = [  # each sent streamed and not, with --enable-prompt-tokens-details and a tool parser
    {"model": MODEL, "max_tokens": 6, "messages": HELLO},
    {"model": MODEL, "max_tokens": 300, "messages": HELLO, "stop_sequences": [",", " the"], "temperature": 0.5,
     "system": "Be brief.", "metadata": {"user_id": "u1"}, "top_k": 5, "top_p": 0.9},
    {"model": MODEL, "max_tokens": 12, "system": [
        {"type": "text", "text": "x-anthropic-billing-header: abc123"}, {"type": "text", "text": "You help. "},
        {"type": "text", "text": "Kindly."}], "messages": [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "Add them.", "signature": "s"},
                                          {"type": "text", "text": "Let me add."},
                                          {"type": "tool_use", "id": "toolu_1", "name": "add",
                                           "input": {"a": 2, "b": 3}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [
            {"type": "text", "text": "5"}]}, {"type": "text", "text": "So?"}]},
        {"role": "system", "content": "Answer in words."}],
     "tools": [ADD], "tool_choice": {"type": "none"}},
    {"model": MODEL, "max_tokens": 2000, "messages": HELLO, "tools": [WEATHER, ADD],
     "tool_choice": {"type": "tool", "name": "get_weather"}},
    {"model": MODEL, "max_tokens": 2000, "messages": HELLO, "tools": [WEATHER, ADD],
     "tool_choice": {"type": "any", "disable_parallel_tool_use": True}},
    {"model": MODEL, "max_tokens": 200, "messages": HELLO, "thinking": {"type": "disabled"}, "output_config": {
        "effort": "high", "format": {"type": "json_schema", "schema": {
            "type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}}}},
]
CONVERSION_ONLY = [  # converted, not run (images and tool changes: the emulator refuses images)
    {"model": MODEL, "max_tokens": 5, "messages": [
        {"role": "system", "content": [{"type": "tool_addition", "tool": {"type": "tool_definition", "definition": {
            "name": "late", "input_schema": {"type": "object"}}}},
            {"type": "tool_removal", "tool": {"type": "tool_reference", "name": "add"}}]},
        {"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                  "data": "AAAA"}},
                                     {"type": "tool_result", "tool_use_id": "t", "content": [
                                         {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}},
                                         {"type": "tool_reference", "tool_name": "late"}]}]},
        {"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "late"},
                                          {"type": "redacted_thinking", "data": "zz"}]}],
     "tools": [ADD], "tool_choice": {"type": "auto"}},
]
BAD_BODIES = [
    {"model": "", "max_tokens": 1, "messages": []},
    {"model": MODEL, "max_tokens": "many", "messages": [{"role": "user", "content": [{"type": "video"}]}]},
    {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "tool_addition"}]}]},
    {"model": MODEL, "max_tokens": 5, "messages": HELLO, "tool_choice": {"type": "tool"},
     "stop_sequences": ["a", "b", "c", "d", "e"]},
    {"model": MODEL, "max_tokens": 5, "messages": HELLO, "thinking": {"type": "enabled", "budget_tokens": 100}},
    {"model": MODEL, "max_tokens": 2000, "messages": HELLO, "thinking": {"type": "enabled", "budget_tokens": 2000}},
    {"model": MODEL, "max_tokens": 5, "messages": HELLO, "system": [{"type": "tool_removal", "tool": {
        "type": "tool_definition", "definition": {"name": "a", "input_schema": {}}}}], "cache_salt": ""},
    {"messages": HELLO, "tools": [{"name": "t"}], "output_config": {"effort": "huge"}},
]
TOOL_CALL_ID = re.compile(r"chatcmpl-tool-[0-9a-f]{16}")


def _chat_body(serving, anthropic_body: dict) -> dict:
    """Our chat request for an Anthropic body, as the chat endpoint takes it."""
    return to_chat_request(serving, AnthropicMessagesRequest.model_validate(anthropic_body)).model_dump(
        mode="json", exclude_unset=True, by_alias=True)


def _conversion(chat: dict) -> dict:
    """The fields of a chat request the conversion sets, written alike for vLLM's and ours."""
    keys = ("messages", "model", "max_tokens", "max_completion_tokens", "stop", "stream", "stream_options",
            "temperature", "top_p", "top_k", "response_format", "reasoning_effort", "thinking_token_budget",
            "tool_choice", "parallel_tool_calls", "chat_template_kwargs", "cache_salt", "kv_transfer_params")
    out = {k: chat[k] for k in keys if chat.get(k) is not None}
    if chat.get("tools") is not None:
        out["tools"] = [{"type": "function", "function": {k: v for k, v in t["function"].items() if v is not None}}
                        for t in chat["tools"]]
    return out


@pytest.mark.vllm
async def test_parity_with_vllms_anthropic_converters():
    sys.path.insert(0, str(REPO / "bench"))
    from scheduler_diff import find_vllm_python
    python = find_vllm_python(None)
    if python is None:
        pytest.skip("no vLLM CPU venv ($VLLM_CPU_VENV, ../.vllm-cpu, /work/venvs/vllm-cpu)")
    flags = (*FAST, *TOOLS_ON, "--enable-prompt-tokens-details")
    chat_answers, messages_answers, ours = [], [], []
    async with running_server(*flags) as chat_server, running_server(*flags) as messages_server:
        serving = chat_server.running.servings[0]
        async with aiohttp.ClientSession() as http:
            for i, case in enumerate(PARITY_CASES):  # the same requests in the same order: the same outputs
                for streamed in (False, True):
                    body = {**case, "stream": streamed}
                    ours.append(_chat_body(serving, body))
                    headers = {"X-Request-Id": f"case{i}"}
                    async with http.post(chat_server.url + "/v1/chat/completions", json=ours[-1],
                                         headers=headers) as r:
                        assert r.status == 200, await r.text()
                        chat_answers.append((await r.text()) if streamed else await r.json())
                    async with http.post(messages_server.url + "/v1/messages", json=body, headers=headers) as r:
                        assert r.status == 200, await r.text()
                        messages_answers.append(await r.text())
            converted_only = [_chat_body(serving, case) for case in CONVERSION_ONLY]
            ours_bad = []
            for body in BAD_BODIES:
                for model in (AnthropicMessagesRequest, AnthropicCountTokensRequest):
                    try:
                        model.model_validate(body)
                        ours_bad.append(None)
                    except Exception as exc:
                        ours_bad.append([{"type": e["type"], "loc": list(e["loc"]), "msg": e["msg"]}
                                         for e in exc.errors()])
    cases = [{**case, "stream": streamed} for case in PARITY_CASES for streamed in (False, True)]
    job = {"convert": [{"body": body, "effort": "low"} for body in cases + CONVERSION_ONLY],
           "full": [a for a in chat_answers if isinstance(a, dict)],
           "stream": [a for a in chat_answers if isinstance(a, str)],
           "schema": [{"body": body, "count": count} for body in BAD_BODIES for count in (False, True)]}
    done = subprocess.run([python, str(REPO / "tests" / "messages_vllm_side.py")], input=json.dumps(job),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    vllm = json.loads(done.stdout.strip().splitlines()[-1])
    assert [_conversion(c) for c in ours + converted_only] == [_conversion(c) for c in vllm["convert"]]
    assert ours_bad == vllm["schema"]
    full = iter(vllm["full"])
    streams = iter(vllm["stream"])
    for body, answer in zip(cases, messages_answers):
        expected = next(streams) if body["stream"] else json.dumps(next(full), ensure_ascii=False,
                                                                   separators=(",", ":"))
        assert TOOL_CALL_ID.sub("ID", answer) == TOOL_CALL_ID.sub("ID", expected), body
