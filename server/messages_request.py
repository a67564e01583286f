"""An Anthropic Messages request as the chat request vLLM 0.33 turns it into (`anthropic/serving.py`
to_chat_completion_request), so the chat path renders, runs and answers it.

The system prompt (a string, or its text blocks joined with nothing between them, Claude Code's
`x-anthropic-billing-header` blocks left out) leads; inline system messages stay where they are
unless the chat template refuses a system message after the first (then they join the leading one,
as vLLM's probe decides). Blocks become chat content: text, images (image_url parts, which the
simulated model refuses), thinking (the assistant's `reasoning`), tool_use (tool calls with their
input as JSON arguments), tool_result (a user's: a `tool` message before the rest of the turn; an
assistant's: "Tool result: ..." text). `max_tokens` sets max_tokens and max_completion_tokens,
`stop_sequences` the stop strings; a stream asks for usage on every chunk; `output_config.format` is a
json_schema response format, `output_config.effort` the reasoning effort; thinking "enabled" sets
thinking_token_budget, "disabled" a reasoning effort of "none" (or "low" for a template that renders
"none" as it renders an effort: vLLM's --anthropic-disabled-thinking-effort auto, the only setting
simulated). tool_choice auto/any/none/tool is chat's "auto"/"required"/"none"/a named tool (tools
alone mean "auto"); tool_addition and tool_removal blocks change the tools in effect.

As in vLLM, tool_choice and tools are set after the chat request is built, so chat's request-level
tool checks do not run on them.
"""
from __future__ import annotations

import functools
import json
import time
from typing import Any

from profiles.tokenizer import Tokenizer
from server.chat import render
from server.errors import APIError
from server.messages_protocol import (AnthropicCountTokensRequest, AnthropicMessagesRequest, AnthropicTool,
                                     AnthropicToolChangeDefinition)
from server.protocol import (ChatCompletionNamedToolChoiceParam, ChatCompletionRequest, ChatCompletionToolsParam,
                             ResponseFormat, StreamOptions)
from server.serving import Serving

BILLING_HEADER = "x-anthropic-billing-header"
EFFORTS = ("low", "medium", "high", "xhigh", "max")
TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}
AnthropicRequest = AnthropicMessagesRequest | AnthropicCountTokensRequest


def to_chat_request(serving: Serving, req: AnthropicRequest) -> ChatCompletionRequest:
    """The chat request vLLM answers an Anthropic request (a message or a token count) with."""
    tokenizer = serving.tokenizer_for(req.model)
    merge = merges_inline_system(tokenizer)
    messages: list[dict[str, Any]] = []
    system = _system_text(req, merge)
    if system:
        messages.append({"role": "system", "content": system})
    for message in req.messages:
        _add_message(message, messages, merge)
    if isinstance(req, AnthropicCountTokensRequest):
        chat = ChatCompletionRequest.model_validate({"model": req.model, "messages": messages,
                                                     "chat_template_kwargs": req.chat_template_kwargs})
    else:
        chat = ChatCompletionRequest.model_validate({
            "model": req.model, "messages": messages, "max_tokens": req.max_tokens,
            "max_completion_tokens": req.max_tokens, "stop": req.stop_sequences, "temperature": req.temperature,
            "top_p": req.top_p, "top_k": req.top_k, "watermarking": req.watermarking, "cache_salt": req.cache_salt,
            "kv_transfer_params": req.kv_transfer_params, "ec_transfer_params": req.ec_transfer_params,
            "vllm_xargs": req.vllm_xargs, "chat_template_kwargs": req.chat_template_kwargs})
        if req.stream:
            chat.stream = True
            chat.stream_options = StreamOptions(include_usage=True, continuous_usage_stats=True)
    output = req.output_config
    if output is not None and output.format is not None and output.format.json_schema:
        chat.response_format = ResponseFormat.model_validate(
            {"type": output.format.type, "json_schema": {"name": output.format.type,
                                                         "schema": output.format.json_schema}})
    if output is not None and output.effort is not None:
        chat.reasoning_effort = output.effort
    if req.thinking is not None and req.thinking.type == "disabled":
        chat.reasoning_effort = disabled_thinking_effort(serving, req.model)
    elif req.thinking is not None and req.thinking.type == "enabled":
        chat.thinking_token_budget = req.thinking.budget_tokens
    _set_tools(req, chat)
    return chat


@functools.cache
def merges_inline_system(tokenizer: Tokenizer) -> bool:
    """vLLM's probe: a template that fails on [system, user, system, user] needs system messages first."""
    probe = [{"role": role, "content": "t"} for role in ("system", "user", "system", "user")]
    try:
        tokenizer.render_chat(probe, False)
    except Exception:  # the template's raise_exception, or any error of its own: vLLM merges
        return True
    return False


def disabled_thinking_effort(serving: Serving, model: str) -> str:
    """The reasoning effort of thinking "disabled" (vLLM's auto): "none", unless the template renders
    "none" as it renders some effort (it ignores the switch), or cannot render it: then "low"."""
    def prompt(effort: str) -> str | None:
        probe = ChatCompletionRequest(messages=[{"role": "user", "content": "Hi"}], model=model,
                                      reasoning_effort=effort)
        try:
            return render(serving, probe, probe.messages, None)
        except APIError:
            return None
    unthinking = prompt("none")
    if unthinking is None or any(prompt(effort) == unthinking for effort in EFFORTS):
        return "low"
    return "none"


