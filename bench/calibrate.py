"""Calibration report: replay a real vLLM run with its engine arguments and compare.

    python bench/calibrate.py [RUN_DIR ...] [--markdown]

RUN_DIR is a folder like ../shared/data/calibration/vllm-runs/RTX4090/Llama-3.1-8B
holding vllm/meta.json (engine arguments, device), vllm/requests.jsonl (per-request
engine timestamps) and validation/summary.txt (LLMServingSim 2.0's own error on the
run). The trace the run replayed is looked up in ../shared/data/traces/sharegpt/.

Both sides measure latency the same way, from the engine's queued timestamp (vLLM's
`queued_ts`, our `queued_time`): TTFT = first token - queued, TPOT = (last token -
first token) / (output tokens - 1), E2E = last token - queued.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emulator.config import EngineArgs  # noqa: E402
from profiles.deployment import build_deployment  # noqa: E402
from loadgen.replay import replay  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
DEFAULT_RUNS = [SHARED / "calibration/vllm-runs/RTX4090/Llama-3.1-8B",
                SHARED / "calibration/vllm-runs/RTXPRO6000/Qwen3-30B-A3B-Instruct-2507"]
STATS = ("mean", "p50", "p90", "p99")


def latencies(rows: list[dict]) -> dict[str, np.ndarray]:
    """rows: dicts with queued, first, last, output_tokens."""
    ttft = np.array([r["first"] - r["queued"] for r in rows])
    tpot = np.array([(r["last"] - r["first"]) / (r["output_tokens"] - 1) for r in rows if r["output_tokens"] > 1])
    e2e = np.array([r["last"] - r["queued"] for r in rows])
    return {"TTFT": ttft, "TPOT": tpot, "E2E": e2e}


def stat(values: np.ndarray, name: str) -> float:
    return float(values.mean()) if name == "mean" else float(np.percentile(values, int(name[1:])))


def llmservingsim_errors(summary_txt: Path) -> dict[tuple[str, str], float]:
    """LLMServingSim 2.0's Diff% per (metric, statistic) from validation/summary.txt."""
    names = {"TTFT": "TTFT", "TPOT": "TPOT", "Latency": "E2E"}
    stats = {"Mean": "mean", "Median": "p50", "P90": "p90", "P99": "p99"}
    errors = {}
    if summary_txt.exists():
        for line in summary_txt.read_text().splitlines():
            m = re.match(r"(TTFT|TPOT|Latency) (Mean|Median|P90|P95|P99)\s+\S+\s+\S+\s+([+-][\d.]+)%", line)
            if m and m.group(2) in stats:
                errors[(names[m.group(1)], stats[m.group(2)])] = float(m.group(3))
    return errors


def engine_args(meta: dict) -> EngineArgs:
    kw = meta["engine_kwargs"]
    kv = meta.get("kv_cache", {})
    return EngineArgs(
        max_num_seqs=kw.get("max_num_seqs"),
        max_num_batched_tokens=kw.get("max_num_batched_tokens"),
        max_model_len=kw.get("max_model_len"),
        tensor_parallel_size=kw.get("tensor_parallel_size", 1),
        data_parallel_size=kw.get("data_parallel_size", 1),
        enable_expert_parallel=kw.get("enable_expert_parallel", False),
        block_size=kv.get("block_size", 16),
        gpu_memory_utilization=kv.get("gpu_memory_utilization", 0.9),
        enable_prefix_caching=kv.get("enable_prefix_caching", True),
    )


def hardware_of(run_dir: Path, meta: dict) -> str:
    device = meta.get("hardware", {}).get("device_name")
    return device or run_dir.parent.name


def calibrate(run_dir: Path) -> dict:
    meta = json.loads((run_dir / "vllm/meta.json").read_text())
    trace = SHARED / "traces/sharegpt" / Path(meta["dataset_path"]).name
    deployment = build_deployment(meta["model"], hardware_of(run_dir, meta), engine_args(meta))
    with tempfile.TemporaryDirectory() as out:
        summary = replay(str(trace), deployment, Path(out))
        ours = [json.loads(line) for line in (Path(out) / "requests.jsonl").open()]
    real = [json.loads(line) for line in (run_dir / "vllm/requests.jsonl").open()]
    real_lat = latencies([{"queued": r["queued_ts"], "first": r["first_token_ts"], "last": r["last_token_ts"],
                           "output_tokens": r["output_toks"]} for r in real])
    our_lat = latencies([{"queued": r["queued_time"], "first": r["first_token_time"], "last": r["finish_time"],
                          "output_tokens": r["output_tokens"]} for r in ours])
    lss = llmservingsim_errors(run_dir / "validation/summary.txt")
    rows = []
    for metric in ("TTFT", "TPOT", "E2E"):
        for s in STATS:
            real_v, our_v = stat(real_lat[metric], s) * 1e3, stat(our_lat[metric], s) * 1e3
            rows.append({"metric": metric, "stat": s, "real_ms": real_v, "ours_ms": our_v,
                         "error_pct": 100 * (our_v - real_v) / real_v, "llmservingsim_pct": lss.get((metric, s))})
    real_blocks = meta.get("kv_cache", {}).get("num_gpu_blocks")
    return {"run": str(run_dir.resolve().relative_to(SHARED.resolve())), "model": meta["model"],
            "hardware": deployment.device.name,
            "num_gpu_blocks": deployment.num_gpu_blocks, "real_num_gpu_blocks": real_blocks,
            "preemptions": summary["preemptions"]["total"], "wall_seconds": summary["wall_seconds"],
            "cost_model": deployment.cost_model.describe(), "rows": rows}


def render(result: dict, markdown: bool) -> str:
    blocks = result["num_gpu_blocks"]
    real_blocks = result["real_num_gpu_blocks"]
    blocks_text = f"{blocks} KV blocks" + (
        f" (vLLM: {real_blocks}, {100 * (blocks - real_blocks) / real_blocks:+.1f} %)"
        if real_blocks else " (vLLM's count not recorded in meta.json)")
    head = (f"{result['run']}: {result['model']} on {result['hardware']}; {blocks_text}; "
            f"{result['preemptions']} preemptions; replayed in {result['wall_seconds']:.2f} s wall")
    fmt = lambda v: "—" if v is None else f"{v:+.1f} %"  # noqa: E731
    lines = [head, ""]
    if markdown:
        lines += ["| metric | stat | vLLM (ms) | emulator (ms) | error | LLMServingSim 2.0 error |",
                  "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {r['metric']} | {r['stat']} | {r['real_ms']:.1f} | {r['ours_ms']:.1f} | {r['error_pct']:+.1f} % "
                  f"| {fmt(r['llmservingsim_pct'])} |" for r in result["rows"]]
    else:
        lines.append(f"{'metric':<6} {'stat':<5} {'vLLM ms':>10} {'ours ms':>10} {'error':>8} {'LLMServingSim':>14}")
        lines += [f"{r['metric']:<6} {r['stat']:<5} {r['real_ms']:>10.1f} {r['ours_ms']:>10.1f} "
                  f"{r['error_pct']:>+7.1f}% {fmt(r['llmservingsim_pct']):>14}" for r in result["rows"]]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path, default=DEFAULT_RUNS)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args()
    results = []
    for run in args.runs:
        results.append(calibrate(run))
        print(render(results[-1], args.markdown), end="\n\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
