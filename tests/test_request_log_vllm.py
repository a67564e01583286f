"""--enable-log-requests' lines against vLLM 0.33's own (the CPU venv, run as a subprocess; skipped without it):
for chat, completion and Responses bodies, the string vLLM's SamplingParams.__repr__ gives for the params its
route builds equals the emulator's (a chat's or a Responses request's after its tool parser's adjust_request: a
forced call's structured output, a structural tag or the call's JSON schema, an "auto" one's tag with a strict tool
or a single call; special tokens kept), and vLLM's RequestLogger writes the emulator's lines."""
from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

from server.generation_config import SamplingDefaults

import pytest

from server.chat import chat_params
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.request_log import RequestLogger, sampling_params_repr
from server.responses_input import template_tools
from server.responses_protocol import ResponsesRequest
from server.responses_tools import forced_calls, responses_params
from server.sampling_params import from_responses
from server.serving import logged_params
from server.tool_calls import forced_constraint
from vllm_venv import run_vllm_side, vllm_python_or_skip

LOGGER = "vllm.entrypoints.serve.utils.request_logger"
VLLM_SIDE = Path(__file__).resolve().parent / "request_log_vllm_side.py"
MODEL = "meta-llama/Llama-3.1-8B"
CHAT = [{"role": "user", "content": "hi"}]

CASES = [
    ("completion", {"model": MODEL, "prompt": "hello"}, 16),
    ("completion", {"model": MODEL, "prompt": [1, 2, 3], "n": 3, "temperature": 0.7, "top_p": 0.9, "top_k": 40,
                    "seed": 5, "stop": "\n", "stop_token_ids": [7, 7, 9], "logprobs": 2, "ignore_eos": True,
                    "min_tokens": 2, "presence_penalty": 0.5, "repetition_penalty": 1.1}, 32),
    ("completion", {"model": MODEL, "prompt": "x", "echo": True, "max_tokens": 0}, 0),
    ("completion", {"model": MODEL, "prompt": "x", "temperature": 0.0, "bad_words": ["no"],
                    "include_stop_str_in_output": True, "skip_special_tokens": False,
                    "vllm_xargs": {"a": 1}}, 8),
    ("chat", {"model": MODEL, "messages": CHAT}, 100),
    ("chat", {"model": MODEL, "messages": CHAT, "logprobs": True, "top_logprobs": 3, "max_tokens": 9,
              "temperature": 0.001, "stop": ["a", "b"], "structured_outputs": {"choice": ["yes", "no"]}}, 9),
    ("chat", {"model": MODEL, "messages": CHAT, "response_format": {"type": "json_object"}, "min_p": 0.1,
              "frequency_penalty": 1.0, "kv_transfer_params": {"do_remote_decode": True}}, 50),
    ("chat", {"model": MODEL, "messages": CHAT, "thinking_token_budget": 10, "spaces_between_special_tokens": False},
     20),
    ("responses", {"model": MODEL, "input": "hi"}, 64),
    ("responses", {"model": MODEL, "input": "hi", "temperature": 0.3, "top_p": 0.5, "max_output_tokens": 12,
                   "text": {"format": {"type": "json_object"}}}, 12),
]

pytestmark = pytest.mark.vllm


def ours(kind: str, body: dict, max_tokens: int) -> str:
    if kind == "responses":
        return sampling_params_repr(from_responses(ResponsesRequest.model_validate(body), max_tokens))
    model = ChatCompletionRequest if kind == "chat" else CompletionRequest
    return sampling_params_repr(logged_params(model.model_validate(body), max_tokens))


