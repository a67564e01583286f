"""The token-in/token-out protocol of vLLM 0.33's scale-out front ends (`scale_out/token_in_token_out/protocol.py`).

`GenerateRequest` is what `/render` writes and `/inference/v1/generate` reads; `GenerateTokensResponse`
and `GenerateTokensStreamResponse` are generate's answers (token ids only), which the derender requests
carry back. The models validate like vLLM's: the same fields, types, defaults and checks, unknown fields
ignored, the request-level errors with vLLM's messages; `parse_generate_request` reports a bad
`sampling_params` as FastAPI reports vLLM's union of a SamplingParams instance and its fields.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError, field_validator, model_validator

from server.errors import schema_error
from server.protocol import (INT64_MAX, INT64_MIN, ChatCompletionNamedToolChoiceParam, ChatCompletionRequest,
                             ChatCompletionToolsParam, CompletionRequest, StreamOptions, random_uuid)
from server.sampling_params import SamplingParams

OutputMode = Literal["tokens", "text", "derender"]


def _no_negative_ids(ids: list[int] | None) -> list[int] | None:
    if ids is not None and any(t < 0 for t in ids):
        raise ValueError("token_ids must not contain negative values")
    return ids


class ParseContext(BaseModel):
    """The chat request's context a generate server needs to parse its output (output_mode "derender");
    fields from a newer /render are kept."""
    model_config = ConfigDict(extra="allow")

    tools: list[ChatCompletionToolsParam] | None = None
    tool_choice: Literal["none", "auto", "required"] | ChatCompletionNamedToolChoiceParam | None = "none"
    parallel_tool_calls: bool | None = True
    include_reasoning: bool = True
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    history_tool_call_cnt: int = Field(default=0, ge=0)

    def to_chat_request(self) -> ChatCompletionRequest:
        """The message-less chat request the output is parsed against (vLLM's, built without its checks
        but that of a named tool_choice)."""
        if isinstance(self.tool_choice, ChatCompletionNamedToolChoiceParam):
            name = self.tool_choice.function.name
            if not any(tool.function.name == name for tool in self.tools or ()):
                raise ValueError("The tool specified in `tool_choice` does not match any of the specified `tools` "
                                 "(parameter=tool_choice)")
        return ChatCompletionRequest.model_construct(
            messages=[], tools=self.tools, tool_choice=self.tool_choice, parallel_tool_calls=self.parallel_tool_calls,
            chat_template_kwargs=self.chat_template_kwargs)


class ReasoningParserKwargs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)


class GenerateRequest(BaseModel):
    """vLLM's GenerateRequest (multimodal `features` and `content_parts` are accepted as JSON and refused
    when served: the simulated models take text only)."""
    request_id: str = Field(default_factory=random_uuid)
    token_ids: Annotated[list[int], Field(min_length=1)]
    token_offsets: list[tuple[int, int]] | None = None
    features: dict[str, Any] | None = None
    content_parts: list[dict[str, Any]] | None = None
    sampling_params: SamplingParams
    model: str | None = None
    reasoning_ended: bool | None = None
    reasoning_parser_kwargs: ReasoningParserKwargs | None = None
    return_token_ids: bool | None = None
    output_mode: OutputMode = "tokens"
    parse_context: ParseContext | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    cache_salt: str | None = Field(default=None, min_length=1, max_length=1024)
    priority: int = Field(default=0, ge=INT64_MIN, le=INT64_MAX)
    kv_transfer_params: dict[str, Any] | None = None
    ec_transfer_params: dict[str, Any] | None = None

    check_cache_salt = model_validator(mode="before")(classmethod(ChatCompletionRequest.check_cache_salt.__func__))
    validate_token_ids = field_validator("token_ids")(classmethod(lambda cls, v: _no_negative_ids(v)))

    @model_validator(mode="after")
    def check_modes(self) -> GenerateRequest:
        if self.content_parts and self.features:
            raise ValueError("content_parts and features are mutually exclusive")
        if self.output_mode != "tokens" and not self.sampling_params.detokenize:
            raise ValueError(f"output_mode={self.output_mode!r} requires sampling_params.detokenize to be true")
        unknown = sorted(self.parse_context.model_extra or ()) if self.parse_context is not None else []
        if unknown and self.output_mode == "derender":
            raise ValueError(f"Unknown parse_context fields {unknown}; the render server is newer than this "
                             "generate server")
        return self

    def provided(self, data: dict, name: str) -> bool:
        """Whether the client set `sampling_params.<name>` (vLLM defaults max_tokens only when it did not)."""
        params = data.get("sampling_params")
        return isinstance(params, dict) and name in params


def parse_generate_request(data: Any) -> GenerateRequest:
    """A generate body as FastAPI validates vLLM's GenerateRequest."""
    if not isinstance(data, dict):
        raise schema_error([{"type": "model_attributes_type", "loc": ("body",),
                             "msg": "Input should be a valid dictionary or object to extract fields from",
                             "input": data}])
    try:
        return GenerateRequest.model_validate(data)
    except ValidationError as exc:
        raise schema_error(_with_sampling_union(exc.errors(include_url=False), data.get("sampling_params"))) from None


