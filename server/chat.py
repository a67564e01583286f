"""POST /v1/chat/completions, streaming and not, shaped like vLLM 0.33's (`chat_completion/serving.py`).

The conversation (with its tools, tool calls and tool answers) is rendered with the tokenizer's
chat template (see `tokenizer.py`) and tokenized. A forced tool call's output is read back into
`tool_calls` (see `tool_calls.py`). A gpt-oss model's conversation is rendered with Harmony instead, and its
reply read by vLLM's Harmony parser (`harmony.py`, `harmony_prompt.py`). A stream starts, when the first
engine output arrives, with one role chunk per choice (`delta: {role, content: ""}`), then one chunk per output; the
terminal chunk has the finish reason; the usage chunk (with `include_usage`) is
written with `exclude_none`, so it has no `prompt_token_ids`.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import NamedTuple

from aiohttp import web

from server.completions import json_string
from profiles.chat_template import ChatTemplateError, content_format, supports_developer_role
from server.errors import chat_without_tokenizer, validation_error
from server.jobs import Choice, ChunkFormat, Job
from server.logprobs import LogprobSource
from server.protocol import ChatCompletionRequest
from server import harmony_prompt
from server.harmony import HarmonyChat, HarmonyStream, call_choices, check_effort, uses_harmony
from server.reasoning import ChatReasoning
from server import tool_calls
from server.sampling_params import SamplingParams, from_chat
from server.serving import Serving, json_body, per_request_metrics
from server.structured import Constraint
from server.tool_calls import ToolCallStream
from server.sse import ChunkStart, compact_json

ROLE = "assistant"  # the response's role (vLLM's --response-role default)


def response_role(req: ChatCompletionRequest) -> str:
    """vLLM's get_chat_request_role: the last message's role when no generation prompt is added."""
    return ROLE if req.add_generation_prompt else str(req.messages[-1].get("role"))


class ChatFormat(ChunkStart, ChunkFormat):
    """The stream chunks of one chat request."""

    object_kind = "chat.completion.chunk"

    def __init__(self, serving: Serving, req: ChatCompletionRequest, response_id: str, created: int,
                 echo_text: str, logprobs: LogprobSource | None, tool_stream: ToolCallStream | None = None) -> None:
        self.serving = serving
        self.tool_stream = tool_stream  # a forced tool call: deltas carry tool_calls, not content
        self.delta_calls: list[dict] | None = None  # the tool_calls of the chunk last made
        self.role = response_role(req)
        self.req = req
        self.response_id = response_id
        self.created = created
        self.echo_text = echo_text
        self.logprobs = logprobs
        self.include_usage, self.continuous_usage = req.include_usage(serving.options.enable_force_include_usage)
        self.reasoning = ChatReasoning(serving, req)  # a reasoning parser's reading of the reply
        self.reasoning_streams: dict[int, object] = {}  # each thinking choice's ReasoningStream
        harmony = self.reasoning.harmony
        self.harmony = harmony if harmony is not None and harmony.parsing else None  # vLLM's HarmonyParser
        self.harmony_streams: dict[int, HarmonyStream] = {}
        self.harmony_calls: set[int] = set()  # choices whose stream carried a tool call
        # Most chunks are "one more token, nothing else": built from bytes prepared once.
        self.plain = (logprobs is None and not req.return_token_ids and not self.continuous_usage
                      and tool_stream is None and self.reasoning.thinking is None and not self.reasoning.hides_metadata
                      and self.harmony is None)
        self.plain_tail = b'},"logprobs":null,"finish_reason":null,"token_ids":null}],"kv_transfer_params":null}\n\n'
        self.plain_heads: dict[int, bytes] = {}

    def first_output(self, job: Job) -> bytes:
        prompt = len(job.prompts[0])
        usage = (f',"usage":{{"prompt_tokens":{prompt},"total_tokens":{prompt},"completion_tokens":0,'
                 f'"completion_tokens_details":{compact_json(self.reasoning.details(0))}}}'
                 if self.continuous_usage else "")
        prompt_ids = compact_json(job.prompts[0]) if self.req.return_token_ids else "null"
        roles = "".join(
            f'{self.head}{c.index},"delta":{{"role":{compact_json(self.role)},"content":""}},"logprobs":null,"finish_reason":null}}]'
            f'{usage},"prompt_token_ids":{prompt_ids},"prompt_text":null}}\n\n' for c in job.choices)
        # vLLM then sends the echoed message in a chunk of its own per choice, before any output
        echoes = "".join(
            f'{self.head}{c.index},"delta":{{"content":{compact_json(self.echo_text)}}},"logprobs":null,'
            f'"finish_reason":null}}]{usage}}}\n\n' for c in job.choices) if self.echo_text else ""
        return (roles + echoes).encode()

    def tokens(self, job: Job, choice: Choice, end: int, last: bool) -> bytes:
        req, plan, start = self.req, choice.plan, choice.num_sent
        if self.plain and not last:
            head = self.plain_heads.get(choice.index)
            if head is None:
                head = self.plain_heads[choice.index] = f'{self.head}{choice.index},"delta":{{"content":'.encode()
            text = plan.pieces[start] if end == start + 1 else "".join(plan.pieces[start:end])
            return head + json_string(text) + self.plain_tail
        text = "".join(plan.pieces[start:end])
        finish_reason = choice.finish_reason
        if self.tool_stream is not None:
            said = None  # a model that thinks first: its reasoning, then the calls
            if self.tool_stream.after is not None and (stream := self._reasoning_stream(choice)) is not None:
                said = stream.delta(plan.token_ids[start:end].tolist(), plan.pieces[start:end]) if end > start else None
                said = {"reasoning": said["reasoning"]} if said and said.get("reasoning") is not None else None
            calls = self.delta_calls = self.tool_stream.delta(choice.index, text)
            if calls is None and said is None and not last and self.logprobs is None and not req.return_token_ids:
                return b""  # nothing the parser can send yet: no chunk, as vLLM's
            delta = compact_json({**(said or {}), **({"tool_calls": calls} if calls else {})})
            finish_reason = tool_calls.finish_reason(req, finish_reason, choice.index in self.tool_stream.made)
        elif self.harmony is not None:
            said = self._harmony_delta(choice, plan.token_ids[start:end].tolist(), plan.pieces[start:end], last)
            if said is None and not last and (self.logprobs is None and not req.return_token_ids
                                              or self.reasoning.hides_metadata):
                return b""  # nothing the parser can say yet (a header's tokens): no chunk, as vLLM's
            delta = compact_json(said or {})
            finish_reason = tool_calls.finish_reason(req, finish_reason, choice.index in self.harmony_calls)
        elif (stream := self._reasoning_stream(choice)) is not None and end > start:
            said = stream.delta(plan.token_ids[start:end].tolist(), plan.pieces[start:end])
            if said is None and not last and (self.logprobs is None and not req.return_token_ids
                                              or self.reasoning.hides_metadata):
                return b""  # a think marker alone: no chunk, as vLLM's
            delta = compact_json(said or {})
        else:
            # a choice that ends with no output at all (aborted in the queue) has an empty delta, as vLLM's
            delta = f'{{"content":{compact_json(text)}}}' if end or text else "{}"
        logprobs = "null"
        if self.logprobs is not None and not self.reasoning.hides_metadata:
            logprobs = compact_json(self.logprobs.chat(plan.token_ids[start:end].tolist(), plan.pieces[start:end],
                                              len(job.prompts[0]) + start, req.top_logprobs))
        token_ids = compact_json(plan.token_ids[start:end].tolist()) \
            if req.return_token_ids and not self.reasoning.hides_metadata else "null"
        if last:
            ending = (f',"finish_reason":{compact_json(finish_reason)},'
                      f'"stop_reason":{compact_json(choice.stop_reason)},"token_ids":{token_ids},"weight_versions":null')
        else:
            ending = f',"finish_reason":null,"token_ids":{token_ids}'
        tail = ""
        if self.continuous_usage:
            prompt = len(job.prompts[0])
            harmony = self.harmony_streams.get(choice.index)  # (its parser has counted them so far)
            reasoning = harmony.reasoning_tokens if harmony is not None else self.reasoning.tokens(plan, end)
            details = compact_json(self.reasoning.details(reasoning))
            tail += (f',"usage":{{"prompt_tokens":{prompt},"total_tokens":{prompt + end},"completion_tokens":{end},'
                     f'"completion_tokens_details":{details}}}')
        if last and not self.include_usage and self.serving.options.system_fingerprint is not None:
            tail += ',"system_fingerprint":' + compact_json(self.serving.options.system_fingerprint)
        kv_params = compact_json(choice.kv_transfer_params) if last and choice.kv_transfer_params else "null"
        return (f'{self.head}{choice.index},"delta":{delta},"logprobs":{logprobs}{ending}}}]'
                f'{tail},"kv_transfer_params":{kv_params}}}\n\n').encode()

    def usage(self, job: Job) -> bytes:
        if not self.include_usage:
            return b""
        tail = self._fingerprint()
        if self.serving.options.enable_per_request_metrics and len(job.choices) == 1:
            metrics = {k: v for k, v in per_request_metrics(job.choices[0].request).items() if v is not None}
            tail += ',"metrics":' + compact_json(metrics)
        usage = compact_json(usage_body(self.serving, job, False, self.reasoning))
        return f'{self.base},"choices":[],"usage":{usage}{tail}}}\n\n'.encode()

    def _harmony_delta(self, choice: Choice, ids: list[int], pieces: list[str], last: bool) -> dict | None:
        """A chunk's delta as vLLM's ChatStreamProcessor makes it with the HarmonyParser (tool calls kept where
        the request asks for them; with parallel_tool_calls false, the first only)."""
        if not ids and not choice.num_sent:
            return {}  # finished without output: vLLM's empty delta
        stream = self.harmony_streams.get(choice.index)
        if stream is None:
            stream = self.harmony_streams[choice.index] = self.harmony.stream(tool_calls.tool_call_id)
        said = stream.delta(ids, pieces, last)
        if said is not None and "tool_calls" in said:
            if keeps_tool_calls(self.serving, self.req):
                self.harmony_calls.add(choice.index)
                if self.req.parallel_tool_calls is False:
                    said["tool_calls"] = [c for c in said["tool_calls"] if c["index"] == 0]
            else:
                del said["tool_calls"]
                if not said.get("content") and not said.get("reasoning"):
                    said = None
        return said

    def _reasoning_stream(self, choice: Choice):
        """The ReasoningStream of a choice that thinks (None: its reply is all content). A gpt-oss reply's is
        its Harmony reading (its `delta(ids, pieces)` gives reasoning, content and tool_calls alike)."""
        if self.harmony is not None:
            return _HarmonyChunks(self, choice)
        if self.reasoning.thinking is None:
            return None
        if choice.index not in self.reasoning_streams:
            self.reasoning_streams[choice.index] = self.reasoning.stream(choice.plan)
        return self.reasoning_streams[choice.index]

    def logged_output(self, choice: Choice, text: str) -> str:
        """vLLM logs a choice's content, or (none) its tool calls as "[tool_calls: name(arguments), ...]"."""
        if self.tool_stream is None:
            return self.echo_text + text
        calls = tool_calls.parse_tool_calls(self.req, tool_calls.after_reasoning(self.echo_text + text,
                                                                                self.tool_stream.after))
        if not calls:
            return ""
        described = ", ".join(f"{c['function']['name']}({c['function']['arguments']})" for c in calls)
        return f"[tool_calls: {described}]"

    def logged_delta(self, text: str) -> str:
        """vLLM logs a chunk's content, or its tool calls' argument text as "[tool_calls: ...]" (none: nothing)."""
        if self.tool_stream is None:
            return text
        arguments = "".join(c["function"].get("arguments") or "" for c in self.delta_calls or () if c.get("function"))
        return f"[tool_calls: {arguments}]" if arguments else ""

    def _fingerprint(self) -> str:
        fp = self.serving.options.system_fingerprint
        return "" if fp is None else ',"system_fingerprint":' + compact_json(fp)


