"""OpenAI's Responses API as vLLM 0.33 serves it (`entrypoints/openai/responses/`): POST /v1/responses
(streaming or not, in the background or not), GET /v1/responses/{response_id} and
POST /v1/responses/{response_id}/cancel.

A request is answered as vLLM answers it with no tool server or reasoning parser: its conversation
(responses_input.py) is rendered with the model's chat template and tokenized as vLLM's Responses
path tokenizes it (with the tokenizer's special tokens added: a template that writes its own BOS gets
a second one, as in vLLM 0.33), run as one engine request named "<response id>_0", and answered with
one message item (responses_stream.py) and vLLM's usage. With `--enable-auto-tool-choice
--tool-call-parser`, a forced call (`tool_choice` "required" or a named tool) is answered with call
items instead (responses_tools.py); "auto" and "none" stay text (the simulated model never decides
to call a tool), and without a parser vLLM, and so the emulator, answers even a forced call in text.
`store` and `background` work only with VLLM_ENABLE_RESPONSES_API_STORE=1 (responses_store.py), as
in vLLM.

With a reasoning parser a thinking reply's reasoning is a reasoning item before the message (or the calls).
A gpt-oss model is answered as vLLM's HarmonyContext answers (server/harmony.py, responses_harmony.py): its
prompt rendered with Harmony (its input item by item, in order), an item per Harmony message, each turn's usage;
it needs a parser (else vLLM's 500) and refuses logprobs. Its stored history is Harmony's messages (vLLM's
msg_store): with `previous_response_id` the previous request's preamble, input and output messages (calls and
analysis included) are rendered again, then the new input.

Not simulated: built-in tools (web search, code interpreter, MCP, ...), which vLLM runs through its
`--tool-server` (they are accepted and not rendered, as by vLLM without one).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from aiohttp import web

from server.chat import conversation, render, tool_parser, tool_parsing
from server import harmony_prompt
from server.harmony import HarmonyChat, call_choices, check_effort, harmony_tokens, uses_harmony
from server.responses_harmony import HarmonyResponseStream, harmony_items, reuse_ids
from server.structured import Constraint
from server.reasoning import ChatReasoning
from server.errors import APIError, json_response, schema_error, validation_error
from server.jobs import Job
from server.responses_input import input_messages, template_tools
from server.responses_protocol import ResponsesRequest
from server.responses_store import EventLog, ResponseStore, store_enabled
from server.responses_stream import (ResponseStream, item_status, message_id, message_item, reasoning_item,
                                     response_logprobs)
from server.responses_tools import ForcedCalls, forced_calls, responses_params
from server.load_tracking import load_aware
from server.serving import SERVING, Serving, per_request_metrics, truncated
from server.sse import SSEChannel

log = logging.getLogger("vllm_emulator.server")

STORE = web.AppKey("responses_store", ResponseStore)
FIELDS = frozenset(ResponsesRequest.model_fields)  # what a large body keeps (server/request_body.py)
_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8"}


def add_routes(app: web.Application) -> None:
    """Register this API's routes on the app, with the port's store."""
    store = app[STORE] = ResponseStore(store_enabled())
    app.on_shutdown.append(store.cancel_all)
    app.router.add_post("/v1/responses", create_responses)
    app.router.add_get("/v1/responses/{response_id}", retrieve_responses)
    app.router.add_post("/v1/responses/{response_id}/cancel", cancel_responses)


def _invalid_request(message: str, param: str, status: int = 400) -> APIError:
    """The errors vLLM's Responses handler makes itself (type "invalid_request_error")."""
    return APIError(message, status=status, err_type="invalid_request_error", param=param)


def _unknown_response(response_id: str) -> APIError:
    return _invalid_request(f"Response with id '{response_id}' not found.", "response_id", HTTPStatus.NOT_FOUND)


# -- POST /v1/responses ------------------------------------------------------------------------------
@load_aware
async def create_responses(request: web.Request) -> web.StreamResponse:
    """Create a model response (OpenAI's Responses API)."""
    serving, store = request.app[SERVING], request.app[STORE]
    data, arrival = await serving.read_json(request, FIELDS)
    req = serving.parse(ResponsesRequest, data)
    with serving.kv_transfer_rejection_cleanup(request, req):  # (a decode pod frees a prefill it turns away)
        return await _answer(serving, store, request, req, arrival)


