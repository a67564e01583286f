"""Operator times read from a device's measured operator tables, the roofline filling gaps.

Each method prices one operator over an array of shapes and says how: read from
the table (`interpolated`, or `extrapolated` where the shape is beyond what was
measured), `scaled` from the nearest measured variant by the ratio of their
roofline times (a MoE shape, head size or window that was not measured), or
priced by the `roofline` alone when the device has no table for the op.
The tables are passed in (profiles.operator_tables loads them): no I/O here.
"""
from __future__ import annotations

import re

import numpy as np

from emulator.cost.interpolate import GridTable
from emulator.cost.roofline import Priced, Roofline, op_class
from emulator.cost.work import PRECISIONS, context_attention_work, gemm_work, generation_attention_work, moe_work

_MOE_NAME = re.compile(r"moe/(?P<dtype>[^/]+)/h(?P<h>\d+)_i(?P<i>\d+)_k(?P<k>\d+)_e(?P<e>\d+)"
                       r"/tp(?P<tp>\d+)_ep(?P<ep>\d+)")
_ATTN_NAME = re.compile(r"(?P<phase>context|generation)_attention/(?P<kv>[^/]+)/hd(?P<hd>\d+)/w(?P<w>\d+)")
# dtypes a table may stand in for when the exact one was not measured (same kernels' precision)
_DTYPE_STAND_INS = {"fp8_block": ("fp8",), "fp8": ("fp8_block",), "fp16": ("bf16",), "bf16": ("fp16",)}
# vLLM pads MXFP4 expert weights to its kernel's tiles before loading them
# (mxfp4_round_up_hidden_size_and_intermediate_size): Marlin rounds the hidden size
# up to 256 and each rank's intermediate slice up to 128, the other Hopper kernels
# the slice up to 64. (hidden, slice) multiples per expert dtype.
_KERNEL_PADDING = {"w4a16_mxfp4_marlin": (256, 128), "w4a16_mxfp4": (1, 64)}


