"""Forced tool calls (chat `tool_choice` "required" or a named tool), as vLLM 0.33 answers them.

With `--enable-auto-tool-choice --tool-call-parser X`, vLLM constrains a forced call's output with a
JSON schema (`tool_parsers/utils.py` get_json_schema_from_tools): a named tool's `parameters`, or
for "required" an array of `{"name": ..., "parameters": ...}` objects, one of the tools each. The
text is then read back into `message.tool_calls` (ids "chatcmpl-tool-<16 hex>"), the content is
"", and finish_reason is "tool_calls" for "required" (a named tool keeps "stop"; a cut at
`max_tokens` stays "length"). A stream sends `delta.tool_calls` as vLLM's parser does: the
call's id, type and name with its first argument text, then the argument text as it grows.

"auto" with a parser is answered as a model that replies in text: the synthetic words have no
tool-call markup, so the parser finds no call and the reply is plain content.

The parsers with an xgrammar structural tag (`structural_tag_model`, `STRUCTURAL_TAG_PARSERS`) constrain a
forced call in the model's own markup instead (`parser/abstract_parser.py` _apply_structural_tag, on while
VLLM_ENFORCE_STRICT_TOOL_CALLING is, its default): the request's `structured_outputs` becomes that tag and a
Responses request's `text` becomes null, which its response echoes. The calls read back are the same, so
the emulator still writes them as the JSON above.
"""
from __future__ import annotations

import copy
import json
import os
import uuid
from dataclasses import dataclass, field

from server.protocol import ChatCompletionRequest, StructuredOutputsParams
from server.structured import Constraint

_EMPTY_OBJECT = {"type": "object", "properties": {}}

# vLLM 0.33's --tool-call-parser names whose parser class has a structural_tag_model (tool_parsers/)
STRUCTURAL_TAG_PARSERS = frozenset({
    "deepseek_v3", "deepseek_v31", "deepseek_v32", "deepseek_v4", "deepseek_v41", "glm45", "glm47", "hermes",
    "hy_v4", "kimi_k2", "kimi_k3", "ling3", "llama3_json", "llama4_json", "longcat", "mimo", "minimax_m2",
    "openai", "plamo3", "qwen3_coder", "qwen3_json", "qwen3_xml", "step3p5", "step5"})


def forces_with_structural_tag(parser: str | None) -> bool:
    """Whether vLLM constrains a forced call of this parser with its structural tag (not the JSON schema)."""
    strict = os.environ.get("VLLM_ENFORCE_STRICT_TOOL_CALLING", "True").lower() in ("true", "1")
    return strict and parser in STRUCTURAL_TAG_PARSERS


# The parsers whose structural tag the emulator writes, by vLLM's structural_tag_model: "hermes" (vLLM's own
# builder) and "llama" (xgrammar's). The others' tags (xgrammar's and vLLM's builders for their models' markup)
# are not written: their forced call shows its JSON schema.
_TAG_MODELS = {"hermes": "hermes", "qwen3_json": "hermes", "llama3_json": "llama", "llama4_json": "llama"}
_THINK_TOKENS = ["<think>", "</think>"]  # what a llama tag's free text may not contain


def forced_structured_outputs(req: ChatCompletionRequest, forced: Constraint,
                              parser: str | None) -> StructuredOutputsParams:
    """The structured output vLLM's tool parser sets on a chat request that forces a call (adjust_request):
    its structural tag (a JSON string) for a parser that has one, else the call's JSON schema (`forced`)."""
    tag = tool_call_structural_tag(req, parser) if forces_with_structural_tag(parser) else None
    if tag is not None:
        return StructuredOutputsParams(structural_tag=json.dumps(tag))
    return StructuredOutputsParams.model_validate({"json": forced.spec})


def rendered_forced_constraint(parse_context, structured: StructuredOutputsParams | None,
                               parsing: bool) -> Constraint | None:
    """The forced call a GenerateRequest from /render runs: its structured output is the structural tag
    vLLM's tool parser set (xgrammar's, not interpreted here) and its parse_context's chat request forces the
    call (a server with a tool parser, `parsing`), which the emulator writes as the call's JSON, as chat does.
    None otherwise (a parse_context that is no chat request: vLLM's generation does not read it)."""
    if parse_context is None or not parsing or structured is None or structured.structural_tag is None:
        return None
    try:
        return forced_constraint(parse_context.to_chat_request())
    except ValueError:
        return None


