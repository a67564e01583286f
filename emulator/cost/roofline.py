"""Kernel times on a device known only by its spec sheet: a roofline with learned efficiencies.

For each operator we count the work F (FLOPs) and the traffic B (bytes to and
from device memory; collectives are the link model's, emulator.cost.collectives). The ideal time is
max(F / peak FLOP/s of the compute dtype, B / bandwidth). Real kernels reach
only part of that, and how much depends on the op and on its size: a tiny GEMM
is all launch and tail, a large one runs near peak. So

    t = max(ideal / efficiency(op class, regime, ideal), floor(op class))

where the regime says which roof bounds the op (compute or memory), and the
efficiency curves and floors (launch and synchronisation latency) were learned
from the measured operator tables of profiled devices (profiles/roofline_fit.py):
the physics comes from the target's spec, only the fraction of it that kernels
reach is carried over.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from emulator.cost.work import PRECISIONS, context_attention_work, gemm_work, generation_attention_work, moe_work
from emulator.hardware import DeviceSpec


class Priced(NamedTuple):
    """Times of one op over an array of shapes, and how they were obtained."""
    us: np.ndarray
    extrapolated: np.ndarray  # beyond (or between unmeasured cells of) the measured grid
    source: str
    method: str  # interpolated | scaled | roofline


@dataclass(frozen=True)
class EfficiencyCurves:
    """Achieved fraction of the roof by op class and regime, as a function of log2(ideal µs)."""
    log2_us: tuple[float, ...]
    curves: dict[str, dict[str, tuple[float, ...]]]  # op class -> regime -> efficiency per log2_us point
    floors_us: dict[str, float]

    def efficiency(self, op_class: str, regime: np.ndarray, ideal_us: np.ndarray) -> np.ndarray:
        x = np.log2(np.maximum(ideal_us, 1e-6))
        by_regime = self.curves.get(op_class) or self.curves["default"]
        compute = np.interp(x, self.log2_us, by_regime.get("compute", by_regime.get("memory")))
        memory = np.interp(x, self.log2_us, by_regime.get("memory", by_regime.get("compute")))
        return np.where(regime, compute, memory)

    def floor(self, op_class: str) -> float:
        return self.floors_us.get(op_class, self.floors_us["default"])

    @classmethod
    def from_dict(cls, d: dict) -> "EfficiencyCurves":
        return cls(tuple(d["log2_us"]),
                   {c: {r: tuple(v) for r, v in regimes.items()} for c, regimes in d["curves"].items()},
                   dict(d["floors_us"]))

    def to_dict(self) -> dict:
        return {"log2_us": list(self.log2_us),
                "curves": {c: {r: [round(float(x), 4) for x in v] for r, v in regimes.items()}
                           for c, regimes in self.curves.items()},
                "floors_us": {c: round(float(v), 3) for c, v in self.floors_us.items()}}


def op_class(kind: str, dtype: str = "") -> str:
    """Efficiency class of an op: GEMMs and MoE by their compute precision."""
    if kind in ("gemm", "moe"):
        compute, wb, _ = PRECISIONS[dtype]
        return f"{kind}_{'w4a16' if wb < 1 and compute == 'bf16' else compute}"
    return kind


class Roofline:
    """Prices ops on one device from FLOPs, bytes and learned efficiencies (all times in µs)."""

    def __init__(self, device: DeviceSpec, curves: EfficiencyCurves) -> None:
        self.device = device
        self.curves = curves
        self.source = f"roofline on {device.name} spec"

    def time(self, kind: str, flops, traffic, compute_dtype: str = "bf16", dtype: str = "") -> np.ndarray:
        flops, traffic = np.asarray(flops, dtype=np.float64), np.asarray(traffic, dtype=np.float64)
        compute_us = flops / self.device.peak_flops(compute_dtype) * 1e6
        memory_us = traffic / self.device.memory_bandwidth * 1e6
        ideal = np.maximum(compute_us, memory_us)
        cls = op_class(kind, dtype)
        eff = self.curves.efficiency(cls, compute_us >= memory_us, ideal)
        return np.maximum(ideal / np.maximum(eff, 1e-3), self.curves.floor(cls))

    def _priced(self, us: np.ndarray) -> Priced:
        return Priced(us, np.zeros(np.shape(us), bool), self.source, "roofline")

    # -- the pricer interface (shared with emulator.cost.table_pricer.TablePricer) ---------
    def gemm(self, m, n: int, k: int, dtype: str) -> Priced:
        f, b = gemm_work(m, n, k, dtype)
        return self._priced(self.time("gemm", f, b, PRECISIONS[dtype][0], dtype))

    def context_attention(self, batch, isl, heads, kv_heads, head_dim, window, kv_dtype) -> Priced:
        f, b = context_attention_work(batch, isl, heads, kv_heads, head_dim, window, kv_dtype)
        return self._priced(self.time("context_attention", f, b))

    def generation_attention(self, batch, kv_len, heads, kv_heads, head_dim, window, kv_dtype) -> Priced:
        f, b = generation_attention_work(batch, kv_len, heads, kv_heads, head_dim, window, kv_dtype)
        return self._priced(self.time("generation_attention", f, b))

    def moe(self, tokens, hidden, inter, topk, experts, moe_tp, moe_ep, dtype) -> Priced:
        f, b = moe_work(tokens, hidden, inter, topk, experts, moe_tp, moe_ep, dtype)
        return self._priced(self.time("moe", f, b, PRECISIONS[dtype][0], dtype))

    def memory_bound(self, num_bytes) -> Priced:
        return self._priced(self.time("memory_bound", 0.0, num_bytes))
