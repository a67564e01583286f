"""Request schemas of the OpenAI-compatible API, validated like vLLM 0.33's.

Field names, types, defaults and union orders follow vLLM's pydantic models
(`entrypoints/openai/completion/protocol.py`, `chat_completion/protocol.py`,
`serve/tokenize/protocol.py`), so a malformed field gets vLLM's pydantic message;
the request-level checks (`model_validator`s and `SamplingParams._verify_args`) raise
vLLM's messages. Unknown fields are accepted, as in vLLM (`extra="allow"`). Fields
that only change what a real model would compute (temperature, penalties, ...) are
validated and otherwise have no effect on a simulated engine.
"""
from __future__ import annotations

import math
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from server.errors import validation_error

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_STOP_STRINGS = 4            # VLLM_MAX_STOP_STRINGS
MAX_COMPLETION_PROMPTS = 1024   # VLLM_MAX_COMPLETION_PROMPTS
MAX_N_SEQUENCES = 16384         # VLLM_MAX_N_SEQUENCES
CACHE_SALT_FORBIDDEN = frozenset("@/\\\x00")  # characters a cache_salt may not hold (vLLM's)

StopParam = str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None
TopLogprobsParam = Annotated[int, BeforeValidator(lambda v: 0 if v is None else v)]
Seed = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]


def _thinking_token_budget(value: Any) -> int | None:
    """vLLM's validate_thinking_token_budget: a non-negative integer, or -1 (unlimited: None)."""
    if value is None:
        return None
    if isinstance(value, (bool, float)) or not isinstance(value, int) or value < -1:
        raise validation_error("`thinking_token_budget` must be a non-negative integer or -1 for unlimited.",
                               parameter="thinking_token_budget", value=value)
    return None if value == -1 else value


ThinkingTokenBudget = Annotated[int | None, BeforeValidator(_thinking_token_budget)]
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]


def random_uuid() -> str:
    """vLLM's random_uuid: 64 random bits as 16 hex digits, a request's id when its body names none."""
    return f"{uuid.uuid4().int & (2**64 - 1):016x}"


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class JsonSchemaResponseFormat(OpenAIBaseModel):
    name: str
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class LegacyStructuralTag(OpenAIBaseModel):
    begin: str
    structural_tag_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    end: str


class LegacyStructuralTagResponseFormat(OpenAIBaseModel):
    type: Literal["structural_tag"]
    structures: list[LegacyStructuralTag]
    triggers: list[str]


class StructuralTagResponseFormat(OpenAIBaseModel):
    type: Literal["structural_tag"]
    format: Any


