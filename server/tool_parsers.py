"""What vLLM 0.33's tool parsers (`--tool-call-parser`) do to a request before it samples (adjust_request),
and which reasoning parsers (`--reasoning-parser`) keep special tokens (REASONING_KEEPS_SPECIAL_TOKENS).

One row per parser (`PARSERS`), read from vLLM's parser classes (vllm/tool_parsers/*, vllm/parser/*):

- `tag`: the parser's `structural_tag_model`, the xgrammar structural tag vLLM's DelegatingParser
  (`parser/abstract_parser.py` _apply_structural_tag) writes into `structured_outputs` while
  VLLM_ENFORCE_STRICT_TOOL_CALLING is on (its default). `MARKUPS` holds the call markup of the models whose
  tag the emulator writes (`structural_tag`, the model_dump of xgrammar's builtin or vLLM's own builder), with
  glm_4_7's, hy_v4's and kimi_k3's own builders (`_BUILDERS`); harmony (gpt-oss's "openai") writes no tag.
- `native`: supports_required_and_named is False: a forced call is decoded in the model's own markup, so
  without a tag its request keeps its own structured output (no JSON schema).
- `special`: when the parser sets skip_special_tokens=False: "tools" (a request with tools whose tool_choice
  is not "none"), "always" (whenever adjust_request runs: the parser engines, muse, kimi_k3).
"""
from __future__ import annotations

import copy
import functools
import json
import os
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Parser:
    """One --tool-call-parser's adjust_request."""
    tag: str | None = None
    native: bool = False
    special: Literal["tools", "always"] | None = None
    spaces: bool = True  # False: spaces_between_special_tokens becomes False with special tokens (kimi_k3)
    strict_level: Literal["auto", "function"] = "auto"  # default_tool_strict_level


_ENGINE = Parser(special="always")  # a ParserEngineToolAdapter: its engine's adjust_request keeps special tokens
_HERMES = Parser(tag="hermes", special="tools")
_QWEN_CODER = Parser(tag="qwen_3_coder", special="always")
_GLM = Parser(tag="glm_4_7", native=True, special="always", strict_level="function")
_MUSE = Parser(native=True, special="always")

PARSERS: dict[str, Parser] = {
    "apertus": Parser(special="tools"),
    "beam": Parser(),
    "cohere_command3": Parser(),
    "cohere_command4": Parser(),
    "deepseek_v3": Parser(tag="deepseek_r1"),
    "deepseek_v31": Parser(tag="deepseek_v3_1"),
    "deepseek_v32": Parser(tag="deepseek_v3_2", special="always"),
    "deepseek_v4": Parser(tag="deepseek_v4", special="always"),
    "deepseek_v41": Parser(tag="deepseek_v4_1", special="always"),
    "dots": Parser(native=True),
    "ernie45": Parser(),
    "functiongemma": Parser(special="tools"),
    "gemma4": Parser(native=True, special="always"),
    "gigachat3": Parser(special="tools"),
    "glm45": _GLM,
    "glm47": _GLM,
    "granite": _ENGINE,
    "granite-20b-fc": Parser(),
    "granite4": Parser(special="tools"),
    "hermes": _HERMES,
    "hf": Parser(),
    "hunyuan_a13b": Parser(),
    "hy_v3": Parser(),
    "hy_v4": Parser(tag="hy_v4"),
    "inkling": Parser(native=True, special="always"),
    "internlm": Parser(special="tools"),
    "jamba": Parser(special="tools"),
    "k2_horizon": Parser(native=True),
    "kimi_k2": Parser(tag="kimi", special="tools"),
    "kimi_k3": Parser(tag="kimi_k3", native=True, special="always", spaces=False),
    "lfm2": Parser(special="tools"),
    "ling3": Parser(tag="glm_4_7", native=True, special="always"),
    "llama3_json": Parser(tag="llama"),
    "llama4_json": Parser(tag="llama"),
    "llama4_pythonic": Parser(),
    "longcat": Parser(tag="longcat", special="tools"),
    "mimo": Parser(tag="mimo", special="always"),
    "minicpm5": Parser(special="tools"),
    "minimax_m2": Parser(tag="minimax", special="always"),
    "minimax_m3": Parser(native=True),
    "mistral": Parser(native=True, special="always"),
    "muse": _MUSE,
    "muse_glimmer": _MUSE,
    "musespark1x": _MUSE,
    "olmo3": Parser(),
    "openai": Parser(tag="harmony"),
    "phi4_mini_json": Parser(),
    "plamo3": Parser(tag="plamo3", native=True, special="always"),
    "poolside_v1": Parser(native=True, special="tools"),
    "pythonic": Parser(),
    "qwen3_coder": _QWEN_CODER,
    "qwen3_json": _HERMES,
    "qwen3_xml": _QWEN_CODER,
    "seed_oss": _ENGINE,
    "step3": Parser(special="tools"),
    "step3p5": _QWEN_CODER,
    "step5": _QWEN_CODER,
    "xlam": Parser(),
}


