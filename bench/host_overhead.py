"""Host time of one engine step in vLLM 0.33: its scheduler's schedule() and update_from_output() by batch size.

    python bench/host_overhead.py [--vllm-python PATH] [--repeats 5]

vLLM's own Scheduler (built as bench/scheduler_diff.py builds it, no GPU) runs a steady batch of N decoding
requests; each step is timed from schedule() to the end of update_from_output() with a model-runner output of
one token per request. Printed: the median step time per N (the fastest of `--repeats` runs, since other
work on the machine only adds) and per request: the part of `HostSpec` (emulator/hardware.py) that the
scheduler accounts for on this CPU. Input preparation and the sampler run in the model runner (on the
GPU's host thread) and are not in it.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

SIZES = (1, 8, 32, 64, 128, 256)


def step_times(n: int, steps: int = 60) -> list[float]:
    import scheduler_diff as sd
    from vllm.v1.outputs import ModelRunnerOutput
    engine = sd.Engine(num_blocks=20000, max_num_seqs=n, max_num_batched_tokens=max(2048, n), max_model_len=8192)
    side = sd.VllmSide(engine, async_scheduling=False)
    rng = np.random.default_rng(0)
    for i in range(n):
        side.add(sd.Arrival(f"r{i}", 0, tuple(rng.integers(100, 32000, 64).tolist()), 4000, gen_seed=i), 0.0)
    scheduler = side.scheduler
    times = []
    for k in range(steps + 10):
        t0 = time.perf_counter()
        out = scheduler.schedule()
        ids = list(out.num_scheduled_tokens)
        index = {r: i for i, r in enumerate(ids)}
        scheduler.update_from_output(out, ModelRunnerOutput(req_ids=ids, req_id_to_index=index,
                                                            sampled_token_ids=[[5]] * len(ids)))
        if k >= 10:  # the first steps are the prefill
            times.append(time.perf_counter() - t0)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-python", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    try:
        import vllm  # noqa: F401
    except ImportError:
        import scheduler_diff as sd
        python = sd.find_vllm_python(args.vllm_python)
        if python is None:
            print("no vLLM venv found: pass --vllm-python", file=sys.stderr)
            return 2
        return subprocess.call([python, __file__, *sys.argv[1:]])
    import logging
    logging.disable(logging.WARNING)
    medians = []
    for n in SIZES:
        best = min(float(np.median(step_times(n))) for _ in range(args.repeats)) * 1e6
        medians.append(best)
        print(f"{n:>5} requests: {best:8.1f} us per step, {best / n:6.1f} us per request", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
