"""Measured attention time of a mixed batch: one prefill chunk plus uniform decodes.

The table holds points (prefill_chunk, kv_prefill, n_decode, kv_decode) -> time,
measured as one varlen attention call. Lookup is linear along each axis: the
(prefill_chunk, n_decode) pairs form slices, each slice a ragged 2-D grid of
(kv_prefill, kv_decode); a missing corner slice is replaced by the nearest
existing one. Several prefills in one batch are folded into one equivalent chunk
by the caller (see costmodel.BatchShape).
"""
from __future__ import annotations

import numpy as np

from emulator.interpolate import Table1D, bracket


class _Slice:
    """Ragged (kv_prefill -> kv_decode -> time) grid for one (prefill_chunk, n_decode)."""
    __slots__ = ("kps", "rows")

    def __init__(self, points: np.ndarray) -> None:
        self.kps = sorted(set(points[:, 0].tolist()))
        self.rows = [Table1D(points[points[:, 0] == kp][:, 1], points[points[:, 0] == kp][:, 2]) for kp in self.kps]

    def __call__(self, kp: float, kd: float) -> float:
        lo, hi, w = bracket(self.kps, kp)
        t_lo = self.rows[lo](kd)
        return t_lo if w == 0.0 else t_lo + (self.rows[hi](kd) - t_lo) * w


class AttentionTable:
    def __init__(self, points: np.ndarray) -> None:
        """points: (n, 5) array of prefill_chunk, kv_prefill, n_decode, kv_decode, time."""
        self.pcs = sorted(set(points[:, 0].tolist()))
        self.nds = sorted(set(points[:, 2].tolist()))
        self.slices: dict[tuple[float, float], _Slice] = {}
        for pc in self.pcs:
            for nd in self.nds:
                sel = points[(points[:, 0] == pc) & (points[:, 2] == nd)]
                if len(sel):
                    self.slices[(pc, nd)] = _Slice(sel[:, [1, 3, 4]])
        self.max_point = points[:, :4].max(axis=0)
        self.extrapolations = 0
        self._nearest: dict[tuple[float, float], _Slice] = {}

    def _slice(self, pc: float, nd: float) -> _Slice:
        s = self.slices.get((pc, nd))
        if s is None:
            s = self._nearest.get((pc, nd))
            if s is None:
                key = min(self.slices, key=lambda k: (k[0] - pc) ** 2 + (k[1] - nd) ** 2)
                s = self._nearest[(pc, nd)] = self.slices[key]
        return s

    def __call__(self, pc: float, kp: float, nd: float, kd: float) -> float:
        if pc > self.max_point[0] or kp > self.max_point[1] or nd > self.max_point[2] or kd > self.max_point[3]:
            self.extrapolations += 1
        p_lo, p_hi, wp = bracket(self.pcs, pc)
        n_lo, n_hi, wn = bracket(self.nds, nd)
        pcs, nds = self.pcs, self.nds
        t_ll = self._slice(pcs[p_lo], nds[n_lo])(kp, kd)
        t_lh = t_ll if wn == 0.0 else self._slice(pcs[p_lo], nds[n_hi])(kp, kd)
        t_l = t_ll + (t_lh - t_ll) * wn
        if wp == 0.0:
            return t_l
        t_hl = self._slice(pcs[p_hi], nds[n_lo])(kp, kd)
        t_hh = t_hl if wn == 0.0 else self._slice(pcs[p_hi], nds[n_hi])(kp, kd)
        return t_l + (t_hl + (t_hh - t_hl) * wn - t_l) * wp

