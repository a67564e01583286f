"""What each tool parser does to a request (server/tool_parsers.py), without vLLM (test_tool_parsers_vllm.py
checks every parser against vLLM's own code): the structural tags of the parsers whose markup the emulator
writes, a forced call left in the model's own markup by a parser without one, a strict "auto" call joined with
the request's own structured output, special tokens kept, and Responses' `text`."""
from __future__ import annotations

import json
import logging

import aiohttp
import pytest

from server.errors import APIError
from server.protocol import ChatCompletionRequest
from server.sampling_params import from_chat
from server.serving import frontend_switches
from server.testing import running_server, serve_args
from server.tool_calls import forced_constraint, parser_adjustment
from server.tool_parsers import PARSERS, WRITTEN_TAGS

ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}
MUL = {"type": "function", "function": {"name": "mul", "strict": True, "parameters": {
    "type": "object", "properties": {"x": {"type": "number"}}}}}


def _adjust(parser: str, tools: list, choice, **extra) -> dict:
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], "tools": tools,
                                                "tool_choice": choice, **extra})
    return parser_adjustment(req, parser, forced_constraint(req), from_chat(req, 50).structured_outputs)


def _tag(update: dict) -> dict:
    return json.loads(update["structured_outputs"].structural_tag)["format"]


@pytest.mark.parametrize("parser", sorted(p for p, row in PARSERS.items() if row.tag in WRITTEN_TAGS))
def test_each_written_tag_holds_the_forced_calls_in_the_models_markup(parser):
    required = _tag(_adjust(parser, [ADD, MUL], "required"))
    named = _tag(_adjust(parser, [ADD, MUL], {"type": "function", "function": {"name": "mul"}}))
    dumped_required, dumped_named = json.dumps(required), json.dumps(named)
    assert "add" in dumped_required and "mul" in dumped_required
    assert "mul" in dumped_named and '"add' not in dumped_named
    if parser == "hy_v4":  # its arguments' keys in the tag, values free text, whatever the tool's strictness
        assert '"value": "<arg_key>"}, {"type": "const_string", "value": "a"}' in dumped_required
        return
    if parser == "kimi_k3":  # a strict tool's arguments typed one by one, the others' any
        assert 'argument key=\\"x\\" type=\\"number\\"' in dumped_required
        assert '"begin": "<|open|>argument "' in dumped_required
        return
    # a strict tool's arguments follow its schema, the others' are any JSON (GLM: their keys pinned)
    assert '"json_schema": {"type": "object", "properties": {"x"' in dumped_required
    assert '"json_schema": true' in dumped_required or "<arg_key>a</arg_key>" in dumped_required


def test_hermes_writes_each_call_with_and_without_newlines():
    format_ = _tag(_adjust("hermes", [ADD], "required"))
    assert format_["type"] == "tags_with_separator" and format_["at_least_one"] is True
    assert [t["begin"] for t in format_["tags"]] == ['<tool_call>\n{"name": "add", "arguments": ',
                                                     '<tool_call>{"name": "add", "arguments": ']


def test_deepseek_v31_wraps_its_calls_in_its_calls_block():
    format_ = _tag(_adjust("deepseek_v31", [ADD], {"type": "function", "function": {"name": "add"}}))
    assert format_["type"] == "tag"
    assert format_["begin"] == "<\uff5ctool\u2581calls\u2581begin\uff5c><\uff5ctool\u2581call\u2581begin\uff5c>add" \
                               "<\uff5ctool\u2581sep\uff5c>"
    assert format_["end"] == "<\uff5ctool\u2581call\u2581end\uff5c><\uff5ctool\u2581calls\u2581end\uff5c>"


def test_one_call_only_stops_every_list_of_calls_after_the_first():
    format_ = _tag(_adjust("minimax_m2", [ADD, MUL], "required", parallel_tool_calls=False))
    assert format_["type"] == "sequence" and format_["elements"][1]["stop_after_first"] is True
    auto = _tag(_adjust("qwen3_coder", [ADD], "auto", parallel_tool_calls=False))  # no strict tool, one call: a tag
    assert auto["type"] == "triggered_tags" and auto["stop_after_first"] is True and auto["at_least_one"] is False


