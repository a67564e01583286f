"""POST /inference/v1/generate and /inference/v1/abort_requests: vLLM 0.33's token-in/token-out routes
(`scale_out/token_in_token_out/`), which a disaggregated front end (render here, generate there, derender
back) or a P/D router calls.

A GenerateRequest's token ids run on the engine as a completion's do (one engine request per choice,
named "generate-tokens-<id>" with vLLM's suffix; vLLM's admission check; kv_transfer_params handed to
the engine, so a P/D prefill keeps its KV and answers with the params its decode side needs; the virtual
arrival at the body's read; aborted when the client leaves; counted in the engine metrics and in /load with
--enable-server-load-tracking). The answer has the generated token ids (`output_mode` "tokens"), also their
text ("text"), or the assistant message parsed from it ("derender", not streamed), in vLLM's shapes: one
JSON body, or an event stream with a chunk per choice and step, the usage chunk with
`stream_options.include_usage`, and `data: [DONE]`. Logprobs are the emulator's synthetic ones (see
logprobs.py) in generate's id-based shape. With --tokens-only nothing is detokenized, as in vLLM.

/inference/v1/abort_requests aborts the engine requests of the API request ids it is given, at once
(vLLM aborts them in a background task): their clients get their `finish_reason: "abort"`.
"""
from __future__ import annotations

import json
import logging
import time

from aiohttp import web

from server import tool_calls
from server.chat import tool_parsing
from server.errors import APIError, http_error, json_response
from server.generate_protocol import GenerateRequest, parse_generate_request
from server.jobs import Choice, ChunkFormat, Job
from server.load_tracking import load_aware
from server.request_log import logged_generate_params
from server.serving import SERVING, Serving
from server.sse import compact_json

log = logging.getLogger("vllm_emulator.server")


def add_routes(app: web.Application, legacy_abort: bool = False) -> None:
    """The generate routes; `legacy_abort`: also the unauthenticated /abort_requests of --tokens-only."""
    app.router.add_post("/inference/v1/generate", generate)
    app.router.add_post("/inference/v1/abort_requests", abort_requests)
    if legacy_abort:
        app.router.add_post("/abort_requests", abort_requests)


# The handlers have comments, not docstrings: a docstring would be the route's description in /openapi.json,
# where vLLM's have none.
@load_aware
async def generate(request: web.Request) -> web.StreamResponse:
    # token ids in, generated token ids out (one body, or an event stream)
    serving = request.app[SERVING]
    data, arrival = await serving.read_json(request, GenerateRequest.model_fields)
    req = parse_generate_request(data)
    serving.check_model(req.model)
    serving.check_admission(request, 1, req.model)
    params = req.sampling_params
    _check_serveable(serving, req)
    prompt = req.token_ids
    serving.check_token_ids(prompt)
    _check_prompt_length(serving, len(prompt), req.model)
    requested = params.max_tokens if req.provided(data, "max_tokens") else None
    if requested is None:  # vLLM's get_max_tokens: the model's default max_tokens and the override's cap
        max_tokens = serving.max_tokens_for(len(prompt), None, req.model)
    else:  # taken as given (no cap): the engine stops it at max_model_len
        max_tokens = min(serving.max_model_len_for(req.model) - len(prompt), requested)
    view = params.engine_view(max_tokens, bool(req.stream))
    view.verify_sampling(params.n, max_tokens, serving.options.max_logprobs, params.logprobs,
                         serving.vocab_size_for(req.model), serving.options.reasoning)
    view.kv_transfer_params, view.priority, view.cache_salt = req.kv_transfer_params, req.priority, req.cache_salt
    request_id = f"generate-tokens-{serving.base_request_id(request, req.request_id)}"
    fmt = GenerateFormat(serving, req, request_id)
    forced = tool_calls.rendered_forced_constraint(req.parse_context, view.structured_outputs, tool_parsing(serving))
    job, streamed = await serving.generate(
        request, view, fmt, [prompt], [request_id], params.n, [max_tokens], arrival, serving.pinned_engine(request),
        reply=req.parse_context is not None, model=req.model, structure=serving.structure_for(view, req.model, forced),
        priority_header=False,
        params=lambda _: logged_generate_params(req, params, max_tokens if requested is None else None),
        logged_as=("generate", request_id), extra_args=params.extra_args or {},
        skip_reading_prefix_cache=bool(params.skip_reading_prefix_cache))
    if streamed is not None:
        return streamed
    return json_response(fmt.full_response(job, int(time.time())))


