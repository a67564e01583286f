"""What a newcomer trips on first: the README's commands as written, and the errors of a first cluster
file, hardware file, replay or calibration."""
from __future__ import annotations

import csv
import json
import math
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from emulator.config import EngineArgs, resolve
from emulator.hardware import load_device
from emulator.memory import CapacityError, plan_memory
from emulator.models import load_model
from emulator.request import Request
from loadgen.synthetic import retime
from loadgen.traces import Trace
from loadgen.vllm_runs import read_run, statistics
from vllm_emulator.cli import main

from azure_traces import azure_trace

ROOT = Path(__file__).resolve().parent.parent
MODEL = "meta-llama/Llama-3.1-8B"


def _azure_trace(path: Path, n: int = 40, gap: float = 0.25) -> Path:
    return azure_trace(path, n, gap, prompt=200, output=20)


def _readme_block(readme: Path, heading: str) -> str:
    """The first ```bash block under a heading of a README, its continuation lines joined."""
    text = readme.read_text()
    section = text[text.index(heading):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return block.replace("\\\n", " ")


# -- README: the offline replay example runs as written ---------------------------------------------------
def test_readmes_first_offline_replay_example_runs(tmp_path, capsys):
    command = _readme_block(ROOT / "README.md", "## Offline replay").strip()
    argv = shlex.split(command)
    assert argv[:2] == [".venv/bin/vllm-emulator", "replay"] and argv[2] == "tests/data/llmservingsim_small.jsonl"
    argv = [a if a != "out/" else str(tmp_path / "out") for a in argv]
    argv[2] = str(ROOT / argv[2])  # the trace that comes with the repository, wherever pytest runs
    assert main(argv[1:]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["hardware"] == "RTX4090"


# -- replay --burstiness is vLLM bench's Gamma shape --------------------------------------------------------
def test_replay_burstiness_is_the_gamma_shape_as_in_vllm_bench(tmp_path):
    trace = _azure_trace(tmp_path / "trace.csv", n=300)
    out = tmp_path / "out"
    assert main(["replay", str(trace), "--request-rate", "4", "--burstiness", "4", "--max-model-len", "8192",
                 "-o", str(out)]) == 0
    arrivals = [json.loads(line)["arrival_time"] for line in (out / "requests.jsonl").open()]
    expected = [r.arrival for r in retime(Trace(str(trace)), rate=4, cv=1 / math.sqrt(4), seed=0)]
    assert arrivals == pytest.approx(expected)
    gaps = np.diff(arrivals)
    assert 0.35 < gaps.std() / gaps.mean() < 0.65  # CV 1/sqrt(4) = 0.5, not 4


def test_replay_burstiness_without_a_request_rate_is_an_error(tmp_path, capsys):
    trace = _azure_trace(tmp_path / "trace.csv")
    assert main(["replay", str(trace), "--burstiness", "0.5", "-o", str(tmp_path / "out")]) == 2
    assert "--request-rate" in capsys.readouterr().err
    assert main(["replay", str(trace), "--request-rate", "0", "-o", str(tmp_path / "out")]) == 2
    assert "--request-rate must be a positive number" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# -- calibrate: a /metrics scrape's latencies start at arrival ----------------------------------------------
def test_a_metrics_scrape_is_compared_with_latencies_from_arrival(tmp_path):
    """vLLM's TTFT and E2E histograms start at the front end's arrival_time (v1/metrics/stats.py), not
    at queued_ts: the emulator's statistics for a scrape must too."""
    trace = tmp_path / "trace.jsonl"
    trace.write_text(json.dumps({"input_toks": 100, "output_toks": 3, "arrival_time_ns": 0}) + "\n")
    (tmp_path / "after.prom").write_text(
        'vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 1.0\n'
        'vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 1\n'
        'vllm:e2e_request_latency_seconds_sum{engine="0",model_name="m"} 2.0\n'
        'vllm:e2e_request_latency_seconds_count{engine="0",model_name="m"} 1\n')
    run = read_run(tmp_path / "after.prom", trace, model=MODEL, hardware="H100")
    request = Request("w0", 100, 3, arrival_time=10.0)
    request.queued_time, request.first_token_time, request.last_token_time = 10.25, 11.0, 12.0
    request.num_output_tokens = 3
    values = statistics(run, [request])
    assert values["TTFT mean"] == pytest.approx(1.0) and values["E2E mean"] == pytest.approx(2.0)


# -- --num-gpu-blocks-override: the capacity error speaks of the overridden cache ----------------------------
def test_capacity_error_with_a_block_override_reports_the_overridden_memory():
    model, device = load_model(MODEL), load_device("H100")
    config = resolve(EngineArgs(num_gpu_blocks_override=1000), model, device)
    with pytest.raises(CapacityError) as err:
        plan_memory(model, device, config)
    message = str(err.value)
    block = 2 * 1024 * 1024  # Llama-3.1-8B, bf16, 16 tokens: 32 layers x 2 x 8 heads x 128 x 2 bytes x 16
    assert f"available KV cache memory ({round(999 * block / 2**30, 2)} GiB)" in message  # vLLM: less the null block
    assert "54.53" not in message  # the profiled memory the override replaced
    assert "the estimated maximum model length is 15984." in message
    assert "--num-gpu-blocks-override" in message
    fitted = plan_memory(model, device, resolve(EngineArgs(num_gpu_blocks_override=1000, max_model_len=15984),
                                                model, device))
    assert fitted.kv_cache_bytes == 1000 * block and "overridden to 1000 blocks" in fitted.describe()


# -- P/D replay: a prefill instance counts the prefills it served ------------------------------------------
def test_pd_replay_counts_each_prefill_on_its_prefill_instance(tmp_path):
    trace = _azure_trace(tmp_path / "trace.csv")
    out = tmp_path / "out"
    assert main(["replay", str(trace), "--cluster", str(ROOT / "deploy/clusters/pd.yaml"), "-o", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    requests = [json.loads(line) for line in (out / "requests.jsonl").open()]
    prompts = sum(r["input_tokens"] for r in requests)
    prefill = [i for i in summary["instances"] if i["role"] == "prefill"]
    decode = [i for i in summary["instances"] if i["role"] == "decode"]
    assert sum(i["prefills"] for i in prefill) == len(requests) == sum(i["num_finished"] for i in decode)
    for instance in prefill:
        assert instance["num_requests"] == instance["prefills"] == instance["routed"]
        assert instance["ttft"]["count"] == instance["prefills"]
        if instance["prefills"]:
            assert instance["throughput"]["output_tokens_per_s"] > 0 and instance["ttft"]["mean"] > 0
    assert sum(i["prompt_tokens"] for i in prefill) == prompts == sum(i["prompt_tokens"] for i in decode)
    assert all(i["prefills"] == 0 for i in decode)
    # the cluster's time series sums the pods' computed prompt tokens, as vLLM's log line counts them: the
    # prefill pods compute the prompts (no shared prefixes in this trace), the decode pods what was not loaded
    decode_computed = sum(r["input_tokens"] - r["cached_tokens"] - r["external_tokens"] for r in requests)
    assert all(r["external_tokens"] > 0 for r in requests)
    with (out / "timeseries.csv").open() as f:
        assert sum(float(row["prompt_throughput"]) for row in csv.DictReader(f)) == pytest.approx(
            prompts + decode_computed)


# -- cluster files: errors that name the file, the line and the field --------------------------------------
def _cluster(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    return path


INSTANCE = "  - {model: meta-llama/Llama-3.1-8B, hardware: H100}\n"


@pytest.mark.parametrize("text, message", [
    # a misspelled `instances` beside `nodes` is not LLMServingSim's format
    ("nodes:\n  a: {host_memory: 1TiB}\ninstance:\n" + INSTANCE,
     "cluster.yaml:3: cluster.instance: unknown field; did you mean 'instances'?"),
    ("engine:\n  kv-cache-dtype: fp7\ninstances:\n" + INSTANCE,
     "cluster.yaml:2: engine.kv-cache-dtype: expected one of auto, float16, bfloat16, fp8, "),
    ("instances:\n  - {model: meta-llama/Llama-3.1-8B, hardware: H100, port: 70000}\n",
     "cluster.yaml:2: instances[0].port: expected a port from 1 to 65535, got 70000"),
    ("instances:\n  - {model: meta-llama/Llama-3.1-8B, hardware: H100, port: 65535, count: 2}\n",
     "cluster.yaml:2: instances[0].port: replica h100-llama-3.1-8b-1 would answer on port 65536"),
    ("routing: {policy: prefix_aware, prefix_wieght: 3}\ninstances:\n" + INSTANCE,
     "cluster.yaml:1: routing.prefix_wieght: not a parameter of policy 'prefix_aware'; it takes prefix_weight, "
     "queue_weight, kv_weight; did you mean 'prefix_weight'?"),
    ("routing: {policy: round_robin, weight: 3}\ninstances:\n" + INSTANCE,
     "routing.weight: not a parameter of policy 'round_robin'; it takes none"),
    ("instances: []\n", "cluster.yaml:1: instances: lists no instance; a cluster needs at least one"),
    ("instances:\n  - {model: meta-llama/Llama-3.1-8B, hardware: H100, max-num-seq: 3}\n",
     "cluster.yaml:2: instances[0].max-num-seq: unknown field; did you mean 'max-num-seqs'?"),
    ("instances:\n  - model: meta-llama/Llama-3.1-8B\n    hardware: H100\n    engine: {max_num_seq: 3}\n",
     "instances[0].engine.max_num_seq: not a vLLM engine flag the emulator simulates; did you mean 'max_num_seqs'?"),
])
def test_cluster_file_errors_name_the_line_the_field_and_what_was_meant(tmp_path, text, message):
    from profiles.cluster_file import ClusterFileError, read_cluster_file
    with pytest.raises(ClusterFileError) as err:
        read_cluster_file(_cluster(tmp_path, text))
    assert message in str(err.value) and str(err.value).startswith(str(tmp_path / "cluster.yaml"))


def test_an_unknown_instance_field_without_a_close_match_is_told_briefly(tmp_path):
    from profiles.cluster_file import ClusterFileError, read_cluster_file
    with pytest.raises(ClusterFileError) as err:
        read_cluster_file(_cluster(tmp_path, "instances:\n  - {model: m, hardware: H100, colour: red}\n"))
    assert "expected an instance field (capacity, count, " in str(err.value)
    assert "kv_cache_dtype" not in str(err.value)  # not the ~90 spellings of every engine flag


def test_instance_fields_take_dashes_as_engine_flags_do(tmp_path):
    from profiles.cluster_file import read_cluster_file
    spec, _ = read_cluster_file(_cluster(tmp_path, "instances:\n  - {model: meta-llama/Llama-3.1-8B, hardware: H100, "
                                                   "served-model-name: small, dp-routing: round_robin}\n"))
    assert spec.instances[0].served_model_names == ("small",) and spec.instances[0].dp_routing == "round_robin"


def test_the_cluster_readme_shows_the_errors_the_reader_gives(tmp_path):
    """deploy/clusters/README.md's sample errors are the real messages (files made to put the mistakes on
    the lines the samples name)."""
    from profiles.cluster_file import ClusterFileError, read_cluster_file
    text = (ROOT / "deploy/clusters/README.md").read_text()
    samples = re.search(r"the field:\n\n```\n(.*?)```", text, re.S).group(1).splitlines()
    files = {14: "instances:\n" + "#\n" * 9 + INSTANCE
                 + "  - model: meta-llama/Llama-3.1-8B\n    hardware: H100\n    tensor-parallel-size: four\n",
             9: "instances:\n" + "#\n" * 7 + "  - {model: meta-llama/Llama-3.1-8B, hardware: H100, max-num-seq: 3}\n"}
    assert len(samples) == len(files)
    for sample in samples:
        where, _, message = sample.partition(": ")
        line = int(where.rsplit(":", 1)[1])
        with pytest.raises(ClusterFileError) as err:
            read_cluster_file(_cluster(tmp_path, files[line]))
        assert str(err.value) == f"{tmp_path / 'cluster.yaml'}:{line}: {message}"


# -- serve --cluster: the single deployment's flags are refused, ports are checked --------------------------
@pytest.mark.parametrize("flag, where", [(["--routing", "round_robin"], "`routing`"),
                                         (["--served-model-name", "x"], "`served_model_name`"),
                                         (["--port-per-engine"], "`port`")])
def test_serve_with_a_cluster_refuses_the_flags_the_file_sets(capsys, flag, where):
    assert main(["serve", "--cluster", str(ROOT / "deploy/clusters/pd.yaml"), *flag]) == 2
    err = capsys.readouterr().err
    assert flag[0] in err and "the cluster file sets it" in err and where in err


def test_serve_checks_ports(capsys):
    assert main(["serve", "--cluster", str(ROOT / "deploy/clusters/pd.yaml"), "--port", "8101"]) == 2
    assert "instances[0].port: port 8101 (replica prefill-0) is the front door's (--port)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--port", "70000"])
    assert exit_.value.code == 2 and "must be a port from 0 to 65535" in capsys.readouterr().err


# -- user hardware files: bad or clashing aliases are named, not a traceback --------------------------------
DEVICE = "name: MyGPU\nmemory_bytes: 25769803776\nmemory_bandwidth: 1.0e+12\nflops: {bf16: 1.0e+14}\n"


@pytest.mark.parametrize("aliases, message", [
    ("aliases:\n", "my.yaml: aliases: expected a list of names (e.g. [My-GPU]), got nothing"),
    ("aliases: MyCard\n", "my.yaml: aliases: expected a list of names (e.g. [My-GPU]), got 'MyCard'"),
    ("aliases: [RTX-A6000]\n", "my.yaml: aliases: 'RTX-A6000' of device 'MyGPU' also names device 'A6000' "
                               "(shipped)"),
])
def test_a_user_device_with_bad_aliases_is_a_clear_error(tmp_path, monkeypatch, capsys, aliases, message):
    (tmp_path / "hardware").mkdir()
    (tmp_path / "hardware" / "my.yaml").write_text(DEVICE + aliases)
    monkeypatch.setenv("VLLM_EMULATOR_HOME", str(tmp_path))
    assert main(["hardware", "list"]) == 2
    assert message in capsys.readouterr().err
    assert main(["replay", str(_azure_trace(tmp_path / "t.csv")), "--hardware", "H100", "-o", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


def test_a_user_device_may_still_replace_a_shipped_one_of_its_name(tmp_path, monkeypatch):
    (tmp_path / "hardware").mkdir()
    (tmp_path / "hardware" / "h100.yaml").write_text(DEVICE.replace("MyGPU", "H100") + "aliases: [H100-SXM]\n")
    monkeypatch.setenv("VLLM_EMULATOR_HOME", str(tmp_path))
    assert load_device("H100-SXM").memory_bytes == 25769803776


def test_replay_with_a_cluster_refuses_routing_the_file_sets(tmp_path, capsys):
    trace = _azure_trace(tmp_path / "trace.csv")
    assert main(["replay", str(trace), "--cluster", str(ROOT / "deploy/clusters/pd.yaml"), "--routing", "round_robin",
                 "-o", str(tmp_path / "out")]) == 2
    assert "the cluster file sets it: its `routing`" in capsys.readouterr().err


# -- loadgen says when the client fell behind -----------------------------------------------------------------
def _scrapes(ttft_sum: float, count: float) -> list:
    """Two /metrics samples (start, end) of a server whose TTFT histogram grew by `count` requests."""
    names = ("vllm:time_to_first_token_seconds_sum", "vllm:time_to_first_token_seconds_count")
    return [(0.0, dict.fromkeys(names, 0.0)), (5.0, dict(zip(names, (ttft_sum, count))))]


def test_loadgen_keeping_up_compares_send_times_and_the_servers_ttft():
    from loadgen.http_replay import keeping_up
    on_time = [{"send_lag": 0.001}] * 20
    fine = keeping_up(on_time, {"count": 20, "mean": 0.06}, _scrapes(1.0, 20), 10)
    assert fine["fell_behind"] is None and fine["server_ttft_mean"] == pytest.approx(0.05)
    assert fine["send_lag"]["count"] == 20
    late = keeping_up(on_time[:10] + [{"send_lag": 0.5}] * 10, {"count": 20, "mean": 0.06}, [], 60)
    assert "at --speedup 60: 10 of 20 requests were sent over 0.1 s late" in late["fell_behind"]
    assert late["server_ttft_mean"] is None
    slow = keeping_up(on_time, {"count": 20, "mean": 7.0}, _scrapes(1.0, 20), 60)
    assert "mean TTFT 7000 ms is 140x the server's own 50 ms" in slow["fell_behind"]


def test_loadgen_warns_at_the_end_of_a_run_that_fell_behind(tmp_path, monkeypatch, capsys):
    """The run itself is stubbed (no server, no wall clock): every request went out 0.2 s late at x10."""
    from array import array

    import loadgen.http_replay as http_replay

    async def late_run(planned, args, headers):
        outcomes = []
        for item in planned:
            due = 100.0 + item.arrival / args.speedup
            outcome = http_replay.Outcome(due=due, sent=due + 0.02, chunks=array("d", [due + 0.03, due + 0.04]))
            outcome.output_tokens, outcome.finish_reason = 2, "length"
            outcomes.append(outcome)
        return outcomes, 100.0, [], False

    monkeypatch.setattr(http_replay, "run", late_run)
    # the server's list of models (read before sending, to check --model): it serves MODEL
    monkeypatch.setattr(http_replay, "server_models",
                        lambda *_: (http_replay.ModelResolver({MODEL: MODEL}, MODEL), {}))
    out = tmp_path / "run"
    assert main(["loadgen", str(_azure_trace(tmp_path / "t.csv", n=5)), "--base-url", "http://127.0.0.1:9",
                 "--model", MODEL, "--speedup", "10", "--scrape-interval", "0", "-o", str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("loadgen: warning: the run fell behind at --speedup 10: 5 of 5 requests were sent "
                              "over 0.1 s late (median lag 200 ms)")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fell_behind"] in err[-1] and summary["send_lag"]["median"] == pytest.approx(0.2)
    assert all(json.loads(line)["send_lag"] == pytest.approx(0.2) for line in (out / "requests.jsonl").open())
