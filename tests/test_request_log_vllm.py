"""The SamplingParams repr of --enable-log-requests' "Received request" lines against vLLM 0.33's own (the CPU
venv, run as a subprocess; skipped without it): for chat, completion and Responses bodies, the string vLLM's
SamplingParams.__repr__ gives for the params its route builds equals the emulator's."""
from __future__ import annotations

from pathlib import Path

import pytest

from server.protocol import ChatCompletionRequest, CompletionRequest
from server.request_log import sampling_params_repr
from server.responses_protocol import ResponsesRequest
from server.sampling_params import from_responses
from server.serving import logged_params
from vllm_venv import run_vllm_side, vllm_python_or_skip

VLLM_SIDE = Path(__file__).resolve().parent / "request_log_vllm_side.py"
MODEL = "meta-llama/Llama-3.1-8B"
CHAT = [{"role": "user", "content": "hi"}]

CASES = [
    ("completion", {"model": MODEL, "prompt": "hello"}, 16),
    ("completion", {"model": MODEL, "prompt": [1, 2, 3], "n": 3, "temperature": 0.7, "top_p": 0.9, "top_k": 40,
                    "seed": 5, "stop": "\n", "stop_token_ids": [7, 7, 9], "logprobs": 2, "ignore_eos": True,
                    "min_tokens": 2, "presence_penalty": 0.5, "repetition_penalty": 1.1}, 32),
    ("completion", {"model": MODEL, "prompt": "x", "echo": True, "max_tokens": 0}, 0),
    ("completion", {"model": MODEL, "prompt": "x", "temperature": 0.0, "bad_words": ["no"],
                    "include_stop_str_in_output": True, "skip_special_tokens": False,
                    "vllm_xargs": {"a": 1}}, 8),
    ("chat", {"model": MODEL, "messages": CHAT}, 100),
    ("chat", {"model": MODEL, "messages": CHAT, "logprobs": True, "top_logprobs": 3, "max_tokens": 9,
              "temperature": 0.001, "stop": ["a", "b"], "structured_outputs": {"choice": ["yes", "no"]}}, 9),
    ("chat", {"model": MODEL, "messages": CHAT, "response_format": {"type": "json_object"}, "min_p": 0.1,
              "frequency_penalty": 1.0, "kv_transfer_params": {"do_remote_decode": True}}, 50),
    ("chat", {"model": MODEL, "messages": CHAT, "thinking_token_budget": 10, "spaces_between_special_tokens": False},
     20),
    ("responses", {"model": MODEL, "input": "hi"}, 64),
    ("responses", {"model": MODEL, "input": "hi", "temperature": 0.3, "top_p": 0.5, "max_output_tokens": 12,
                   "text": {"format": {"type": "json_object"}}}, 12),
]

pytestmark = pytest.mark.vllm


def ours(kind: str, body: dict, max_tokens: int) -> str:
    if kind == "responses":
        return sampling_params_repr(from_responses(ResponsesRequest.model_validate(body), max_tokens))
    model = ChatCompletionRequest if kind == "chat" else CompletionRequest
    return sampling_params_repr(logged_params(model.model_validate(body), max_tokens, None))


def test_received_request_params_equal_vllms_repr():
    python = vllm_python_or_skip()
    theirs = run_vllm_side(python, VLLM_SIDE, {"cases": CASES})["reprs"]
    for case, expected in zip(CASES, theirs):
        assert ours(*case) == expected, case