# vLLM 0.33's --reasoning-parser names whose adjust_request keeps special tokens (reasoning/*: the parser engines'
# adapters, kimi_k3 and muse's own); it runs on every chat and Responses request of a server with one
REASONING_KEEPS_SPECIAL_TOKENS = frozenset({
    "deepseek_v4", "deepseek_v41", "gemma4", "glm45", "glm47", "granite_thinking_parser", "inkling", "kimi_k2",
    "kimi_k3", "ling3", "mimo", "minicpmv", "minimax_m2", "mistral", "muse", "muse_glimmer", "musespark1x",
    "nemotron_v3", "plamo3", "qwen3", "seed_oss", "step3p5"})
REASONING_NO_SPACES = frozenset({"kimi_k3"})  # spaces_between_special_tokens off too


def parser_row(parser: str | None) -> Parser | None:
    """The row of a tool parser (None: no tool parser, or one the table does not know)."""
    return PARSERS.get(parser) if parser is not None else None


def strict_tool_calling() -> bool:
    """vLLM's VLLM_ENFORCE_STRICT_TOOL_CALLING (default on): structural tags for the parsers that have one."""
    return os.environ.get("VLLM_ENFORCE_STRICT_TOOL_CALLING", "True").lower() in ("true", "1")


def mistral_forced_schema(calling) -> dict:
    """The JSON schema vLLM's Mistral parser sets on a chat request's forced call with a tokenizer that is not
    Mistral's own (its _build_guided_schema_pre_v11): an array of `{"name", "arguments"}` objects, one of the
    tools each (a named tool's only, one item at most)."""
    named = calling.named_tool()
    tools = [named] if named is not None else list(calling.tools or ())
    schema: dict = {"type": "array", "minItems": 1}
    if named is not None:
        schema["maxItems"] = 1
    schema["items"] = {"type": "object", "anyOf": [
        {"type": "object", "properties": {"name": {"type": "string", "enum": [tool.function.name]},
                                          "arguments": tool.function.parameters or {"type": "object"}},
         "required": ["name", "arguments"]} for tool in tools]}
    return schema


def forced_natively(parser: str | None) -> bool:
    """Whether vLLM's parser leaves a forced call's request without the calls' JSON schema
    (supports_required_and_named False: set by the class, or by a structural tag while strict tool calling is on)."""
    row = parser_row(parser)
    return row is not None and (row.native or (row.tag is not None and strict_tool_calling()))


@dataclass(frozen=True)
class Markup:
    """How a structural_tag_model's tag writes tool calls, in xgrammar's formats.

    Each call is a `tag` whose begin and end are `calls`' (one pair per spelling; "{name}" the tool's name) around
    its arguments (`lead` formats, then the arguments as JSON of `style`). Several calls are either triggered
    tags (`listing` "triggered": each call opens on `trigger`) or tags with a separator ("separated"), inside a
    `block` (opening, closing) where the model wraps them: a tag, or with `prefix` set, constant strings
    (the prefix before the opening). With tool_choice "auto" the calls (or their block) are triggered by
    `trigger` in free text that may not contain `excludes`. A named call is its one tag (`named` "single",
    merged into the block's begin and end when the block is a tag), or the list stopped after the first ("list").
    """
    calls: tuple[tuple[str, str], ...]
    trigger: str
    excludes: tuple[str, ...] = ()
    style: str = "json"
    lead: tuple[dict, ...] = ()
    listing: Literal["triggered", "separated"] = "separated"
    block: tuple[str, str | list[str]] | None = None
    prefix: str | None = None
    separator: str = ""
    named: Literal["single", "list"] = "single"
    auto_stops: bool = False  # "auto" stops after one block of calls


