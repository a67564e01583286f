"""`vllm-emulator calibrate`: fitting a device's physical parameters to runs, and recovering known ones."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from emulator.cluster import build_simulation
from emulator.config import EngineArgs
from emulator.hardware import load_device
from emulator.request import Request
from loadgen.calibrate import device_with
from loadgen.vllm_runs import RunError, read_run
from profiles.deployment import build_deployment
from vllm_emulator.cli import main

MODEL = "meta-llama/Llama-3.1-8B"
ENGINE = {"tensor_parallel_size": 2, "max_num_seqs": 64, "max_num_batched_tokens": 2048, "max_model_len": 4096}
TRUTH = {"link_bandwidth": 12e9, "link_latency": 25e-6}  # a slow PCIe path, as a user's cards might have


def _write_run(folder, values: dict[str, float]) -> None:
    """A run as vLLM would record it, made by the emulator on the device with these parameters."""
    rng = np.random.default_rng(3)
    arrivals = np.cumsum(rng.exponential(1 / 8.0, 60))
    lengths = [(int(rng.integers(100, 2000)), int(rng.integers(20, 150))) for _ in arrivals]
    device = device_with(load_device("RTXPRO6000"), values)
    deployment = build_deployment(MODEL, device, EngineArgs(**ENGINE))
    sim = build_simulation(deployment, "least_loaded")
    finished: list[Request] = []
    sim.add_finish_listener(finished.append)
    sim.run(Request(f"bench-{i}", n_in, n_out, arrival_time=float(t)) for i, (t, (n_in, n_out))
            in enumerate(zip(arrivals, lengths)))
    (folder / "vllm").mkdir(parents=True)
    with (folder / "trace.jsonl").open("w") as f:
        for t, (n_in, n_out) in zip(arrivals, lengths):
            f.write(json.dumps({"input_toks": n_in, "output_toks": n_out, "arrival_time_ns": int(t * 1e9)}) + "\n")
    (folder / "vllm" / "meta.json").write_text(json.dumps({
        "model": MODEL, "dataset_path": "workloads/trace.jsonl", "hardware": {"device_name": "RTXPRO6000"},
        "engine_kwargs": {k: v for k, v in ENGINE.items()}}))
    with (folder / "vllm" / "requests.jsonl").open("w") as f:
        for r in sorted(finished, key=lambda r: int(r.request_id.split("-")[1])):
            f.write(json.dumps({"request_id": r.request_id, "input_toks": r.num_prompt_tokens,
                                "output_toks": r.num_output_tokens, "queued_ts": r.queued_time,
                                "first_token_ts": r.first_token_time, "last_token_ts": r.last_token_time}) + "\n")


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibrate") / "run"
    _write_run(folder, TRUTH)
    return folder


def test_recovers_the_link_of_a_run_the_emulator_made(synthetic_run, tmp_path, capsys):
    overlay = tmp_path / "fitted.yaml"
    code = main(["calibrate", str(synthetic_run), "--fit", "link_bandwidth,link_latency", "--windows", "2",
                 "-o", str(overlay)])
    out = capsys.readouterr().out
    assert code == 0, out
    fitted = yaml.safe_load(overlay.read_text())
    assert fitted["base"] == "RTXPRO6000" and fitted["interconnect"]["tables"] is False
    for name, truth in TRUTH.items():
        p = fitted["calibration"]["parameters"][name]
        assert abs(p["value"] - truth) <= p["sigma"], (name, p, truth)
    bandwidth = fitted["calibration"]["parameters"]["link_bandwidth"]
    assert bandwidth["sigma"] < 0.15 * TRUTH["link_bandwidth"]  # prefill all-reduces pin the bandwidth down
    device = load_device(str(overlay))  # the overlay is a device of its own
    assert device.interconnect.bus_bandwidth == pytest.approx(fitted["interconnect"]["bus_bandwidth"])
    assert "held out" in out and "before" in out and "after" in out


def test_the_run_is_read_as_vllm_recorded_it(synthetic_run):
    run = read_run(synthetic_run)
    assert run.model == MODEL and run.hardware == "RTXPRO6000" and run.engine_args.tensor_parallel_size == 2
    assert len(run.workload) == 60 and run.kind == "requests"
    assert set(run.targets) == {f"{m} {s}" for m in ("TTFT", "TPOT", "E2E") for s in ("mean", "p50", "p90")}
    assert all(se > 0 for _, se in run.targets.values())
    assert [len(w.measured[w.window[0]:w.window[1]]) for w in run.windows(3)] == [20, 20, 20]


def test_unreadable_runs_get_a_clear_error(tmp_path, capsys):
    with pytest.raises(RunError, match="not a vLLM run"):
        read_run(tmp_path)
    (tmp_path / "after.prom").write_text("vllm:num_requests_running 0\n")
    with pytest.raises(RunError, match="pass the run's trace"):
        read_run(tmp_path / "after.prom")
    assert main(["calibrate", str(tmp_path)]) == 2
    assert "not a vLLM run" in capsys.readouterr().err
    assert main(["calibrate", str(tmp_path), "--fit", "speed_of_light"]) == 2
    assert "unknown parameter" in capsys.readouterr().err


def test_a_metrics_scrape_gives_the_means_of_vllms_histograms(tmp_path):
    trace = tmp_path / "trace.jsonl"
    trace.write_text(json.dumps({"input_toks": 100, "output_toks": 10, "arrival_time_ns": 0}) + "\n")
    (tmp_path / "after.prom").write_text(
        'vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 4.0\n'
        'vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 8\n'
        'vllm:inter_token_latency_seconds_sum{engine="0",model_name="m"} 2.0\n'
        'vllm:inter_token_latency_seconds_count{engine="0",model_name="m"} 100\n')
    run = read_run(tmp_path / "after.prom", trace, model=MODEL, hardware="RTXPRO6000")
    assert run.targets["TTFT mean"][0] == pytest.approx(0.5) and run.targets["ITL mean"][0] == pytest.approx(0.02)
    assert run.kind == "metrics" and "E2E mean" not in run.targets


def test_vllms_log_gives_its_throughput_while_requests_ran(tmp_path):
    trace = tmp_path / "trace.jsonl"
    trace.write_text(json.dumps({"input_toks": 100, "output_toks": 10, "arrival_time_ns": 0}) + "\n")
    line = ("(APIServer pid=1) INFO 12-11 13:08:{s} [loggers.py:236] Engine 000: Avg prompt throughput: {p} tokens/s, "
            "Avg generation throughput: {g} tokens/s, Running: {r} reqs, Waiting: 0 reqs, GPU KV cache usage: 1.2%\n")
    (tmp_path / "vllm.txt").write_text("".join(line.format(s=s, p=p, g=g, r=r) for s, p, g, r in
                                               ((28, 85.0, 1.0, 1), (29, 2017.3, 427.2, 10), (30, 0.0, 0.0, 0))))
    run = read_run(tmp_path / "vllm.txt", trace, model=MODEL, hardware="A6000")
    assert run.kind == "log"
    assert run.targets["generation throughput"][0] == pytest.approx((1.0 + 427.2) / 2)  # idle lines left out
