"""Microseconds per KV block of offload stores through a full CPU tier and a CXL tier below it: each store
is one request's ~70 new prompt blocks, each pushing as many out of CPU into CXL and out of CXL.

    python bench/kv_tier_speed.py [--repeat 5] [--baseline DIR]

Medians of `--repeat` rounds of 6,000 stores, interleaved with a checkout of another commit if given.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROUND = """
import random, time
from emulator.kv_tiers import KVTier, Offload, TierSpec
offload = Offload([KVTier(TierSpec("cpu", 32768, 1e9, 0.0), 1.0), KVTier(TierSpec("cxl", 65536, 1e9, 0.0), 1.0)])
rng = random.Random(0)
stores = [[rng.getrandbits(64) for _ in range(70)] for _ in range(6000)]
for store in stores[:1500]:  # fill both tiers first
    offload.store(store)
start = time.perf_counter()
for store in stores[1500:]:
    offload.store(store)
print((time.perf_counter() - start) / (4500 * 70) * 1e6)
"""


def one_round(tree: Path) -> float:
    out = subprocess.run([sys.executable, "-c", ROUND], cwd=tree, check=True, capture_output=True, text=True)
    return float(out.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--baseline", type=Path, default=None, help="a checkout of another commit, run interleaved")
    args = parser.parse_args()
    trees = [ROOT] + ([args.baseline.resolve()] if args.baseline else [])
    times: dict[Path, list[float]] = {tree: [] for tree in trees}
    for _ in range(args.repeat):
        for tree in trees:
            times[tree].append(one_round(tree))
    for tree in trees:
        print(f"{tree}: {statistics.median(times[tree]):.3f} us a block (median of {args.repeat})")
    if args.baseline:
        print(f"ratio: {statistics.median(times[ROOT]) / statistics.median(times[trees[1]]):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