def test_auto_with_a_strict_tool_and_its_own_output_gets_either():
    """vLLM's "or": the calls in their forced ("required") form, or the request's own structured output."""
    update = _adjust("hermes", [ADD, MUL], "auto", response_format={
        "type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}})
    either = _tag(update)
    assert either["type"] == "or"
    calls, own = either["elements"]
    assert calls["type"] == "tags_with_separator" and calls["at_least_one"] is True
    assert own == {"type": "json_schema", "json_schema": {"type": "object"}, "style": "json", "any_order": False,
                   "max_whitespace_cnt": None, "excludes": []}
    choice = _tag(_adjust("llama3_json", [MUL], "auto", structured_outputs={"choice": ["y", "n"]}))
    assert choice["elements"][1] == {"type": "or", "elements": [{"type": "const_string", "value": "y"},
                                                                {"type": "const_string", "value": "n"}]}


def test_auto_without_a_strict_tool_keeps_its_own_output():
    assert "structured_outputs" not in _adjust("hermes", [ADD], "auto", structured_outputs={"regex": "a+"})
    # one call only is no reason for a tag when the request has its own output
    assert "structured_outputs" not in _adjust("hermes", [ADD], "auto", structured_outputs={"regex": "a+"},
                                               parallel_tool_calls=False)


def test_a_parser_that_reads_forced_calls_in_its_own_markup_sets_no_schema():
    """supports_required_and_named False, no tag (muse, dots, ...): the request keeps its own structured output."""
    assert "structured_outputs" not in _adjust("dots", [ADD], "required")
    assert _adjust("muse", [ADD], "required") == {"skip_special_tokens": False}
    assert _adjust("pythonic", [ADD], "required")["structured_outputs"].json_["type"] == "array"


def test_a_tag_the_emulator_does_not_write_replaces_the_requests_output_with_none():
    assert _adjust("openai", [ADD], "required")["structured_outputs"] is None


def test_without_strict_tool_calling_tags_give_way_to_the_json_schema(monkeypatch):
    monkeypatch.setenv("VLLM_ENFORCE_STRICT_TOOL_CALLING", "0")
    assert _adjust("hermes", [ADD], "required")["structured_outputs"].json_["type"] == "array"
    assert "structured_outputs" not in _adjust("glm47", [ADD], "required")  # its class reads its own markup
    with pytest.raises(APIError, match="Named tool choice for Kimi K3 requires strict tool calling"):
        _adjust("kimi_k3", [ADD], {"type": "function", "function": {"name": "add"}})


def test_which_parsers_keep_special_tokens():
    assert _adjust("hermes", [ADD], "none") == {}
    assert _adjust("mimo", [ADD], "auto") == {"skip_special_tokens": False}
    assert _adjust("kimi_k3", [ADD], "auto") == {"skip_special_tokens": False, "spaces_between_special_tokens": False}
    assert _adjust("minimax_m3", [ADD], "auto") == {}


async def _post(server, path: str, body: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.post(server.url + path, json=body) as r:
        return r.status, await r.json()


async def test_a_parser_without_a_tag_that_reads_its_own_markup_keeps_the_responses_text():
    """muse: the forced call's request keeps its own `text` (no "tool_calling_response"); special tokens
    are kept (the render shows it); the call is still answered."""
    tool = {"type": "function", "name": "add", "parameters": ADD["function"]["parameters"]}
    async with running_server("--speed", "1000", "--enable-scale-out", "--enable-auto-tool-choice",
                              "--tool-call-parser", "muse") as server:
        status, body = await _post(server, "/v1/responses", {
            "input": "Add 2", "tools": [tool], "tool_choice": "required", "max_output_tokens": 100,
            "text": {"verbosity": "low"}})
        assert status == 200 and body["text"] == {"format": None, "verbosity": "low"}, body
        assert body["output"][0]["type"] == "function_call"
        status, rendered = await _post(server, "/v1/responses/render", {"input": "hi", "tools": [tool]})
        assert status == 200 and rendered["sampling_params"]["skip_special_tokens"] is False


LOGGER = "vllm.entrypoints.serve.utils.request_logger"


@pytest.mark.parametrize(("parser", "kept"), [("qwen3_coder", True), ("hermes", False)])
async def test_batch_chat_conversations_get_the_parsers_adjustment_with_a_reasoning_parser(caplog, parser, kept):
    """vLLM's batch chat renders each conversation through its parser, whose adjust_request runs there (tool_choice
    "none") only with a reasoning parser: a parser engine keeps special tokens whenever it runs, hermes only
    for a request with tools (deepseek_r1's reasoning parser keeps none itself)."""
    caplog.set_level(logging.INFO, LOGGER)
    async with running_server("--speed", "1000", "--enable-log-requests", "--reasoning-parser", "deepseek_r1",
                              "--enable-auto-tool-choice", "--tool-call-parser", parser) as server:
        status, _ = await _post(server, "/v1/chat/completions/batch", {
            "messages": [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]], "max_tokens": 2})
    assert status == 200
    received = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Received request chatcmpl-")]
    assert len(received) == 2
    assert all(f"skip_special_tokens={not kept}, " in line for line in received), received


async def test_a_reasoning_parser_that_keeps_special_tokens_keeps_them_without_a_tool_parser(caplog):
    caplog.set_level(logging.INFO, LOGGER)
    async with running_server("--speed", "1000", "--enable-log-requests", "--reasoning-parser", "kimi_k3") as server:
        status, _ = await _post(server, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "a"}], "max_tokens": 2})
    assert status == 200
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Received request chatcmpl-")]
    assert "skip_special_tokens=False, spaces_between_special_tokens=False, " in line


