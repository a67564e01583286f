"""Chat completions of a gpt-oss model (server/harmony.py), as vLLM 0.33 answers them with Harmony: by the
parsers the server has (`--reasoning-parser openai_gptoss`, `--tool-call-parser openai`), streamed and not."""
from __future__ import annotations

import json

import aiohttp

from server.harmony import O200K_HARMONY
from server.testing import running_server

GPT_OSS = ("--model", "openai/gpt-oss-120b", "--max-model-len", "8192", "--speed", "1000")
PARSERS = ("--reasoning-parser", "openai_gptoss", "--enable-auto-tool-choice", "--tool-call-parser", "openai")
HI = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1500, "seed": 5}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}]
NAMED = {"type": "function", "function": {"name": "get_time"}}


async def _post(http, server, body: dict, path: str = "/v1/chat/completions"):
    async with http.post(server.url + path, json=body) as r:
        return r.status, (await r.json() if not body.get("stream") else await r.text())


def _deltas(text: str) -> list[dict]:
    chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    return [c for c in chunks if c["choices"]], chunks


async def test_reasoning_and_content_streamed_and_not_with_vllms_reasoning_tokens():
    async with running_server(*GPT_OSS, *PARSERS) as server:
        async with aiohttp.ClientSession() as http:
            status, full = await _post(http, server, {**HI, "return_token_ids": True})
            assert status == 200, full
            choice, usage = full["choices"][0], full["usage"]
            message, ids = choice["message"], choice["token_ids"]
            assert message["reasoning"] and message["content"] and "tool_calls" not in message
            assert "analysis" not in message["content"] and "<|" not in message["reasoning"] + message["content"]
            assert ids[0] == O200K_HARMONY["<|channel|>"] and len(ids) == usage["completion_tokens"]
            first, end = ids.index(O200K_HARMONY["<|message|>"]), ids.index(O200K_HARMONY["<|end|>"])
            assert usage["completion_tokens_details"] == {"reasoning_tokens": end - first - 1}
            assert choice["finish_reason"] == "stop"
            _, text = await _post(http, server, {**HI, "stream": True, "stream_options": {"include_usage": True}})
            with_choices, chunks = _deltas(text)
            deltas = [c["choices"][0]["delta"] for c in with_choices]
            kinds = [k for d in deltas[1:] for k in d if d[k]]
            assert kinds == sorted(kinds, key=lambda k: k != "reasoning")  # all reasoning first, then content
            assert "".join(d.get("reasoning") or "" for d in deltas) == message["reasoning"]
            assert "".join(d.get("content") or "" for d in deltas) == message["content"]
            # a chunk of header tokens alone says nothing: no chunk (the role chunk, then one per token said)
            assert len(deltas) == 1 + sum(1 for d in deltas[1:-1] if d) + 1
            assert chunks[-1]["usage"]["completion_tokens_details"] == usage["completion_tokens_details"]


async def test_forced_calls_come_from_the_commentary_channel():
    async with running_server(*GPT_OSS, *PARSERS) as server:
        async with aiohttp.ClientSession() as http:
            _, named = await _post(http, server, {**HI, "tools": TOOLS, "tool_choice": NAMED})
            choice = named["choices"][0]
            call, = choice["message"]["tool_calls"]
            assert call["function"]["name"] == "get_time" and call["id"].startswith("chatcmpl-tool-")
            arguments = call["function"]["arguments"]
            assert set(json.loads(arguments)) == {"zone"} and arguments == json.dumps(json.loads(arguments))
            assert choice["message"]["content"] == "" and choice["message"]["reasoning"]
            assert choice["finish_reason"] == "stop"  # a named tool keeps "stop"
            _, required = await _post(http, server, {**HI, "tools": TOOLS, "tool_choice": "required"})
            assert required["choices"][0]["finish_reason"] == "tool_calls"
            assert len(required["choices"][0]["message"]["tool_calls"]) == 1  # <|call|> ends the output
            _, text = await _post(http, server, {**HI, "tools": TOOLS, "tool_choice": NAMED, "stream": True})
            deltas = [c["choices"][0] for c in _deltas(text)[0]]
            calls = [t for d in deltas for t in d["delta"].get("tool_calls") or ()]
            assert calls[0]["function"] == {"name": "get_time", "arguments": ""}  # at the header's <|message|>
            assert all(set(t) == {"index", "function"} for t in calls[1:])
            assert json.loads("".join(t["function"]["arguments"] for t in calls)) == json.loads(arguments)
            assert deltas[-1]["finish_reason"] == "stop" and not any(d["delta"].get("content") for d in deltas)
            _, auto = await _post(http, server, {**HI, "tools": TOOLS, "tool_choice": "auto"})
            assert "tool_calls" not in auto["choices"][0]["message"]  # the simulated model answers in text


