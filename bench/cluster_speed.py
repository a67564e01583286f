"""Wall time of cluster replays, whole process, as medians — beside one instance on the same machine.

    python bench/cluster_speed.py [--repeat 5]

Cases (the Azure 2023 conversation trace, 19,366 requests, one hour): one H100 (the
single-deployment figure of bench/replay_speed.py), an 8-instance heterogeneous cluster
(H100, H200, A100, B200; bench/clusters/azure-8-heterogeneous.yaml), and 64 instances
(bench/clusters/azure-64.yaml), whose start-up (reading the cluster file and building every
instance's deployment and engines, no trace) is timed on its own too.
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

ROOT = Path(__file__).resolve().parent.parent
TRACE = ROOT.parent / "shared" / "data" / "traces" / "azure2023" / "AzureLLMInferenceTrace_conv.csv"
CLUSTERS = ROOT / "bench" / "clusters"
CASES = {
    "one H100": ["--hardware", "H100"],
    "8 instances, 4 device types": ["--cluster", str(CLUSTERS / "azure-8-heterogeneous.yaml")],
    "64 instances": ["--cluster", str(CLUSTERS / "azure-64.yaml")],
}
STARTUP = """
import sys, time
t = time.perf_counter()
from emulator.cluster import build_cluster
from profiles.cluster_file import read_cluster_file
spec, _ = read_cluster_file(sys.argv[1])
sim = build_cluster(spec)
print(time.perf_counter() - t, len(sim.instances), len(sim.engines))
"""


def run_once(flags: list[str]) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "vllm_emulator", "replay", str(TRACE), *flags, "-o", out],
                       cwd=ROOT, check=True, capture_output=True)
        wall = time.perf_counter() - start
        return wall, json.loads((Path(out) / "summary.json").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    starts = []
    for _ in range(args.repeat):
        done = subprocess.run([sys.executable, "-c", STARTUP, str(CLUSTERS / "azure-64.yaml")], cwd=ROOT,
                              check=True, capture_output=True, text=True)
        seconds, instances, engines = done.stdout.split()
        starts.append(float(seconds))
    print(f"64-instance start-up (read the file, build {instances} instances / {engines} engines): median "
          f"{statistics.median(starts):.2f} s (min {min(starts):.2f}, max {max(starts):.2f}, n={len(starts)})")
    for name, flags in CASES.items():
        walls, loops, summary = [], [], {}
        for _ in range(args.repeat):
            wall, summary = run_once(flags)
            walls.append(wall)
            loops.append(summary["wall_seconds"])
        print(f"{name}: {summary['num_requests']} requests, {summary['num_steps']} engine steps, "
              f"{summary['duration']:.0f} s virtual; whole-process wall median {statistics.median(walls):.2f} s "
              f"(min {min(walls):.2f}, max {max(walls):.2f}, n={len(walls)}); simulation loop median "
              f"{statistics.median(loops):.2f} s; TTFT mean {1000 * summary['ttft']['mean']:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