def _with_sampling_union(errors: list[dict], sampling_params: Any) -> list[dict]:
    """pydantic's errors with vLLM's union of a SamplingParams instance and its fields: the instance branch's
    error first, a non-dict reported as its dict branch reports it."""
    out, instance_added = [], False
    for error in errors:
        error = {**error, "loc": ("body", *error["loc"])}
        if error["loc"][1:2] == ("sampling_params",) and error["type"] != "missing":
            if not instance_added:
                out.append({"type": "is_instance_of", "loc": ("body", "sampling_params"),
                            "msg": "Input should be an instance of SamplingParams", "input": sampling_params,
                            "ctx": {"class": "SamplingParams"}})
                instance_added = True
            if error["type"] == "model_type":
                error = {"type": "dict_type", "loc": error["loc"], "msg": "Input should be a valid dictionary",
                         "input": error["input"]}
        out.append(error)
    return out


# -- generate's answers, as the derender requests carry them ------------------------------------------
class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: int | None = 0
    prompt_tokens_details: dict[str, Any] | None = None
    completion_tokens_details: dict[str, Any] | None = None


class GenerateLogProb(BaseModel):
    token_id: int
    logprob: float
    rank: int | None = None


class GenerateLogProbsContent(GenerateLogProb):
    top_logprobs: list[GenerateLogProb] = []


class GenerateLogProbs(BaseModel):
    content: list[GenerateLogProbsContent] | None = None


class _ChoiceFields(BaseModel):
    index: int
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None
    routed_experts: str | None = None
    sampling_mask: list[list[int]] | None = None
    weight_versions: list[dict[str, Any]] | None = None
    logprobs: GenerateLogProbs | None = None

    validate_token_ids = field_validator("token_ids")(classmethod(lambda cls, v: _no_negative_ids(v)))


class GenerateTokensChoice(_ChoiceFields):
    finish_reason: str | None = "stop"


class GenerateTokensStreamChoice(_ChoiceFields):
    finish_reason: str | None = None


class _ResponseFields(BaseModel):
    request_id: str = Field(default_factory=random_uuid)
    usage: UsageInfo | None = None
    prompt_token_ids: list[NonNegativeInt] | None = None
    mm_placeholders: dict[str, list[dict[str, int]]] | None = None
    metrics: dict[str, Any] | None = None
    output_mode: Literal["tokens"] = "tokens"


class GenerateTokensResponse(_ResponseFields):
    model: str | None = None
    created: int | None = None
    prompt_logprobs: list[dict[int, dict[str, Any]] | None] | None = None
    prompt_token_id_logprobs: str | None = None
    kv_transfer_params: dict[str, Any] | None = None
    ec_transfer_params: dict[str, Any] | None = None
    choices: list[GenerateTokensChoice]


class GenerateTokensStreamResponse(_ResponseFields):
    choices: list[GenerateTokensStreamChoice]