def test_received_request_params_equal_vllms_repr():
    python = vllm_python_or_skip()
    theirs = run_vllm_side(python, VLLM_SIDE, {"cases": CASES})["reprs"]
    for case, expected in zip(CASES, theirs):
        assert ours(*case) == expected, case


ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
MUL = {"type": "function", "function": {"name": "mul", "strict": True, "parameters": {
    "type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}}}
NOTE = {"type": "function", "function": {"name": "note", "strict": True}}  # strict, no parameters


def _forced(tools: list, choice, **extra) -> dict:
    return {"model": MODEL, "messages": CHAT, "tools": tools, "tool_choice": choice, **extra}


def _named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


FORCED = [
    ("hermes", _forced([ADD, MUL], "required"), 50),
    ("hermes", _forced([ADD, MUL], _named("add")), 50),
    ("hermes", _forced([ADD, MUL, NOTE], "required", parallel_tool_calls=False), 50),
    ("qwen3_json", _forced([ADD, MUL], _named("mul")), 50),
    ("llama3_json", _forced([ADD, MUL], "required"), 50),
    ("llama3_json", _forced([ADD, MUL], _named("mul")), 50),
    ("llama4_json", _forced([ADD, MUL, NOTE], "required", parallel_tool_calls=False), 50),
    ("hermes", _forced([ADD], _named("add"), response_format={"type": "json_object"}), 50),  # the tag wins
    ("pythonic", _forced([ADD, MUL], "required"), 50),  # no structural tag: the JSON schema
    ("pythonic", _forced([ADD, MUL], _named("mul")), 50),
    ("hermes", _forced([ADD], "auto"), 50),  # no call forced: hermes still keeps special tokens
    ("hermes", _forced([ADD], "none"), 50),
    ("granite4", _forced([ADD], "auto"), 50),
    ("llama3_json", _forced([ADD], "auto"), 50),
    ("hermes", _forced([ADD, MUL], "auto"), 50),  # a strict tool: "auto" gets a tag too
    ("llama3_json", _forced([ADD], "auto", parallel_tool_calls=False), 50),  # so does a single call
]


def test_a_chats_params_equal_vllms_after_its_tool_parser():
    python = vllm_python_or_skip("transformers")
    theirs = run_vllm_side(python, VLLM_SIDE, {"forced": FORCED})["forced"]
    for (parser, body, max_tokens), expected in zip(FORCED, theirs):
        req = ChatCompletionRequest.model_validate(body)
        serving = SimpleNamespace(options=SimpleNamespace(tool_call_parser=parser, enable_auto_tools=True,
                                                          reasoning_parser=None, tool_strict_level=None),
                                  sampling_defaults=lambda model: SamplingDefaults())  # vLLM's side has none
        assert sampling_params_repr(chat_params(serving, req, max_tokens, forced_constraint(req))) == expected, \
            (parser, body)


R_ADD = {"type": "function", "name": "add", "parameters": ADD["function"]["parameters"]}
R_MUL = {"type": "function", "name": "mul", "strict": True, "parameters": MUL["function"]["parameters"]}
R_NOTES = {"type": "namespace", "name": "notes", "description": "notes", "tools": [
    {"type": "function", "name": "put", "parameters": {"type": "object", "properties": {"t": {"type": "string"}}}}]}
R_SHELL = {"type": "custom", "name": "shell", "description": "runs a command"}


def _forced_response(tools: list, choice, **extra) -> dict:
    return {"model": MODEL, "input": "hi", "tools": tools, "tool_choice": choice, **extra}


FORCED_RESPONSES = [
    ("hermes", _forced_response([R_ADD, R_MUL], "required"), 50),
    ("hermes", _forced_response([R_ADD, R_MUL], {"type": "function", "name": "add"}), 50),
    ("hermes", _forced_response([R_ADD, R_MUL], "required", parallel_tool_calls=False), 50),
    ("hermes", _forced_response([R_ADD, R_NOTES], "required"), 50),  # a namespace's function, flattened
    ("hermes", _forced_response([R_ADD, R_SHELL], {"type": "custom", "name": "shell"}), 50),
    ("qwen3_json", _forced_response([R_ADD, R_MUL], {"type": "function", "name": "mul"}), 50),
    ("llama3_json", _forced_response([R_ADD, R_MUL], "required"), 50),
    ("llama3_json", _forced_response([R_ADD, R_MUL], {"type": "function", "name": "mul"}), 50),
    ("llama4_json", _forced_response([R_ADD, R_MUL], "required", parallel_tool_calls=False), 50),
    ("hermes", _forced_response([R_ADD], {"type": "function", "name": "add"},
                                text={"format": {"type": "json_object"}}), 50),  # the tag wins
    ("pythonic", _forced_response([R_ADD, R_MUL], "required"), 50),  # no structural tag: the JSON schema
    ("pythonic", _forced_response([R_ADD, R_MUL], {"type": "function", "name": "mul"}), 50),
    ("hermes", _forced_response([R_ADD], "auto"), 50),  # no call forced: hermes still keeps special tokens
    ("hermes", _forced_response([R_ADD], "none"), 50),
    ("granite4", _forced_response([R_ADD], "auto", stream=True), 50),
    ("llama3_json", _forced_response([R_ADD], "auto"), 50),
    ("hermes", _forced_response([R_ADD, R_MUL], "auto"), 50),  # a strict tool: "auto" gets a tag too
    ("llama4_json", _forced_response([R_ADD, R_SHELL], "auto", parallel_tool_calls=False), 50),
]


def test_a_responses_requests_params_equal_vllms_after_its_tool_parser():
    python = vllm_python_or_skip("transformers")
    theirs = run_vllm_side(python, VLLM_SIDE, {"forced_responses": FORCED_RESPONSES})["forced_responses"]
    for (parser, body, max_tokens), expected in zip(FORCED_RESPONSES, theirs):
        req = ResponsesRequest.model_validate(body)
        tools = template_tools(req.tools, req.tool_choice, False)
        forced_calls(req, tools, parser)
        assert sampling_params_repr(responses_params(req, max_tokens, parser)) == expected, \
            (parser, body)


LOGS = [
    {"max_log_len": None, "calls": [
        ["inputs", ["cmpl-a-0", "hello there", [1, 2, 3, 4, 5]]], ["inputs", ["cmpl-b-0", None, [7, 8]]],
        ["inputs", ["tokenize-c", "x", [9]]],
        ["outputs", ["cmpl-a", "general kenobi", [10, 11], "length", False, False]],
        ["outputs", ["chatcmpl-d", "hi", [12], None, True, True]],
        ["outputs", ["chatcmpl-d", "hi there", None, "streaming_complete", True, False]],
        ["outputs", ["chatcmpl-e", "[tool_calls: add({\"a\": 1})]", [1, 2], "tool_calls", False, False]]]},
    {"max_log_len": 3, "calls": [
        ["inputs", ["cmpl-a-0", "hello there", [1, 2, 3, 4, 5]]],
        ["outputs", ["cmpl-a", "general kenobi", [10, 11, 12, 13], "stop", False, False]],
        ["outputs", ["chatcmpl-d", "hello", [12, 13, 14, 15], "length", True, True]],
        ["outputs", ["chatcmpl-d", "hello there", None, "streaming_complete", True, False]]]},
]


def _our_lines(caplog, log: dict) -> list[str]:
    """The emulator's RequestLogger on the same calls, as its routes make them."""
    caplog.clear()
    logger = RequestLogger(log["max_log_len"], True)
    for method, args in log["calls"]:
        if method == "inputs":
            logger.inputs(*args, None, None)
            continue
        request_id, text, token_ids, finish_reason, streaming, delta = args
        if delta:
            logger.delta(request_id, text, token_ids, finish_reason)
        else:
            logger.outputs("chat" if streaming else "completion", request_id, text, token_ids or [], finish_reason,
                           streaming)
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_the_lines_equal_vllms_request_logger(caplog):
    python = vllm_python_or_skip()
    theirs = run_vllm_side(python, VLLM_SIDE, {"logs": LOGS})["lines"]
    caplog.set_level(logging.DEBUG, LOGGER)
    for log, expected in zip(LOGS, theirs):
        assert _our_lines(caplog, log) == expected
