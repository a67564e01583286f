"""Start-up fidelity: vLLM's `non-default args: {...}` line (vllm/entrypoints/common/startup.py
get_non_default_args, log_non_default_args, redact_sensitive_args; logged by launcher.py setup_server right after
the version), replay's word on engine flag values it does not simulate, as serve's, and --reasoning-config."""
from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import time

from server import serve
from vllm_emulator.cli import build_parser


def _non_default(*argv: str) -> dict:
    """serve's non-default args of a command line, read as `vllm-emulator serve` reads it."""
    parser = build_parser("serve")
    rest = serve.normalize_argv(list(argv), parser)
    args = parser.parse_args(rest)
    args.explicit_dests = parser.explicit_dests(rest)
    return serve.non_default_args(args)


def test_positional_model_and_port_as_vllm_lists_them():
    # vLLM 0.33: {'model_tag': ..., 'port': 8001, 'model': ...} (its parser has --port before --model)
    got = _non_default("meta-llama/Llama-3.1-8B", "--port", "8001")
    assert list(got.items()) == [("model_tag", "meta-llama/Llama-3.1-8B"), ("port", 8001),
                                 ("model", "meta-llama/Llama-3.1-8B")]


def test_nothing_set_lists_nothing_and_vllms_defaults_are_not_listed():
    assert _non_default() == {}
    # vLLM's own defaults (port 8000, seed 0, utilization 0.92, fingerprint full) are not listed ...
    assert _non_default("--port", "8000", "--seed", "0", "--gpu-memory-utilization", "0.92",
                        "--fingerprint-mode", "full", "--uvicorn-log-level", "info", "--enable-fastapi-docs") == {}
    # ... but a value that is serve's default and not vLLM's is (vLLM's block_size and prefix caching: None)
    assert _non_default("--block-size", "16", "--enable-prefix-caching") == {"block_size": 16,
                                                                          "enable_prefix_caching": True}


def test_vllm_names_order_and_values():
    got = _non_default("m", "--api-key", "a", "b", "-O1", "--max-num-seqs", "8", "--performance-mode", "throughput",
                       "-tp", "2", "--kv-cache-dtype", "fp8", "--no-async-scheduling", "--disable-log-stats",
                       "--served-model-name", "x", "--max-model-len", "1k", "--compilation-config", '{"mode": 0}',
                       "--hf-token", "t", "--enforce-eager", "--disable-uvicorn-access-log", "--disable-fastapi-docs",
                       "--enable-lora", "--kv-offloading-size", "4", "--enable-log-requests",
                       "--no-enable-chunked-prefill")
    # the order of vLLM 0.33's parser, as its own get_non_default_args gives it for this command line
    assert list(got) == ["model_tag", "disable_uvicorn_access_log", "api_key", "disable_fastapi_docs", "model",
                         "max_model_len", "enforce_eager", "served_model_name", "hf_token", "tensor_parallel_size",
                         "kv_cache_dtype", "kv_offloading_size", "enable_lora", "max_num_seqs",
                         "enable_chunked_prefill", "async_scheduling", "compilation_config", "optimization_level",
                         "performance_mode", "disable_log_stats", "enable_log_requests"]
    assert got["api_key"] == got["hf_token"] == "***"  # redact_sensitive_args
    assert got["optimization_level"] == "1"  # vLLM's parser keeps -O's level as a string
    assert got["max_model_len"] == 1000 and got["served_model_name"] == ["x"] and got["kv_offloading_size"] == 4.0
    assert got["async_scheduling"] is False and got["enable_chunked_prefill"] is False
    assert got["disable_uvicorn_access_log"] is True and got["disable_fastapi_docs"] is True
    assert got["compilation_config"] == {"mode": 0} and got["enable_log_requests"] is True


def test_emulator_flags_are_not_vllms():
    got = _non_default("--hardware", "A100", "--speed", "2", "--tokenizer", "builtin", "--compile-cache", "warm",
                       "--cost-model", "roofline", "--routing", "round_robin", "--port-per-engine", "-dp", "2",
                       "--log-level", "INFO")  # (vLLM's --log-level is not in its namespace unless given)
    assert got == {"data_parallel_size": 2}