def _system_text(req: AnthropicRequest, merge: bool) -> str:
    parts = []
    if isinstance(req.system, str) and req.system:
        parts.append(req.system)
    elif req.system:
        parts += [b.text for b in req.system if b.type == "text" and b.text and not b.text.startswith(BILLING_HEADER)]
    if merge:
        parts += [text for m in req.messages if m.role == "system" and (text := _inline_system_text(m))]
    return "".join(parts)


def _inline_system_text(message) -> str | None:
    if isinstance(message.content, str):
        return None if message.content.startswith(BILLING_HEADER) else message.content
    parts = [b.text for b in message.content
             if b.type == "text" and b.text and not b.text.startswith(BILLING_HEADER)]
    return "".join(parts) if parts else None


def _add_message(message, messages: list[dict], merge: bool) -> None:
    """One Anthropic message as chat messages (a user's tool results go first, as tool messages)."""
    if message.role == "system":
        text = None if merge else _inline_system_text(message)
        if text:
            messages.append({"role": "system", "content": text})
        return
    chat: dict[str, Any] = {"role": message.role}
    if isinstance(message.content, str):
        chat["content"] = message.content
    else:
        parts, calls, reasoning = [], [], []
        for block in message.content:
            if block.type == "text" and block.text:
                parts.append({"type": "text", "text": block.text})
            elif block.type == "image" and block.source:
                parts.append({"type": "image_url", "image_url": {"url": _image_url(block.source)}})
            elif block.type == "thinking" and block.thinking is not None:
                reasoning.append(block.thinking)
            elif block.type == "tool_use":
                calls.append({"id": block.id or f"call_{int(time.time())}", "type": "function",
                              "function": {"name": block.name or "", "arguments": json.dumps(block.input or {})}})
            elif block.type == "tool_result" and message.role == "user":
                messages.extend(_tool_answer(block))
            elif block.type == "tool_result":
                parts.append({"type": "text", "text": f"Tool result: {str(block.content) if block.content else ''}"})
        if reasoning:
            chat["reasoning"] = "".join(reasoning)
        if calls:
            chat["tool_calls"] = calls
        if len(parts) == 1 and parts[0]["type"] == "text":
            chat["content"] = parts[0]["text"]
        elif parts:
            chat["content"] = parts
    if message.role != "user" or "content" in chat:
        messages.append(chat)


def _tool_answer(block) -> list[dict]:
    """A user's tool_result: a tool message with its text (then its images, then its tool references)."""
    text, images, references = "", [], []
    if isinstance(block.content, str):
        text = block.content
    elif isinstance(block.content, list):
        texts = []
        for item in block.content:
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "text":
                texts.append(item.get("text", ""))
            elif kind == "image" and (url := _image_url(item.get("source", {}))):
                images.append(url)
            elif kind == "tool_reference" and (name := item.get("tool_name") or item.get("name")):
                references.append({"type": "tool_reference", "name": name})
        text = "\n".join(texts)
    out = [{"role": "tool", "tool_call_id": block.tool_use_id or "", "content": text or ""}]
    if images:
        out.append({"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}} for u in images]})
    if references:
        out.append({"role": "tool", "tool_call_id": block.tool_use_id or "", "content": references})
    return out


def _image_url(source: dict) -> str:
    """vLLM's URL of an image source: its url, or a base64 data URI."""
    if source.get("type") == "url":
        return source.get("url", "")
    return f"data:{source.get('media_type', 'image/jpeg')};base64,{source.get('data', '')}"


def _set_tools(req: AnthropicRequest, chat: ChatCompletionRequest) -> None:
    choice = req.tool_choice
    chat.tool_choice = None
    if choice is not None:
        chat.parallel_tool_calls = not choice.disable_parallel_tool_use
        chat.tool_choice = TOOL_CHOICES.get(choice.type) or ChatCompletionNamedToolChoiceParam.model_validate(
            {"type": "function", "function": {"name": choice.name}})
    tools = _tools_in_effect(req)
    if tools is None:
        return
    chat.tools = [ChatCompletionToolsParam.model_validate({"type": "function", "function": {
        "name": t.name, "description": t.description, "parameters": t.input_schema, "strict": t.strict,
        "defer_loading": t.defer_loading}}) for t in tools]
    if chat.tool_choice is None:
        chat.tool_choice = "auto"


def _tools_in_effect(req: AnthropicRequest) -> list[AnthropicTool] | None:
    """The tools at the end of the conversation: `tools`, changed by the system messages' tool_addition
    (a reference un-defers a declared tool, a definition declares one) and tool_removal blocks."""
    changes = [b for m in req.messages if not isinstance(m.content, str) for b in m.content
               if b.type in ("tool_addition", "tool_removal")]
    if not changes:
        return req.tools
    tools = {tool.name: tool for tool in req.tools or []}
    removed: set[str] = set()
    for block in changes:
        if isinstance(block.tool, AnthropicToolChangeDefinition):
            name = block.tool.definition.name
            tools[name] = block.tool.definition
        else:
            name = block.tool.name
            if name not in tools:
                raise APIError(f"{block.type} references tool {name!r}, which is not declared in tools")
            if block.type == "tool_addition":
                tools[name] = tools[name].model_copy(update={"defer_loading": None})
        if block.type == "tool_removal":
            removed.add(name)
        else:
            removed.discard(name)
    return [tool for name, tool in tools.items() if name not in removed]
