"""vLLM 0.33's SamplingParams on the wire: what `/render` writes and `/inference/v1/generate` reads.

vLLM sends the engine's own `SamplingParams` (a msgspec struct) in JSON: it is validated field by field
(pydantic's lax types, unknown keys ignored), then normalized and checked as its `__post_init__` does
(`stop` as a list, duplicates dropped from `stop_token_ids` and `bad_words`, a temperature under 0.01
raised to 0.01, greedy sampling without top-p/top-k/min-p, `_verify_args`' messages). It is written with
`omit_defaults`, which msgspec decides by identity: a field the request builders always pass (the three
penalties and temperature, top-p and min-p unless greedy sampling reset them, the three lists,
`skip_reading_prefix_cache`) is always written, any other only when it differs from its default.

The request builders follow vLLM's `to_sampling_params` of a chat, completion and Responses request
(`from_chat`, `from_completion`, `from_responses`): a field the request leaves out takes the server's
default (`defaults`: its generation config's, server/generation_config.py), else the OpenAI one.
"""
from __future__ import annotations

import json
import sys
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from server.errors import validation_error
from server.protocol import (MAX_N_SEQUENCES, ChatCompletionRequest, CompletionRequest, StructuredOutputsParams,
                             ThinkingTokenBudget)
from server.responses_protocol import ResponsesRequest


class RequestOutputKind(Enum):
    """What each engine output holds (vLLM's): everything so far, the new tokens, or only the final one."""
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


CUMULATIVE, DELTA, FINAL_ONLY = RequestOutputKind
_GREEDY_EPS = 1e-5   # vLLM's _SAMPLING_EPS
_MIN_TEMPERATURE = 0.01  # vLLM's _MAX_TEMP: a lower positive temperature is raised to it

# the fields written whatever their value (see the module docstring), in the struct's order
_ALWAYS_WRITTEN = ("presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "min_p",
                   "stop", "stop_token_ids", "bad_words", "skip_reading_prefix_cache")


class SamplingParams(BaseModel):
    """vLLM's SamplingParams as its JSON form validates: its public fields, in its order."""
    model_config = ConfigDict(extra="ignore")

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    watermarking: bool | None = None
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    prompt_logprob_token_ids: list[list[int]] | None = None
    prompt_logprob_start: int | None = None
    logprob_token_ids: list[int] | None = None
    flat_logprobs: bool = False
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    output_kind: RequestOutputKind = CUMULATIVE
    stream_interval: int | None = None
    skip_clone: bool = False
    output_text_buffer_length: int = 0
    structured_outputs: StructuredOutputsParams | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    extra_args: dict[str, Any] | None = None
    bad_words: list[str] | None = None
    skip_reading_prefix_cache: bool | None = None
    thinking_token_budget: ThinkingTokenBudget = None
    repetition_detection: dict[str, Any] | None = None
    routed_experts_prompt_start: int = 0
    trace_decode_token_ids: list[int] | None = None

    @model_validator(mode="after")
    def post_init(self) -> SamplingParams:
        """vLLM's __post_init__: normalize, then _verify_args (its messages, raised past pydantic)."""
        if 0 < self.temperature < _MIN_TEMPERATURE:
            self.temperature = _MIN_TEMPERATURE
        if self.seed == -1:
            self.seed = None
        self.stop = [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else self.stop
        self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids or ()))
        self.bad_words = list(dict.fromkeys(self.bad_words or ()))
        if self.stop and not self.include_stop_str_in_output:
            self.output_text_buffer_length = max(len(s) for s in self.stop) - 1
        self._verify_args()
        if self.temperature < _GREEDY_EPS:
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
        if self.skip_reading_prefix_cache is None:
            self.skip_reading_prefix_cache = (self.prompt_logprobs is not None
                                              or self.prompt_logprob_token_ids is not None)
        return self

    def _verify_args(self) -> None:
        if self.n < 1:
            raise validation_error(f"n must be at least 1, got {self.n}.")
        if self.n > MAX_N_SEQUENCES:
            raise validation_error(f"n must be at most {MAX_N_SEQUENCES}, got {self.n}. To increase this limit, "
                                   "set the VLLM_MAX_N_SEQUENCES environment variable.")
        if self.extra_args and not _integers_fit(self.extra_args):
            raise validation_error("extra_args integers must be between -2**63 and 2**64 - 1.", "extra_args")
        if self.stream_interval is not None and self.stream_interval < 1:
            raise validation_error(f"stream_interval must be at least 1, got {self.stream_interval}.",
                                   "stream_interval", self.stream_interval)
        if self.prompt_logprobs is not None and self.prompt_logprobs != -1 and self.prompt_logprobs < 0:
            raise validation_error(f"prompt_logprobs must be non-negative or -1, got {self.prompt_logprobs}.",
                                   "prompt_logprobs", self.prompt_logprobs)
        if self.stop and not self.detokenize:
            raise validation_error("stop strings are only supported when detokenize is True. "
                                   "Set detokenize=True to use stop.")
        # the checks a chat or completion request runs too, in vLLM's order (limits that need the server: later)
        self.engine_view().verify_sampling(self.n, sys.maxsize if self.max_tokens is None else self.max_tokens,
                                           -1, self.logprobs, sys.maxsize, reasoning=True)

    def engine_view(self, max_tokens: int | None = None, stream: bool = False) -> CompletionRequest:
        """These parameters as the emulator's engine path reads a request (Serving.generate, verify_sampling)."""
        return CompletionRequest.model_construct(
            prompt="", n=self.n, max_tokens=self.max_tokens if max_tokens is None else max_tokens, stream=stream,
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, seed=self.seed, stop=list(self.stop or ()),
            stop_token_ids=list(self.stop_token_ids or ()), ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logit_bias={str(k): v for k, v in self.logit_bias.items()} if self.logit_bias is not None else None,
            allowed_token_ids=self.allowed_token_ids, bad_words=list(self.bad_words or ()), logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs, thinking_token_budget=self.thinking_token_budget,
            stream_interval=self.stream_interval, structured_outputs=self.structured_outputs, response_format=None,
            skip_special_tokens=self.skip_special_tokens, priority=0, user=None, kv_transfer_params=None)

    def to_json(self) -> dict:
        """The JSON vLLM writes of these parameters (omit_defaults, see the module docstring)."""
        greedy = self.temperature < _GREEDY_EPS
        out = {}
        for name, info in type(self).model_fields.items():
            value = getattr(self, name)
            written = name in _ALWAYS_WRITTEN and not (greedy and name in ("top_p", "min_p"))
            if not written and value == info.default and type(value) is type(info.default):
                continue
            if name == "structured_outputs":
                value = value.described()
            elif name == "output_kind":
                value = value.value
            elif name == "logit_bias":
                value = {str(k): v for k, v in value.items()}
            out[name] = value
        return out


