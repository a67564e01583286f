"""Forced function calls of the Responses API, as vLLM 0.33 answers them with a tool parser.

With `--enable-auto-tool-choice --tool-call-parser`, a request whose `tool_choice` is "required" or
names a tool is constrained, as a chat request's is (server/tool_calls.py), by vLLM's
get_json_schema_from_tools over the tools the chat template sees (a namespace's functions named
"<namespace>__<name>", a custom tool as a function of one string `input`): the schema replaces
the request's `text.format` (a json_schema named "tool_calling_response", strict), which the
response echoes. The output is read back as chat reads it and turned into output items as vLLM's
build_response_output_items does: a `function_call` per call (id "fc_" and 16 hex digits, call_id
"chatcmpl-tool-" and 16 hex digits, a namespaced name split back into `name` and `namespace`) or a
`custom_tool_call` with the decoded `input`; the last item's status follows the finish reason.
`parallel_tool_calls: false` keeps the first call only. A text cut too short to hold a call gives
no item.

For parsers with an xgrammar structural tag (hermes, llama3_json, qwen3_*, ...; tool_calls.py), vLLM
constrains the call in the model's own markup instead: `text` becomes null (the response echoes `text:
null`) and the request's SamplingParams carry the structural tag (as its request log and /v1/responses/render
show them); the items it reads back are the same, so the output is still written as the JSON schema's
instance. As on chat, parsers whose markup is special tokens (hermes, ...) turn skipping them off for a
request with tools (responses_params).
"""
from __future__ import annotations

import json
import re

from server.errors import validation_error
from server.protocol import (ChatCompletionNamedToolChoiceParam, ChatCompletionRequest, ChatCompletionToolsParam,
                             random_uuid)
from server.sampling_params import SamplingParams, from_responses
from server.structured import Constraint
from server.responses_input import CUSTOM_TOOL_INPUT_KEY
from server.responses_protocol import ResponsesRequest
from server.tool_calls import (ToolCallStream, adjusted_structured_outputs, as_parsed_by, forced_constraint,
                               parse_tool_calls, special_tokens_adjustment)

_CUSTOM_INPUT_OPENING = re.compile(rf'\s*\{{\s*"{CUSTOM_TOOL_INPUT_KEY}"\s*:\s*"')


def function_call_item(item_id: str, call_id: str, name: str, namespace: str | None, arguments: str,
                       status: str) -> dict:
    """A function_call output item (the SDK's ResponseFunctionToolCall, in its key order)."""
    return {"arguments": arguments, "call_id": call_id, "name": name, "type": "function_call", "id": item_id,
            "async": None, "caller": None, "namespace": namespace, "status": status}


def custom_tool_call_item(item_id: str, call_id: str, name: str, payload: str) -> dict:
    """A custom_tool_call output item (the SDK's ResponseCustomToolCall: no status)."""
    return {"call_id": call_id, "input": payload, "name": name, "type": "custom_tool_call", "id": item_id,
            "async": None, "caller": None, "namespace": None}


def decode_custom_input(arguments: str) -> str:
    """vLLM's decode_custom_tool_input: the `input` string of a custom tool's arguments, or the
    arguments themselves when they hold none."""
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return arguments
    payload = parsed.get(CUSTOM_TOOL_INPUT_KEY) if isinstance(parsed, dict) else None
    return payload if isinstance(payload, str) else arguments


def custom_input_prefix(arguments: str) -> str:
    """vLLM's decode_custom_tool_input_prefix for the arguments this server writes (`{"input": "...`):
    the string decoded so far, less an escape cut in half or a trailing lone high surrogate, so that
    the streamed deltas stay a prefix of the final input."""
    opening = _CUSTOM_INPUT_OPENING.match(arguments)
    if opening is None:
        return ""
    body, i = arguments[opening.end():], 0
    while i < len(body) and body[i] != '"':
        width = (6 if body[i + 1:i + 2] == "u" else 2) if body[i] == "\\" else 1
        if i + width > len(body):
            break
        i += width
    try:
        payload = json.loads(f'"{body[:i]}"')
    except ValueError:
        return ""
    return payload[:-1] if payload and "\ud800" <= payload[-1] <= "\udbff" else payload


def call_item_id(custom: bool) -> str:
    """vLLM's item ids: "ctc_" (a custom tool call) or "fc_", and 16 hex digits."""
    return f"{'ctc' if custom else 'fc'}_{random_uuid()}"