class ResponseFormat(OpenAIBaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaResponseFormat | None = None


AnyResponseFormat = ResponseFormat | StructuralTagResponseFormat | LegacyStructuralTagResponseFormat
CONSTRAINT_FIELDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


class StructuredOutputsParams(BaseModel):
    """vLLM's StructuredOutputsParams: exactly one constraint, with its options."""
    json_: str | dict | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None

    def constraints(self) -> dict[str, Any]:
        return {"json": self.json_, **{k: getattr(self, k) for k in CONSTRAINT_FIELDS[1:]}}

    def described(self) -> dict:
        """As vLLM's messages show the dataclass (its __dict__)."""
        fields = self.constraints()
        return {**{k: fields[k] for k in CONSTRAINT_FIELDS[:5]}, "disable_any_whitespace": self.disable_any_whitespace,
                "disable_additional_properties": self.disable_additional_properties,
                "whitespace_pattern": self.whitespace_pattern, "structural_tag": self.structural_tag,
                "_backend": None, "_backend_was_auto": False}

    @model_validator(mode="after")
    def exactly_one_constraint(self) -> StructuredOutputsParams:
        count = sum(v is not None for v in self.constraints().values())
        if count > 1:
            raise validation_error("You can only use one kind of structured outputs constraint but multiple are "
                                   f"specified: {self.described()}")
        if count < 1:
            raise validation_error("You must use one kind of structured outputs constraint but none are "
                                   f"specified: {self.described()}")
        return self


class _SamplingFields(OpenAIBaseModel):
    """The fields the completion and chat requests share."""
    model: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: Seed | None = None
    stop: StopParam = []
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    use_beam_search: bool = False
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = []
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool | None = None
    truncate_prompt_tokens: Annotated[int, Field(ge=-1, le=INT64_MAX)] | None = None
    truncation_side: Literal["left", "right"] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] = Field(default_factory=list)
    thinking_token_budget: ThinkingTokenBudget = None
    prompt_logprobs: int | None = None
    priority: Seed = 0
    request_id: str = Field(default_factory=random_uuid)
    session_id: str | None = None  # vLLM's (server/session_id.py): its KV events publish it
    return_token_ids: bool | None = None
    return_tokens_as_token_ids: bool | None = None
    cache_salt: str | None = Field(default=None, min_length=1, max_length=1024)
    kv_transfer_params: dict[str, Any] | None = None
    stream_interval: Annotated[int, Field(ge=1)] | None = None
    response_format: AnyResponseFormat | None = None
    structured_outputs: StructuredOutputsParams | None = None

    @model_validator(mode="before")
    @classmethod
    def validate_response_format(cls, data: Any) -> Any:
        response_format = data.get("response_format") if isinstance(data, dict) else None
        if isinstance(response_format, dict):
            if response_format.get("type") == "json_schema" and response_format.get("json_schema") is None:
                raise validation_error("When response_format type is 'json_schema', the 'json_schema' field must be "
                                       "provided.", parameter="response_format")
        return data

    @model_validator(mode="before")
    @classmethod
    def check_structured_outputs_count(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("structured_outputs"), dict):
            return data
        count = sum(data["structured_outputs"].get(k) is not None for k in ("json", "regex", "choice"))
        if count > 1:
            raise validation_error("You can only use one kind of constraints for structured outputs "
                                   "('json', 'regex' or 'choice').")
        if count > 0 and data.get("tool_choice", "none") not in ("none", "auto", "required"):
            raise validation_error("You can only either use constraints for structured outputs or tools, not both.")
        return data

    @model_validator(mode="before")
    @classmethod
    def check_cache_salt(cls, data: Any) -> Any:
        """vLLM's validate_cache_salt: what a cache backend could misread is refused before it gets there."""
        salt = data.get("cache_salt") if isinstance(data, dict) else None
        if salt is None:
            return data
        if not isinstance(salt, str) or not salt:
            raise validation_error("Parameter 'cache_salt' must be a non-empty string if provided.",
                                   parameter="cache_salt")
        if len(salt) > 128 or not CACHE_SALT_FORBIDDEN.isdisjoint(salt):
            raise validation_error("Parameter 'cache_salt' must be at most 128 characters and must not contain "
                                   "'@', '/', '\\\\', or NUL.", parameter="cache_salt")
        return data

    @model_validator(mode="before")
    @classmethod
    def validate_stream_options(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("stream_options") and not data.get("stream"):
            raise validation_error("Stream options can only be defined when `stream=True`.",
                                   parameter="stream_options")
        return data

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self, force: bool) -> tuple[bool, bool]:
        """vLLM's should_include_usage: (final usage chunk, usage on every chunk)."""
        if force:
            return True, True
        if self.stream_options is None:
            return False, False
        include = bool(self.stream_options.include_usage)
        return include, include and bool(self.stream_options.continuous_usage_stats)

    def logit_bias_ids(self) -> dict[int, float] | None:
        """vLLM's SamplingParams.from_optional: the logit_bias keys as token ids (400 for any that is not)."""
        if self.logit_bias is None:
            return None
        converted, invalid = {}, []
        for token, bias in self.logit_bias.items():
            try:
                converted[int(token)] = min(100.0, max(-100.0, bias))
            except (ValueError, TypeError):
                invalid.append(token)
        if invalid:
            raise validation_error(f"logit_bias contains key(s) that cannot be converted to integer token IDs: "
                                   f"{invalid!r}", parameter="logit_bias", value=invalid)
        return converted

    def verify_sampling(self, n: int, max_tokens: int, max_logprobs: int, logprobs: int | None,
                        vocab_size: int, reasoning: bool = False, defaults: dict | None = None) -> None:
        """vLLM's SamplingParams checks, in its order (`from_optional`, `_verify_args`, greedy sampling,
        `verify`: logprobs, logit_bias, stop_token_ids, allowed_token_ids; then the input processor's
        thinking_token_budget check: `reasoning` is whether the server has a reasoning config). A sampling
        field the request leaves out is checked as the server's default (`defaults`: its model's generation
        config's, which to_sampling_params fills in first), else vLLM's own."""
        logit_bias = self.logit_bias_ids()
        defaults = defaults or {}

        def chosen(name: str, neutral):
            value = getattr(self, name)
            return defaults.get(name, neutral) if value is None else value
        if n < 1:
            raise validation_error(f"n must be at least 1, got {n}.")
        if n > MAX_N_SEQUENCES:
            raise validation_error(f"n must be at most {MAX_N_SEQUENCES}, got {n}. To increase this limit, "
                                   "set the VLLM_MAX_N_SEQUENCES environment variable.")
        presence, frequency = chosen("presence_penalty", 0.0), chosen("frequency_penalty", 0.0)
        repetition, temperature = chosen("repetition_penalty", 1.0), chosen("temperature", 1.0)
        top_p, top_k, min_p = chosen("top_p", 1.0), chosen("top_k", 0), chosen("min_p", 0.0)
        if not -2.0 <= presence <= 2.0:
            raise validation_error(f"presence_penalty must be in [-2, 2], got {presence}.")
        if not -2.0 <= frequency <= 2.0:
            raise validation_error(f"frequency_penalty must be in [-2, 2], got {frequency}.")
        if not math.isfinite(repetition):
            raise validation_error(f"repetition_penalty must be a finite number, got {repetition}.")
        if repetition <= 0.0:
            raise validation_error(f"repetition_penalty must be greater than zero, got {repetition}.")
        if not math.isfinite(temperature):
            raise validation_error(f"temperature must be a finite number, got {temperature}.",
                                   parameter="temperature", value=temperature)
        if temperature < 0.0:
            raise validation_error(f"temperature must be non-negative, got {temperature}.",
                                   parameter="temperature", value=temperature)
        if temperature > 2.0:
            raise validation_error(f"temperature must be in [0, 2], got {temperature}.",
                                   parameter="temperature", value=temperature)
        if not 0.0 < top_p <= 1.0:
            raise validation_error(f"top_p must be in (0, 1], got {top_p}.", parameter="top_p", value=top_p)
        if top_k < -1:
            raise validation_error(f"top_k must be 0 (disable), or at least 1, got {top_k}.")
        if not 0.0 <= min_p <= 1.0:
            raise validation_error(f"min_p must be in [0, 1], got {min_p}.")
        if max_tokens < 1:
            raise validation_error(f"max_tokens must be at least 1, got {max_tokens}.",
                                   parameter="max_tokens", value=max_tokens)
        if self.min_tokens < 0:
            raise validation_error(f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.")
        if self.min_tokens > max_tokens:
            raise validation_error(f"min_tokens must be less than or equal to max_tokens={max_tokens}, "
                                   f"got {self.min_tokens}.")
        if logprobs is not None and logprobs != -1 and logprobs < 0:
            raise validation_error(f"logprobs must be non-negative or -1, got {logprobs}.",
                                   parameter="logprobs", value=logprobs)
        if any(not s for s in self.stop_strings()):
            raise validation_error("stop cannot contain an empty string.")
        if any(not word for word in self.bad_words):
            raise validation_error(f"bad_words cannot contain an empty string. Got bad_words={self.bad_words}")
        if temperature < 1e-5 and n > 1:
            raise validation_error(f"n must be 1 when using greedy sampling, got {n}.")
        if max_logprobs == -1:
            max_logprobs = vocab_size
        wanted = vocab_size if logprobs == -1 else logprobs
        if wanted and wanted > max_logprobs:
            raise validation_error(f"Requested sample logprobs of {wanted}, which is greater than max "
                                   f"allowed: {max_logprobs}", parameter="logprobs", value=wanted)
        wanted = vocab_size if self.prompt_logprobs == -1 else self.prompt_logprobs
        if wanted and wanted > max_logprobs:
            raise validation_error(f"Requested prompt logprobs of {wanted}, which is greater than "
                                   f"max allowed: {max_logprobs}", parameter="prompt_logprobs", value=wanted)
        for name, ids in (("logit_bias", logit_bias), ("stop_token_ids", self.stop_token_ids)):
            invalid = [i for i in ids or () if i < 0 or i >= vocab_size]
            if invalid:
                raise validation_error(f"token_id(s) {invalid} in {name} contain out-of-vocab token ids. "
                                       f"Vocabulary size: {vocab_size}", parameter=name, value=invalid)
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids:
                raise validation_error("allowed_token_ids is not None and empty!", parameter="allowed_token_ids",
                                       value=self.allowed_token_ids)
            invalid = [i for i in self.allowed_token_ids if i < 0 or i >= vocab_size]
            if invalid:
                raise validation_error("allowed_token_ids contains out-of-vocab token id!",
                                       parameter="allowed_token_ids", value=invalid)
        if self.thinking_token_budget is not None and not reasoning:
            raise validation_error("thinking_token_budget is set but reasoning_config is not configured. Please set "
                                   "--reasoning-parser and/or --reasoning-config to use thinking_token_budget.")


def _check_logprob_field(data: dict, name: str) -> None:
    value = data.get(name)
    if value is not None and not isinstance(value, (int, float)):
        raise validation_error(f"`{name}` must be an integer.", parameter=name, value=value)


def _check_prompt_logprobs(data: dict) -> None:
    _check_logprob_field(data, "prompt_logprobs")
    if (prompt_logprobs := data.get("prompt_logprobs")) is not None:
        if data.get("stream") and (prompt_logprobs > 0 or prompt_logprobs == -1):
            raise validation_error("`prompt_logprobs` are not available when `stream=True`.",
                                   parameter="prompt_logprobs")
        if prompt_logprobs < 0 and prompt_logprobs != -1:
            raise validation_error("`prompt_logprobs` must be a positive value or -1.",
                                   parameter="prompt_logprobs", value=prompt_logprobs)


class CompletionRequest(_SamplingFields):
    prompt: (list[Annotated[int, Field(ge=0)]] | list[list[Annotated[int, Field(ge=0)]]]
             | str | list[str] | None) = None
    echo: bool | None = False
    logprobs: int | None = None
    max_tokens: int | None = 16
    n: int = 1
    suffix: str | None = None
    add_special_tokens: bool = True

    @model_validator(mode="before")
    @classmethod
    def normalize_null_max_tokens(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("max_tokens") is None:
            data = {**data, "max_tokens": 16}
        return data

    @model_validator(mode="before")
    @classmethod
    def check_logprobs(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        _check_logprob_field(data, "logprobs")
        _check_prompt_logprobs(data)
        if (logprobs := data.get("logprobs")) is not None and logprobs < 0 and logprobs != -1:
            raise validation_error("`logprobs` must be a positive value or -1.", parameter="logprobs", value=logprobs)
        return data

    @model_validator(mode="before")
    @classmethod
    def validate_prompt(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        prompt = data.get("prompt")
        if (prompt is None or prompt == "") and not data.get("prompt_embeds"):
            raise validation_error("Either prompt or prompt_embeds must be provided and non-empty.",
                                   parameter="prompt")
        if (isinstance(prompt, list) and prompt and not all(isinstance(p, int) for p in prompt)
                and len(prompt) > MAX_COMPLETION_PROMPTS):
            raise validation_error(f"prompt list length {len(prompt)} exceeds the maximum allowed count of "
                                   f"{MAX_COMPLETION_PROMPTS}. To increase this limit, set the "
                                   "VLLM_MAX_COMPLETION_PROMPTS environment variable.", parameter="prompt")
        return data


def _one_way_to_end_a_chat(cls, data: Any) -> Any:
    """A chat request (or /tokenize of one) continues its final message or opens a reply, not both (vLLM)."""
    if isinstance(data, dict) and data.get("continue_final_message") and data.get("add_generation_prompt"):
        raise validation_error("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
    return data


class ChatCompletionRequest(_SamplingFields):
    messages: list[dict[str, Any]]
    logprobs: bool | None = False
    top_logprobs: TopLogprobsParam = 0
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int | None = 1
    tools: list[ChatCompletionToolsParam] | None = None
    tool_choice: (Literal["none"] | Literal["auto"] | Literal["required"] | ChatCompletionNamedToolChoiceParam
                  | None) = "none"
    parallel_tool_calls: bool | None = True
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: ReasoningEffort | None = None
    include_reasoning: bool = True  # false: vLLM drops the reply's reasoning (server/reasoning.py)

    def requested_max_tokens(self) -> tuple[int | None, str]:
        """The output cap asked for and the field it came in: max_completion_tokens, else max_tokens."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    @model_validator(mode="before")
    @classmethod
    def check_logprobs(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        _check_logprob_field(data, "top_logprobs")
        _check_prompt_logprobs(data)
        if (top_logprobs := data.get("top_logprobs")) is not None:
            if top_logprobs < 0 and top_logprobs != -1:
                raise validation_error("`top_logprobs` must be a positive value or -1.",
                                       parameter="top_logprobs", value=top_logprobs)
            if (top_logprobs == -1 or top_logprobs > 0) and not data.get("logprobs"):
                raise validation_error("when using `top_logprobs`, `logprobs` must be set to true.",
                                       parameter="top_logprobs")
        return data

    @model_validator(mode="before")
    @classmethod
    def check_tool_usage(cls, data: Any) -> Any:
        """vLLM's check_tool_usage: tool_choice defaults to "auto" with tools, and must name one of them."""
        if not isinstance(data, dict):
            return data
        if data.get("tools") == []:
            raise validation_error("`tools` must not be an empty array. Either provide at least one tool or "
                                   "omit the field entirely.", parameter="tools")
        if "tool_choice" not in data and data.get("tools"):
            data = {**data, "tool_choice": "auto"}
        choice = data.get("tool_choice")
        if choice is None or choice == "none":
            return data
        if data.get("tools") is None:
            raise validation_error("When using `tool_choice`, `tools` must be set.", parameter="tool_choice")
        if choice not in ("auto", "required") and not isinstance(choice, dict):
            raise validation_error(f'Invalid value for `tool_choice`: {choice}! Only named tools, "none", "auto" '
                                   'or "required" are supported.', parameter="tool_choice")
        if isinstance(choice, dict):
            function = choice.get("function")
            if not isinstance(function, dict):
                raise validation_error(f"Invalid value for `function`: `{function}` in `tool_choice`! "
                                       f"{_CORRECT_TOOL_CHOICE}", parameter="tool_choice.function")
            if "name" not in function:
                raise validation_error(f"Expected field `name` in `function` in `tool_choice`! {_CORRECT_TOOL_CHOICE}",
                                       parameter="tool_choice.function.name")
            name = function["name"]
            if not isinstance(name, str) or not name:
                raise validation_error(f"Invalid `name` in `function`: `{name}` in `tool_choice`! "
                                       f"{_CORRECT_TOOL_CHOICE}", parameter="tool_choice.function.name")
            tools = data["tools"] if isinstance(data["tools"], list) else []
            if not any(isinstance(t, dict) and isinstance(t.get("function"), dict) and t["function"].get("name") == name
                       for t in tools):
                raise validation_error("The tool specified in `tool_choice` does not match any of the specified "
                                       "`tools`", parameter="tool_choice")
        return data

    def named_tool(self) -> ChatCompletionToolsParam | None:
        """The tool a named tool_choice forces."""
        if not isinstance(self.tool_choice, ChatCompletionNamedToolChoiceParam):
            return None
        return next(t for t in self.tools if t.function.name == self.tool_choice.function.name)

    check_generation_prompt = model_validator(mode="before")(classmethod(_one_way_to_end_a_chat))


class FunctionDefinition(OpenAIBaseModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    defer_loading: bool | None = None


class ChatCompletionToolsParam(OpenAIBaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition
    defer_loading: bool | None = None

    def template_dict(self) -> dict:
        """The tool as vLLM hands it to the chat template (its model_dump: unset options left out)."""
        function = {"name": self.function.name, "description": self.function.description,
                    "parameters": self.function.parameters}
        defer = self.function.defer_loading if self.function.defer_loading is not None else self.defer_loading
        function.update({k: v for k, v in (("strict", self.function.strict), ("defer_loading", defer))
                         if v is not None})
        tool = {"type": self.type, "function": function}
        if self.defer_loading is not None:
            tool["defer_loading"] = self.defer_loading
        return tool


class ChatCompletionNamedFunction(OpenAIBaseModel):
    name: str


class ChatCompletionNamedToolChoiceParam(OpenAIBaseModel):
    function: ChatCompletionNamedFunction
    type: Literal["function"] = "function"


_CORRECT_TOOL_CHOICE = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'


class TokenizeCompletionRequest(OpenAIBaseModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(OpenAIBaseModel):
    model: str | None = None
    messages: list[dict[str, Any]]
    add_generation_prompt: bool = True
    return_token_strs: bool | None = False
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ChatCompletionToolsParam] | None = None

    check_generation_prompt = model_validator(mode="before")(classmethod(_one_way_to_end_a_chat))


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0, le=INT64_MAX)]]
