"""A gpt-oss prompt as vLLM 0.33 renders it: with Harmony, not the chat template
(`entrypoints/openai/parser/harmony_utils.py`: build_harmony_preamble, parse_chat_inputs_to_harmony_messages,
render_for_completion).

The conversation becomes Harmony messages: a system message (the model's identity, knowledge cutoff, today's date
or VLLM_SYSTEM_START_DATE, the reasoning effort, medium by default, and the channels), a developer message when
there are instructions (a leading system or developer message) or tools (as a TypeScript namespace `functions`),
then each message: a user's; an assistant's reasoning on `analysis`, its text on `final` (`commentary` beside tool
calls), each call in vLLM's legacy header (`assistant to=functions.NAME<|channel|>commentary json`) ended by
<|call|>; a tool's answer from `functions.NAME` to the assistant; a later system or developer message as a
developer message. Analysis messages before the last final answer are dropped, and the prompt ends with
`<|start|>assistant`. The text between markers is encoded with the model's tokenizer, the markers are Harmony's
tokens (server/harmony.py).
"""
from __future__ import annotations

import datetime
import json
import os
from typing import Any

from server.harmony import HarmonyTokens, Message, harmony_tokens

IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."  # openai_harmony's SystemContent defaults
KNOWLEDGE_CUTOFF = "2024-06"
Segment = tuple[str, str]  # ("marker", "<|start|>") or ("text", ...)
HarmonyMessage = tuple[str, str | None, list[Segment]]  # (role, channel, segments): one rendered message


def _message(header: str, content: str, end: str = "<|end|>") -> list[Segment]:
    """`<|start|>HEADER<|message|>CONTENT<|end|>`; a header's `<|channel|>` is a marker of its own."""
    segments: list[Segment] = [("marker", "<|start|>")]
    role, channel_marker, channel = header.partition("<|channel|>")
    segments.append(("text", role))
    if channel_marker:
        segments += [("marker", "<|channel|>"), ("text", channel)]
    return [*segments, ("marker", "<|message|>"), ("text", content), ("marker", end)]


def _call(name: str, arguments: str) -> HarmonyMessage:
    """An assistant's call of functions.NAME, in vLLM's legacy header, ended by <|call|>."""
    return ("assistant", "commentary",
            _message(f"assistant to=functions.{name}<|channel|>commentary json", arguments, "<|call|>"))


def _tool_output(author: str, text: str) -> HarmonyMessage:
    """A tool's answer (from `author`: functions.NAME) to the assistant."""
    return ("tool", "commentary", _message(f"{author} to=assistant<|channel|>commentary", text))


def system_message(effort: str | None, function_tools: bool) -> list[Segment]:
    date = os.environ.get("VLLM_SYSTEM_START_DATE") or datetime.datetime.now().strftime("%Y-%m-%d")
    lines = [IDENTITY, f"Knowledge cutoff: {KNOWLEDGE_CUTOFF}", f"Current date: {date}", "",
             f"Reasoning: {effort or 'medium'}", "",
             "# Valid channels: analysis, commentary, final. Channel must be included for every message."]
    if function_tools:
        lines.append("Calls to these tools must go to the commentary channel: 'functions'.")
    return _message("system", "\n".join(lines))


def _ts_type(schema: Any, indent: str = "") -> str:
    """A JSON schema as Harmony writes it in TypeScript."""
    if not isinstance(schema, dict):
        return "any"
    if "enum" in schema:
        return " | ".join(json.dumps(v) for v in schema["enum"])
    for union in ("anyOf", "oneOf"):
        if isinstance(schema.get(union), list):
            return " | ".join(_ts_type(s, indent) for s in schema[union])
    kind = schema.get("type")
    if isinstance(kind, list):
        return " | ".join(_ts_type({**schema, "type": k}, indent) for k in kind)
    if kind == "string":
        return "string"
    if kind in ("number", "integer"):
        return "number"
    if kind == "boolean":
        return "boolean"
    if kind == "null":
        return "null"
    if kind == "array":
        return f"{_ts_type(schema.get('items'), indent)}[]"
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties") or {}
        if not properties:
            return "object"
        return "{\n" + _ts_properties(schema, indent) + indent + "}"
    return "any"


def _ts_properties(schema: dict, indent: str) -> str:
    required = set(schema.get("required") or ())
    lines = []
    for name, prop in (schema.get("properties") or {}).items():
        prop = prop if isinstance(prop, dict) else {}
        if prop.get("description"):
            lines.append(f"{indent}// {prop['description']}\n")
        default = f", // default: {prop['default']}" if "default" in prop else ","
        optional = "" if name in required else "?"
        lines.append(f"{indent}{name}{optional}: {_ts_type(prop, indent)}{default}\n")
    return "".join(lines)


