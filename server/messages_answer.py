"""What vLLM 0.33's Anthropic Messages API answers (`anthropic/serving.py`, `protocol.py`): the message made
from a chat response, its stop reason and usage, and errors in Anthropic's shape.

The message keeps the chat response's id (`chatcmpl-...`: vLLM sets the id from the chat response, so
no `msg_` id is made) and model; its content is a thinking block with the reasoning parser's reasoning
(server/reasoning.py; signed with a random hex id), the text (when there is any), then one tool_use block
per tool call (the arguments parsed as JSON), or one empty text block when there is none of them. It is
written as vLLM's router writes it (`exclude_none`: no `stop_sequence` unless one matched, no cache
fields unless --enable-prompt-tokens-details fills them).
"""
from __future__ import annotations

import json
import uuid
from http import HTTPStatus

from aiohttp import web

from server.errors import json_response

# Anthropic's error types by status (vLLM's translate_error_type); other 4xx are invalid requests, 5xx api errors
ERROR_TYPES = {
    HTTPStatus.BAD_REQUEST: "invalid_request_error",
    HTTPStatus.UNAUTHORIZED: "authentication_error",
    HTTPStatus.FORBIDDEN: "permission_error",
    HTTPStatus.NOT_FOUND: "not_found_error",
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: "request_too_large",
    HTTPStatus.TOO_MANY_REQUESTS: "rate_limit_error",
    HTTPStatus.SERVICE_UNAVAILABLE: "overloaded_error",
}


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": error_type(status), "message": message}}


def error_response(status: int, message: str) -> web.Response:
    return json_response(error_body(status, message), status)


def stop_reason(finish_reason: str | None, matched: int | str | None, tool_used: bool,
                tool_complete: bool) -> tuple[str | None, str | None]:
    """Anthropic's (stop_reason, stop_sequence) of a chat finish: max_tokens always wins, then complete tool
    calls, then a matched stop string; any other ending of "stop" is end_turn (an abort: none)."""
    if finish_reason == "length":
        return "max_tokens", None
    if finish_reason not in ("stop", "tool_calls"):
        return None, None
    if tool_complete:
        return "tool_use", None
    if isinstance(matched, str):
        return "stop_sequence", matched
    if finish_reason == "tool_calls" or tool_used:
        return "tool_use", None
    return "end_turn", None


def usage(chat_usage: dict) -> dict:
    """Anthropic's usage of a chat usage: prompt tokens read from or written to the prefix cache (as
    --enable-prompt-tokens-details reports them) are not counted again as input tokens."""
    out = {"input_tokens": chat_usage["prompt_tokens"], "output_tokens": chat_usage.get("completion_tokens") or 0}
    details = chat_usage.get("prompt_tokens_details")
    if details is not None:
        if details.get("created_cache_tokens") is not None:
            out["cache_creation_input_tokens"] = details["created_cache_tokens"]
        if details.get("cached_tokens") is not None:
            out["cache_read_input_tokens"] = details["cached_tokens"]
    out["input_tokens"] = max(0, out["input_tokens"] - out.get("cache_creation_input_tokens", 0)
                              - out.get("cache_read_input_tokens", 0))
    return out


def message(response: dict) -> dict:
    """The message vLLM makes of a non-streaming chat response (its first choice)."""
    choice = response["choices"][0]
    chat = choice["message"]
    calls = chat.get("tool_calls") or []
    reason, sequence = stop_reason(choice["finish_reason"], choice["stop_reason"], bool(calls), bool(calls))
    content = [{"type": "thinking", "thinking": chat["reasoning"], "signature": uuid.uuid4().hex}] \
        if chat.get("reasoning") else []  # the reasoning parser's, signed with a random hex id as vLLM's
    content += [{"type": "text", "text": chat["content"]}] if chat["content"] else []
    content += [{"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                 "input": json.loads(call["function"]["arguments"])} for call in calls]
    body = {"id": response["id"], "type": "message", "role": "assistant",
            "content": content or [{"type": "text", "text": ""}], "model": response["model"],
            "stop_reason": reason, "stop_sequence": sequence, "usage": usage(response["usage"]),
            "kv_transfer_params": response["kv_transfer_params"], "ec_transfer_params": response["ec_transfer_params"]}
    return {key: value for key, value in body.items() if value is not None}
