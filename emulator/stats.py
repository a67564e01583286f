"""Per-request records and aggregate statistics, all in virtual seconds."""
from __future__ import annotations

import math
from bisect import bisect_right
from collections import Counter

import numpy as np

from emulator.engine import RunRecord, StepRecord
from emulator.request import Request

PERCENTILES = (50, 90, 95, 99)


def request_record(request: Request, energy_j: float | None = None) -> dict:
    """One finished request, in the schema of replay's requests.jsonl; `energy_j`: the joules the power
    model attributed to it (emulator.power), when one ran. Its arrival and latencies are its client's
    (Request.client_arrival): a request a fault re-routed counts from when it was first sent."""
    first, finish, sent = request.first_token_time, request.finish_time, request.client_arrival
    ttft = None if first is None else first - sent
    tpot = ((request.last_token_time - first) / (request.num_output_tokens - 1)
            if first is not None and request.num_output_tokens > 1 else None)
    record = {
        "request_id": request.request_id,
        "arrival_time": sent,
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
        "e2e": None if finish is None else finish - sent,
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
    s = np.sort(a)  # (np.percentile's own path imports numpy.ma, ~6 ms of a short replay's start-up)
    out.update({f"p{p}": sorted_percentile(s, p) for p in PERCENTILES})
    out["median"] = out["p50"]
    out["max"] = float(s[-1])
    return out


def sorted_percentile(s: np.ndarray, p: float) -> float:
    """np.percentile(s, p) (linear), bit for bit, of sorted `s` (finite values; numpy's own answer otherwise)."""
    if not np.isfinite(s[-1]) or not np.isfinite(s[0]):  # (sorted: NaN last, infinities at the ends)
        return float(np.percentile(s, p))
    n = len(s)
    index = (n - 1) * (p / 100)  # numpy's virtual index
    if index >= n - 1:
        return float(s[-1])
    below = math.floor(index)
    return _lerp(s[below], s[below + 1], index - below)


def _lerp(a: float, b: float, t: float) -> float:
    """numpy's _lerp: from the nearer end."""
    diff = b - a
    return float(a + diff * t if t < 0.5 else b - diff * (1 - t))


def weighted_percentile(values: np.ndarray, cumulative: np.ndarray, p: float) -> float:
    """np.percentile(expanded, p) (linear), bit for bit, of the list that holds sorted `values[i]`
    cumulative[i] - cumulative[i - 1] times, without expanding it."""
    n = int(cumulative[-1])
    index = (n - 1) * (p / 100)  # numpy's virtual index
    if index >= n - 1:
        return float(values[-1])
    below = math.floor(index)
    a, b = values[np.searchsorted(cumulative, [below, below + 1], side="right")]
    return _lerp(a, b, index - below)


def weighted_distribution(values, weights) -> dict:
    """`distribution` of the list holding each of `values` `weights` times (integers), not expanded."""
    v = np.asarray(values, dtype=float)
    w = np.asarray(weights, dtype=np.int64)
    keep = w > 0
    v, w = v[keep], w[keep]
    if not len(v):
        return {"count": 0}
    order = np.argsort(v, kind="stable")
    v, w = v[order], w[order]
    cumulative = np.cumsum(w)
    total = int(cumulative[-1])
    # numpy's own sum, not a BLAS dot: OpenBLAS splits a long dot over its threads, which would make the
    # mean's last bits depend on the machine's core count
    out = {"count": total, "mean": float((v * w).sum() / total)}
    out.update({f"p{p}": weighted_percentile(v, cumulative, p) for p in PERCENTILES})
    out["median"] = out["p50"]
    out["max"] = float(v[-1])
    return out


def summarize(records: list[dict], duration: float, itl: dict | None = None) -> dict:
    """summary.json's statistics of the records; `itl`: the inter-token latencies' distribution, when
    measured (InterTokenLatencies)."""
    finished = [r for r in records if r["finish_reason"] in ("stop", "length")]
    # vLLM bench counts the tokens of completed requests only: a failed one's partial output is 0 tokens
    out_tokens = sum(r["output_tokens"] for r in finished)
    in_tokens = sum(r["input_tokens"] for r in finished)
    return {
        "num_requests": len(records),
        "num_finished": len(finished),
        "num_aborted": sum(r["finish_reason"] == "abort" for r in records),
        "num_failed": sum(r["finish_reason"] == "error" for r in records),
        # of the failed: refused (a queue bound, no context fits); loadgen's records hold "error": null when none
        "num_rejected": sum(r.get("error") is not None for r in records),
        "duration": duration,
        "ttft": distribution(r["ttft"] for r in finished),
        "tpot": distribution(r["tpot"] for r in finished),
        **({} if itl is None else {"itl": itl}),
        "e2e": distribution(r["e2e"] for r in finished),
        # vLLM's queue time (vllm:request_queue_time_seconds): from the engine taking the request in to its
        # first scheduling; a P/D request's on its decode engine, not its prefill
        "queue_time": distribution(r["scheduled_time"] - r["queued_time"] for r in finished
                                   if r["scheduled_time"] is not None and r.get("queued_time") is not None),
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
        self._hold(e, k - 1)
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
            if max(1, math.ceil(ends[m - 1] / tick)) == k:  # the rest of the run ends in this tick
                j = m
            else:  # steps i..j-1
                j = bisect_right(ends, k, i + 1, m, key=lambda end: max(1, math.ceil(end / tick)))
            if len(states) < k - 1:
                states.extend([current] * (k - 1 - len(states)))
            if len(generation) < k:
                generation.extend([0] * (k - len(generation)))
                prompt.extend([0] * (k - len(prompt)))
            generation[k - 1] += n * (j - i)
            current = (n, run.num_waiting, usage[j - 1])
            i = j
        self._current[e] = current

    def on_engine_down(self, engine: int, t: float) -> None:
        """The engine went down at `t` (its instance failed; its requests are gone): from the tick that holds
        `t` on it shows nothing running, waiting or cached, until its next step (a restored instance's)."""
        self._hold(engine, max(1, math.ceil(t / self.tick)) - 1)
        self._current[engine] = (0, 0, 0.0)

    def _hold(self, e: int, ticks: int) -> None:
        """Engine e's latest state stands for its ticks up to `ticks` (those no step of it ended in)."""
        states = self._states[e]
        if len(states) < ticks:
            states.extend([self._current[e]] * (ticks - len(states)))

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
        for e in range(len(self._states)):
            self._hold(e, ticks)
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


class InterTokenLatencies:
    """vLLM bench's ITL: each gap between consecutive tokens of a request (its stream's chunks), over the
    requests that finish (a failed request's are dropped, as vLLM bench drops its output), cluster-wide and
    per instance, without a time per token. Each engine keeps the end of every step that gave tokens; a
    request that gets a token at each of an engine's steps i..j has the differences of those ends as its
    gaps, so it keeps only the span (i, j), and a gap of its own when it comes back after steps without a
    token (preempted). A step's batch is compared with the one before as sets: only the requests that join
    or leave cost Python work. A request's spans and gaps count once it finishes. Listens to the
    simulation's steps, runs and finishes."""

    def __init__(self, instance_of: list[str]) -> None:
        self.instance_of = instance_of  # by engine index
        n = len(instance_of)
        self._ends: list[list[float]] = [[] for _ in range(n)]  # per engine: the end of each step with tokens
        self._batch: list[set[Request]] = [set() for _ in range(n)]  # per engine: who got a token at its last end
        self._order: list[list[Request]] = [[] for _ in range(n)]  # the same as the engine listed them
        # request -> [engine, first index of its current span, its last index (None while in the engine's
        # batch), its spans closed so far, its gaps outside spans]
        self._requests: dict[Request, list] = {}
        self._spans: list[list[tuple[int, int]]] = [[] for _ in range(n)]  # per engine: finished requests' spans
        self._gaps: dict[str, Counter[float]] = {name: Counter() for name in instance_of}  # gap -> requests
        self._by_gap: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # instance -> its gaps sorted, once the run is over

    def on_step(self, record: StepRecord) -> None:
        if record.got_token:
            self._tokens(record.engine, record.got_token, (record.start + record.duration,))

    def on_run(self, run: RunRecord) -> None:
        if run.ends:
            self._tokens(run.engine, run.requests, run.ends)

    def _tokens(self, e: int, requests: list[Request], ends) -> None:
        """Each of `requests` got a token at each of `ends`, engine e's next steps."""
        mine, batch = self._ends[e], self._batch[e]
        i = len(mine)  # the index of ends[0]
        mine.extend(ends)
        if requests == self._order[e]:
            return  # the same batch in the same order (most steps): every span goes on
        self._order[e] = list(requests)
        now = set(requests)
        if now != batch:
            states = self._requests
            for request in batch - now:  # no token at ends[0]: its span closes at the step before
                state = states.get(request)
                if state is not None:
                    state[2] = i - 1
                    state[3].append((state[1], i - 1))
            for request in now - batch:
                state = states.get(request)
                if state is None:  # its first token
                    states[request] = [e, i, None, [], []]
                else:  # back after steps without a token: one gap from its last token
                    state[4].append(mine[i] - self._ends[state[0]][state[2]])
                    state[0], state[1], state[2] = e, i, None
        self._batch[e] = now

    def on_finish(self, request: Request) -> None:
        state = self._requests.pop(request, None)
        if state is None:
            return
        e, first, last, spans, gaps = state
        if last is None:  # its span runs to its engine's latest step
            self._batch[e].discard(request)
            spans.append((first, len(self._ends[e]) - 1))
        if request.finish_reason in ("stop", "length"):
            self._spans[e].extend(spans)
            if gaps:  # (most requests have none; Counter.update costs a call even for nothing)
                self._gaps[self.instance_of[e]].update(gaps)

    def distribution(self, instance: str | None = None) -> dict:
        """The ITL distribution (seconds) of the cluster, or of one instance's requests, once the run is over."""
        if instance is not None:
            return weighted_distribution(*self._sorted(instance))
        # each instance's gaps sorted once; their concatenation is sorted run by run (timsort merges them)
        parts = [self._sorted(name) for name in dict.fromkeys(self.instance_of)]
        return weighted_distribution(np.concatenate([v for v, _ in parts]), np.concatenate([w for _, w in parts]))

    def _sorted(self, instance: str) -> tuple[np.ndarray, np.ndarray]:
        """One instance's gaps and how many times each counts, by gap (kept: the cluster's reuses them)."""
        if instance in self._by_gap:
            return self._by_gap[instance]
        values: list[np.ndarray] = [np.zeros(0)]
        weights: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
        counts = self._gaps[instance]
        if counts:
            values.append(np.fromiter(counts.keys(), float, len(counts)))
            weights.append(np.fromiter(counts.values(), np.int64, len(counts)))
        for e, spans in enumerate(self._spans):
            if spans and self.instance_of[e] == instance:
                # gap k (ends[k] - ends[k - 1], k >= 1) counts every span (i, j) with i < k <= j
                bounds = np.asarray(spans, dtype=np.int64)
                count = np.cumsum(np.bincount(bounds[:, 0] + 1, minlength=len(self._ends[e]) + 1)
                                  - np.bincount(bounds[:, 1] + 1, minlength=len(self._ends[e]) + 1))
                values.append(np.diff(self._ends[e]))
                weights.append(count[1:len(self._ends[e])])
        v, w = np.concatenate(values), np.concatenate(weights)
        order = np.argsort(v, kind="stable")
        self._by_gap[instance] = v[order], w[order]
        return self._by_gap[instance]