def developer_message(instructions: str | None, tools: list[dict] | None) -> list[Segment]:
    """The developer message (instructions, then the function tools' namespace)."""
    parts = []
    if instructions is not None:
        parts.append(f"# Instructions\n\n{instructions}")
    functions = [t.get("function") or t for t in tools or () if t.get("type") == "function"]
    if functions:
        definitions = []
        for function in functions:
            comment = f"// {function['description']}\n" if function.get("description") else ""
            parameters = function.get("parameters")
            if isinstance(parameters, dict) and parameters.get("properties"):
                signature = "(_: {\n" + _ts_properties(parameters, "") + "}) => any;"
            else:
                signature = "() => any;"
            definitions.append(f"{comment}type {function['name']} = {signature}")
        parts.append("# Tools\n\n## functions\n\nnamespace functions {\n\n" + "\n\n".join(definitions)
                     + "\n\n} // namespace functions")
    return _message("developer", "\n\n".join(parts))


def text_of(content: Any) -> str:
    """flatten_input_text_content: a content's text parts joined."""
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(p if isinstance(p, str) else str(p.get("text") or "") for p in content if isinstance(p, (str, dict)))


def conversation_messages(messages: list[dict]) -> list[HarmonyMessage]:
    """parse_chat_inputs_to_harmony_messages: each message's Harmony messages (a tool's answer names the call
    with its id among the messages' own)."""
    names = {call.get("id"): (call.get("function") or {}).get("name")
             for m in messages for call in m.get("tool_calls") or () if isinstance(call, dict)}
    out: list[HarmonyMessage] = []
    for m in messages:
        role, content = m.get("role"), m.get("content")
        reasoning = m.get("reasoning")
        if role == "assistant" and m.get("tool_calls"):
            if text_of(content):
                out.append(("assistant", "commentary", _message("assistant<|channel|>commentary", text_of(content))))
            if reasoning:
                out.append(("assistant", "analysis", _message("assistant<|channel|>analysis", reasoning)))
            for call in m["tool_calls"]:
                function = call.get("function") or {}
                arguments = function.get("arguments") or ""
                if not isinstance(arguments, str):
                    arguments = json.dumps(arguments)
                out.append(_call(function.get("name", ""), arguments))
        elif role == "tool":
            out.append(_tool_output(f"functions.{names.get(m.get('tool_call_id'), '') or ''}", text_of(content)))
        elif role == "assistant":
            if reasoning:
                out.append(("assistant", "analysis", _message("assistant<|channel|>analysis", reasoning)))
            if text_of(content):
                out.append(("assistant", "final", _message("assistant<|channel|>final", text_of(content))))
        elif role in ("system", "developer"):
            out.append((role, None, developer_message(text_of(content), None)))
        else:
            out.append((str(role), None, _message(str(role), text_of(content))))
    return out


def input_item_messages(items: list[dict], calls: dict[str, str | None]) -> list[HarmonyMessage]:
    """A Responses input's Harmony messages, item by item in order (vLLM's response_input_to_harmony): a message
    (a system or developer one as a developer message, none when empty; an assistant's on `final`), a reasoning
    item's content on `analysis` (none without content: a summary is not rendered), a function call in vLLM's
    legacy header ended by <|call|>, a call's output from `functions.NAME` to the assistant. NAME is that of the
    newest call with its id among `calls` (a previous response's) and the items before it. Raises ValueError with
    vLLM's message for an output that answers no call, or an item of another type."""
    calls = dict(calls)
    out: list[HarmonyMessage] = []
    for item in items:
        kind = item.get("type")
        if kind is None or kind == "message":
            role, content = str(item.get("role")), item.get("content")
            if role in ("system", "developer"):
                if text_of(content):
                    out.append((role, None, developer_message(text_of(content), None)))
            elif role == "assistant":
                out.append(("assistant", "final", _message("assistant<|channel|>final", text_of(content))))
            else:
                out.append((role, None, _message(role, text_of(content))))
        elif kind == "function_call_output":
            if item.get("call_id") not in calls:
                raise ValueError(f"No call message found for {item.get('call_id')}")
            out.append(_tool_output(f"functions.{calls[item.get('call_id')] or ''}", text_of(item.get("output"))))
        elif kind == "reasoning":
            parts = item.get("content") or []
            if parts:
                text = "\n".join(str(p.get("text", "")) for p in parts if isinstance(p, dict))
                out.append(("assistant", "analysis", _message("assistant<|channel|>analysis", text)))
        elif kind == "function_call":
            out.append(_call(item.get("name", ""), str(item.get("arguments") or "")))
            calls[item.get("call_id")] = item.get("name")
        else:
            raise ValueError(f"Unknown input type: {kind}")
    return out


