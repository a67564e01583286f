"""The server's default sampling parameters (vLLM's get_diff_sampling_param): the model's generation config
(Qwen3's temperature 0.6, top_k 20, top_p 0.95) fills what a chat, completion or Responses request leaves out,
and the Responses object echoes the temperature and top_p sampled with. Compared with vLLM 0.33's own
to_sampling_params, ResponsesResponse.from_request and get_diff_sampling_param where its CPU venv is found."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.generation_config import (default_sampling_params, model_generation_config, override_max_tokens,
                                      overridden_warning)
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.request_log import sampling_params_repr
from server.responses_protocol import ResponsesRequest
from server.sampling_params import from_chat, from_completion, from_responses
from vllm_venv import run_vllm_side, vllm_python_or_skip

VLLM_SIDE = Path(__file__).resolve().parent / "sampling_defaults_vllm_side_s9.py"
QWEN3 = {"temperature": 0.6, "top_k": 20, "top_p": 0.95}
RICH = {"repetition_penalty": 1.05, "presence_penalty": 0.5, "frequency_penalty": 0.25, "temperature": 0.0,
        "top_k": 5, "top_p": 0.8, "min_p": 0.05, "skip_special_tokens": False}
CHAT = [{"role": "user", "content": "hi"}]

CASES = [
    ("chat", {"model": "m", "messages": CHAT}, 100, QWEN3),
    ("chat", {"model": "m", "messages": CHAT, "temperature": 0.2, "top_k": 3}, 100, QWEN3),
    ("chat", {"model": "m", "messages": CHAT}, 10, RICH),
    ("chat", {"model": "m", "messages": CHAT, "skip_special_tokens": True, "temperature": 1.0}, 10, RICH),
    ("completion", {"model": "m", "prompt": "hello"}, 16, QWEN3),
    ("completion", {"model": "m", "prompt": "hello", "top_p": 0.5, "min_p": 0.1}, 16, RICH),
    ("completion", {"model": "m", "prompt": "hello"}, 16, {}),
    ("responses", {"model": "m", "input": "hi"}, 64, QWEN3),
    ("responses", {"model": "m", "input": "hi", "temperature": 0.3}, 64, QWEN3),
    ("responses", {"model": "m", "input": "hi", "top_p": 0.5, "presence_penalty": 1.0}, 64, RICH),
    ("responses", {"model": "m", "input": "hi", "temperature": 0.5}, 64, RICH),
    ("responses", {"model": "m", "input": "hi"}, 64, {}),
]


def ours(kind: str, body: dict, max_tokens: int, defaults: dict):
    if kind == "responses":
        return from_responses(ResponsesRequest.model_validate(body), max_tokens, defaults)
    if kind == "chat":
        return from_chat(ChatCompletionRequest.model_validate(body), max_tokens, defaults=defaults)
    return from_completion(CompletionRequest.model_validate(body), max_tokens, defaults)


def test_qwen3_requests_that_leave_sampling_out_take_its_generation_config():
    defaults = default_sampling_params("Qwen/Qwen3-30B-A3B")
    assert defaults == QWEN3
    for kind, body, max_tokens, _ in CASES[:1] + CASES[4:5] + CASES[7:8]:
        params = ours(kind, body, max_tokens, defaults)
        assert (params.temperature, params.top_p, params.top_k) == (0.6, 0.95, 20)
        written = params.to_json()  # what /render writes
        assert (written["temperature"], written["top_p"], written["top_k"]) == (0.6, 0.95, 20)
    # the request's own value wins; without defaults, the OpenAI ones
    assert ours(*CASES[1]).temperature == 0.2 and ours(*CASES[1]).top_k == 3 and ours(*CASES[1]).top_p == 0.95
    assert (ours(*CASES[6]).temperature, ours(*CASES[6]).top_p, ours(*CASES[6]).top_k) == (1.0, 1.0, 0)


def test_the_responses_object_echoes_the_defaults_it_sampled_with():
    plain = ResponsesRequest.model_validate({"input": "hi"})
    assert plain.echoed_sampling(QWEN3) == {"temperature": 0.6, "top_p": 0.95, "presence_penalty": 0.0,
                                            "frequency_penalty": 0.0}
    assert plain.echoed_sampling() == {"temperature": 1.0, "top_p": 1.0, "presence_penalty": 0.0,
                                       "frequency_penalty": 0.0}
    # greedy by default (a generation config's temperature 0): top_p echoed as 1, as SamplingParams resets it
    assert plain.echoed_sampling(RICH) == {"temperature": 0.0, "top_p": 1.0, "presence_penalty": 0.5,
                                           "frequency_penalty": 0.25}
    own = ResponsesRequest.model_validate({"input": "hi", "temperature": 0.005, "frequency_penalty": 0.0})
    assert own.echoed_sampling(RICH) == {"temperature": 0.01, "top_p": 0.8, "presence_penalty": 0.5,
                                         "frequency_penalty": 0.0}


def test_each_shipped_family_has_its_hubs_defaults():
    assert default_sampling_params("Qwen/Qwen3-32B") == QWEN3
    assert default_sampling_params("Qwen3-30B-A3B") == QWEN3  # a bare name resolves to the shipped model
    assert default_sampling_params("Qwen/Qwen3-30B-A3B-Instruct-2507") == {"temperature": 0.7, "top_k": 20,
                                                                            "top_p": 0.8}
    assert default_sampling_params("meta-llama/Llama-3.1-8B-Instruct") == {"temperature": 0.6, "top_p": 0.9}
    assert default_sampling_params("openai/gpt-oss-120b") == {}
    assert default_sampling_params("someone/unknown-model") == {}


def test_generation_config_modes_and_override(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "temperature": 0.3}))
    assert model_generation_config(str(folder)) == {}  # a config.json's sampling fields are not read
    (folder / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "min_p": None, "max_new_tokens": 100}))
    assert default_sampling_params(str(folder)) == {"temperature": 0.6, "top_p": 0.9, "max_tokens": 100}
    assert default_sampling_params("Qwen/Qwen3-32B", str(folder)) == {"temperature": 0.6, "top_p": 0.9,
                                                                      "max_tokens": 100}
    assert default_sampling_params("Qwen/Qwen3-32B", "vllm") == {}
    assert default_sampling_params("Qwen/Qwen3-32B", "vllm", {"top_k": 5}) == {"top_k": 5}
    assert default_sampling_params("Qwen/Qwen3-32B", "auto", {"temperature": 0.2, "top_p": None}) == {
        "temperature": 0.2, "top_k": 20}
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="Invalid repository ID or local directory"):
        default_sampling_params("Qwen/Qwen3-32B", str(empty))
    # a folder's max_new_tokens caps max_tokens; a model's own file never does, an override always
    assert override_max_tokens(str(folder), {"max_tokens": 100}) == 100
    assert override_max_tokens("auto", {"max_tokens": 100}) is None
    assert override_max_tokens("auto", {}, {"max_new_tokens": 7}) == 7
    assert overridden_warning(QWEN3, "auto") == (
        "Default vLLM sampling parameters have been overridden by the model's `generation_config.json`: "
        "`{'temperature': 0.6, 'top_k': 20, 'top_p': 0.95}`. If this is not intended, please relaunch vLLM "
        "instance with `--generation-config vllm`.")
    assert overridden_warning({"top_k": 5}, "vllm") is None and overridden_warning({}, "auto") is None


@pytest.mark.vllm
def test_the_same_as_vllms_own(tmp_path):
    python = vllm_python_or_skip()
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95, "min_p": None, "repetition_penalty": 1.0,
         "max_new_tokens": 100, "skip_special_tokens": False}))
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"model_type": "llama", "temperature": 0.3}))
    configs = [("auto", str(folder), {}), ("auto", str(folder), {"temperature": 0.2, "top_p": None}),
               ("vllm", str(folder), {"top_k": 5}), (str(folder), str(bare), {}), ("auto", str(bare), {}),
               ("auto", str(bare), {"max_new_tokens": 9})]
    theirs = run_vllm_side(python, VLLM_SIDE, {"cases": CASES, "configs": configs})
    assert [default_sampling_params(model, mode, override) for mode, model, override in configs] == theirs["diffs"]
    assert [sampling_params_repr(ours(*case)) for case in CASES] == theirs["reprs"]
    for case, echo in zip(CASES, theirs["echoes"]):
        if case[0] == "responses":
            assert ResponsesRequest.model_validate(case[1]).echoed_sampling(case[3]) == echo, case