_THINK = ("<think>", "</think>")
_DSML = "<\uff5cDSML\uff5c"  # "<｜DSML｜"
# DeepSeek's "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
# "<｜tool▁sep｜>"
_DS = tuple(f"<\uff5c{word}\uff5c>".replace(" ", "\u2581")
            for word in ("tool calls begin", "tool calls end", "tool call begin", "tool call end", "tool sep"))
_PLAMO_REQUEST = ("<|plamo:begin_tool_request:plamo|><|plamo:begin_tool_name:plamo|>{name}<|plamo:end_tool_name:plamo|>"
                  "<|plamo:begin_tool_arguments:plamo|><|plamo:constrain|>json<|plamo:msg|>",
                  "<|plamo:end_tool_arguments:plamo|><|plamo:end_tool_request:plamo|>")


def _hermes_style(open_: str, close: str) -> Markup:
    """vLLM's hermes builder: a JSON call between `open_` and `close`, with or without newlines inside."""
    return Markup(calls=((open_ + '\n{"name": "{name}", "arguments": ', "}\n" + close),
                         (open_ + '{"name": "{name}", "arguments": ', "}" + close)),
                  trigger=open_, named="list")


def _deepseek_dsml(calls: str, invoke: str, style: str, auto_stops: bool) -> Markup:
    """xgrammar's DeepSeek V3.2 / V4 / V4.1 tags: DSML invokes inside a calls block after a blank line."""
    return Markup(calls=((f'{_DSML}{invoke} name="{{name}}">\n', f"</{_DSML[1:]}{invoke}>\n"),),
                  trigger=f"{_DSML}{calls}>", excludes=_THINK, style=style,
                  block=(f"{_DSML}{calls}>\n", f"</{_DSML[1:]}{calls}>"), prefix="\n\n", auto_stops=auto_stops)


MARKUPS: dict[str, Markup] = {
    "hermes": _hermes_style("<tool_call>", "</tool_call>"),
    "longcat": _hermes_style("<longcat_tool_call>", "</longcat_tool_call>"),
    "llama": Markup(calls=(('{"name": "{name}", "parameters": ', "}"),), trigger='{"name": ', excludes=_THINK,
                    listing="triggered"),
    "mimo": Markup(calls=(("<tool_call><function={name}>", "</function></tool_call>"),), trigger="<tool_call>",
                   excludes=(*_THINK, "</tool_call>", "<function="), style="qwen_xml", listing="triggered"),
    "qwen_3_coder": Markup(calls=(("<tool_call>\n<function={name}>\n", "\n</function>\n</tool_call>"),),
                           trigger="<tool_call>\n<function=", excludes=_THINK, style="qwen_xml", listing="triggered"),
    "deepseek_r1": Markup(calls=((f"{_DS[2]}function{_DS[4]}{{name}}\n```json\n", f"\n```{_DS[3]}"),),
                          trigger=_DS[0], excludes=_THINK, block=(_DS[0], _DS[1]), separator="\n"),
    "deepseek_v3_1": Markup(calls=((f"{_DS[2]}{{name}}{_DS[4]}", _DS[3]),), trigger=_DS[0], excludes=_THINK,
                            block=(_DS[0], _DS[1])),
    "deepseek_v3_2": _deepseek_dsml("function_calls", "invoke", "deepseek_xml", auto_stops=False),
    "deepseek_v4": _deepseek_dsml("tool_calls", "invoke", "deepseek_xml", auto_stops=True),
    "deepseek_v4_1": _deepseek_dsml(" calls", " invoke", "deepseek_v4_1_xml", auto_stops=True),
    "kimi": Markup(calls=(("<|tool_call_begin|>functions.{name}:", "<|tool_call_end|>"),),
                   trigger="<|tool_calls_section_begin|>", excludes=(*_THINK, "<|tool_call_begin|>"),
                   lead=({"type": "regex", "pattern": "\\d+"},
                         {"type": "const_string", "value": "<|tool_call_argument_begin|>"}),
                   block=("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"), prefix=""),
    "minimax": Markup(calls=(('<invoke name="{name}">\n', "</invoke>\n"),), trigger="<minimax:tool_call>",
                      excludes=_THINK, style="minimax_xml", block=("<minimax:tool_call>\n", "</minimax:tool_call>"),
                      prefix="\n", named="list"),
    "plamo3": Markup(calls=(_PLAMO_REQUEST,), trigger="<|plamo:begin_tool_requests:plamo|>",
                     block=("<|plamo:begin_tool_requests:plamo|>",
                            ["<|plamo:end_tool_requests:plamo|>", "<|plamo:end_tool_requests:plamo|><|plamo:tag|>"]),
                     named="list"),
}


