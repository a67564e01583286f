"""Whether large request bodies stall the other streams of `vllm-emulator serve`.

    python bench/server_large_bodies.py [--megabytes 24] [--bodies 3]

One stream of 700 tokens at --speed 1 (a chunk every ~7 ms) is read here, timing the gap between
its chunks; meanwhile another process posts --bodies completions of about --megabytes MB each, a
big array in an unknown field (vLLM accepts unknown fields). The same run without the big bodies
is the baseline. Prints the gaps (p50, p99, max) of both and the memory the server kept (VmRSS).
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.server_queue_memory import rss_mib  # noqa: E402
from bench.server_throughput import child  # noqa: E402
from server.testing import free_port  # noqa: E402

SENDER = r'''
import sys, time, urllib.request
url, megabytes, bodies = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
count = int(megabytes * 1e6 / 7)
body = ('{"prompt": "hello", "max_tokens": 3, "junk": [' + ",".join(["123456"] * count) + "]}").encode()
for _ in range(bodies):
    start = time.perf_counter()
    request = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as r:
        print(f"{len(body) / 1e6:.1f} MB answered {r.status} in {time.perf_counter() - start:.2f} s", flush=True)
'''


async def stream_gaps(port: int, megabytes: float, bodies: int) -> np.ndarray:
    gaps: list[float] = []
    async with aiohttp.ClientSession() as http:
        payload = {"prompt": "hi", "max_tokens": 700, "ignore_eos": True, "stream": True}
        async with http.post(f"http://127.0.0.1:{port}/v1/completions", json=payload) as r:
            last = None
            sender = None
            async for _ in r.content.iter_any():
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now
                if sender is None and bodies:
                    sender = await asyncio.create_subprocess_exec(
                        sys.executable, "-c", SENDER, f"http://127.0.0.1:{port}", str(megabytes), str(bodies))
            if sender is not None:
                await sender.wait()
    return np.asarray(gaps) * 1000


def run(megabytes: float, bodies: int) -> tuple[np.ndarray, float]:
    port = free_port()
    command = [sys.executable, "-m", "vllm_emulator", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--disable-uvicorn-access-log", "--disable-log-stats", "--speed", "1"]
    with open("/dev/null", "w") as log, child(command, port, log) as server:
        gaps = asyncio.run(stream_gaps(port, megabytes, bodies))
        return gaps, rss_mib(server.pid)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=24.0)
    parser.add_argument("--bodies", type=int, default=3)
    args = parser.parse_args()
    runs = (("baseline, no big body", 0), (f"{args.bodies} bodies of {args.megabytes:g} MB", args.bodies))
    for label, bodies in runs:
        gaps, rss = run(args.megabytes, bodies)
        print(f"{label}: gap between chunks p50 {np.percentile(gaps, 50):.1f} ms, "
              f"p99 {np.percentile(gaps, 99):.1f} ms, max {gaps.max():.1f} ms; server RSS after {rss:.0f} MiB",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
