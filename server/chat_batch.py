"""POST /v1/chat/completions/batch: vLLM 0.33's batch-chat extension (`chat_completion/batch_serving.py`).

`messages` is a list of conversations; each becomes the chat request the batch's other fields make with
it, rendered and tokenized as /v1/chat/completions renders one (without tools: vLLM renders none here), and
run as its own engine request "chatcmpl-<id>_<i>", all arriving together. The answer is one
ChatCompletionResponse with a choice per conversation (index i), their usage summed. As in vLLM: never
streamed, no tools (`tool_choice` "none" only), no beam search, `n` 1; cancelled with its client; counted
in /load with --enable-server-load-tracking. Its conversations' SamplingParams are a chat's after the tool
parser's adjust_request (chat_params), which vLLM's renderer runs here only with a reasoning parser (tool_choice
is "none"): a parser that keeps special tokens whenever it runs (the parser engines, muse, kimi_k3) keeps them.
A model that thinks thinks here too, and vLLM's parser splits each reply into `reasoning` and `content`
(server/reasoning.py); a gpt-oss model's conversations are rendered, and its replies written and read, with
Harmony (server/harmony.py). The usage has no reasoning tokens: vLLM's batch route counts none.
"""
from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import Field, ValidationError, model_validator

from server import harmony_prompt
from server.chat import chat_params, conversation, harmony_structure, render
from server.errors import APIError, chat_without_tokenizer, json_response, validation_error
from server.harmony import check_effort, uses_harmony
from server.jobs import Choice, ChunkFormat, Job
from server.load_tracking import load_aware
from server.reasoning import ChatReasoning
from server.protocol import (INT64_MAX, INT64_MIN, ChatCompletionRequest, OpenAIBaseModel, StopParam,
                             StructuredOutputsParams, TopLogprobsParam, random_uuid)
from server.serving import SERVING, Serving

ROLE = "assistant"  # vLLM's --response-role default


class BatchChatCompletionRequest(OpenAIBaseModel):
    """vLLM's BatchChatCompletionRequest: a chat request's sampling fields over several conversations."""
    messages: Annotated[list[Annotated[list[dict[str, Any]], Field(min_length=1)]], Field(min_length=1)]
    model: str | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = False
    top_logprobs: TopLogprobsParam = 0
    logprob_token_ids: list[int] | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int | None = 1
    presence_penalty: float | None = None
    response_format: Any | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: StopParam = Field(default_factory=list)
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    tool_choice: Literal["none"] | None = "none"
    include_reasoning: bool = True
    best_of: int | None = None
    use_beam_search: bool = False
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    watermarking: bool | None = None
    length_penalty: float | None = 1.0
    early_stopping: bool = False
    structured_outputs: StructuredOutputsParams | None = None
    request_id: str | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    media_io_kwargs: dict[str, dict[str, Any]] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    priority: int = Field(default=0, ge=INT64_MIN, le=INT64_MAX)
    cache_salt: str | None = None
    include_stop_str_in_output: bool = False
    guided_decoding_backend: str | None = None
    echo: bool = False
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool = False

    @model_validator(mode="before")
    @classmethod
    def check_batch_mode(cls, data: Any) -> Any:
        """vLLM's refusals of what one batch cannot do."""
        if not isinstance(data, dict):
            return data
        if data.get("use_beam_search"):
            raise validation_error("Batch chat completions do not support beam search. Please set "
                                   "`use_beam_search` to False.", parameter="use_beam_search")
        if data.get("logprob_token_ids") and not data.get("logprobs"):
            raise validation_error("when using `logprob_token_ids`, `logprobs` must be set to true.",
                                   parameter="logprob_token_ids")
        kv_transfer_params = data.get("kv_transfer_params")
        if isinstance(kv_transfer_params, dict) and kv_transfer_params.get("prompt_token_ids") is not None:
            raise validation_error("Batch chat completions do not support `kv_transfer_params['prompt_token_ids']`: "
                                   "one pre-tokenized prompt cannot serve several conversations.",
                                   parameter="kv_transfer_params.prompt_token_ids")
        n = data.get("n", 1)
        if n is not None and n != 1:
            raise validation_error("Batch chat completions do not support `n > 1`. Please set `n` to 1.",
                                   parameter="n", value=n)
        return data

    def to_chat_request(self, messages: list[dict[str, Any]]) -> ChatCompletionRequest:
        """vLLM's to_chat_completion_request: the chat request of one conversation (its errors a 400)."""
        data = self.model_dump(exclude={"messages"}, exclude_none=True)
        data["messages"] = messages
        try:
            return ChatCompletionRequest.model_validate(data)
        except ValidationError as exc:
            raise APIError(str(exc)) from None


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions/batch", create_batch_chat_completion)