def test_serve_logs_the_line_right_after_its_version(tmp_path):
    out_file, err_file = tmp_path / "out.txt", tmp_path / "err.txt"
    with out_file.open("w") as out, err_file.open("w") as err:
        child = subprocess.Popen([sys.executable, "-m", "vllm_emulator", "serve", "meta-llama/Llama-3.1-8B",
                                  "--host", "127.0.0.1", "--port", "0", "--api-key", "secret", "--max-num-seqs", "8",
                                  "--tokenizer", "builtin", "--performance-mode", "interactivity"],
                                 stdout=out, stderr=err,
                                 env={**os.environ, "VLLM_DISABLE_LOG_LOGO": "1", "NO_COLOR": "1"})
        try:
            deadline = time.monotonic() + 120
            while "Application startup complete." not in err_file.read_text():
                assert child.poll() is None, err_file.read_text()
                assert time.monotonic() < deadline, "the server did not start within 120 s"
                time.sleep(0.1)
        finally:
            child.send_signal(signal.SIGINT)
            assert child.wait(timeout=60) == 0
    messages = [re.sub(r"^\(\w+ pid=\d+\) \w+ \S+ \S+ \[[\w./]+:\d+\] ", "", line)
                for line in out_file.read_text().splitlines()]
    at = messages.index("vLLM server version 0.33.0, serving model meta-llama/Llama-3.1-8B")
    assert messages[at + 1].startswith("non-default args: ")
    assert ast.literal_eval(messages[at + 1].removeprefix("non-default args: ")) == {
        "model_tag": "meta-llama/Llama-3.1-8B", "host": "127.0.0.1", "port": 0, "api_key": "***",
        "model": "meta-llama/Llama-3.1-8B", "max_num_seqs": 8,  # (--port 0: not vLLM's default either)
        "performance_mode": "interactivity"}
    assert "Performance mode set to 'interactivity'." in messages  # vLLM's VllmConfig line
    assert "secret" not in out_file.read_text()


TRACE = "tests/data/llmservingsim_small.jsonl"


def _replay(capsys, tmp_path, *flags: str) -> tuple[int, str, dict]:
    from vllm_emulator.cli import main
    code = main(["replay", TRACE, "-o", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text()) if code == 0 else {}
    return code, err, summary


def test_replay_reads_vllms_optimization_level_spellings_and_warns_of_o1_as_serve(capsys, tmp_path):
    code, err, o1 = _replay(capsys, tmp_path, "-O1")
    assert code == 0
    assert "warning: not simulated, so throughput or memory differ from vLLM's with them: -O1" in err
    parser = build_parser("serve")
    args = parser.parse_args(serve.normalize_argv(["-O1"], parser))
    assert serve.not_simulated(args)[0] == ["-O1"]  # serve's warning names the same value
    for spelled in (["-O3"], ["-O=2"], ["-O", "3"], ["--optimization-level", "2"]):
        code, err, summary = _replay(capsys, tmp_path, *spelled)
        assert code == 0 and "not simulated" not in err
        assert summary["ttft"] == o1["ttft"]  # -O1 is priced as -O2 and -O3 (vLLM's O3 is its O2)
    code, err, eager = _replay(capsys, tmp_path, "-O0")  # -O0 is simulated: vLLM's --enforce-eager
    assert code == 0 and "not simulated" not in err and eager["engine"]["enforce_eager"] is True


def test_every_vllm_moe_backend_is_taken_and_those_not_simulated_are_warned_of(capsys, tmp_path):
    # vLLM 0.33 accepts its MoEBackend names (config/kernel.py); marlin is priced from its own kernels, the others
    # as auto, which serve and replay say; a name vLLM does not know is argparse's error, as vLLM's
    moe = ("--model", "Qwen/Qwen3-30B-A3B", "--hardware", "H100")
    code, err, auto = _replay(capsys, tmp_path, *moe)
    assert code == 0 and "not simulated" not in err
    code, err, triton = _replay(capsys, tmp_path, *moe, "--moe-backend", "triton")
    assert code == 0 and "differ from vLLM's with them: --moe-backend triton" in err
    assert triton["ttft"] == auto["ttft"]
    parser = build_parser("serve")
    assert serve.not_simulated(parser.parse_args(["--moe-backend", "deep_gemm"]))[0] == ["--moe-backend deep_gemm"]
    code, err, _ = _replay(capsys, tmp_path, *moe, "--moe-backend", "marlin")
    assert code == 0 and "not simulated" not in err
    try:
        code = _replay(capsys, tmp_path, *moe, "--moe-backend", "bogus")[0]
    except SystemExit as exc:
        code = exc.code
    assert code == 2 and "argument --moe-backend: invalid choice: 'bogus'" in capsys.readouterr().err


def test_performance_mode_line_in_replay(capsys, tmp_path):
    code, err, summary = _replay(capsys, tmp_path, "--performance-mode", "throughput")
    assert code == 0 and "Performance mode set to 'throughput'." in err.splitlines()
    assert summary["engine"]["performance_mode"] == "throughput"
    code, err, _ = _replay(capsys, tmp_path)
    assert code == 0 and "Performance mode" not in err


async def _budget_status(*argv: str) -> int:
    """The status of a chat request with a thinking_token_budget, on a server started with `argv`."""
    import aiohttp
    from server.testing import running_server
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "thinking_token_budget": 4}
    async with running_server("--tokenizer", "builtin", *argv) as server, aiohttp.ClientSession() as http:
        async with http.post(server.url + "/v1/chat/completions", json=body) as resp:
            return resp.status


