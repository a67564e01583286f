"""The output of a Responses request: its message item, and the stream of events that builds it.

As vLLM 0.33 writes them (`responses/serving.py`, `streaming_events.py`, no reasoning parser): the
output is one assistant message item ("msg_" and 16 hex digits) holding one
`output_text` part, or no part when the text is empty; its status is "incomplete" when the output
was cut by max_output_tokens, else "completed". A stream is SSE with an `event:` line per event,
every event numbered by `sequence_number` from 0: `response.created` and `response.in_progress`
(the response in progress, no output yet), then at the first text `response.output_item.added` and
`response.content_part.added`, one `response.output_text.delta` per engine output with text,
`response.output_text.done`, `response.content_part.done` and `response.output_item.done`, and last
`response.completed` (`response.incomplete` when cut short) with the whole response. No `[DONE]`.
An output without text streams no item at all, and the final response then has none.

With a reasoning parser (server/reasoning.py) a thinking reply's reasoning comes first, as vLLM's
SimpleStreamingEventProcessor streams its parser's deltas: a `reasoning` item ("rs_" and 16 hex digits) at
output_index 0 with one `reasoning_text` part (`response.output_item.added`, `response.content_part.added`,
one `response.reasoning_text.delta` per output with reasoning, then `response.reasoning_text.done`,
`response.content_part.done` and `response.output_item.done` when the answer begins or the output ends), then
the message item at output_index 1; not streamed, the reasoning item has status null, as vLLM builds it.

A forced function call (responses_tools.py) streams its calls instead, as vLLM's
SimpleStreamingEventProcessor does from its parser's deltas: per call `response.output_item.added`
(the item in progress, no arguments yet), one `response.function_call_arguments.delta` per output
that adds to its arguments, then `response.function_call_arguments.done` and
`response.output_item.done` when the next call starts (status "completed") or the output ends (the
finish reason's status); a custom tool's call streams its decoded input as
`response.custom_tool_call_input.delta` / `.done` events.
"""
from __future__ import annotations

from collections.abc import Callable

from dataclasses import dataclass

from server.completions import json_string
from server.jobs import Choice, ChunkFormat, Job
from server.logprobs import LogprobSource
from server.protocol import random_uuid
from server.reasoning import ChatReasoning, ReasoningStream
from server.responses_tools import (ForcedCalls, call_item_id, custom_input_prefix, custom_tool_call_item,
                                    decode_custom_input, function_call_item)
from server.tool_calls import tool_call_id
from server.sse import compact_json


def item_status(finish_reason: str | None) -> str:
    """vLLM's response_item_status."""
    return "incomplete" if finish_reason == "length" else "completed"


def message_id() -> str:
    return f"msg_{random_uuid()}"


def output_text(text: str, logprobs: list[dict] | None) -> dict:
    return {"annotations": [], "text": text, "type": "output_text", "logprobs": logprobs}


def message_item(item_id: str, text: str, logprobs: list[dict] | None, status: str) -> dict:
    """An assistant message item (the SDK's ResponseOutputMessage, in its key order)."""
    return {"id": item_id, "content": [output_text(text, logprobs)] if text else [], "role": "assistant",
            "status": status, "type": "message", "phase": None}


def reasoning_item(text: str | None, item_id: str | None = None, status: str | None = None) -> dict:
    """A reasoning item (the SDK's ResponseReasoningItem, in its key order) holding one reasoning_text part, or
    none while it streams (`text` None)."""
    content = None if text is None else [{"text": text, "type": "reasoning_text"}]
    return {"id": item_id or f"rs_{random_uuid()}", "summary": [], "type": "reasoning",
            "content": content, "encrypted_content": None, "status": status}


def response_logprobs(source: LogprobSource, token_ids: list[int], pieces: list[str], first_position: int,
                      k: int) -> list[dict]:
    """The output_text part's logprobs (the SDK's Logprob: token, bytes, logprob, top_logprobs)."""
    return [{"token": entry["token"], "bytes": entry["bytes"], "logprob": entry["logprob"],
             "top_logprobs": [{"token": t["token"], "bytes": t["bytes"], "logprob": t["logprob"]}
                              for t in entry["top_logprobs"]]}
            for entry in source.chat(token_ids, pieces, first_position, k)["content"]]


