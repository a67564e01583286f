"""The output of a Responses request: its message item, and the stream of events that builds it.

As vLLM 0.33 writes them (`responses/serving.py`, `streaming_events.py`, no reasoning or tool
parser): the output is one assistant message item ("msg_" and 16 hex digits) holding one
`output_text` part, or no part when the text is empty; its status is "incomplete" when the output
was cut by max_output_tokens, else "completed". A stream is SSE with an `event:` line per event,
every event numbered by `sequence_number` from 0: `response.created` and `response.in_progress`
(the response in progress, no output yet), then at the first text `response.output_item.added` and
`response.content_part.added`, one `response.output_text.delta` per engine output with text,
`response.output_text.done`, `response.content_part.done` and `response.output_item.done`, and last
`response.completed` (`response.incomplete` when cut short) with the whole response. No `[DONE]`.
An output without text streams no item at all, and the final response then has none.
"""
from __future__ import annotations

import json
import uuid
from collections.abc import Callable

from server.completions import json_string
from server.jobs import Choice, ChunkFormat, Job
from server.logprobs import LogprobSource


def _js(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def item_status(finish_reason: str | None) -> str:
    """vLLM's response_item_status."""
    return "incomplete" if finish_reason == "length" else "completed"


def message_id() -> str:
    return f"msg_{uuid.uuid4().int & (2**64 - 1):016x}"


def output_text(text: str, logprobs: list[dict] | None) -> dict:
    return {"annotations": [], "text": text, "type": "output_text", "logprobs": logprobs}


def message_item(item_id: str, text: str, logprobs: list[dict] | None, status: str) -> dict:
    """An assistant message item (the SDK's ResponseOutputMessage, in its key order)."""
    return {"id": item_id, "content": [output_text(text, logprobs)] if text else [], "role": "assistant",
            "status": status, "type": "message", "phase": None}


def response_logprobs(source: LogprobSource, token_ids: list[int], pieces: list[str], first_position: int,
                      k: int) -> list[dict]:
    """The output_text part's logprobs (the SDK's Logprob: token, bytes, logprob, top_logprobs)."""
    return [{"token": entry["token"], "bytes": entry["bytes"], "logprob": entry["logprob"],
             "top_logprobs": [{"token": t["token"], "bytes": t["bytes"], "logprob": t["logprob"]}
                              for t in entry["top_logprobs"]]}
            for entry in source.chat(token_ids, pieces, first_position, k)["content"]]


def event(kind: str, body: str, sequence_number: int, after: str = "") -> bytes:
    """One SSE event; `body` is its JSON object's fields before sequence_number, `after` those between
    sequence_number and type (the SDK's models order their fields by name)."""
    return f'event: {kind}\ndata: {{{body},"sequence_number":{sequence_number},{after}"type":"{kind}"}}\n\n'.encode()


class ResponseStream(ChunkFormat):
    """The stream events of one Responses request (see server/jobs.py).

    `finish(job, output)` builds the final response object from the finished job and the output
    items the stream sent; it is kept in `final` once the terminal event is written. A request the
    engine fails ends with vLLM's error body as its last event (vLLM 0.33 means to send it, but
    its own event validation rejects it and the connection drops)."""

    def __init__(self, in_progress: dict, finish: Callable[[Job, list[dict]], dict],
                 logprobs: LogprobSource | None, top_logprobs: int) -> None:
        self.in_progress = in_progress
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

    def _event(self, kind: str, body: str, after: str = "") -> bytes:
        data = event(kind, body, self.sequence_number, after)
        self.sequence_number += 1
        return data

    def opening(self) -> bytes:
        """response.created and response.in_progress: sent as the stream opens."""
        body = '"response":' + _js(self.in_progress)
        return self._event("response.created", body) + self._event("response.in_progress", body)

    def first_output(self, job: Job) -> bytes:
        return b""

    def tokens(self, job: Job, choice: Choice, end: int, last: bool) -> bytes:
        start, plan = choice.num_sent, choice.plan
        text = "".join(plan.pieces[start:end])
        out = []
        if text:
            if self.item_id is None:
                out.append(self._open())
            out.append(self._delta(job, choice, start, end, text))
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
        return self._event(kind, '"response":' + _js(self.final))

    # -- the message item -------------------------------------------------------------------
    def _open(self) -> bytes:
        self.item_id = message_id()
        item = _js(message_item(self.item_id, "", None, "in_progress"))
        self._delta_head = b'{"content_index":0,"delta":'
        self._delta_tail = f',"item_id":"{self.item_id}","logprobs":'.encode()
        return (self._event("response.output_item.added", f'"item":{item},"output_index":0')
                + self._event("response.content_part.added",
                              f'"content_index":0,"item_id":"{self.item_id}","output_index":0,'
                              f'"part":{_js(output_text("", []))}'))

    def _delta(self, job: Job, choice: Choice, start: int, end: int, text: str) -> bytes:
        self.text.append(text)
        stream_logprobs = b"[]"
        if self.logprobs is not None:
            entries = response_logprobs(self.logprobs, choice.plan.token_ids[start:end].tolist(),
                                        choice.plan.pieces[start:end], len(job.prompts[0]) + start,
                                        self.top_logprobs)
            self.text_logprobs.extend(entries)
            # a delta's logprobs carry no bytes (the SDK's ResponseTextDeltaEvent.Logprob)
            stream_logprobs = _js([{"token": e["token"], "logprob": e["logprob"],
                                    "top_logprobs": [{"token": t["token"], "logprob": t["logprob"]}
                                                     for t in e["top_logprobs"]]} for e in entries]).encode()
        body = (self._delta_head + json_string(text) + self._delta_tail + stream_logprobs
                + b',"output_index":0,"sequence_number":%d,"type":"response.output_text.delta"}' % self.sequence_number)
        self.sequence_number += 1
        return b"event: response.output_text.delta\ndata: " + body + b"\n\n"

    def _close(self, status: str) -> bytes:
        text = "".join(self.text)
        part = output_text(text, self.text_logprobs or None)
        item = message_item(self.item_id, text, self.text_logprobs or None, status)
        self.output.append(item)
        where = f'"content_index":0,"item_id":"{self.item_id}"'
        return (self._event("response.output_text.done", f'{where},"logprobs":[],"output_index":0',
                            f'"text":{_js(text)},')
                + self._event("response.content_part.done", f'{where},"output_index":0,"part":{_js(part)}')
                + self._event("response.output_item.done", f'"item":{_js(item)},"output_index":0'))