@load_aware
async def create_batch_chat_completion(request: web.Request) -> web.Response:
    # one chat completion with a choice per conversation
    serving = request.app[SERVING]
    data, arrival = await serving.read_json(request, BatchChatCompletionRequest.model_fields)
    req = serving.parse(BatchChatCompletionRequest, data)
    if not serving.has_tokenizer:
        raise chat_without_tokenizer()
    serving.check_model(req.model)
    serving.check_admission(request, 1, req.model)
    singles = [req.to_chat_request(messages) for messages in req.messages]
    harmony = uses_harmony(serving, req.model)
    prompts, max_tokens, echoes, texts = [], [], [], []
    for single in singles:
        requested, param = single.requested_max_tokens()
        serving.check_max_tokens(requested, param, req.model)
        messages = conversation(single.messages)
        if harmony:  # vLLM renders a gpt-oss conversation with Harmony (no tools here), as its chat route does
            check_effort(single.reasoning_effort, chat=True)
            prompt, text = harmony_prompt.chat_prompt(serving, single, None)
            prompt = serving.check_prompt_length(prompt, req.model)
        else:
            text = render(serving, single, messages, None)
            prompt = serving.encode_text(text, single.add_special_tokens, req.model,
                                         serving.truncation_length(single.truncate_prompt_tokens, req.model),
                                         single.truncation_side)
        limit = serving.max_tokens_for(len(prompt), requested, req.model)
        single.verify_sampling(1, limit, serving.options.max_logprobs, single.top_logprobs if single.logprobs else None,
                               serving.vocab_size_for(req.model), serving.options.reasoning,
                               defaults=serving.sampling_defaults(req.model).params)
        role = ROLE if req.add_generation_prompt else str(single.messages[-1].get("role"))
        # (a gpt-oss conversation is Harmony messages, with no "content" key: vLLM's batch route echoes nothing)
        echoes.append(messages[-1]["content"] if req.echo and not harmony and messages and messages[-1]["role"] == role
                      else "")
        prompts.append(prompt)
        texts.append(text)
        max_tokens.append(limit)
    first = singles[0]
    first.stream = False  # (a batch is never streamed, even if its body says `stream`)
    request_id = f"chatcmpl-{serving.base_request_id(request, req.request_id or random_uuid())}"
    sub_ids = [f"{request_id}_{i}" for i in range(len(prompts))]
    # a model that thinks thinks here too (a structured reply after its reasoning), and vLLM's parser splits the
    # replies; a gpt-oss model writes Harmony (server/harmony.py)
    reasoning = ChatReasoning(serving, first)
    structure = harmony_structure(serving, first, None) if harmony else \
        reasoning.structured(serving.structure_for(first, req.model))
    job, _ = await serving.generate(request, first, _NoStream(), prompts, sub_ids, 1, max_tokens, arrival,
                                    serving.pinned_engine(request), reply=not req.echo, model=req.model,
                                    structure=structure, priority_header=False,
                                    params=lambda p: chat_params(serving, singles[p], max_tokens[p], None),
                                    logged_as=("batch", request_id), prompt_texts=texts,
                                    thinking=reasoning.thinking)
    return json_response(_response(serving, req, job, request_id, echoes, reasoning))


class _NoStream(ChunkFormat):
    """A batch is answered whole: no chunk is ever written."""

    def first_output(self, job: Job) -> bytes:
        return b""

    def tokens(self, job: Job, choice: Choice, end: int, last: bool) -> bytes:
        return b""

    def usage(self, job: Job) -> bytes:
        return b""


def _response(serving: Serving, req: BatchChatCompletionRequest, job: Job, request_id: str,
              echoes: list[str], reasoning: ChatReasoning) -> dict:
    """vLLM's ChatCompletionResponse of a batch: choice i answers conversation i (every key, nulls included)."""
    logprobs = serving.logprob_source(req.model, req.return_tokens_as_token_ids) if req.logprobs else None
    choices = []
    for choice in sorted(job.choices, key=lambda c: c.prompt_index):
        i, n = choice.prompt_index, choice.request.num_output_tokens
        ids, pieces = choice.plan.token_ids[:n].tolist(), choice.plan.pieces[:n]
        role = ROLE if req.add_generation_prompt else str(req.messages[i][-1].get("role"))
        thought, content = _split(reasoning, choice, ids, pieces)
        if req.echo:  # (vLLM prepends the echo to whatever content the parser left, none included)
            content = echoes[i] + (content or "")
        message = {"role": role, "content": content, "refusal": None, "annotations": None,
                   "audio": None, "function_call": None, "reasoning": thought}
        choices.append({"index": i, "message": message,
                        "logprobs": logprobs.chat(ids, pieces, len(job.prompts[i]), req.top_logprobs)
                        if logprobs else None,
                        "finish_reason": choice.finish_reason or "stop", "stop_reason": choice.stop_reason,
                        "token_ids": ids if req.return_token_ids else None, "routed_experts": None,
                        "weight_versions": None})
    prompt_tokens, completion_tokens = job.num_prompt_tokens, job.num_output_tokens
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()),
            "model": serving.response_model(req.model), "choices": choices, "service_tier": None,
            "system_fingerprint": serving.options.system_fingerprint,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
                      "completion_tokens": completion_tokens, "prompt_tokens_details": None,
                      "completion_tokens_details": None},
            "prompt_logprobs": None, "prompt_token_ids": None, "prompt_text": None, "kv_transfer_params": None,
            "ec_transfer_params": None, "metrics": None}


def _split(reasoning: ChatReasoning, choice: Choice, ids: list[int],
           pieces: list[str]) -> tuple[str | None, str | None]:
    """A reply's (reasoning, content) as vLLM's batch route reads it with the server's parser (parser.parse, no
    tool calls: a batch has no tools): a gpt-oss reply with its HarmonyParser, another with its reasoning parser;
    without a parser, all content (a gpt-oss reply's raw text)."""
    text = "".join(pieces)
    harmony = reasoning.harmony
    if harmony is None:
        return reasoning.fields(choice.plan, text)
    if not harmony.parsing:
        return None, text
    parsed = harmony.parse(ids, pieces)
    return (parsed.reasoning if reasoning.include_reasoning else None), parsed.content
