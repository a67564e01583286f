"""The Responses API's output for a gpt-oss model, as vLLM 0.33's HarmonyContext builds it
(`entrypoints/openai/responses/harmony.py` harmony_to_response_output, `streaming_events.py`).

Every message the Harmony parser completes (server/harmony.py) is an output item: an analysis message a
`reasoning` item (its text as one reasoning_text part, no summary), a final message (or commentary to nobody)
a `message` item, a call to `functions.NAME` a `function_call` item (its arguments as written; id "fc_" and
call_id "call_" with the same 16 hex digits). The last item is "incomplete" when the output ended inside it
(max_tokens), as vLLM marks the message its parser's flush completed.
"""
from __future__ import annotations

from server.harmony import HarmonyChat, HarmonyReader, Message, Parsed, Segment
from server.jobs import Choice, Job
from server.protocol import random_uuid
from server.responses_stream import ResponseStream, output_text, reasoning_item
from server.responses_tools import ForcedCalls, function_call_item
from server.sse import compact_json

_BUILTIN = ("python", "browser", "container")  # harmony_utils.BUILTIN_TOOL_TO_MCP_SERVER_LABEL


def is_function_recipient(recipient: str) -> bool:
    """harmony_utils.is_function_recipient for the Responses API: "functions.NAME" (the simulated model
    writes no bare names)."""
    return recipient.startswith("functions.") and len(recipient) > len("functions.")


def message_items(message: Message, incomplete: bool, calls: ForcedCalls | None = None,
                  item_id: str | None = None) -> list[dict]:
    """harmony_to_response_output of one completed message."""
    status = "incomplete" if incomplete else "completed"
    recipient = message.recipient
    if recipient is not None:
        if is_function_recipient(recipient):
            name = recipient.removeprefix("functions.")
            suffix = item_id.removeprefix("fc_") if item_id else random_uuid()
            split = calls.split_name(name) if calls is not None else (name, None)
            return [function_call_item(f"fc_{suffix}", f"call_{suffix}", *split, message.text, status)]
        if recipient in _BUILTIN:
            return [reasoning_item(message.text, item_id)]
        return []  # (an MCP call: the simulated model makes none)
    if message.channel == "analysis":
        return [reasoning_item(message.text, item_id)]
    if message.channel in ("commentary", "final"):
        return [{"id": item_id or f"msg_{random_uuid()}", "content": [output_text(message.text, None)],
                 "role": "assistant", "status": status, "type": "message", "phase": None}]
    return []


def harmony_items(parsed: Parsed, calls: ForcedCalls | None = None) -> list[dict]:
    """The output items of a whole output."""
    items = []
    last = len(parsed.messages) - 1
    for i, message in enumerate(parsed.messages):
        items.extend(message_items(message, i == last and parsed.flushed, calls))
    return items


def reuse_ids(items: list[dict], streamed: list[dict]) -> list[dict]:
    """vLLM's reuse_streamed_item_ids: the final items take the ids the stream gave them (a call its call_id too),
    paired by type in order."""
    remaining = list(streamed)
    for item in items:
        for i, sent in enumerate(remaining):
            if sent["type"] != item["type"]:
                continue
            item["id"] = sent["id"]
            if item["type"] == "function_call":
                item["call_id"] = sent["call_id"]
            del remaining[i]
            break
    return items