def _strict(tool):
    """A tool as strict (vLLM's resolve_tool_strictness at --tool-strict-level parameter)."""
    return tool.model_copy(update={"function": tool.function.model_copy(update={"strict": True})})


def _call_tags(markup: Markup, tool) -> list[dict]:
    """A tool's call tags: its arguments as JSON (held to its schema only when the tool is strict)."""
    function = tool.function
    schema = function.parameters if function.strict is True and function.parameters is not None else True
    arguments = {"type": "json_schema", "json_schema": schema, "style": markup.style, "any_order": False,
                 "max_whitespace_cnt": None, "excludes": []}
    content = {"type": "sequence", "elements": [*copy.deepcopy(markup.lead), arguments]} if markup.lead else arguments
    return [{"type": "tag", "begin": begin.replace("{name}", function.name), "content": content,
             "end": end.replace("{name}", function.name)} for begin, end in markup.calls]


def _triggered(triggers: list[str], tags: list[dict], at_least_one: bool, stop: bool, excludes) -> dict:
    return {"type": "triggered_tags", "triggers": triggers, "tags": tags, "at_least_one": at_least_one,
            "stop_after_first": stop, "excludes": list(excludes)}


def _separated(tags: list[dict], separator: str, stop: bool) -> dict:
    return {"type": "tags_with_separator", "tags": tags, "separator": separator, "at_least_one": True,
            "stop_after_first": stop}


def _in_block(markup: Markup, inner: dict) -> dict:
    """The calls `inner` inside the markup's block: as a tag, or between constant strings."""
    begin, end = markup.block
    if markup.prefix is None:
        return {"type": "tag", "begin": begin, "content": inner, "end": end}
    return {"type": "sequence", "elements": [{"type": "const_string", "value": markup.prefix + begin}, inner,
                                             {"type": "const_string", "value": end}]}


def tag_format(markup: Markup, tools: list, choice: Literal["auto", "required", "named"]) -> dict:
    """The format of a structural tag of `markup` for `tools` (a named call: its one tool) and tool choice."""
    tags = [tag for tool in tools for tag in _call_tags(markup, tool)]
    if markup.block is None:
        if markup.listing == "triggered":
            if choice == "named":
                return tags[0]
            return _triggered([markup.trigger], tags, choice == "required", False, markup.excludes)
        if choice == "auto":
            return _triggered([markup.trigger], tags, False, False, markup.excludes)
        return _separated(tags, markup.separator, choice == "named")
    if choice == "auto":
        block = {"type": "tag", "begin": markup.block[0], "content": _separated(tags, markup.separator, False),
                 "end": markup.block[1]}
        return _triggered([markup.trigger], [block], False, markup.auto_stops, markup.excludes)
    if choice == "required" or markup.named == "list":
        return _in_block(markup, _separated(tags, markup.separator, choice == "named"))
    if markup.prefix is None:  # one call merged into its block's tag
        return {**tags[0], "begin": markup.block[0] + tags[0]["begin"], "end": tags[0]["end"] + markup.block[1]}
    return _in_block(markup, tags[0])


