"""Chat tools as vLLM 0.33 handles them: the 400s of a server without a tool parser and of invalid
`tool_choice`s; with `--enable-auto-tool-choice --tool-call-parser`, forced calls answered with
`tool_calls` (streamed as vLLM's parser streams them); tools, tool calls and tool answers rendered
into the prompt as the Llama 3.1 and Qwen3 templates render them (checked against the templates
rendered with jinja2 when written; the expected strings below are theirs)."""
from __future__ import annotations

import json

import aiohttp
import pytest

from profiles.tokenizer import load_tokenizer
from server.chat import conversation
from server.serving import frontend_switches
from server.testing import running_server, serve_args

FAST = ("--speed", "1000")
TOOLS_ON = ("--enable-auto-tool-choice", "--tool-call-parser", "llama3_json")
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
TOOLS = [WEATHER, ADD]


async def post(http, url, body):
    async with http.post(url + "/v1/chat/completions", json=body) as r:
        return r.status, await r.json()


def check_arguments(name: str, arguments: str) -> None:
    args = json.loads(arguments)
    if name == "add":
        assert set(args) == {"a", "b"} and all(isinstance(v, int) for v in args.values())
    else:
        assert name == "get_weather" and isinstance(args["city"], str) and args["unit"] in ("c", "f")
        assert 1 <= args["days"] <= 7


@pytest.mark.parametrize("fields, message", [
    ({"tools": TOOLS}, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'),
    ({"tools": TOOLS, "tool_choice": "required"}, 'tool_choice="required" requires --tool-call-parser to be set'),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "add"}}},
     'tool_choice=function "add" requires --tool-call-parser to be set'),
    ({"tool_choice": "auto"}, "When using `tool_choice`, `tools` must be set. (parameter=tool_choice)"),
    ({"tools": TOOLS, "tool_choice": "bogus"},
     'Invalid value for `tool_choice`: bogus! Only named tools, "none", "auto" or "required" are supported. '
     "(parameter=tool_choice)"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "The tool specified in `tool_choice` does not match any of the specified `tools` (parameter=tool_choice)"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {}}},
     'Expected field `name` in `function` in `tool_choice`! Correct usage: `{"type": "function", "function": '
     '{"name": "my_function"}}` (parameter=tool_choice.function.name)'),
    ({"tools": TOOLS, "tool_choice": "required", "structured_outputs": {"json": {}},
      "response_format": None}, None),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "add"}},
      "structured_outputs": {"choice": ["a"]}},
     "You can only either use constraints for structured outputs or tools, not both."),
])
async def test_tool_choices_a_server_without_a_parser_refuses(fields, message):
    async with running_server(*FAST) as server:
        async with aiohttp.ClientSession() as http:
            status, body = await post(http, server.url, {"messages": USER, "max_tokens": 2, **fields})
    if message is None:  # "required" with a structured output: the tool-parser 400 still comes first
        message = 'tool_choice="required" requires --tool-call-parser to be set'
    assert status == 400 and body["error"]["message"] == message


