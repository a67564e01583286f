"""A streamed Anthropic message: the chat stream vLLM 0.33 runs for it, spelled as Anthropic's events
(`anthropic/serving.py` message_stream_converter).

Each event is `event: NAME` and `data: JSON` (compact, unset fields left out, as vLLM writes them):
`message_start` when the first engine output arrives (usage: the prompt tokens, 0 output tokens); a
`content_block_start` before a block's first delta; a `content_block_delta` per chat chunk that carries
something (`text_delta`, or for a forced tool call `input_json_delta` with the argument text as the
tool parser streams it, each call a `tool_use` block of its own; with a reasoning parser, the reasoning as
`thinking_delta`s of a `thinking` block, closed by a `signature_delta`, before the text's or a forced call's;
a gpt-oss model's Harmony reply: its thinking, text and `tool_use` blocks); at the end the open block's
`content_block_stop`, `message_delta` (stop_reason, stop_sequence and the whole usage) and
`message_stop`. There is no `ping` and no `[DONE]`, as vLLM sends none. A request that fails (its
instance went down) ends with its open block's stop and an `error` event.
"""
from __future__ import annotations

import json
import uuid

from server import messages_answer, tool_calls
from server.chat import ChatFormat, usage_body
from server.errors import APIError
from server.jobs import Choice, Job
from server.logprobs import LogprobSource
from server.protocol import ChatCompletionRequest
from server.serving import Serving
from server.sse import compact_json
from server.tool_calls import ToolCallStream