async def test_reasoning_config_enables_thinking_budgets_as_vllms():
    # vLLM (config/vllm.py __post_init__, v1/engine/input_processor.py): a budget needs an enabled reasoning
    # config: a parser, or a --reasoning-config with both strings; one without them is not enabled
    assert await _budget_status() == 400
    assert await _budget_status("--reasoning-config", "{}") == 400
    assert await _budget_status("--reasoning-config", '{"reasoning_end_str": "</think>"}') == 400
    assert await _budget_status("--reasoning-config",
                                '{"reasoning_start_str": "<think>", "reasoning_end_str": "</think>"}') == 200
    assert await _budget_status("--reasoning-parser", "qwen3") == 200
    assert await _budget_status("--reasoning-parser", "qwen3", "--reasoning-config", "{}") == 200  # the parser's
    assert await _budget_status("--reasoning-config", '{"reasoning_parser": "deepseek_r1"}') == 200


def _settings(*argv: str):
    parser = build_parser("serve")
    args = parser.parse_args(serve.normalize_argv(list(argv), parser))
    return serve.reasoning_settings(args, serve.frontend_switches(args)["reasoning_parser"])


def test_reasoning_config_start_up_words():
    for bad, words in (("[1]", "Input should be an object"), ("{\"foo\": \"x\"}", "foo\n  Unexpected keyword"),
                       ("nope", "Invalid JSON"), ('{"reasoning_end_str": 3}', "Input should be a valid string")):
        try:
            _settings("--reasoning-config", bad)
        except ValueError as exc:
            assert str(exc).startswith("argument --reasoning-config: 1 validation error for ReasoningConfig")
            assert words in str(exc)
        else:
            raise AssertionError(f"{bad} was taken")
    # what of it is not simulated is said; a config that only repeats the parser's strings is all simulated
    assert "changes nothing here" in _settings("--reasoning-config", '{"reasoning_start_str": "<think>", '
                                               '"reasoning_end_str": "</think>"}').unsimulated
    assert "not simulated" in _settings("--reasoning-parser", "qwen3", "--reasoning-config",
                                        '{"reasoning_end_str": "Enough.</think>"}').unsimulated
    assert _settings("--reasoning-parser", "qwen3", "--reasoning-config",
                     '{"reasoning_end_str": "</think>"}').unsimulated is None
    # listed no more among the flags that change nothing
    parser = build_parser("serve")
    args = parser.parse_args(["--reasoning-config", "{}"])
    assert "--reasoning-config" not in serve.not_simulated(args)[1]


def test_serve_warns_as_vllm_of_a_reasoning_config_without_strings(tmp_path):
    done = subprocess.run([sys.executable, "-m", "vllm_emulator", "serve", "--reasoning-config", '{"foo": 1}'],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "Unexpected keyword argument" in done.stderr
    out_file = tmp_path / "out.txt"
    with out_file.open("w") as out:
        child = subprocess.Popen([sys.executable, "-m", "vllm_emulator", "serve", "--host", "127.0.0.1", "--port", "0",
                                  "--tokenizer", "builtin", "--reasoning-config", "{}"], stdout=out,
                                 stderr=subprocess.DEVNULL, env={**os.environ, "NO_COLOR": "1"})
        try:
            deadline = time.monotonic() + 120
            while "Available routes are:" not in out_file.read_text():
                assert child.poll() is None
                assert time.monotonic() < deadline, "the server did not start within 120 s"
                time.sleep(0.1)
        finally:
            child.send_signal(signal.SIGINT)
            assert child.wait(timeout=60) == 0
    assert "WARNING" in out_file.read_text() and serve.REASONING_IDS_FAILED in out_file.read_text()
