"""vLLM's periodic log line: its prefix-cache hit rates are CachingMetrics windows over the most recent
1,000 new requests, not the rate of the last interval."""
from __future__ import annotations

import aiohttp

from server.periodic_log import HitRateWindow, PeriodicLogger
from server.testing import running_server


def test_the_window_keeps_the_most_recent_requests_and_always_the_newest_step():
    window = HitRateWindow(max_recent_requests=10)
    assert window.empty and window.hit_rate == 0.0
    window.observe(0, 0, 0)  # a step with no lookup is not kept (it would push older ones out)
    assert window.empty
    window.observe(4, 400, 100)
    window.observe(4, 400, 300)
    assert (window.requests, window.hit_rate) == (8, 0.5)
    window.observe(4, 400, 400)  # 12 requests: the oldest step leaves
    assert (window.requests, window.queries, window.hits) == (8, 800, 700)
    window.observe(30, 3000, 0)  # more than the window alone: it stays, by itself
    assert (window.requests, window.hit_rate) == (30, 0.0)
    window.reset()
    assert window.empty


def _hit_rate(line: str) -> float:
    return float(line.split("Prefix cache hit rate: ")[1].split("%")[0])


async def test_the_log_lines_hit_rate_covers_the_recent_requests_across_intervals():
    prompt = "the same prompt " * 40
    async with running_server("--speed", "1000", "--disable-log-stats") as server:
        stats = PeriodicLogger(server.engine.sim, server.engine.pacer)
        kv = server.engine.sim.engines[0].kv
        async with aiohttp.ClientSession() as http:
            async def complete() -> None:
                payload = {"prompt": prompt, "max_tokens": 4, "ignore_eos": True}
                async with http.post(server.url + "/v1/completions", json=payload) as r:
                    assert r.status == 200
                    await r.read()
            await complete()  # a miss
            (first,) = stats.lines()
            await complete()  # the same prompt: a hit, in the next interval
            (second,) = stats.lines()
    assert _hit_rate(first) == 0.0
    assert kv.prefix_requests == 2 and kv.prefix_hits > 0
    # both requests' lookups, as vLLM's window has them (the last interval alone would be hits / its queries)
    assert _hit_rate(second) == round(100 * kv.prefix_hits / kv.prefix_queries, 1)
    assert _hit_rate(second) < round(100 * kv.prefix_hits / (kv.prefix_queries / 2), 1)