async def _answer(serving: Serving, store: ResponseStore, request: web.Request, req: ResponsesRequest,
                  arrival: float) -> web.StreamResponse:
    """The response to a parsed request: a stream, a body, or the stored "queued" one of a background request."""
    serving.check_model(req.model)
    harmony = uses_harmony(serving, req.model)  # a gpt-oss model: vLLM's HarmonyContext (server/harmony.py)
    if harmony and req.include_logprobs():
        raise _invalid_request("logprobs are not supported with gpt-oss models", "logprobs")
    if req.store and not store.enabled and req.background:
        raise _invalid_request("This vLLM engine does not support `store=True` and therefore does not support the "
                               "background mode. To enable these features, set the environment variable "
                               "`VLLM_ENABLE_RESPONSES_API_STORE=1` when launching the vLLM server.", "background")
    if req.previous_input_messages and req.previous_response_id:
        raise _invalid_request("Only one of `previous_input_messages` and `previous_response_id` can be set.",
                               "previous_response_id")
    serving.check_admission(request, 1, req.model)
    stored = bool(req.store) and store.enabled  # vLLM ignores `store` without the env var
    previous = None
    if req.previous_response_id is not None:
        previous = store.responses.get(req.previous_response_id)
        if previous is None:
            raise _unknown_response(req.previous_response_id)
    prior = store.messages.get(previous["id"]) if previous is not None else None
    if prior and any(isinstance(m, tuple) != harmony for m in prior):  # (a cluster's models: one of each kind)
        raise _invalid_request("Harmony Responses history must use Harmony messages." if harmony else
                               "Non-Harmony Responses history must use chat messages.", "previous_response_id")
    messages = None  # (a gpt-oss model's input becomes Harmony messages item by item: _harmony_history)
    if not harmony:
        messages = input_messages(req.instructions, req.input, prior,
                                  previous["output"] if previous is not None else None)
    serving.check_max_tokens(req.max_output_tokens, "max_output_tokens", req.model)
    tools = template_tools(req.tools, req.tool_choice, serving.options.exclude_tools_when_tool_choice_none)
    if harmony and previous is None:  # (Harmony's system message takes the effort: high, medium or low)
        check_effort(req.reasoning_effort, chat=False)
    truncate = serving.truncation_length(-1 if req.truncation != "disabled" else None, req.model)
    history = None
    if harmony:  # vLLM renders a gpt-oss conversation with Harmony, not the chat template
        history = _harmony_history(req, tools, prior, previous)
        prompt, prompt_text = harmony_prompt.encode(harmony_tokens(serving.require_tokenizer(req.model)),
                                                    harmony_prompt.for_completion(history))
        prompt = truncated(prompt, truncate, None)
    else:
        prompt_text = render(serving, req, conversation(messages), tools)
        prompt = serving.encode_text(prompt_text, True, req.model, truncate)
    parsing, parser = tool_parsing(serving), tool_parser(serving)
    parsing |= serving.options.reasoning_parser is not None  # vLLM's parser: a tool or a reasoning parser
    own = None if req.forces_tool_call() else req.structured_constraint()  # before a parser's tag takes its place
    # vLLM's tool parser constrains a forced call (adjust_request)
    calls = forced_calls(req, tools, parser, serving.options.tool_strict_level)
    forced = calls.constraint if calls is not None else None
    max_model_len = serving.max_model_len_for(req.model)
    if len(prompt) >= max_model_len:
        raise _invalid_request(f"The engine prompt length {len(prompt)} exceeds the max_model_len {max_model_len}. "
                               "Please reduce prompt.", "input")
    max_tokens = serving.max_tokens_for(len(prompt), req.max_output_tokens, req.model)
    engine_req = req.engine_view(max_tokens)
    defaults = serving.sampling_defaults(req.model).params
    engine_req.verify_sampling(1, max_tokens, serving.options.max_logprobs,
                               req.top_logprobs if req.include_logprobs() else None,
                               serving.vocab_size_for(req.model), serving.options.reasoning, defaults)
    constraint = forced or own or req.structured_constraint()
    structure = serving.structure_for(engine_req, req.model, constraint) if constraint is not None else None
    if harmony:
        structure = _harmony_structure(serving, req, engine_req, calls, own)

    answer = Answer(serving, req, engine_req, prompt_text, max_tokens, int(time.time()), parsing, calls)
    if not harmony:  # a structured reply (or forced call) of a model that thinks: its reasoning comes first
        structure = answer.reasoning.structured(structure)
        if calls is not None:
            calls.after = answer.reasoning.end_marker
    if harmony:
        fmt = HarmonyResponseStream(answer.reasoning.harmony, lambda: answer.response("in_progress", []),
                                    answer.finish, calls)
    else:
        fmt = ResponseStream(lambda: answer.response("in_progress", []), answer.finish, answer.logprobs,
                             req.top_logprobs, calls, answer.reasoning)
    if stored:  # (a gpt-oss model's: its Harmony messages, to which the output's are added as it ends)
        store.messages[req.request_id] = messages if history is None else history
        answer.history = history

    reasoning = serving.options.reasoning_parser

    async def run(channel: SSEChannel | EventLog | None = None) -> tuple[Job, web.StreamResponse | None]:
        # X-data-parallel-rank is checked as vLLM's engine takes the request (its lazy generator): a background
        # request's in its task, whose failure leaves the response stored "queued"
        return await serving.generate(request, engine_req, fmt, [prompt], [f"{req.request_id}_0"], 1, [max_tokens],
                                      arrival, serving.pinned_engine(request), reply=req.add_generation_prompt,
                                      model=req.model, structure=structure, channel=channel,
                                      params=lambda _: responses_params(req, max_tokens, parser, reasoning,
                                                                        defaults),
                                      logged_as=("responses", req.request_id), prompt_texts=[prompt_text],
                                      thinking=answer.reasoning.thinking)

    if req.background:
        return await _start_in_background(request, store, req, answer, fmt, run)
    if req.stream:
        _, streamed = await run(OpensWith(SSEChannel(request), fmt.opening))
        if stored and fmt.final is not None:
            store.responses[req.request_id] = fmt.final
        return streamed
    job, _ = await run()
    body = answer.finish(job, None)
    if stored:
        store.responses[req.request_id] = body
    return json_response(body)


