"""Wall time of cluster replays, whole process, as medians against floors — beside one instance.

    python bench/cluster_speed.py [--repeat 5] [--only CASE ...] [--baseline DIR]

Cases (the Azure 2023 conversation trace, 19,366 requests, one hour): one H100 (the
single-deployment figure of bench/replay_speed.py), an 8-instance heterogeneous cluster
(H100, H200, A100, B200; bench/clusters/azure-8-heterogeneous.yaml), and 64 instances
(bench/clusters/azure-64.yaml), whose start-up (reading the cluster file and building every
instance's deployment and engines, no trace) is timed on its own too. `--baseline DIR` runs a
checkout of another commit interleaved with this one (bench/replay_timing.py says how runs are timed).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

from replay_timing import ROOT, core, load_average, measure, report

TRACE = str(ROOT.parent / "shared" / "data" / "traces" / "azure2023" / "AzureLLMInferenceTrace_conv.csv")
CLUSTERS = ROOT / "bench" / "clusters"
# name: (replay arguments, floor in seconds or None)
CASES = {
    "one H100": ([TRACE, "--hardware", "H100"], None),
    "8 instances, 4 device types": ([TRACE, "--cluster", str(CLUSTERS / "azure-8-heterogeneous.yaml")], 10.0),
    "64 instances": ([TRACE, "--cluster", str(CLUSTERS / "azure-64.yaml")], None),
}
STARTUP_FLOOR = 5.0
STARTUP = """
import sys, time
t = time.perf_counter()
from emulator.cluster import build_cluster
from profiles.cluster_file import read_cluster_file
spec, _ = read_cluster_file(sys.argv[1])
sim = build_cluster(spec)
print(time.perf_counter() - t, len(sim.instances), len(sim.engines))
"""


def startup_once(tree: Path) -> tuple[float, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = str(tree)
    done = subprocess.run([sys.executable, "-c", STARTUP, str(CLUSTERS / "azure-64.yaml")], cwd=tree, env=env,
                          check=True, capture_output=True, text=True)
    seconds, instances, engines = done.stdout.split()
    return float(seconds), instances, engines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", choices=["startup", *CASES], action="append")
    parser.add_argument("--baseline", type=Path, default=None, help="a checkout of another commit, run interleaved")
    args = parser.parse_args()
    trees = [ROOT] + ([args.baseline.resolve()] if args.baseline else [])
    print(f"start: {load_average()}")
    for tree in trees:
        print(f"{tree}: {core(tree)}")
    if not args.only or "startup" in args.only:
        for tree in trees:
            startup_once(tree)  # not counted: fills the bytecode cache
        starts: list[list[float]] = [[] for _ in trees]
        for _ in range(args.repeat):
            for tree, runs in zip(trees, starts):
                seconds, instances, engines = startup_once(tree)
                runs.append(seconds)
        mine = statistics.median(starts[0])
        print(f"64-instance start-up (read the file, build {instances} instances / {engines} engines): median "
              f"{mine:.2f} s (min {min(starts[0]):.2f}, max {max(starts[0]):.2f}, n={len(starts[0])}); floor "
              f"{STARTUP_FLOOR:g} s: {'met' if mine <= STARTUP_FLOOR else 'NOT met'}")
        if args.baseline:
            print(f"  baseline median {statistics.median(starts[1]):.2f} s; ratio of medians "
                  f"{mine / statistics.median(starts[1]):.2f}")
    for name, (replay_args, floor) in CASES.items():
        if args.only and name not in args.only:
            continue
        print(report(name, measure(replay_args, args.repeat, trees), floor), flush=True)
    print(f"end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