class _HarmonyChunks:
    """A choice's Harmony deltas where a caller reads them as a reasoning stream's (the Messages API's stream)."""

    def __init__(self, fmt: ChatFormat, choice: Choice) -> None:
        self.fmt, self.choice = fmt, choice

    def delta(self, ids: list[int], pieces: list[str]) -> dict | None:
        choice = self.choice
        last = choice.finish_reason is not None and choice.num_sent + len(ids) >= choice.request.num_output_tokens
        return self.fmt._harmony_delta(choice, ids, pieces, last)


def usage_body(serving: Serving, job: Job, with_nulls: bool, reasoning: ChatReasoning | None = None) -> dict:
    prompt, completion = len(job.prompts[0]), job.num_output_tokens
    usage = {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion}
    details = None
    if serving.options.enable_prompt_tokens_details and job.num_cached_tokens is not None:
        details = {"cached_tokens": job.num_cached_tokens}
    if details is not None:  # chat adds its prefill's cache writes (vLLM's _make_prompt_tokens_details)
        details["created_cache_tokens"] = serving.cache_creation_tokens(job)
        if with_nulls:  # the full body has every key of vLLM's PromptTokenUsageInfo
            details["multimodal_tokens"] = None
    if details is not None or with_nulls:
        usage["prompt_tokens_details"] = details
    if with_nulls:
        usage["completion_tokens_details"] = None
    if reasoning is not None and reasoning.active:  # vLLM's reasoning tokens, with a reasoning parser
        usage["completion_tokens_details"] = reasoning.details(
            sum(reasoning.tokens(c.plan, c.request.num_output_tokens) for c in job.choices))
    return usage