async def _start_in_background(request: web.Request, store: ResponseStore, req: ResponsesRequest, answer: Answer,
                               fmt: ResponseStream, run: Callable[..., Awaitable[tuple]]) -> web.StreamResponse:
    """vLLM's background mode: the response is stored "queued" (so it stays until it ends: vLLM marks
    no progress) and generated detached from this request; a stream's events are kept in an event log,
    which this request then reads like any later reader."""
    queued = answer.response("queued", [])
    store.responses[req.request_id] = queued
    events = EventLog() if req.stream else None

    async def generate() -> None:
        try:
            if events is not None:
                await run(OpensWith(events, fmt.opening))
                final = fmt.final
            else:
                job, _ = await run()
                final = answer.finish(job, None)
        except APIError as exc:  # vLLM's task fails too, leaving the response as it was stored
            log.error("Background response %s failed: %s", req.request_id, exc.message)
            return
        finally:
            if events is not None:
                await events.close()
        if final is not None and store.responses[req.request_id]["status"] != "cancelled":
            store.responses[req.request_id] = final

    if events is not None:
        store.event_logs[req.request_id] = events
    store.run_in_background(req.request_id, generate())
    # the task runs up to its first wait, past the core's placing of the request (serving.generate): a
    # model-less one on an any-model cluster has taken the model it runs on, which the queued body names
    await asyncio.sleep(0)
    if store.responses.get(req.request_id) is queued:
        queued = store.responses[req.request_id] = answer.response("queued", [])
    if events is None:
        return json_response(queued)
    return await _write_events(request, events, None)


async def _write_events(request: web.Request, events: EventLog, starting_after: int | None) -> web.StreamResponse:
    """A background stream's events to one reader, as they come (a reader that leaves stops nothing)."""
    response = web.StreamResponse(headers=_SSE_HEADERS)
    await response.prepare(request)
    async for event in events.replay(starting_after):
        await response.write(event)
    await response.write_eof()
    return response