# GLM-4.7's call: "<tool_call>NAME", then "<arg_key>K</arg_key><arg_value>V</arg_value>" per argument
_GLM_MARKERS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
                "</arg_value>")
_GLM_STRICT = Markup(calls=(("<tool_call>{name}", "</tool_call>"),), trigger="<tool_call>",
                     excludes=tuple(m for m in _GLM_MARKERS if m != "<tool_call>"), style="glm_xml",
                     listing="triggered")


def _glm_4_7(tools: list, choice: Literal["auto", "required", "named"]) -> dict:
    """vLLM's glm_4_7 builder: xgrammar's tag when every tool is strict; else a strict tool's arguments follow
    its schema and another's keys and value types are pinned (a plain object schema's; any arguments otherwise)."""
    if all(tool.function.strict is True for tool in tools):
        return tag_format(_GLM_STRICT, tools, choice)
    tags = [_glm_strict_tag(tool) if tool.function.strict is True else _glm_shallow_tag(tool) for tool in tools]
    if choice == "auto":
        return _triggered(["<tool_call>"], tags, False, False, _GLM_STRICT.excludes)
    return _separated(tags, "", choice == "named")


def _glm_strict_tag(tool) -> dict:
    schema = tool.function.parameters if tool.function.parameters is not None else True
    return _with_defaults({"type": "tag", "begin": f"<tool_call>{tool.function.name}",
                           "content": {"type": "json_schema", "json_schema": schema, "style": "glm_xml"},
                           "end": "</tool_call>"})


def _glm_shallow_tag(tool) -> dict:
    params = tool.function.parameters or {}
    properties = params.get("properties")
    if not isinstance(properties, dict) or not properties or params.get("additionalProperties") is True or any(
            key in params for key in ("$ref", "allOf", "anyOf", "oneOf", "patternProperties")):
        content = {"type": "json_schema", "json_schema": True, "style": "glm_xml"}
    else:
        pairs = [{"type": "sequence", "elements": [
            {"type": "const_string", "value": f"<arg_key>{key}</arg_key><arg_value>"}, _glm_value(prop),
            {"type": "const_string", "value": "</arg_value>"}]} for key, prop in properties.items()]
        content = {"type": "star", "content": pairs[0] if len(pairs) == 1 else {"type": "or", "elements": pairs}}
    return _with_defaults({"type": "tag", "begin": f"<tool_call>{tool.function.name}", "content": content,
                           "end": "</tool_call>"})


def _glm_value(prop: dict) -> dict:
    """One argument's value as GLM writes it: a string verbatim, anything else as bare JSON."""
    if "enum" in prop:
        values = [{"type": "const_string", "value": v if isinstance(v, str) else json.dumps(v)} for v in prop["enum"]]
        return values[0] if len(values) == 1 else {"type": "or", "elements": values}
    kind = prop.get("type")
    if isinstance(kind, list):
        formats = [_glm_value({"type": t}) for t in kind if t != "string"]
        if "string" in kind:
            formats.append({"type": "any_text", "excludes": list(_GLM_MARKERS)})
        return formats[0] if len(formats) == 1 else {"type": "or", "elements": formats}
    if kind in (None, "string"):
        return {"type": "any_text", "excludes": list(_GLM_MARKERS)}
    return {"type": "json_schema", "json_schema": {"type": kind}}


