"""Request schemas of the Anthropic Messages API, validated like vLLM 0.33's (`entrypoints/anthropic/protocol.py`).

Class and field names, types, defaults and validators follow vLLM's pydantic models, so a malformed body gets
vLLM's pydantic errors (answered, as vLLM's router answers them, in the OpenAI error shape: they
fail before the handler). Unknown fields are ignored (plain pydantic models, not `extra="allow"`).
Fields that only change what a real model would compute, or that the emulator does not simulate
(images, `watermarking`, `mm_payload`, `vllm_xargs`), are validated and otherwise have no effect.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from server.protocol import MAX_STOP_STRINGS

BLOCK_TYPES = ("text", "image", "tool_use", "tool_result", "tool_reference", "thinking", "redacted_thinking",
               "tool_addition", "tool_removal")
TOOL_CHANGES = ("tool_addition", "tool_removal")


class AnthropicTool(BaseModel):
    name: str
    description: str | None = None
    input_schema: dict[str, Any]
    strict: bool | None = None
    defer_loading: bool | None = None

    @field_validator("input_schema")
    @classmethod
    def validate_input_schema(cls, v: dict) -> dict:
        if "type" not in v:
            v["type"] = "object"  # vLLM adds it last: the order the chat template renders the schema in
        return v


class AnthropicToolChangeReference(BaseModel):
    type: Literal["tool_reference"]
    name: str


class AnthropicToolChangeDefinition(BaseModel):
    type: Literal["tool_definition"]
    definition: AnthropicTool


AnthropicToolChange = Annotated[AnthropicToolChangeReference | AnthropicToolChangeDefinition,
                                Field(discriminator="type")]


class AnthropicContentBlock(BaseModel):
    type: Literal[BLOCK_TYPES]
    text: str | None = None
    source: dict[str, Any] | None = None
    id: str | None = None
    tool_use_id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    content: str | list[dict[str, Any]] | None = None
    is_error: bool | None = None
    tool_name: str | None = None
    thinking: str | None = None
    signature: str | None = None
    data: str | None = None
    tool: AnthropicToolChange | None = None

    @model_validator(mode="after")
    def validate_tool_change(self) -> AnthropicContentBlock:
        if self.type not in TOOL_CHANGES:
            return self
        if self.tool is None:
            raise ValueError(f"tool is required for {self.type} blocks")
        if self.type == "tool_removal" and self.tool.type != "tool_reference":
            raise ValueError("tool_removal only accepts a tool_reference")
        return self


def _reject_tool_changes(content: str | list[AnthropicContentBlock] | None) -> None:
    if content is None or isinstance(content, str):
        return
    for block in content:
        if block.type in TOOL_CHANGES:
            raise ValueError(f'{block.type} blocks are only allowed in messages with role "system"')


class AnthropicMessage(BaseModel):
    role: Literal["user", "assistant", "system"]
    content: str | list[AnthropicContentBlock]

    @model_validator(mode="after")
    def validate_tool_change_role(self) -> AnthropicMessage:
        if self.role != "system":
            _reject_tool_changes(self.content)
        return self


class AnthropicToolChoice(BaseModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def validate_name_required_for_tool(self) -> AnthropicToolChoice:
        if self.type == "tool" and not self.name:
            raise ValueError("tool_choice.name is required when type is 'tool'")
        return self


class AnthropicJsonOutputFormat(BaseModel):
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    type: Literal["json_schema"] = "json_schema"


Effort = Literal["low", "medium", "high", "xhigh", "max"]
ThinkingDisplay = Literal["summarized", "omitted", "updates"]


class AnthropicOutputConfig(BaseModel):
    effort: Effort | None = None
    format: AnthropicJsonOutputFormat | None = None


class AnthropicThinkingConfigEnabled(BaseModel):
    type: Literal["enabled"]
    budget_tokens: int = Field(ge=1024)
    display: ThinkingDisplay | None = None


class AnthropicThinkingConfigDisabled(BaseModel):
    type: Literal["disabled"]


class AnthropicThinkingConfigAdaptive(BaseModel):
    type: Literal["adaptive"]
    display: ThinkingDisplay | None = None


Thinking = Annotated[AnthropicThinkingConfigEnabled | AnthropicThinkingConfigDisabled | AnthropicThinkingConfigAdaptive,
                     Field(discriminator="type")]


class _Conversation(BaseModel):
    """What a message request and a token count share (in vLLM's field order: model and messages first)."""
    model: str
    messages: list[AnthropicMessage]

    @field_validator("model")
    @classmethod
    def validate_model(cls, v: str) -> str:
        if not v:
            raise ValueError("Model is required")
        return v

    @field_validator("system", check_fields=False)
    @classmethod
    def validate_system(cls, v):
        _reject_tool_changes(v)
        return v


class AnthropicMessagesRequest(_Conversation):
    """A message (or its stream) to create."""
    max_tokens: int
    metadata: dict[str, Any] | None = None
    output_config: AnthropicOutputConfig | None = None
    thinking: Thinking | None = None
    stop_sequences: Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool | None = False
    system: str | list[AnthropicContentBlock] | None = None
    temperature: float | None = None
    tool_choice: AnthropicToolChoice | None = None
    tools: list[AnthropicTool] | None = None
    top_k: int | None = None
    top_p: float | None = None
    mm_payload: Literal["tensors", "none"] = "tensors"
    return_mm_kwargs: bool | None = None
    cache_salt: str | None = Field(default=None, min_length=1, max_length=1024)
    watermarking: bool | None = None
    kv_transfer_params: dict[str, Any] | None = None
    ec_transfer_params: dict[str, Any] | None = None
    vllm_xargs: dict[str, str | int | float | list[str | int | float]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("max_tokens")
    @classmethod
    def validate_max_tokens(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("max_tokens must be positive")
        return v

    @model_validator(mode="before")
    @classmethod
    def apply_return_mm_kwargs_alias(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("return_mm_kwargs") is False and "mm_payload" not in data:
            data = {**data, "mm_payload": "none"}
        return data

    @model_validator(mode="after")
    def validate_thinking_budget(self) -> AnthropicMessagesRequest:
        # a P/D prefill leg is sent with max_tokens=1 and never decodes
        if self.kv_transfer_params and self.kv_transfer_params.get("do_remote_decode"):
            return self
        if isinstance(self.thinking, AnthropicThinkingConfigEnabled) and self.thinking.budget_tokens >= self.max_tokens:
            raise ValueError("thinking.budget_tokens must be less than max_tokens")
        return self


class AnthropicCountTokensRequest(_Conversation):
    """The conversation whose prompt tokens to count."""
    output_config: AnthropicOutputConfig | None = None
    system: str | list[AnthropicContentBlock] | None = None
    thinking: Thinking | None = None
    tool_choice: AnthropicToolChoice | None = None
    tools: list[AnthropicTool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
