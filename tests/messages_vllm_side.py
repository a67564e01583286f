"""vLLM's side of test_server_messages.py's parity test, run with the CPU venv's python (it imports vLLM 0.33).

Reads one JSON job on stdin and prints one JSON answer, each list in the job's order:

- "schema": Anthropic bodies validated by vLLM's AnthropicMessagesRequest (or, with "count": true, its
  AnthropicCountTokensRequest): the pydantic errors (type, loc, msg) or null;
- "convert": Anthropic bodies turned into chat requests by vLLM's to_chat_completion_request
  (`effort`: the disabled-thinking effort), dumped as the chat endpoint would receive them;
- "full": chat responses (JSON) turned into messages by vLLM's messages_full_converter, dumped as
  its router dumps them (exclude_none);
- "stream": chat streams (SSE text) turned into Anthropic SSE by vLLM's message_stream_converter.
"""
from __future__ import annotations

import asyncio
import json
import sys

from pydantic import ValidationError
from vllm.entrypoints.anthropic.protocol import AnthropicCountTokensRequest, AnthropicMessagesRequest
from vllm.entrypoints.anthropic.serving import AnthropicServingMessages
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionResponse, ChatCompletionStreamResponse


def schema_errors(body: dict, count: bool) -> list | None:
    model = AnthropicCountTokensRequest if count else AnthropicMessagesRequest
    try:
        model.model_validate(body)
    except ValidationError as exc:
        return [{"type": e["type"], "loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]
    return None


def convert(body: dict, effort: str) -> dict:
    request = AnthropicMessagesRequest.model_validate(body)
    chat = AnthropicServingMessages.to_chat_completion_request(request, disabled_thinking_effort=effort)
    return chat.model_dump(mode="json", exclude_unset=True, by_alias=True)


def full(response: dict) -> dict:
    message = AnthropicServingMessages.messages_full_converter(None, ChatCompletionResponse.model_validate(response))
    return message.model_dump(mode="json", exclude_none=True)


async def stream(text: str) -> str:
    async def chunks():
        for event in text.split("\n\n"):
            if event.startswith("data: {"):
                yield ChatCompletionStreamResponse.model_validate_json(event[len("data: "):])

    return "".join([e async for e in AnthropicServingMessages.message_stream_converter(None, chunks())])


def main() -> None:
    job = json.load(sys.stdin)
    answer = {
        "schema": [schema_errors(case["body"], case.get("count", False)) for case in job.get("schema", [])],
        "convert": [convert(case["body"], case.get("effort", "none")) for case in job.get("convert", [])],
        "full": [full(response) for response in job.get("full", [])],
        "stream": [asyncio.run(stream(text)) for text in job.get("stream", [])],
    }
    print(json.dumps(answer))


if __name__ == "__main__":
    main()
