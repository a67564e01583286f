"""The render routes of vLLM 0.33's scale-out front end (`scale_out/render/`): a chat, completion, Anthropic
Messages or Responses request turned into the GenerateRequest(s) a token-in/token-out server runs.

Each is rendered and tokenized exactly as its own route would (so a chat's `token_ids` are what /tokenize
gives for the same messages), its `max_tokens` resolved, and its sampling parameters written as vLLM's
`to_sampling_params` makes them, with `kv_transfer_params` moved out of them into the request. Nothing
reaches the engine: no admission check, no metrics but the HTTP ones. A chat (and an Anthropic request,
which vLLM renders as the chat request it becomes) also carries the `parse_context` a generate server
needs to parse the reply. vLLM's own errors: an unknown model, beam search, a Responses request that
names a previous response (the render server keeps no state).
"""
from __future__ import annotations

from aiohttp import web

from server.chat import chat_params, chat_prompt, conversation, render, tool_parser, with_default_kwargs
from server.completions import check_suffix, render_prompts
from server.errors import APIError, json_response
from server.messages_protocol import AnthropicMessagesRequest
from server.messages_request import to_chat_request
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.responses_input import input_messages, template_tools
from server.responses_protocol import ResponsesRequest
from server.responses_tools import forced_calls, responses_params
from server.sampling_params import SamplingParams, from_completion, hoist_transfer_params
from server.serving import SERVING, Serving


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions/render", render_chat_completion)
    app.router.add_post("/v1/messages/render", render_messages)
    app.router.add_post("/v1/completions/render", render_completion)
    app.router.add_post("/v1/responses/render", render_responses)


# The handlers have comments, not docstrings: a docstring would be the route's description in /openapi.json,
# where vLLM's have none.
async def render_chat_completion(request: web.Request) -> web.Response:
    # a chat request as the GenerateRequest of its conversation
    serving = request.app[SERVING]
    data, _ = await serving.read_json(request, ChatCompletionRequest.model_fields)
    return json_response(render_chat(serving, request, serving.parse(ChatCompletionRequest, data)))


async def render_messages(request: web.Request) -> web.Response:
    # an Anthropic message request, rendered as the chat request vLLM makes of it
    serving = request.app[SERVING]
    data, _ = await serving.read_json(request, AnthropicMessagesRequest.model_fields)
    req = serving.parse(AnthropicMessagesRequest, data)
    return json_response(render_chat(serving, request, to_chat_request(serving, req)))


async def render_completion(request: web.Request) -> web.Response:
    # a completion request as one GenerateRequest per prompt
    serving = request.app[SERVING]
    data, _ = await serving.read_json(request, CompletionRequest.model_fields)
    req = serving.parse(CompletionRequest, data)
    serving.check_model(req.model)
    _refuse_beam_search(req)
    serving.check_max_tokens(req.max_tokens, "max_tokens", req.model)
    serving.check_truncation(req.truncate_prompt_tokens, req.model)
    check_suffix(req)
    prompts, _ = render_prompts(serving, req)
    base_id = f"cmpl-{serving.base_request_id(request, req.request_id)}"
    out = []
    for i, prompt in enumerate(prompts):
        params = from_completion(req, serving.max_tokens_for(len(prompt), req.max_tokens, req.model),
                                 serving.sampling_defaults(req.model).params)
        out.append(generate_request(base_id if len(prompts) == 1 else f"{base_id}-{i}", prompt, params, req))
    return json_response(out)


async def render_responses(request: web.Request) -> web.Response:
    # a Responses request as the GenerateRequest of its conversation (stateless: no previous response)
    serving = request.app[SERVING]
    data, _ = await serving.read_json(request, ResponsesRequest.model_fields)
    req = serving.parse(ResponsesRequest, data)
    serving.check_model(req.model)
    if req.previous_response_id is not None:
        raise APIError("previous_response_id is not supported by the stateless render endpoint.",
                       err_type="invalid_request_error", param="previous_response_id")
    serving.check_max_tokens(req.max_output_tokens, "max_output_tokens", req.model)
    messages = input_messages(req.instructions, req.input, None, None)
    tools = template_tools(req.tools, req.tool_choice, serving.options.exclude_tools_when_tool_choice_none)
    text = render(serving, req, conversation(messages), tools)
    truncate = serving.truncation_length(-1 if req.truncation != "disabled" else None, req.model)
    prompt = serving.encode_text(text, True, req.model, truncate)
    parser = tool_parser(serving)
    forced_calls(req, tools, parser, serving.options.tool_strict_level)  # as vLLM's tool parser adjusts it
    params = responses_params(req, serving.max_tokens_for(len(prompt), req.max_output_tokens, req.model), parser,
                              serving.options.reasoning_parser, serving.sampling_defaults(req.model).params)
    body = generate_request(req.request_id, prompt, params, req, stream_options=False)
    body["reasoning_parser_kwargs"] = _reasoning_parser_kwargs(serving, req)
    return json_response(body)