def event(kind: str, body: str, sequence_number: int, after: str = "", extra: str = "") -> bytes:
    """One SSE event; `body` is its JSON object's fields before sequence_number, `after` those between
    sequence_number and type (the SDK's models order their fields by name), `extra` the fields vLLM
    adds that its SDK model lacks (written last)."""
    return (f'event: {kind}\ndata: {{{body},"sequence_number":{sequence_number},{after}"type":"{kind}"{extra}}}\n\n'
            .encode())


@dataclass
class _OpenCall:
    """The call item a stream is writing."""
    index: int           # its place in the parser's list of calls
    item_id: str
    call_id: str
    name: str
    namespace: str | None
    custom: bool
    output_index: int
    arguments: str = ""
    payload: str = ""    # a custom tool's input streamed so far


class ResponseStream(ChunkFormat):
    """The stream events of one Responses request (see server/jobs.py).

    `finish(job, output)` builds the final response object from the finished job and the output
    items the stream sent; it is kept in `final` once the terminal event is written. A request the
    engine fails ends with vLLM's error body as its last event (vLLM 0.33 means to send it, but
    its own event validation rejects it and the connection drops)."""

    def __init__(self, in_progress: Callable[[], dict], finish: Callable[[Job, list[dict]], dict],
                 logprobs: LogprobSource | None, top_logprobs: int, calls: ForcedCalls | None = None,
                 reasoning: ChatReasoning | None = None) -> None:
        self.in_progress = in_progress
        self.reasoning = reasoning  # a reasoning parser: a thinking reply streams a reasoning item first
        self.reasoning_stream: ReasoningStream | None = None
        self.reasoning_id: str | None = None  # the open reasoning item
        self.reasoning_text: list[str] = []
        self.message_index = 0  # the message item's output_index
        self.calls = calls  # a forced call: the output streams call items
        self.call_deltas = calls.stream() if calls is not None else None
        self.call: _OpenCall | None = None
        self.finish = finish
        self.logprobs = logprobs
        self.top_logprobs = top_logprobs
        self.sequence_number = 0
        self.item_id: str | None = None  # the message item, once the first text opened it
        self.text: list[str] = []
        self.text_logprobs: list[dict] = []
        self.output: list[dict] = []
        self.final: dict | None = None
        self._delta_head = b""
        self._delta_tail = b""

    def _event(self, kind: str, body: str, after: str = "", extra: str = "") -> bytes:
        data = event(kind, body, self.sequence_number, after, extra)
        self.sequence_number += 1
        return data

    def opening(self) -> bytes:
        """response.created and response.in_progress (`in_progress` builds their response): sent as the
        stream opens."""
        body = '"response":' + compact_json(self.in_progress())
        return self._event("response.created", body) + self._event("response.in_progress", body)

    def first_output(self, job: Job) -> bytes:
        return b""

    def tokens(self, job: Job, choice: Choice, end: int, last: bool) -> bytes:
        start, plan = choice.num_sent, choice.plan
        text = "".join(plan.pieces[start:end])
        if self.calls is not None:
            out = []
            if self.reasoning is not None and self.reasoning.thinks(plan) and end > start:  # its reasoning first
                if self.reasoning_stream is None:
                    self.reasoning_stream = self.reasoning.stream(plan)
                said = self.reasoning_stream.delta(plan.token_ids[start:end].tolist(), plan.pieces[start:end])
                if said is not None and said.get("reasoning"):
                    if self.reasoning_id is None:
                        out.append(self._open_reasoning())
                    out.append(self._reasoning_delta(said["reasoning"]))
            out.append(self.call_events(text, end > start, item_status(choice.finish_reason) if last else None))
            if last and self.reasoning_id is not None:  # (cut inside it)
                out.append(self._close_reasoning(item_status(choice.finish_reason)))
            return b"".join(out)
        out = []
        if self.reasoning is not None and self.reasoning.thinks(plan):  # as vLLM's parser splits it: reasoning, content
            if self.reasoning_stream is None:
                self.reasoning_stream = self.reasoning.stream(plan)
            said = self.reasoning_stream.delta(plan.token_ids[start:end].tolist(), plan.pieces[start:end]) \
                if end > start else None
            if said is not None and said.get("reasoning") is not None:
                if self.reasoning_id is None:
                    out.append(self._open_reasoning())
                out.append(self._reasoning_delta(said["reasoning"]))
            text = (said or {}).get("content") or ""
        if text:
            if self.reasoning_id is not None:
                out.append(self._close_reasoning("completed"))
            if self.item_id is None:
                out.append(self._open())
            out.append(self._delta(job, choice, start, end, text))
        if last and self.reasoning_id is not None:
            out.append(self._close_reasoning(item_status(choice.finish_reason)))
        if last and self.item_id is not None:
            out.append(self._close(item_status(choice.finish_reason)))
        return b"".join(out)

    def usage(self, job: Job) -> bytes:
        return b""  # the terminal event carries the usage

    def closing(self, job: Job) -> bytes:
        """The terminal event, with the whole response (no [DONE])."""
        if job.failed:
            return b""
        self.final = self.finish(job, self.output)
        kind = "response.incomplete" if self.final["status"] == "incomplete" else "response.completed"
        return self._event(kind, '"response":' + compact_json(self.final))

    # -- the reasoning item (vLLM's emit_simple_reasoning_open / _delta / _done) --------------------
    def _open_reasoning(self) -> bytes:
        self.reasoning_id = f"rs_{random_uuid()}"
        item = compact_json(reasoning_item(None, self.reasoning_id, "in_progress"))
        where = f'"item_id":"{self.reasoning_id}","output_index":{len(self.output)}'
        return (self._event("response.output_item.added", f'"item":{item},"output_index":{len(self.output)}')
                + self._event("response.content_part.added",
                              f'"content_index":0,{where},"part":{{"text":"","type":"reasoning_text"}}'))

    def _reasoning_delta(self, text: str) -> bytes:
        self.reasoning_text.append(text)
        return self._event("response.reasoning_text.delta", f'"content_index":0,"delta":{compact_json(text)},'
                           f'"item_id":"{self.reasoning_id}","output_index":{len(self.output)}')

    def _close_reasoning(self, status: str) -> bytes:
        text = "".join(self.reasoning_text)
        index = len(self.output)
        where = f'"content_index":0,"item_id":"{self.reasoning_id}","output_index":{index}'
        item = reasoning_item(text, self.reasoning_id, status)
        out = (self._event("response.reasoning_text.done", where, f'"text":{compact_json(text)},')
               + self._event("response.content_part.done", f'{where},"part":{compact_json(item["content"][0])}')
               + self._event("response.output_item.done", f'"item":{compact_json(item)},"output_index":{index}'))
        self.output.append(item)
        self.reasoning_id = None
        return out

    # -- the message item -------------------------------------------------------------------
    def _open(self) -> bytes:
        self.item_id = message_id()
        self.message_index = index = len(self.output)
        item = compact_json(message_item(self.item_id, "", None, "in_progress"))
        self._delta_head = b'{"content_index":0,"delta":'
        self._delta_tail = f',"item_id":"{self.item_id}","logprobs":'.encode()
        return (self._event("response.output_item.added", f'"item":{item},"output_index":{index}')
                + self._event("response.content_part.added",
                              f'"content_index":0,"item_id":"{self.item_id}","output_index":{index},'
                              f'"part":{compact_json(output_text("", []))}'))

    def _delta(self, job: Job, choice: Choice, start: int, end: int, text: str) -> bytes:
        self.text.append(text)
        stream_logprobs = b"[]"
        if self.logprobs is not None:
            entries = response_logprobs(self.logprobs, choice.plan.token_ids[start:end].tolist(),
                                        choice.plan.pieces[start:end], len(job.prompts[0]) + start,
                                        self.top_logprobs)
            self.text_logprobs.extend(entries)
            # a delta's logprobs carry no bytes (the SDK's ResponseTextDeltaEvent.Logprob)
            stream_logprobs = compact_json([{"token": e["token"], "logprob": e["logprob"],
                                    "top_logprobs": [{"token": t["token"], "logprob": t["logprob"]}
                                                     for t in e["top_logprobs"]]} for e in entries]).encode()
        body = (self._delta_head + json_string(text) + self._delta_tail + stream_logprobs
                + b',"output_index":%d,"sequence_number":%d,"type":"response.output_text.delta"}'
                % (self.message_index, self.sequence_number))
        self.sequence_number += 1
        return b"event: response.output_text.delta\ndata: " + body + b"\n\n"

    def _close(self, status: str) -> bytes:
        text = "".join(self.text)
        part = output_text(text, self.text_logprobs or None)
        item = message_item(self.item_id, text, self.text_logprobs or None, status)
        self.output.append(item)
        where, index = f'"content_index":0,"item_id":"{self.item_id}"', self.message_index
        return (self._event("response.output_text.done", f'{where},"logprobs":[],"output_index":{index}',
                            f'"text":{compact_json(text)},')
                + self._event("response.content_part.done",
                              f'{where},"output_index":{index},"part":{compact_json(part)}')
                + self._event("response.output_item.done", f'"item":{compact_json(item)},"output_index":{index}'))

    # -- call items (a forced call) ------------------------------------------------------------
    def call_events(self, text: str, new_output: bool, last_status: str | None) -> bytes:
        """The events of one engine output of a forced call; `last_status` closes the output."""
        out = []
        deltas = self.call_deltas.delta(0, text) if new_output else None
        groups: dict[int, list[dict]] = {}
        for delta in deltas or ():
            groups.setdefault(delta["index"], []).append(delta)
        for index, group in groups.items():
            if self.call is None or self.call.index != index:
                if self.call is not None:
                    out.append(self._close_call("completed"))
                if self.reasoning_id is not None:  # the reasoning item ends where the first call begins
                    out.append(self._close_reasoning("completed"))
                out.append(self._open_call(index, group[0]))
            arguments = "".join(d["function"]["arguments"] or "" for d in group)
            if arguments:
                out.append(self._call_delta(arguments))
        if last_status is not None and self.call is not None:
            out.append(self._close_call(last_status))
        return b"".join(out)

    def _open_call(self, index: int, delta: dict) -> bytes:
        name, namespace = self.calls.split_name(delta["function"]["name"])
        custom = self.calls.is_custom(name)
        call = self.call = _OpenCall(index, call_item_id(custom), delta.get("id") or tool_call_id(), name,
                                     namespace, custom, len(self.output))
        item = (custom_tool_call_item(call.item_id, call.call_id, name, "") if custom else
                function_call_item(call.item_id, call.call_id, name, namespace, "", "in_progress"))
        return self._event("response.output_item.added",
                           f'"item":{compact_json(item)},"output_index":{call.output_index}')

    def _where(self) -> str:
        return f'"item_id":"{self.call.item_id}","output_index":{self.call.output_index}'

    def _call_delta(self, arguments: str) -> bytes:
        call = self.call
        call.arguments += arguments
        if call.custom:
            return self._custom_delta(custom_input_prefix(call.arguments))
        return self._event("response.function_call_arguments.delta",
                           f'"delta":{compact_json(arguments)},{self._where()}')

    def _custom_delta(self, payload: str) -> bytes:
        """A custom tool's input as decoded so far: what it adds (all of it again when it is not an
        extension of what was sent, which cannot be taken back)."""
        call = self.call
        if payload == call.payload:
            return b""
        delta = payload[len(call.payload):] if payload.startswith(call.payload) else payload
        call.payload = payload
        return self._event("response.custom_tool_call_input.delta", f'"delta":{compact_json(delta)},{self._where()}')

    def _close_call(self, status: str) -> bytes:
        call = self.call
        if call.custom:
            payload = decode_custom_input(call.arguments)
            out = [self._custom_delta(payload),
                   self._event("response.custom_tool_call_input.done",
                               f'"input":{compact_json(payload)},{self._where()}')]
            item = custom_tool_call_item(call.item_id, call.call_id, call.name, payload)
        else:
            out = [self._event("response.function_call_arguments.done",
                               f'"arguments":{compact_json(call.arguments)},{self._where()}',
                               extra=f',"name":{compact_json(call.name)}')]
            item = function_call_item(call.item_id, call.call_id, call.name, call.namespace, call.arguments, status)
        out.append(self._event("response.output_item.done",
                               f'"item":{compact_json(item)},"output_index":{call.output_index}'))
        self.output.append(item)
        self.call = None
        return b"".join(out)
