"""The model's generation config over HTTP (vLLM's get_diff_sampling_param in its serving classes): a request
that leaves a sampling field out is sampled with the served model's default (Llama-3.1-8B's Hub
generation_config.json: temperature 0.6, top_p 0.9), which /render writes, the Responses object echoes, the
greedy check sees, and --generation-config / --override-generation-config change; a generation config's
max_new_tokens is a request's default max_tokens and, from a folder or an override, its cap (vLLM's
get_max_tokens). Virtual time, in-process servers."""
from __future__ import annotations

import json
import logging

import aiohttp
import pytest

from server.errors import APIError
from server.generation import Sampling
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.serve import not_simulated
from server.testing import running_server, serve_args
from vllm_emulator.cli import main

FAST = ("--speed", "1000")
CHAT = [{"role": "user", "content": "hi"}]
WARNING = ("Default vLLM sampling parameters have been overridden by the model's `generation_config.json`: "
           "`{'temperature': 0.6, 'top_p': 0.9}`. If this is not intended, please relaunch vLLM instance with "
           "`--generation-config vllm`.")


async def _post(http, url: str, path: str, body: dict) -> tuple[int, dict]:
    async with http.post(url + path, json=body) as r:
        return r.status, await r.json()


async def _echoed(*argv: str, body: dict | None = None) -> tuple[float, float]:
    async with running_server(*FAST, *argv) as server, aiohttp.ClientSession() as http:
        status, answer = await _post(http, server.url, "/v1/responses",
                                     {"input": "hi", "max_output_tokens": 8, **(body or {})})
    assert status == 200, answer
    return answer["temperature"], answer["top_p"]


async def test_the_responses_object_echoes_the_models_defaults_and_the_flags_change_them():
    assert await _echoed() == (0.6, 0.9)  # Llama-3.1-8B's generation config
    assert await _echoed(body={"temperature": 0.2}) == (0.2, 0.9)  # the request's own wins, field by field
    assert await _echoed("--generation-config", "vllm") == (1.0, 1.0)
    assert await _echoed("--override-generation-config", '{"temperature": 0.3}') == (0.3, 0.9)
    assert await _echoed("--generation-config", "vllm", "--override-generation-config", '{"top_p": 0.5}') == (1.0, 0.5)


async def test_render_writes_the_sampling_params_with_the_defaults():
    async with running_server(*FAST, "--enable-scale-out") as server, aiohttp.ClientSession() as http:
        status, rendered = await _post(http, server.url, "/v1/completions/render", {"prompt": "hello"})
        assert status == 200, rendered
        params = rendered[0]["sampling_params"]
        assert (params["temperature"], params["top_p"]) == (0.6, 0.9)
        status, rendered = await _post(http, server.url, "/v1/chat/completions/render",
                                       {"messages": CHAT, "top_p": 0.5, "presence_penalty": 0.5})
        assert status == 200, rendered
        params = rendered["sampling_params"]
        assert (params["temperature"], params["top_p"], params["presence_penalty"]) == (0.6, 0.5, 0.5)
        status, rendered = await _post(http, server.url, "/v1/responses/render", {"input": "hi"})
        assert status == 200, rendered
        assert (rendered["sampling_params"]["temperature"], rendered["sampling_params"]["top_p"]) == (0.6, 0.9)


async def test_a_default_temperature_of_zero_is_greedy_sampling():
    async with running_server(*FAST, "--override-generation-config", '{"temperature": 0}') as server, \
            aiohttp.ClientSession() as http:
        body = {"messages": CHAT, "max_tokens": 200}
        texts = []
        for seed in (None, 1, 2):
            status, answer = await _post(http, server.url, "/v1/chat/completions", {**body, "seed": seed})
            assert status == 200, answer
            texts.append(answer["choices"][0]["message"]["content"])
        assert texts[0] == texts[1] == texts[2]  # greedy: the seed plays no part
        # vLLM refuses n > 1 under greedy sampling, the default's too; a request's own temperature lifts it
        status, answer = await _post(http, server.url, "/v1/chat/completions", {**body, "n": 2})
        assert status == 400 and answer["error"]["message"] == "n must be 1 when using greedy sampling, got 2."
        status, answer = await _post(http, server.url, "/v1/chat/completions", {**body, "n": 2, "temperature": 1})
        assert status == 200 and len(answer["choices"]) == 2
        status, answer = await _post(http, server.url, "/v1/responses", {"input": "hi", "max_output_tokens": 8})
        assert (answer["temperature"], answer["top_p"]) == (0.0, 1.0)  # greedy: top_p as SamplingParams resets it


