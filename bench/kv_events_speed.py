"""What vLLM-exact KV events cost: hashing a block, and a whole replay with every engine recording events.

    python bench/kv_events_speed.py [--requests 2000] [--repeat 5]

1. Microseconds per block of emulator.kv_events.BlockHasher (16 token ids of a 128k vocabulary) for
   sha256 (pickle) and sha256_cbor (our CBOR encoder), medians of `--repeat` timings.
2. Wall time of an offline run of the same arrivals (Llama-3.1-8B on an H100; prompts sharing 8
   system prompts, 4000 KV blocks: the cache evicts) with and without a recorder on the engine's
   pool that is drained after every step, as the server's publishers drain it (no sockets): medians,
   their ratio, and what was recorded.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import timeit
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from emulator.cluster import build_simulation  # noqa: E402
from emulator.config import EngineArgs  # noqa: E402
from emulator.kv_events import BlockHasher, BlockRemoved, BlockStored, KVEventRecorder  # noqa: E402
from emulator.request import Request  # noqa: E402
from profiles.deployment import build_deployment  # noqa: E402


def hash_cost(repeat: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    blocks = [rng.integers(0, 128_256, 16).tolist() for _ in range(2000)]
    out = {}
    for algo in ("sha256", "sha256_cbor"):
        hasher = BlockHasher(algo)
        parent = hasher.none_hash

        def run() -> None:
            for block in blocks:
                hasher.block_hash(parent, block)
        out[algo] = statistics.median(timeit.repeat(run, number=1, repeat=repeat)) / len(blocks) * 1e6
    return out


def arrivals(n: int) -> list[Request]:
    rng = np.random.default_rng(1)
    systems = [rng.integers(0, 128_256, int(rng.integers(200, 1500))) for _ in range(8)]
    requests = []
    for i in range(n):
        prompt = np.concatenate([systems[i % 8], rng.integers(0, 128_256, int(rng.integers(20, 800)))])
        out = int(rng.integers(20, 400))
        requests.append(Request(f"r{i}", len(prompt), out, arrival_time=i * 0.05, prompt_token_ids=prompt,
                                output_token_ids=rng.integers(0, 128_256, out)))
    return requests


def replay(deployment, n: int, events: bool) -> tuple[float, dict]:
    requests = arrivals(n)  # built outside the timing
    sim = build_simulation(deployment)
    counts = {"stored": 0, "removed": 0}
    if events:
        recorder = KVEventRecorder(BlockHasher("sha256"), deployment.config.block_size)
        sim.engines[0].kv.attach_events(recorder)
        sim.add_finish_listener(recorder.request_finished)

        def drain(record) -> None:
            for e in recorder.take_events():
                if isinstance(e, BlockStored):
                    counts["stored"] += len(e.block_hashes)
                elif isinstance(e, BlockRemoved):
                    counts["removed"] += 1
        sim.add_listener(drain, drain)
    start = time.perf_counter()
    sim.run(requests)
    return time.perf_counter() - start, counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    for algo, us in hash_cost(args.repeat).items():
        print(f"{algo:<12} {us:6.2f} us per block")
    deployment = build_deployment("meta-llama/Llama-3.1-8B", "H100",
                                  EngineArgs(num_gpu_blocks_override=4000, max_model_len=8192))
    times = {False: [], True: []}
    counts = {}
    for _ in range(args.repeat):
        for events in (False, True):
            seconds, counts_now = replay(deployment, args.requests, events)
            times[events].append(seconds)
            if events:
                counts = counts_now
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"replay of {args.requests} requests: {off:.2f} s without events, {on:.2f} s with events "
          f"(x{on / off:.2f}); {counts['stored']} blocks stored, {counts['removed']} removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
