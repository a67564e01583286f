"""Offline replay end to end: output files and their schema, determinism, the end state, the CLI and bad input."""
from __future__ import annotations

import csv
import math
import json
from pathlib import Path

import pytest

from emulator.config import EngineArgs
from emulator.cluster import build_simulation
from profiles.deployment import build_deployment
from loadgen.replay import make_requests, replay
from loadgen.traces import read_trace
from vllm_emulator.cli import main

REQUEST_FIELDS = {"request_id", "arrival_time", "scheduled_time", "first_token_time", "finish_time", "input_tokens",
                  "output_tokens", "cached_tokens", "num_preemptions", "ttft", "tpot", "e2e"}
STEP_FIELDS = {"step", "start", "duration", "scheduled", "preempted", "finished", "cached_tokens", "sampled"}
SMALL_ENGINE = ["--hardware", "RTX4090", "--max-model-len", "4096"]


@pytest.fixture(scope="module")
def deployment():
    return build_deployment("meta-llama/Llama-3.1-8B", "RTX4090", EngineArgs(max_model_len=4096))


@pytest.fixture(scope="module")
def small_trace() -> Path:
    return Path(__file__).resolve().parent / "data" / "llmservingsim_small.jsonl"


@pytest.fixture(scope="module")
def run(tmp_path_factory, deployment, small_trace):
    """One replay of the small trace with a step log: (output dir, summary)."""
    out = tmp_path_factory.mktemp("replay")
    summary = replay(str(small_trace), deployment, out, step_log=out / "steps.jsonl")
    return out, summary


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]


def steps_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- output files -------------------------------------------------------------------------------
def test_replay_writes_requests_summary_and_timeseries(run):
    out, _ = run
    assert {p.name for p in out.iterdir()} >= {"requests.jsonl", "summary.json", "timeseries.csv", "steps.jsonl"}


def test_requests_jsonl_has_one_row_per_trace_line_in_trace_order(run, small_trace):
    rows = rows_of(run[0])
    trace = [json.loads(line) for line in small_trace.read_text().splitlines()]
    assert ([(r["input_tokens"], r["output_tokens"]) for r in rows]
            == [(t["input_toks"], t["output_toks"]) for t in trace])
    assert all(REQUEST_FIELDS <= set(r) for r in rows)


def test_request_ids_from_the_trace_are_kept(run):
    assert [r["request_id"] for r in rows_of(run[0])] == [
        "req-0", "req-1", "chat-a", "req-3", "req-4", "req-5", "req-6", "chat-b", "req-8", "req-9", "req-10", "req-11"]


def test_latencies_follow_from_the_timestamps(run):
    for r in rows_of(run[0]):
        assert r["arrival_time"] <= r["scheduled_time"] < r["first_token_time"] <= r["finish_time"]
        assert r["ttft"] == pytest.approx(r["first_token_time"] - r["arrival_time"])
        assert r["tpot"] == pytest.approx((r["finish_time"] - r["first_token_time"]) / (r["output_tokens"] - 1))
        assert r["e2e"] == pytest.approx(r["finish_time"] - r["arrival_time"])


def test_shared_system_prompt_hits_the_prefix_cache(run):
    rows = rows_of(run[0])
    assert rows[0]["cached_tokens"] == 0
    assert [r["cached_tokens"] for r in rows[1:4]] == [64, 64, 64]  # the 64-token system prompt: 4 blocks
    assert all(r["cached_tokens"] == 0 for r in rows[4:])


def test_summary_has_the_distributions_throughput_and_preemptions(run):
    summary = json.loads((run[0] / "summary.json").read_text())
    assert summary["num_requests"] == summary["num_finished"] == 12
    for metric in ("ttft", "tpot", "e2e"):
        assert {"mean", "median", "p90", "p95", "p99"} <= set(summary[metric])
        assert summary[metric]["count"] == 12
    assert {"requests_per_s", "output_tokens_per_s"} <= set(summary["throughput"])
    assert summary["preemptions"]["total"] == 0
    e2e = [r["e2e"] for r in rows_of(run[0])]
    assert summary["e2e"]["mean"] == pytest.approx(sum(e2e) / len(e2e))
    assert summary == run[1] | {"wall_seconds": summary["wall_seconds"]}