def full_response(serving: Serving, req: ChatCompletionRequest, fmt: ChatFormat, job: Job, response_id: str,
                  created: int) -> dict:
    """The non-streaming body: every key of vLLM's ChatCompletionResponse, nulls included."""
    choices = []
    for choice in job.choices:
        n = choice.request.num_output_tokens
        ids = choice.plan.token_ids[:n].tolist()
        logprobs = None
        if fmt.logprobs is not None:
            logprobs = fmt.logprobs.chat(ids, choice.plan.pieces[:n], len(job.prompts[0]), req.top_logprobs)
        content = "".join(choice.plan.pieces[:n])
        message = {"role": fmt.role, "content": content, "refusal": None, "annotations": None, "audio": None,
                   "function_call": None}
        finish_reason = choice.finish_reason
        reasoning = None
        if fmt.tool_stream is not None:  # a forced call: the text is read back as tool calls
            if fmt.tool_stream.after is not None:  # (after its reasoning)
                reasoning, _ = fmt.reasoning.fields(choice.plan, content)
            calls = tool_calls.parse_tool_calls(req, tool_calls.after_reasoning(content, fmt.tool_stream.after))
            message["content"] = ""
            if calls:
                message["tool_calls"] = calls
            finish_reason = tool_calls.finish_reason(req, finish_reason, bool(calls))
        message["reasoning"] = reasoning
        if fmt.harmony is not None:  # vLLM's HarmonyParser reads the reply (server/harmony.py)
            finish_reason = _harmony_message(serving, req, fmt, message, ids, choice.plan.pieces[:n], finish_reason)
        elif fmt.tool_stream is None:  # the reasoning parser's split of the reply
            message["reasoning"], message["content"] = fmt.reasoning.fields(choice.plan, content)
        if req.echo:  # vLLM prefixes the echo (maybe none) to the content the parsers left of the output, none too
            message["content"] = fmt.echo_text + (message["content"] or "")
        if fmt.reasoning.hides_metadata:  # vLLM's suppress_metadata: nothing that would show the reasoning
            logprobs = None
        choices.append({
            "index": choice.index, "message": message,
            "logprobs": logprobs, "finish_reason": finish_reason, "stop_reason": choice.stop_reason,
            "token_ids": ids if req.return_token_ids and not fmt.reasoning.hides_metadata else None,
            "routed_experts": None, "weight_versions": None})
    return {
        "id": response_id, "object": "chat.completion", "created": created,
        "model": serving.response_model(req.model),
        "choices": choices, "service_tier": None, "system_fingerprint": serving.options.system_fingerprint,
        "usage": usage_body(serving, job, True, fmt.reasoning),
        "prompt_logprobs": _prompt_logprobs(serving, req, job.prompts[0]),
        "prompt_token_ids": job.prompts[0] if req.return_token_ids else None, "prompt_text": None,
        "kv_transfer_params": job.kv_transfer_params, "ec_transfer_params": None,
        "metrics": (per_request_metrics(job.choices[0].request)
                    if serving.options.enable_per_request_metrics and len(job.choices) == 1 else None)}