def _hy_v4(tools: list, choice: Literal["auto", "required", "named"]) -> dict | None:
    """vLLM's hy_v4 builder, as its parser asks for it: none for "auto" (calls left free); else the calls between
    <tool_calls> and </tool_calls>, each a tool's name and its arguments' keys (the required ones in order, then
    any of the others), each value free text. (A checkpoint's token suffix, read from its vocabulary, is none.)"""
    if choice == "auto":
        return None
    tags = []
    for tool in tools:
        params = tool.function.parameters if isinstance(tool.function.parameters, dict) else {}
        properties, required = params.get("properties") or {}, params.get("required") or []
        keys = [k for k in properties if k in required] + [k for k in required if k not in properties]
        pairs = [_hy_v4_pair(k) for k in properties if k not in required]
        elements = [_hy_v4_pair(k) for k in keys]
        if pairs:
            elements.append({"type": "star", "content": pairs[0] if len(pairs) == 1 else {"type": "or",
                                                                                          "elements": pairs}})
        content = {"type": "sequence", "elements": elements} if elements else {"type": "any_text"}
        tags.append(_with_defaults({"type": "tag", "begin": f"<tool_call>{tool.function.name}", "content": content,
                                    "end": "</tool_call>"}))
    return {"type": "sequence", "elements": [{"type": "const_string", "value": "<tool_calls>"},
                                             _separated(tags, "", choice == "named"),
                                             {"type": "const_string", "value": "</tool_calls>"}]}


def _hy_v4_pair(key: str) -> dict:
    return {"type": "sequence", "elements": [
        *({"type": "const_string", "value": v} for v in ("<arg_key>", key, "</arg_key>", "<arg_value>")),
        {"type": "any_text", "excludes": [], "max_tokens": None, "max_chars": None},
        {"type": "const_string", "value": "</arg_value>"}]}


# Kimi K3's XTML: "<|open|>NAME ...<|sep|>" opens a block, "<|close|>NAME<|sep|>" closes it
_K3_OPEN, _K3_CLOSE, _K3_SEP = "<|open|>", "<|close|>", "<|sep|>"
_K3_TYPES = {"string": "string", "integer": "number", "number": "number", "boolean": "boolean", "null": "null",
             "object": "object", "array": "array"}  # a JSON schema type's XTML `type`


def _kimi_k3(tools: list, choice: Literal["auto", "required", "named"]) -> dict:
    """vLLM's kimi_k3 builder: the response channel's text, then (optional for "auto") the tools channel of calls,
    each an indexed `call` of `argument` blocks typed from the tool's schema (a non-strict tool's: any)."""
    channel = {"type": "tag", "begin": f"{_K3_OPEN}tools{_K3_SEP}",
               "content": {"type": "tags_with_separator", "tags": [_k3_call(t) for t in tools], "separator": "",
                           "at_least_one": True}, "end": f"{_K3_CLOSE}tools{_K3_SEP}"}
    return _with_defaults({"type": "sequence", "elements": [
        {"type": "optional", "content": {"type": "const_string", "value": f"{_K3_OPEN}response{_K3_SEP}"}},
        {"type": "tag", "begin": "", "content": {"type": "any_text", "excludes": [_K3_OPEN, _K3_CLOSE,
                                                                                  "<|end_of_msg|>"]},
         "end": f"{_K3_CLOSE}response{_K3_SEP}"},
        {"type": "optional", "content": channel} if choice == "auto" else channel,
        {"type": "optional", "content": {"type": "const_string", "value": f"{_K3_CLOSE}message{_K3_SEP}"}}]})


def _k3_call(tool) -> dict:
    function = tool.function
    params = function.parameters if function.strict is True and function.parameters is not None else True
    name = function.name.replace("&", "&amp;").replace('"', "&quot;")
    return {"type": "tag", "begin": f'{_K3_OPEN}call tool="{name}" index="',
            "content": {"type": "sequence", "elements": [{"type": "regex", "pattern": "[0-9]+"},
                                                         {"type": "const_string", "value": f'"{_K3_SEP}'},
                                                         _k3_arguments(params)]},
            "end": f"{_K3_CLOSE}call{_K3_SEP}"}


def _k3_arguments(params) -> dict:
    """A call's argument blocks: one of the schema's properties each (at least one with required ones)."""
    properties = params.get("properties") if isinstance(params, dict) else None
    if not isinstance(properties, dict) or not properties:
        return {"type": "star", "content": _k3_any_argument()}
    defs = {k: params[k] for k in ("$defs", "definitions") if isinstance(params.get(k), dict)}
    tags = [_k3_argument(key, prop, defs) for key, prop in properties.items()]
    inner = tags[0] if len(tags) == 1 else {"type": "or", "elements": tags}
    required = params.get("required")
    return {"type": "plus" if isinstance(required, list) and required else "star", "content": inner}


