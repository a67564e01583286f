"""vLLM's side of test_server_render_generate.py's parity test, run with the CPU venv's python (vLLM 0.33).

Reads one JSON job on stdin and prints one JSON answer, each list in the job's order:

- "render": for each request the emulator rendered, the sampling parameters vLLM's own request class
  makes of the same body (`to_sampling_params` with the emulator's max_tokens, after the case's
  "tool_parser" adjusted the request, transfer params moved out as vLLM's render moves them), and the
  emulator's GenerateRequest as vLLM's GenerateRequest reads it back;
- "generate", "stream", "derender", "derender_stream", "batch": the emulator's answers validated by vLLM's
  response classes and dumped as vLLM's routes dump them (a stream chunk without its null
  prompt_token_ids/mm_placeholders/metrics, the usage chunk without any null);
- "errors": [status, body] of vLLM's own routers (with its exception handlers, no model behind them)
  for bodies that fail validation.
"""
from __future__ import annotations

import json
import sys
from argparse import Namespace

from fastapi import FastAPI
from fastapi.testclient import TestClient
from vllm.entrypoints.anthropic.protocol import AnthropicMessagesRequest
from vllm.entrypoints.anthropic.serving import AnthropicServingMessages
from vllm.entrypoints.openai.chat_completion.api_router import router as chat_router
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest, ChatCompletionResponse
from vllm.entrypoints.openai.completion.protocol import CompletionRequest, CompletionResponse
from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
from vllm.entrypoints.scale_out.derender.api_router import router as derender_router
from vllm.entrypoints.scale_out.render.api_router import router as render_router
from vllm.entrypoints.scale_out.render.serving import _hoist_transfer_params
from vllm.entrypoints.scale_out.token_in_token_out.api_router import router as generate_router
from vllm.entrypoints.scale_out.token_in_token_out.protocol import (DerenderChatStreamResponse,
                                                                    DerenderCompletionStreamResponse,
                                                                    GenerateDerenderResponse, GenerateRequest,
                                                                    GenerateTextResponse, GenerateTextStreamResponse,
                                                                    GenerateTokensResponse,
                                                                    GenerateTokensStreamResponse)
from vllm.entrypoints.serve.exception_handling.register import init_exception_handler

from request_log_vllm_side import adjust_for_tool_parser

REQUESTS = {"/v1/chat/completions/render": ChatCompletionRequest, "/v1/completions/render": CompletionRequest,
            "/v1/responses/render": ResponsesRequest}
RESPONSES = {"tokens": GenerateTokensResponse, "text": GenerateTextResponse, "derender": GenerateDerenderResponse}
CHUNKS = {"tokens": GenerateTokensStreamResponse, "text": GenerateTextStreamResponse}


def plain(value):
    """JSON's view of a dump (int keys as strings, enums as values)."""
    return json.loads(json.dumps(value, default=lambda v: getattr(v, "value", str(v))))


def render(case: dict) -> dict:
    if case["path"] == "/v1/messages/render":  # rendered as the chat request vLLM makes of it
        request = AnthropicServingMessages.to_chat_completion_request(
            AnthropicMessagesRequest.model_validate(case["body"]))
    else:
        request = REQUESTS[case["path"]].model_validate(case["body"])
    if case.get("tool_parser"):  # the server's tool parser adjusts the request as vLLM's renderer runs it
        request = adjust_for_tool_parser(request, case["tool_parser"])
    max_tokens = case["ours"]["sampling_params"].get("max_tokens", 16)
    params = request.to_sampling_params(max_tokens, {})
    _hoist_transfer_params(params)
    dumped = GenerateRequest(token_ids=[1], sampling_params=params).model_dump()["sampling_params"]
    return {"sampling_params": plain(dumped),
            "validated": plain(GenerateRequest.model_validate(case["ours"]).model_dump())}


def chunk(mode: str, event: dict) -> dict:
    parsed = CHUNKS[mode].model_validate(event)
    if not parsed.choices:
        return plain(json.loads(parsed.model_dump_json(exclude_none=True)))
    exclude = {n for n in ("prompt_token_ids", "mm_placeholders", "metrics") if getattr(parsed, n) is None}
    return plain(json.loads(parsed.model_dump_json(exclude=exclude)))


def errors_app() -> TestClient:
    app = FastAPI()
    app.state.args = Namespace(log_error_stack=False, tokens_only=False)
    init_exception_handler(app)
    for router in (generate_router, render_router, derender_router, chat_router):
        app.include_router(router)
    app.state.serving_tokens = None
    app.state.openai_serving_chat_batch = None
    return TestClient(app, raise_server_exceptions=False)


def error(client: TestClient, case: dict) -> list:
    r = client.post(case["path"], json=case["body"])
    return [r.status_code, r.json()]


def main() -> None:
    job = json.load(sys.stdin)
    client = errors_app()
    answer = {
        "render": [render(case) for case in job.get("render", [])],
        "generate": [plain(RESPONSES[a["output_mode"]].model_validate(a).model_dump())
                     for a in job.get("generate", [])],
        "stream": [[chunk(case["mode"], e) for e in case["events"]] for case in job.get("stream", [])],
        "derender": [plain((ChatCompletionResponse if case["kind"] == "chat" else CompletionResponse)
                           .model_validate(case["answer"]).model_dump()) for case in job.get("derender", [])],
        "derender_stream": [plain((DerenderChatStreamResponse if case["kind"] == "chat"
                                   else DerenderCompletionStreamResponse).model_validate(case["answer"]).model_dump())
                            for case in job.get("derender_stream", [])],
        "batch": [plain(ChatCompletionResponse.model_validate(a).model_dump()) for a in job.get("batch", [])],
        "errors": [error(client, case) for case in job.get("errors", [])],
    }
    print(json.dumps(answer))


if __name__ == "__main__":
    main()
