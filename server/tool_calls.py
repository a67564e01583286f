"""Forced tool calls (chat `tool_choice` "required" or a named tool), as vLLM 0.33 answers them.

With `--enable-auto-tool-choice --tool-call-parser X`, vLLM constrains a forced call's output with a
JSON schema (`tool_parsers/utils.py` get_json_schema_from_tools): a named tool's `parameters`, or
for "required" an array of `{"name": ..., "parameters": ...}` objects, one of the tools each. The
text is then read back into `message.tool_calls` (ids "chatcmpl-tool-<16 hex>"), the content is
"", and finish_reason is "tool_calls" for "required" (a named tool keeps "stop"; a cut at
`max_tokens` stays "length"). A stream sends `delta.tool_calls` as vLLM's parser does: the
call's id, type and name with its first argument text, then the argument text as it grows.

A model that thinks (a reasoning parser, thinking on) reasons before the call: vLLM's engine applies the call's
grammar once the reasoning has ended, and its parser reads the calls in the text after the end marker
(`ToolCallStream.after`, server/reasoning.py ThinkingFirst).

"auto" with a parser is answered as a model that replies in text: the synthetic words have no
tool-call markup, so the parser finds no call and the reply is plain content.

The parsers with an xgrammar structural tag (`structural_tag_model`, `STRUCTURAL_TAG_PARSERS`) constrain a
forced call in the model's own markup instead (`parser/abstract_parser.py` _apply_structural_tag, on while
VLLM_ENFORCE_STRICT_TOOL_CALLING is, its default): the request's `structured_outputs` becomes that tag and a
Responses request's `text` becomes null, which its response echoes; with tool_choice "auto" a strict tool
gets it too, joined with the request's own structured output if it has one. A parser that decodes forced calls
in its own markup and has no tag (muse, dots, ...) leaves the request's structured output alone. The calls
read back are the same, so the emulator still writes them as the JSON above (server/tool_parsers.py: what
each parser does).
"""
from __future__ import annotations

import copy
import json
import uuid
from dataclasses import dataclass, field, replace

from server.errors import validation_error
from server.protocol import ChatCompletionRequest, StructuredOutputsParams
from server.structured import Constraint
from server.tool_parsers import (NOT_APPLIED, PARSERS, REASONING_KEEPS_SPECIAL_TOKENS, REASONING_NO_SPACES,
                                 forced_natively, mistral_forced_schema, parser_row, strict_tool_calling,
                                 structural_tag)

_EMPTY_OBJECT = {"type": "object", "properties": {}}

# vLLM 0.33's --tool-call-parser names whose parser class has a structural_tag_model (tool_parsers/)
STRUCTURAL_TAG_PARSERS = frozenset(name for name, row in PARSERS.items() if row.tag is not None)


def forces_with_structural_tag(parser: str | None) -> bool:
    """Whether vLLM constrains a forced call of this parser with its structural tag (not the JSON schema)."""
    row = parser_row(parser)
    return row is not None and row.tag is not None and strict_tool_calling()


def adjusted_structured_outputs(calling: ChatCompletionRequest, parser: str | None, forced: Constraint | None,
                                own: StructuredOutputsParams | None, strict_level: str | None = None
                                ) -> tuple[bool, StructuredOutputsParams | None]:
    """What vLLM's tool parser (adjust_request) makes of a request's structured output `own`, for its tools and
    tool choice `calling` (as a chat request's) and a forced call's JSON schema `forced`: (whether it changes,
    the new one). The parser's structural tag (server/tool_parsers.py structural_tag) replaces it (None for a tag
    the emulator does not write); else a forced call's JSON schema does, unless the parser decodes forced calls
    in its own markup (then, as with "auto", the request keeps its own). `strict_level`: --tool-strict-level."""
    tag = structural_tag(calling, parser, own, strict_level)
    if tag is not NOT_APPLIED:
        return True, None if tag is None else StructuredOutputsParams(structural_tag=json.dumps(tag))
    if parser == "kimi_k3" and calling.named_tool() is not None:
        raise validation_error("Named tool choice for Kimi K3 requires strict tool calling "
                               "(VLLM_ENFORCE_STRICT_TOOL_CALLING) so the XTML structural tag can force the call. "
                               'Otherwise use `tool_choice` set to "auto", "required", or "none".',
                               parameter="tool_choice")
    if forced is not None and not forced_natively(parser):
        return True, StructuredOutputsParams.model_validate({"json": forced.spec})
    return False, own


