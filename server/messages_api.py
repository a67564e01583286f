"""Anthropic Messages API (POST /v1/messages, POST /v1/messages/count_tokens), as vLLM 0.33 serves it
(`entrypoints/anthropic/api_router.py`).

A message request is turned into the chat request vLLM makes of it (`messages_request.py`) and run through the
chat path, which answers it as an Anthropic message (`messages_answer.py`) or its stream of events
(`messages_stream.py`); a token count renders and tokenizes that chat request as /tokenize would (a gpt-oss
model's with Harmony, as its chat route renders it). As in vLLM, a body that fails before the handler (not
JSON, not `application/json`, not a valid request: `max_tokens` missing, an unknown role) gets vLLM's usual
OpenAI-shaped 400, while every error after (an unknown model, a prompt too long, a full queue, a tool_choice
the server cannot parse) is answered in Anthropic's shape, `{"type": "error", "error": {"type", "message"}}`,
with the same status. Both routes count in /load with --enable-server-load-tracking; --api-key guards them
like every /v1 route (`Authorization: Bearer`; vLLM reads no `x-api-key`).
"""
from __future__ import annotations

import logging
from collections.abc import Awaitable

from aiohttp import web

from server import harmony_prompt, messages_answer
from server.chat import answer_chat, check_tool_choice, conversation, render, tool_parsing, tools_for_template
from server.errors import APIError, json_response
from server.harmony import check_effort, uses_harmony
from server.messages_protocol import AnthropicCountTokensRequest, AnthropicMessagesRequest
from server.messages_request import to_chat_request
from server.messages_stream import MessagesStream
from server.protocol import ChatCompletionNamedToolChoiceParam, ChatCompletionRequest
from server.load_tracking import counted_load
from server.serving import SERVING, Serving

log = logging.getLogger("vllm_emulator.server")


def add_routes(app: web.Application) -> None:
    """Register this API's routes on the app."""
    app.router.add_post("/v1/messages", create_messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)


# The handlers have comments, not docstrings: a docstring would be the route's description in /openapi.json,
# where vLLM's have none.
async def create_messages(request: web.Request) -> web.StreamResponse:
    # a message, or its stream of events
    serving = request.app[SERVING]
    data, arrival = await serving.read_json(request, AnthropicMessagesRequest.model_fields)
    req = serving.parse(AnthropicMessagesRequest, data)
    return await _answered(serving, _create(serving, request, req, arrival))


async def count_tokens(request: web.Request) -> web.StreamResponse:
    # the prompt tokens of the chat request a message request would be
    serving = request.app[SERVING]
    data, _ = await serving.read_json(request, AnthropicCountTokensRequest.model_fields)
    req = serving.parse(AnthropicCountTokensRequest, data)
    return await _answered(serving, _count(serving, request, req))


async def _create(serving: Serving, request: web.Request, req: AnthropicMessagesRequest,
                  arrival: float) -> web.StreamResponse:
    chat = to_chat_request(serving, req)
    # vLLM's route runs through create_chat_completion, so its rejection cleanup too (a decode pod frees a
    # prefill it turns away)
    with serving.kv_transfer_rejection_cleanup(request, chat):
        _check_forced_tool(serving, chat)
        return await answer_chat(serving, request, chat, arrival, MessagesStream, messages_answer.message)


async def _count(serving: Serving, request: web.Request, req: AnthropicCountTokensRequest) -> web.Response:
    chat = to_chat_request(serving, req)
    serving.check_model(chat.model)
    serving.check_admission(request, 1, chat.model)  # vLLM's render of a chat request checks admission too
    if uses_harmony(serving, chat.model):  # vLLM renders a gpt-oss chat with Harmony (no tool-choice check)
        check_effort(chat.reasoning_effort, chat=True)
        count = len(harmony_prompt.chat_prompt(serving, chat, tools_for_template(serving, chat))[0])
    else:
        check_tool_choice(serving, chat)
        text = render(serving, chat, conversation(chat.messages), tools_for_template(serving, chat))
        count = len(serving.encode_text(text, chat.add_special_tokens, chat.model))
    return json_response({"input_tokens": count, "context_management": {"original_input_tokens": count}})


def _check_forced_tool(serving: Serving, chat: ChatCompletionRequest) -> None:
    """A forced tool (tool_choice "any" or a named tool, with a tool parser) needs the tools it is forced
    among: vLLM's tool parser refuses a named tool that is not one of them (400). As vLLM sets tool_choice
    after building the chat request, chat's own check of it has not run; without `tools` at all vLLM goes
    on and fails on the reply: the emulator refuses such a request with chat's message instead."""
    forced = chat.tool_choice == "required" or isinstance(chat.tool_choice, ChatCompletionNamedToolChoiceParam)
    if not forced or not tool_parsing(serving):
        return
    if chat.tools is None:
        raise APIError("When using `tool_choice`, `tools` must be set.")
    named = chat.tool_choice if isinstance(chat.tool_choice, ChatCompletionNamedToolChoiceParam) else None
    if named is not None and not any(tool.function.name == named.function.name for tool in chat.tools):
        raise APIError(f"Tool '{named.function.name}' has not been passed in `tools`.")


async def _answered(serving: Serving, answer: Awaitable[web.StreamResponse]) -> web.StreamResponse:
    """`answer`, counted in /load, with any failure in Anthropic's shape and the status vLLM's
    create_error_response gives it (an exception of ours is logged, as vLLM's router logs it)."""
    try:
        with counted_load(serving):
            return await answer
    except APIError as exc:
        return messages_answer.error_response(exc.status, exc.message)
    except (ConnectionError, web.HTTPException):  # the client left, or aiohttp's own answer: the app's middleware's
        raise
    except Exception as exc:
        log.exception("Error in an Anthropic Messages request")
        if isinstance(exc, (ValueError, TypeError, OverflowError)):
            status = 400
        else:
            status = 501 if isinstance(exc, NotImplementedError) else 500
        return messages_answer.error_response(status, str(exc))