class OpensWith:
    """A stream's channel (a client's SSEChannel, or a background stream's EventLog) that is first sent
    `opening` (response.created and response.in_progress) as it opens: as soon as the engine has taken the
    request, before any output, and after the core placed it, so that they name the model it runs on."""

    def __init__(self, channel: SSEChannel | EventLog, opening: Callable[[], bytes]) -> None:
        self.channel = channel
        self.opening = opening

    async def open(self) -> None:
        self.channel.send(self.opening())
        await self.channel.open()

    def __getattr__(self, name: str):
        return getattr(self.channel, name)


def _harmony_history(req: ResponsesRequest, tools: list[dict] | None, prior: list | None,
                     previous: dict | None) -> list[harmony_prompt.HarmonyMessage]:
    """A gpt-oss request's Harmony messages, as vLLM's _render_responses_with_harmony builds them: the preamble
    (`instructions`, else a leading system or developer item's text), its `previous_input_messages`
    (harmony_prompt.previous_input_messages) and the input's items, each in order
    (harmony_prompt.input_item_messages), or with `previous_response_id` the previous request's whole history (its
    preamble, input and output messages: analysis, calls and answers) and then the input's. A tool's output names
    the call it answers, the newest with its id among the previous response's output and the items before it."""
    items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else list(req.input)
    calls: dict = {}
    if previous is not None:
        calls = {item.get("call_id"): item.get("name") for item in previous["output"]
                 if item.get("type") == "function_call"}
    instructions = req.instructions
    if previous is None and instructions is None and items and items[0].get("type") in (None, "message") \
            and items[0].get("role") in ("system", "developer"):  # extract_instructions_from_messages
        instructions, items = harmony_prompt.text_of(items[0].get("content")), items[1:]
    if isinstance(req.input, str) and not req.input and req.previous_input_messages:
        items = []  # (an empty string adds no user message to a given history)
    try:
        history = harmony_prompt.previous_input_messages(req.previous_input_messages or [])
        messages = harmony_prompt.input_item_messages(items, calls)
    except ValueError as exc:  # (vLLM's VLLMValidationError, answered as an invalid request)
        raise _invalid_request(validation_error(str(exc), parameter="input").message, "input") from None
    if previous is None:
        return harmony_prompt.preamble(instructions, tools, req.reasoning_effort) + history + messages
    return [*(prior or ()), *messages]


def _harmony_structure(serving: Serving, req: ResponsesRequest, engine_req, calls: ForcedCalls | None,
                       own: Constraint | None):
    """What a gpt-oss model writes (server/harmony.py). vLLM's HarmonyContext needs its HarmonyParser: with no
    parser on the server it fails on an assertion (a 500 with no message). The parser's adjust_request moves
    a structured output into the final message's constraint, and the request's `text` to null."""
    harmony = HarmonyChat(serving, req)
    if not harmony.parsing:
        raise APIError("", status=HTTPStatus.INTERNAL_SERVER_ERROR, err_type="InternalServerError")
    choices = call_choices(serving, calls.chat, req.model) if calls is not None else ()
    answer = None
    if own is not None and not choices:
        answer = serving.structure_for(engine_req, req.model, own)
        req.text = None
    return harmony.reply(answer, choices)