class HarmonyResponseStream(ResponseStream):
    """The events of a gpt-oss model's Responses stream, as vLLM's _process_harmony_streaming_events writes
    them from its parser's segments: an item opens at its message's first content (`response.output_item.added`,
    and for text and reasoning `response.content_part.added`), each output adds its delta event, and the message's
    end closes it (the done events, the item "completed"); the next item takes the next output_index. The final
    response holds the items of the whole output (statuses as harmony_items), with the ids the stream gave them."""

    def __init__(self, harmony: HarmonyChat, in_progress, finish, calls: ForcedCalls | None = None) -> None:
        super().__init__(in_progress, finish, None, 0, calls)
        self.reader = HarmonyReader(harmony.tokens)
        self.index = 0          # vLLM's StreamingState.current_output_index
        self.open_kind: str | None = None  # "message", "reasoning" or "function_call": the item open
        self.open_id = ""
        self.open_call_id = ""

    def tokens(self, job: Job, choice: Choice, end: int, last: bool) -> bytes:
        start, plan = choice.num_sent, choice.plan
        segments = self.reader.feed(plan.token_ids[start:end].tolist(), plan.pieces[start:end])
        if last:
            segments += self.reader.finish()
        out = []
        for segment in segments:
            if segment.delta:
                out.append(self._content_delta(segment))
            elif segment.completed is not None:
                out.append(self._done(segment.completed))
                self.index += 1
                self.open_kind = None
        return b"".join(out)

    def _content_delta(self, segment: Segment) -> bytes:
        """emit_content_delta_events."""
        channel, recipient, delta = segment.channel, segment.recipient, segment.delta
        where = f'"item_id":"{self.open_id}","output_index":{self.index}'
        if recipient is None and channel in ("final", "commentary"):
            out = b""
            if self.open_kind is None:
                self.open_kind, self.open_id = "message", f"msg_{random_uuid()}"
                where = f'"item_id":"{self.open_id}","output_index":{self.index}'
                item = {"id": self.open_id, "content": [], "role": "assistant", "status": "in_progress",
                        "type": "message", "phase": None}
                out = (self._added(item)
                       + self._event("response.content_part.added",
                                     f'"content_index":0,{where},"part":{compact_json(output_text("", []))}'))
            return out + self._event("response.output_text.delta", f'"content_index":0,"delta":{compact_json(delta)},'
                                     f'"item_id":"{self.open_id}","logprobs":[],"output_index":{self.index}')
        if recipient is None and channel == "analysis":
            out = b""
            if self.open_kind is None:
                self.open_kind, self.open_id = "reasoning", f"rs_{random_uuid()}"
                where = f'"item_id":"{self.open_id}","output_index":{self.index}'
                item = reasoning_item(None, self.open_id, "in_progress")
                out = (self._added(item)
                       + self._event("response.content_part.added",
                                     f'"content_index":0,{where},"part":{{"text":"","type":"reasoning_text"}}'))
            return out + self._event("response.reasoning_text.delta",
                                     f'"content_index":0,"delta":{compact_json(delta)},{where}')
        if recipient is not None and is_function_recipient(recipient):
            out = b""
            if self.open_kind is None:  # (vLLM draws the item's and the call's ids apart)
                self.open_kind, self.open_id = "function_call", f"fc_{random_uuid()}"
                self.open_call_id = f"call_{random_uuid()}"
                where = f'"item_id":"{self.open_id}","output_index":{self.index}'
                item = function_call_item(self.open_id, self.open_call_id, recipient.removeprefix("functions."),
                                          None, "", "in_progress")
                out = self._added(item)
            return out + self._event("response.function_call_arguments.delta", f'"delta":{compact_json(delta)},{where}')
        return b""

    def _added(self, item: dict) -> bytes:
        return self._event("response.output_item.added", f'"item":{compact_json(item)},"output_index":{self.index}')

    def _done(self, message: Message) -> bytes:
        """emit_previous_item_done_events: nothing for a message that opened no item."""
        kind, text = self.open_kind, message.text
        where = f'"content_index":0,"item_id":"{self.open_id}","output_index":{self.index}'
        if kind is None:
            return b""
        if message.recipient is not None:
            if kind != "function_call" or not is_function_recipient(message.recipient):
                return b""
            name = message.recipient.removeprefix("functions.")
            item = function_call_item(self.open_id, self.open_call_id, name, None, text, "completed")
            self.output.append(item)
            # (vLLM builds this item with the event's output_index and sequence_number as extra fields)
            done = compact_json({**item, "output_index": self.index, "sequence_number": -1})
            return (self._event("response.function_call_arguments.done",
                                f'"arguments":{compact_json(text)},"item_id":"{self.open_id}",'
                                f'"output_index":{self.index}', extra=f',"name":{compact_json(name)}')
                    + self._event("response.output_item.done", f'"item":{done},"output_index":{self.index}'))
        if message.channel == "analysis":
            item = reasoning_item(text, self.open_id, "completed")
            self.output.append(item)
            return (self._event("response.reasoning_text.done", where, f'"text":{compact_json(text)},')
                    + self._event("response.content_part.done", f'{where},"part":{compact_json(item["content"][0])}')
                    + self._event("response.output_item.done",
                                  f'"item":{compact_json(item)},"output_index":{self.index}'))
        if message.channel in ("commentary", "final"):
            part = output_text(text, None)
            item = {"id": self.open_id, "content": [part], "role": "assistant", "status": "completed",
                    "type": "message", "phase": None}
            self.output.append(item)
            return (self._event("response.output_text.done", f'"content_index":0,"item_id":"{self.open_id}",'
                                f'"logprobs":[],"output_index":{self.index}', f'"text":{compact_json(text)},')
                    + self._event("response.content_part.done", f'{where},"part":{compact_json(part)}')
                    + self._event("response.output_item.done",
                                  f'"item":{compact_json(item)},"output_index":{self.index}'))
        return b""
