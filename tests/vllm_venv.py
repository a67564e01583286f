"""The CPU venv holding vLLM's own code, for the tests that compare with it (marked `vllm`): find it or skip,
and run a script of ours there with one JSON job on stdin and one JSON answer as its last line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from scheduler_diff import find_vllm_python  # noqa: E402


def vllm_python_or_skip(*modules: str) -> str:
    """The venv's python, which imports vLLM and `modules`; skips the test where there is none."""
    python = find_vllm_python(None)
    if python is None:
        pytest.skip("no vLLM CPU venv ($VLLM_CPU_VENV, ../.vllm-cpu, /work/venvs/vllm-cpu)")
    needed = ", ".join(repr(m) for m in ("vllm", *modules))
    probe = subprocess.run([python, "-c", f"import importlib.util as u, sys; "
                            f"sys.exit(not all(u.find_spec(m) for m in ({needed},)))"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"{python} cannot import vllm")
    return python


def run_vllm_side(python: str, script: Path, job: dict) -> dict:
    """Run `script` with vLLM's python on `job`; its answer."""
    done = subprocess.run([python, str(script)], input=json.dumps(job), capture_output=True, text=True,
                          cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def kv_events_diff(python: str, workloads: list[str]) -> list[dict]:
    """bench/kv_events_diff.py's results on these workloads (each in sync and async scheduling, with sha256
    and sha256_cbor), every one checked to agree with vLLM's own block pool."""
    done = subprocess.run([python, str(REPO / "bench" / "kv_events_diff.py"), "--json",
                           *(arg for name in workloads for arg in ("--only", name))],
                          capture_output=True, text=True, cwd=REPO, timeout=900)
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == len(workloads) * 2 * 2
    for r in results:
        assert r["agrees"], (r["workload"], r["mode"], r["algo"], r["first_divergence"], r["errors"])
    return results
