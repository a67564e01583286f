"""Follow-ups of the sampling defaults and the simulated interactivity mode, as vLLM 0.33 does them:

- completions and batch chat check a request's sampling with the served model's defaults (vLLM's
  to_sampling_params fills them in before SamplingParams checks: completion/serving.py, batch_serving.py), so
  n > 1 under a greedy default temperature is refused as a chat's is;
- /inference/v1/generate applies get_max_tokens (default max_tokens, the override's cap) only to a request
  that leaves max_tokens out (token_in_token_out/serving.py); one that gives it runs it, to max_model_len;
- --help shows vLLM's help of --generation-config and --override-generation-config;
- --performance-mode interactivity is not listed as not simulated.
Virtual time, in-process servers."""
from __future__ import annotations

import aiohttp

from server.serve import normalize_argv, not_simulated
from server.testing import running_server
from vllm_emulator.cli import build_parser, main

FAST = ("--speed", "1000")
GREEDY = ("--override-generation-config", '{"temperature": 0}')
BATCH = "/v1/chat/completions/batch"
GREEDY_REFUSAL = "n must be 1 when using greedy sampling, got 2."


def _parse(*argv: str):
    parser = build_parser("serve")
    return parser.parse_args(normalize_argv(list(argv), parser))


async def _post(http, url: str, path: str, body: dict) -> tuple[int, dict]:
    async with http.post(url + path, json=body) as r:
        return r.status, await r.json()


async def test_a_completion_with_n_above_one_under_a_greedy_default_is_refused():
    async with running_server(*FAST, *GREEDY) as server, aiohttp.ClientSession() as http:
        body = {"prompt": "hello", "max_tokens": 4, "n": 2}
        status, answer = await _post(http, server.url, "/v1/completions", body)
        assert status == 400 and answer["error"]["message"] == GREEDY_REFUSAL
        status, answer = await _post(http, server.url, "/v1/completions", {**body, "temperature": 0.8})
        assert status == 200 and len(answer["choices"]) == 2  # the request's own temperature is not greedy
    async with running_server(*FAST) as server, aiohttp.ClientSession() as http:
        status, answer = await _post(http, server.url, "/v1/completions", {"prompt": "hello", "max_tokens": 4, "n": 2})
        assert status == 200 and len(answer["choices"]) == 2  # Llama-3.1-8B's default temperature 0.6 samples


async def test_a_batch_chat_is_checked_with_the_models_defaults():
    chats = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "hello"}]]
    # a default vLLM's SamplingParams refuses refuses every request that leaves the field out
    async with running_server(*FAST, "--override-generation-config", '{"temperature": 2.5}') as server, \
            aiohttp.ClientSession() as http:
        status, answer = await _post(http, server.url, BATCH, {"messages": chats, "max_tokens": 3})
        assert status == 400 and answer["error"]["message"] == \
            "temperature must be in [0, 2], got 2.5. (parameter=temperature, value=2.5)"
        status, answer = await _post(http, server.url, BATCH,
                                     {"messages": chats, "max_tokens": 3, "temperature": 0.5})
        assert status == 200 and len(answer["choices"]) == 2
    async with running_server(*FAST, *GREEDY) as server, aiohttp.ClientSession() as http:
        status, answer = await _post(http, server.url, BATCH, {"messages": chats, "max_tokens": 3})
        assert status == 200 and len(answer["choices"]) == 2  # greedy, one choice per conversation: served


async def test_generate_caps_only_a_request_that_leaves_max_tokens_out():
    prompt = [128000, 9906, 1070]
    async with running_server(*FAST, "--enable-scale-out", "--override-generation-config", '{"max_new_tokens": 5}') \
            as server, aiohttp.ClientSession() as http:
        lengths = []
        for params in ({"ignore_eos": True}, {"ignore_eos": True, "max_tokens": 12}):
            status, answer = await _post(http, server.url, "/inference/v1/generate",
                                         {"token_ids": prompt, "sampling_params": params})
            assert status == 200, answer
            lengths.append(len(answer["choices"][0]["token_ids"]))
        assert lengths == [5, 12]  # the override's cap: the default only; a given max_tokens runs as given
        # a given max_tokens past the context runs to max_model_len (the engine stops it there)
    async with running_server(*FAST, "--enable-scale-out", "--max-model-len", "20",
                              "--override-generation-config", '{"max_new_tokens": 5}') as server, \
            aiohttp.ClientSession() as http:
        status, answer = await _post(http, server.url, "/inference/v1/generate",
                                     {"token_ids": prompt, "sampling_params": {"ignore_eos": True, "max_tokens": 100}})
        assert status == 200 and len(answer["choices"][0]["token_ids"]) == 20 - len(prompt)
        assert answer["choices"][0]["finish_reason"] == "length"


def test_serve_help_shows_vllms_help_of_the_generation_config_flags(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps nothing: one line per flag
    try:
        main(["serve", "--help"])
    except SystemExit:
        pass
    lines = capsys.readouterr().out.splitlines()
    helps = {line.split()[0]: lines[i + 1] for i, line in enumerate(lines)  # (the help: the flag's next line)
             if line.strip().startswith("--") and line.split()[0].endswith("generation-config")}
    assert "If set to `\"vllm\"`, no generation config is loaded, vLLM defaults will be used." in \
        helps["--generation-config"]
    assert "then it sets a server-wide limit on the number of output tokens for all requests. (default: auto)" in \
        helps["--generation-config"]
    assert "If used with `--generation-config auto`, the override parameters will be merged with the default " \
           "config from the model." in helps["--override-generation-config"]


def test_performance_mode_interactivity_is_not_listed_as_not_simulated():
    assert not_simulated(_parse("--performance-mode", "interactivity")) == ([], [])
    assert not_simulated(_parse("-O1", "--performance-mode", "interactivity"))[0] == ["-O1"]  # -O1 still is
