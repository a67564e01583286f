"""vLLM's side of test_sampling_defaults_s9.py, run with the CPU venv's python (it imports vLLM 0.33).

Reads one JSON job on stdin and prints one JSON answer, each list in the job's order:

- "reprs": for each of "cases" ([kind, body, max_tokens, defaults]), the repr of the SamplingParams vLLM's route
  builds from the body with those server defaults (its to_sampling_params);
- "echoes": for each "responses" case, the temperature, top_p and penalties its Responses object echoes
  (ResponsesResponse.from_request with those SamplingParams), else null;
- "diffs": for each of "configs" ([generation_config, model, override]), ModelConfig.get_diff_sampling_param
  (the model and a --generation-config folder read as vLLM reads them).
"""
from __future__ import annotations

import json
import sys
from types import SimpleNamespace


def built(kind: str, body: dict, max_tokens: int, defaults: dict):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest

    request = {"chat": ChatCompletionRequest, "completion": CompletionRequest,
               "responses": ResponsesRequest}[kind].model_validate(body)
    return request, request.to_sampling_params(max_tokens, defaults)


def echo(request, params) -> dict:
    from vllm.entrypoints.openai.responses.protocol import ResponsesResponse

    response = ResponsesResponse.from_request(request, params, model_name="m", created_time=0, output=[],
                                              status="completed")
    return {name: getattr(response, name) for name in ("temperature", "top_p", "presence_penalty",
                                                       "frequency_penalty")}


def diff(generation_config: str, model: str, override: dict) -> dict:
    from vllm.config.model import ModelConfig
    from vllm.transformers_utils.config import try_get_generation_config

    def generation_config_dict() -> dict:  # ModelConfig.try_get_generation_config's lookup, without its fields
        config = try_get_generation_config(model if generation_config in ("auto", "vllm") else generation_config,
                                           trust_remote_code=False)
        return {} if config is None else config.to_diff_dict()

    config = SimpleNamespace(generation_config=generation_config, override_generation_config=override,
                             try_get_generation_config=generation_config_dict)
    return ModelConfig.get_diff_sampling_param(config)


def main() -> None:
    job = json.load(sys.stdin)
    reprs, echoes = [], []
    for kind, body, max_tokens, defaults in job.get("cases", []):
        request, params = built(kind, body, max_tokens, defaults)
        reprs.append(repr(params))
        echoes.append(echo(request, params) if kind == "responses" else None)
    diffs = [diff(*config) for config in job.get("configs", [])]
    print(json.dumps({"reprs": reprs, "echoes": echoes, "diffs": diffs}))


if __name__ == "__main__":
    main()
