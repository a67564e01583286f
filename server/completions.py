"""POST /v1/completions, streaming and not, shaped like vLLM 0.33's (`completion/serving.py`).

Stream chunks carry exactly the keys vLLM's `model_dump_json(exclude_unset=True)`
writes; the final usage chunk (with `stream_options.include_usage`) is written with
`exclude_none`, and without it the terminal chunk carries `system_fingerprint`.

Without a tokenizer (--skip-tokenizer-init, --tokens-only) only token-id prompts run; their outputs have
no text, and logprobs need return_tokens_as_token_ids: vLLM fails a request that asks for named tokens
once it has run (a 400), or, streamed, at its first chunk (the error event; its requests are aborted).
"""
from __future__ import annotations

import asyncio
import functools
import json
import time

from aiohttp import web

from server.errors import APIError, token_names_unavailable, validation_error
from server.jobs import Choice, ChunkFormat, Job
from server.logprobs import LogprobSource
from server.protocol import CompletionRequest
from server.serving import Serving, json_body, per_request_metrics, truncated
from server.sse import ChunkStart, compact_json


@functools.lru_cache(maxsize=4096)
def json_string(text: str) -> bytes:
    """A JSON string literal, as pydantic writes it (UTF-8, not \\u escapes). Most texts a stream
    sends are words with nothing to escape (quoted as they are) or the same few words (cached)."""
    if text.isprintable() and '"' not in text and "\\" not in text:
        return b'"%b"' % text.encode()
    return json.dumps(text, ensure_ascii=False).encode()


def _usage(prompt: int, completion: int) -> str:
    return f'{{"prompt_tokens":{prompt},"total_tokens":{prompt + completion},"completion_tokens":{completion}}}'


class CompletionFormat(ChunkStart, ChunkFormat):
    """The stream chunks of one completion request."""

    object_kind = "text_completion"

    def __init__(self, serving: Serving, req: CompletionRequest, response_id: str, created: int,
                 prompt_texts: list[str], logprobs: LogprobSource | None) -> None:
        self.serving = serving
        self.req = req
        self.response_id = response_id
        self.created = created
        self.prompt_texts = prompt_texts
        self.logprobs = logprobs
        self.text_offsets: dict[int, int] = {}
        # vLLM names logprob tokens with the tokenizer unless they are named by their ids
        as_ids = req.return_tokens_as_token_ids
        self.unnameable = logprobs is not None and not serving.has_tokenizer and not (
            as_ids if as_ids is not None else serving.options.return_tokens_as_token_ids)
        self.include_usage, self.continuous_usage = req.include_usage(serving.options.enable_force_include_usage)
        # Most chunks are "one more token, nothing else": built from bytes prepared once.
        self.plain = logprobs is None and not req.return_token_ids and not self.continuous_usage
        self.plain_tail = (b',"logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,'
                           b'"token_ids":null,"weight_versions":null}],"kv_transfer_params":null}\n\n')
        self.plain_heads: dict[int, bytes] = {}

    def first_output(self, job: Job) -> bytes:
        return b""

    def tokens(self, job: Job, choice: Choice, end: int, last: bool) -> bytes:
        req, plan, start = self.req, choice.plan, choice.num_sent
        if self.plain and not last and (start or not req.echo):
            head = self.plain_heads.get(choice.index)
            if head is None:
                head = self.plain_heads[choice.index] = f'{self.head}{choice.index},"text":'.encode()
            text = plan.pieces[start] if end == start + 1 else "".join(plan.pieces[start:end])
            return head + json_string(text) + self.plain_tail
        if self.unnameable:  # vLLM's stream ends with its error event at its first chunk, and its requests go
            if job.failed:
                return b""
            job.failed = True
            # aborted once this delivery is written (not from inside it), as vLLM's generators are closed
            asyncio.get_running_loop().call_soon(self.serving.abort, job,
                                                 [f"{self.response_id}-{p}" for p in range(len(job.prompts))])
            return self.failure(token_names_unavailable(req.echo and start == 0))
        text = "".join(plan.pieces[start:end])
        ids = plan.token_ids[start:end].tolist()
        prompt_ids = "null"
        logprobs = "null"
        if self.logprobs is not None:
            logprobs = compact_json(self._logprobs(job, choice, start, end))
        if req.echo and start == 0:
            prompt = job.prompts[choice.prompt_index]
            # vLLM echoes no prompt text where it returns the prompt's token ids
            text = ("" if req.return_token_ids else self.prompt_texts[choice.prompt_index]) + \
                (text if req.max_tokens else "")
            ids = ids if req.max_tokens else []
            prompt_ids = compact_json(prompt)
        elif start == 0 and req.return_token_ids:
            prompt_ids = compact_json(job.prompts[choice.prompt_index])
        finish = compact_json(choice.finish_reason) if last else "null"
        stop = compact_json(choice.stop_reason) if last else "null"
        token_ids = compact_json(ids) if req.return_token_ids else "null"
        tail = ""
        if self.continuous_usage:
            tail += ',"usage":' + _usage(len(job.prompts[choice.prompt_index]), end)
        if last and not self.include_usage and self.serving.options.system_fingerprint is not None:
            tail += ',"system_fingerprint":' + compact_json(self.serving.options.system_fingerprint)
        kv_params = compact_json(choice.kv_transfer_params) if last and choice.kv_transfer_params else "null"
        return (f'{self.head}{choice.index},"text":{compact_json(text)},"logprobs":{logprobs},"finish_reason":{finish},'
                f'"stop_reason":{stop},"prompt_token_ids":{prompt_ids},"token_ids":{token_ids},'
                f'"weight_versions":null}}]{tail},"kv_transfer_params":{kv_params}}}\n\n').encode()

    def usage(self, job: Job) -> bytes:
        if not self.include_usage:
            return b""
        usage = json.loads(_usage(job.num_prompt_tokens, job.num_output_tokens))
        if self.serving.options.enable_prompt_tokens_details and job.num_cached_tokens is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": job.num_cached_tokens}
        tail = ""
        if self.serving.options.system_fingerprint is not None:
            tail = ',"system_fingerprint":' + compact_json(self.serving.options.system_fingerprint)
        if self.serving.options.enable_per_request_metrics and len(job.choices) == 1:
            metrics = {k: v for k, v in per_request_metrics(job.choices[0].request).items() if v is not None}
            tail += ',"metrics":' + compact_json(metrics)
        return f'{self.base},"choices":[],"usage":{compact_json(usage)}{tail}}}\n\n'.encode()

    def _logprobs(self, job: Job, choice: Choice, start: int, end: int) -> dict:
        req, plan = self.req, choice.plan
        k = req.logprobs
        offset = self.text_offsets.get(choice.index, 0)
        tokens_ids = plan.token_ids[start:end].tolist()
        texts = plan.pieces[start:end]
        if req.echo and start == 0:
            prompt = job.prompts[choice.prompt_index]
            prompt_part = self.logprobs.completion(prompt, [self.logprobs.decode(i) for i in prompt], 0, k, offset,
                                                   prompt_first=True)
            if not req.max_tokens:
                return prompt_part
            offset = prompt_part["text_offset"][-1] + len(prompt_part["tokens"][-1])
            out = self.logprobs.completion(tokens_ids, texts, len(prompt), k, offset)
            merged = {key: prompt_part[key] + out[key] for key in out}
            self.text_offsets[choice.index] = offset + sum(len(t) for t in texts)
            return merged
        out = self.logprobs.completion(tokens_ids, texts, len(job.prompts[choice.prompt_index]) + start, k, offset)
        self.text_offsets[choice.index] = offset + sum(len(t) for t in texts)
        return out