def test_timeseries_has_one_row_per_second(run):
    out, summary = run
    with (out / "timeseries.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["t", "prompt_throughput", "gen_throughput", "running", "waiting", "kv_cache_pct",
                             "preemptions", "prefix_hit_pct", "power_w"]
    assert sum(int(r["preemptions"]) for r in rows) == summary["preemptions"]["total"]
    hit_rates = [float(r["prefix_hit_pct"]) for r in rows if r["prefix_hit_pct"]]
    assert hit_rates and all(0.0 <= rate < 100.0 for rate in hit_rates)  # ticks with lookups, and only those
    # like vLLM's own series, the last row is the partial second that holds the end of the run
    assert [float(r["t"]) for r in rows] == [float(k) for k in range(1, math.ceil(summary["duration"]) + 1)]
    assert all(0.0 <= float(r["kv_cache_pct"]) <= 100.0 for r in rows)
    total_out = sum(r["output_tokens"] for r in rows_of(out))
    assert 0 < timeseries_totals(out)[1] <= total_out


def timeseries_totals(out: Path) -> tuple[float, float]:
    """The prompt and generated tokens the rows' rates add up to (the last tick: a partial second)."""
    with (out / "timeseries.csv").open() as f:
        rows = list(csv.DictReader(f))
    duration = json.loads((out / "summary.json").read_text())["duration"]
    widths = [1.0] * (len(rows) - 1) + [duration - (len(rows) - 1)]
    return (sum(float(r["prompt_throughput"]) * w for r, w in zip(rows, widths)),
            sum(float(r["gen_throughput"]) * w for r, w in zip(rows, widths)))


def test_timeseries_accounts_for_every_generated_token(run):
    out, _ = run
    assert timeseries_totals(out)[1] == pytest.approx(sum(r["output_tokens"] for r in rows_of(out)))


def test_timeseries_prompt_throughput_counts_each_prompt_once(tmp_path, small_trace):
    deployment = build_deployment("meta-llama/Llama-3.1-8B", "RTX4090",
                                  EngineArgs(max_model_len=512, num_gpu_blocks_override=33))
    summary = replay(str(small_trace), deployment, tmp_path)
    assert summary["preemptions"]["total"] > 0
    assert timeseries_totals(tmp_path)[0] == pytest.approx(sum(r["input_tokens"] - r["cached_tokens"]
                                                               for r in rows_of(tmp_path)))
    with (tmp_path / "timeseries.csv").open() as f:  # each preemption in the tick of the step that made it
        assert sum(int(r["preemptions"]) for r in csv.DictReader(f)) == summary["preemptions"]["total"]


def test_step_log_lines_have_vllms_audit_schema(run):
    steps = steps_of(run[0] / "steps.jsonl")
    assert all(set(s) == STEP_FIELDS for s in steps)
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1))
    assert all(b["start"] >= a["start"] + a["duration"] - 1e-12 for a, b in zip(steps, steps[1:]))
    assert all(set(s["cached_tokens"]) <= set(s["scheduled"]) for s in steps)


def test_step_log_accounts_for_every_token(run):
    """Without preemption a request computes its prompt minus the hit, then one step per further token."""
    steps = steps_of(run[0] / "steps.jsonl")
    rows = {r["request_id"]: r for r in rows_of(run[0])}
    computed = {rid: 0 for rid in rows}
    finished = []
    for s in steps:
        for rid, n in s["scheduled"].items():
            computed[rid] += n
        finished += s["finished"]
    assert sorted(finished) == sorted(rows)
    assert computed == {rid: r["input_tokens"] - r["cached_tokens"] + r["output_tokens"] - 1 for rid, r in rows.items()}
    hits = {rid: n for s in steps for rid, n in s["cached_tokens"].items()}
    assert hits == {rid: r["cached_tokens"] for rid, r in rows.items() if r["cached_tokens"]}


def test_same_seed_and_input_give_byte_identical_output(tmp_path, deployment, small_trace):
    for name in ("a", "b"):
        replay(str(small_trace), deployment, tmp_path / name, seed=3, step_log=tmp_path / f"{name}.steps")
    assert (tmp_path / "a" / "requests.jsonl").read_bytes() == (tmp_path / "b" / "requests.jsonl").read_bytes()
    assert (tmp_path / "a.steps").read_bytes() == (tmp_path / "b.steps").read_bytes()


def test_every_block_is_free_and_every_request_accounted_for_under_kv_pressure(small_trace):
    deployment = build_deployment("meta-llama/Llama-3.1-8B", "RTX4090",
                                  EngineArgs(max_model_len=512, num_gpu_blocks_override=33))
    sim = build_simulation(deployment)
    preemptions = []
    sim.add_listener(lambda step: preemptions.extend(step.preempted))
    requests = []

    def arrivals():
        for r in make_requests(read_trace(small_trace), deployment.config.max_model_len, 0, str(small_trace), False,
                               []):
            requests.append(r)
            yield r

    sim.run(arrivals())
    assert preemptions  # 32 usable blocks hold 512 tokens: the trace needs more at its peak
    assert len(requests) == 12 and all(r.is_finished and r.finish_reason == "length" for r in requests)
    assert all(r.num_output_tokens == r.output_len for r in requests)
    assert not sim.active
    for instance in sim.engines:
        assert instance.is_idle and instance.kv.num_free_blocks == deployment.num_gpu_blocks - 1