def previous_input_messages(messages: list[Any]) -> list[HarmonyMessage]:
    """vLLM's construct_harmony_previous_input_messages: a request's `previous_input_messages` (the history of a
    stateless multi-turn conversation), each in Harmony's format ({"author": {"role", "name"}, "channel",
    "recipient", "content_type", "content"}) or a chat message's (an assistant's calls, each to functions.NAME; a
    tool's answer, from its `name`; otherwise the role and the content's text, no channel), system and developer
    messages left out (the instructions are the newest request's). Raises ValueError for a message with no role."""
    out: list[HarmonyMessage] = []
    for m in messages:
        if not isinstance(m, dict):
            raise ValueError(f"Message has no 'role' key: {m}")
        author = m.get("author")
        if isinstance(author, dict):
            role = str(author.get("role"))
            if role not in ("system", "developer"):
                out.append(_harmony_format(role, author.get("name"), m))
            continue
        role = m.get("role")
        if role is None:
            raise ValueError(f"Message has no 'role' key: {m}")
        if role == "assistant" and m.get("tool_calls"):
            for call in m["tool_calls"]:
                function = call.get("function") or {}
                out.append(_call(function.get("name", ""), function.get("arguments") or ""))
        elif role == "tool":
            name = m.get("name") or ""
            if name and not name.startswith("functions."):
                name = f"functions.{name}"
            out.append(_tool_output(name or "tool", text_of(m.get("content"))))
        elif role not in ("system", "developer"):
            out.append((str(role), None, _message(str(role), text_of(m.get("content")))))
    return out


def _harmony_format(role: str, name: str | None, m: dict) -> HarmonyMessage:
    """A message given in Harmony's own format, rendered as Harmony renders its header (an assistant's call in
    vLLM's legacy form, as `output_message`) and ended by <|call|> when an assistant calls a tool."""
    content = m.get("content")
    text = content if isinstance(content, str) else text_of(content) if isinstance(content, list) else ""
    channel, recipient, content_type = m.get("channel"), m.get("recipient"), m.get("content_type")
    header = (name or role) + (f" to={recipient}" if recipient else "") + (f"<|channel|>{channel}" if channel else "")
    if content_type:
        header += f" {content_type}"
    end = "<|call|>" if role == "assistant" and recipient else "<|end|>"
    return role, channel, _message(header, text, end)


def preamble(instructions: str | None, tools: list[dict] | None, effort: str | None) -> list[HarmonyMessage]:
    """build_harmony_preamble: the system message, then the developer message (with instructions or tools)."""
    out: list[HarmonyMessage] = [("system", None, system_message(effort, bool(tools)))]
    if instructions or tools:
        out.append(("developer", None, developer_message(instructions or None, tools)))
    return out


def conversation(messages: list[dict], tools: list[dict] | None, effort: str | None) -> list[HarmonyMessage]:
    """The Harmony messages of a conversation (chat-format messages; `tools`: as the chat template gets them):
    the preamble (a leading system or developer message its instructions), then the messages."""
    instructions = None
    if messages and messages[0].get("role") in ("system", "developer"):
        instructions, messages = text_of(messages[0].get("content")), messages[1:]
    return preamble(instructions, tools, effort) + conversation_messages(messages)


def output_message(message: Message) -> HarmonyMessage:
    """A message the model wrote (server/harmony.py's parser), as Harmony renders it back into a later prompt: a
    call in vLLM's legacy header (`assistant to=RECIPIENT<|channel|>CHANNEL TYPE`) ended by <|call|>."""
    channel = f"<|channel|>{message.channel}" if message.channel else ""
    if message.recipient is not None:
        content_type = f" {message.content_type}" if message.content_type else ""
        return ("assistant", message.channel,
                _message(f"assistant to={message.recipient}{channel}{content_type}", message.text, "<|call|>"))
    return ("assistant", message.channel, _message(f"assistant{channel}", message.text))


def for_completion(messages: list[HarmonyMessage]) -> list[Segment]:
    """render_for_completion: the messages (the analysis ones before the last final answer dropped:
    auto_drop_analysis_messages), then `<|start|>assistant`."""
    last_final = max((i for i, (role, channel, _) in enumerate(messages) if role == "assistant" and channel == "final"),
                     default=-1)
    segments: list[Segment] = []
    for i, (_, channel, message) in enumerate(messages):
        if i < last_final and channel == "analysis":
            continue
        segments += message
    return [*segments, ("marker", "<|start|>"), ("text", "assistant")]


def render(messages: list[dict], tools: list[dict] | None, effort: str | None) -> list[Segment]:
    """The prompt of a conversation (chat-format messages; `tools`: as the chat template gets them)."""
    return for_completion(conversation(messages, tools, effort))


def chat_prompt(serving, req, tools: list[dict] | None) -> tuple[list[int], str]:
    """A chat request's prompt ids and text for a gpt-oss model (vLLM's _make_request_with_harmony: its chat,
    /tokenize and batch routes); `tools`: those the chat template would get (none with tool_choice "none" and
    --exclude-tools-when-tool-choice-none)."""
    tokens = harmony_tokens(serving.require_tokenizer(req.model))
    return encode(tokens, render(req.messages, tools, req.reasoning_effort))


def encode(tokens: HarmonyTokens, segments: list[Segment]) -> tuple[list[int], str]:
    """The prompt's token ids and its text."""
    ids: list[int] = []
    for kind, value in segments:
        if kind == "marker":
            ids.append(tokens.ids[value])
        elif value:
            ids.extend(tokens.tokenizer.encode(value, add_special_tokens=False))
    return ids, "".join(value for _, value in segments)