def test_the_tool_strict_level_is_read_and_checked_as_vllm_checks_it():
    assert frontend_switches(serve_args("--tool-strict-level", "function"))["tool_strict_level"] == "function"
    assert frontend_switches(serve_args("--tool-strict-level", "None"))["tool_strict_level"] is None
    with pytest.raises(ValueError, match="argument --tool-strict-level: invalid choice: 'strict'"):
        frontend_switches(serve_args("--tool-strict-level", "strict"))


def test_the_tool_strict_level_gives_auto_a_tag_and_pins_arguments():
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], "tools": [ADD]})
    assert "structured_outputs" not in parser_adjustment(req, "hermes", None, None)
    function = parser_adjustment(req, "hermes", None, None, strict_level="function")
    assert _tag(function)["type"] == "triggered_tags" and '"json_schema": true' in json.dumps(_tag(function))
    parameter = _tag(parser_adjustment(req, "hermes", None, None, strict_level="parameter"))
    assert parameter["tags"][0]["content"]["json_schema"] == ADD["function"]["parameters"]


async def test_a_server_with_a_tool_strict_level_renders_autos_tag():
    async with running_server("--speed", "1000", "--enable-scale-out", "--enable-auto-tool-choice",
                              "--tool-call-parser", "llama3_json", "--tool-strict-level", "function") as server:
        status, rendered = await _post(server, "/v1/chat/completions/render", {
            "messages": [{"role": "user", "content": "hi"}], "tools": [ADD]})
    assert status == 200
    tag = json.loads(rendered["sampling_params"]["structured_outputs"]["structural_tag"])
    assert tag["format"]["triggers"] == ['{"name": ']


def test_mistral_constrains_a_chats_forced_call_with_its_own_schema():
    """Its parser (with a tokenizer not Mistral's) sets its "arguments" array's schema on a chat's forced call,
    over a json response_format but not over the request's own structured_outputs."""
    schema = _adjust("mistral", [ADD, MUL], {"type": "function", "function": {"name": "mul"}},
                     response_format={"type": "json_object"})["structured_outputs"].json_
    assert schema["maxItems"] == 1 and schema["items"]["anyOf"][0]["properties"]["arguments"] == \
        MUL["function"]["parameters"]
    assert "structured_outputs" not in _adjust("mistral", [ADD], "required", structured_outputs={"regex": "a"})