def full_response(serving: Serving, req: CompletionRequest, fmt: CompletionFormat, job: Job, response_id: str,
                  created: int) -> dict:
    """The non-streaming body: every key of vLLM's CompletionResponse, nulls included."""
    if fmt.unnameable:
        raise token_names_unavailable(req.echo)
    choices = []
    for choice in job.choices:
        request = choice.request
        n = request.num_output_tokens
        text = "".join(choice.plan.pieces[:n])
        ids = choice.plan.token_ids[:n].tolist()
        prompt = job.prompts[choice.prompt_index]
        if req.echo:  # the prompt's text (none where its token ids are returned), and only the output's ids
            text = ("" if req.return_token_ids else fmt.prompt_texts[choice.prompt_index]) + \
                (text if req.max_tokens else "")
            ids = ids if req.max_tokens else []
        logprobs = fmt._logprobs(job, choice, 0, n) if fmt.logprobs is not None else None
        choices.append({
            "index": len(choices), "text": text, "logprobs": logprobs,
            "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason,
            "token_ids": ids if req.return_token_ids else None,
            "prompt_logprobs": _prompt_logprobs(serving, fmt, prompt),
            "prompt_token_ids": prompt if req.return_token_ids else None,
            "routed_experts": None, "weight_versions": None})
    prompt_tokens, completion_tokens = job.num_prompt_tokens, job.num_output_tokens
    details = ({"cached_tokens": job.num_cached_tokens, "created_cache_tokens": None, "multimodal_tokens": None}
               if serving.options.enable_prompt_tokens_details and job.num_cached_tokens is not None else None)
    return {
        "id": response_id, "object": "text_completion", "created": created,
        "model": serving.response_model(req.model),
        "choices": choices, "service_tier": None, "system_fingerprint": serving.options.system_fingerprint,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
                  "completion_tokens": completion_tokens, "prompt_tokens_details": details,
                  "completion_tokens_details": None},
        "kv_transfer_params": job.kv_transfer_params, "ec_transfer_params": None,
        "metrics": (per_request_metrics(job.choices[0].request)
                    if serving.options.enable_per_request_metrics and len(job.choices) == 1 else None)}


