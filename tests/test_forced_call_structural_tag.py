"""Forced tool calls with a tool parser that has an xgrammar structural tag (hermes, llama3_json, qwen3_*, ...):
vLLM 0.33 constrains the call in the model's markup (parser/abstract_parser.py _apply_structural_tag), so a
Responses request's `text` becomes null and its response echoes it so; the call items read back are the same.
Parsers without one (pythonic, ...) keep the JSON-schema path (`text` becomes "tool_calling_response")."""
from __future__ import annotations

import json

import aiohttp
import pytest

from server.testing import running_server
from server.tool_calls import STRUCTURAL_TAG_PARSERS, forces_with_structural_tag

ADD = {"type": "function", "name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}


def _tools_on(parser: str) -> tuple[str, ...]:
    return ("--speed", "1000", "--enable-auto-tool-choice", "--tool-call-parser", parser)


async def _respond(server, body: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.post(server.url + "/v1/responses", json=body) as r:
        return r.status, await r.json()


def test_which_parsers_force_calls_with_their_structural_tag(monkeypatch):
    assert {"hermes", "llama3_json", "qwen3_json", "qwen3_coder", "openai"} <= STRUCTURAL_TAG_PARSERS
    assert forces_with_structural_tag("hermes") and not forces_with_structural_tag("pythonic")
    assert not forces_with_structural_tag(None)
    monkeypatch.setenv("VLLM_ENFORCE_STRICT_TOOL_CALLING", "0")  # vLLM's switch for the JSON-schema path
    assert not forces_with_structural_tag("hermes")


@pytest.mark.parametrize("parser", ["hermes", "llama3_json"])
@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "name": "add"}])
async def test_a_forced_call_echoes_text_null_with_a_structural_tag_parser(parser, tool_choice):
    async with running_server(*_tools_on(parser)) as server:
        # the request's own text config and structured outputs give way to the tag (no 400), as in vLLM
        status, body = await _respond(server, {
            "input": "Add 2 and 3", "tools": [ADD], "tool_choice": tool_choice, "max_output_tokens": 200,
            "text": {"verbosity": "low"}, "structured_outputs": {"json": {"type": "object"}}})
    assert status == 200 and body["text"] is None, body
    [item] = body["output"]
    assert item["type"] == "function_call" and item["name"] == "add"
    assert set(json.loads(item["arguments"])) == {"a", "b"}


async def test_auto_keeps_the_requests_text_with_a_structural_tag_parser():
    async with running_server(*_tools_on("hermes")) as server:
        status, body = await _respond(server, {"input": "Hi", "tools": [ADD], "tool_choice": "auto",
                                               "max_output_tokens": 3, "text": {"verbosity": "low"}})
    assert status == 200 and body["text"] == {"format": None, "verbosity": "low"}


async def test_without_a_structural_tag_the_forced_call_schema_is_echoed():
    async with running_server(*_tools_on("pythonic")) as server:
        status, body = await _respond(server, {"input": "Add 2 and 3", "tools": [ADD], "max_output_tokens": 200,
                                               "tool_choice": {"type": "function", "name": "add"}})
    assert status == 200 and body["text"]["format"]["name"] == "tool_calling_response"
    assert body["text"]["format"]["schema"] == ADD["parameters"]


CHAT_ADD = {"type": "function", "function": {"name": "add", "parameters": ADD["parameters"]}}


async def _render_chat(server, tool_choice, **extra) -> dict:
    body = {"messages": [{"role": "user", "content": "Add 2 and 3"}], "tools": [CHAT_ADD], "tool_choice": tool_choice,
            **extra}
    async with aiohttp.ClientSession() as http, \
            http.post(server.url + "/v1/chat/completions/render", json=body) as r:
        assert r.status == 200
        return (await r.json())["sampling_params"]["structured_outputs"]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "add"}}])
async def test_the_chat_render_shows_the_structural_tag_of_a_forced_call(tool_choice):
    """As vLLM's render (its request after the tool parser's adjust_request): the tag, as a JSON string, which
    overrides the request's own response_format; without a tag, the call's JSON schema."""
    async with running_server(*_tools_on("hermes"), "--enable-scale-out") as server:
        structured = await _render_chat(server, tool_choice, response_format={"type": "json_object"})
    assert structured["json"] is None and structured["json_object"] is None
    tag = json.loads(structured["structural_tag"])
    assert tag["type"] == "structural_tag" and tag["format"]["type"] == "tags_with_separator"
    assert [t["begin"] for t in tag["format"]["tags"]] == ['<tool_call>\n{"name": "add", "arguments": ',
                                                           '<tool_call>{"name": "add", "arguments": ']
    assert tag["format"]["stop_after_first"] is (tool_choice != "required")
    async with running_server(*_tools_on("pythonic"), "--enable-scale-out") as server:
        structured = await _render_chat(server, tool_choice)
    assert structured["structural_tag"] is None and structured["json"]


async def test_a_forced_chat_call_with_a_structural_tag_parser_is_still_answered_with_its_call():
    async with running_server(*_tools_on("hermes")) as server, aiohttp.ClientSession() as http:
        async with http.post(server.url + "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Add 2 and 3"}], "tools": [CHAT_ADD], "max_tokens": 200,
                "tool_choice": {"type": "function", "function": {"name": "add"}}}) as r:
            body = await r.json()
    [call] = body["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "add" and set(json.loads(call["function"]["arguments"])) == {"a", "b"}