class Answer:
    """The response object of one request, in vLLM's ResponsesResponse key order (nulls included),
    at each stage: in progress, queued, and finished from its job.

    With a tool parser (`parsing`), vLLM builds the output from what its parser reads: a forced
    call's items (`calls`), or else a message item only when there is text, and with
    `include_reasoning: false` no logprobs at all."""

    def __init__(self, serving: Serving, req: ResponsesRequest, engine_req, prompt_text: str, max_tokens: int,
                 created: int, parsing: bool = False, calls: ForcedCalls | None = None) -> None:
        self.serving = serving
        self.req = req
        self.engine_req = engine_req  # as the engine runs it: a model-less one takes the model it was placed on
        self.prompt_text = prompt_text
        self.max_tokens = max_tokens
        self.created = created
        self.parsing = parsing
        self.calls = calls
        hidden = parsing and not req.include_reasoning
        self.reasoning = ChatReasoning(serving, req)  # a reasoning parser's reading of the reply (reasoning.py)
        self.logprobs = serving.logprob_source(req.model) if req.include_logprobs() and not hidden else None
        # a stored gpt-oss request's Harmony messages: vLLM's HarmonyContext adds the output's to them, and a
        # later request with `previous_response_id` renders them all
        self.history: list[harmony_prompt.HarmonyMessage] | None = None

    def response(self, status: str, output: list[dict], usage: dict | None = None, job: Job | None = None) -> dict:
        req = self.req
        sampling = req.echoed_sampling(self.serving.sampling_defaults(req.model).params)
        body = {
            "id": req.request_id, "created_at": self.created,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions, "metadata": req.metadata,
            "model": self.serving.response_model(self.engine_req.model), "object": "response", "output": output,
            "parallel_tool_calls": True if req.parallel_tool_calls is None else req.parallel_tool_calls,
            "temperature": sampling["temperature"], "tool_choice": req.echoed_tool_choice(),
            "tools": req.echoed_tools(), "top_p": sampling["top_p"], "background": req.background,
            "max_output_tokens": self.max_tokens, "max_tool_calls": req.max_tool_calls,
            "previous_response_id": req.previous_response_id, "prompt": None,
            "prompt_cache_options": req.prompt_cache_options.echo() if req.prompt_cache_options else None,
            "prompt_cache_key": req.prompt_cache_key, "prompt_cache_retention": req.prompt_cache_retention,
            "reasoning": req.reasoning.echo() if req.reasoning is not None else None,
            "safety_identifier": req.safety_identifier, "service_tier": req.service_tier, "status": status,
            "text": req.text.echo() if req.text is not None else None,
            "top_logprobs": req.top_logprobs if req.include_logprobs() else None,
            "truncation": req.truncation, "usage": usage, "user": req.user}
        if job is not None and self.serving.options.enable_per_request_metrics:
            body["metrics"] = per_request_metrics(job.choices[0].request)
        body.update(presence_penalty=sampling["presence_penalty"], frequency_penalty=sampling["frequency_penalty"],
                    kv_transfer_params=job.kv_transfer_params if job is not None else None,
                    ec_transfer_params=None, input_messages=None, output_messages=None)
        if job is not None and req.enable_response_messages:
            choice = job.choices[0]
            n = choice.request.num_output_tokens
            text, ids = "".join(choice.plan.pieces[:n]), choice.plan.token_ids[:n].tolist()
            body["input_messages"] = [_raw_message(self.prompt_text, job.prompts[0])]
            body["output_messages"] = [_raw_message(text, ids)] if text or ids else []
        return body

    def finish(self, job: Job, streamed: list[dict] | None) -> dict:
        """The finished response: the output items a stream sent (`streamed`), or else the items of the
        whole output."""
        choice = job.choices[0]
        harmony = self.reasoning.harmony
        if harmony is not None:  # the items of the whole output, with the ids a stream gave them
            n = choice.request.num_output_tokens
            parsed = harmony.parse(choice.plan.token_ids[:n].tolist(), choice.plan.pieces[:n])
            output = harmony_items(parsed, self.calls)
            if self.history is not None:
                self.history.extend(map(harmony_prompt.output_message, parsed.messages))
                self.history = None  # (once)
            if streamed is not None:
                output = reuse_ids(output, streamed)
        elif streamed is not None:
            output = streamed
        else:
            n = choice.request.num_output_tokens
            ids, pieces = choice.plan.token_ids[:n].tolist(), choice.plan.pieces[:n]
            text, last_status = "".join(pieces), item_status(choice.finish_reason)
            reasoning, text = self.reasoning.fields(choice.plan, text)
            output = [reasoning_item(reasoning)] if reasoning else []  # vLLM's build_response_output_items
            text = text or ""
            if self.calls is not None:  # (after the reasoning item of a model that thinks first)
                output += self.calls.items(text, last_status)
            elif text or not self.parsing:  # (with a parser, a message item only when there is text)
                logprobs = None
                if self.logprobs is not None and ids:
                    logprobs = response_logprobs(self.logprobs, ids, pieces, len(job.prompts[0]),
                                                 self.req.top_logprobs)
                output.append(message_item(message_id(), text, logprobs, last_status))
        status = "incomplete" if choice.finish_reason == "length" else "completed"
        if harmony is not None and not output:  # vLLM's HarmonyContext: no item, "incomplete"
            status = "incomplete"
        return self.response(status, output, self._usage(job), job)

    def _usage(self, job: Job) -> dict:
        """vLLM's ResponseUsage of a single-turn request (the per-turn lists stay empty, as vLLM leaves them)."""
        prompt, output = len(job.prompts[0]), job.num_output_tokens
        cached, writes = job.num_cached_tokens or 0, self.serving.cache_creation_tokens(job)
        # vLLM's HarmonyContext keeps each turn's counts (a single turn here); its other contexts none
        turns = self.reasoning.harmony is not None
        return {"input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": writes,
                                         "input_tokens_per_turn": [prompt] if turns else [],
                                         "cached_tokens_per_turn": [cached] if turns else []},
                "output_tokens": output,
                "output_tokens_details": {"reasoning_tokens": self.reasoning.tokens(job.choices[0].plan, output),
                                          "tool_output_tokens": 0,
                                          "output_tokens_per_turn": [output] if turns else [],
                                          "tool_output_tokens_per_turn": [0] if turns else []},
                "total_tokens": prompt + output}



