"""The derender routes of vLLM 0.33's scale-out front end (`scale_out/derender/`): generate's token ids
back into a chat or completion answer, with no engine involved.

POST /v1/chat/completions/derender and /v1/completions/derender take either a whole generate response
(`stream` false: a ChatCompletionResponse or CompletionResponse comes back) or one chunk of generate's
stream with the `stream_state` the previous call returned (`stream` true: the chat or completion chunk
comes back with the next state; the client carries the state, the server keeps none). Text comes from
the tokenizer as the engine's detokenizer makes it (detokenizer.py), logprobs from generate's token ids
with chat's or completions' cut. With a tool parser (`--enable-auto-tool-choice --tool-call-parser`)
or a reasoning parser, a `chat_request` is required, and a forced tool call in it is read back into
tool calls, streamed by replaying the earlier chunks as vLLM does. vLLM's limits and messages: at most
VLLM_MAX_N_SEQUENCES choices, token lists within max_model_len, top logprobs within --max-logprobs,
no stop strings in a stream.
"""
from __future__ import annotations

import time

from aiohttp import web

from server import detokenizer, tool_calls
from server.chat import tool_parsing
from server.errors import APIError, json_response
from server.generate_protocol import (DerenderChatRequest, DerenderChatStreamRequest, DerenderCompletionRequest,
                                      DerenderCompletionStreamRequest, DerenderStreamState, GenerateLogProbs,
                                      GenerateTokensResponse, GenerateTokensStreamResponse, parse_union)
from server.protocol import MAX_N_SEQUENCES, ChatCompletionRequest, CompletionRequest
from server.serving import SERVING, Serving

STREAM_STOP_STRINGS_ERROR = ("stop strings are not supported by streaming derender because text already sent "
                             "cannot be cut. Use non-streaming derender or output_mode=text on "
                             "/inference/v1/generate which holds stop strings back.")
PARSER_NEEDS_CHAT_REQUEST = ("chat_request is required when a tool or reasoning parser is configured because "
                             "plain detokenization would leak raw parser markup into content.")
LOGPROB_CONTEXT = 4  # the sampled ids carried for byte-fallback correction (vLLM's _LOGPROB_CONTEXT_WINDOW)
CHAT_FIELDS = frozenset(DerenderChatRequest.model_fields) | frozenset(DerenderChatStreamRequest.model_fields)
COMPLETION_FIELDS = (frozenset(DerenderCompletionRequest.model_fields)
                     | frozenset(DerenderCompletionStreamRequest.model_fields))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions/derender", derender_chat_completion)
    app.router.add_post("/v1/completions/derender", derender_completion)


# The handlers have comments, not docstrings: a docstring would be the route's description in /openapi.json.
async def derender_chat_completion(request: web.Request) -> web.Response:
    # a generate response (or one chunk of its stream) as a chat completion (or chunk)
    serving = request.app[SERVING]
    data, _ = await serving.read_json(request, CHAT_FIELDS)
    req = parse_union(data, DerenderChatRequest, DerenderChatStreamRequest)
    derender = ChatDerender(serving, req.model, req.chat_request)
    if isinstance(req, DerenderChatStreamRequest):
        return json_response(derender.stream_chunk(req))
    return json_response(derender.response(req))


async def derender_completion(request: web.Request) -> web.Response:
    # generate responses (or one chunk of a stream) as a completion (or chunk)
    serving = request.app[SERVING]
    data, _ = await serving.read_json(request, COMPLETION_FIELDS)
    req = parse_union(data, DerenderCompletionRequest, DerenderCompletionStreamRequest)
    derender = CompletionDerender(serving, req.model, req.completion_request)
    if isinstance(req, DerenderCompletionStreamRequest):
        return json_response(derender.stream_chunk(req))
    return json_response(derender.response(req))


