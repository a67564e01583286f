"""What a newcomer trips on first: the README's commands as written, and the errors of a first cluster
file, hardware file, replay or calibration."""
from __future__ import annotations

import csv
import json
import math
import re
import shlex
from datetime import datetime, timedelta
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

ROOT = Path(__file__).resolve().parent.parent
MODEL = "meta-llama/Llama-3.1-8B"


def _azure_trace(path: Path, n: int = 40, gap: float = 0.25) -> Path:
    """A small Azure-2023 CSV: `n` requests `gap` seconds apart."""
    start = datetime(2023, 11, 16, 18, 15, 46, 680590)
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for i in range(n):
        stamp = (start + timedelta(seconds=i * gap)).strftime("%Y-%m-%d %H:%M:%S.%f0")
        lines.append(f"{stamp},{200 + 37 * (i % 11)},{20 + 7 * (i % 5)}")
    path.write_text("\n".join(lines) + "\n")
    return path


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
    assert argv[:2] == [".venv/bin/vllm-emulator", "replay"] and argv[2] == "TRACE"
    argv = [a if a != "out/" else str(tmp_path / "out") for a in argv]
    argv[2] = str(_azure_trace(tmp_path / "trace.csv"))
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
    # the cluster's time series sums the pods: a P/D prompt counts on both of its pods
    with (out / "timeseries.csv").open() as f:
        assert sum(float(row["prompt_throughput"]) for row in csv.DictReader(f)) == pytest.approx(2 * prompts)
