"""A run of decode steps priced from the measured tables, everything but the context done once.

`ProfiledCostModel.step_time` of n single-token decodes is

    gpu = dense(padded n) + per_sequence(n) + layers * attention(0, 0, n, mean) [+ all-reduces] [+ experts]

with mean = summed context // n, plus a share of the gap to the longest context (`decode_skew`), and the
host's share on top. Only the attention depends on the context, and with no prefill chunk it reads one or
two measured rows (kv_decode -> time) of the table at this n. `make_decode_pricer` takes everything else
once and keeps the same sums in the same order, so each step's seconds are those of the general path to
the last bit, and the lookups beyond the measured range are counted alike. Its `steps(context, context_max,
k)` prices k consecutive steps in numpy, elementwise the same float operations.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from emulator.cost.base import price_steps
from emulator.cost.interpolate import Table1D, bracket

if TYPE_CHECKING:
    from emulator.cost.profiled import ProfiledCostModel, _Row

VECTOR_MIN_STEPS = 32  # fewer decode steps are priced faster one at a time than in numpy (measured: ~30)


def _many(row: _Row, arrays: dict, x: np.ndarray) -> np.ndarray:
    """row.value at every x of an array, each as one lookup computes it (the same float operations)."""
    pair = arrays.get(row)
    if pair is None:
        pair = arrays[row] = (np.asarray(row.xs, dtype=np.float64), np.asarray(row.ys, dtype=np.float64))
    xs, ys = pair
    if len(xs) == 1:
        return np.full(len(x), ys[0])
    i = np.searchsorted(xs, x, side="right")  # bisect_right
    np.clip(i, 1, len(xs) - 1, out=i)  # at or below the first point: masked below
    x0 = xs[i - 1]
    y0 = ys[i - 1]
    y = y0 + (ys[i] - y0) * (x - x0) / (xs[i] - x0)
    return np.where(x <= xs[0], ys[0], y)


def make_decode_pricer(model: ProfiledCostModel, n: int, arrays: dict) -> Callable[[int, int], float] | None:
    """`model.step_time` of a step of n decodes by (summed, longest) context, with `.steps`; None where the
    general path is not the one this mirrors (no decodes, or a table whose first prefill point is negative).
    `arrays`: the model's measured rows as numpy arrays, by row (filled as `steps` reads them)."""
    if n < 1:
        return None
    attention = model.attention
    # the attention lookup at (prefill 0, kv_prefill 0.0, n decodes, kd): the prefill axis at its first point
    p_lo, _, wp = bracket(attention.pcs, 0)
    n_lo, n_hi, wn = bracket(attention.nds, n)
    slices = [attention._slice(attention.pcs[p_lo], attention.nds[n_lo])]
    if wn != 0.0:
        slices.append(attention._slice(attention.pcs[p_lo], attention.nds[n_hi]))
    rows = []
    for s in slices:
        k_lo, _, wk = bracket(s.kps, 0.0)
        if wk != 0.0:
            return None
        rows.append(s.rows[k_lo])
    if wp != 0.0:
        return None
    row_a = rows[0]
    row_b = rows[1] if len(rows) > 1 else None
    value_a = row_a.value
    value_b = row_b.value if row_b is not None else None
    mp = attention.max_point
    nd_beyond = bool(0 > mp[0] or 0.0 > mp[1] or n > mp[2])  # AttentionTable.__call__'s test, but for kd
    kd_max = float(mp[3])

    padded = model.padded_tokens(n)
    dense, per_sequence = model.dense, model.per_sequence
    base = dense.value(padded) + per_sequence.value(n)
    dense_beyond, sequence_beyond = padded > dense.x_max, n > per_sequence.x_max
    layers = model.num_layers
    all_reduce = model._all_reduce_us(padded) if model.tp > 1 else None
    experts = None
    expert_counts: list[tuple[Table1D, int]] = []
    if model.moe is not None:
        # constant per n; the tables it reads beyond their range, found by pricing it once and put back
        moe_rows = model.moe.rows
        before = [r.extrapolations for r in moe_rows]
        experts = model._moe_time(padded, 1)
        expert_counts = [(r, r.extrapolations - b) for r, b in zip(moe_rows, before) if r.extrapolations != b]
        for r, b in zip(moe_rows, before):
            r.extrapolations = b
    skew = model.skew if n > 1 else 0.0
    host, host_hidden = model.host_seconds(n), model._host_hidden

    def price(context: int, context_max: int) -> float:
        if dense_beyond:
            dense.extrapolations += 1
        if sequence_beyond:
            per_sequence.extrapolations += 1
        mean = context // n
        if nd_beyond or mean > kd_max:
            attention.extrapolations += 1
        t = value_a(mean)
        t = t + ((t if value_b is None else value_b(mean)) - t) * wn
        if skew and context_max > mean:
            if nd_beyond or context_max > kd_max:
                attention.extrapolations += 1
            longest = value_a(context_max)
            longest = longest + ((longest if value_b is None else value_b(context_max)) - longest) * wn
            if longest > t:
                t += skew * (longest - t)
        us = base + layers * t
        if all_reduce is not None:
            us += all_reduce
        if experts is not None:
            us += experts
            for r, c in expert_counts:
                r.extrapolations += c
        gpu = us * 1e-6
        if host_hidden:
            return gpu if gpu >= host else host
        return gpu + host

    def at(x: np.ndarray) -> np.ndarray:
        t = _many(row_a, arrays, x)
        return t + ((t if row_b is None else _many(row_b, arrays, x)) - t) * wn

    def steps(context: int, context_max: int, k: int) -> list[float]:
        """`price` of k consecutive steps from (context, context_max), each one token longer per request."""
        if k < VECTOR_MIN_STEPS:
            return price_steps(price, context, context_max, n, k)
        if dense_beyond:
            dense.extrapolations += k
        if sequence_beyond:
            per_sequence.extrapolations += k
        i = np.arange(k, dtype=np.int64)
        mean = ((context + n * i) // n).astype(np.float64)
        longest_x = (context_max + i).astype(np.float64)
        beyond = k if nd_beyond else int(np.count_nonzero(mean > kd_max))
        t = at(mean)
        if skew:
            skewed = longest_x > mean
            if skewed.any():
                longest = at(longest_x)
                beyond += int(np.count_nonzero(skewed)) if nd_beyond else \
                    int(np.count_nonzero(skewed & (longest_x > kd_max)))
                t = np.where(skewed & (longest > t), t + skew * (longest - t), t)
        attention.extrapolations += beyond
        us = base + layers * t
        if all_reduce is not None:
            us = us + all_reduce
        if experts is not None:
            us = us + experts
            for r, c in expert_counts:
                r.extrapolations += c * k
        gpu = us * 1e-6
        return (np.where(gpu >= host, gpu, host) if host_hidden else gpu + host).tolist()

    price.steps = steps  # type: ignore[attr-defined]
    return price
