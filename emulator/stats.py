"""Per-request records and aggregate statistics, all in virtual seconds."""
from __future__ import annotations

import math
from bisect import bisect_right

import numpy as np

from emulator.engine import RunRecord, StepRecord
from emulator.request import Request

PERCENTILES = (50, 90, 95, 99)


def request_record(request: Request, energy_j: float | None = None) -> dict:
    """One finished request, in the schema of replay's requests.jsonl; `energy_j`: the joules the power
    model attributed to it (emulator.power), when one ran."""
    first, finish = request.first_token_time, request.finish_time
    ttft = None if first is None else first - request.arrival_time
    tpot = ((request.last_token_time - first) / (request.num_output_tokens - 1)
            if first is not None and request.num_output_tokens > 1 else None)
    record = {
        "request_id": request.request_id,
        "arrival_time": request.arrival_time,
        "queued_time": request.queued_time,
        "scheduled_time": request.scheduled_time,
        "first_token_time": first,
        "finish_time": finish,
        "input_tokens": request.num_prompt_tokens,
        "output_tokens": request.num_output_tokens,
        "cached_tokens": max(request.num_cached_tokens, 0),
        "external_tokens": request.num_external_tokens,  # KV loaded from outside: P/D transfer, offload tier
        "num_preemptions": request.num_preemptions,
        "ttft": ttft,
        "tpot": tpot,
        "e2e": None if finish is None else finish - request.arrival_time,
        "finish_reason": request.finish_reason,
        "engine": request.engine_index,
    }
    if request.error is not None:  # refused at a queue bound: the error a client would have read
        record["error"] = request.error
    if energy_j is not None:
        record["energy_j"] = energy_j
    return record


def distribution(values) -> dict:
    a = np.asarray([v for v in values if v is not None], dtype=float)
    if not len(a):
        return {"count": 0}
    out = {"count": int(len(a)), "mean": float(a.mean())}
    out.update({f"p{p}": float(np.percentile(a, p)) for p in PERCENTILES})
    out["median"] = out["p50"]
    out["max"] = float(a.max())
    return out


def summarize(records: list[dict], duration: float) -> dict:
    finished = [r for r in records if r["finish_reason"] in ("stop", "length")]
    # vLLM bench counts the tokens of completed requests only: a failed one's partial output is 0 tokens
    out_tokens = sum(r["output_tokens"] for r in finished)
    in_tokens = sum(r["input_tokens"] for r in finished)
    return {
        "num_requests": len(records),
        "num_finished": len(finished),
        "num_aborted": sum(r["finish_reason"] == "abort" for r in records),
        "num_failed": sum(r["finish_reason"] == "error" for r in records),
        "num_rejected": sum("error" in r for r in records),  # of the failed: refused at a queue bound
        "duration": duration,
        "ttft": distribution(r["ttft"] for r in finished),
        "tpot": distribution(r["tpot"] for r in finished),
        "e2e": distribution(r["e2e"] for r in finished),
        "queue_time": distribution(r["scheduled_time"] - r["arrival_time"] for r in finished
                                   if r["scheduled_time"] is not None),
        "preemptions": {"total": sum(r["num_preemptions"] for r in records),
                        "requests_preempted": sum(r["num_preemptions"] > 0 for r in records)},
        "cached_tokens": sum(r["cached_tokens"] for r in records),
        "external_tokens": sum(r.get("external_tokens", 0) for r in records),
        "throughput": {
            "requests_per_s": len(finished) / duration if duration > 0 else 0.0,
            "output_tokens_per_s": out_tokens / duration if duration > 0 else 0.0,
            "total_tokens_per_s": (out_tokens + in_tokens) / duration if duration > 0 else 0.0,
        },
    }


