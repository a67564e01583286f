"""vLLM's periodic engine log line (`LoggingStatLogger`, under its logger's name), every 10 s of wall time
($VLLM_LOG_STATS_INTERVAL) per engine:

    Engine 000: Avg prompt throughput: 812.4 tokens/s, Avg generation throughput: 95.1 tokens/s,
    Running: 12 reqs, Waiting: 0 reqs, GPU KV cache usage: 3.1%, Prefix cache hit rate: 41.0%

Throughputs are tokens per virtual second (what the simulated device achieves); like vLLM,
an engine that stayed idle logs nothing. The hit rates are vLLM's CachingMetrics: over the most recent
1,000 new requests that looked the prefix up, shown once there is one, until a reset_prefix_cache.
Off with --disable-log-stats.
"""
from __future__ import annotations

import asyncio
import logging
import os
from collections import deque

from emulator.engine import StepRecord
from emulator.kv_stats import KV_FETCH_STAGES, kv_fetch_stages
from emulator.simulation import Simulation
from server.metrics import deferred_requests
from server.pacer import Pacer

INTERVAL_S = 10.0  # VLLM_LOG_STATS_INTERVAL's default
RECENT_REQUESTS = 1000  # CachingMetrics.max_recent_requests

log = logging.getLogger("vllm.v1.metrics.loggers")  # vLLM's, by its module's name: a logging config names it


def interval() -> float:
    """Wall seconds between the lines: $VLLM_LOG_STATS_INTERVAL, as vLLM reads it (not above 0: the default)."""
    text = os.environ.get("VLLM_LOG_STATS_INTERVAL", str(INTERVAL_S))
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"VLLM_LOG_STATS_INTERVAL: could not convert string to float: {text!r}") from None
    return value if value > 0 else INTERVAL_S


class HitRateWindow:
    """vLLM's CachingMetrics: the hit rate of the most recent requests' lookups, fed the (requests, queries,
    hits) of each step; the oldest steps leave once the rest hold more than the window's requests (the
    newest step stays however many it holds)."""

    def __init__(self, max_recent_requests: int = RECENT_REQUESTS) -> None:
        self.max_recent_requests = max_recent_requests
        self.steps: deque[tuple[int, int, int]] = deque()
        self.requests = self.queries = self.hits = 0

    def observe(self, requests: int, queries: int, hits: int) -> None:
        if not requests:
            return
        self.steps.append((requests, queries, hits))
        self.requests += requests
        self.queries += queries
        self.hits += hits
        while len(self.steps) > 1 and self.requests > self.max_recent_requests:
            old_requests, old_queries, old_hits = self.steps.popleft()
            self.requests -= old_requests
            self.queries -= old_queries
            self.hits -= old_hits

    def reset(self) -> None:
        self.steps.clear()
        self.requests = self.queries = self.hits = 0

    @property
    def empty(self) -> bool:
        return self.requests == 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class PeriodicLogger:
    def __init__(self, sim: Simulation, pacer: Pacer) -> None:
        self.sim = sim
        self.pacer = pacer
        n = len(sim.engines)
        self.prompt = [0] * n
        self.generation = [0] * n
        self.preemptions = [0] * n
        self.local = [HitRateWindow() for _ in range(n)]     # the GPU prefix cache's
        self.external = [HitRateWindow() for _ in range(n)]  # the KV connector's
        self.last_rates = [(0.0, 0.0)] * n
        self.since = pacer.virtual_now()
        sim.add_listener(self.on_step)

    def on_step(self, record: StepRecord) -> None:
        """A step's output: its tokens and the prefix lookups it reports (vLLM's SchedulerStats of a step)."""
        e = record.engine
        self.prompt[e] += record.num_prompt_tokens
        self.generation[e] += len(record.got_token)
        self.preemptions[e] += len(record.preempted)
        lookups = record.lookups
        if lookups is not None:
            if lookups.reset:  # reset_prefix_cache: the window starts afresh
                self.local[e].reset()
            self.local[e].observe(lookups.requests, lookups.queries, lookups.hits)
            self.external[e].observe(lookups.external_requests, lookups.external_queries, lookups.external_hits)

    def lines(self) -> list[str]:
        now = self.pacer.virtual_now()
        span = max(now - self.since, 1e-9)
        self.since = now
        out = []
        for instance in self.sim.engines:
            i = instance.index
            rates = (self.prompt[i] / span, self.generation[i] / span)
            idle = not any(rates) and not any(self.last_rates[i])
            self.last_rates[i] = rates
            parts = [f"Engine {i:03d}: Avg prompt throughput: {rates[0]:.1f} tokens/s",
                     f"Avg generation throughput: {rates[1]:.1f} tokens/s",
                     f"Running: {instance.num_running} reqs", f"Waiting: {instance.num_waiting} reqs"]
            deferred = deferred_requests(instance)
            if deferred:
                parts.append(f"Deferred: {deferred} reqs")
            if instance.scheduler.num_loading or instance.config.kv_transfer or instance.kv.offload is not None:
                fetch = kv_fetch_stages(instance)
                if any(fetch.values()):
                    parts.append("KV fetch: {} waiting to start, {} in progress, {} completed waiting".format(
                        *(fetch[stage] for stage in KV_FETCH_STAGES)))
            if self.preemptions[i]:
                parts.append(f"Preemptions: {self.preemptions[i]}")
            parts.append(f"GPU KV cache usage: {instance.kv.usage * 100:.1f}%")
            if not self.local[i].empty:
                parts.append(f"Prefix cache hit rate: {100 * self.local[i].hit_rate:.1f}%")
            if not self.external[i].empty:
                parts.append(f"External prefix cache hit rate: {100 * self.external[i].hit_rate:.1f}%")
            self.prompt[i] = self.generation[i] = self.preemptions[i] = 0
            if not idle:
                out.append(", ".join(parts))
        return out

    async def run(self) -> None:
        while True:
            await asyncio.sleep(interval())
            self.pacer.catch_up()
            for line in self.lines():
                log.info("%s", line)
