"""A Responses request's conversation, as vLLM 0.33 builds it for the chat template.

vLLM's construct_input_messages (`entrypoints/openai/responses/utils.py`): `instructions` as the
system message; then, with `previous_response_id`, the previous request's messages (its system
message left out: instructions do not carry over) and the previous response's output texts as
assistant messages; then the new `input`, a string (one user message) or a list of items:
messages (passed on as chat messages), assistant output messages, reasoning items, function and
custom tool calls (merged into the assistant message before them) and their outputs (tool
messages). Other item types are vLLM's 400 "Unsupported input item type". The messages then go
through chat completions' rendering (server/chat.py).
"""
from __future__ import annotations

import json
from typing import Any

from server.errors import validation_error

CUSTOM_TOOL_INPUT_KEY = "input"
_CUSTOM_TOOL_PARAMETERS = {"type": "object", "properties": {
    CUSTOM_TOOL_INPUT_KEY: {"type": "string", "description": "The freeform text payload for this tool."}},
    "required": [CUSTOM_TOOL_INPUT_KEY], "additionalProperties": False}


def input_messages(instructions: str | None, request_input: str | list[dict[str, Any]],
                   previous_messages: list[dict] | None = None,
                   previous_output: list[dict] | None = None) -> list[dict]:
    """The chat messages of a request (see the module docstring)."""
    messages: list[dict] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    if previous_messages is not None:
        messages.extend(m for m in previous_messages if m.get("role") != "system")
    for item in previous_output or ():
        if item.get("type") == "message":  # reasoning items are left out, as vLLM leaves them
            messages.extend({"role": "assistant", "content": part.get("text")} for part in item["content"])
    if isinstance(request_input, str):
        messages.append({"role": "user", "content": request_input})
        return messages
    conversation: list[dict] = []
    for i, item in enumerate(request_input):
        message = _message_of(item, i, conversation[-1] if conversation else None)
        if message is not None:
            conversation.append(message)
    return messages + conversation


def _message_of(item: dict, index: int, previous: dict | None) -> dict | None:
    """The chat message of one input item, or None when it was merged into `previous` (the assistant
    message before it)."""
    assistant = previous if previous is not None and previous.get("role") == "assistant" else None
    kind = item.get("type")
    if kind in ("function_call", "custom_tool_call"):
        call = _tool_call(item, index)
        if assistant is not None:
            assistant.setdefault("tool_calls", []).append(call)
            return None
        return {"role": "assistant", "tool_calls": [call]}
    if kind == "reasoning":
        if item.get("encrypted_content"):
            raise validation_error("Encrypted content is not supported.", parameter="input")
        parts = item.get("content") or item.get("summary") or []
        reasoning = parts[0].get("text", "") if parts and isinstance(parts[0], dict) else ""
        if assistant is not None and assistant.get("reasoning") is None:
            assistant["reasoning"] = reasoning
            return None
        return {"role": "assistant", "reasoning": reasoning}
    if kind in ("function_call_output", "custom_tool_call_output"):
        return {"role": "tool", "content": item.get("output"), "tool_call_id": item.get("call_id")}
    if item.get("role") == "assistant":
        content = item.get("content")
        text = content if isinstance(content, str) else None
        if isinstance(content, list) and content and isinstance(content[0], dict):
            text = content[0].get("text")
        if text is not None:
            if assistant is not None and assistant.get("content") is None:
                assistant["content"] = text
                return None
            return {"role": "assistant", "content": text}
    if "role" in item:
        return item
    raise validation_error(f"Unsupported input item type: {kind}", parameter="input")


def _tool_call(item: dict, index: int) -> dict:
    """A function or custom tool call item as a chat tool call (a custom tool's free text wrapped as
    its `input` argument; a namespaced function named "<namespace>__<name>")."""
    custom = item["type"] == "custom_tool_call"
    needed = ("call_id", "name") if custom else ("call_id", "name", "arguments")
    missing = [key for key in needed if not isinstance(item.get(key), str)]
    if missing:
        raise validation_error(f"input[{index}]: a {item['type']} item needs a string "
                               f"{' and '.join(f'`{k}`' for k in missing)}", parameter="input")
    name = item["name"]
    if custom:
        arguments = json.dumps({CUSTOM_TOOL_INPUT_KEY: item.get("input") or ""}, ensure_ascii=False)
    else:
        arguments = item["arguments"]
        if item.get("namespace"):
            name = f"{item['namespace']}__{name}"
    return {"id": item["call_id"], "function": {"name": name, "arguments": arguments}, "type": "function"}


def template_tools(tools: list[dict], tool_choice: Any, exclude_when_none: bool) -> list[dict] | None:
    """The tools vLLM hands the chat template (construct_tool_dicts): the function tools as chat tools
    (a namespace's flattened, a custom tool as a function of one string `input`); none without any,
    or with tool_choice "none" and --exclude-tools-when-tool-choice-none. Built-in tools (web search,
    code interpreter, MCP, ...) are not rendered: they need vLLM's tool server."""
    if not tools or (tool_choice == "none" and exclude_when_none):
        return None
    out = []
    for tool in tools:
        if tool["type"] == "function":
            out.append(_function(tool["name"], tool))
        elif tool["type"] == "custom":
            out.append({"type": "function", "function": {"name": tool.get("name"),
                                                         "description": tool.get("description"),
                                                         "parameters": _CUSTOM_TOOL_PARAMETERS}})
        elif tool["type"] == "namespace":
            out.extend(_function(f"{tool.get('name')}__{t.get('name')}", t) for t in tool.get("tools") or ()
                       if isinstance(t, dict) and t.get("type", "function") == "function")
    return out


def _function(name: str, tool: dict) -> dict:
    function = {"name": name, "description": tool.get("description"), "parameters": tool.get("parameters")}
    function.update({k: tool[k] for k in ("strict", "defer_loading") if tool.get(k) is not None})
    return {"type": "function", "function": function}
