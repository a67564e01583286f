"""Synthetic workloads as `TraceRecord` streams, so both drivers take them like a trace file.

- arrivals: Poisson at a rate, Gamma with a coefficient of variation (vLLM bench's
  `--burstiness` is the Gamma shape, 1/CV²), or bursts (SIZE requests at once every
  PERIOD seconds, as LLMServingSim's pulse workloads);
- lengths: `parse_length("lognormal:1000:0.5")` and friends (below);
- `retime`: a trace's requests (lengths, prompts, prefixes) on new arrivals, as `vllm
  bench serve --request-rate` does with a dataset (and the only timing raw ShareGPT has);
- `servegen`: ServeGen's per-client windows (arrival rate, CV and inter-arrival
  distribution every 10 minutes, token-length PMFs every 6 hours) sampled into requests.

All draws come from one seeded numpy generator: the same arguments give the same workload.
"""
from __future__ import annotations

import ast
import csv
import heapq
import json
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from loadgen.traces import TraceError, TraceRecord

LENGTH_FORMS = ("N", "uniform:LO:HI", "normal:MEAN:STD", "lognormal:MEAN:CV", "exponential:MEAN")


def parse_length(spec: str) -> Callable[[np.random.Generator, int], np.ndarray]:
    """A token-length distribution from its spec (one of LENGTH_FORMS); draws are whole and at least 1."""
    name, _, rest = spec.partition(":")
    try:
        args = [float(a) for a in rest.split(":")] if rest else []
        if not rest:
            value = int(name)
            if value < 1:
                raise ValueError
            return lambda rng, n: np.full(n, value, dtype=np.int64)
    except ValueError:
        raise ValueError(f"bad length {spec!r}: expected one of {', '.join(LENGTH_FORMS)}") from None
    shapes = {"uniform": 2, "normal": 2, "lognormal": 2, "exponential": 1}
    if name not in shapes or len(args) != shapes[name] or not all(math.isfinite(a) and a >= 0 for a in args):
        raise ValueError(f"bad length {spec!r}: expected one of {', '.join(LENGTH_FORMS)} with finite, "
                         f"non-negative numbers")

    def whole(values: np.ndarray) -> np.ndarray:
        return np.maximum(np.rint(values), 1).astype(np.int64)

    if name == "uniform":
        lo, hi = sorted(args)
        return lambda rng, n: rng.integers(int(lo), int(hi) + 1, n).clip(1)
    if name == "normal":
        return lambda rng, n: whole(rng.normal(args[0], args[1], n))
    if name == "exponential":
        return lambda rng, n: whole(rng.exponential(args[0], n))
    mean, cv = args  # lognormal with this mean and coefficient of variation
    sigma2 = math.log1p(cv * cv)
    mu = math.log(max(mean, 1e-9)) - sigma2 / 2
    return lambda rng, n: whole(rng.lognormal(mu, math.sqrt(sigma2), n))


def gaps(rng: np.random.Generator, rate: float, n: int, cv: float = 1.0) -> np.ndarray:
    """`n` inter-arrival gaps at `rate` per second: exponential (cv 1) or Gamma of that CV."""
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"the request rate must be a positive number; got {rate}")
    if not (cv > 0 and math.isfinite(cv)):
        raise ValueError(f"the coefficient of variation must be a positive number; got {cv}")
    shape = 1.0 / (cv * cv)
    return rng.gamma(shape, 1.0 / (rate * shape), n)