def _raw_message(text: str, tokens: list[int]) -> dict:
    """vLLM's ResponseRawMessageAndToken (enable_response_messages)."""
    return {"message": text, "tokens": tokens, "type": "raw_message_tokens"}


# -- GET /v1/responses/{response_id} -------------------------------------------------------------------
@load_aware
async def retrieve_responses(request: web.Request) -> web.StreamResponse:
    """A stored response; with `stream=true`, a background stream's events (after `starting_after`)."""
    store, response_id = request.app[STORE], request.match_info["response_id"]
    starting_after, stream = _query(request)
    body = store.responses.get(response_id)
    if body is None:
        raise _unknown_response(response_id)
    if not stream:
        return json_response(body)
    events = store.event_logs.get(response_id)
    if events is not None:
        return await _write_events(request, events, starting_after)
    # vLLM looks the events up once its stream has begun: a response that was not a background stream
    # fails there, and the server drops the connection after the headers
    response = web.StreamResponse(headers=_SSE_HEADERS)
    await response.prepare(request)
    log.error("Exception in the stream of GET /v1/responses/%s: Unknown response_id: %s (parameter=response_id)",
              response_id, response_id)
    request.transport.close()
    return response


_TRUE, _FALSE = ("1", "on", "t", "true", "y", "yes"), ("0", "off", "f", "false", "n", "no")


def _query(request: web.Request) -> tuple[int | None, bool]:
    """`starting_after` (an integer) and `stream` (a boolean), with FastAPI's errors."""
    errors = []
    starting_after = request.query.get("starting_after")
    if starting_after is not None:
        try:
            starting_after = int(starting_after)
        except ValueError:
            errors.append({"type": "int_parsing", "loc": ("query", "starting_after"),
                           "msg": "Input should be a valid integer, unable to parse string as an integer",
                           "input": starting_after})
    stream = request.query.get("stream", "false")
    if stream.lower() not in _TRUE + _FALSE:
        errors.append({"type": "bool_parsing", "loc": ("query", "stream"),
                       "msg": "Input should be a valid boolean, unable to interpret input", "input": stream})
    if errors:
        raise schema_error(errors)
    return starting_after, stream.lower() in _TRUE


# -- POST /v1/responses/{response_id}/cancel ----------------------------------------------------------
@load_aware
async def cancel_responses(request: web.Request) -> web.Response:
    """Cancel a background response still running: its request is aborted in the engine."""
    store, response_id = request.app[STORE], request.match_info["response_id"]
    body = store.responses.get(response_id)
    if body is None:
        raise _unknown_response(response_id)
    if body["status"] not in ("queued", "in_progress"):
        raise _invalid_request("Cannot cancel a synchronous response.", "response_id")
    body["status"] = "cancelled"
    task = store.tasks.get(response_id)
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return json_response(body)