def tool_call_structural_tag(req: ChatCompletionRequest, parser: str | None) -> dict | None:
    """The xgrammar structural tag vLLM's `_apply_structural_tag` builds for a chat request's tool calls, as its
    model_dump (None: no tag, or a parser whose tag the emulator does not write): a forced call's, or with
    tool_choice "auto" (calls allowed, text too) only when a tool is `strict` or `parallel_tool_calls` is false
    (vLLM's default tool strict level, "auto"). Arguments are free JSON unless the tool is strict;
    `parallel_tool_calls: false` stops after one call."""
    model = _TAG_MODELS.get(parser)
    named = req.named_tool()
    tools = [named] if named is not None else list(req.tools or ())
    if model is None or not tools:
        return None
    single = named is not None or req.parallel_tool_calls is False
    auto = named is None and req.tool_choice != "required"
    if auto and not single and not any(tool.function.strict is True for tool in tools):
        return None
    if model == "hermes":
        tags = [_tag(f'<tool_call>{gap}{{"name": "{tool.function.name}", "arguments": ', tool,
                     f"}}{gap}</tool_call>") for tool in tools for gap in ("\n", "")]
        if auto:
            return _structural_tag({"type": "triggered_tags", "triggers": ["<tool_call>"], "tags": tags,
                                    "at_least_one": False, "stop_after_first": single, "excludes": []})
        return _structural_tag({"type": "tags_with_separator", "tags": tags, "separator": "", "at_least_one": True,
                                "stop_after_first": single})
    tags = [_tag(f'{{"name": "{tool.function.name}", "parameters": ', tool, "}") for tool in tools]
    if named is not None:
        return _structural_tag(tags[0])
    return _structural_tag({"type": "triggered_tags", "triggers": ['{"name": '], "tags": tags,
                            "at_least_one": not auto, "stop_after_first": single, "excludes": _THINK_TOKENS})


def _tag(begin: str, tool, end: str) -> dict:
    """xgrammar's TagFormat of one call: the tool's arguments as JSON (its schema only when it is strict)."""
    schema = tool.function.parameters if tool.function.strict is True and tool.function.parameters is not None \
        else True
    return {"type": "tag", "begin": begin, "content": {
        "type": "json_schema", "json_schema": schema, "style": "json", "any_order": False,
        "max_whitespace_cnt": None, "excludes": []}, "end": end}


def _structural_tag(format_: dict) -> dict:
    return {"type": "structural_tag", "format": format_}


# vLLM 0.33's tool parsers whose adjust_request keeps special tokens in the output (skip_special_tokens=False:
# their call markup is special tokens) for a request with tools whose tool_choice is not "none"
KEEP_SPECIAL_TOKENS_PARSERS = frozenset({
    "apertus", "functiongemma", "gigachat3", "granite4", "hermes", "internlm", "jamba", "kimi_k2", "kimi_k3", "ling3",
    "longcat", "minicpm5", "muse", "muse_glimmer", "musespark1x", "poolside_v1", "qwen3_json", "step3"})


def keeps_special_tokens(req, parser: str | None) -> bool:
    """Whether vLLM's tool parser sets the (chat or Responses) request's skip_special_tokens to False."""
    return parser in KEEP_SPECIAL_TOKENS_PARSERS and bool(req.tools) and req.tool_choice != "none"


def parser_adjustment(req, parser: str | None, calling: ChatCompletionRequest | None, forced: Constraint | None,
                      own: StructuredOutputsParams | None) -> dict:
    """The SamplingParams fields vLLM's tool parser (adjust_request) changes in a chat or Responses request
    `req`, for a server whose tool parser is `parser` (None: none). `calling` is the request's tools, tool_choice
    and parallel_tool_calls as a chat request's; `forced` its forced call's JSON schema; `own` the structured
    output the request asks for itself. A forced call's structured output (the parser's structural tag, or that
    schema) replaces the request's own; an "auto" one's tag applies only where the request has none (with one,
    vLLM's tag joins both, which the emulator does not write); some parsers keep special tokens."""
    update = {}
    if forced is not None and calling is not None:
        update["structured_outputs"] = forced_structured_outputs(calling, forced, parser)
    elif calling is not None and own is None and calling.tool_choice == "auto" and forces_with_structural_tag(parser):
        tag = tool_call_structural_tag(calling, parser)
        if tag is not None:
            update["structured_outputs"] = StructuredOutputsParams(structural_tag=json.dumps(tag))
    if keeps_special_tokens(req, parser):
        update["skip_special_tokens"] = False
    return update


def tool_call_id() -> str:
    """vLLM's make_tool_call_id: "chatcmpl-tool-" and 16 random hex digits."""
    return f"chatcmpl-tool-{uuid.uuid4().int & (2**64 - 1):016x}"


def forced_constraint(req: ChatCompletionRequest) -> Constraint | None:
    """The JSON schema vLLM constrains a forced tool call with (None unless tool_choice forces one)."""
    named = req.named_tool()
    if named is not None:
        return Constraint("json", named.function.parameters or _EMPTY_OBJECT)
    if req.tool_choice != "required":
        return None
    branches, defs = [], {}
    for tool in req.tools:
        params = copy.deepcopy(tool.function.parameters) if tool.function.parameters else None
        if params is not None:
            defs.update(params.pop("$defs", {}) or {})
        branches.append({"properties": {"name": {"type": "string", "enum": [tool.function.name]},
                                        "parameters": params or _EMPTY_OBJECT},
                         "required": ["name", "parameters"]})
    schema = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": branches}}
    if req.parallel_tool_calls is False:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return Constraint("json", schema)