def _check_serveable(serving: Serving, req: GenerateRequest) -> None:
    """vLLM's serve_tokens checks before it renders the prompt, in its order."""
    params = req.sampling_params
    max_num_seqs = min(i.deployment.config.max_num_seqs for i in _instances(serving))
    if params.n > max_num_seqs:
        raise APIError(f"sampling_params.n must be at most the server's max_num_seqs ({max_num_seqs}), "
                       f"got {params.n}.")
    if req.stream and params.prompt_logprob_token_ids is not None:
        raise APIError("prompt_logprob_token_ids are not available when stream=true.")
    if serving.options.tokens_only and params.stop:
        raise APIError("stop strings are not supported on a --tokens-only server because detokenization is "
                       "disabled. Check stop strings on the coordinator, or use stop_token_ids.")
    if req.output_mode != "tokens" and not serving.has_tokenizer:
        raise APIError(f"output_mode={req.output_mode!r} requires a tokenizer, but this server does not load one "
                       "(--tokens-only or --skip-tokenizer-init). Send the request to a server that loads a "
                       "tokenizer, or use output_mode='tokens'.")
    if req.output_mode == "derender":
        if req.stream:
            raise APIError("output_mode='derender' does not support stream=true.")
        if _has_parser(serving):
            if req.parse_context is None:
                raise APIError("output_mode='derender' requires parse_context on a server with a tool or "
                               "reasoning parser. Use the one returned by /render.")
            try:
                req.parse_context.to_chat_request()
            except ValueError as exc:
                raise APIError(str(exc)) from None
    if req.features or req.content_parts:
        raise APIError("The simulated model takes text only: multimodal `features` and `content_parts` are not "
                       "served.", param="features" if req.features else "content_parts")


def _instances(serving: Serving):
    return [serving.instance] if serving.instance is not None else serving.engine.sim.instances


def _has_parser(serving: Serving) -> bool:
    """Whether vLLM's derenderer would have a parser: a tool parser with auto tool choice, or a reasoning one."""
    return tool_parsing(serving) or serving.options.reasoning


def _check_prompt_length(serving: Serving, length: int, model: str | None) -> None:
    """vLLM's input processor: a token prompt must leave room for one output token."""
    max_model_len = serving.max_model_len_for(model)
    suggestion = "Make sure that `max_model_len` is no smaller than the number of text tokens"
    if length > max_model_len:
        raise APIError(f"The decoder prompt (length {length}) is longer than the maximum model length of "
                       f"{max_model_len}. {suggestion}.")
    if length == max_model_len:
        raise APIError(f"The decoder prompt (length {length}) plus the number of requested output tokens (at "
                       f"least 1) is longer than the maximum model length of {max_model_len}. {suggestion} "
                       "(prompt + requested output tokens).")


