"""`vllm-emulator serve`: vLLM's command line accepted as is, the emulator's defaults, start-up errors."""
from __future__ import annotations

import asyncio
import subprocess
import sys

import aiohttp
import pytest

from vllm_emulator.cli import build_parser
from server.serve import DEFAULT_HARDWARE, DEFAULT_MODEL, resolve_defaults
from server.testing import running_server, server_process
from server.vllm_flags import VLLM_SERVE_FLAGS, unsupported_flags_used


def parse(*argv: str):
    return build_parser("serve").parse_args(list(argv))


def test_no_arguments_serve_the_embedded_default():
    args = parse()
    assert resolve_defaults(args) == DEFAULT_MODEL
    assert (args.hardware, args.max_model_len, args.port, args.speed) == (DEFAULT_HARDWARE, None, 8000, 1.0)


def test_a_named_model_keeps_the_default_device():
    args = parse("meta-llama/Llama-3.1-8B")
    assert resolve_defaults(args) == "meta-llama/Llama-3.1-8B" and args.hardware == DEFAULT_HARDWARE


def test_every_vllm_serve_flag_is_accepted():
    """A command line written for `vllm serve` parses: every flag of its --help, with a value if it takes one."""
    parser = build_parser("serve")
    argv = ["meta-llama/Llama-3.1-8B"]
    for names, kind in VLLM_SERVE_FLAGS:
        flag = names[0]
        if flag in ("--help", "--model", "--tokenizer", "--hardware"):
            continue
        action = parser._option_string_actions[flag]
        value = str(action.choices[0]) if action.choices else "{}" if flag.endswith("-config") else "1"
        argv += {"flag": [flag], "value": [flag, value], "optional": [flag], "list": [flag, value]}[kind]
    args = parser.parse_args(argv)
    assert args.model_tag == "meta-llama/Llama-3.1-8B"


def test_flags_that_are_not_simulated_are_listed():
    args = parse("--trust-remote-code", "--structured-outputs-config", "{}", "--enforce-eager", "--log-config-file",
                 "log.json")
    assert unsupported_flags_used(args) == ["--log-config-file", "--structured-outputs-config",
                                            "--trust-remote-code"]


def test_unsupported_flags_are_reported_once_at_start_up(tmp_path):
    log = tmp_path / "serve.log"
    with log.open("w") as f, server_process("--trust-remote-code", "--speed", "100", log=f):
        pass
    text = log.read_text()
    assert text.count("Accepted but not simulated (no effect here): --trust-remote-code") == 1
    assert "GPU KV cache size: 446,688 tokens" in text  # the default: Llama-3.1-8B on H100


