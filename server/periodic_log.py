"""vLLM's periodic engine log line (`LoggingStatLogger`), every 10 s of wall time per engine:

    Engine 000: Avg prompt throughput: 812.4 tokens/s, Avg generation throughput: 95.1 tokens/s,
    Running: 12 reqs, Waiting: 0 reqs, GPU KV cache usage: 3.1%, Prefix cache hit rate: 41.0%

Throughputs are tokens per virtual second (what the simulated device achieves); like vLLM,
an engine that stayed idle logs nothing. Off with --disable-log-stats.
"""
from __future__ import annotations

import asyncio
import logging

from emulator.engine import StepRecord
from emulator.kv_stats import KV_FETCH_STAGES, kv_fetch_stages
from emulator.simulation import Simulation
from server.metrics import deferred_requests
from server.pacer import Pacer

INTERVAL_S = 10.0  # VLLM_LOG_STATS_INTERVAL

log = logging.getLogger("vllm_emulator.stats")


class PeriodicLogger:
    def __init__(self, sim: Simulation, pacer: Pacer) -> None:
        self.sim = sim
        self.pacer = pacer
        n = len(sim.engines)
        self.prompt = [0] * n
        self.generation = [0] * n
        self.preemptions = [0] * n
        self.seen = [(0, 0)] * n  # prefix-cache (queries, hits) already reported
        self.seen_external = [(0, 0)] * n  # and the KV connector's
        self.last_rates = [(0.0, 0.0)] * n
        self.since = pacer.virtual_now()
        sim.add_listener(self.on_step)

    def on_step(self, record: StepRecord) -> None:
        self.prompt[record.engine] += record.num_prompt_tokens
        self.generation[record.engine] += len(record.got_token)
        self.preemptions[record.engine] += len(record.preempted)

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
            queries, hits = instance.kv.prefix_queries, instance.kv.prefix_hits
            seen_queries, seen_hits = self.seen[i]
            if queries > seen_queries:
                parts.append(f"Prefix cache hit rate: {100 * (hits - seen_hits) / (queries - seen_queries):.1f}%")
            self.seen[i] = (queries, hits)
            queries, hits = instance.kv.external_queries, instance.kv.external_hits
            seen_queries, seen_hits = self.seen_external[i]
            if queries > seen_queries:
                parts.append(f"External prefix cache hit rate: "
                             f"{100 * (hits - seen_hits) / (queries - seen_queries):.1f}%")
            self.seen_external[i] = (queries, hits)
            self.prompt[i] = self.generation[i] = self.preemptions[i] = 0
            if not idle:
                out.append(", ".join(parts))
        return out

    async def run(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL_S)
            self.pacer.catch_up()
            for line in self.lines():
                log.info("%s", line)
