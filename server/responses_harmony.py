"""The Responses API's output for a gpt-oss model, as vLLM 0.33's HarmonyContext builds it
(`entrypoints/openai/responses/harmony.py` harmony_to_response_output, `streaming_events.py`).

Every message the Harmony parser completes (server/harmony.py) is an output item: an analysis message a
`reasoning` item (its text as one reasoning_text part, no summary), a final message (or commentary to nobody)
a `message` item, a call to `functions.NAME` a `function_call` item (its arguments as written; id "fc_" and
call_id "call_" with the same 16 hex digits). The last item is "incomplete" when the output ended inside it
(max_tokens), as vLLM marks the message its parser's flush completed.
"""
from __future__ import annotations

from server.harmony import Message, Parsed
from server.protocol import random_uuid
from server.responses_stream import output_text, reasoning_item
from server.responses_tools import ForcedCalls, function_call_item

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