def test_a_deployment_vllm_would_refuse_exits_with_its_message():
    done = subprocess.run([sys.executable, "-m", "vllm_emulator", "serve", "meta-llama/Llama-3.1-8B",
                           "--hardware", "RTX4090", "--port", "0"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "To serve at least one request with the model's max seq len (131072)" in done.stderr


@pytest.mark.parametrize("speed", ["0", "-1", "inf", "nan"])
def test_speed_must_be_a_positive_finite_number(speed, capsys):
    with pytest.raises(SystemExit):
        parse("--speed", speed)
    assert "must be a positive finite number" in capsys.readouterr().err


async def test_data_parallel_engines_behind_one_port_and_one_port_each():
    async with running_server("--speed", "1000", "--data-parallel-size", "2", "--port-per-engine") as server:
        assert len(server.urls) == 3
        async with aiohttp.ClientSession() as http:
            payload = {"prompt": "x", "max_tokens": 2, "ignore_eos": True}
            for url in server.urls:
                async with http.post(url + "/v1/completions", json=payload) as r:
                    assert r.status == 200
            async with http.post(server.urls[1] + "/v1/completions", json=payload,
                                 headers={"X-data-parallel-rank": "1"}) as r:
                pod_rank = r.status
            async with http.post(server.url + "/v1/completions", json=payload,
                                 headers={"X-data-parallel-rank": "1"}) as r:
                assert r.status == 200
            async with http.get(server.url + "/metrics") as r:
                metrics = await r.text()
            pods = []
            for url in server.urls[1:]:
                async with http.get(url + "/metrics") as r:
                    pods.append(await r.text())
        engines = [i.num_steps for i in server.engine.sim.engines]
        pod_rank, engines, metrics, pods = pod_rank, engines, metrics, pods
    assert pod_rank == 400  # a pod has one engine: rank 1 is out of range there
    assert all(steps > 0 for steps in engines)
    assert 'vllm:num_requests_running{engine="1"' in metrics
    for pod in pods:  # each pod's /metrics is that engine's alone, labelled like a one-engine vLLM
        assert 'vllm:num_requests_running{engine="0"' in pod and 'engine="1"' not in pod
    success = 'vllm:request_success_total{engine="0",finished_reason="length",model_name="meta-llama/Llama-3.1-8B"}'
    pod_counts = [float(next(line for line in pod.splitlines() if line.startswith(success)).split()[-1])
                  for pod in pods]
    assert sum(pod_counts) == 4  # the four completions that reached an engine


async def test_requests_spread_over_data_parallel_engines():
    async with running_server("--speed", "1", "--data-parallel-size", "2") as server:
        async with aiohttp.ClientSession() as http:
            payload = {"prompt": "x", "max_tokens": 3000, "ignore_eos": True, "stream": True}  # ~20 s each
            streams = [await http.post(server.url + "/v1/completions", json=payload) for _ in range(4)]
            for _ in range(2000):  # until all four are scheduled (loop turns, not a fixed wait)
                if sum(i.num_running for i in server.engine.sim.engines) == 4:
                    break
                await asyncio.sleep(0.01)
            running = [i.num_running for i in server.engine.sim.engines]
            for s in streams:
                s.close()
        result = running
    assert result == [2, 2]


async def test_engine_log_line_like_vllms():
    from server.periodic_log import PeriodicLogger
    async with running_server("--speed", "1000", "--disable-log-stats") as server:
        stats = PeriodicLogger(server.engine.sim, server.engine.pacer)
        async with aiohttp.ClientSession() as http:
            for _ in range(2):
                payload = {"prompt": "the same prompt " * 20, "max_tokens": 10, "ignore_eos": True}
                async with http.post(server.url + "/v1/completions", json=payload) as r:
                    await r.read()
        (line,) = stats.lines()
    assert line.startswith("Engine 000: Avg prompt throughput: ")
    assert ", Running: 0 reqs, Waiting: 0 reqs, GPU KV cache usage: 0.0%, Prefix cache hit rate: " in line


def test_help_goes_to_stdout():
    for argv in (["--help"], ["serve", "--help"]):
        done = subprocess.run([sys.executable, "-m", "vllm_emulator", *argv], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0 and done.stdout.startswith("usage: vllm-emulator") and not done.stderr


def test_hardware_list_has_a_header_names_each_source_and_ends_quietly_in_a_closed_pipe():
    done = subprocess.run(f"{sys.executable} -m vllm_emulator hardware list | head -3", shell=True,
                          capture_output=True, text=True, timeout=60)
    header, a100, _ = done.stdout.splitlines()
    assert header.split() == ["DEVICE", "MEMORY", "BANDWIDTH", "BF16", "DENSE", "INTERCONNECT", "STEPS", "PRICED",
                              "FROM"]
    assert a100.startswith("A100 ") and a100.endswith("operator tables")
    assert done.stderr == ""  # no BrokenPipeError traceback
    full = subprocess.run([sys.executable, "-m", "vllm_emulator", "hardware", "list"], capture_output=True, text=True,
                          timeout=60).stdout
    rtx4090 = next(line for line in full.splitlines() if line.startswith("RTX4090 "))
    assert rtx4090.endswith("model profiles (Llama-3.1-8B bf16 tp1), else roofline")


async def test_an_instruct_model_runs_on_its_base_architecture_under_the_name_asked_for():
    name = "meta-llama/Llama-3.1-8B-Instruct"
    async with running_server(name, "--speed", "1000") as server, aiohttp.ClientSession() as http:
        assert server.engine.deployment.model.name == "meta-llama/Llama-3.1-8B"
        async with http.get(server.url + "/v1/models") as r:
            card = (await r.json())["data"][0]
        assert card["id"] == name and card["root"] == name
        chat = {"model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
        async with http.post(server.url + "/v1/chat/completions", json=chat) as r:
            assert r.status == 200 and (await r.json())["model"] == name