def parse_tool_calls(req: ChatCompletionRequest, text: str) -> list[dict]:
    """The tool calls vLLM reads from a forced call's whole output (none from a text cut short)."""
    named = req.named_tool()
    if named is not None:
        if not text.strip():
            return []
        calls = [(named.function.name, text)]
    else:
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            return []
        if not isinstance(items, list) or not all(isinstance(i, dict) and isinstance(i.get("name"), str)
                                                  for i in items):
            return []
        calls = [(i["name"], json.dumps(i.get("parameters"), ensure_ascii=False)) for i in items]
        if req.parallel_tool_calls is False:
            calls = calls[:1]
    return [{"id": tool_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}
            for name, arguments in calls]


def finish_reason(req: ChatCompletionRequest, engine_reason: str | None, calls_made: bool) -> str | None:
    """vLLM's resolve_finish_reason."""
    if engine_reason is None:
        return None
    if calls_made and engine_reason == "stop" and req.named_tool() is None:
        return "tool_calls"
    return engine_reason


@dataclass
class _Span:
    """One element of a "required" array in the text: its name once closed, where its parameters are."""
    name: str | None = None
    name_end: int | None = None
    args_start: int | None = None
    args_end: int | None = None

    def ready_at(self, length: int) -> bool:
        return (self.name is not None and self.name_end is not None and self.name_end <= length
                and self.args_start is not None and self.args_start < length)


def _spans(text: str) -> list[_Span]:
    """The calls of a (possibly partial) "required" array: a string- and nesting-aware scan."""
    spans: list[_Span] = []
    depth, i, n = 0, 0, len(text)
    key = None
    while i < n:
        ch = text[i]
        if ch == '"':
            end = _string_end(text, i)
            if depth == 2 and end is not None:
                literal = json.loads(text[i:end])
                if key is None:
                    key = literal
                    i = end
                    continue
                if key == "name":
                    spans[-1].name, spans[-1].name_end = literal, end
                key = None
            if end is None:
                return spans
            i = end
            continue
        if ch in "[{":
            if depth == 1 and ch == "{":
                spans.append(_Span())
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth == 2 and key == "parameters":
                spans[-1].args_end = i + 1
                key = None
            if depth == 0:
                return spans
        elif ch == ":" and depth == 2 and key is not None:
            j = i + 1
            while j < n and text[j] in " \n\t\r":
                j += 1
            if key == "parameters" and j < n:
                spans[-1].args_start = j
                if text[j] not in "[{\"":  # a scalar: it ends at the next ',' or '}'
                    k = j
                    while k < n and text[k] not in ",}":
                        k += 1
                    if k < n:
                        spans[-1].args_end = k
                    key = None
                    i = k
                    continue
            i = j
            continue
        elif ch == "," and depth == 2:
            key = None
        i += 1
    return spans


def _string_end(text: str, start: int) -> int | None:
    """The offset just past the string literal that opens at `start` (None while unterminated)."""
    i = start + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == '"':
            return i + 1
        i += 1
    return None


@dataclass
class ToolCallStream:
    """The `delta.tool_calls` of each choice of a streamed forced call."""
    req: ChatCompletionRequest
    texts: dict[int, str] = field(default_factory=dict)
    announced: set[int] = field(default_factory=set)
    made: set[int] = field(default_factory=set)   # choices whose stream carried a tool call

    def delta(self, choice: int, new_text: str) -> list[dict] | None:
        """The tool-call deltas of a chunk that adds `new_text` (None: nothing to send)."""
        previous = self.texts.get(choice, "")
        current = self.texts[choice] = previous + new_text
        named = self.req.named_tool()
        if named is not None:
            self.made.add(choice)
            if choice in self.announced:
                return [{"index": 0, "function": {"arguments": new_text}}]
            self.announced.add(choice)
            return [{"id": tool_call_id(), "type": "function", "index": 0,
                     "function": {"name": named.function.name, "arguments": new_text}}]
        calls = []
        for index, span in enumerate(_spans(current)):
            if span.name is None or span.args_start is None:
                break
            end = span.args_end if span.args_end is not None else len(current)
            if span.ready_at(len(previous)):
                new_arguments = current[min(end, len(previous)):end]
                if new_arguments:
                    calls.append({"index": index, "function": {"name": None, "arguments": new_arguments}})
                continue
            calls.append({"id": tool_call_id(), "type": "function", "index": index,
                          "function": {"name": span.name, "arguments": current[span.args_start:end]}})
        if calls:
            self.made.add(choice)
        if self.req.parallel_tool_calls is False:
            calls = [c for c in calls if c["index"] == 0]
        return calls or None