def _harmony_message(serving: Serving, req: ChatCompletionRequest, fmt: ChatFormat, message: dict, ids: list[int],
                     pieces: list[str], finish_reason: str | None) -> str | None:
    """A choice's message fields as vLLM's HarmonyParser and assemble_chat_message_fields make them; its finish
    reason ("tool_calls" where calls were made, but for a named tool)."""
    parsed = fmt.harmony.parse(ids, pieces)
    message["reasoning"] = parsed.reasoning if fmt.reasoning.include_reasoning else None
    content = parsed.content
    calls = []
    if keeps_tool_calls(serving, req):
        if req.tool_choice == "required" or req.named_tool() is not None:
            content = content or ""
        kept = parsed.calls[:1] if req.parallel_tool_calls is False else parsed.calls
        calls = [{"id": tool_calls.tool_call_id(), "type": "function",
                  "function": {"name": name, "arguments": arguments}} for name, arguments in kept]
    message["content"] = content
    if calls:
        message["tool_calls"] = calls
    return tool_calls.finish_reason(req, finish_reason, bool(calls))


def keeps_tool_calls(serving: Serving, req: ChatCompletionRequest) -> bool:
    """vLLM's keeps_tool_calls: a forced call's, or "auto" with tools where the server parses tool calls."""
    if req.tool_choice == "required" or req.named_tool() is not None:
        return True
    return tool_parsing(serving) and req.tool_choice == "auto" and bool(req.tools)