class TimeSeries:
    """1-second ticks of what vLLM's log line reports: running, waiting, KV usage, throughput, preemptions,
    and the prefix-cache hit rate of the tick's lookups (hits over queries, as the rate of
    vllm:prefix_cache_hits over vllm:prefix_cache_queries plots it; empty in a tick without lookups).

    A tick at t shows each engine's state after its last step that ended by t, and the
    tokens of the steps that ended in (t - 1, t]. Each engine's records must come in order;
    engines may come in any order between them (a loop runs ahead between arrivals).
    `instance_of` names the instance of each engine, for the per-instance rows."""

    def __init__(self, num_engines: int, tick: float = 1.0, instance_of: list[str] | None = None) -> None:
        self.tick = tick
        self.instance_of = instance_of or ["0"] * num_engines
        self._current = [(0, 0, 0.0)] * num_engines  # running, waiting, KV usage after the latest step
        self._states: list[list[tuple[int, int, float]]] = [[] for _ in range(num_engines)]  # [e][k-1]: tick k
        self._prompt: list[list[int]] = [[] for _ in range(num_engines)]
        self._generation: list[list[int]] = [[] for _ in range(num_engines)]
        # [e]: tick -> (preemptions, prefix-cache queries, hits), only the ticks that had any
        self._events: list[dict[int, list[int]]] = [{} for _ in range(num_engines)]

    def on_step(self, record: StepRecord) -> None:
        e = record.engine
        k = max(1, math.ceil(record.end / self.tick))
        states = self._states[e]
        while len(states) < k - 1:
            states.append(self._current[e])
        prompt, generation = self._prompt[e], self._generation[e]
        if len(prompt) < k:
            prompt.extend([0] * (k - len(prompt)))
            generation.extend([0] * (k - len(generation)))
        generation[k - 1] += len(record.got_token)
        prompt[k - 1] += record.num_prompt_tokens
        self._current[e] = (record.num_running, record.num_waiting, record.kv_usage)
        lookups = record.lookups
        if record.preempted or lookups is not None:
            counts = self._events[e].setdefault(k - 1, [0, 0, 0])
            counts[0] += len(record.preempted)
            if lookups is not None:
                counts[1] += lookups.queries
                counts[2] += lookups.hits

    def on_run(self, run: RunRecord) -> None:
        """A run of decode steps: every step adds one token per request; running and waiting stay.
        Taken a tick at a time: the steps that end in one tick are found by bisection on their ends."""
        e, n, tick = run.engine, len(run.requests), self.tick
        states, generation, prompt = self._states[e], self._generation[e], self._prompt[e]
        ends, usage = run.ends, run.kv_usage
        current = self._current[e]
        i, m = 0, min(len(ends), len(usage))
        while i < m:
            k = max(1, math.ceil(ends[i] / tick))
            j = bisect_right(ends, k, i + 1, m, key=lambda end: max(1, math.ceil(end / tick)))  # steps i..j-1
            if len(states) < k - 1:
                states.extend([current] * (k - 1 - len(states)))
            if len(generation) < k:
                generation.extend([0] * (k - len(generation)))
                prompt.extend([0] * (k - len(prompt)))
            generation[k - 1] += n * (j - i)
            current = (n, run.num_waiting, usage[j - 1])
            i = j
        self._current[e] = current

    def finish(self, end: float) -> list[dict]:
        """The cluster's rows, closed with the tick that holds `end`: a partial one whose throughputs
        are over its real width (vLLM's last log line divides by the time since the one before)."""
        return self._rows(range(len(self._states)), self._ticks(end), end)

    def by_instance(self, end: float) -> list[dict]:
        """The same rows for each instance, with an `instance` column."""
        rows = []
        for name in dict.fromkeys(self.instance_of):
            engines = [e for e, owner in enumerate(self.instance_of) if owner == name]
            rows.extend({"instance": name, **row} for row in self._rows(engines, self._ticks(end), end))
        return rows

    def width(self, k: int, end: float) -> float:
        """Seconds of tick `k` (0-based) up to `end`: the tick, less for the last, partial one."""
        width = min((k + 1) * self.tick, end) - k * self.tick
        return width if width > 0 else self.tick

    def _ticks(self, end: float) -> int:
        ticks = max(0, math.ceil(end / self.tick))
        for e, states in enumerate(self._states):
            while len(states) < ticks:
                states.append(self._current[e])
        return ticks

    def _rows(self, engines, ticks: int, end: float) -> list[dict]:
        engines = list(engines)
        rows = []
        for k in range(ticks):
            width = self.tick if k < ticks - 1 else self.width(k, end)
            states = [self._states[e][k] for e in engines]
            prompt = sum(self._prompt[e][k] for e in engines if k < len(self._prompt[e]))
            generation = sum(self._generation[e][k] for e in engines if k < len(self._generation[e]))
            preempted = queries = hits = 0
            for e in engines:
                counts = self._events[e].get(k)
                if counts is not None:
                    preempted, queries, hits = preempted + counts[0], queries + counts[1], hits + counts[2]
            rows.append({
                "t": round((k + 1) * self.tick, 6),
                "prompt_throughput": prompt / width,
                "gen_throughput": generation / width,
                "running": sum(s[0] for s in states),
                "waiting": sum(s[1] for s in states),
                "kv_cache_pct": round(100 * sum(s[2] for s in states) / len(states), 2),
                "preemptions": preempted,
                "prefix_hit_pct": round(100 * hits / queries, 2) if queries else "",
            })
        return rows
