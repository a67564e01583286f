"""The request of the OpenAI Responses API (POST /v1/responses), validated like vLLM 0.33's.

Field names, types, defaults and the request-level checks follow vLLM's ResponsesRequest
(`entrypoints/openai/responses/protocol.py`), with vLLM's messages. vLLM types `input`, `tools`,
`tool_choice`, `text` and `reasoning` with the OpenAI SDK's models; here they are plain JSON checked
for what the server reads (`responses_input.py` converts the input items), so a malformed item gets
a shorter pydantic message than vLLM's union of every item type. The fields a real sampler reads
are validated through a CompletionRequest (`engine_view`), as vLLM builds SamplingParams from them.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from server.errors import validation_error
from server.protocol import (INT64_MAX, INT64_MIN, CompletionRequest, OpenAIBaseModel, StopParam,
                             StructuredOutputsParams, TopLogprobsParam, random_uuid)
from server.structured import Constraint, constraint_of

LOGPROBS_INCLUDE = "message.output_text.logprobs"
IncludeOption = Literal["code_interpreter_call.outputs", "computer_call_output.output.image_url",
                        "file_search_call.results", "message.input_image.image_url", LOGPROBS_INCLUDE,
                        "reasoning.encrypted_content"]
ServiceTier = Literal["auto", "default", "flex", "scale", "priority"]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
# the `type`s of the OpenAI SDK's Tool union (openai 3.63, as vLLM 0.33 validates them)
TOOL_TYPES = frozenset({
    "function", "file_search", "computer", "computer_use_preview", "web_search", "web_search_2025_08_26",
    "web_search_preview", "web_search_preview_2025_03_11", "mcp", "code_interpreter", "programmatic_tool_calling",
    "image_generation", "local_shell", "shell", "custom", "namespace", "tool_search", "apply_patch"})
_CACHE_SALT_FORBIDDEN = frozenset("@/\\\x00")


def response_id() -> str:
    """vLLM's default request_id: "resp_" and random_uuid()'s 16 hex digits."""
    return f"resp_{random_uuid()}"


class Reasoning(OpenAIBaseModel):
    context: Any = None
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None
    mode: Any = None
    summary: Literal["auto", "concise", "detailed"] | None = None

    def echo(self) -> dict:
        return {"context": self.context, "effort": self.effort, "generate_summary": self.generate_summary,
                "mode": self.mode, "summary": self.summary}


class TextFormatText(OpenAIBaseModel):
    type: Literal["text"]


class TextFormatJSONObject(OpenAIBaseModel):
    type: Literal["json_object"]


class TextFormatJSONSchema(OpenAIBaseModel):
    name: str
    json_schema: dict[str, Any] = Field(alias="schema")
    type: Literal["json_schema"]
    description: str | None = None
    strict: bool | None = None


class TextConfig(OpenAIBaseModel):
    format: Annotated[TextFormatText | TextFormatJSONObject | TextFormatJSONSchema,
                      Field(discriminator="type")] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None

    def echo(self) -> dict:
        fmt = self.format
        if isinstance(fmt, TextFormatJSONSchema):
            described = {"name": fmt.name, "schema": fmt.json_schema, "type": fmt.type,
                         "description": fmt.description, "strict": fmt.strict}
        else:
            described = None if fmt is None else {"type": fmt.type}
        return {"format": described, "verbosity": self.verbosity}


class PromptCacheOptions(OpenAIBaseModel):
    mode: Literal["implicit", "explicit"] = "implicit"
    ttl: Literal["30m"] = "30m"
    comparison_response_id: str | None = None
    prewarm: bool | None = None

    def echo(self) -> dict:
        """As the response has them (prewarm is the request's alone)."""
        return {"mode": self.mode, "ttl": self.ttl, "comparison_response_id": self.comparison_response_id}


class ResponsesRequest(OpenAIBaseModel):
    background: bool | None = False
    include: list[IncludeOption] | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    max_tool_calls: int | None = None
    metadata: dict[str, str] | None = None
    model: str | None = None
    logit_bias: dict[str, float] | None = None
    parallel_tool_calls: bool | None = True
    previous_response_id: str | None = None
    prompt: dict[str, Any] | None = None
    reasoning: Reasoning | None = None
    include_reasoning: bool = True
    service_tier: ServiceTier = "auto"
    store: bool | None = True
    stream: bool | None = False
    temperature: float | None = None
    text: TextConfig | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    top_logprobs: TopLogprobsParam = 0
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    truncation: Literal["auto", "disabled"] | None = "disabled"
    user: str | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    prompt_cache_key: str | None = None
    prompt_cache_options: PromptCacheOptions | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    safety_identifier: str | None = None
    watermarking: bool | None = None
    request_id: str = Field(default_factory=response_id)
    session_id: str | None = None
    media_io_kwargs: dict[str, dict[str, Any]] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    priority: Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)] = 0
    mm_payload: Literal["tensors", "none"] = "tensors"
    return_mm_kwargs: bool | None = None
    cache_salt: str | None = Field(default=None, min_length=1, max_length=1024)
    enable_response_messages: bool = False
    previous_input_messages: list[dict[str, Any]] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    repetition_penalty: float | None = None
    seed: Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)] | None = None
    stop: StopParam = []
    stop_token_ids: list[int] | None = []
    ignore_eos: bool = False
    vllm_xargs: dict[str, str | int | float | list[str | int | float]] | None = None
    kv_transfer_params: dict[str, Any] | None = None
    ec_transfer_params: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("prompt_cache_retention", mode="before")
    @classmethod
    def older_retention_spelling(cls, value: Any) -> Any:
        return "in_memory" if value == "in-memory" else value

    @model_validator(mode="before")
    @classmethod
    def check_request(cls, data: Any) -> Any:
        """vLLM's request-level validators: cache_salt, background needs store, no prompt templates,
        custom tools take free text only, tool_choice against the tools."""
        if not isinstance(data, dict):
            return data
        salt = data.get("cache_salt")
        if salt is not None and (not isinstance(salt, str) or not salt):
            raise validation_error("Parameter 'cache_salt' must be a non-empty string if provided.",
                                   parameter="cache_salt")
        if isinstance(salt, str) and (len(salt) > 128 or _CACHE_SALT_FORBIDDEN & set(salt)):
            raise validation_error("Parameter 'cache_salt' must be at most 128 characters and must not contain "
                                   "'@', '/', '\\\\', or NUL.", parameter="cache_salt")
        if data.get("background") and not data.get("store", True):
            raise validation_error("background can only be used when `store` is true", parameter="background")
        if data.get("prompt") is not None:
            raise validation_error("prompt template is not supported", parameter="prompt")
        tools = data.get("tools")
        for tool in tools if isinstance(tools, list) else ():
            if (isinstance(tool, dict) and tool.get("type") == "custom" and isinstance(tool.get("format"), dict)
                    and tool["format"].get("type") == "grammar"):
                raise validation_error("Custom tools with a grammar format are not supported; only free-form text "
                                       "custom tools are accepted.", parameter="tools")
        return _check_tool_choice(data)

    @field_validator("tools")
    @classmethod
    def known_tool_types(cls, tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for tool in tools:
            if tool.get("type") not in TOOL_TYPES:
                raise ValueError(f"Input tag {tool.get('type')!r} found using 'type' does not match any of the "
                                 f"expected tags: {', '.join(repr(t) for t in sorted(TOOL_TYPES))}")
            if tool["type"] == "function" and not isinstance(tool.get("name"), str):
                raise ValueError("a function tool needs a string `name`")
        return tools

    # -- what the renderer reads (server/chat.py's render) ----------------------------------------
    @property
    def continue_final_message(self) -> bool:
        """vLLM's should_continue_final_message: the last input item is a message or reasoning item
        still in progress (or cut short), which the model continues."""
        if isinstance(self.input, str) or not self.input:
            return False
        last = self.input[-1]
        return last.get("type", "message") in ("message", "reasoning") and \
            last.get("status") in ("in_progress", "incomplete")

    @property
    def add_generation_prompt(self) -> bool:
        return not self.continue_final_message

    @property
    def reasoning_effort(self) -> str | None:
        return None if self.reasoning is None else self.reasoning.effort

    # -- sampling ---------------------------------------------------------------------------
    def include_logprobs(self) -> bool:
        return self.include is not None and LOGPROBS_INCLUDE in self.include

    def structured_constraint(self) -> Constraint | None:
        """The constraint of extract_structured_outputs (checked as vLLM checks it)."""
        return constraint_of(self.extract_structured_outputs(), None)

    def extract_structured_outputs(self) -> StructuredOutputsParams | None:
        """vLLM's extract_structured_outputs: `text.format` (json_object, json_schema), or else
        `structured_outputs`; not both."""
        fmt = self.text.format if self.text is not None else None
        if fmt is None:
            return self.structured_outputs
        if self.structured_outputs is not None:
            raise validation_error("Cannot specify both structured_outputs and text.format",
                                   parameter="structured_outputs")
        if isinstance(fmt, TextFormatJSONObject):
            return StructuredOutputsParams(json_object=True)
        if isinstance(fmt, TextFormatJSONSchema):
            return StructuredOutputsParams.model_validate({"json": fmt.json_schema})
        return None

    def forces_tool_call(self) -> bool:
        """tool_choice "required" or a named function or custom tool: a call a tool parser forces."""
        choice = self.tool_choice
        return choice == "required" or (isinstance(choice, dict) and choice.get("type") in ("function", "custom"))

    def format_as_tool_calls(self, schema: dict) -> None:
        """What vLLM's tool parser does to a forced call's request (adjust_request): `text` becomes the
        calls' JSON schema, strict, named "tool_calling_response" (and the response echoes it so)."""
        self.text = TextConfig.model_validate({"format": {"type": "json_schema", "name": "tool_calling_response",
                                                          "schema": schema, "strict": True}})

    def engine_view(self, max_tokens: int) -> CompletionRequest:
        """The request as SamplingParams sees it (vLLM's to_sampling_params), for the sampling checks
        and the engine: the fields a Responses request shares with a completion's."""
        session = self.session_id
        if not session and self.vllm_xargs and isinstance(self.vllm_xargs.get("session_id"), str):
            session = self.vllm_xargs["session_id"]
        return CompletionRequest.model_construct(
            model=self.model, prompt="", max_tokens=max_tokens, n=1, stream=bool(self.stream),
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, logit_bias=self.logit_bias, seed=self.seed,
            stop=self.stop or [], stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output, skip_special_tokens=self.skip_special_tokens,
            priority=self.priority, user=session, session_id=self.session_id, vllm_xargs=self.vllm_xargs,
            kv_transfer_params=self.kv_transfer_params,
            stream_interval=None, min_tokens=0, bad_words=[], allowed_token_ids=None, thinking_token_budget=None,
            prompt_logprobs=None, structured_outputs=None, response_format=None)

    def echoed_sampling(self, defaults: dict | None = None) -> dict:
        """temperature, top_p and the penalties as vLLM's SamplingParams holds them (the response
        echoes those): one the request leaves out is the server's default (`defaults`, its generation
        config's: Qwen3's temperature 0.6 and top_p 0.95), else the OpenAI one; a temperature under 0.01
        raised to 0.01, greedy sampling with top_p 1."""
        defaults = defaults or {}

        def chosen(name: str, neutral: float) -> float:
            value = getattr(self, name)
            return float(defaults.get(name, neutral) if value is None else value)

        temperature = chosen("temperature", 1.0)
        if 0 < temperature < 0.01:
            temperature = 0.01
        top_p = 1.0 if temperature < 1e-5 else chosen("top_p", 1.0)
        return {"temperature": temperature, "top_p": top_p,
                "presence_penalty": chosen("presence_penalty", 0.0),
                "frequency_penalty": chosen("frequency_penalty", 0.0)}

    def echoed_tools(self) -> list[dict]:
        """The tools as the response lists them: function, custom and namespace tools with every field of
        the SDK's models (nulls included); built-in tools as sent."""
        return [_echoed_tool(t) for t in self.tools]

    def echoed_tool_choice(self) -> str | dict:
        choice = self.tool_choice
        if isinstance(choice, dict) and choice.get("type") in ("function", "custom"):
            return {"name": choice.get("name"), "type": choice["type"]}
        return choice


def _echoed_tool(tool: dict) -> dict:
    """A function tool as the SDK's FunctionTool, a custom tool as its CustomTool, a namespace as its
    NamespaceTool (whose functions are its ToolFunction, another key order)."""
    get = tool.get
    if get("type") == "function":
        return {"name": tool["name"], "parameters": get("parameters"), "strict": get("strict"), "type": "function",
                "allowed_callers": get("allowed_callers"), "async": get("async"),
                "defer_loading": get("defer_loading"), "description": get("description"),
                "output_schema": get("output_schema")}
    if get("type") == "custom":
        return {"name": get("name"), "type": "custom", "allowed_callers": get("allowed_callers"),
                "async": get("async"), "defer_loading": get("defer_loading"), "description": get("description"),
                "format": get("format")}
    if get("type") == "namespace" and isinstance(get("tools"), list):
        inner = [{"name": t.get("name"), "type": "function", "allowed_callers": t.get("allowed_callers"),
                  "async": t.get("async"), "defer_loading": t.get("defer_loading"),
                  "description": t.get("description"), "output_schema": t.get("output_schema"),
                  "parameters": t.get("parameters"), "strict": t.get("strict")}
                 if t.get("type") == "function" else _echoed_tool(t) for t in tool["tools"] if isinstance(t, dict)]
        return {"description": get("description"), "name": get("name"), "tools": inner, "type": "namespace"}
    return tool


def _check_tool_choice(data: dict) -> dict:
    """vLLM's check_tool_usage: without tools "auto" becomes "none" and a forced choice is an error; a
    named choice must name one of the tools (a namespace's by "<namespace>__<name>" or its own name)."""
    tools = data.get("tools")
    choice = data.get("tool_choice", "auto")
    named = isinstance(choice, dict) and choice.get("type") in ("function", "custom")
    if not tools:
        if choice in ("auto", "none"):
            return {**data, "tool_choice": "none"}
        if choice == "required":
            raise validation_error("Tool choice 'required' must be specified with 'tools' parameter.",
                                   parameter="tool_choice")
        if named:
            raise validation_error("Tool choice 'function' not found in 'tools' parameter.", parameter="tool_choice")
        return data
    if not named or not isinstance(tools, list):
        return data
    name = choice.get("name")
    if not name:
        raise validation_error("Tool choice 'function' not found in 'tools' parameter.", parameter="tool_choice")
    exact, local = set(), {}
    for tool in tools:
        if not isinstance(tool, dict):
            continue
        if tool.get("type") == "namespace":
            namespace, inner = tool.get("name"), tool.get("tools")
            if not isinstance(inner, list) or not isinstance(namespace, str):
                return data
            for t in inner:
                if isinstance(t, dict) and isinstance(t.get("name"), str):
                    flat = f"{namespace}__{t['name']}"
                    exact.add(flat)
                    local.setdefault(t["name"], []).append(flat)
        elif isinstance(tool.get("name"), str):
            exact.add(tool["name"])
    if name in exact:
        return data
    candidates = local.get(name, [])
    if len(candidates) == 1:
        return {**data, "tool_choice": {**choice, "name": candidates[0]}}
    if candidates:
        raise validation_error(f"Tool choice '{name}' is ambiguous: it is defined in more than one namespace "
                               f"({', '.join(candidates)}). Select it by its full '<namespace>__<name>' name.",
                               parameter="tool_choice")
    raise validation_error("Tool choice 'function' not found in 'tools' parameter.", parameter="tool_choice")