class GenerateFormat(ChunkFormat):
    """The chunks (and the full body) of one generate request, as vLLM's ServingTokens writes them."""

    def __init__(self, serving: Serving, req: GenerateRequest, request_id: str) -> None:
        self.serving = serving
        self.req = req
        self.request_id = request_id
        self.mode = req.output_mode
        params = req.sampling_params
        self.logprobs = None
        if params.logprobs is not None:  # text: named tokens; tokens: ids (the source's names go unused)
            as_ids = serving.options.return_tokens_as_token_ids or self.mode == "tokens"
            self.logprobs = serving.logprob_source(req.model, as_ids)
        options = req.stream_options
        self.include_usage = bool(options and options.include_usage)
        self.continuous_usage = self.include_usage and bool(options.continuous_usage_stats)
        self.prompt_ids_pending = bool(req.return_token_ids)  # sent with the stream's first chunk
        self.head = f'data: {{"request_id":{compact_json(request_id)},"usage":'

    # -- the stream -----------------------------------------------------------------------------
    def first_output(self, job: Job) -> bytes:
        return b""

    def tokens(self, job: Job, choice: Choice, end: int, last: bool) -> bytes:
        start, prompt = choice.num_sent, job.prompts[0]
        usage = "null"
        if self.continuous_usage:
            usage = compact_json({"prompt_tokens": len(prompt), "total_tokens": len(prompt) + end,
                                  "completion_tokens": end, "prompt_tokens_details": None,
                                  "completion_tokens_details": None})
        prompt_ids = ""
        if self.prompt_ids_pending:
            prompt_ids, self.prompt_ids_pending = ',"prompt_token_ids":' + compact_json(prompt), False
        fields = self._choice_fields(choice, start, end, len(prompt), last, stream=True)
        choices = compact_json([fields])
        return f'{self.head}{usage}{prompt_ids},"output_mode":"{self.mode}","choices":{choices}}}\n\n'.encode()

    def usage(self, job: Job) -> bytes:
        if not self.include_usage:
            return b""
        return (f'{self.head}{compact_json(self._usage(job, with_nulls=False))},"output_mode":"{self.mode}",'
                f'"choices":[]}}\n\n').encode()

    # -- the full body ------------------------------------------------------------------------
    def full_response(self, job: Job, created: int) -> dict:
        """vLLM's GenerateTokensResponse (or its text or derender level), every key, nulls included."""
        req, prompt = self.req, job.prompts[0]
        choices = [self._choice_fields(choice, 0, choice.request.num_output_tokens, len(prompt), True, stream=False)
                   for choice in job.choices]
        params = req.sampling_params
        prompt_logprobs = None
        if params.prompt_logprobs is not None:
            prompt_logprobs = self.serving.logprob_source(req.model).prompt(prompt, params.prompt_logprobs)
            if not self.serving.has_tokenizer:  # not detokenized
                for entry in prompt_logprobs[1:]:
                    for candidate in entry.values():
                        candidate["decoded_token"] = None
        return {"request_id": self.request_id, "model": self.serving.response_model(req.model), "created": created,
                "usage": self._usage(job, with_nulls=True), "prompt_logprobs": prompt_logprobs,
                "prompt_token_id_logprobs": None, "prompt_token_ids": prompt if req.return_token_ids else None,
                "mm_placeholders": None, "metrics": None, "kv_transfer_params": job.kv_transfer_params,
                "ec_transfer_params": None, "output_mode": self.mode, "choices": choices}

    def _usage(self, job: Job, with_nulls: bool) -> dict:
        prompt, completion = len(job.prompts[0]), job.num_output_tokens
        usage = {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion}
        details = None
        if self.serving.options.enable_prompt_tokens_details and job.num_cached_tokens is not None:
            details = {"cached_tokens": job.num_cached_tokens}
            if with_nulls:
                details.update(created_cache_tokens=None, multimodal_tokens=None)
        if with_nulls:
            usage.update(prompt_tokens_details=details, completion_tokens_details=None)
        elif details is not None:
            usage["prompt_tokens_details"] = details
        return usage

    def _choice_fields(self, choice: Choice, start: int, end: int, prompt_len: int, last: bool,
                       stream: bool) -> dict:
        """One choice's fields, in vLLM's order for the request's output_mode."""
        plan = choice.plan
        ids = plan.token_ids[start:end].tolist()
        finish = choice.finish_reason if last else None
        if not stream and not finish:
            finish = "stop"
        fields = {"index": choice.index, "finish_reason": finish, "stop_reason": choice.stop_reason if last else None,
                  "token_ids": ids, "routed_experts": None, "sampling_mask": None, "weight_versions": None}
        text = "".join(plan.pieces[start:end])
        logprobs = self._logprobs(ids, plan.pieces[start:end], prompt_len + start)
        if self.mode == "text":
            fields["text"] = text
        elif self.mode == "derender":
            message, finish_reason = self._message(text, choice.finish_reason)
            fields["finish_reason"] = finish_reason
            fields["message"] = message
            if self.req.parse_context is not None and not self.req.parse_context.include_reasoning and \
                    _has_parser(self.serving):  # a parser hiding reasoning hides per-token metadata too
                fields["token_ids"] = logprobs = None
        fields["logprobs"] = logprobs
        return fields

    def _logprobs(self, ids: list[int], pieces: list[str], first_position: int) -> dict | None:
        """generate's logprobs: every candidate the engine returns per token (the sampled one first); by id
        at the tokens level, in chat's shape at the text and derender levels (derender keeps chat's cut)."""
        if self.logprobs is None:
            return None
        k = self.req.sampling_params.logprobs
        count = len(self.logprobs.alternatives) + 1 if k == -1 else max(k, 1)
        if self.mode == "derender":
            return self.logprobs.chat(ids, pieces, first_position, count if k == -1 else k)
        if self.mode == "text":
            return self.logprobs.chat(ids, pieces, first_position, count)
        content = []
        for i, (token_id, piece) in enumerate(zip(ids, pieces)):
            top = [{"token_id": alt, "logprob": logprob, "rank": rank}
                   for rank, (alt, _, logprob) in enumerate(
                       self.logprobs.top_ids(token_id, piece, first_position + i, count), start=1)]
            content.append({"token_id": token_id, "logprob": top[0]["logprob"], "rank": 1, "top_logprobs": top})
        return {"content": content}

    def _message(self, text: str, engine_reason: str | None) -> tuple[dict, str]:
        """The derender level's assistant message and chat finish_reason: the text, or with a tool parser
        the tool calls a forced tool_choice in parse_context makes of it."""
        message = {"role": "assistant", "content": text, "refusal": None, "annotations": None, "audio": None,
                   "function_call": None}
        context = self.req.parse_context
        chat = context.to_chat_request() if context is not None and _has_parser(self.serving) else None
        calls = []
        if chat is not None and tool_parsing(self.serving) and tool_calls.forced_constraint(chat) is not None:
            calls = tool_calls.parse_tool_calls(chat, text)
            message["content"] = ""
            if calls:
                message["tool_calls"] = calls
        message["reasoning"] = None
        finish = tool_calls.finish_reason(chat, engine_reason or "stop", bool(calls)) if chat is not None \
            else engine_reason or "stop"
        return message, finish


