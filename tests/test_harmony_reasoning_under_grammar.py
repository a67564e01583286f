"""A structured output of a model that thinks (server/reasoning.py ThinkingFirst): vLLM's engine applies the
grammar only once the reasoning has ended (resolve_reasoning_ended), so the reply reasons first, unless the
request hides its reasoning (then the grammar holds from the first token) or the template turns thinking off."""
from __future__ import annotations

import json

import aiohttp

from server.testing import running_server

QWEN = ("--model", "Qwen/Qwen3-32B", "--max-model-len", "8192", "--speed", "1000", "--reasoning-parser", "qwen3")
JSON = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1500, "seed": 5,
        "response_format": {"type": "json_object"}}


async def _post(http, server, body: dict, path: str = "/v1/chat/completions"):
    async with http.post(server.url + path, json=body) as r:
        return r.status, (await r.json() if not body.get("stream") else await r.text())


async def test_a_thinking_model_reasons_before_its_structured_answer():
    async with running_server(*QWEN) as server:
        async with aiohttp.ClientSession() as http:
            status, full = await _post(http, server, JSON)
            assert status == 200, full
            message, usage = full["choices"][0]["message"], full["usage"]
            assert message["reasoning"] and isinstance(json.loads(message["content"]), dict)
            assert 0 < usage["completion_tokens_details"]["reasoning_tokens"] < usage["completion_tokens"]
            _, text = await _post(http, server, {**JSON, "stream": True})
            deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in text.splitlines()
                      if line.startswith("data: {")]
            assert "".join(d.get("reasoning") or "" for d in deltas) == message["reasoning"]
            assert "".join(d.get("content") or "" for d in deltas) == message["content"]
            _, budget = await _post(http, server, {**JSON, "thinking_token_budget": 6})
            assert budget["usage"]["completion_tokens_details"] == {"reasoning_tokens": 6}
            _, response = await _post(http, server, {"input": "hi", "max_output_tokens": 1500,
                                                     "text": {"format": {"type": "json_object"}}}, "/v1/responses")
            reasoning, answer = response["output"]
            assert reasoning["type"] == "reasoning" and isinstance(json.loads(answer["content"][0]["text"]), dict)


async def test_no_reasoning_where_the_grammar_holds_from_the_start():
    async with running_server(*QWEN) as server:
        async with aiohttp.ClientSession() as http:
            for extra in ({"include_reasoning": False}, {"chat_template_kwargs": {"enable_thinking": False}}):
                _, full = await _post(http, server, {**JSON, **extra})
                message = full["choices"][0]["message"]
                assert message["reasoning"] is None and isinstance(json.loads(message["content"]), dict)
                assert full["usage"]["completion_tokens_details"] == {"reasoning_tokens": 0}


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1500, "seed": 5, "tools": TOOLS,
        "tool_choice": "required"}


async def test_a_thinking_model_reasons_before_a_forced_call():
    async with running_server(*QWEN, "--enable-auto-tool-choice", "--tool-call-parser", "hermes") as server:
        async with aiohttp.ClientSession() as http:
            _, full = await _post(http, server, CALL)
            choice = full["choices"][0]
            message = choice["message"]
            call, = message["tool_calls"]
            assert message["reasoning"] and message["content"] == "" and choice["finish_reason"] == "tool_calls"
            assert list(message)[-2:] == ["tool_calls", "reasoning"]  # (vLLM's ChatMessage order)
            assert set(json.loads(call["function"]["arguments"])) == {"city"}
            usage = full["usage"]
            assert 0 < usage["completion_tokens_details"]["reasoning_tokens"] < usage["completion_tokens"]
            _, text = await _post(http, server, {**CALL, "stream": True})
            deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in text.splitlines()
                      if line.startswith("data: {")]
            kinds = [k for d in deltas[1:] for k in d if d[k]]
            assert kinds == sorted(kinds, key=lambda k: k != "reasoning")  # all reasoning first, then the call
            assert "".join(d.get("reasoning") or "" for d in deltas) == message["reasoning"]
            streamed = [c for d in deltas for c in d.get("tool_calls") or ()]
            assert json.loads("".join(c["function"]["arguments"] for c in streamed)) == \
                json.loads(call["function"]["arguments"])
            _, hidden = await _post(http, server, {**CALL, "include_reasoning": False})
            assert hidden["choices"][0]["message"]["reasoning"] is None
            assert hidden["choices"][0]["message"]["tool_calls"]  # the call from the first token
            tool = {"type": "function", "name": "get_weather", "parameters": TOOLS[0]["function"]["parameters"]}
            body = {"input": "hi", "max_output_tokens": 1500, "tool_choice": "required", "tools": [tool]}
            _, response = await _post(http, server, body, "/v1/responses")
            assert [item["type"] for item in response["output"]] == ["reasoning", "function_call"]
            _, text = await _post(http, server, {**body, "stream": True}, "/v1/responses")
            done = [json.loads(line[6:])["item"]["type"] for line in text.splitlines()
                    if line.startswith("data: ") and '"type":"response.output_item.done"' in line]
            assert done == ["reasoning", "function_call"]