class ForcedCalls:
    """The forced call of one request: its constraint, and its output read back as items."""

    def __init__(self, tools: list[dict], template_tools: list[dict], tool_choice: str | dict,
                 parallel_tool_calls: bool | None) -> None:
        """`tools`: the request's; `template_tools`: the functions the chat template sees (the model's
        only callable tools)."""
        if tool_choice == "required":
            if not template_tools:
                raise validation_error("tool_choice requires a function call, but tools contains no function "
                                       "tool the model can call.", parameter="tool_choice")
            choice = "required"
        else:
            if tool_choice["name"] not in {t["function"]["name"] for t in template_tools}:
                raise validation_error(f"Tool '{tool_choice['name']}' has not been passed in `tools`.")
            choice = ChatCompletionNamedToolChoiceParam.model_validate({"function": {"name": tool_choice["name"]}})
        self.chat = ChatCompletionRequest.model_construct(
            tools=[ChatCompletionToolsParam.model_validate(t) for t in template_tools], tool_choice=choice,
            parallel_tool_calls=parallel_tool_calls)
        self.constraint = forced_constraint(self.chat)  # the call's JSON schema
        self.after: str | None = None  # the reasoning end marker of a model that thinks before its call
        self.custom = frozenset(t.get("name") for t in tools if t["type"] == "custom")
        self.namespaced = {f"{t.get('name')}__{f.get('name')}": (f.get("name"), t.get("name"))
                           for t in tools if t["type"] == "namespace"
                           for f in t.get("tools") or () if isinstance(f, dict) and f.get("type") == "function"}

    def adjust_request(self, req, parser: str | None, strict_level: str | None = None) -> Constraint | None:
        """What vLLM's tool parser does to the request (adjust_request, as adjust_structured_outputs), and the
        constraint the output follows: the call's JSON schema, with the request's structured_outputs too where
        `text` became that schema (vLLM's 400)."""
        self.constraint = as_parsed_by(self.constraint, parser)
        if adjust_structured_outputs(req, parser, self.chat, self.constraint, strict_level):
            return self.constraint
        return req.structured_constraint()

    def stream(self) -> ToolCallStream:
        """The calls' deltas as a stream's text grows (chat's `delta.tool_calls`)."""
        return ToolCallStream(self.chat, after=self.after)

    def is_custom(self, name: str) -> bool:
        return name in self.custom

    def split_name(self, name: str) -> tuple[str, str | None]:
        """vLLM's resolve_responses_tool_call_name: a namespace's function back to (name, namespace)."""
        return self.namespaced.get(name, (name, None))

    def items(self, text: str, last_status: str) -> list[dict]:
        """The output items of a whole output: one per call read back, the last with `last_status`."""
        calls = parse_tool_calls(self.chat, text)
        items = []
        for i, call in enumerate(calls):
            name, arguments = call["function"]["name"], call["function"]["arguments"]
            custom = self.is_custom(name)
            if custom:
                item = custom_tool_call_item(call_item_id(custom), call["id"], name, decode_custom_input(arguments))
            else:
                status = last_status if i == len(calls) - 1 else "completed"
                item = function_call_item(call_item_id(custom), call["id"], *self.split_name(name), arguments, status)
            items.append(item)
        return items



def forced_calls(req: ResponsesRequest, template_tools: list[dict] | None, parser: str | None,
                 strict_level: str | None = None) -> ForcedCalls | None:
    """The forced call of a request on a server with tool parser `parser` (None: none) and --tool-strict-level
    `strict_level`, its request adjusted as vLLM's tool parser adjusts it (adjust_structured_outputs); None
    when no call is forced."""
    if parser is None:
        return None
    if not req.forces_tool_call():
        adjust_structured_outputs(req, parser, _calling(req, template_tools), None, strict_level)
        return None
    calls = ForcedCalls(req.tools, template_tools or [], req.tool_choice, req.parallel_tool_calls)
    calls.adjust_request(req, parser, strict_level)
    return calls


def adjust_structured_outputs(req: ResponsesRequest, parser: str | None, calling: ChatCompletionRequest,
                              forced: Constraint | None, strict_level: str | None = None) -> bool:
    """vLLM's tool parser on a Responses request (tool_calls.py adjusted_structured_outputs): a structural tag
    becomes its `structured_outputs` and `text` null (the response echoes it); a forced call's JSON schema
    becomes its `text.format` (named "tool_calling_response", strict). Whether it follows the call's JSON
    (a forced call: its schema, or a tag)."""
    own = req.extract_structured_outputs() if calling.tools and req.tool_choice != "none" else None
    changed, structured = adjusted_structured_outputs(calling, parser, forced, own, strict_level)
    if not changed:
        return forced is not None
    if structured is not None and structured.structural_tag is None:
        req.format_as_tool_calls(forced.spec)
        return False
    req.text, req.structured_outputs = None, structured
    return True


def _calling(req: ResponsesRequest, template_tools: list[dict] | None) -> ChatCompletionRequest:
    """A request's tool choice, over the tools the chat template sees, as a chat request's (no call forced)."""
    return ChatCompletionRequest.model_construct(
        tools=[ChatCompletionToolsParam.model_validate(t) for t in template_tools or ()],
        tool_choice=req.tool_choice if isinstance(req.tool_choice, str) else None,
        parallel_tool_calls=req.parallel_tool_calls)


def responses_params(req: ResponsesRequest, max_tokens: int, parser: str | None,
                     reasoning_parser: str | None = None, defaults: dict | None = None) -> SamplingParams:
    """The SamplingParams vLLM's Responses path builds (to_sampling_params) from a request its tool parser
    adjusted (forced_calls: the structural tag or JSON schema is the request's by then), with special tokens
    kept by the parsers whose markup they are; `defaults`: the model's default sampling parameters."""
    params = from_responses(req, max_tokens, defaults)
    return params.model_copy(update=special_tokens_adjustment(req, parser, reasoning_parser))