def _k3_argument(key: str, prop, defs: dict) -> dict:
    """One property's block: a string raw (an enum's values, a bounded length, or any text), else JSON."""
    prop = prop if isinstance(prop, dict) else {}
    kind = _K3_TYPES.get(prop["type"]) if isinstance(prop.get("type"), str) else None
    if kind is None:
        return _k3_any_argument()
    if kind != "string":
        content = {"type": "json_schema", "json_schema": {**prop, **{k: v for k, v in defs.items() if k not in prop}}
                   if defs else prop}
    else:
        values = prop.get("enum")
        if values is None and isinstance(prop.get("const"), str):
            values = [prop["const"]]
        low, high = prop.get("minLength", 0), prop.get("maxLength")
        if isinstance(values, list) and 0 < len(values) <= 256 and all(
                isinstance(v, str) and "<|" not in v for v in values):
            branches = [{"type": "const_string", "value": v} for v in values]
            content = branches[0] if len(branches) == 1 else {"type": "or", "elements": branches}
        elif isinstance(high, int) and not isinstance(high, bool) and 0 <= high <= 4096:
            low = low if isinstance(low, int) and 0 <= low <= high else 0
            content = {"type": "regex", "pattern": f"(?:[^<]|<[^|]){{{low},{high}}}"}
        else:
            content = {"type": "any_text", "excludes": [_K3_CLOSE]}
    escaped = key.replace("&", "&amp;").replace('"', "&quot;")
    return {"type": "tag", "begin": f'{_K3_OPEN}argument key="{escaped}" type="{kind}"{_K3_SEP}', "content": content,
            "end": f"{_K3_CLOSE}argument{_K3_SEP}"}


def _k3_any_argument() -> dict:
    """An argument block of any key and type (a schema too loose to type it)."""
    return {"type": "tag", "begin": f"{_K3_OPEN}argument ", "content": {"type": "sequence", "elements": [
        {"type": "regex", "pattern": "[^<]*" + _K3_SEP.replace("|", "\\|")},
        {"type": "any_text", "excludes": [_K3_CLOSE]}]}, "end": f"{_K3_CLOSE}argument{_K3_SEP}"}


_BUILDERS = {"glm_4_7": _glm_4_7, "hy_v4": _hy_v4, "kimi_k3": _kimi_k3}  # the models not one Markup writes
WRITTEN_TAGS = frozenset(MARKUPS) | frozenset(_BUILDERS)


def stop_after_first(format_: dict) -> dict:
    """vLLM's limit_to_single_tool_call (parallel_tool_calls false): every list of calls stops after one."""
    for node in _formats(format_):
        if node.get("type") in ("triggered_tags", "token_triggered_tags", "tags_with_separator"):
            node["stop_after_first"] = True
    return format_


def _formats(node):
    """Every format in a format tree (not the JSON schemas inside it)."""
    if isinstance(node, list):
        for item in node:
            yield from _formats(item)
    elif isinstance(node, dict):
        yield node
        for key, value in node.items():
            if key != "json_schema":
                yield from _formats(value)


# xgrammar's format models' defaults (structural_tag.py), which vLLM's model_dump writes out
_FORMAT_DEFAULTS = {
    "any_text": {"excludes": [], "max_tokens": None, "max_chars": None},
    "any_tokens": {"exclude_tokens": [], "max_tokens": None},
    "dispatch": {"loop": True, "excludes": []},
    "exclude_token": {"exclude_tokens": []},
    "grammar": {"syntax": "ebnf"},
    "json_schema": {"style": "json", "any_order": False, "max_whitespace_cnt": None, "excludes": []},
    "tags_with_separator": {"at_least_one": False, "stop_after_first": False},
    "token_dispatch": {"loop": True, "exclude_tokens": []},
    "token_triggered_tags": {"exclude_tokens": [], "at_least_one": False, "stop_after_first": False},
    "triggered_tags": {"at_least_one": False, "stop_after_first": False, "excludes": []},
}