class _Derender:
    """What chat and completion derender share: the checks, the decoding parameters, logprobs."""

    def __init__(self, serving: Serving, model: str | None, original: ChatCompletionRequest | CompletionRequest | None,
                 preserve_special: bool = False) -> None:
        """`model`: the served name the request names (its tokenizer and context); `original`: the request
        that was rendered, when the client sends it."""
        serving.check_model(model)
        self.serving = serving
        self.model = model or serving.model_name
        self.original = original
        self.tokenizer = serving.require_tokenizer(model)
        self.max_model_len = serving.max_model_len_for(model)
        # vLLM's _decode_params: a parser sees special tokens; otherwise the request's skip_special_tokens
        self.skip_special = not preserve_special and (original is None or original.skip_special_tokens is not False)

    def check_bounds(self, responses: list[GenerateTokensResponse]) -> None:
        """vLLM's _validate_derender_bounds, before anything is decoded."""
        max_len, max_logprobs = self.max_model_len, self.serving.options.max_logprobs
        if len(responses) > MAX_N_SEQUENCES:
            raise APIError(f"generate_responses count ({len(responses)}) exceeds server maximum ({MAX_N_SEQUENCES}). "
                           "Set VLLM_MAX_N_SEQUENCES to increase this limit.")
        for gen in responses:
            if len(gen.choices) > MAX_N_SEQUENCES:
                raise APIError(f"choices count ({len(gen.choices)}) in response '{gen.request_id}' exceeds server "
                               f"maximum ({MAX_N_SEQUENCES}).")
            for choice in gen.choices:
                if choice.token_ids and len(choice.token_ids) > max_len:
                    raise APIError(f"token_ids length ({len(choice.token_ids)}) in choice {choice.index} exceeds "
                                   f"max_model_len ({max_len}).")
                content = choice.logprobs.content if choice.logprobs else None
                if content and len(content) > max_len:
                    raise APIError(f"logprobs.content length ({len(content)}) in choice {choice.index} exceeds "
                                   f"max_model_len ({max_len}).")
                for entry in content or ():
                    if max_logprobs >= 0 and entry.top_logprobs and len(entry.top_logprobs) > max_logprobs:
                        raise APIError(f"top_logprobs count ({len(entry.top_logprobs)}) in choice {choice.index} "
                                       f"exceeds max_logprobs ({max_logprobs}).")
            if gen.prompt_logprobs and len(gen.prompt_logprobs) > max_len:
                raise APIError(f"prompt_logprobs length ({len(gen.prompt_logprobs)}) in response '{gen.request_id}' "
                               f"exceeds max_model_len ({max_len}).")

    def check_prompt_ids(self, prompt_ids: list[int] | None) -> None:
        if prompt_ids is not None and len(prompt_ids) > self.max_model_len:
            raise APIError(f"prompt_token_ids length ({len(prompt_ids)}) exceeds max_model_len "
                           f"({self.max_model_len}).")

    def seed(self, prompt_ids: list[int] | None) -> detokenizer.Window:
        return detokenizer.seed(self.tokenizer, prompt_ids, self.skip_special)

    def drop_stop_token(self, ids: list[int], finish_reason: str | None, stop_reason) -> tuple[list[int], object]:
        original = self.original
        return detokenizer.drop_stop_token(
            ids, finish_reason, stop_reason, self.tokenizer.eos_token_id,
            list(original.stop_token_ids or ()) if original is not None else [],
            original is not None and original.ignore_eos, original is not None and original.include_stop_str_in_output)

    def resolve_logprobs(self, logprobs: GenerateLogProbs, context: list[int], top_limit: int | None) -> dict:
        """vLLM's _resolve_logprobs: generate's ids as chat's {token, logprob, bytes, top_logprobs}, a token
        that ends in U+FFFD decoded again with the sampled tokens before it."""
        if logprobs.content is None:
            return {"content": None}
        context, content = list(context), []
        for entry in logprobs.content:
            top = entry.top_logprobs if top_limit is None else entry.top_logprobs[:top_limit]
            token = self._token(entry.token_id, context)
            content.append({"token": token, "logprob": entry.logprob, "bytes": list(token.encode()),
                            "top_logprobs": [{"token": (t := self._token(alt.token_id, context)),
                                              "logprob": alt.logprob, "bytes": list(t.encode())} for alt in top]})
            context.append(entry.token_id)
        return {"content": content}

    def _token(self, token_id: int, context: list[int]) -> str:
        text = detokenizer.token_text(self.tokenizer, token_id)
        return _corrected(self.tokenizer, token_id, context) if text.endswith("\ufffd") else text

    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
                "completion_tokens": completion_tokens, "prompt_tokens_details": None,
                "completion_tokens_details": None}

    @staticmethod
    def chunk_usage(chunk: GenerateTokensStreamResponse, prompt_tokens: int | None) -> dict | None:
        if chunk.usage is None:
            return None
        prompt = prompt_tokens if prompt_tokens is not None else (chunk.usage.prompt_tokens or 0)
        return _Derender.usage(prompt, chunk.usage.completion_tokens or 0)