def render_chat(serving: Serving, request: web.Request, req: ChatCompletionRequest) -> dict:
    """vLLM's render_chat_request: the chat request's GenerateRequest (a dict in its key order)."""
    serving.check_model(req.model)
    _refuse_beam_search(req)
    prompt, _, _, forced, requested = chat_prompt(serving, req)
    params = chat_params(serving, req, serving.max_tokens_for(len(prompt), requested, req.model), forced)
    body = generate_request(f"chatcmpl-{serving.base_request_id(request, req.request_id)}", prompt, params, req)
    include_reasoning = getattr(req, "include_reasoning", True)
    body["reasoning_ended"] = True if include_reasoning is False else None
    body["reasoning_parser_kwargs"] = _reasoning_parser_kwargs(serving, req)
    body["parse_context"] = {
        "tools": [tool.template_dict() for tool in req.tools] if req.tools is not None else None,
        "tool_choice": req.tool_choice.model_dump() if hasattr(req.tool_choice, "model_dump") else req.tool_choice,
        "parallel_tool_calls": req.parallel_tool_calls, "include_reasoning": include_reasoning,
        "chat_template_kwargs": effective_template_kwargs(serving, req),
        "history_tool_call_cnt": sum(_count_calls(m.get("tool_calls")) for m in req.messages
                                     if m.get("role") == "assistant")}
    return body


def generate_request(request_id: str, prompt: list[int], params: SamplingParams, req,
                     stream_options: bool = True) -> dict:
    """vLLM's GenerateRequest of a rendered prompt, as its model_dump writes it (the chat-only fields null)."""
    kv_transfer_params, ec_transfer_params = hoist_transfer_params(params)
    stream = bool(req.stream)
    options = req.stream_options if stream_options and stream else None
    return {"request_id": request_id, "token_ids": prompt, "token_offsets": None, "features": None,
            "content_parts": None, "sampling_params": params.to_json(), "model": req.model, "reasoning_ended": None,
            "reasoning_parser_kwargs": None,
            "return_token_ids": getattr(req, "return_token_ids", None) if stream_options else None,
            "output_mode": "tokens", "parse_context": None, "stream": stream,
            "stream_options": options.model_dump() if options is not None else None, "cache_salt": req.cache_salt,
            "priority": req.priority, "kv_transfer_params": kv_transfer_params,
            "ec_transfer_params": ec_transfer_params}


def effective_template_kwargs(serving: Serving, req) -> dict:
    """vLLM's effective chat_template_kwargs of a chat request: the request's, then how the reply is
    prompted, its reasoning effort and (with one, unless the request set it) thinking on or off, over
    --default-chat-template-kwargs."""
    effort = getattr(req, "reasoning_effort", None)
    user = req.chat_template_kwargs or {}
    extra = {"add_generation_prompt": req.add_generation_prompt,
             "continue_final_message": getattr(req, "continue_final_message", False), "reasoning_effort": effort}
    if effort is not None and "enable_thinking" not in user:
        extra["enable_thinking"] = effort != "none"
    merged = {**user, **{k: v for k, v in extra.items() if v is not None and v != "auto"}}
    return with_default_kwargs(serving.options.default_chat_template_kwargs, merged)


def _reasoning_parser_kwargs(serving: Serving, req) -> dict | None:
    """What vLLM's render passes the engine's reasoning parser (only a server with one)."""
    return {"chat_template_kwargs": effective_template_kwargs(serving, req)} if serving.options.reasoning else None


def _refuse_beam_search(req) -> None:
    if req.use_beam_search:
        raise APIError("Beam search is not supported by the render endpoint")


def _count_calls(calls) -> int:
    """vLLM's count_tool_calls of one assistant message."""
    if calls is None:
        return 0
    if isinstance(calls, (str, bytes, dict)):
        return 1
    return len(calls) if isinstance(calls, (list, tuple)) else 1
