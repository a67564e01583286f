"""Decode runs are an optimisation only: with and without them, every output is byte-identical
(the step log engine by engine: a loop may run ahead of another between arrivals)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import emulator.engine_loop as engine_loop
from emulator.config import EngineArgs
from loadgen.replay import replay
from profiles.deployment import build_deployment

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces"
TRACE = SHARED / "sharegpt" / "sharegpt_req100_rate10_llama.jsonl"
PREFIX_TRACE = SHARED / "sharegpt" / "sharegpt_pulse_req50_n6_delay15_pc.jsonl"
ORIGINAL_INIT = engine_loop.EngineLoop.__init__
ORIGINAL_PLAN = engine_loop.plan_decode_run
LEFT: list[int] = []  # segments of the runs that requests left

CONFIGS = {
    "async, KV pressure": dict(max_num_seqs=64, max_num_batched_tokens=1024, max_model_len=8192,
                               num_gpu_blocks_override=600),
    "sync, KV pressure": dict(max_num_seqs=64, max_num_batched_tokens=1024, max_model_len=8192,
                              num_gpu_blocks_override=600, async_scheduling=False),
    "no prefix caching": dict(max_num_seqs=32, max_model_len=8192, enable_prefix_caching=False),
    "priority policy": dict(max_model_len=8192, scheduling_policy="priority", num_gpu_blocks_override=900),
    "two engines": dict(max_model_len=8192, data_parallel_size=2, num_gpu_blocks_override=900),
    "requests leave runs": dict(max_model_len=8192),  # nothing waits: runs go on past requests' last tokens
}


def _outputs(monkeypatch, tmp_path: Path, trace: Path, args: dict, decode_runs: bool) -> dict[str, bytes]:
    """The replay's output files, and (under "runs") how many steps were taken in decode runs."""
    taken = []

    def counting_plan(*args):
        run = ORIGINAL_PLAN(*args)
        taken.append(run.completed if run is not None else 0)
        if run is not None and run.segments is not None:
            LEFT.append(len(run.segments))
        return run

    monkeypatch.setattr(engine_loop, "plan_decode_run", counting_plan)

    def init(self, engines, cost_model, async_scheduling, decode_runs_=True):
        ORIGINAL_INIT(self, engines, cost_model, async_scheduling, decode_runs=decode_runs)

    monkeypatch.setattr(engine_loop.EngineLoop, "__init__", init)
    out = tmp_path / ("runs" if decode_runs else "steps")
    deployment = build_deployment("meta-llama/Llama-3.1-8B", "RTX4090", EngineArgs(**args))
    replay(str(trace), deployment, out, step_log=out / "steps.jsonl")
    files = {name: (out / name).read_bytes() for name in ("requests.jsonl", "timeseries.csv")}
    # power prices a run from its middle step (emulator/power.py): tests/test_power.py bounds the difference
    files["requests.jsonl"] = b"".join(json.dumps({k: v for k, v in json.loads(line).items() if k != "energy_j"})
                                       .encode() + b"\n" for line in files["requests.jsonl"].splitlines())
    files["timeseries.csv"] = b"".join(line.rsplit(b",", 1)[0] + b"\n"
                                       for line in files["timeseries.csv"].splitlines())
    files["steps.jsonl"] = b"".join(sorted((out / "steps.jsonl").read_bytes().splitlines(keepends=True),
                                           key=lambda line: json.loads(line).get("engine", 0)))  # stable
    return files, sum(taken)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_decode_runs_change_nothing(name, monkeypatch, tmp_path):
    if not TRACE.exists():
        pytest.skip("../shared/data is not beside the repository")
    trace = PREFIX_TRACE if name == "two engines" else TRACE
    LEFT.clear()
    stepwise, _ = _outputs(monkeypatch, tmp_path, trace, CONFIGS[name], decode_runs=False)
    in_runs, steps_in_runs = _outputs(monkeypatch, tmp_path, trace, CONFIGS[name], decode_runs=True)
    assert steps_in_runs > 100, "the workload should exercise decode runs"
    if name == "requests leave runs":
        assert sum(n > 1 for n in LEFT) >= 10, "runs that requests leave should be exercised"
    for file in stepwise:
        assert in_runs[file] == stepwise[file], f"{file} differs with decode runs ({name})"