def _corrected(tokenizer, token_id: int, context: list[int]) -> str:
    """vLLM's _correct_decoded_token: a byte-fallback token's text read with up to 4 sampled tokens before it."""
    for size in range(1, min(len(context), LOGPROB_CONTEXT) + 1):
        window = context[-size:]
        full = tokenizer.decode(window + [token_id], skip_special_tokens=False)
        if full.endswith("\ufffd"):
            continue
        clean_end = len(window)
        for j in range(len(window) - 1, -1, -1):
            if not tokenizer.decode([window[j]], skip_special_tokens=False).endswith("\ufffd"):
                break
            clean_end = j
        prefix = tokenizer.decode(window[:clean_end], skip_special_tokens=False) if clean_end else ""
        if full.startswith(prefix):
            return full[len(prefix):]
        common = 0
        for a, b in zip(prefix, full):
            if a != b:
                break
            common += 1
        return full[common:]
    return ""


def _context_tail(context: list[int], delta: list[int]) -> list[int]:
    return (list(context) + list(delta))[-LOGPROB_CONTEXT:]


# -- chat -------------------------------------------------------------------------------------------
class ChatDerender(_Derender):
    def __init__(self, serving: Serving, model: str | None, chat: ChatCompletionRequest | None) -> None:
        self.parser = tool_parsing(serving) or serving.options.reasoning  # vLLM's derenderer has a parser
        super().__init__(serving, model, chat, preserve_special=self.parser and chat is not None)
        self.forced = chat is not None and tool_parsing(serving) and tool_calls.forced_constraint(chat) is not None
        if chat is None or not chat.logprobs:  # vLLM's chat cut: top_logprobs of them, all for -1
            self.top_limit = None
        else:
            self.top_limit = None if chat.top_logprobs == -1 else chat.top_logprobs or 0

    def response(self, req: DerenderChatRequest) -> dict:
        """vLLM's derender_chat_response: a ChatCompletionResponse (every key, nulls included)."""
        model = self.model
        gen, chat = req.generate_response, self.original
        self.check_bounds([gen])
        self.check_prompt_ids(req.prompt_token_ids)
        if self.parser and chat is None:
            raise APIError(PARSER_NEEDS_CHAT_REQUEST)
        hide = self.parser and chat is not None and getattr(chat, "include_reasoning", True) is False
        return_ids = chat is not None and bool(chat.return_token_ids) and not hide
        window = self.seed(req.prompt_token_ids if req.prompt_token_ids is not None else gen.prompt_token_ids)
        choices = []
        for choice in gen.choices:
            if not choice.token_ids:
                raise APIError(f"choice {choice.index} has empty or null token_ids")
            logprobs = None
            if choice.logprobs is not None and not hide:
                logprobs = self.resolve_logprobs(choice.logprobs, [], self.top_limit)
            text, stop_reason = detokenizer.decode_output(self.tokenizer, choice.token_ids, window,
                                                          choice.finish_reason, choice.stop_reason, chat,
                                                          self.skip_special)
            message, calls = self._message(text)
            choices.append({"index": choice.index, "message": message, "logprobs": logprobs,
                            "finish_reason": self._finish_reason(choice.finish_reason, bool(calls)),
                            "stop_reason": stop_reason, "token_ids": choice.token_ids if return_ids else None,
                            "routed_experts": None, "weight_versions": None})
        completion_tokens = sum(len(c.token_ids) for c in gen.choices if c.token_ids)
        return {"id": gen.request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": choices, "service_tier": None, "system_fingerprint": None,
                "usage": self.usage(req.prompt_tokens or 0, completion_tokens),
                "prompt_logprobs": _prompt_logprobs(gen),
                "prompt_token_ids": gen.prompt_token_ids if chat is not None and chat.return_token_ids else None,
                "prompt_text": None, "kv_transfer_params": gen.kv_transfer_params, "ec_transfer_params": None,
                "metrics": gen.metrics}

    def stream_chunk(self, req: DerenderChatStreamRequest) -> dict:
        """vLLM's derender_chat_stream_response: {"chunk": a chat.completion.chunk, "stream_state": the next}."""
        model = self.model
        chat, chunk = self.original, req.generate_chunk
        if chat is not None and chat.stop_strings():
            raise APIError(STREAM_STOP_STRINGS_ERROR)
        if self.parser and chat is None:
            raise APIError(PARSER_NEEDS_CHAT_REQUEST)
        if self.parser and req.prompt_token_ids is None:
            raise APIError("prompt_token_ids is required when a tool or reasoning parser is configured. Without it "
                           "parse_delta cannot tell whether the prompt left reasoning open (e.g. a chat template "
                           "that pre-opens <think>) and would misclassify reasoning content as plain content.")
        if len(chunk.choices) > 1:
            raise APIError(f"derender_chat_stream expects at most one choice per chunk (got {len(chunk.choices)}).")
        state = req.stream_state
        prompt_len = len(req.prompt_token_ids) if req.prompt_token_ids is not None else 0
        prior = len(state.output_token_ids) if state is not None else 0
        delta = sum(len(c.token_ids) for c in chunk.choices if c.token_ids)
        if prompt_len + prior + delta > self.max_model_len:
            raise APIError(f"prompt_token_ids length ({prompt_len}) plus output_token_ids length ({prior}) plus "
                           f"delta ({delta}) exceeds max_model_len ({self.max_model_len}).")
        if self.parser:
            choices, state = self._parsed_choices(req, state or DerenderStreamState())
        else:
            choices, state = self._plain_choices(req, state)
        out = {"id": chunk.request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
               "choices": choices, "usage": self.chunk_usage(chunk, req.prompt_tokens), "system_fingerprint": None,
               "prompt_token_ids": chunk.prompt_token_ids if chat is not None and chat.return_token_ids else None,
               "prompt_text": None, "metrics": chunk.metrics, "kv_transfer_params": None}
        return {"chunk": out, "stream_state": state.model_dump()}

    def _plain_choices(self, req: DerenderChatStreamRequest,
                       state: DerenderStreamState | None) -> tuple[list[dict], DerenderStreamState]:
        """Without a parser: the chunk's text, incrementally decoded from the carried window."""
        chunk, chat = req.generate_chunk, self.original
        if state is None:  # the first chunk: the window starts from the prompt's tail
            window = self.seed(req.prompt_token_ids if req.prompt_token_ids is not None else chunk.prompt_token_ids)
            state = DerenderStreamState(prev_tokens=window.prev_tokens, prefix_offset=window.prefix_offset,
                                        read_offset=window.read_offset)
        context, choices = state.logprob_context_token_ids, []
        for choice in chunk.choices:
            ids = choice.token_ids or []
            text_ids, stop_reason = self.drop_stop_token(ids, choice.finish_reason, choice.stop_reason)
            text, window = detokenizer.decode_delta(self.tokenizer, text_ids, _window(state), self.skip_special)
            logprobs = self.resolve_logprobs(choice.logprobs, context, self.top_limit) if choice.logprobs else None
            delta = {"role": None if state.role_sent else "assistant", "content": text or None, "reasoning": None}
            state = state.model_copy(update={"prev_tokens": window.prev_tokens, "prefix_offset": window.prefix_offset,
                                             "read_offset": window.read_offset, "role_sent": True,
                                             "logprob_context_token_ids": _context_tail(context, ids)})
            choices.append({"index": choice.index, "delta": delta, "logprobs": logprobs,
                            "finish_reason": choice.finish_reason, "stop_reason": stop_reason,
                            "token_ids": choice.token_ids if chat is not None and chat.return_token_ids else None,
                            "weight_versions": None})
        return choices, state

    def _parsed_choices(self, req: DerenderChatStreamRequest,
                        state: DerenderStreamState) -> tuple[list[dict], DerenderStreamState]:
        """With a parser: a fresh parser replays every earlier chunk (its state cannot travel), then parses
        this one, as vLLM's _derender_chat_stream_parsed does; tool call ids stay those first sent."""
        chunk, chat = req.generate_chunk, self.original
        stream = tool_calls.ToolCallStream(chat) if self.forced else None
        window = self.seed(req.prompt_token_ids)
        start = 0
        for size in state.output_chunk_lens:
            text, window = detokenizer.decode_delta(self.tokenizer, state.output_token_ids[start:start + size],
                                                    window, self.skip_special)
            start += size
            if stream is not None:
                stream.delta(0, text)
        hide = getattr(chat, "include_reasoning", True) is False
        output_ids, chunk_lens = list(state.output_token_ids), list(state.output_chunk_lens)
        call_ids, role_sent, made = list(state.last_tool_call_ids), state.role_sent, state.tools_streamed
        choices = []
        for choice in chunk.choices:
            ids = choice.token_ids or []
            text_ids, stop_reason = self.drop_stop_token(ids, choice.finish_reason, choice.stop_reason)
            text = ""
            if ids:
                text, window = detokenizer.decode_delta(self.tokenizer, text_ids, window, self.skip_special)
            delta: dict = {"role": None, "content": None, "reasoning": None}
            if stream is not None:
                calls = stream.delta(0, text) if ids else None
                if calls:
                    made = True
                    for call in calls:
                        if "id" in call:  # pinned: the id this call was first sent with
                            if call["index"] < len(call_ids):
                                call["id"] = call_ids[call["index"]]
                            else:
                                call_ids.append(call["id"])
                    delta["tool_calls"] = calls
            elif text:
                delta["content"] = text
            if ids:
                output_ids += ids
                chunk_lens.append(len(ids))
            logprobs = None
            if choice.logprobs is not None and not hide:
                logprobs = self.resolve_logprobs(choice.logprobs, state.logprob_context_token_ids, self.top_limit)
            if not role_sent:
                delta["role"], role_sent = "assistant", True
            finish = tool_calls.finish_reason(chat, choice.finish_reason, made) if stream is not None \
                else choice.finish_reason
            choices.append({"index": choice.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish,
                            "stop_reason": stop_reason,
                            "token_ids": choice.token_ids if chat.return_token_ids and not hide else None,
                            "weight_versions": None})
        state = state.model_copy(update={
            "output_token_ids": output_ids, "output_chunk_lens": chunk_lens, "role_sent": role_sent,
            "tools_streamed": made, "last_tool_call_ids": call_ids,
            "logprob_context_token_ids": _context_tail(state.logprob_context_token_ids,
                                                       chunk.choices[0].token_ids or [] if chunk.choices else [])})
        return choices, state

    def _message(self, text: str) -> tuple[dict, list[dict]]:
        """The assistant message of a whole output: its text, or the calls a forced tool call makes of it."""
        message = {"role": "assistant", "content": text, "refusal": None, "annotations": None, "audio": None,
                   "function_call": None}
        calls = []
        if self.forced:
            calls = tool_calls.parse_tool_calls(self.original, text)
            message["content"] = ""
            if calls:
                message["tool_calls"] = calls
        message["reasoning"] = None
        return message, calls

    def _finish_reason(self, engine_reason: str | None, calls_made: bool) -> str:
        """vLLM's resolve_finish_reason (engine None reads as "stop")."""
        reason = engine_reason or "stop"
        if self.original is None:
            return reason
        return tool_calls.finish_reason(self.original, reason, calls_made)