def kernel_expert_shape(dtype: str, hidden: int, inter: int, moe_tp: int) -> tuple[int, int]:
    """(hidden, intermediate) the fused-MoE kernel multiplies: the layer's, padded as vLLM pads it
    (the intermediate size is the whole layer's, moe_tp slices of the padded per-rank width)."""
    h_multiple, i_multiple = _KERNEL_PADDING.get(dtype, (1, 1))
    ceil = lambda x, m: -(-x // m) * m  # noqa: E731
    return ceil(hidden, h_multiple), ceil(-(-inter // moe_tp), i_multiple) * moe_tp


class TablePricer:
    def __init__(self, grids: dict, roofline: Roofline, hardware: str) -> None:
        """grids: name -> object with axes (dict of arrays), values, measured, source."""
        self.grids = grids
        self.roofline = roofline
        self.hardware = hardware
        self._tables: dict[str, GridTable] = {}
        self.moe_shapes = [(m.groupdict(), name) for name in grids if (m := _MOE_NAME.fullmatch(name))]
        self.attention = [(m.groupdict(), name) for name in grids if (m := _ATTN_NAME.fullmatch(name))]

    def _table(self, name: str) -> GridTable:
        table = self._tables.get(name)
        if table is None:
            g = self.grids[name]
            table = self._tables[name] = GridTable(list(g.axes.values()), g.values, g.measured,
                                                   proportional=(True,) * len(g.axes))
        return table

    def _lookup(self, name: str, *coords) -> Priced:
        us, extrapolated = self._table(name)(*coords)
        return Priced(us, extrapolated, f"{self.hardware} {name}", "interpolated")

    def _scaled(self, base: Priced, work_here, work_there, kind: str, dtype: str = "bf16") -> Priced:
        compute = PRECISIONS[dtype][0] if dtype in PRECISIONS else "bf16"
        ratio = (self.roofline.time(kind, *work_here, compute, dtype)
                 / self.roofline.time(kind, *work_there, compute, dtype))
        return Priced(base.us * ratio, base.extrapolated, base.source, "scaled")

    # -- the pricer interface ---------------------------------------------------------
    def gemm(self, m, n: int, k: int, dtype: str) -> Priced:
        for candidate in (dtype, *_DTYPE_STAND_INS.get(dtype, ())):
            if f"gemm/{candidate}" in self.grids:
                return self._lookup(f"gemm/{candidate}", m, n, k)
        if dtype in ("int4_wo", "w4a16_mxfp4") and "gemm/bf16" in self.grids:
            base = self._lookup("gemm/bf16", m, n, k)
            return self._scaled(base, gemm_work(m, n, k, dtype), gemm_work(m, n, k, "bf16"), "gemm", dtype)
        return self.roofline.gemm(m, n, k, dtype)

    def _attention(self, phase: str, work, batch, seq, heads, kv_heads, head_dim, window, kv_dtype) -> Priced:
        options = [(d, name) for d, name in self.attention if d["phase"] == phase]
        if not options:
            roof = self.roofline.context_attention if phase == "context" else self.roofline.generation_attention
            return roof(batch, seq, heads, kv_heads, head_dim, window, kv_dtype)

        def distance(option):
            d = option[0]
            return (d["kv"] != kv_dtype and not (d["kv"] == "bf16" and kv_dtype == "fp16"),
                    abs(np.log2(int(d["hd"]) / head_dim)), int(d["w"]) != window, abs(int(d["w"]) - window))
        d, name = min(options, key=distance)
        base = self._lookup(name, batch, seq, heads, kv_heads)
        hd, w = int(d["hd"]), int(d["w"])
        if (hd, w, d["kv"]) == (head_dim, window, kv_dtype):
            return base
        kind = f"{phase}_attention"
        return self._scaled(base, work(batch, seq, heads, kv_heads, head_dim, window, kv_dtype),
                            work(batch, seq, heads, kv_heads, hd, w, d["kv"]), kind)

    def context_attention(self, batch, isl, heads, kv_heads, head_dim, window, kv_dtype) -> Priced:
        return self._attention("context", context_attention_work, batch, isl, heads, kv_heads, head_dim, window,
                               kv_dtype)

    def generation_attention(self, batch, kv_len, heads, kv_heads, head_dim, window, kv_dtype) -> Priced:
        return self._attention("generation", generation_attention_work, batch, kv_len, heads, kv_heads, head_dim,
                               window, kv_dtype)

    def moe(self, tokens, hidden, inter, topk, experts, moe_tp, moe_ep, dtype) -> Priced:
        here = dict(dtype=dtype, h=hidden, i=inter, k=topk, e=experts, tp=moe_tp, ep=moe_ep)
        same_dtype = [(d, name) for d, name in self.moe_shapes if d["dtype"] == dtype]
        if not same_dtype:
            return self.roofline.moe(tokens, hidden, inter, topk, experts, moe_tp, moe_ep, dtype)
        key = {k: str(v) for k, v in here.items()}
        exact = next((name for d, name in same_dtype if d == key), None)
        if exact is not None:
            return self._lookup(exact, tokens)

        def distance(option):  # the nearest measured layer: the same model shape first, then the split
            d = option[0]
            split = abs(np.log2(int(d["tp"]) / moe_tp)) + abs(np.log2(int(d["ep"]) / moe_ep))
            shape = sum(abs(np.log2(int(d[a]) / here[a])) for a in ("h", "i", "k", "e"))
            return shape, split
        d, name = min(same_dtype, key=distance)
        h, i, k, e, tp, ep = (int(d[a]) for a in ("h", "i", "k", "e", "tp", "ep"))
        # what the kernel multiplies here and where it was measured (both padded as vLLM pads them)
        hidden_k, inter_k = kernel_expert_shape(dtype, hidden, inter, moe_tp)
        h_k, i_k = kernel_expert_shape(dtype, h, i, tp)
        if (h, i, k, e) == (hidden, inter, topk, experts):  # the same layer split otherwise: by the roofline
            base = self._lookup(name, tokens)
            return self._scaled(base, moe_work(tokens, hidden_k, inter_k, topk, experts, moe_tp, moe_ep, dtype),
                                moe_work(tokens, h_k, i_k, k, e, tp, ep, dtype), "moe", dtype)
        # Another layer, the same kernel: read it where each expert gets as many
        # tokens (T k / E) as here, so its per-expert GEMMs run as efficiently; the time then
        # scales with the expert weights each rank streams and multiplies (E/ep x h x i/tp).
        load = (topk / experts) / (k / e)
        weights = (experts / moe_ep * hidden_k * inter_k / moe_tp) / (e / ep * h_k * i_k / tp)
        us, extrapolated = self._table(name)(np.asarray(tokens, dtype=np.float64) * load)
        floor = min(self.roofline.curves.floor(op_class("moe", dtype)), float(self.grids[name].values.min()))
        return Priced(np.maximum(us * weights, floor), extrapolated, f"{self.hardware} {name}", "scaled")

    def memory_bound(self, num_bytes) -> Priced:
        if "memory_bound" in self.grids:
            return self._lookup("memory_bound", num_bytes)
        return self.roofline.memory_bound(num_bytes)