# -- POST /inference/v1/abort_requests ---------------------------------------------------------------
async def abort_requests(request: web.Request) -> web.Response:
    # abort the engine requests of these API request ids (a disaggregated front end's cancel)
    serving = request.app[SERVING]
    try:  # vLLM reads any body as JSON (no Content-Type check)
        body = json.loads(await request.read())
    except json.JSONDecodeError as exc:
        return http_error(400, f"JSON decode error: {exc}")
    if not isinstance(body, dict):
        raise APIError(f"'{type(body).__name__}' object has no attribute 'get'", status=500,
                       err_type="InternalServerError")
    ids = body.get("request_ids")
    if ids is None:
        return http_error(400, "Missing 'request_ids' in request body")
    wanted = {ids} if isinstance(ids, str) else {i for i in ids if isinstance(i, str)} \
        if isinstance(ids, list) else set()
    engine_ids = [engine_id for engine_id, engine_request in serving.engine.sim.active.items()
                  if _requested(engine_request.user_data, wanted) and _served_here(serving, engine_request)]
    if engine_ids:
        serving.engine.pacer.abort(engine_ids)
    return web.Response(status=200)


def _requested(choice: Choice | None, wanted: set[str]) -> bool:
    """Whether a choice's engine request belongs to one of these API request ids (with n > 1, vLLM's
    child "<c>_<id>" belongs to <id>)."""
    if choice is None:
        return False
    head, _, rest = choice.client_request_id.partition("_")
    return choice.client_request_id in wanted or (head.isdigit() and rest in wanted)


def _served_here(serving: Serving, engine_request) -> bool:
    """A pod's own port aborts its own requests only."""
    if serving.instance is None:
        return True
    index = engine_request.engine_index
    return index is not None and serving.engine.sim.instance_of[index] is serving.instance
