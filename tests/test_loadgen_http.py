"""loadgen over HTTP against the emulator: the trace's lengths arrive exactly, prefixes are shared, the
run folder has offline replay's schema, Ctrl-C keeps what was measured, the report renders, and the
locustfile runs headless with no failure. Assertions are on counts and schemas, never on wall time."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from emulator.stats import request_record
from loadgen.prompts import PromptBuilder
from loadgen.scrape import parse_metrics
from profiles.tokenizer import load_tokenizer
from server.testing import server_process
from vllm_emulator.cli import main as cli

TRACE = [(0.0, 300, 12), (0.2, 40, 30), (0.5, 1200, 5), (0.9, 17, 1), (1.0, 600, 40), (1.4, 80, 8)]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "requests.jsonl"
    with server_process("--speed", "50", "--request-log", str(log), "--enable-prompt-tokens-details") as url:
        yield url, log


def vidur_trace(path: Path, records=TRACE) -> Path:
    path.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n"
                    + "".join(f"{t},{i},{o}\n" for t, i, o in records))
    return path


def rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "requests.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_every_request_arrives_with_the_trace_lengths(tmp_path, server, endpoint, capsys):
    url, _ = server
    out = tmp_path / "run"
    code = cli(["loadgen", str(vidur_trace(tmp_path / "t.csv")), "--base-url", url, "--speedup", "50",
                "--endpoint", endpoint, "-o", str(out), "--request-id-prefix", f"lg-{endpoint}-"])
    assert code == 0, capsys.readouterr().err
    got = rows(out)
    # a chat prompt holds at least its template (Llama 3's adds ~35 tokens around one message)
    least = PromptBuilder(load_tokenizer(None), chat=endpoint == "chat").overhead
    assert [(r["input_tokens"], r["output_tokens"]) for r in got] == [(max(i, least), o) for _, i, o in TRACE]
    assert all(r["finish_reason"] == "length" and r["ttft"] > 0 and r["e2e"] >= r["ttft"] for r in got)
    # a server that falls behind may merge tokens into fewer chunks (vLLM does): count bounds, not equality
    assert all(len(r["itl"]) <= r["output_tokens"] - 1 for r in got)
    assert all(r["tpot"] is None if r["output_tokens"] == 1 else r["tpot"] >= 0 for r in got)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_finished"] == len(TRACE) and summary["num_failed"] == 0
    assert summary["driver"] == "http" and summary["speedup"] == 50
    with (out / "timeseries.csv").open() as f:
        header = next(csv.reader(f))
    assert header == ["t", "prompt_throughput", "gen_throughput", "running", "waiting", "kv_cache_pct",
                      "preemptions", "prefix_hit_pct"]
    assert (out / "metrics.csv").read_text().startswith("t,num_requests_running,num_requests_waiting")


def test_records_have_offline_replays_fields(tmp_path, server, make_simulation):
    url, _ = server
    out = tmp_path / "run"
    assert cli(["loadgen", str(vidur_trace(tmp_path / "t.csv", TRACE[:1])), "--base-url", url, "--speedup", "50",
                "-o", str(out)]) == 0
    sim = make_simulation()
    from emulator.request import Request
    request = Request("x", 10, 2, arrival_time=0.0)
    sim.run(iter([request]))
    assert set(request_record(request)) <= set(rows(out)[0])


def test_mooncake_prefixes_are_shared_in_the_servers_cache(tmp_path, server):
    url, log = server
    path = tmp_path / "mooncake.jsonl"
    path.write_text(json.dumps({"timestamp": 0, "input_length": 1500, "output_length": 4, "hash_ids": [90, 91, 92]})
                    + "\n" + json.dumps({"timestamp": 2000, "input_length": 1500, "output_length": 4,
                                         "hash_ids": [90, 91, 93]}) + "\n")
    out = tmp_path / "run"
    assert cli(["loadgen", str(path), "--base-url", url, "--speedup", "50", "-o", str(out),
                "--request-id-prefix", "mooncake-"]) == 0
    assert [r["cached_tokens"] for r in rows(out)] == [0, 1024]
    server_side = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["cached_tokens"] for r in server_side if "mooncake-" in r["request_id"]] == [0, 1024]


def test_a_synthetic_workload_runs(tmp_path, server):
    url, _ = server
    out = tmp_path / "run"
    assert cli(["loadgen", "--base-url", url, "--speedup", "50", "--request-rate", "20", "--cv", "2",
                "--num-requests", "12", "--input-len", "uniform:50:300", "--output-len", "8", "-o", str(out)]) == 0
    got = rows(out)
    assert len(got) == 12 and all(r["output_tokens"] == 8 and 50 <= r["input_tokens"] <= 300 for r in got)


@pytest.mark.parametrize("content, message", [
    ("arrived_at,num_prefill_tokens,num_decode_tokens\n0,10,2\nnan,10,2\n",
     "t.csv:3: field 'arrived_at' is not a finite number ('nan')"),
    ("arrived_at,num_prefill_tokens,num_decode_tokens\n0,10,2\n1,inf,2\n",
     "t.csv:3: field 'num_prefill_tokens' is not a finite number ('inf')"),
])
def test_a_bad_trace_is_named_before_anything_is_sent(tmp_path, capsys, content, message):
    path = tmp_path / "t.csv"
    path.write_text(content)
    assert cli(["loadgen", str(path), "--base-url", "http://127.0.0.1:9", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("flags, message", [
    (["--speedup", "inf"], "--speedup must be a positive number"),
    (["--speedup", "0"], "--speedup must be a positive number"),
    (["--window", "5:2"], "--window 5:2"),
    (["--goodput", "ttft"], "bad SLO"),
])
def test_bad_flags_are_refused(tmp_path, capsys, flags, message):
    trace = vidur_trace(tmp_path / "t.csv")
    assert cli(["loadgen", str(trace), "--base-url", "http://127.0.0.1:9", "-o", str(tmp_path / "o"), *flags]) == 2
    assert message in capsys.readouterr().err


def running(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
        return parse_metrics(resp.read().decode()).get("vllm:num_requests_running", 0.0)


def test_ctrl_c_stops_and_keeps_the_partial_results(tmp_path, server):
    url, _ = server
    trace = vidur_trace(tmp_path / "t.csv", [(k * 0.5, 100, 100_000) for k in range(40)])
    out = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-m", "vllm_emulator", "loadgen", str(trace), "--base-url", url,
                              "-o", str(out)], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 120
    while running(url) < 2 and time.monotonic() < deadline:  # some sent, none near its 100,000th token
        time.sleep(0.2)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130, err
    assert "stopped by Ctrl-C" in err
    got = rows(out)
    assert 1 <= len(got) < 40
    assert {r["finish_reason"] for r in got} == {"abort"}
    assert json.loads((out / "summary.json").read_text())["num_requests"] == len(got)


def test_report_renders_offline_and_http_runs_side_by_side(tmp_path, server, capsys):
    pytest.importorskip("matplotlib")
    url, _ = server
    trace = vidur_trace(tmp_path / "t.csv")
    assert cli(["replay", str(trace), "--hardware", "H100", "-o", str(tmp_path / "offline")]) == 0
    assert cli(["loadgen", str(trace), "--base-url", url, "--speedup", "50", "-o", str(tmp_path / "http")]) == 0
    assert cli(["report", str(tmp_path / "offline"), str(tmp_path / "http"), "-o", str(tmp_path / "r.html"),
                "--goodput", "ttft:500"]) == 0
    page = (tmp_path / "r.html").read_text()
    assert page.count("data:image/png;base64,") >= 4
    assert "src='http" not in page and "<script" not in page  # opens offline
    assert "offline replay" in page and "goodput (ttft ≤ 500 ms)" in page


def test_report_of_a_folder_that_is_no_run_is_refused(tmp_path, capsys):
    assert cli(["report", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_locustfile_runs_headless_with_no_failure(tmp_path, server):
    pytest.importorskip("locust")
    url, _ = server
    trace = vidur_trace(tmp_path / "t.csv")
    done = subprocess.run([sys.executable, "-m", "locust", "-f", str(ROOT / "loadgen" / "locustfile.py"),
                           "--headless", "-H", url, "-u", "4", "-r", "4", "-t", "4s", "--trace", str(trace),
                           "--csv", str(tmp_path / "stats"), "--only-summary"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    with (tmp_path / "stats_stats.csv").open() as f:
        stats = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    assert int(stats[("POST", "/v1/completions")]["Request Count"]) > 0
    assert all(int(r["Failure Count"]) == 0 for r in stats.values())
    assert {"TTFT", "ITL", "E2E"} <= {kind for kind, _ in stats}


def test_max_concurrency_holds_requests_until_one_finishes(tmp_path, server):
    url, log = server
    out = tmp_path / "run"
    assert cli(["loadgen", "--base-url", url, "--speedup", "50", "--bursts", "8:100", "--num-requests", "8",
                "--input-len", "100", "--output-len", "50", "--max-concurrency", "2", "-o", str(out),
                "--request-id-prefix", "cap-"]) == 0
    served = sorted((r["arrival_time"], r["finish_time"]) for r in map(json.loads, log.read_text().splitlines())
                    if r["request_id"].startswith("cmpl-cap-"))
    assert len(served) == 8
    for k, (arrival, _) in enumerate(served):  # at each arrival, at most one earlier request still runs
        assert sum(finish > arrival for _, finish in served[:k]) <= 1


def test_each_request_asks_for_the_model_its_trace_line_names(tmp_path, capsys):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("engine: {max-model-len: 4096}\ninstances:\n"
                       "  - {name: a, model: meta-llama/Llama-3.1-8B, served_model_name: alpha, hardware: H100}\n"
                       "  - {name: b, model: Qwen/Qwen3-32B, served_model_name: beta, hardware: H100}\n")
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"input_toks": 50, "output_toks": 3, "arrival_time_ns": i * 10**8,
                                         "model": model}) + "\n"
                             for i, model in enumerate(["alpha", "beta", "GPT-4", "beta"])))
    with server_process("--cluster", str(cluster), "--speed", "50") as url:
        code = cli(["loadgen", str(trace), "--base-url", url, "--speedup", "50", "--model-map", "GPT-4=alpha",
                    "-o", str(tmp_path / "run")])
        assert code == 0, capsys.readouterr().err
        asked = [json.loads(line)["model"] for line in (tmp_path / "run" / "requests.jsonl").read_text().splitlines()]
        assert sorted(asked) == ["alpha", "alpha", "beta", "beta"]  # GPT-4 sent as alpha
        with urllib.request.urlopen(url + "/metrics") as resp:
            exposition = resp.read().decode()
        assert cli(["loadgen", str(trace), "--base-url", url, "-o", str(tmp_path / "run2")]) == 2
        assert "t.jsonl:3: model 'GPT-4' is not served (served: alpha, beta)" in capsys.readouterr().err
    from prometheus_client.parser import text_string_to_metric_families
    done = {s.labels["model_name"]: s.value for family in text_string_to_metric_families(exposition)
            for s in family.samples
            if s.name == "vllm:request_success_total" and s.labels["finished_reason"] == "length"}
    assert done == {"alpha": 2, "beta": 2}
