"""A steady stream of chat requests, so a fresh dashboard has something to show.

    python deploy/traffic.py --url http://localhost:8000 --rate 4 --duration 600

Open loop: arrivals are Poisson at `--rate` per second, whatever the server answers, so a
rate above the simulated device's capacity builds a queue, as it would in front of vLLM.
Prompts start with one of a few shared system prompts (so the prefix cache gets hits) and
end with a question of random length; `max_tokens` is random too. It needs only aiohttp
(already in the emulator's image). It is a demo source, not a benchmark: for measured load
tests use `vllm bench serve` or the project's load generator.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time

import aiohttp

WORDS = ("the", "cluster", "latency", "token", "budget", "request", "model", "cache", "router", "queue",
         "prefill", "decode", "batch", "memory", "replica", "traffic", "question", "answer", "policy", "shard")


def system_prompts(count: int, words: int, rng: random.Random) -> list[str]:
    return [f"You are assistant {i}. " + " ".join(rng.choices(WORDS, k=words)) for i in range(count)]


async def wait_for_model(http: aiohttp.ClientSession, url: str, timeout: float) -> str:
    """The served model's name, once the server answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with http.get(url + "/v1/models") as response:
                if response.status == 200:
                    return (await response.json())["data"][0]["id"]
        except aiohttp.ClientError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer /v1/models within {timeout:.0f} s")
        await asyncio.sleep(1)


class Tally:
    def __init__(self) -> None:
        self.sent = self.ok = self.failed = 0


async def one_request(http: aiohttp.ClientSession, url: str, body: dict, tally: Tally) -> None:
    try:
        async with http.post(url + "/v1/chat/completions", json=body) as response:
            await response.read()
            if response.status == 200:
                tally.ok += 1
            else:
                tally.failed += 1
    except aiohttp.ClientError:
        tally.failed += 1


async def run(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    prompts = system_prompts(args.system_prompts, args.system_words, rng)
    tally = Tally()
    timeout = aiohttp.ClientTimeout(total=None)
    connector = aiohttp.TCPConnector(limit=args.max_in_flight)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        model = await wait_for_model(http, args.url, args.wait)
        print(f"sending {args.rate:g} req/s to {args.url} ({model})", flush=True)
        tasks: set[asyncio.Task] = set()
        start = last_report = time.monotonic()
        next_arrival = start
        while args.duration == 0 or next_arrival - start < args.duration:
            await asyncio.sleep(max(0.0, next_arrival - time.monotonic()))
            question = " ".join(rng.choices(WORDS, k=max(1, int(rng.lognormvariate(args.question_words_mu, 0.8)))))
            body = {"model": model, "max_tokens": rng.randint(args.min_tokens, args.max_tokens),
                    "messages": [{"role": "system", "content": rng.choice(prompts)},
                                 {"role": "user", "content": question}]}
            task = asyncio.create_task(one_request(http, args.url, body, tally))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            tally.sent += 1
            next_arrival += rng.expovariate(args.rate)
            if time.monotonic() - last_report >= args.report_every:
                last_report = time.monotonic()
                print(f"sent {tally.sent}, ok {tally.ok}, failed {tally.failed}, in flight {len(tasks)}", flush=True)
        await asyncio.gather(*tasks)
    print(f"done: sent {tally.sent}, ok {tally.ok}, failed {tally.failed}", flush=True)
    return 0 if tally.failed == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://localhost:8000", help="the emulator's base URL")
    parser.add_argument("--rate", type=float, default=2.0, help="requests per second (Poisson)")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of arrivals; 0: until stopped")
    parser.add_argument("--system-prompts", type=int, default=4, help="distinct shared system prompts")
    parser.add_argument("--system-words", type=int, default=400, help="words in each system prompt")
    parser.add_argument("--question-words-mu", type=float, default=4.5,
                        help="mu of the log-normal question length in words (4.5: median 90)")
    parser.add_argument("--min-tokens", type=int, default=16, help="smallest max_tokens drawn")
    parser.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens drawn")
    parser.add_argument("--max-in-flight", type=int, default=1000, help="connections open at most")
    parser.add_argument("--wait", type=float, default=300.0, help="seconds to wait for the server to answer")
    parser.add_argument("--report-every", type=float, default=30.0, help="seconds between progress lines")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.duration < 0 or not 1 <= args.min_tokens <= args.max_tokens:
        parser.error("need --rate > 0, --duration >= 0 and 1 <= --min-tokens <= --max-tokens")
    try:
        return asyncio.run(run(args))
    except (TimeoutError, KeyboardInterrupt) as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