def _developer_as_system(messages: list[dict]) -> list[dict]:
    """vLLM's answer to a developer message for a template without that role: a system message, and
    every system message merged into one at the start (their texts joined by a blank line)."""
    messages = [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]
    systems = [i for i, m in enumerate(messages) if m["role"] == "system"]
    if systems == [0] or not systems:
        return messages
    merged = "\n\n".join(messages[i]["content"] for i in systems if messages[i]["content"])
    return [{"role": "system", "content": merged}, *(m for m in messages if m["role"] != "system")]


def _prompt_logprobs(serving: Serving, req: ChatCompletionRequest, prompt: list[int]) -> list | None:
    """vLLM's prompt_logprobs of a chat request (with echo, `top_logprobs` asks for them: 0 by default)."""
    k = req.top_logprobs if req.prompt_logprobs is None and req.echo else req.prompt_logprobs
    return None if k is None else serving.logprob_source(req.model).prompt(prompt, k)


def conversation(messages: list[dict]) -> list[dict]:
    """Messages as vLLM hands them to the chat template: content as plain text (text parts joined by
    newlines, as vLLM's "string" format); an assistant's tool calls with their arguments as objects (a
    string that is not a JSON object becomes {}), its `reasoning` (or the deprecated `reasoning_content`) as
    both; a tool's
    `tool_call_id`; a `name`."""
    out = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if not isinstance(role, str):
            raise validation_error(f"messages[{i}] needs a string `role`.", parameter="messages")
        content = message.get("content")
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        elif isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in ("text", "input_text", "output_text") and isinstance(part.get("text"), str):
                    parts.append(part["text"])
                elif isinstance(part, str):
                    parts.append(part)
                else:
                    raise validation_error(f"The simulated model takes text only; messages[{i}] has a content part "
                                           f"of type {kind!r}.", parameter="messages")
            text = "\n".join(parts)
        else:
            raise validation_error(f"messages[{i}].content must be a string or a list of parts.",
                                   parameter="messages")
        entry = {"role": role, "content": text}
        if role == "assistant":
            calls = message.get("tool_calls")
            if isinstance(calls, list) and calls:
                entry["tool_calls"] = [_template_tool_call(call) for call in calls]
            reasoning = message.get("reasoning")
            if reasoning is None:  # vLLM renames the deprecated reasoning_content to reasoning
                reasoning = message.get("reasoning_content")
            if isinstance(reasoning, str):
                entry["reasoning"] = entry["reasoning_content"] = reasoning
        elif role == "tool" and "tool_call_id" in message:
            entry["tool_call_id"] = message["tool_call_id"]
        if isinstance(message.get("name"), str):
            entry["name"] = message["name"]
        out.append(entry)
    return out