# -- derender ---------------------------------------------------------------------------------------
class DerenderStreamState(BaseModel):
    """The detokenizer's window a client carries between streaming derender calls (vLLM's fields and bounds)."""
    prev_tokens: list[str] = Field(default_factory=list)
    prefix_offset: int = Field(default=0, ge=0)
    read_offset: int = Field(default=0, ge=0)
    role_sent: bool = False
    logprob_context_token_ids: list[int] = Field(default_factory=list, max_length=4)
    logprob_text_offset: int = Field(default=0, ge=0)
    output_token_ids: list[int] = Field(default_factory=list)
    output_chunk_lens: list[Annotated[int, Field(gt=0)]] = Field(default_factory=list)
    tools_streamed: bool = False
    last_tool_call_ids: list[str] = Field(default_factory=list)

    @field_validator("prev_tokens")
    @classmethod
    def bounded_window(cls, tokens: list[str]) -> list[str]:
        if len(tokens) > 1024:
            raise ValueError(f"prev_tokens length ({len(tokens)}) exceeds maximum (1024)")
        return tokens

    @model_validator(mode="after")
    def chunk_lens_cover_output(self) -> DerenderStreamState:
        total = sum(self.output_chunk_lens)
        if total != len(self.output_token_ids):
            raise ValueError(f"output_chunk_lens must sum to len(output_token_ids) (got sum={total}, "
                             f"len(output_token_ids)={len(self.output_token_ids)})")
        return self


class DerenderChatRequest(BaseModel):
    stream: Literal[False] = False
    model: str | None = None
    generate_response: GenerateTokensResponse
    prompt_tokens: int | None = None
    prompt_token_ids: list[NonNegativeInt] | None = None
    chat_request: ChatCompletionRequest | None = None


class DerenderChatStreamRequest(BaseModel):
    stream: Literal[True]
    model: str | None = None
    generate_chunk: GenerateTokensStreamResponse
    stream_state: DerenderStreamState | None = None
    prompt_tokens: int | None = None
    prompt_token_ids: list[NonNegativeInt] | None = None
    chat_request: ChatCompletionRequest | None = None


class DerenderCompletionRequest(BaseModel):
    stream: Literal[False] = False
    model: str | None = None
    generate_responses: list[GenerateTokensResponse]
    prompt_tokens: list[int] | None = None
    prompt_token_ids: list[list[NonNegativeInt] | None] | None = None
    completion_request: CompletionRequest | None = None

    @model_validator(mode="after")
    def parallel_lists(self) -> DerenderCompletionRequest:
        count = len(self.generate_responses)
        if self.prompt_tokens is not None and len(self.prompt_tokens) != count:
            raise ValueError(f"prompt_tokens length ({len(self.prompt_tokens)}) must equal generate_responses "
                             f"length ({count})")
        if self.prompt_token_ids is not None and len(self.prompt_token_ids) != count:
            raise ValueError(f"prompt_token_ids length ({len(self.prompt_token_ids)}) must equal "
                             f"generate_responses length ({count})")
        return self


class DerenderCompletionStreamRequest(BaseModel):
    stream: Literal[True]
    model: str | None = None
    generate_chunk: GenerateTokensStreamResponse
    stream_state: DerenderStreamState | None = None
    prompt_tokens: int | None = None
    prompt_token_ids: list[NonNegativeInt] | None = None
    completion_request: CompletionRequest | None = None


def parse_union(data: Any, *members: type[BaseModel]) -> BaseModel:
    """A body validated as FastAPI validates vLLM's union of `members` (the non-streaming request first):
    the first that validates; else every member's errors, each under its name."""
    if not isinstance(data, dict):
        raise schema_error([{"type": "model_attributes_type", "loc": ("body",),
                             "msg": "Input should be a valid dictionary or object to extract fields from",
                             "input": data}])
    errors = []
    for member in members:
        try:
            return member.model_validate(data)
        except ValidationError as exc:
            errors += [{**e, "loc": ("body", member.__name__, *e["loc"]) if e["loc"] else ("body",)}
                       for e in exc.errors(include_url=False)]
    raise schema_error(errors)
