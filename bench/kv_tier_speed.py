"""Microseconds per KV block of offload stores through a full CPU tier and a CXL tier below it: each store
is one request's ~70 new prompt blocks, each pushing as many out of CPU into CXL and out of CXL.

    python bench/kv_tier_speed.py [--repeat 5] [--baseline DIR] [--requests [--in-flight]]

Medians of `--repeat` rounds of 6,000 stores, interleaved with a checkout of another commit if given.
`--requests`: the stores are an engine's requests instead, three running at once, each storing its 70
blocks over 5 steps and then finishing (the CPU tier ranks a running request's blocks by its rank).
`--in-flight`: their stores take time, as an engine's own offload does (each step's jobs start at its end
and are reported at the next schedule; a finished request's end comes at the next step).
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
REQUESTS_ROUND = """
import random, time
from emulator.kv_tiers import KVTier, Offload, TierSpec
offload = Offload([KVTier(TierSpec("cpu", 32768, 1e9, 0.0), 1.0), KVTier(TierSpec("cxl", 65536, 1e9, 0.0), 1.0)],
                  stores_in_flight={in_flight})
clock = [0.0]
rng = random.Random(0)
stores = [[rng.getrandbits(64) for _ in range(70)] for _ in range(6000)]
finish = getattr(offload, "finish_requests", lambda: None)

def run(prompts):
    running = {}  # request -> [blocks, full]
    for blocks in prompts:
        request = object()
        offload.admit(request)
        running[request] = [blocks, 0]
        if len(running) < 3:
            continue
        while len(running) == 3:
            clock[0] += 0.01
            if offload.stores_in_flight:
                offload.advance(clock[0])
            for request, progress in list(running.items()):
                blocks, full = progress
                progress[1] = full + 14
                offload.store_full_blocks(blocks, full, full + 14, 70, request)
                if full + 14 == 70:
                    offload.request_finished(request, blocks, 70, 70)
                    del running[request]
            if offload.stores_in_flight:
                offload.step_ended(clock[0] + 0.005)
            finish()

run(stores[:1500])  # fill both tiers first
start = time.perf_counter()
run(stores[1500:])
print((time.perf_counter() - start) / (4500 * 70) * 1e6)
"""


def one_round(tree: Path, script: str) -> float:
    out = subprocess.run([sys.executable, "-c", script], cwd=tree, check=True, capture_output=True, text=True)
    return float(out.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--baseline", type=Path, default=None, help="a checkout of another commit, run interleaved")
    parser.add_argument("--requests", action="store_true", help="stores by an engine's requests over several steps")
    parser.add_argument("--in-flight", action="store_true", help="with --requests: stores take time (store jobs)")
    args = parser.parse_args()
    script = REQUESTS_ROUND.replace("{in_flight}", str(args.in_flight)) if args.requests else ROUND
    trees = [ROOT] + ([args.baseline.resolve()] if args.baseline else [])
    times: dict[Path, list[float]] = {tree: [] for tree in trees}
    for _ in range(args.repeat):
        for tree in trees:
            times[tree].append(one_round(tree, script))
    for tree in trees:
        print(f"{tree}: {statistics.median(times[tree]):.3f} us a block (median of {args.repeat})")
    if args.baseline:
        print(f"ratio: {statistics.median(times[ROOT]) / statistics.median(times[trees[1]]):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
