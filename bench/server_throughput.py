"""How many tokens one `vllm-emulator serve` process streams, next to a bare aiohttp SSE sender.

    python bench/server_throughput.py [--hardware H100] [--window 5] [--json OUT] [--py-spy DIR]

Every measurement starts a fresh server in a child process and opens N raw HTTP/1.1 streams
from this one (short prompts, ignore_eos, 30,000 tokens: nothing ends in the window; the
simulated H100 is given a KV cache of 8 M tokens with --num-gpu-blocks-override, so that no
stream is preempted: this measures the front end, not the engine); once all are streaming and
a second has passed, it counts for `--window` seconds:

1. the yardstick: bench/bare_sse_server.py, which writes a chunk of the emulator's size to every
   stream as fast as the CPU allows: chunks/s received, at 500 and 1,000 streams;
2. the emulator behind (--speed 100: tokens always overdue): tokens/s written (the instrumented
   server's count) and chunks/s received, at the same stream counts. Floor: tokens/s >= 0.9 x
   the bare sender's chunks/s;
3. --speed 10 with 500 streams: the delivery lag of every token (written - due: the step's
   virtual end / speed; a step's tokens spread evenly over the delivery that wrote them).
   Floor: p99 < 50 ms (it keeps up);
4. --speed 1 with 1,000 streams: the delivery lag against the simulated inter-token latency
   (median gap between the steps' virtual ends). Floor: lag p99 < ITL p50.

With --py-spy DIR, each emulator run is sampled by py-spy (its `--format raw` output, for
flame graphs and per-function shares). Medians over --repeats runs are printed; --json writes
every run.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.testing import free_port  # noqa: E402

HERE = Path(__file__).resolve().parent
MAX_TOKENS = 30_000
KV_BLOCKS = 500_000  # of 16 tokens: 8,000 tokens for each of 1,000 streams
SETTLE = 1.0  # seconds after every stream has its first token, before counting


@contextmanager
def child(command: list[str], port: int, log) -> subprocess.Popen:
    """A server in a child process, once /health answers; stopped with SIGTERM."""
    process = subprocess.Popen(command, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}: {' '.join(command)}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("the server did not answer /health within 120 s") from None
                time.sleep(0.1)
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Streams:
    """N raw streaming completions; counts the SSE events each has received."""

    def __init__(self, port: int, n: int) -> None:
        self.port = port
        self.n = n
        self.received = [0] * n
        self.tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self.tasks = [asyncio.ensure_future(self._one(i)) for i in range(self.n)]

    async def _one(self, i: int) -> None:
        body = json.dumps({"prompt": f"stream {i} " + "hello " * 40, "max_tokens": MAX_TOKENS,
                           "ignore_eos": True, "stream": True}).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
        try:
            while data := await reader.read(1 << 16):
                self.received[i] += data.count(b'data: {"id"')
        finally:
            writer.close()

    @property
    def total(self) -> int:
        return sum(self.received)

    async def count(self, window: float, on_start=None) -> tuple[float, float, float]:
        """(window start, end, events/s received in it), once every stream has its first event
        (`on_start()` is called as the window opens)."""
        start = time.perf_counter()
        while not all(self.received):
            if time.perf_counter() - start > 180:
                raise TimeoutError(f"{self.n} streams did not all start within 180 s")
            await asyncio.sleep(0.05)
        await asyncio.sleep(SETTLE)
        if on_start is not None:
            on_start()
        t0, before = time.perf_counter(), self.total
        await asyncio.sleep(window)
        t1 = time.perf_counter()
        return t0, t1, (self.total - before) / (t1 - t0)

    async def end(self, server: subprocess.Popen) -> None:
        """Stop the server first (one abort of every stream: one clients leaving one by one would each
        make an overloaded server catch up with the present), then the clients."""
        server.send_signal(signal.SIGTERM)
        await asyncio.wait(self.tasks, timeout=120)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def measure_bare(n: int, window: float, tmp: Path) -> dict:
    port = free_port()
    with open(tmp / f"bare-{n}.log", "w") as log, \
            child([sys.executable, str(HERE / "bare_sse_server.py"), str(port)], port, log) as server:
        _, _, rate = asyncio.run(_run_streams(server, port, n, window))
    return {"server": "bare aiohttp", "streams": n, "chunks_per_s": rate}


async def _run_streams(server: subprocess.Popen, port: int, n: int, window: float,
                       on_start=None) -> tuple[float, float, float]:
    streams = Streams(port, n)
    streams.start()
    try:
        return await streams.count(window, on_start)
    finally:
        await streams.end(server)


def measure_emulator(hardware: str, n: int, speed: float, window: float, tmp: Path,
                     py_spy: Path | None = None) -> dict:
    port = free_port()
    samples_path = tmp / f"lag-{n}-{speed:g}.json"
    command = [sys.executable, str(HERE / "instrumented_server.py"), str(samples_path), "--host", "127.0.0.1",
               "--port", str(port), "--disable-uvicorn-access-log", "--disable-log-stats", "--hardware", hardware,
               "--speed", str(speed), "--max-model-len", "32768", "--num-gpu-blocks-override", str(KV_BLOCKS)]
    with open(tmp / f"emulator-{n}-{speed:g}.log", "w") as log, child(command, port, log) as process:
        spies = []

        def start_py_spy() -> None:  # the steady state only: from the window's start to the server's end
            py_spy.mkdir(parents=True, exist_ok=True)
            spies.append(subprocess.Popen([shutil.which("py-spy") or "py-spy", "record", "-p", str(process.pid), "-r",
                                           "200", "--format", "raw", "-o",
                                           str(py_spy / f"emulator-{n}-speed{speed:g}.txt")],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        t0, t1, rate = asyncio.run(_run_streams(process, port, n, window, start_py_spy if py_spy else None))
        for spy in spies:
            spy.wait(timeout=60)  # it stops with the server
    samples = [s for s in json.loads(samples_path.read_text())["samples"] if t0 <= s[0] <= t1]
    lags = np.concatenate([np.linspace(begin, end, int(tokens)) for _, begin, end, tokens, _ in samples]) * 1000
    ends = np.sort(np.unique([s[4] for s in samples]))
    return {"server": "emulator", "streams": n, "speed": speed, "chunks_per_s": rate,
            "tokens_per_s": float(sum(s[3] for s in samples) / (t1 - t0)),
            "lag_p50_ms": float(np.percentile(lags, 50)), "lag_p99_ms": float(np.percentile(lags, 99)),
            "lag_max_ms": float(lags.max()),
            "itl_p50_ms": float(np.median(np.diff(ends)) * 1000 / speed) if len(ends) > 1 else None}


def median_of(runs: list[dict], key: str) -> float:
    return float(np.median([r[key] for r in runs]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hardware", default="H100")
    parser.add_argument("--window", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--py-spy", type=Path, default=None, help="record each emulator run with py-spy here")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the start", flush=True)
    results: dict = {"hardware": args.hardware, "runs": []}
    floors = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for n in (500, 1000):
            bare = [measure_bare(n, args.window, tmp) for _ in range(args.repeats)]
            behind = [measure_emulator(args.hardware, n, 100, args.window, tmp, args.py_spy)
                      for _ in range(args.repeats)]
            results["runs"] += bare + behind
            bare_rate, tokens = median_of(bare, "chunks_per_s"), median_of(behind, "tokens_per_s")
            print(f"{n:>5} streams  bare aiohttp sender: {bare_rate:>9,.0f} chunks/s | emulator behind (--speed 100): "
                  f"{tokens:>9,.0f} tokens/s in {median_of(behind, 'chunks_per_s'):,.0f} chunks/s "
                  f"= {tokens / bare_rate:.2f} x the bare sender", flush=True)
            floors.append((f"{n} streams behind: tokens/s >= 0.9 x bare chunks/s", tokens >= 0.9 * bare_rate))
        keep_up = [measure_emulator(args.hardware, 500, 10, args.window, tmp, args.py_spy)
                   for _ in range(args.repeats)]
        results["runs"] += keep_up
        p99 = median_of(keep_up, "lag_p99_ms")
        print(f"  500 streams at --speed 10: {median_of(keep_up, 'tokens_per_s'):,.0f} tokens/s, delivery lag p50 "
              f"{median_of(keep_up, 'lag_p50_ms'):.1f} ms, p99 {p99:.1f} ms", flush=True)
        floors.append(("500 streams at --speed 10 keep up: lag p99 < 50 ms", p99 < 50))
        real_time = [measure_emulator(args.hardware, 1000, 1, args.window, tmp, args.py_spy)
                     for _ in range(args.repeats)]
        results["runs"] += real_time
        p99, itl = median_of(real_time, "lag_p99_ms"), median_of(real_time, "itl_p50_ms")
        print(f" 1000 streams at --speed 1: {median_of(real_time, 'tokens_per_s'):,.0f} tokens/s, delivery lag p50 "
              f"{median_of(real_time, 'lag_p50_ms'):.1f} ms, p99 {p99:.1f} ms; simulated ITL p50 {itl:.1f} ms",
              flush=True)
        floors.append(("1000 streams at --speed 1: lag p99 < simulated ITL p50", p99 < itl))
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    for name, met in floors:
        print(f"  {'met' if met else 'NOT MET'}: {name}")
    results["floors"] = {name: met for name, met in floors}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
