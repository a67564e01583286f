"""How much streaming one `vllm-emulator serve` process sustains, and how many streams it holds on time.

    python bench/server_throughput.py [--hardware H100] [--streams 100 250 500 750 1000]
                                      [--window 5] [--profile FILE] [--json OUT]

Two measurements, each against a fresh server in a child process (bench/instrumented_server.py,
which records when every engine step's tokens were written), with this process as the client:
raw HTTP/1.1 streams that only count the SSE events they receive, so the client stays cheap.

1. Throughput: 512 streams at --speed 1, 2, 4, 8 (each speed asks for that many times more tokens
   per second): the most tokens/s the clients receive while the server keeps up (delivery lag p99
   under 50 ms and not growing over the window). With --profile, where the server's time goes.
2. Concurrency at --speed 1: N streams decoding together (short prompts, 4,000 tokens each);
   once all are streaming, the delivery lag of every token over --window seconds (its write time
   minus its due time, virtual end of its step / speed; a step's tokens are taken as written
   evenly between the first and the last write of the step). The most streams with p99 < 5 ms.

Medians and percentiles are printed; --json writes them too.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.testing import server_process  # noqa: E402

INSTRUMENTED = [sys.executable, str(Path(__file__).resolve().parent / "instrumented_server.py")]
LAG_LIMIT_MS = 5.0
KEEPS_UP_MS = 50.0  # a server that keeps up delivers within this, and its lag does not grow


class Streams:
    """N raw streaming completions; counts the token events each has received."""

    def __init__(self, url: str, n: int, max_tokens: int) -> None:
        host_port = url.split("//", 1)[1]
        self.host, port = host_port.split(":")
        self.port = int(port)
        self.n = n
        self.max_tokens = max_tokens
        self.received = [0] * n
        self.tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self.tasks = [asyncio.ensure_future(self._one(i)) for i in range(self.n)]

    async def _one(self, i: int) -> None:
        body = json.dumps({"prompt": f"stream {i} " + "hello " * 40, "max_tokens": self.max_tokens,
                           "ignore_eos": True, "stream": True}).encode()
        reader, writer = await asyncio.open_connection(self.host, self.port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
        try:
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    break
                self.received[i] += data.count(b'data: {"id"')
        finally:
            writer.close()

    @property
    def total(self) -> int:
        return sum(self.received)

    def all_streaming(self) -> bool:
        return all(self.received)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def token_lags(samples: list[list[float]], t0: float, t1: float) -> np.ndarray:
    """Per-token lags (ms) of the steps that ended in [t0, t1], spread evenly over each step's writes."""
    lags = []
    for wall_end, first_lag, last_lag, n in samples:
        if t0 <= wall_end <= t1 and n:
            lags.append(np.linspace(first_lag, last_lag, int(n)))
    return np.concatenate(lags) * 1000.0 if lags else np.zeros(0)


def measure(hardware: str, n: int, speed: float, window: float, tmp: Path, max_tokens: int = 4000,
            profile: Path | None = None) -> dict:
    """N streams at --speed: tokens/s the clients received and the delivery lag, over `window` s."""
    samples_path = tmp / f"lag-{n}-{speed:g}.json"
    extra = ["--profile-out", str(profile)] if profile else []

    async def run(url):
        clients = Streams(url, n, max_tokens)
        clients.start()
        start = time.perf_counter()
        while not clients.all_streaming():
            if time.perf_counter() - start > 120:
                raise TimeoutError(f"{n} streams did not all start within 120 s")
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # past the admission burst
        t0 = time.perf_counter()
        before = clients.total
        await asyncio.sleep(window)
        t1 = time.perf_counter()
        rate = (clients.total - before) / (t1 - t0)
        await clients.stop()
        return t0, t1, rate
    with server_process("--hardware", hardware, "--speed", str(speed), "--max-model-len", "32768", *extra,
                        program=[*INSTRUMENTED, str(samples_path)]) as url:
        t0, t1, rate = asyncio.run(run(url))
    samples = json.loads(samples_path.read_text())["samples"]
    lags = token_lags(samples, t0, t1)
    in_window = [s for s in samples if t0 <= s[0] <= t1]
    half = len(in_window) // 2
    growth = (np.mean([s[2] for s in in_window[half:]]) - np.mean([s[2] for s in in_window[:half]])) * 1000.0
    return {"streams": n, "speed": speed, "tokens_per_s": rate, "tokens": int(len(lags)),
            "lag_p50_ms": float(np.percentile(lags, 50)), "lag_p99_ms": float(np.percentile(lags, 99)),
            "lag_max_ms": float(lags.max()), "lag_growth_ms": float(growth)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hardware", default="H100")
    parser.add_argument("--streams", type=int, nargs="+", default=[100, 250, 500, 750, 1000],
                        help="stream counts to try (all must fit the engine batch: H100 runs 1,024 at once)")
    parser.add_argument("--throughput-streams", type=int, default=512)
    parser.add_argument("--speeds", type=float, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--window", type=float, default=5.0)
    parser.add_argument("--profile", type=Path, default=None, help="write the server's profile here")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    results: dict = {"hardware": args.hardware}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.skip_throughput:
            results["throughput"] = []
            sustained = 0.0
            for speed in args.speeds:
                t = measure(args.hardware, args.throughput_streams, speed, args.window, tmp)
                results["throughput"].append(t)
                keeps_up = t["lag_p99_ms"] < KEEPS_UP_MS and t["lag_growth_ms"] < KEEPS_UP_MS / 2
                if keeps_up:
                    sustained = max(sustained, t["tokens_per_s"])
                print(f"{t['streams']} streams at --speed {speed:g}: {t['tokens_per_s']:>9,.0f} tokens/s, lag p50 "
                      f"{t['lag_p50_ms']:.1f} ms, p99 {t['lag_p99_ms']:.1f} ms, growth over the window "
                      f"{t['lag_growth_ms']:+.1f} ms {'keeps up' if keeps_up else 'falls behind'}")
            results["sustained_tokens_per_s"] = sustained
            print(f"sustained: {sustained:,.0f} tokens/s (delivery lag p99 < {KEEPS_UP_MS:g} ms, not growing)")
            if args.profile:
                measure(args.hardware, args.throughput_streams, args.speeds[0], args.window, tmp, profile=args.profile)
                print(f"profile of the server at --speed {args.speeds[0]:g}: {args.profile}")
        results["concurrency"] = []
        best = 0
        for n in args.streams:
            c = measure(args.hardware, n, 1.0, args.window, tmp)
            results["concurrency"].append(c)
            ok = c["lag_p99_ms"] < LAG_LIMIT_MS
            best = max(best, n) if ok else best
            print(f"{n:>6} streams: {c['tokens_per_s']:>9,.0f} tokens/s, delivery lag p50 {c['lag_p50_ms']:.2f} ms, "
                  f"p99 {c['lag_p99_ms']:.2f} ms, max {c['lag_max_ms']:.2f} ms {'ok' if ok else 'over 5 ms'}")
        results["max_streams_under_5ms_p99"] = best
        print(f"most concurrent streams with delivery lag p99 < {LAG_LIMIT_MS:g} ms: {best}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