def event(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {compact_json(data, allow_nan=False)}\n\n".encode()


class MessagesStream(ChatFormat):
    """The events of one streamed message (one choice: Anthropic requests have no `n`)."""

    def __init__(self, serving: Serving, req: ChatCompletionRequest, response_id: str, created: int, echo_text: str,
                 logprobs: LogprobSource | None, tool_stream: ToolCallStream | None = None) -> None:
        super().__init__(serving, req, response_id, created, echo_text, logprobs, tool_stream)
        self.response_id = response_id
        self.next_index = 0              # the index of the next content block
        self.open_block: str | None = None
        self.open_tool: str | None = None  # the id of the open tool_use block
        self.tool_ids: dict[int, str] = {}  # a tool call's id by its index in the chat deltas
        self.tool_used = False
        self.last_tool_arguments: list[str] = []  # the latest tool_use block's argument text
        self.finish_reason: str | None = None
        self.matched: int | str | None = None  # the choice's stop_reason: the stop string it ended on

    def first_output(self, job: Job) -> bytes:
        prompt = len(job.prompts[0])
        return event("message_start", {"type": "message_start", "message": {
            "id": self.response_id, "type": "message", "role": "assistant", "content": [],
            "model": self.serving.response_model(self.req.model), "stop_reason": None, "stop_sequence": None,
            "usage": messages_answer.usage({"prompt_tokens": prompt, "completion_tokens": 0})}})

    def tokens(self, job: Job, choice: Choice, end: int, last: bool) -> bytes:
        text = "".join(choice.plan.pieces[choice.num_sent:end])
        events: list[bytes] = []
        if self.tool_stream is not None:
            if self.tool_stream.after is not None:  # a model that thinks first: its thinking, then the call
                said = self._said(choice, end)
                events += self._thinking(said.get("reasoning") if said else None)
            for call in self.tool_stream.delta(choice.index, text) or ():
                events += self._tool_call(call)
        elif self._reasoning_stream(choice) is not None:  # (a gpt-oss reply's Harmony reading: calls too)
            said = self._said(choice, end)
            if said:
                events += self._thinking(said.get("reasoning"))
                if said.get("content"):
                    events += self._text(said["content"])
                for call in said.get("tool_calls") or ():
                    events += self._tool_call(call)
        elif text:
            events += self._text(text)
        if last:  # the chat chunk's finish_reason (a forced call's, as chat reports it) and stop_reason
            made = self.tool_stream.made if self.tool_stream is not None else \
                self.harmony_calls if self.harmony is not None else None
            self.finish_reason = choice.finish_reason if made is None else tool_calls.finish_reason(
                self.req, choice.finish_reason, choice.index in made)
            self.matched = choice.stop_reason
        return b"".join(events)

    def _said(self, choice: Choice, end: int) -> dict | None:
        """What the choice's reasoning stream reads in its tokens up to `end` (reasoning, content, a gpt-oss
        reply's tool calls), as chat's chunk would carry it."""
        stream = self._reasoning_stream(choice)
        if stream is None or end <= choice.num_sent:
            return None
        start = choice.num_sent
        return stream.delta(choice.plan.token_ids[start:end].tolist(), choice.plan.pieces[start:end])

    def _thinking(self, reasoning: str | None) -> list[bytes]:
        """Reasoning for the open thinking block (one is opened after any other)."""
        if not reasoning:
            return []
        events = []
        if self.open_block != "thinking":
            events += self._stop_block()
            events.append(self._start_block({"type": "thinking", "thinking": ""}))
        events.append(self._delta({"type": "thinking_delta", "thinking": reasoning}))
        return events

    def closing(self, job: Job) -> bytes:
        if job.failed:  # the error event ended it
            return b""
        arguments = "".join(self.last_tool_arguments)
        reason, sequence = messages_answer.stop_reason(self.finish_reason or "stop", self.matched, self.tool_used,
                                                       self.tool_used and _is_json(arguments))
        delta = {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
                 "usage": messages_answer.usage(usage_body(self.serving, job, False))}
        return b"".join([*self._stop_block(), event("message_delta", delta),
                         event("message_stop", {"type": "message_stop"})])

    def failure(self, error: APIError) -> bytes:
        return b"".join([*self._stop_block(), event("error", {"type": "error", "error": {
            "type": messages_answer.error_type(error.status), "message": error.message}})])

    # -- blocks --------------------------------------------------------------------------------
    def _text(self, text: str) -> list[bytes]:
        """Text for the open text block (one is opened after any other)."""
        events = []
        if self.open_block != "text":
            events += self._stop_block()
            events.append(self._start_block({"type": "text", "text": ""}))
        events.append(self._delta({"type": "text_delta", "text": text}))
        return events

    def _tool_call(self, call: dict) -> list[bytes]:
        """A chat tool-call delta, as vLLM's converter reads it: a new id with a name opens a tool_use
        block; argument text goes to the open block only."""
        function = call.get("function") or {}
        arguments = function.get("arguments")
        events = []
        call_id = call.get("id")
        if call_id is not None:
            self.tool_ids[call["index"]] = call_id
            if self.open_tool != call_id and function.get("name") is not None:
                events += self._stop_block()
                self.tool_used = True
                self.last_tool_arguments = []
                events.append(self._start_block({"type": "tool_use", "id": call_id, "name": function["name"],
                                                 "input": {}}))
        else:
            call_id = self.tool_ids.get(call["index"])
        if call_id is not None and arguments and self.open_tool == call_id:
            self.last_tool_arguments.append(arguments)
            events.append(self._delta({"type": "input_json_delta", "partial_json": arguments}))
        return events

    def _start_block(self, block: dict) -> bytes:
        self.open_block = block["type"]
        self.open_tool = block.get("id")
        return event("content_block_start", {"type": "content_block_start", "content_block": block,
                                             "index": self.next_index})

    def _delta(self, delta: dict) -> bytes:
        return event("content_block_delta", {"type": "content_block_delta", "delta": delta, "index": self.next_index})

    def _stop_block(self) -> list[bytes]:
        if self.open_block is None:
            return []
        signed = []
        if self.open_block == "thinking":  # vLLM signs a thinking block as it closes it (a random hex id)
            signed.append(self._delta({"type": "signature_delta", "signature": uuid.uuid4().hex}))
        stop = event("content_block_stop", {"type": "content_block_stop", "index": self.next_index})
        self.open_block = self.open_tool = None
        self.next_index += 1
        return [*signed, stop]


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True
