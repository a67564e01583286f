"""vLLM's request logging (`--enable-log-requests`, `--enable-log-outputs`, `--max-log-len`).

vLLM's RequestLogger (vllm/entrypoints/serve/utils/request_logger.py) writes, under its module's logger,
"Received request <id>: params: <SamplingParams repr>, lora_request: <LoRARequest repr>." as each engine
request is handed to the engine (at DEBUG also its prompt token ids, cut to --max-log-len), and with
--enable-log-outputs "Generated response <id>: output: <text>, finish_reason: <reason>" as a response
ends. The reprs here are vLLM's, field for field (SamplingParams.__repr__, the StructuredOutputsParams
dataclass, the LoRARequest struct), so a log scraper reads the emulator's lines as a vLLM server's.

The same flag has vLLM's AsyncLLM (vllm/v1/engine/async_llm.py, under its module's logger, at INFO) write
"Added request <engine id>." as each engine request (each child of n > 1) is added; "Aborted request(s)
<engine id>." then "Request <id> aborted." when a prompt's requests are aborted as its client leaves (or the
route closes them); and "Request <id> failed (bad request): <error>." when it refuses a prompt (a queue bound
on a later prompt of a list). <engine id> is the id with vLLM's random suffix (the parent's for n > 1), <id>
the route's (one per prompt).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from emulator.lora import LoRAAdapter
from server.protocol import StructuredOutputsParams
from server.sampling_params import SamplingParams

log = logging.getLogger("vllm.entrypoints.serve.utils.request_logger")  # vLLM's logger, by its module's name
engine_log = logging.getLogger("vllm.v1.engine.async_llm")  # AsyncLLM's, by its module's name


def sampling_params_repr(params: SamplingParams) -> str:
    """vLLM's SamplingParams.__repr__ (the fields it shows, in its order)."""
    p = params
    return (f"SamplingParams(n={p.n}, presence_penalty={p.presence_penalty}, "
            f"frequency_penalty={p.frequency_penalty}, repetition_penalty={p.repetition_penalty}, "
            f"temperature={p.temperature}, watermarking={p.watermarking}, top_p={p.top_p}, top_k={p.top_k}, "
            f"min_p={p.min_p}, seed={p.seed}, stop={p.stop}, stop_token_ids={p.stop_token_ids}, "
            f"bad_words={p.bad_words}, thinking_token_budget={p.thinking_token_budget}, "
            f"include_stop_str_in_output={p.include_stop_str_in_output}, ignore_eos={p.ignore_eos}, "
            f"max_tokens={p.max_tokens}, min_tokens={p.min_tokens}, logprobs={p.logprobs}, "
            f"prompt_logprobs={p.prompt_logprobs}, skip_special_tokens={p.skip_special_tokens}, "
            f"spaces_between_special_tokens={p.spaces_between_special_tokens}, "
            f"structured_outputs={structured_outputs_repr(p.structured_outputs)}, extra_args={p.extra_args})")


def structured_outputs_repr(structured: StructuredOutputsParams | None) -> str:
    """vLLM's StructuredOutputsParams dataclass repr, before the engine picks its backend."""
    if structured is None:
        return "None"
    fields = ", ".join(f"{name}={value!r}" for name, value in structured.described().items())
    return f"StructuredOutputsParams({fields})"


def lora_request_repr(lora: LoRAAdapter | None) -> str:
    """vLLM's LoRARequest repr (a msgspec struct: every field) as its front end builds one for a request."""
    if lora is None:
        return "None"
    return (f"LoRARequest(lora_name={lora.name!r}, lora_int_id={lora.lora_id}, lora_path={lora.path!r}, "
            f"base_model_name={lora.base_model_name!r}, load_inplace=False, is_3d_lora_weight=False)")


# How each route of vLLM logs a response's outputs (--enable-log-outputs), as routes are named here:
# "chat" (chat completions and Messages: a choice with text; streamed: its whole text, finish_reason
# "streaming_complete"), "completion" (every choice; streamed as chat), "responses" (the output with its
# own finish_reason, streamed or not), "generate" (not streamed only: token ids, no text), "batch"
# (batch chat: nothing). A chat or completion stream also logs each chunk with text (DeltaLogging).
ROUTES = ("chat", "completion", "responses", "generate", "batch")


_NOTICED: set[str] = set()  # vLLM's warning_once / info_once: each notice once per process


def _level_notice() -> None:
    """vLLM's RequestLogger says, once, what its logger's level leaves of its lines."""
    if not log.isEnabledFor(logging.INFO):
        notice, say = ("`--enable-log-requests` is set but the minimum log level is higher than INFO. "
                       "No request information will be logged."), log.warning
    elif not log.isEnabledFor(logging.DEBUG):
        notice, say = ("`--enable-log-requests` is set but the minimum log level is higher than DEBUG. "
                       "Only limited information will be logged to minimize overhead. "
                       "To view more details, set `--log-level DEBUG`."), log.info
    else:
        return
    if notice not in _NOTICED:
        _NOTICED.add(notice)
        say(notice)