def test_preemptions_are_counted_per_request_in_the_summary_and_in_the_step_log(tmp_path, small_trace):
    deployment = build_deployment("meta-llama/Llama-3.1-8B", "RTX4090",
                                  EngineArgs(max_model_len=512, num_gpu_blocks_override=33))
    summary = replay(str(small_trace), deployment, tmp_path, step_log=tmp_path / "steps.jsonl")
    rows = rows_of(tmp_path)
    per_request = {r["request_id"]: r["num_preemptions"] for r in rows if r["num_preemptions"]}
    logged: dict[str, int] = {}
    for s in steps_of(tmp_path / "steps.jsonl"):
        for rid in s["preempted"]:
            logged[rid] = logged.get(rid, 0) + 1
    assert per_request and logged == per_request
    assert summary["preemptions"] == {"total": sum(per_request.values()), "requests_preempted": len(per_request)}


def test_single_token_requests_have_no_tpot(tmp_path, deployment):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"input_toks": 40, "output_toks": o, "arrival_time_ns": 0}) + "\n"
                            for o in (1, 4)))
    summary = replay(str(path), deployment, tmp_path / "o")
    assert [r["tpot"] is None for r in rows_of(tmp_path / "o")] == [True, False]
    assert summary["tpot"]["count"] == 1 and summary["ttft"]["count"] == 2


# -- the CLI ------------------------------------------------------------------------------------
def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["replay", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_replays_with_vllm_engine_flags(capsys, tmp_path, small_trace):
    code, out, err = cli(capsys, small_trace, "--output", tmp_path / "o", "--step-log", tmp_path / "steps.jsonl",
                         *SMALL_ENGINE, "--max-num-seqs", "4", "--max-num-batched-tokens", "512", "--block-size", "32",
                         "--disable-prefix-caching", "--num-gpu-blocks-override", "300", "--seed", "1")
    assert code == 0
    assert out.startswith("12 requests in ")
    assert "GPU KV cache size: 9,600 tokens" in err  # 300 blocks of 32 tokens
    engine = json.loads((tmp_path / "o" / "summary.json").read_text())["engine"]
    assert (engine["max_num_seqs"], engine["max_num_batched_tokens"], engine["block_size"],
            engine["enable_prefix_caching"]) == (4, 512, 32, False)
    assert all(r["cached_tokens"] == 0 for r in rows_of(tmp_path / "o"))
    assert max(len(s["scheduled"]) for s in steps_of(tmp_path / "steps.jsonl")) <= 4


def test_cli_output_matches_the_library_replay(capsys, tmp_path, small_trace, deployment):
    assert cli(capsys, small_trace, "--output", tmp_path / "cli", *SMALL_ENGINE)[0] == 0
    replay(str(small_trace), deployment, tmp_path / "lib")
    assert (tmp_path / "cli" / "requests.jsonl").read_bytes() == (tmp_path / "lib" / "requests.jsonl").read_bytes()


BAD_INPUT = [
    ("malformed_json.jsonl", [], "malformed_json.jsonl:3: not valid JSON"),
    ("missing_field.jsonl", [], "missing_field.jsonl:2: missing field 'output_toks'"),
    ("non_numeric.jsonl", [], "non_numeric.jsonl:2: field 'input_toks' is not a number ('abc')"),
    ("non_numeric.csv", [], "non_numeric.csv:3: field 'ContextTokens' is not a number ('many')"),
    ("too_long.jsonl", [], "too_long.jsonl:2: prompt of 5000 tokens does not fit max_model_len=4096"),
    ("unsorted.jsonl", [], "unsorted.jsonl:2: arrives at"),
    ("empty.jsonl", [], "empty.jsonl: the trace is empty"),
    ("llmservingsim_small.jsonl", ["--model", "no-such-model"], "unknown model 'no-such-model'"),
    ("llmservingsim_small.jsonl", ["--hardware", "H1000"], "unknown hardware 'H1000'"),
    ("llmservingsim_small.jsonl", ["--tensor-parallel-size", "3"], "must be divisible by tensor parallel size (3)"),
    ("nonexistent.jsonl", [], "nonexistent.jsonl: no such trace file"),
]


@pytest.mark.parametrize("name, extra, message", BAD_INPUT, ids=[b[0] + " " + " ".join(b[1]) for b in BAD_INPUT])
def test_bad_input_is_a_clear_error_never_a_traceback(capsys, tmp_path, test_data, name, extra, message):
    path = test_data / name if (test_data / name).exists() else test_data / "bad" / name
    code, _, err = cli(capsys, path, "--output", tmp_path / "o", *SMALL_ENGINE, *extra)
    assert code == 2
    assert message in err and "error: " in err
    assert "Traceback" not in err


def test_duplicate_request_ids_are_refused(capsys, tmp_path):
    path = tmp_path / "dup.jsonl"
    path.write_text("".join(json.dumps({"input_toks": 20, "output_toks": 2, "arrival_time_ns": k, "request_id": "x"})
                            + "\n" for k in range(2)))
    code, _, err = cli(capsys, path, "--output", tmp_path / "o", *SMALL_ENGINE)
    assert code == 2 and "dup.jsonl:2: duplicate request_id 'x'" in err


def test_skip_invalid_drops_the_prompt_too_long_and_says_so(capsys, tmp_path, test_data):
    code, _, _ = cli(capsys, test_data / "bad" / "too_long.jsonl", "--output", tmp_path / "o", *SMALL_ENGINE,
                     "--skip-invalid")
    assert code == 0
    assert [r["input_tokens"] for r in rows_of(tmp_path / "o")] == [20, 30]
    skipped = json.loads((tmp_path / "o" / "summary.json").read_text())["skipped_lines"]
    assert len(skipped) == 1 and "too_long.jsonl:2:" in skipped[0]


def test_skip_invalid_drops_a_line_with_no_output_tokens(capsys, tmp_path):
    """BurstGPT logs a failed request with 0 response tokens: vLLM would reject that request alone."""
    path = tmp_path / "burstgpt.csv"
    path.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                    "5,ChatGPT,100,20,120,Conversation log\n6,ChatGPT,80,0,80,Conversation log\n"
                    "7,GPT-4,50,10,60,API log\n")
    code, _, _ = cli(capsys, path, "--output", tmp_path / "o", *SMALL_ENGINE, "--skip-invalid")
    assert code == 0
    assert [r["input_tokens"] for r in rows_of(tmp_path / "o")] == [100, 50]


