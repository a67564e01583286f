"""What P/D disaggregation and KV offloading cost in replay wall time: the same eight H100s as
8 mixed instances, and as 4 prefill + 4 decode with CPU offloading and a CXL tier on the prefill side
(issue 9's floor: <= 1.30x); also as 4 prefill + 4 decode without offloading, to tell the two costs apart.

    python bench/pd_speed.py [--repeat 5] [--requests N]

The Azure 2023 conversation trace (19,366 requests, or its first N), whole-process wall time, the
cases interleaved run by run so that the machine's load falls on both alike; medians and the ratio of
medians. Also prints what each layout did (TTFT, TPOT, KV moved, offload hits), so a speed-up that
skipped work would show, and the ratio of CPU-time medians beside that of the wall times (on a machine that
other jobs share, the CPU time moves much less).
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

from replay_timing import child_cpu_seconds, core

ROOT = Path(__file__).resolve().parent.parent
TRACE = ROOT.parent / "shared" / "data" / "traces" / "azure2023" / "AzureLLMInferenceTrace_conv.csv"
CLUSTERS = ROOT / "bench" / "clusters"
CASES = {"8 mixed": CLUSTERS / "azure-8-h100.yaml", "4P+4D, offload": CLUSTERS / "azure-4p4d-h100.yaml",
         "4P+4D, no offload": CLUSTERS / "azure-4p4d-h100-no-offload.yaml"}


def run_once(trace: Path, cluster: Path) -> tuple[float, float, dict]:
    """Wall and CPU seconds of one replay process, and its summary."""
    with tempfile.TemporaryDirectory() as out:
        cpu, start = child_cpu_seconds(), time.perf_counter()
        subprocess.run([sys.executable, "-m", "vllm_emulator", "replay", str(trace), "--cluster", str(cluster),
                        "-o", out], cwd=ROOT, check=True, capture_output=True)
        wall, cpu = time.perf_counter() - start, child_cpu_seconds() - cpu
        return wall, cpu, json.loads((Path(out) / "summary.json").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--requests", type=int, default=None, help="only the trace's first N requests")
    args = parser.parse_args()
    print(f"{ROOT}: {core(ROOT)}")
    with tempfile.TemporaryDirectory() as tmp:
        trace = TRACE
        if args.requests is not None:
            trace = Path(tmp) / "trace.csv"
            lines = TRACE.read_text().splitlines()
            trace.write_text("\n".join(lines[:args.requests + 1]) + "\n")
        walls: dict[str, list[float]] = {name: [] for name in CASES}
        cpus: dict[str, list[float]] = {name: [] for name in CASES}
        summaries: dict[str, dict] = {}
        for _ in range(args.repeat):
            for name, cluster in CASES.items():
                wall, cpu, summaries[name] = run_once(trace, cluster)
                walls[name].append(wall)
                cpus[name].append(cpu)
    for name, summary in summaries.items():
        w = walls[name]
        print(f"{name}: {summary['num_requests']} requests, {summary['num_steps']} engine steps; wall median "
              f"{statistics.median(w):.2f} s (min {min(w):.2f}, max {max(w):.2f}, n={len(w)}; CPU "
              f"{statistics.median(cpus[name]):.2f} s); TTFT mean "
              f"{1000 * summary['ttft']['mean']:.1f} ms, TPOT mean {1000 * summary['tpot']['mean']:.2f} ms, "
              f"external tokens {summary['external_tokens']:,}")
    base, pd, pd_alone = (statistics.median(walls[name]) for name in CASES)
    base_cpu, pd_cpu, pd_alone_cpu = (statistics.median(cpus[name]) for name in CASES)
    print(f"P/D + offload / mixed: {pd / base:.2f} (floor: <= 1.30); CPU time: {pd_cpu / base_cpu:.2f}")
    print(f"of which P/D without offload / mixed: {pd_alone / base:.2f} (CPU {pd_alone_cpu / base_cpu:.2f}); "
          f"offloading adds {pd - pd_alone:.2f} s ({(pd - pd_alone) / base:.2f} of the mixed run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