class RequestLogger:
    """What `--enable-log-requests` turns on: a line per engine request in, and (`log_outputs`) per
    response out; `max_log_len` cuts prompts, token ids and output texts as vLLM's does."""

    def __init__(self, max_log_len: int | None, log_outputs: bool = False, log_deltas: bool = True) -> None:
        self.max_log_len = max_log_len
        self.log_outputs = log_outputs
        self.log_deltas = log_deltas  # --enable-log-deltas (vLLM's default) / --disable-log-deltas
        _level_notice()

    def _ids(self, token_ids: Sequence[int] | None) -> list[int] | None:
        """Token ids as vLLM's lines print them: a list of ints, cut to --max-log-len."""
        if token_ids is None:
            return None
        if self.max_log_len is not None:
            token_ids = token_ids[:self.max_log_len]
        return token_ids.tolist() if hasattr(token_ids, "tolist") else list(token_ids)  # numpy: Python ints

    def logs_deltas(self, route: str) -> bool:
        """Whether a stream of `route` logs each chunk (vLLM's chat and completion streams do)."""
        return self.log_outputs and self.log_deltas and route in ("chat", "completion")

    def delta(self, request_id: str, text: str, token_ids: Sequence[int], finish_reason: str | None) -> None:
        """vLLM's log_outputs of one streamed chunk with text: its " (streaming delta)" line (the token ids
        become a list only for the DEBUG line that prints them)."""
        if not text:
            return
        if self.max_log_len is not None:
            text = text[:self.max_log_len]
        if log.isEnabledFor(logging.DEBUG):
            ids = self._ids(token_ids)
            log.debug("Generated response %s (streaming delta) details: output_token_ids: %s", request_id, ids)
        log.info("Generated response %s (streaming delta): output: %r, finish_reason: %s", request_id, text,
                 finish_reason)

    def inputs(self, request_id: str, prompt: str | None, prompt_token_ids: Sequence[int] | None,
               params: Callable[[], SamplingParams] | None, lora: LoRAAdapter | None) -> None:
        """vLLM's log_inputs: `prompt` is the text vLLM's engine input keeps (None, or empty: none), `params`
        builds the SamplingParams logged (None: a route that logs none, as /tokenize), only when INFO logs it."""
        if log.isEnabledFor(logging.DEBUG):
            prompt = prompt or None
            if prompt is not None and self.max_log_len is not None:
                prompt = prompt[:self.max_log_len]
            ids = self._ids(prompt_token_ids)
            log.debug("Request %s details: prompt: %r, prompt_token_ids: %s, prompt_embeds shape: %s.",
                      request_id, prompt, ids, None)
        if log.isEnabledFor(logging.INFO):
            log.info("Received request %s: params: %s, lora_request: %s.", request_id,
                     "None" if params is None else sampling_params_repr(params()), lora_request_repr(lora))

    @staticmethod
    def added(engine_request_id: str) -> None:
        """AsyncLLM's line for an engine request it has added."""
        engine_log.info("Added request %s.", engine_request_id)

    @staticmethod
    def aborted(engine_request_id: str, request_id: str) -> None:
        """AsyncLLM's lines for a prompt's requests aborted as its generator closes: its abort(), then
        generate()'s."""
        engine_log.info("Aborted request(s) %s.", engine_request_id)
        engine_log.info("Request %s aborted.", request_id)

    @staticmethod
    def refused(request_id: str, error: str) -> None:
        """AsyncLLM's line for a prompt it refused as it added it (generate()'s bad request)."""
        engine_log.info("Request %s failed (bad request): %s.", request_id, error)

    def outputs(self, route: str, request_id: str, text: str, token_ids: Sequence[int], finish_reason: str | None,
                streaming: bool) -> None:
        """vLLM's log_outputs of one choice of a whole response, as `route` calls it (see ROUTES)."""
        if route == "batch":
            return
        if route == "chat" and not streaming and not text:
            return  # vLLM's chat logs a choice with text (or tool calls) only
        if route == "generate":
            if streaming or not len(token_ids):
                return  # vLLM's generate logs a whole response's token ids only
            text = ""
        if route in ("chat", "completion") and streaming:
            token_ids, finish_reason = None, "streaming_complete"
        if self.max_log_len is not None:
            text = text[:self.max_log_len]
        info = " (streaming complete)" if streaming else ""
        if log.isEnabledFor(logging.DEBUG):
            ids = self._ids(token_ids)
            log.debug("Generated response %s%s details: output_token_ids: %s", request_id, info, ids)
        log.info("Generated response %s%s: output: %r, finish_reason: %s", request_id, info, text, finish_reason)


def logged_generate_params(req, params: SamplingParams, max_tokens: int | None) -> SamplingParams:
    """The SamplingParams vLLM's generate route logs: the request's, with its kv/ec transfer params put back
    into extra_args and, when the request named no max_tokens, the server's (`max_tokens`)."""
    extra = dict(params.extra_args or {})
    if req.kv_transfer_params is not None:
        extra["kv_transfer_params"] = req.kv_transfer_params
    if req.ec_transfer_params is not None:
        extra["ec_transfer_params"] = req.ec_transfer_params
    update = {"extra_args": extra or params.extra_args}
    if max_tokens is not None:
        update["max_tokens"] = max_tokens
    return params.model_copy(update=update)


class DeltaLogging:
    """A stream's chunk format (server.jobs.ChunkFormat) that logs each chunk it writes as vLLM's
    "(streaming delta)" line: the text (as the format describes it: a chat's tool calls by their
    arguments) and token ids since the choice's last chunk, with its finish_reason on the last one;
    everything else is the wrapped format's."""

    def __init__(self, inner, logger: RequestLogger, request_id: str) -> None:
        self.inner = inner
        self.logger = logger
        self.request_id = request_id

    def tokens(self, job, choice, end: int, last: bool) -> bytes:
        start, plan = choice.num_sent, choice.plan
        chunk = self.inner.tokens(job, choice, end, last)  # (a chat's tool calls are read from its text here)
        self.logger.delta(self.request_id, self.inner.logged_delta("".join(plan.pieces[start:end])),
                          plan.token_ids[start:end], choice.finish_reason if last else None)
        return chunk

    def __getattr__(self, name: str):
        return getattr(self.inner, name)