@pytest.mark.parametrize("name, extra", [("header_only.csv", []), ("empty.jsonl", ["--trace-format", "llmservingsim"])])
def test_trace_without_requests_is_refused(capsys, tmp_path, test_data, name, extra):
    code, _, err = cli(capsys, test_data / "bad" / name, "--output", tmp_path / "o", *SMALL_ENGINE, *extra)
    assert code == 2 and "error: " in err


def test_request_shorter_than_a_block_replays(capsys, tmp_path, test_data):
    """Once a TypeError traceback: 5 + 3 tokens fill no KV block."""
    code, _, _ = cli(capsys, test_data / "bad" / "shorter_than_a_block.jsonl", "--output", tmp_path / "o",
                     *SMALL_ENGINE)
    assert code == 0


# -- the real runs --------------------------------------------------------------------------------
@pytest.mark.slow
def test_calibration_trace_replays_completely(shared_data, tmp_path):
    trace = shared_data / "traces/sharegpt/sharegpt-llama-3.1-8b-300-sps10.jsonl"
    deployment = build_deployment("meta-llama/Llama-3.1-8B", "RTX4090",
                                  EngineArgs(max_num_seqs=256, max_num_batched_tokens=2048, max_model_len=32768,
                                             gpu_memory_utilization=0.9))
    summary = replay(str(trace), deployment, tmp_path / "o", step_log=tmp_path / "steps.jsonl")
    assert summary["num_finished"] == 300 and summary["skipped_lines"] == []
    rows = rows_of(tmp_path / "o")
    trace_rows = [json.loads(line) for line in trace.read_text().splitlines()]
    assert [r["output_tokens"] for r in rows] == [t["output_toks"] for t in trace_rows]
    finished = [rid for s in steps_of(tmp_path / "steps.jsonl") for rid in s["finished"]]
    assert sorted(finished) == sorted(r["request_id"] for r in rows)


@pytest.mark.slow
def test_azure_conversation_trace_replays_completely(shared_data, tmp_path):
    trace = shared_data / "traces/azure2023/AzureLLMInferenceTrace_conv.csv"
    deployment = build_deployment("meta-llama/Llama-3.1-8B", "H100", EngineArgs(max_model_len=16384))
    summary = replay(str(trace), deployment, tmp_path / "o", skip_invalid=True)
    assert summary["num_finished"] + len(summary["skipped_lines"]) == 19366
