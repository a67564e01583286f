"""Goodput under service-level objectives, as `vllm bench serve --goodput` counts it.

SLOs are given as vLLM's bench gives them: `ttft:200 tpot:50 e2el:3000` (milliseconds). A
request is good when it finished and meets every SLO given; a request of one output token
has a TPOT of 0 for this purpose (vLLM's rule).
"""
from __future__ import annotations

import math

SLO_KEYS = {"ttft": "ttft", "tpot": "tpot", "e2el": "e2e"}  # vLLM's name -> our record field


def parse_slos(items: list[str] | None) -> dict[str, float]:
    """`["ttft:200", "tpot:50"]` -> {"ttft": 0.2, "tpot": 0.05} (seconds, keyed by vLLM's names)."""
    slos: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition(":")
        try:
            ms = float(value)
        except ValueError:
            ms = math.nan
        if not sep or key not in SLO_KEYS or not (ms > 0 and math.isfinite(ms)):
            raise ValueError(f"bad SLO {item!r}: expected KEY:MILLISECONDS with KEY one of {', '.join(SLO_KEYS)}")
        slos[key] = ms / 1000.0
    return slos


def is_good(record: dict, slos: dict[str, float]) -> bool:
    if record.get("finish_reason") not in ("stop", "length"):
        return False
    for key, limit in slos.items():
        value = record.get(SLO_KEYS[key])
        if key == "tpot" and value is None:
            value = 0.0
        if value is None or value > limit:
            return False
    return True


def goodput(records: list[dict], slos: dict[str, float], duration: float) -> dict:
    good = sum(is_good(r, slos) for r in records)
    return {"slo_ms": {k: v * 1000 for k, v in slos.items()}, "good_requests": good,
            "good_fraction": good / len(records) if records else 0.0,
            "requests_per_s": good / duration if duration > 0 else 0.0}
