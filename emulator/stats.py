"""Per-request records and aggregate statistics, all in virtual seconds."""
from __future__ import annotations

import numpy as np

from emulator.engine import StepRecord
from emulator.request import Request

PERCENTILES = (50, 90, 95, 99)


def request_record(request: Request) -> dict:
    """One finished request, in the schema of replay's requests.jsonl."""
    first, finish = request.first_token_time, request.finish_time
    ttft = None if first is None else first - request.arrival_time
    tpot = ((request.last_token_time - first) / (request.num_output_tokens - 1)
            if first is not None and request.num_output_tokens > 1 else None)
    return {
        "request_id": request.request_id,
        "arrival_time": request.arrival_time,
        "queued_time": request.queued_time,
        "scheduled_time": request.scheduled_time,
        "first_token_time": first,
        "finish_time": finish,
        "input_tokens": request.num_prompt_tokens,
        "output_tokens": request.num_output_tokens,
        "cached_tokens": max(request.num_cached_tokens, 0),
        "num_preemptions": request.num_preemptions,
        "ttft": ttft,
        "tpot": tpot,
        "e2e": None if finish is None else finish - request.arrival_time,
        "finish_reason": request.finish_reason,
        "engine": request.engine_index,
    }


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
    out_tokens = sum(r["output_tokens"] for r in records)
    in_tokens = sum(r["input_tokens"] for r in finished)
    return {
        "num_requests": len(records),
        "num_finished": len(finished),
        "num_aborted": sum(r["finish_reason"] == "abort" for r in records),
        "duration": duration,
        "ttft": distribution(r["ttft"] for r in finished),
        "tpot": distribution(r["tpot"] for r in finished),
        "e2e": distribution(r["e2e"] for r in finished),
        "queue_time": distribution(r["scheduled_time"] - r["arrival_time"] for r in finished
                                   if r["scheduled_time"] is not None),
        "preemptions": {"total": sum(r["num_preemptions"] for r in records),
                        "requests_preempted": sum(r["num_preemptions"] > 0 for r in records)},
        "cached_tokens": sum(r["cached_tokens"] for r in records),
        "throughput": {
            "requests_per_s": len(finished) / duration if duration > 0 else 0.0,
            "output_tokens_per_s": out_tokens / duration if duration > 0 else 0.0,
            "total_tokens_per_s": (out_tokens + in_tokens) / duration if duration > 0 else 0.0,
        },
    }


class TimeSeries:
    """1-second ticks of what vLLM's log line reports: running, waiting, KV usage, throughput.

    A tick at t shows each engine's state after its last step that ended by t, and the
    tokens of the steps that ended in (t - 1, t]."""

    def __init__(self, num_engines: int, tick: float = 1.0) -> None:
        self.tick = tick
        self.rows: list[dict] = []
        self._state = [(0, 0, 0.0)] * num_engines  # running, waiting, KV usage
        self._next = tick
        self._prompt = 0
        self._generation = 0

    def on_step(self, record: StepRecord) -> None:
        while record.end > self._next:
            self._emit(self._next)
        self._generation += len(record.got_token)
        self._prompt += record.num_prompt_tokens
        self._state[record.engine] = (record.num_running, record.num_waiting, record.kv_usage)

    def _emit(self, t: float) -> None:
        self.rows.append({
            "t": round(t, 6),
            "prompt_throughput": self._prompt / self.tick,
            "gen_throughput": self._generation / self.tick,
            "running": sum(s[0] for s in self._state),
            "waiting": sum(s[1] for s in self._state),
            "kv_cache_pct": round(100 * sum(s[2] for s in self._state) / len(self._state), 2),
        })
        self._prompt = self._generation = 0
        self._next += self.tick

    def finish(self, end: float) -> list[dict]:
        """Close the series with the tick that holds `end` (vLLM's last log line is a partial second)."""
        while end > self._next - self.tick:
            self._emit(self._next)
        return self.rows