def _template_tool_call(call) -> dict:
    """An assistant's tool call, its arguments parsed to an object as vLLM parses them for templates."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(call, dict):
        raise validation_error("assistant tool_calls entries must be objects.", parameter="tool_calls")
    if call.get("type", "function") != "function" or not isinstance(function, dict):
        raise validation_error("chat completions only support assistant tool_calls of type 'function'.",
                               parameter="tool_calls")
    arguments = function.get("arguments")
    if isinstance(arguments, str) and arguments:
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            arguments = None
    if not isinstance(arguments, dict):
        arguments = {}
    return {**call, "function": {**function, "arguments": arguments}}


# what a request's chat_template_kwargs may not set: the renderer's own arguments
_RESERVED_TEMPLATE_KWARGS = frozenset({"chat_template", "tools", "messages", "conversation", "tokenize",
                                       "add_generation_prompt", "continue_final_message", "return_dict"})


def tool_parsing(serving: Serving) -> bool:
    """Whether vLLM has a tool parser: --enable-auto-tool-choice with --tool-call-parser."""
    return serving.options.enable_auto_tools and serving.options.tool_call_parser is not None


def tool_parser(serving: Serving) -> str | None:
    """The tool parser vLLM runs on a request (adjust_request, the output's tool calls): none without
    --enable-auto-tool-choice."""
    return serving.options.tool_call_parser if tool_parsing(serving) else None


def check_tool_choice(serving: Serving, req) -> None:
    """vLLM's answer to a tool_choice its server cannot parse: 400."""
    if tool_parsing(serving) or req.tool_choice in (None, "none"):
        return
    if req.tool_choice == "auto":
        if not serving.options.enable_auto_tools:
            raise validation_error('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                                   "to be set")
        return
    named = req.named_tool()
    described = f'function "{named.function.name}"' if named is not None else f'"{req.tool_choice}"'
    raise validation_error(f"tool_choice={described} requires --tool-call-parser to be set")


def tools_for_template(serving: Serving, req) -> list[dict] | None:
    """The tools vLLM passes to the chat template (none with tool_choice "none" and
    --exclude-tools-when-tool-choice-none)."""
    if req.tools is None or (req.tool_choice == "none" and serving.options.exclude_tools_when_tool_choice_none):
        return None
    return [tool.template_dict() for tool in req.tools]


def render(serving: Serving, req, messages: list[dict], tools: list[dict] | None) -> str:
    """The prompt text of a chat request (or a /tokenize of one), with vLLM's checks on request templates."""
    kwargs = getattr(req, "chat_template_kwargs", None) or {}
    if not serving.options.trust_request_chat_template and (
            getattr(req, "chat_template", None) is not None or kwargs.get("chat_template") is not None):
        raise validation_error("Chat template is passed with request, but --trust-request-chat-template is not "
                               "set. Refused request with untrusted chat template.")
    requested = dict(kwargs)
    effort = getattr(req, "reasoning_effort", None)
    if effort is not None:  # vLLM's build_chat_params: the template's switch for thinking follows it
        requested["reasoning_effort"] = effort
        requested.setdefault("enable_thinking", effort != "none")
    # vLLM's preprocess_chat always has defaults to merge under (its own, and --default-chat-template-kwargs'),
    # so a request's unset values never reach the template
    merged = {**serving.options.default_chat_template_kwargs, **_set_values(requested)}
    options = {k: v for k, v in merged.items() if k not in _RESERVED_TEMPLATE_KWARGS}
    tokenizer = serving.require_tokenizer(req.model)
    template = chat_template(serving, req, merged)
    developer_role = tokenizer.developer_role if template is None else supports_developer_role(template)
    if not developer_role and any(m["role"] == "developer" for m in messages):
        messages = _developer_as_system(messages)
    if template is not None and content_format(template) == "openai":
        messages = _as_content_parts(messages)
    try:
        return tokenizer.render_chat(messages, req.add_generation_prompt, tools, req.continue_final_message, options,
                                     template)
    except ChatTemplateError as exc:
        raise validation_error(str(exc)) from None


def _set_values(kwargs: dict) -> dict:
    """vLLM's merge_kwargs: a value of None or "auto" is unset and leaves the default in place."""
    return {k: v for k, v in kwargs.items() if v is not None and v != "auto"}


def with_default_kwargs(defaults: dict, kwargs: dict) -> dict:
    """vLLM's ChatParams.with_defaults of chat_template_kwargs: `kwargs` set over the server's
    --default-chat-template-kwargs (none given: `kwargs` unchanged)."""
    return {**defaults, **_set_values(kwargs)} if defaults else kwargs


def chat_template(serving: Serving, req, kwargs: dict) -> str | None:
    """The Jinja template a chat request is rendered with, in vLLM's order (None: the tokenizer's own): the
    request's `chat_template`, else --chat-template, else the `chat_template` of its template kwargs (the
    request's, else --default-chat-template-kwargs'; "auto" is unset: vLLM's merge_kwargs skips it, and so
    the server's template too)."""
    template = getattr(req, "chat_template", None) or serving.options.chat_template
    if template is None or template == "auto":
        template = kwargs.get("chat_template")
    if template is not None and not isinstance(template, str):
        raise validation_error("chat_template must be a string.", parameter="chat_template")
    return template


def _as_content_parts(messages: list[dict]) -> list[dict]:
    """Messages as vLLM hands them to a template that loops over content ("openai" format): the text as one
    text part (none when empty); a tool's answer stays text."""
    return [m if m["role"] == "tool" or not isinstance(m["content"], str)
            else {**m, "content": [{"type": "text", "text": m["content"]}] if m["content"] else []}
            for m in messages]


async def create_chat_completion(serving: Serving, request: web.Request) -> web.StreamResponse:
    data, arrival = await serving.read_json(request, ChatCompletionRequest.model_fields)
    req = serving.parse(ChatCompletionRequest, data)
    with serving.kv_transfer_rejection_cleanup(request, req):  # (a decode pod frees a prefill it turns away)
        return await answer_chat(serving, request, req, arrival)


class ChatPrompt(NamedTuple):
    """A chat request checked and rendered as vLLM's chat path does before it samples."""
    prompt: list[int]                      # its token ids
    text: str                              # the text its token ids were encoded from
    messages: list[dict]                   # the conversation rendered
    forced: Constraint | None              # a forced tool call's constraint (with a tool parser)
    requested: int | None                  # max_completion_tokens, else max_tokens


def chat_params(serving: Serving, req: ChatCompletionRequest, max_tokens: int,
                forced: Constraint | None) -> SamplingParams:
    """The SamplingParams vLLM's chat path builds (to_sampling_params) after its tool parser's adjust_request:
    a forced call's structured output (the parser's structural tag, or the call's JSON schema) overrides the
    request's own, and some parsers keep special tokens; a sampling field the request leaves out is its
    model's default (Serving.sampling_defaults)."""
    params = from_chat(req, max_tokens, defaults=serving.sampling_defaults(req.model).params)
    options = serving.options
    return params.model_copy(update=tool_calls.parser_adjustment(req, tool_parser(serving), forced,
                                                                 params.structured_outputs, options.reasoning_parser,
                                                                 options.tool_strict_level))


def chat_prompt(serving: Serving, req: ChatCompletionRequest) -> ChatPrompt:
    """Check a chat request's token limits, truncation and tool choice, then render and tokenize it."""
    requested, param = req.requested_max_tokens()
    serving.check_max_tokens(requested, param, req.model)
    serving.check_truncation(req.truncate_prompt_tokens, req.model)
    harmony = uses_harmony(serving, req.model)
    if harmony:  # vLLM's Harmony rendering: no check of the tool choice against the parsers, its effort check
        check_effort(req.reasoning_effort, chat=True)
    else:
        check_tool_choice(serving, req)
    forced = tool_calls.as_parsed_by(tool_calls.forced_constraint(req), tool_parser(serving)) \
        if tool_parsing(serving) else None
    messages = conversation(req.messages)
    if harmony:  # vLLM renders a gpt-oss conversation with Harmony, not the chat template
        ids, text = harmony_prompt.chat_prompt(serving, req, tools_for_template(serving, req))
        return ChatPrompt(serving.check_prompt_length(ids, req.model), text, messages, forced, requested)
    text = render(serving, req, messages, tools_for_template(serving, req))
    prompt = serving.encode_text(text, req.add_special_tokens, req.model,
                                 serving.truncation_length(req.truncate_prompt_tokens, req.model), req.truncation_side)
    return ChatPrompt(prompt, text, messages, forced, requested)


def harmony_structure(serving: Serving, req, forced: Constraint | None):
    """What a gpt-oss model writes (server/harmony.py): with a parser, its analysis then a final answer
    satisfying the request's structured output (HarmonyParser.adjust_request), or, forced by the tool parser's
    tag, a call of the tool named (or of one of the tools, for "required"); without a parser, vLLM constrains
    the output itself from its first token, so a structured output leaves no room for Harmony's messages."""
    harmony = HarmonyChat(serving, req)
    own = serving.structure_for(req, req.model)
    if not harmony.parsing:
        return own if own is not None else harmony.reply()
    calls = call_choices(serving, req, req.model) if forced is not None else ()
    return harmony.reply(None if calls else own, calls)


async def answer_chat(serving: Serving, request: web.Request, req: ChatCompletionRequest, arrival: float,
                      stream_format: type[ChatFormat] = ChatFormat,
                      reshape: Callable[[dict], dict] | None = None) -> web.StreamResponse:
    """Run a parsed chat request and answer it. An API that vLLM answers through its chat path (Anthropic's
    Messages) passes its own `stream_format` and `reshape`s the full chat response into its own."""
    if not serving.has_tokenizer:
        raise chat_without_tokenizer()
    serving.check_model(req.model, logged=True)
    n = 1 if req.n is None else req.n
    serving.check_admission(request, n, req.model)
    prompt, text, messages, forced, requested = chat_prompt(serving, req)
    max_tokens = serving.max_tokens_for(len(prompt), requested, req.model)
    req.verify_sampling(n, max_tokens, serving.options.max_logprobs, req.top_logprobs if req.logprobs else None,
                        serving.vocab_size_for(req.model), serving.options.reasoning,
                        serving.sampling_defaults(req.model).params)
    harmony = uses_harmony(serving, req.model)
    structure = harmony_structure(serving, req, forced) if harmony else serving.structure_for(req, req.model, forced)
    pinned = serving.pinned_engine(request)
    response_id = f"chatcmpl-{serving.base_request_id(request, req.request_id)}"
    created = int(time.time())
    role = response_role(req)
    # vLLM echoes the last message when its role is the reply's; a gpt-oss conversation is Harmony's messages, in
    # which it finds no `content` key: nothing is echoed
    echo_text = messages[-1]["content"] if req.echo and messages and messages[-1]["role"] == role and not harmony \
        else ""
    logprobs = serving.logprob_source(req.model, req.return_tokens_as_token_ids) if req.logprobs else None
    fmt = stream_format(serving, req, response_id, created, echo_text, logprobs,
                        ToolCallStream(req) if forced is not None and not harmony else None)
    if not harmony:  # a structured reply (or forced call) of a model that thinks: its reasoning comes first
        structure = fmt.reasoning.structured(structure)
        if fmt.tool_stream is not None:
            fmt.tool_stream.after = fmt.reasoning.end_marker
    job, streamed = await serving.generate(request, req, fmt, [prompt], [response_id], n, [max_tokens], arrival,
                                           pinned, reply=not echo_text, model=req.model, structure=structure,
                                           params=lambda _: chat_params(serving, req, max_tokens, forced),
                                           prompt_texts=[text], thinking=fmt.reasoning.thinking)
    if streamed is not None:
        return streamed
    body = full_response(serving, req, fmt, job, response_id, created)
    return json_body(body if reshape is None else reshape(body))