def arrival_times(rng: np.random.Generator, n: int, rate: float | None = None, cv: float = 1.0,
                  burst: tuple[int, float] | None = None) -> np.ndarray:
    """Arrival times of `n` requests: bursts (size, period; the first at 0), or as `vllm bench serve
    --request-rate` sends them: each request after a Poisson/Gamma gap of its own, the first too, the
    delays then rescaled so that the last request goes at exactly n / rate (vLLM 0.33's get_request: a
    fixed rate keeps the run's length, whatever the seed)."""
    if burst is not None:
        size, period = burst
        if size < 1 or not period > 0:
            raise ValueError(f"a burst needs at least one request and a positive period; got {size}:{period}")
        return (np.arange(n) // size) * float(period)
    if rate is None or rate == math.inf:
        return np.zeros(n)
    times = np.cumsum(gaps(rng, rate, n, cv))
    if n and times[-1] != 0:
        times *= (n / rate) / times[-1]
    return times


def synthetic(n: int, input_len: str, output_len: str, *, rate: float | None = None, cv: float = 1.0,
              burst: tuple[int, float] | None = None, seed: int = 0) -> Iterator[TraceRecord]:
    """`n` requests with lengths drawn from the two specs, on the arrivals asked for."""
    rng = np.random.default_rng(seed)
    times = arrival_times(rng, n, rate, cv, burst)
    ins, outs = parse_length(input_len)(rng, n), parse_length(output_len)(rng, n)
    for i in range(n):
        yield TraceRecord(float(times[i]), int(ins[i]), int(outs[i]), i + 1)


def retime(records: Iterable[TraceRecord], *, rate: float | None = None, cv: float = 1.0,
           burst: tuple[int, float] | None = None, seed: int = 0) -> Iterator[TraceRecord]:
    """The records, in order, on fresh arrivals (`arrival_times`: bursts, or Poisson/Gamma at `rate` as
    vLLM bench sends a dataset, which reads every record first: the arrivals depend on how many)."""
    if burst is not None or rate is None or rate == math.inf:
        for i, record in enumerate(records):
            record.arrival = (i // burst[0]) * float(burst[1]) if burst is not None else 0.0
            yield record
        return
    records = list(records)
    for record, t in zip(records, arrival_times(np.random.default_rng(seed), len(records), rate, cv)):
        record.arrival = float(t)
        yield record


def window(records: Iterable[TraceRecord], start: float = 0.0, end: float = math.inf,
           rate_scale: float = 1.0) -> Iterator[TraceRecord]:
    """The records arriving in [start, end) of the trace, re-based to start, with arrivals divided by
    `rate_scale` (2 replays the window at twice its rate). Stops reading at `end`."""
    if not rate_scale > 0 or not math.isfinite(rate_scale):
        raise ValueError(f"--rate-scale must be a positive number; got {rate_scale}")
    for record in records:
        if record.arrival >= end:
            return
        if record.arrival >= start:
            record.arrival = (record.arrival - start) / rate_scale
            yield record


# -- ServeGen ----------------------------------------------------------------------------------------------
def _pmf(text: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """A ServeGen PMF ('{39: 0.0003, 40: ...}', a Python dict literal) as values and probabilities."""
    try:
        table = ast.literal_eval(text)
    except (ValueError, SyntaxError, RecursionError, MemoryError):
        raise TraceError(f"{where}: not a PMF") from None
    if not isinstance(table, dict) or not table:
        raise TraceError(f"{where}: not a PMF")
    values = np.asarray(list(table.keys()), dtype=float)
    probs = np.asarray(list(table.values()), dtype=float)
    if not (np.all(np.isfinite(values)) and np.all(probs >= 0) and probs.sum() > 0):
        raise TraceError(f"{where}: a PMF needs finite values and non-negative probabilities")
    return values, probs / probs.sum()


class _Client:
    """One ServeGen client: its 10-minute arrival windows and its 6-hour length PMFs."""

    def __init__(self, trace_csv: Path) -> None:
        self.name = trace_csv.name.removesuffix("-trace.csv")
        self.windows: list[tuple[float, float, float, str, float, float]] = []
        with trace_csv.open(newline="") as f:
            for line, row in enumerate(csv.reader(f), 1):
                try:
                    start, rate, cv, pattern, a, b = row
                    self.windows.append((float(start), float(rate), float(cv), pattern, float(a), float(b)))
                except ValueError:
                    raise TraceError(f"{trace_csv}:{line}: expected start,rate,cv,distribution,arg1,arg2") from None
        dataset_path = trace_csv.with_name(f"{self.name}-dataset.json")
        try:
            dataset = json.loads(dataset_path.read_text())
        except (OSError, ValueError) as exc:
            raise TraceError(f"{dataset_path}: cannot read ({exc})") from None
        self.lengths: list[tuple[float, tuple, tuple]] = []
        for start, fields in sorted(dataset.items(), key=lambda kv: float(kv[0])):
            if not fields.get("input_tokens") or not fields.get("output_tokens") or "{}" in (
                    fields["input_tokens"], fields["output_tokens"]):
                continue
            self.lengths.append((float(start), _pmf(fields["input_tokens"], f"{dataset_path} [{start}].input_tokens"),
                                 _pmf(fields["output_tokens"], f"{dataset_path} [{start}].output_tokens")))

    def lengths_at(self, t: float):
        current = None
        for start, ins, outs in self.lengths:
            if start <= t:
                current = (ins, outs)
        return current or (self.lengths[0][1:] if self.lengths else None)

    def arrivals(self, rng: np.random.Generator, start: float, end: float, rate_scale: float) -> Iterator[float]:
        """Arrival times in [start, end): each window's fitted inter-arrival distribution, at its rate."""
        for i, (w_start, rate, cv, pattern, a, b) in enumerate(self.windows):
            w_end = self.windows[i + 1][0] if i + 1 < len(self.windows) else w_start + 600.0
            lo, hi = max(w_start, start), min(w_end, end)
            if lo >= hi or rate <= 0:
                continue
            rate *= rate_scale
            t = lo + rng.uniform(0, 1.0 / rate)
            while t < hi:
                yield t
                if pattern == "Gamma" and a > 0 and b > 0:  # shape, scale of the gap, then at the window's rate
                    gap = rng.gamma(a, b) * (1.0 / rate) / (a * b)
                elif pattern == "Weibull" and a > 0 and b > 0:
                    gap = b * rng.weibull(a) * (1.0 / rate) / (b * math.gamma(1 + 1 / a))
                else:
                    gap = float(gaps(rng, rate, 1, cv if cv > 0 else 1.0)[0])
                t += gap


def servegen(folder: str | Path, duration: float, *, start: float = 0.0, rate_scale: float = 1.0,
             seed: int = 0) -> Iterator[TraceRecord]:
    """Requests of every ServeGen client in `folder` (chunk-*-trace.csv with chunk-*-dataset.json) over
    [start, start + duration) seconds of its day, merged in arrival order and re-based to 0."""
    folder = Path(folder)
    files = sorted(folder.glob("chunk-*-trace.csv"))
    if not files:
        raise TraceError(f"{folder}: no ServeGen client (chunk-*-trace.csv) here")
    rng = np.random.default_rng(seed)
    streams = []
    for k, path in enumerate(files):
        client = _Client(path)
        if client.lengths:
            streams.append([(t, k, client) for t in client.arrivals(rng, start, start + duration, rate_scale)])
    for line, (t, _k, client) in enumerate(heapq.merge(*streams), 1):
        (in_values, in_probs), (out_values, out_probs) = client.lengths_at(t)
        yield TraceRecord(t - start, max(int(rng.choice(in_values, p=in_probs)), 1),
                          max(int(rng.choice(out_values, p=out_probs)), 1), line, request_id=f"{client.name}-{line}")