def _integers_fit(value: Any) -> bool:
    """Whether every integer in `value` (keys and values, nested) fits the engine's MessagePack transport."""
    if isinstance(value, bool):
        return True
    if isinstance(value, int):
        return -(2**63) <= value < 2**64
    if isinstance(value, dict):
        return all(_integers_fit(k) and _integers_fit(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_integers_fit(v) for v in value)
    return True


# -- from the API requests (vLLM's to_sampling_params) -------------------------------------------------
def _structured_outputs(structured: StructuredOutputsParams | None, response_format) -> StructuredOutputsParams | None:
    """vLLM's structured_outputs_from_response_format: response_format overrides structured_outputs."""
    kind = getattr(response_format, "type", None)
    if response_format is None or kind == "text":
        return structured
    if kind == "json_object":
        overrides: dict[str, Any] = {"json_object": True}
    elif kind == "json_schema":
        overrides = {"json": response_format.json_schema.json_schema}
    else:
        overrides = {"structural_tag": json.dumps(response_format.model_dump(by_alias=True))}
    base = {} if structured is None else structured.model_dump(by_alias=True, exclude_defaults=True)
    return StructuredOutputsParams.model_validate({**base, **overrides})


def _extra_args(req, kv_transfer_params: dict | None) -> dict | None:
    extra = dict(getattr(req, "vllm_xargs", None) or {})
    if kv_transfer_params:
        extra["kv_transfer_params"] = kv_transfer_params
    if getattr(req, "ec_transfer_params", None):
        extra["ec_transfer_params"] = req.ec_transfer_params
    return extra


# vLLM's _DEFAULT_SAMPLING_PARAMS: what a field the request and the server's defaults leave out is
OPENAI_DEFAULTS = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                   "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}


def _penalties(req, defaults: dict | None) -> dict:
    """The sampling fields, by vLLM's priority: the request's, the server's default, the OpenAI default."""
    defaults = defaults or {}
    return {name: value if (value := getattr(req, name)) is not None else defaults.get(name, neutral)
            for name, neutral in OPENAI_DEFAULTS.items()}


def _skip_special_tokens(req, defaults: dict | None) -> bool:
    if req.skip_special_tokens is not None:
        return req.skip_special_tokens
    return (defaults or {}).get("skip_special_tokens", True)


def _common(req, stream: bool, defaults: dict | None) -> dict:
    """The fields a chat and a completion request pass alike."""
    return {**_penalties(req, defaults), "watermarking": getattr(req, "watermarking", None), "seed": req.seed,
            "stop": req.stop, "stop_token_ids": req.stop_token_ids, "ignore_eos": req.ignore_eos,
            "min_tokens": req.min_tokens, "logprob_token_ids": getattr(req, "logprob_token_ids", None) or None,
            "skip_special_tokens": _skip_special_tokens(req, defaults),
            "spaces_between_special_tokens": getattr(req, "spaces_between_special_tokens", True),
            "include_stop_str_in_output": req.include_stop_str_in_output,
            "output_kind": DELTA if stream else FINAL_ONLY, "stream_interval": req.stream_interval,
            "structured_outputs": _structured_outputs(req.structured_outputs, req.response_format),
            "logit_bias": req.logit_bias_ids(), "bad_words": req.bad_words,
            "thinking_token_budget": req.thinking_token_budget, "allowed_token_ids": req.allowed_token_ids,
            "skip_clone": True, "repetition_detection": getattr(req, "repetition_detection", None),
            "routed_experts_prompt_start": getattr(req, "routed_experts_prompt_start", 0) or 0}


def from_chat(req: ChatCompletionRequest, max_tokens: int, structured: StructuredOutputsParams | None = None,
              defaults: dict | None = None) -> SamplingParams:
    """vLLM's ChatCompletionRequest.to_sampling_params (`structured`: what the tool parser forces instead;
    `defaults`: the server's default sampling parameters)."""
    prompt_logprobs = req.top_logprobs if req.prompt_logprobs is None and req.echo else req.prompt_logprobs
    fields = {**_common(req, bool(req.stream), defaults), "n": 1 if req.n is None else req.n,
              "logprobs": req.top_logprobs if req.logprobs and not getattr(req, "logprob_token_ids", None) else None,
              "prompt_logprobs": prompt_logprobs, "max_tokens": max_tokens,
              "extra_args": _extra_args(req, req.kv_transfer_params) or None}
    if structured is not None:
        fields["structured_outputs"] = structured
    return SamplingParams.model_validate(fields)


def from_completion(req: CompletionRequest, max_tokens: int, defaults: dict | None = None) -> SamplingParams:
    """vLLM's CompletionRequest.to_sampling_params (`defaults`: the server's default sampling parameters)."""
    prompt_logprobs = req.logprobs if req.prompt_logprobs is None and req.echo else req.prompt_logprobs
    fields = {**_common(req, bool(req.stream), defaults), "n": req.n,
              "logprobs": None if getattr(req, "logprob_token_ids", None) else req.logprobs,
              "prompt_logprobs": prompt_logprobs,
              "max_tokens": 1 if req.echo and req.max_tokens == 0 else max_tokens,
              "extra_args": _extra_args(req, req.kv_transfer_params) or None}
    return SamplingParams.model_validate(fields)


def from_responses(req: ResponsesRequest, max_tokens: int, defaults: dict | None = None) -> SamplingParams:
    """vLLM's ResponsesRequest.to_sampling_params (its extra_args is never null: {} without any;
    `defaults`: the server's default sampling parameters)."""
    constraint = req.structured_constraint()
    structured = None
    if constraint is not None:
        structured = StructuredOutputsParams.model_validate(
            {"json_object": True} if constraint.kind == "json_object" else {constraint.kind: constraint.spec})
    penalties = _penalties(req, defaults)
    stop = req.stop if getattr(req, "stop", None) else []
    fields = {**penalties, "watermarking": req.watermarking, "max_tokens": max_tokens,
              "logprobs": req.top_logprobs if req.include_logprobs() else None,
              "stop": [stop] if isinstance(stop, str) else stop, "stop_token_ids": getattr(req, "stop_token_ids", None),
              "seed": getattr(req, "seed", None), "ignore_eos": getattr(req, "ignore_eos", False),
              "output_kind": DELTA if req.stream else FINAL_ONLY, "structured_outputs": structured,
              "logit_bias": req.engine_view(max_tokens).logit_bias_ids(),
              "extra_args": _extra_args(req, req.kv_transfer_params), "skip_clone": True,
              "skip_special_tokens": _skip_special_tokens(req, defaults),
              "spaces_between_special_tokens": req.spaces_between_special_tokens,
              "include_stop_str_in_output": req.include_stop_str_in_output}
    return SamplingParams.model_validate(fields)


def hoist_transfer_params(params: SamplingParams) -> tuple[dict | None, dict | None]:
    """vLLM's render moves kv/ec transfer params out of extra_args into the GenerateRequest (generate puts
    them back): (kv_transfer_params, ec_transfer_params)."""
    if not params.extra_args:
        return None, None
    extra = dict(params.extra_args)
    kv, ec = extra.pop("kv_transfer_params", None), extra.pop("ec_transfer_params", None)
    params.extra_args = extra or None
    return kv, ec