# -- completions ------------------------------------------------------------------------------------
class CompletionDerender(_Derender):
    def __init__(self, serving: Serving, model: str | None, completion: CompletionRequest | None) -> None:
        super().__init__(serving, model, completion)
        k = completion.logprobs if completion is not None else None
        self.top_limit = None if k is None or k == -1 else max(k + 1, 0)  # vLLM's completions cut

    def response(self, req: DerenderCompletionRequest) -> dict:
        """vLLM's derender_completion_response: one CompletionResponse of every prompt's response."""
        model = self.model
        responses, original = req.generate_responses, self.original
        if not responses:
            raise APIError("generate_responses must not be empty")
        self.check_bounds(responses)
        for ids in req.prompt_token_ids or ():
            self.check_prompt_ids(ids)
        return_ids = original is not None and bool(original.return_token_ids)
        prompt_counts = req.prompt_tokens if req.prompt_tokens is not None else [0] * len(responses)
        prompt_ids = req.prompt_token_ids if req.prompt_token_ids is not None else [None] * len(responses)
        choices, completion_tokens = [], 0
        for gen, seed_ids in zip(responses, prompt_ids):
            window = self.seed(seed_ids if seed_ids is not None else gen.prompt_token_ids)
            for choice in gen.choices:
                if not choice.token_ids:
                    raise APIError(f"choice {choice.index} in response {gen.request_id} has empty or null token_ids")
                text, stop_reason = detokenizer.decode_output(self.tokenizer, choice.token_ids, window,
                                                              choice.finish_reason, choice.stop_reason, original,
                                                              self.skip_special)
                logprobs = None
                if choice.logprobs is not None:
                    logprobs = _completion_logprobs(self.resolve_logprobs(choice.logprobs, [], self.top_limit),
                                                    choice.logprobs, 0)
                choices.append({"index": len(choices), "text": text, "logprobs": logprobs,
                                "finish_reason": choice.finish_reason, "stop_reason": stop_reason,
                                "token_ids": choice.token_ids if return_ids else None, "prompt_logprobs": None,
                                "prompt_token_ids": gen.prompt_token_ids if return_ids else None,
                                "routed_experts": None, "weight_versions": None})
                completion_tokens += len(choice.token_ids)
        kv_params = responses[0].kv_transfer_params
        if any(gen.kv_transfer_params != kv_params for gen in responses[1:]):
            kv_params = None  # (vLLM warns: one response cannot carry several)
        return {"id": responses[0].request_id, "object": "text_completion", "created": int(time.time()),
                "model": model, "choices": choices, "service_tier": None, "system_fingerprint": None,
                "usage": self.usage(sum(prompt_counts), completion_tokens), "kv_transfer_params": kv_params,
                "ec_transfer_params": None, "metrics": responses[0].metrics if len(responses) == 1 else None}

    def stream_chunk(self, req: DerenderCompletionStreamRequest) -> dict:
        """vLLM's derender_completion_stream_response: {"chunk": a completion chunk, "stream_state": the next}."""
        model = self.model
        original, chunk = self.original, req.generate_chunk
        if original is not None and original.stop_strings():
            raise APIError(STREAM_STOP_STRINGS_ERROR)
        self.check_prompt_ids(req.prompt_token_ids)
        if len(chunk.choices) > 1:
            raise APIError("derender_completion_stream expects at most one choice per chunk")
        state = req.stream_state
        if state is None:
            window = self.seed(req.prompt_token_ids if req.prompt_token_ids is not None else chunk.prompt_token_ids)
            state = DerenderStreamState(prev_tokens=window.prev_tokens, prefix_offset=window.prefix_offset,
                                        read_offset=window.read_offset)
        return_ids = original is not None and bool(original.return_token_ids)
        choices = []
        for choice in chunk.choices:
            ids = choice.token_ids or []
            text_ids, stop_reason = self.drop_stop_token(ids, choice.finish_reason, choice.stop_reason)
            text, window = detokenizer.decode_delta(self.tokenizer, text_ids, _window(state), self.skip_special)
            logprobs, offset = None, state.logprob_text_offset + len(text)
            if choice.logprobs is not None:
                resolved = self.resolve_logprobs(choice.logprobs, state.logprob_context_token_ids, self.top_limit)
                logprobs = _completion_logprobs(resolved, choice.logprobs, state.logprob_text_offset)
                if logprobs["tokens"]:
                    offset = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
            state = state.model_copy(update={
                "prev_tokens": window.prev_tokens, "prefix_offset": window.prefix_offset,
                "read_offset": window.read_offset, "logprob_text_offset": offset,
                "logprob_context_token_ids": _context_tail(state.logprob_context_token_ids, ids)})
            choices.append({"index": choice.index, "text": text, "logprobs": logprobs,
                            "finish_reason": choice.finish_reason, "stop_reason": stop_reason,
                            "prompt_token_ids": chunk.prompt_token_ids if return_ids else None,
                            "token_ids": choice.token_ids if return_ids else None, "weight_versions": None})
        out = {"id": chunk.request_id, "object": "text_completion", "created": int(time.time()), "model": model,
               "choices": choices, "usage": self.chunk_usage(chunk, req.prompt_tokens), "system_fingerprint": None,
               "metrics": chunk.metrics, "kv_transfer_params": None}
        return {"chunk": out, "stream_state": state.model_dump()}


def _completion_logprobs(resolved: dict, source: GenerateLogProbs, text_offset: int) -> dict:
    """vLLM's conversion of chat logprobs to completions' parallel lists (a position generate gave no
    candidates for has top_logprobs None)."""
    out = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
    if resolved["content"] is None:
        return out
    for entry, generated in zip(resolved["content"], source.content or ()):
        out["text_offset"].append(text_offset)
        out["tokens"].append(entry["token"])
        out["token_logprobs"].append(entry["logprob"])
        out["top_logprobs"].append({t["token"]: t["logprob"] for t in entry["top_logprobs"]}
                                   if generated.top_logprobs else None)
        text_offset += len(entry["token"])
    return out


def _window(state: DerenderStreamState) -> detokenizer.Window:
    return detokenizer.Window(list(state.prev_tokens), state.prefix_offset, state.read_offset)


def _prompt_logprobs(gen: GenerateTokensResponse) -> list | None:
    """generate's prompt_logprobs, as the chat response carries them (keys as JSON writes them)."""
    if gen.prompt_logprobs is None:
        return None
    return [None if entry is None else {str(k): v for k, v in entry.items()} for entry in gen.prompt_logprobs]