def special_tokens_adjustment(req, parser: str | None, reasoning_parser: str | None = None) -> dict:
    """The SamplingParams fields vLLM's tool and reasoning parsers set so that their markup's special tokens reach
    them (skip_special_tokens, for kimi_k3 spaces_between_special_tokens too). vLLM's renderer runs their
    adjust_request when the (chat or Responses) request's tool_choice is not "none", or with a reasoning parser."""
    choice = req.tool_choice
    keep = spaces_off = False
    if reasoning_parser in REASONING_KEEPS_SPECIAL_TOKENS:
        keep, spaces_off = True, reasoning_parser in REASONING_NO_SPACES
    row = parser_row(parser)
    if row is not None and row.special is not None and (reasoning_parser is not None or choice not in (None, "none")):
        if row.special == "always" or (req.tools and choice not in (None, "none")):
            keep, spaces_off = True, spaces_off or not row.spaces
    if not keep:
        return {}
    return {"skip_special_tokens": False, **({"spaces_between_special_tokens": False} if spaces_off else {})}


def parser_adjustment(req: ChatCompletionRequest, parser: str | None, forced: Constraint | None,
                      own: StructuredOutputsParams | None, reasoning_parser: str | None = None,
                      strict_level: str | None = None) -> dict:
    """The SamplingParams fields vLLM's tool parser (adjust_request) changes in a chat request `req` for a
    server whose tool parser is `parser` (None: none): its structured output (adjusted_structured_outputs, `own`
    the request's own, `forced` its forced call's JSON schema) and special tokens (special_tokens_adjustment, with
    the server's reasoning parser; `strict_level`: --tool-strict-level)."""
    changed, structured = adjusted_structured_outputs(req, parser, forced, own, strict_level)
    if parser == "mistral" and forced is not None and req.structured_outputs is None and \
            getattr(req.response_format, "type", None) != "structural_tag":
        # (with a tokenizer not Mistral's own, its parser's JSON schema for a chat's forced call)
        changed, structured = True, StructuredOutputsParams.model_validate({"json": mistral_forced_schema(req)})
    update = {"structured_outputs": structured} if changed else {}
    return {**update, **special_tokens_adjustment(req, parser, reasoning_parser)}


def as_parsed_by(forced: Constraint | None, parser: str | None) -> Constraint | None:
    """A forced call's constraint, marked `in_markup` where the parser reads the calls from its model's markup
    (a structural tag, or supports_required_and_named false): the emulator's JSON stands for the calls it reads,
    so what follows them in the output (an EOS's text kept with special tokens) is not theirs."""
    return replace(forced, in_markup=True) if forced is not None and forced_natively(parser) else forced


def rendered_forced_constraint(parse_context, structured: StructuredOutputsParams | None,
                               parsing: bool) -> Constraint | None:
    """The forced call a GenerateRequest from /render runs: its structured output is the structural tag
    vLLM's tool parser set (xgrammar's, not interpreted here) and its parse_context's chat request forces the
    call (a server with a tool parser, `parsing`), which the emulator writes as the call's JSON, as chat does.
    None otherwise (a parse_context that is no chat request: vLLM's generation does not read it)."""
    if parse_context is None or not parsing or structured is None or structured.structural_tag is None:
        return None
    try:
        forced = forced_constraint(parse_context.to_chat_request())
    except ValueError:
        return None
    return replace(forced, in_markup=True) if forced is not None else None


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


def after_reasoning(text: str, end_marker: str | None) -> str:
    """What follows a reply's reasoning (its end marker): the calls' text, read as vLLM's parser reads the content
    (nothing while the reasoning has not ended). No marker: the whole text."""
    if end_marker is None:
        return text
    _, found, rest = text.partition(end_marker)
    return rest if found else ""


@dataclass
class ToolCallStream:
    """The `delta.tool_calls` of each choice of a streamed forced call. `after`: the reasoning end marker of a
    model that thinks before its call (vLLM constrains the call once the reasoning ended): the calls are read in
    the text that follows it."""
    req: ChatCompletionRequest
    texts: dict[int, str] = field(default_factory=dict)
    announced: set[int] = field(default_factory=set)
    made: set[int] = field(default_factory=set)   # choices whose stream carried a tool call
    after: str | None = None
    raw: dict[int, str] = field(default_factory=dict)  # each choice's whole text, reasoning included

    def delta(self, choice: int, new_text: str) -> list[dict] | None:
        """The tool-call deltas of a chunk that adds `new_text` (None: nothing to send)."""
        if self.after is not None:
            whole = self.raw[choice] = self.raw.get(choice, "") + new_text
            new_text = after_reasoning(whole, self.after)[len(self.texts.get(choice, "")):]
            if not new_text:
                return None
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