def _with_defaults(format_: dict) -> dict:
    """A format as xgrammar's StructuralTag model dumps it: each format's unset fields at their defaults."""
    format_ = copy.deepcopy(format_)
    for node in _formats(format_):
        for key, value in _FORMAT_DEFAULTS.get(node.get("type"), {}).items():
            node.setdefault(key, copy.copy(value))
    return format_


def output_format(structured) -> dict | None:
    """vLLM's structured_outputs_to_format: a request's own structured output (StructuredOutputsParams) as an
    xgrammar format, which joins a strict "auto" tool call's tag (None: none)."""
    if structured.json_object:
        return _with_defaults({"type": "json_schema", "json_schema": {"type": "object"}})
    if structured.json_ is not None:
        schema = json.loads(structured.json_) if isinstance(structured.json_, str) else structured.json_
        return _with_defaults({"type": "json_schema", "json_schema": schema})
    if structured.regex is not None:
        return {"type": "regex", "pattern": structured.regex}
    if structured.choice is not None:
        return {"type": "or", "elements": [{"type": "const_string", "value": c} for c in structured.choice]}
    if structured.grammar is not None:
        return {"type": "grammar", "grammar": structured.grammar, "syntax": "ebnf"}
    if structured.structural_tag is not None:
        tag = json.loads(structured.structural_tag)
        if "structures" in tag:  # the legacy form: triggered tags of JSON
            return _with_defaults({"type": "triggered_tags", "triggers": tag["triggers"], "tags": [
                {"type": "tag", "begin": s["begin"], "content": {"type": "json_schema", "json_schema": s.get("schema")},
                 "end": s["end"]} for s in tag["structures"]]})
        return _with_defaults(tag["format"])
    return None


NOT_APPLIED = object()  # the parser adds no structural tag: the request keeps its own structured output


def structural_tag(calling, parser: str | None, own, strict_level: str | None = None) -> dict | None | object:
    """vLLM's _apply_structural_tag for a request's tools and tool choice (`calling`, as a chat request's) on a
    server whose tool parser is `parser`, the request's own structured output being `own`
    (StructuredOutputsParams or None): the tag (a dict) that replaces `own`, None when vLLM applies a tag the
    emulator does not write (its model is not in MARKUPS), or NOT_APPLIED.

    A forced call ("required", a named tool) always gets it; "auto" only with a strict tool, or with
    `parallel_tool_calls` false (unless the request has its own structured output) or a parser whose default
    strict level is "function" (`strict_level`, --tool-strict-level, else the parser's default; "parameter": every
    tool's arguments follow its schema, as if strict). "auto" with its own structured output gets the forced form
    of the calls or that output (xgrammar's "or")."""
    row = parser_row(parser)
    tools = list(calling.tools or ())
    named = calling.named_tool()
    if row is None or row.tag is None or not strict_tool_calling() or not tools or (
            named is None and calling.tool_choice not in ("auto", "required")):
        return NOT_APPLIED
    auto = named is None and calling.tool_choice != "required"
    single = calling.parallel_tool_calls is False
    level = strict_level or row.strict_level
    function_level = level != "auto" or (single and not (auto and own is not None))
    if auto and not function_level and not any(tool.function.strict is True for tool in tools):
        return NOT_APPLIED
    if level == "parameter":
        tools = [_strict(tool) for tool in tools]
        named = _strict(named) if named is not None else None
    build = _BUILDERS.get(row.tag) or (functools.partial(tag_format, MARKUPS[row.tag]) if row.tag in MARKUPS else None)
    if build is None:
        return None
    if named is not None:
        format_ = build([named], "named")
    else:
        format_ = build(tools, "auto" if auto and own is None else "required")
    if format_ is None:  # the parser's own get_structural_tag declines (hy_v4's "auto")
        return NOT_APPLIED
    if single:
        stop_after_first(format_)
    if auto and own is not None:
        format_ = {"type": "or", "elements": [format_, output_format(own)]}
    return {"type": "structural_tag", "format": format_}
