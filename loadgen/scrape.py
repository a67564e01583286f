"""The server's Prometheus /metrics sampled over a run: what a dashboard would have shown.

Kept per sample (summed over engines and label sets): vLLM's engine gauges and counters
that explain latency — running and waiting requests, KV-cache usage, preemptions, prefix
cache queries and hits, prompt and generation tokens, the sum and count of its TTFT
histogram — and every `vllm_emulator:*` gauge or counter (the emulator's own series: power,
energy, simulated time, when it models them).
A real vLLM has the `vllm:` ones; any other OpenAI-compatible server may have none, and
then the run simply has no metrics.csv.

Counters (a counter's `_total`, a histogram's `_count`, `_sum` and `_bucket`) are read as
Prometheus's rate() and increase() read them, series by series: a series that drops, or
whose `_created` timestamp changes, restarted from 0 (a vLLM pod that restarted, an
emulated instance restored after a fault), so it grew by its new value; a series missing
from a scrape (its pod down) grows by nothing until it is back; one first seen after the
first scrape counts from 0. A sample's counter is the first scrape's sum plus that growth
since: it never goes down, and two samples' difference is what the server counted between
them.
"""
from __future__ import annotations

import math
import re

VLLM_SERIES = (
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:num_preemptions_total", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
    "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
    # the server's own TTFT (its mean over the run: did the client keep up?)
    "vllm:time_to_first_token_seconds_sum", "vllm:time_to_first_token_seconds_count",
)
EMULATOR_PREFIX = "vllm_emulator:"
SPEED = "vllm_emulator:speed"  # virtual seconds a wall second: the emulator's `serve --speed`
COUNTER_SUFFIXES = ("_total", "_count", "_sum", "_bucket")
NOT_COUNTERS = ("gauge", "gaugehistogram", "info", "stateset")  # `# TYPE`s whose series may go down
# A drop this small (relative) is floating-point noise in a recomputed total, not a restart.
NOISE = 1e-9
_LE = re.compile(r'(?:^|,)le="[^"]*"')


def _family(name: str) -> str:
    """A counter-like series' family: `vllm:prompt_tokens_total` -> `vllm:prompt_tokens`."""
    for suffix in COUNTER_SUFFIXES:
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return name


def _split(line: str) -> tuple[str, str, float] | None:
    """A sample line's name, label text (as written) and value; None for one that is not a finite sample."""
    brace = line.find("{")
    space = line.find(" ")
    if brace != -1 and (space == -1 or brace < space):
        name = line[:brace]
        labels, _, rest = line[brace + 1:].rpartition("}")
    else:
        name, labels, rest = line[:space], "", line[space:]
    try:
        value = float(rest.split()[0])  # a timestamp may follow the value
    except (IndexError, ValueError):
        return None
    return (name, labels, value) if math.isfinite(value) else None


class MetricsSampler:
    """Successive /metrics expositions of one server as samples: gauges summed over their label sets,
    counters as running totals that restarts do not set back (the module's docstring says how)."""

    def __init__(self, series: tuple[str, ...] = VLLM_SERIES, prefix: str = EMULATOR_PREFIX) -> None:
        self.series = frozenset(series)
        self.prefix = prefix
        # a line worth reading starts with one of these (most of an exposition is buckets: skip them first)
        self._starts = (*{_family(name) for name in series}, prefix)
        self._last: dict[tuple[str, str], tuple[float, float | None]] = {}  # a counter series: value, _created
        self._totals: dict[str, float] = {}

    def _kept(self, name: str) -> bool:
        if name in self.series:
            return True
        # an _info series is a constant 1 a label set; a histogram's parts are kept only when named
        return name.startswith(self.prefix) and not name.endswith(("_bucket", "_created", "_sum", "_count", "_info"))

    def sample(self, text: str) -> dict[str, float]:
        """The kept series of one more exposition: gauges as they are now, counters as running totals."""
        types: dict[str, str] = {}
        created: dict[tuple[str, str], float] = {}
        gauges: dict[str, float] = {}
        counters: list[tuple[str, str, float]] = []
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                parts = line.split()
                if len(parts) == 4 and parts[2].startswith(self._starts):
                    types[parts[2]] = parts[3]
                continue
            if not line.startswith(self._starts):
                continue
            parsed = _split(line)
            if parsed is None:
                continue
            name, labels, value = parsed
            if name.endswith("_created"):
                created[(name[:-len("_created")], labels)] = value
            elif self._kept(name):
                if self._monotonic(name, types):
                    counters.append(parsed)
                else:
                    gauges[name] = gauges.get(name, 0.0) + value
        for name, labels, value in counters:
            key = (name, labels)
            family = _family(name)
            stamp = created.get((family, _LE.sub("", labels).lstrip(",") if name.endswith("_bucket") else labels))
            previous = self._last.get(key)
            if previous is None:  # the first scrape's values are the baseline; a later newcomer counts from 0
                growth = value
            else:
                before, before_stamp = previous
                restarted = (stamp is not None and before_stamp is not None and stamp != before_stamp) or (
                    value < before - NOISE * abs(before))
                growth = value if restarted else max(value - before, 0.0)
            self._last[key] = (value, stamp)
            self._totals[name] = self._totals.get(name, 0.0) + growth
        return {**gauges, **self._totals}

    @staticmethod
    def _monotonic(name: str, types: dict[str, str]) -> bool:
        """Whether a series only grows: it is named as a counter or a histogram's parts are, and its `# TYPE`
        (where the exposition gives one: the series' own, or its family's) is not a gauge's."""
        if not name.endswith(COUNTER_SUFFIXES):
            return False
        return (types.get(name) or types.get(_family(name))) not in NOT_COUNTERS


def server_speed(text: str) -> float | None:
    """The emulator's --speed, from an exposition's `vllm_emulator:speed` gauge (one series an engine, all
    alike); None from a server without one (a real vLLM)."""
    for line in text.splitlines():
        if line.startswith(SPEED) and line[len(SPEED):len(SPEED) + 1] in (" ", "{"):
            parsed = _split(line)
            if parsed is not None:
                return parsed[2]
    return None


def parse_metrics(text: str) -> dict[str, float]:
    """The kept series of one exposition, each summed over its label sets."""
    return MetricsSampler().sample(text)


def column_name(series: str) -> str:
    """A CSV column for a series: `vllm:kv_cache_usage_perc` -> `kv_cache_usage_perc`."""
    return series.split(":", 1)[1] if series.startswith("vllm:") else series.replace(":", "_")