async def test_tool_choice_none_renders_the_tools_and_answers_in_text():
    async with running_server(*FAST) as server:
        async with aiohttp.ClientSession() as http:
            _, plain = await post(http, server.url, {"messages": USER, "max_tokens": 2})
            status, body = await post(http, server.url, {"messages": USER, "max_tokens": 2, "tools": TOOLS,
                                                         "tool_choice": "none"})
    assert status == 200 and "tool_calls" not in body["choices"][0]["message"]
    assert body["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 100


async def test_forced_calls_return_tool_calls_valid_for_the_tool():
    async with running_server(*FAST, *TOOLS_ON) as server:
        async with aiohttp.ClientSession() as http:
            for seed in range(3):
                named = {"type": "function", "function": {"name": "get_weather"}}
                status, body = await post(http, server.url, {"messages": USER, "tools": TOOLS, "tool_choice": named,
                                                             "seed": seed, "max_tokens": 2000})
                assert status == 200, body
                choice = body["choices"][0]
                message = choice["message"]
                assert list(message) == ["role", "content", "refusal", "annotations", "audio", "function_call",
                                         "tool_calls", "reasoning"]
                assert message["content"] == "" and choice["finish_reason"] == "stop"  # a named tool: "stop"
                [call] = message["tool_calls"]
                assert call["id"].startswith("chatcmpl-tool-") and len(call["id"]) == len("chatcmpl-tool-") + 16
                assert call["type"] == "function" and call["function"]["name"] == "get_weather"
                check_arguments("get_weather", call["function"]["arguments"])
                status, body = await post(http, server.url, {"messages": USER, "tools": TOOLS,
                                                             "tool_choice": "required", "seed": seed,
                                                             "max_tokens": 2000})
                choice = body["choices"][0]
                assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == ""
                for call in choice["message"]["tool_calls"]:
                    check_arguments(call["function"]["name"], call["function"]["arguments"])
            # "auto": the model answers in text (no tool-call markup for the parser to find)
            _, body = await post(http, server.url, {"messages": USER, "tools": TOOLS, "max_tokens": 5,
                                                    "ignore_eos": True})
            assert "tool_calls" not in body["choices"][0]["message"] and body["choices"][0]["message"]["content"]
            # cut by max_tokens: no call can be read back, finish_reason stays "length"
            _, body = await post(http, server.url, {"messages": USER, "tools": TOOLS, "tool_choice": "required",
                                                    "max_tokens": 4})
            assert body["choices"][0]["finish_reason"] == "length"
            assert "tool_calls" not in body["choices"][0]["message"]


async def test_streamed_tool_calls_carry_the_same_arguments():
    async with running_server(*FAST, *TOOLS_ON) as server:
        async with aiohttp.ClientSession() as http:
            for choice_ in ("required", {"type": "function", "function": {"name": "add"}}):
                body = {"messages": USER, "tools": TOOLS, "tool_choice": choice_, "seed": 3, "max_tokens": 2000}
                _, full = await post(http, server.url, body)
                async with http.post(server.url + "/v1/chat/completions", json={**body, "stream": True}) as r:
                    raw = (await r.read()).decode()
                events = [json.loads(b[6:]) for b in raw.split("\n\n") if b.startswith("data: {")]
                assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
                arguments: dict[int, str] = {}
                names = {}
                for event in events[1:]:
                    for call in event["choices"][0]["delta"].get("tool_calls", []):
                        if "id" in call:
                            assert call["type"] == "function" and call["index"] not in names
                            names[call["index"]] = call["function"]["name"]
                        arguments[call["index"]] = arguments.get(call["index"], "") + call["function"]["arguments"]
                expected = full["choices"][0]["message"]["tool_calls"]
                assert [names[i] for i in sorted(names)] == [c["function"]["name"] for c in expected]
                assert [arguments[i] for i in sorted(arguments)] == [c["function"]["arguments"] for c in expected]
                assert events[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]


def test_enable_auto_tool_choice_needs_a_parser():
    with pytest.raises(ValueError, match="--enable-auto-tool-choice requires --tool-call-parser"):
        frontend_switches(serve_args("--enable-auto-tool-choice"))
    assert frontend_switches(serve_args(*TOOLS_ON))["enable_auto_tools"]
    # the negative spelling of a vLLM switch turns it off
    assert not frontend_switches(serve_args(*TOOLS_ON, "--disable-auto-tool-choice"))["enable_auto_tools"]
    assert not frontend_switches(serve_args("--no-trust-request-chat-template"))["trust_request_chat_template"]


TEMPLATE_TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}}}}}]
TOOL_TURNS = [{"role": "user", "content": "sum?"},
              {"role": "assistant", "content": None, "tool_calls": [
                  {"id": "1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}]},
              {"role": "tool", "tool_call_id": "1", "content": "1"}]


def test_llama_template_renders_tools_tool_calls_and_tool_answers():
    text = load_tokenizer(None, "llama3").render_chat(conversation(TOOL_TURNS), True, TEMPLATE_TOOLS)
    assert text == (
        '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\nCutting Knowledge '
        'Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n'
        'Given the following functions, please respond with a JSON for a function call with its proper arguments '
        'that best answers the given prompt.\n\nRespond in the format {"name": function name, "parameters": '
        'dictionary of argument name and its value}.Do not use variables.\n\n{\n    "type": "function",\n    '
        '"function": {\n        "name": "add",\n        "description": "Add",\n        "parameters": {\n            '
        '"type": "object",\n            "properties": {\n                "a": {\n                    "type": '
        '"integer"\n                }\n            }\n        }\n    }\n}\n\nsum?<|eot_id|><|start_header_id|>'
        'assistant<|end_header_id|>\n\n{"name": "add", "parameters": {"a": 1}}<|eot_id|><|start_header_id|>ipython'
        '<|end_header_id|>\n\n"1"<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n')


def test_qwen_template_renders_tools_tool_calls_and_tool_answers():
    text = load_tokenizer(None, "qwen3").render_chat(conversation(TOOL_TURNS), True, TEMPLATE_TOOLS)
    assert text == (
        '<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou '
        'are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{"type": "function", '
        '"function": {"name": "add", "description": "Add", "parameters": {"type": "object", "properties": {"a": '
        '{"type": "integer"}}}}}\n</tools>\n\nFor each function call, return a json object with function name and '
        'arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
        '<args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\nsum?<|im_end|>\n<|im_start|>assistant\n'
        '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call><|im_end|>\n<|im_start|>user\n'
        '<tool_response>\n1\n</tool_response><|im_end|>\n<|im_start|>assistant\n')


async def test_prompt_tokens_count_the_tools_and_tool_turns():
    async with running_server(*FAST, *TOOLS_ON) as server:
        async with aiohttp.ClientSession() as http:
            llama = load_tokenizer(None, "llama3")
            expected = len(llama.encode(llama.render_chat(conversation(TOOL_TURNS), True, TEMPLATE_TOOLS), False))
            _, body = await post(http, server.url, {"messages": TOOL_TURNS, "tools": TEMPLATE_TOOLS, "max_tokens": 1})
            assert body["usage"]["prompt_tokens"] == expected
            async with http.post(server.url + "/tokenize", json={"messages": TOOL_TURNS, "tools": TEMPLATE_TOOLS}) as r:
                assert (await r.json())["count"] == expected
            # a template's own refusal is a 400 with its reason
            status, body = await post(http, server.url, {"messages": [
                {"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [TOOL_TURNS[1]["tool_calls"][0]] * 2}], "max_tokens": 1})
            assert status == 400 and body["error"]["message"] == "This model only supports single tool-calls at once!"