async def test_max_new_tokens_is_the_default_max_tokens_and_a_cap(tmp_path):
    folder = tmp_path / "generation"
    folder.mkdir()
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.2, "max_new_tokens": 7}))
    async with running_server(*FAST, "--generation-config", str(folder)) as server, aiohttp.ClientSession() as http:
        for extra in ({}, {"max_tokens": 50}):  # a folder's max_new_tokens: the default, and the cap
            status, answer = await _post(http, server.url, "/v1/chat/completions",
                                         {"messages": CHAT, "ignore_eos": True, **extra})
            assert status == 200, answer
            assert answer["usage"]["completion_tokens"] == 7 and answer["choices"][0]["finish_reason"] == "length"
        status, answer = await _post(http, server.url, "/v1/responses", {"input": "hi", "ignore_eos": True})
        assert answer["usage"]["output_tokens"] == 7 and answer["temperature"] == 0.2
    # an override's max_new_tokens caps every request, the model's own config is still read
    async with running_server(*FAST, "--override-generation-config", '{"max_new_tokens": 5}') as server, \
            aiohttp.ClientSession() as http:
        status, answer = await _post(http, server.url, "/v1/completions",
                                     {"prompt": "hello", "max_tokens": 40, "ignore_eos": True})
        assert status == 200 and answer["usage"]["completion_tokens"] == 5
        status, answer = await _post(http, server.url, "/v1/responses", {"input": "hi", "max_output_tokens": 8})
        assert answer["temperature"] == 0.6


async def test_start_up_warns_as_vllm_and_lists_the_flags_as_simulated(caplog):
    caplog.set_level(logging.WARNING, "vllm.config.model")
    async with running_server(*FAST):
        pass
    assert [r.getMessage() for r in caplog.records if r.name == "vllm.config.model"] == [WARNING]
    caplog.clear()
    async with running_server(*FAST, "--generation-config", "vllm", "--override-generation-config", '{"top_k": 5}'):
        pass
    assert not [r for r in caplog.records if r.name == "vllm.config.model"]  # under "vllm": no warning
    args = serve_args("--generation-config", "vllm", "--override-generation-config", "{}", "--hf-token", "x")
    differing, unsupported = not_simulated(args)
    assert "--generation-config" not in differing + unsupported and unsupported == ["--hf-token"]


def test_a_generation_config_folder_vllm_refuses_stops_the_start(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["serve", "--port", "0", "--generation-config", str(empty)]) == 2
    assert f"Invalid repository ID or local directory specified: '{empty}'." in capsys.readouterr().err
    assert main(["serve", "--port", "0", "--override-generation-config", "{nope"]) == 2
    assert "argument --override-generation-config: invalid loads value: '{nope'" in capsys.readouterr().err


@pytest.mark.parametrize(("request_body", "defaults", "greedy"), [
    ({}, {"temperature": 0.0}, True),
    ({"temperature": 0.7}, {"temperature": 0.0}, False),
    ({}, {"temperature": 0.6}, False),
    ({"temperature": 0}, {"temperature": 0.6}, True),
])
def test_the_engine_and_the_checks_read_the_resolved_temperature(request_body, defaults, greedy):
    chat = ChatCompletionRequest(model="m", messages=CHAT, **request_body)
    assert Sampling.of(chat, defaults).greedy is greedy
    completion = CompletionRequest(model="m", prompt="x", n=2, **request_body)
    if greedy:
        with pytest.raises(APIError, match="n must be 1 when using greedy sampling, got 2."):
            completion.verify_sampling(2, 10, 20, None, 1000, defaults=defaults)
    else:
        completion.verify_sampling(2, 10, 20, None, 1000, defaults=defaults)
    # a default's top_k and penalties are what an unset field samples with
    assert Sampling.of(chat, {"top_k": 20}).top_k == 20
    assert Sampling.of(chat, {"presence_penalty": 0.5}).presence_penalty == 0.5


async def test_a_default_skip_special_tokens_false_keeps_a_kept_eos_in_the_text():
    body = {"prompt": "hello", "max_tokens": 2000, "seed": 3, "include_stop_str_in_output": True}
    async with running_server(*FAST, "--override-generation-config", '{"skip_special_tokens": false}') as server, \
            aiohttp.ClientSession() as http:
        status, answer = await _post(http, server.url, "/v1/completions", body)
        assert status == 200 and answer["choices"][0]["finish_reason"] == "stop"
        assert answer["choices"][0]["text"].endswith("<|end_of_text|>")  # EOS shown: special tokens not skipped
        status, answer = await _post(http, server.url, "/v1/completions", {**body, "skip_special_tokens": True})
        assert not answer["choices"][0]["text"].endswith("<|end_of_text|>")
