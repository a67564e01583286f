"""The shortcuts a run of decode steps takes give the same numbers, to the last bit, as the step-by-step
way: its steps priced at once (a decode pricer's `steps`), its block crossings taken a period at a time."""
from __future__ import annotations

import random
from itertools import islice

import pytest

from emulator.config import EngineArgs
from emulator.decode_run import _crossings, _first_crossings
from profiles.deployment import build_deployment

DEPLOYMENTS = {
    "operator tables (H100)": ("meta-llama/Llama-3.1-8B", "H100", {}),
    "roofline (B200)": ("meta-llama/Llama-3.1-8B", "B200", {}),
    "two attention kinds (gpt-oss on H200)": ("openai/gpt-oss-120b", "H200", {}),
    "sync, TP 4 (A100, 70B)": ("meta-llama/Llama-3.1-70B", "A100", {"tensor_parallel_size": 4,
                                                                     "async_scheduling": False}),
}


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_steps_priced_at_once_are_those_priced_one_by_one(name):
    model, hardware, args = DEPLOYMENTS[name]
    one_by_one, at_once = (build_deployment(model, hardware, EngineArgs(max_model_len=32768, **args)).cost_model
                           for _ in range(2))
    rnd = random.Random(5)
    for _ in range(60):
        n = rnd.choice([1, 2, 7, 12, 64, 255, 600])
        k = rnd.choice([3, 31, 32, 33, 200])
        context_max = rnd.randint(1, 200_000)
        context = context_max * n if rnd.random() < 0.2 else rnd.randint(context_max, context_max * n)
        price = one_by_one.decode_pricer(n)
        expected = [price(context + n * i, context_max + i) for i in range(k)]
        assert at_once.decode_pricer(n).steps(context, context_max, k) == expected
    # the lookups beyond the measured range are counted alike, in the same order
    assert list(at_once.extrapolation_counts().items()) == list(one_by_one.extrapolation_counts().items())


def test_crossings_taken_a_period_at_a_time_are_those_taken_step_by_step():
    rnd = random.Random(1)
    for _ in range(2000):
        bs = rnd.choice([1, 2, 16, 32])
        by_phase: dict[int, list[tuple[int, int]]] = {}
        for i in range(rnd.randint(1, 40)):
            first = rnd.randint(1, bs + rnd.choice([0, 0, 5]))
            by_phase.setdefault(first % bs, []).append((i, first))
        last_first = max(first for members in by_phase.values() for _, first in members)
        k = rnd.randint(0, 300)
        assert _first_crossings(by_phase, bs, last_first, k) == list(islice(_crossings(by_phase, bs), k))
