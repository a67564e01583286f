"""Pipeline parallelism: one request's latency and a saturated server's throughput at -pp 1/2/4.

    python bench/pipeline_parallel.py [--model M] [--hardware HW]

One request of 1000 prompt and 100 output tokens alone, then 600 requests (200-800 prompt tokens, 200
output tokens) arriving at 160 per second, on the same deployment with the pipeline 1, 2 and 4 stages
deep (each stage a GPU of its own). Virtual time, so the numbers are exact and the same on every machine.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emulator.cluster import build_simulation  # noqa: E402
from emulator.config import EngineArgs  # noqa: E402
from emulator.engine_flags import model_runner_v2  # noqa: E402
from emulator.request import Request  # noqa: E402
from profiles.deployment import build_deployment  # noqa: E402


def serve(model: str, hardware: str, pp: int, requests: list[Request]) -> list[Request]:
    args = EngineArgs(pipeline_parallel_size=pp, max_model_len=4096, model_runner_v2=model_runner_v2())
    deployment = build_deployment(model, hardware, args)
    sim = build_simulation(deployment, "least_loaded")
    done: list[Request] = []
    sim.add_finish_listener(done.append)
    sim.run(iter(requests))
    return done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="meta-llama/Llama-3.1-8B")
    parser.add_argument("--hardware", default="H100")
    args = parser.parse_args()
    print(f"{args.model} on {args.hardware}")
    print(f"{'pp':>3} {'one request: TTFT ms':>21} {'TPOT ms':>8} {'saturated: tokens/s':>20} {'mean TTFT s':>12}")
    for pp in (1, 2, 4):
        [alone] = serve(args.model, args.hardware, pp, [Request("r", 1000, 100, arrival_time=0.0)])
        rng = np.random.default_rng(1)
        arrivals = np.cumsum(rng.exponential(1 / 160.0, 600))
        load = [Request(f"r{i}", int(rng.integers(200, 800)), 200, arrival_time=float(t))
                for i, t in enumerate(arrivals)]
        done = serve(args.model, args.hardware, pp, load)
        span = max(r.finish_time for r in done) - min(r.arrival_time for r in done)
        tokens = sum(r.num_output_tokens for r in done)
        print(f"{pp:>3} {1e3 * (alone.first_token_time - alone.arrival_time):>21.2f} "
              f"{1e3 * (alone.last_token_time - alone.first_token_time) / (alone.num_output_tokens - 1):>8.3f} "
              f"{tokens / span:>20.0f} {np.mean([r.first_token_time - r.arrival_time for r in done]):>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
