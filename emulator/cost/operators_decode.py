"""A run of decode steps priced from the operator tables, everything but the context done once.

`OperatorCostModel.step_time` of n single-token decodes is

    gpu = per_token(padded n) + per_sequence(n) + sum over attention kinds of layers * attention(n, mean) + group

with mean = summed context / n + 1, plus a share of the gap to the longest context (`decode_skew`), and the
host's share on top. Only the attention depends on the context: a lookup in the generation grid's column at
x = n. `make_decode_pricer` takes everything else once and keeps the same sums in the same order, so each
step's seconds are those of the general path to the last bit, and the lookups beyond the measured range are
counted alike. Its `steps(context, context_max, k)` prices k consecutive steps in numpy, elementwise the same
float operations.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from emulator.cost.base import price_steps
from emulator.cost.interpolate import Grid2DColumn

if TYPE_CHECKING:
    from emulator.cost.operators import OperatorCostModel

VECTOR_MIN_STEPS = 32  # fewer decode steps are priced faster one at a time than in numpy


def make_decode_pricer(model: OperatorCostModel, n: int) -> Callable[[int, int], float]:
    """`model.group_step_time` of one engine's step of n decodes by (summed, longest) context, with `.steps`."""
    local, group, flags = model._token_terms(n)
    s = min(max(n, 1), len(model.per_sequence) - 1)
    base = local + model.per_sequence[s] * max(n, 1) / s
    columns = [(layers, grid.at_x(float(n))) for layers, grid in model._generation]
    count, skew, counts = model._count, model.skew, model.extrapolations
    host, host_hidden = model.host_seconds(n), model._host_hidden  # with_host's terms, the same every step
    every_step = flags + model._seq_flags[s]  # tables every step reads beyond their range, in _count's order

    if len(columns) == 1 and not columns[0][1].grid.log:
        price = _one_column(columns[0], n, base, group, every_step, count, skew, counts, host, host_hidden)
    else:
        def price(context: int, context_max: int) -> float:
            for name in every_step:
                counts[name] = counts.get(name, 0) + 1
            us = 0.0
            mean = context / n + 1.0
            skewed = skew and n > 1 and context_max + 1.0 > mean
            for layers, column in columns:
                t, ex = column(mean)
                if skewed:
                    longest, ex_longest = column(context_max + 1.0)
                    if longest > t:
                        t += skew * (longest - t)
                    ex = ex or ex_longest
                us += layers * t
                if ex:
                    count(("generation_attention",))
            gpu = (base + us + group) * 1e-6
            if host_hidden:
                return gpu if gpu >= host else host
            return gpu + host

    def steps(context: int, context_max: int, k: int) -> list[float]:
        """`price` of k consecutive steps from (context, context_max), each one token longer per request,
        in numpy: elementwise, the same operations on the same values, so the same seconds to the last
        bit (and the same lookups counted). A run planned ahead in a cluster prices hundreds at once."""
        if k < VECTOR_MIN_STEPS or any(column.grid.log for _, column in columns):
            return price_steps(price, context, context_max, n, k)
        for name in every_step:
            counts[name] = counts.get(name, 0) + k
        i = np.arange(k)
        mean = (context + n * i) / n + 1.0
        longest = (context_max + i).astype(np.float64) + 1.0
        skewed = longest > mean if skew and n > 1 else None
        us = 0.0
        extrapolated = 0
        for layers, column in columns:
            t, ex = column.many(mean)
            if skewed is not None:
                t_longest, ex_longest = column.many(longest)
                t = np.where(skewed & (t_longest > t), t + skew * (t_longest - t), t)
                ex = ex | (skewed & ex_longest)
            us = us + layers * t
            extrapolated += int(np.count_nonzero(ex))
        if extrapolated:
            counts["generation_attention"] = counts.get("generation_attention", 0) + extrapolated
        gpu = (base + us + group) * 1e-6
        return (np.where(gpu >= host, gpu, host) if host_hidden else gpu + host).tolist()

    price.steps = steps  # type: ignore[attr-defined]
    return price


def _one_column(at: tuple[int, Grid2DColumn], n: int, base: float, group: float, every_step: tuple[str, ...],
                count, skew: float, counts: dict[str, int], host: float,
                host_hidden: bool) -> Callable[[int, int], float]:
    """The general pricer's steps for one attention kind on a linear grid (every model without sliding-window
    layers), with each lookup's y-span kept between steps (Grid2DColumn.span): the grid's context points are
    powers of two, so a run's mean and longest contexts stay in one span for long stretches, most steps search
    nothing and the lookup is its few float operations, inlined (it runs twice for each of the hundreds of
    thousands of steps of a replay). Outside the kept span a step reads the column as the general pricer does."""
    layers, column = at
    wx = column.wx
    skews = bool(skew and n > 1)
    at_mean = at_longest = column.span(0.0)  # an empty range: the first step searches

    def price(context: int, context_max: int) -> float:
        nonlocal at_mean, at_longest
        for name in every_step:
            counts[name] = counts.get(name, 0) + 1
        y = context / n + 1.0  # the mean
        lo, hi, start, width, a0, da, b0, db, ex = at_mean
        if lo <= y < hi:
            wy = (y - start) / width
            a = a0 + da * wy
            b = b0 + db * wy
            t = a + (b - a) * wx
        else:
            t, ex = column(y)
            at_mean = column.span(y)
        mean, y = y, context_max + 1.0  # the longest
        if skews and y > mean:
            lo, hi, start, width, a0, da, b0, db, ex_longest = at_longest
            if lo <= y < hi:
                wy = (y - start) / width
                a = a0 + da * wy
                b = b0 + db * wy
                longest = a + (b - a) * wx
            else:
                longest, ex_longest = column(y)
                at_longest = column.span(y)
            if longest > t:
                t += skew * (longest - t)
            ex = ex or ex_longest
        if ex:
            count(("generation_attention",))
        gpu = (base + (0.0 + layers * t) + group) * 1e-6  # the general pricer's sum from us = 0.0
        if host_hidden:
            return gpu if gpu >= host else host
        return gpu + host

    return price
