"""`vllm-emulator serve` with its delivery lag measured, for the server benchmarks.

    python bench/instrumented_server.py LAG_JSON [serve flags...]

Runs the server exactly as `serve` does and records, for every engine step, how late
its tokens left: when the server started and when it finished writing them, minus the
wall time the step was due (its virtual end / speed). On SIGTERM it writes to LAG_JSON
{"samples": [[wall time the writes ended, first lag, last lag, tokens], ...]} (seconds;
perf_counter, which is the same clock in every process on Linux) and a summary of the
last lags, and, with --profile-out FILE, where the Python time went (cProfile, sorted by
cumulative time).
"""
from __future__ import annotations

import asyncio
import cProfile
import gc
import json
import pstats
import signal
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_emulator.cli import build_parser  # noqa: E402
from server.serve import start_server  # noqa: E402


class LagRecorder:
    def __init__(self, pacer) -> None:
        self.pacer = pacer
        self.samples: list[tuple[float, float, float, int]] = []
        self.lags: list[float] = []
        self.tokens = 0
        self.first: float | None = None
        self.last: float | None = None
        self._started = 0.0

    def before_step(self, record) -> None:
        self._started = time.perf_counter()

    def on_step(self, record) -> None:
        now = time.perf_counter()
        due = self.pacer.wall_time(record.end)
        self.samples.append((now, self._started - due, now - due, len(record.got_token)))
        self.lags.append(now - due)
        self.tokens += len(record.got_token)
        if self.first is None:
            self.first = now
        self.last = now

    def summary(self) -> dict:
        if not self.lags:
            return {"samples": [], "count": 0}
        a = np.asarray(self.lags) * 1000.0
        span = (self.last - self.first) if self.last and self.first else 0.0
        return {"samples": self.samples, "count": len(a), "p50_ms": float(np.percentile(a, 50)),
                "p90_ms": float(np.percentile(a, 90)),
                "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max()),
                "steps_per_s": len(a) / span if span else 0.0, "tokens": self.tokens,
                "tokens_per_s": self.tokens / span if span else 0.0}


async def serve(args, lag_json: Path, profile_out: Path | None) -> None:
    server = await start_server(args)
    gc.collect()
    gc.freeze()  # as serve does
    recorder = LagRecorder(server.engine.pacer)
    # around the engine client's listener, which writes the step's tokens (the Simulation has no
    # public way to put a listener first; this is a measuring instrument, not the server)
    server.engine.sim._listeners.insert(0, recorder.before_step)
    server.engine.sim.add_listener(recorder.on_step)
    profiler = cProfile.Profile() if profile_out else None
    if profiler:
        profiler.enable()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening on {server.ports[0]}", flush=True)
    await stop.wait()
    if profiler:
        profiler.disable()
        with profile_out.open("w") as f:
            pstats.Stats(profiler, stream=f).sort_stats("cumulative").print_stats(40)
    lag_json.write_text(json.dumps(recorder.summary()) + "\n")
    await server.close()


def main() -> None:
    lag_json = Path(sys.argv[1])
    argv = sys.argv[2:]
    profile_out = None
    if "--profile-out" in argv:
        i = argv.index("--profile-out")
        profile_out = Path(argv[i + 1])
        del argv[i:i + 2]
    args = build_parser("serve").parse_args(argv)
    try:
        import uvloop
        run = uvloop.run
    except ImportError:
        run = asyncio.run
    run(serve(args, lag_json, profile_out))


if __name__ == "__main__":
    main()
