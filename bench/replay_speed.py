"""Wall time of offline replays, whole process (interpreter start-up included), as medians.

    python bench/replay_speed.py [--repeat 5] [--only sharegpt|azure]

Cases: the 300-request ShareGPT workload of the RTX 4090 calibration run, and the
Azure 2023 conversation trace (19,366 requests, one hour) on one instance of an
RTX PRO 6000 and of an H100.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT.parent / "shared" / "data" / "traces"
CASES = {
    "sharegpt": (TRACES / "sharegpt/sharegpt-llama-3.1-8b-300-sps10.jsonl",
                 ["--model", "meta-llama/Llama-3.1-8B", "--hardware", "RTX4090", "--max-num-seqs", "256",
                  "--max-num-batched-tokens", "2048", "--max-model-len", "32768", "--gpu-memory-utilization", "0.9"]),
    "azure": (TRACES / "azure2023/AzureLLMInferenceTrace_conv.csv",
              ["--model", "meta-llama/Llama-3.1-8B", "--hardware", "RTXPRO6000"]),
    # The serving default (H100): five times the KV cache, so larger batches and more steps.
    "azure_h100": (TRACES / "azure2023/AzureLLMInferenceTrace_conv.csv",
                   ["--model", "meta-llama/Llama-3.1-8B", "--hardware", "H100"]),
}


def run_once(trace: Path, flags: list[str]) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "vllm_emulator", "replay", str(trace), *flags, "-o", out]
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        wall = time.perf_counter() - start
        summary = json.loads((Path(out) / "summary.json").read_text())
    return wall, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", choices=sorted(CASES))
    args = parser.parse_args()
    for name, (trace, flags) in CASES.items():
        if args.only and name != args.only:
            continue
        walls, loops, summary = [], [], {}
        for _ in range(args.repeat):
            wall, summary = run_once(trace, flags)
            walls.append(wall)
            loops.append(summary["wall_seconds"])
        print(f"{name}: {summary['num_requests']} requests, {summary['num_steps']} engine steps, "
              f"{summary['duration']:.0f} s virtual; whole-process wall median {statistics.median(walls):.2f} s "
              f"(min {min(walls):.2f}, max {max(walls):.2f}, n={len(walls)}); simulation loop alone median "
              f"{statistics.median(loops):.2f} s; "
              f"speed-up over real time {summary['duration'] / statistics.median(walls):,.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
