"""vLLM's side of test_request_log_vllm.py, run with the CPU venv's python (it imports vLLM 0.33).

Reads one JSON job on stdin, {"cases": [[kind, body, max_tokens], ...]} with kind "chat", "completion" or
"responses", and prints one JSON answer: {"reprs": [...]}, the repr of the SamplingParams vLLM's route builds
from each request body (its to_sampling_params, no generation-config defaults), as its RequestLogger logs it.
"""
from __future__ import annotations

import json
import sys


def sampling_params_repr(kind: str, body: dict, max_tokens: int) -> str:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest

    request = {"chat": ChatCompletionRequest, "completion": CompletionRequest,
               "responses": ResponsesRequest}[kind].model_validate(body)
    return repr(request.to_sampling_params(max_tokens, {}))


def main() -> None:
    job = json.load(sys.stdin)
    print(json.dumps({"reprs": [sampling_params_repr(*case) for case in job["cases"]]}))


if __name__ == "__main__":
    main()
