"""Memory per request waiting in `vllm-emulator serve`'s queue (vLLM's default: no bound).

    python bench/server_queue_memory.py [--requests 2000] [--prompt-tokens 1000] [--stream]

Starts a server in a child process whose engine runs one request at a time at a crawl
(`--max-num-seqs 1 --speed 0.001`), so everything sent waits; sends N completions over held-open
connections (prompts of about --prompt-tokens Llama 3 tokens, distinct, max_tokens 128) and reads
the server's resident memory (VmRSS) before and after they are all queued. Prints the memory
per queued request; --max-num-queued-reqs bounds the queue (with vLLM's 503 past it).
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.server_throughput import child  # noqa: E402
from server.testing import free_port  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def waiting(port: int) -> int:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    line = next(li for li in text.splitlines() if li.startswith("vllm:num_requests_waiting{"))
    return int(float(line.rsplit(" ", 1)[1]))


def queue_requests(http: aiohttp.ClientSession, port: int, n: int, prompt_tokens: int,
                   stream: bool) -> list[asyncio.Task]:
    words = "the quick brown fox jumps over a lazy dog ".split()

    async def one(i: int) -> None:
        prompt = f"request {i}: " + " ".join(words[(i + k) % len(words)] for k in range(prompt_tokens))
        async with http.post(f"http://127.0.0.1:{port}/v1/completions",
                             json={"prompt": prompt, "max_tokens": 128, "stream": stream}) as r:
            await r.read()
    return [asyncio.ensure_future(one(i)) for i in range(n)]


async def measure(port: int, pid: int, n: int, prompt_tokens: int, stream: bool) -> dict:
    before = rss_mib(pid)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        tasks = queue_requests(http, port, n, prompt_tokens, stream)
        start = time.perf_counter()
        while waiting(port) < n - 1:  # one runs
            if time.perf_counter() - start > 300:
                raise TimeoutError("the requests did not all reach the queue within 300 s")
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.0)
        after = rss_mib(pid)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"requests": n, "prompt_tokens": prompt_tokens, "stream": stream, "rss_before_mib": before,
            "rss_after_mib": after, "kib_per_request": (after - before) * 1024 / n}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--stream", action="store_true")
    args = parser.parse_args()
    port = free_port()
    command = [sys.executable, "-m", "vllm_emulator", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--disable-uvicorn-access-log", "--disable-log-stats", "--max-num-seqs", "1", "--speed", "0.001"]
    with open("/dev/null", "w") as log, child(command, port, log) as server:
        result = asyncio.run(measure(port, server.pid, args.requests, args.prompt_tokens, args.stream))
    print(f"{result['requests']} requests queued ({result['prompt_tokens']} prompt tokens each, "
          f"{'streamed' if result['stream'] else 'not streamed'}): RSS {result['rss_before_mib']:.0f} -> "
          f"{result['rss_after_mib']:.0f} MiB, {result['kib_per_request']:.1f} KiB per queued request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