async def test_what_the_parsers_each_show():
    async with running_server(*GPT_OSS) as bare, \
            running_server(*GPT_OSS, "--enable-auto-tool-choice", "--tool-call-parser", "openai") as tools_only:
        async with aiohttp.ClientSession() as http:
            _, raw = await _post(http, bare, HI)
            message = raw["choices"][0]["message"]
            # no parser: the text, special tokens skipped
            assert message["content"].startswith("analysis") and "assistantfinal" in message["content"]
            assert message["reasoning"] is None and raw["usage"]["completion_tokens_details"] is None
            # Harmony needs no tool parser to take a forced tool choice (vLLM checks it only for other models)
            status, forced = await _post(http, bare, {**HI, "tools": TOOLS, "tool_choice": "required"})
            assert status == 200 and "tool_calls" not in forced["choices"][0]["message"]
            _, parsed = await _post(http, tools_only, HI)
            message = parsed["choices"][0]["message"]
            assert message["reasoning"] is None and message["content"] and "assistant" not in message["content"]
            assert parsed["usage"]["completion_tokens_details"] is None  # reported with a reasoning parser only


async def test_hidden_reasoning_and_vllms_refusals():
    async with running_server(*GPT_OSS, *PARSERS) as server:
        async with aiohttp.ClientSession() as http:
            _, hidden = await _post(http, server, {**HI, "include_reasoning": False, "logprobs": True,
                                                   "return_token_ids": True})
            choice = hidden["choices"][0]
            assert choice["message"]["reasoning"] is None and choice["message"]["content"]
            assert choice["logprobs"] is None and choice["token_ids"] is None
            _, text = await _post(http, server, {**HI, "include_reasoning": False, "stream": True})
            deltas = [c["choices"][0]["delta"] for c in _deltas(text)[0]]
            assert all(d.get("reasoning") is None for d in deltas) and any(d.get("content") for d in deltas)
            status, none = await _post(http, server, {**HI, "reasoning_effort": "none"})
            assert status == 400 and none["error"]["message"].startswith(
                "Harmony does not support reasoning_effort='none'")
            status, minimal = await _post(http, server, {**HI, "reasoning_effort": "minimal"})
            assert status == 400 and "is not supported by Harmony" in minimal["error"]["message"]
            assert (await _post(http, server, {**HI, "reasoning_effort": "high"}))[0] == 200


async def test_structured_output_is_the_final_message_after_the_analysis():
    async with running_server(*GPT_OSS, *PARSERS) as server, running_server(*GPT_OSS) as bare:
        async with aiohttp.ClientSession() as http:
            body = {**HI, "response_format": {"type": "json_object"}}
            _, full = await _post(http, server, body)
            message = full["choices"][0]["message"]
            assert message["reasoning"] and isinstance(json.loads(message["content"]), dict)
            _, raw = await _post(http, bare, body)  # no parser: vLLM constrains the whole output
            assert isinstance(json.loads(raw["choices"][0]["message"]["content"]), dict)


async def test_messages_api_gets_thinking_and_tool_use_blocks():
    async with running_server(*GPT_OSS, *PARSERS) as server:
        async with aiohttp.ClientSession() as http:
            body = {"model": "openai/gpt-oss-120b", "max_tokens": 1500, "messages": [{"role": "user", "content": "hi"}],
                    "tools": [{"name": "get_time", "input_schema": TOOLS[1]["function"]["parameters"]}],
                    "tool_choice": {"type": "tool", "name": "get_time"}}
            status, message = await _post(http, server, body, "/v1/messages")
            assert status == 200, message
            assert [b["type"] for b in message["content"]] == ["thinking", "tool_use"]
            assert set(message["content"][1]["input"]) == {"zone"}


async def test_a_messages_stream_gets_a_thinking_block_then_text():
    async with running_server(*GPT_OSS, *PARSERS) as server:
        async with aiohttp.ClientSession() as http:
            body = {"model": "openai/gpt-oss-120b", "max_tokens": 1500, "messages": [{"role": "user", "content": "hi"}],
                    "stream": True}
            _, text = await _post(http, server, body, "/v1/messages")
            events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
            starts = [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"]
            assert starts == ["thinking", "text"]
            deltas = [e["delta"] for e in events if e["type"] == "content_block_delta"]
            assert all("<|" not in (d.get("text") or d.get("thinking") or "") for d in deltas)
            assert not any("analysis" in (d.get("text") or "") for d in deltas)
