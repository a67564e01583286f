"""The operator cost model's decode pricer (emulator.cost.operators_decode), which keeps each lookup's y-span of
the attention grid between steps, gives the seconds of the general path (`step_time` of a decode BatchShape)
to the last bit over runs of consecutive steps that cross spans, start at or below the grid's first point, land
on grid points and go past its last, and counts the lookups beyond the measured range alike; a column's span
reads what its lookup reads."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest

from emulator.batch import BatchShape
from emulator.config import EngineArgs
from emulator.cost.interpolate import Grid2D
from emulator.cost.operators import OperatorCostModel
from profiles.deployment import build_deployment
from test_decode_pricing import DEPLOYMENTS  # the deployments the decode pricer is checked on


def _runs(rnd: random.Random):
    """(n, first summed context, first longest context, steps): long runs through several spans, runs that
    start with every context 0 (the mean at the grid's first point), means that land on grid points, and
    contexts past the grid's last point (2^19)."""
    for _ in range(120):
        n = rnd.choice([1, 2, 3, 7, 12, 64, 255, 600, 5000])
        k = rnd.choice([1, 5, 40, 300])
        kind = rnd.random()
        if kind < 0.15:
            context, context_max = 0, 0
        elif kind < 0.3:
            j = rnd.randint(1, 19)
            context, context_max = n * (2 ** j - 1), 2 ** j - 1 + rnd.randint(0, 50)
        elif kind < 0.4:
            context_max = rnd.randint(500_000, 600_000)
            context = rnd.randint(context_max, context_max * n)
        else:
            context_max = rnd.randint(1, 200_000)
            context = context_max * n if rnd.random() < 0.2 else rnd.randint(context_max, context_max * n)
        yield n, context, context_max, k


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_decode_pricer_gives_the_general_path_seconds_bit_for_bit(name):
    model, hardware, args = DEPLOYMENTS[name]
    general, fast = (build_deployment(model, hardware, EngineArgs(max_model_len=32768, **args)).cost_model
                     for _ in range(2))
    assert isinstance(fast, OperatorCostModel)
    checked = 0
    for n, context, context_max, k in _runs(random.Random(7)):
        expected = [general.step_time(BatchShape.decode(n, context + n * i, context_max + i)) for i in range(k)]
        pricer = fast.decode_pricer(n)
        assert [pricer(context + n * i, context_max + i) for i in range(k)] == expected  # floats, exactly
        checked += k
    assert checked > 5000
    counts = fast.extrapolation_counts()
    assert list(counts.items()) == list(general.extrapolation_counts().items())
    assert counts["generation_attention"] > 0  # contexts past the grid's last point were priced (and counted)


def test_a_span_reads_what_its_lookup_reads():
    rnd = random.Random(3)
    xs, ys = 2.0 ** np.arange(0, 5), 2.0 ** np.arange(0, 8)
    values = np.array([[rnd.uniform(1.0, 100.0) for _ in ys] for _ in xs])
    flags = np.array([[rnd.random() < 0.2 for _ in ys] for _ in xs])
    grid = Grid2D(xs, ys, values, flags, log=False)
    for x in (0.5, 1.0, 3.0, 16.0, 40.0):
        column = grid.at_x(x)
        points = [*ys, *(math.nextafter(y, math.inf) for y in ys), *(math.nextafter(y, 0.0) for y in ys),
                  *(rnd.uniform(0.0, 300.0) for _ in range(300))]
        for y in points:
            lo, hi, start, width, a0, da, b0, db, extrapolated = column.span(y)
            if y <= ys[0]:
                assert lo > hi  # an empty range: the lookup there gives the first point's weight, uncomputed
                continue
            assert lo <= y < hi
            for inside in (y, lo, math.nextafter(hi, 0.0) if hi < math.inf else y * 2.0):
                assert column.span(inside) == (lo, hi, start, width, a0, da, b0, db, extrapolated)
                wy = (inside - start) / width
                a, b = a0 + da * wy, b0 + db * wy
                t, extrapolated_here = column(inside)
                assert a + (b - a) * column.wx == t
                assert extrapolated == bool(extrapolated_here)
    with pytest.raises(ValueError):
        Grid2D(xs, ys, values, flags, log=True).at_x(2.0).span(3.0)


@pytest.mark.parametrize("name", ["operator tables (H100)", "two attention kinds (gpt-oss on H200)"])
def test_a_breakdown_after_pricing_its_step_is_the_breakdown_of_a_fresh_model(name):
    """The breakdown reuses the attention sums the step's pricing just looked up (the power model asks for the
    step just priced): the same seconds as a model that priced nothing, whichever step was priced before it,
    and pricing counts the same lookups either way."""
    model, hardware, args = DEPLOYMENTS[name]
    priced, fresh, alone = (build_deployment(model, hardware, EngineArgs(max_model_len=32768, **args)).cost_model
                            for _ in range(3))
    rnd = random.Random(9)
    shapes = []
    for _ in range(300):
        chunks = [(rnd.choice([1, 1, 1, 17, 512, 2048]), rnd.randint(0, 40_000)) for _ in range(rnd.randint(1, 40))]
        shapes.append(BatchShape.from_chunks(chunks))
    for i, shape in enumerate(shapes):
        assert priced.step_time(shape) == alone.step_time(shape)
        # the step just priced, then another one (the same prefill or decodes as it, or neither)
        other = shapes[i - 1]
        for asked in (shape, other, BatchShape(prefill_tokens=shape.prefill_tokens, prefill_work=shape.prefill_work),
                      BatchShape(num_decode=shape.num_decode, decode_context=shape.decode_context)):
            for ranks in ([asked], [asked, None]):
                fresh._last_prefill, fresh._last_decode = (0, 0.0, 0.0), (0, 0, 0.0)  # nothing looked up before
                assert priced.breakdown(ranks) == fresh.breakdown(ranks)
    assert list(priced.extrapolation_counts().items()) == list(alone.extrapolation_counts().items())
    assert fresh.extrapolation_counts() == {}