def _prompt_logprobs(serving: Serving, fmt: CompletionFormat, prompt: list[int]) -> list | None:
    """vLLM's prompt_logprobs (with echo, `logprobs` asks for them too): per prompt token
    {id: {logprob, rank, decoded_token}}, None for the first."""
    req = fmt.req
    k = req.logprobs if req.prompt_logprobs is None and req.echo else req.prompt_logprobs
    if k is None:
        return None
    entries = (fmt.logprobs or serving.logprob_source(req.model)).prompt(prompt, k)
    if not serving.has_tokenizer:  # vLLM's engine decodes no token without a tokenizer
        for entry in entries[1:]:
            for candidate in entry.values():
                candidate["decoded_token"] = None
    return entries


async def create_completion(serving: Serving, request: web.Request) -> web.StreamResponse:
    data, arrival = await serving.read_json(request, CompletionRequest.model_fields)
    req = serving.parse(CompletionRequest, data)
    with serving.kv_transfer_rejection_cleanup(request, req):  # (a decode pod frees a prefill it turns away)
        return await answer_completion(serving, request, req, arrival)


async def answer_completion(serving: Serving, request: web.Request, req: CompletionRequest,
                            arrival: float) -> web.StreamResponse:
    """Run a parsed completion request and answer it, as vLLM's _create_completion."""
    if req.stream and req.use_beam_search:
        raise validation_error("Streaming is not currently supported with beam search")
    serving.check_model(req.model)
    serving.check_admission(request, req.n, req.model)
    serving.check_max_tokens(req.max_tokens, "max_tokens", req.model)
    serving.check_truncation(req.truncate_prompt_tokens, req.model)
    check_suffix(req)
    prompts, prompt_texts = render_prompts(serving, req)
    max_tokens = []
    for prompt in prompts:
        limit = serving.max_tokens_for(len(prompt), req.max_tokens, req.model)
        echo_only = req.echo and req.max_tokens == 0
        req.verify_sampling(req.n, 1 if echo_only else limit, serving.options.max_logprobs, req.logprobs,
                            serving.vocab_size_for(req.model), serving.options.reasoning,
                            defaults=serving.sampling_defaults(req.model).params)
        max_tokens.append(1 if echo_only else limit)
    structure = serving.structure_for(req, req.model)
    pinned = serving.pinned_engine(request)
    response_id = f"cmpl-{serving.base_request_id(request, req.request_id)}"
    created = int(time.time())
    logprobs = None
    if req.logprobs is not None:
        logprobs = serving.logprob_source(req.model, req.return_tokens_as_token_ids)
    fmt = CompletionFormat(serving, req, response_id, created, prompt_texts, logprobs)
    request_ids = [f"{response_id}-{p}" for p in range(len(prompts))]
    job, streamed = await serving.generate(request, req, fmt, prompts, request_ids, req.n, max_tokens, arrival,
                                           pinned, model=req.model, structure=structure, prompt_texts=prompt_texts)
    if streamed is not None:
        return streamed
    return json_body(full_response(serving, req, fmt, job, response_id, created))


def check_suffix(req: CompletionRequest) -> None:
    """vLLM's answers to `suffix`: the models served here have no FIM completion rendering."""
    if req.suffix is None:
        return
    if req.echo:
        raise APIError("Echo is unsupported with suffix.", param="suffix")
    if req.truncate_prompt_tokens is not None:
        raise APIError("suffix is not supported with truncate_prompt_tokens", param="suffix")
    prompt = req.prompt
    if isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt)):
        raise APIError("suffix is only supported for models with FIM completion rendering", param="suffix")
    raise APIError("suffix requires text prompt input for FIM completion rendering", param="suffix")


def ids_truncation_side(serving: Serving, req: CompletionRequest) -> str | None:
    """The side truncate_prompt_tokens cuts token ids from: the request's, else the tokenizer's (left);
    without a tokenizer vLLM has no default side and keeps the first tokens."""
    return req.truncation_side or (None if serving.has_tokenizer else "right")


def render_prompts(serving: Serving, req: CompletionRequest) -> tuple[list[list[int]], list[str]]:
    """Token ids (and text, for echo) of each prompt: text is tokenized, token ids taken as they are."""
    prompt = req.prompt
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        items = [prompt]
    else:
        items = list(prompt)
    prompts, texts = [], []
    truncate = serving.truncation_length(req.truncate_prompt_tokens, req.model, output_room=bool(req.max_tokens))
    for item in items:
        if isinstance(item, str):
            ids = serving.encode_text(item, req.add_special_tokens, req.model, truncate, req.truncation_side)
            texts.append(item)
        else:
            side = ids_truncation_side(serving, req)
            ids = serving.check_prompt_length(truncated(list(item), truncate, side), req.model)
            # vLLM decodes the prompt to echo it unless it returns its token ids instead, special tokens kept (the
            # tokenizer's default decode, renderers/base.py)
            echoed = req.echo and not req.return_token_ids
            if echoed:
                serving.require_tokenizer(req.model)
            serving.check_token_ids(ids)
            texts.append(serving.decoder(req.model)(ids) if echoed else "")
        prompts.append(ids)
    return prompts, texts
