"""The server's Prometheus /metrics sampled over a run: what a dashboard would have shown.

Kept per sample (summed over engines and label sets): vLLM's engine gauges and counters
that explain latency — running and waiting requests, KV-cache usage, preemptions, prefix
cache queries and hits, prompt and generation tokens, the sum and count of its TTFT
histogram — and every `vllm_emulator:*` gauge or counter (the emulator's own series: power,
energy, simulated time, when it models them).
A real vLLM has the `vllm:` ones; any other OpenAI-compatible server may have none, and
then the run simply has no metrics.csv.
"""
from __future__ import annotations

import math

VLLM_SERIES = (
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:num_preemptions_total", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
    "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
    # the server's own TTFT (its mean over the run: did the client keep up?)
    "vllm:time_to_first_token_seconds_sum", "vllm:time_to_first_token_seconds_count",
)
EMULATOR_PREFIX = "vllm_emulator:"
KEPT_PREFIXES = (*VLLM_SERIES, EMULATOR_PREFIX)


def parse_metrics(text: str) -> dict[str, float]:
    """The kept series of one exposition, each summed over its label sets."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(KEPT_PREFIXES):  # most of an exposition is histogram buckets: skip them first
            continue
        name_end = len(line)
        for i, c in enumerate(line):
            if c in "{ ":
                name_end = i
                break
        name = line[:name_end]
        if name not in VLLM_SERIES and not (name.startswith(EMULATOR_PREFIX) and not name.endswith(
                ("_bucket", "_created", "_sum", "_count", "_info"))):  # an _info series is a constant 1 a label set
            continue
        try:
            value = float(line.rsplit(" ", 1)[1]) if "}" not in line else float(line.rsplit("}", 1)[1].split()[0])
        except (IndexError, ValueError):
            continue
        if math.isfinite(value):
            out[name] = out.get(name, 0.0) + value
    return out


def column_name(series: str) -> str:
    """A CSV column for a series: `vllm:kv_cache_usage_perc` -> `kv_cache_usage_perc`."""
    return series.split(":", 1)[1] if series.startswith("vllm:") else series.replace(":", "_")
