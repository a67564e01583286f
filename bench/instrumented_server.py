"""`vllm-emulator serve` with its delivery lag measured, for the server benchmarks.

    python bench/instrumented_server.py LAG_JSON [serve flags...]

Runs the server exactly as `serve` does and records, for every engine step that produced
tokens, when they were written: the delivery that wrote them (see server/pacer.py) began and
ended at two wall times, each minus the wall time the step was due (its virtual end / speed).
On SIGTERM it writes to LAG_JSON {"samples": [[wall time the writes ended, lag when they began,
lag when they ended, tokens, virtual end of the step], ...]} (seconds; perf_counter, which is
the same clock in every process on Linux).
"""
from __future__ import annotations

import asyncio
import gc
import json
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.serve import add_arguments, start_server  # noqa: E402


class LagRecorder:
    def __init__(self, pacer) -> None:
        self.pacer = pacer
        self.pending: list[tuple[float, int]] = []  # (virtual end, tokens) of steps not yet written
        self.samples: list[tuple[float, float, float, int, float]] = []
        self._started = 0.0

    def on_step(self, record) -> None:
        if record.got_token:
            self.pending.append((record.end, len(record.got_token)))

    def before_delivery(self) -> None:
        self._started = time.perf_counter()

    def after_delivery(self) -> None:
        now = time.perf_counter()
        for end, tokens in self.pending:
            due = self.pacer.wall_time(end)
            self.samples.append((now, self._started - due, now - due, tokens, end))
        self.pending.clear()


async def serve(args, lag_json: Path) -> None:
    server = await start_server(args)
    gc.collect()
    gc.freeze()  # as serve does
    pacer = server.engine.pacer
    recorder = LagRecorder(pacer)
    server.engine.sim.add_listener(recorder.on_step)
    # around the engine client's delivery, which writes the tokens (a measuring instrument: it
    # reaches into the pacer's list to go first)
    pacer._deliveries.insert(0, recorder.before_delivery)
    pacer.on_delivery(recorder.after_delivery)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening on {server.ports[0]}", flush=True)
    await stop.wait()
    lag_json.write_text(json.dumps({"samples": recorder.samples}) + "\n")
    await server.shutdown(0)


def main() -> None:
    import argparse
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(sys.argv[2:])
    try:
        import uvloop
        run = uvloop.run
    except ImportError:
        run = asyncio.run
    run(serve(args, Path(sys.argv[1])))


if __name__ == "__main__":
    main()
