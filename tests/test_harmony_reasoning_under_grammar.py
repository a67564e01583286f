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
