"""The profiled cost model's decode pricer (emulator.cost.profiled_decode) gives the seconds of the general
path (`step_time` of a decode BatchShape) to the last bit, one step at a time and k steps at once, and counts
the lookups beyond the measured range alike: with and without the mixed-length correction, tensor
parallelism, MoE tables, async scheduling, and past every table's last point."""
from __future__ import annotations

import random

import pytest

from emulator.batch import BatchShape
from emulator.config import EngineArgs
from emulator.cost.profiled import ProfiledCostModel
from profiles.deployment import build_deployment

DEPLOYMENTS = {
    "RTX 4090, no skew": ("meta-llama/Llama-3.1-8B", "RTX4090", {}),
    "RTX PRO 6000, skew": ("meta-llama/Llama-3.1-8B", "RTXPRO6000", {}),
    "RTX PRO 6000, TP 2": ("meta-llama/Llama-3.1-8B", "RTXPRO6000", {"tensor_parallel_size": 2}),
    "MoE, TP 2, sync": ("Qwen/Qwen3-30B-A3B-Instruct-2507", "RTXPRO6000",
                        {"tensor_parallel_size": 2, "async_scheduling": False}),
    "MoE beyond its tables": ("microsoft/Phi-mini-MoE-instruct", "A6000",
                              {"max_model_len": 4096, "max_num_batched_tokens": 16384, "max_num_seqs": 1024}),
    "TPU": ("meta-llama/Llama-3.1-8B", "TPUv6e", {}),
}


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_decode_pricer_gives_the_general_path_seconds_bit_for_bit(name):
    model, hardware, args = DEPLOYMENTS[name]
    general, fast = (build_deployment(model, hardware, EngineArgs(**{"max_model_len": 32768, **args})).cost_model
                     for _ in range(2))
    assert isinstance(fast, ProfiledCostModel)
    rnd = random.Random(11)
    checked = 0
    for _ in range(150):
        n = rnd.choice([1, 2, 3, 7, 12, 64, 100, 255, 256, 300, 600, 2000, 9000])
        k = rnd.choice([1, 3, 31, 32, 33, 200])
        context_max = rnd.randint(1, 200_000)
        context = context_max * n if rnd.random() < 0.2 else rnd.randint(context_max, context_max * n)
        expected = [general.step_time(BatchShape.decode(n, context + n * i, context_max + i)) for i in range(k)]
        pricer = fast.decode_pricer(n)
        if rnd.random() < 0.7:
            got = pricer.steps(context, context_max, k)
        else:
            got = [pricer(context + n * i, context_max + i) for i in range(k)]
        assert got == expected  # floats compared exactly
        checked += k
    assert checked > 1000
    counts = fast.extrapolation_counts()
    assert list(counts.items()) == list(general.extrapolation_counts().items())
    assert counts["attention"] > 0  # contexts past the table's last point were priced (and counted)


def test_a_decode_pricer_is_made_once_per_batch_size():
    cost = build_deployment("meta-llama/Llama-3.1-8B", "RTX4090", EngineArgs(max_model_len=32768)).cost_model
    assert cost.decode_pricer(12) is cost.decode_pricer(12)
    assert cost.decode_pricer(12) is not cost.decode_pricer(13)


@pytest.mark.parametrize("name", ["RTX PRO 6000, skew", "MoE, TP 2, sync"])
def test_one_engine_step_time_is_its_group_step_time(name):
    """`step_time` skips `group_step_time`'s lists, and the attention lookups are remembered: mixed
    batches (prefill chunks with history, decodes of mixed lengths) priced twice, by both, agree bit for bit."""
    model, hardware, args = DEPLOYMENTS[name]
    one, group = (build_deployment(model, hardware, EngineArgs(**{"max_model_len": 32768, **args})).cost_model
                  for _ in range(2))
    rnd = random.Random(4)
    shapes = []
    for _ in range(300):
        chunks = [(rnd.choice([1, 1, 1, 17, 512, 2048]), rnd.randint(0, 40_000)) for _ in range(rnd.randint(1, 40))]
        shapes.append(BatchShape.from_chunks(chunks))
    for shape in shapes + shapes:
        assert one.step_time(shape) == group.group_step_time([shape])
    assert list(one.extrapolation_counts().items()) == list(group.extrapolation_counts().items())


def test_attention_slices_cut_in_python_are_those_cut_by_numpy():
    """_Slice cuts its points into rows (kv_prefill -> kv_decode -> time) in Python: the same rows as
    cutting where kv_prefill changes with numpy (`_runs`), for every slice of every shipped profile; a row
    reads the same times as a Table1D of its points, below, between, on and beyond them."""
    from emulator.cost.interpolate import Table1D
    from emulator.cost.profiled import AttentionTable, _runs, _Slice
    from profiles.model_profile import available_profiles, find_profile
    checked = 0
    for hardware, model, dtype, tp in available_profiles():
        table = AttentionTable(find_profile(hardware, model, dtype, tp).attention)
        for points in table._points.values():
            points = points[:, [1, 3, 4]]
            rows = _runs(points, [0])
            expected = [(float(row[0, 0]), Table1D(row[:, 1], row[:, 2])) for row in rows]
            got = _Slice(points)
            assert got.kps == [kp for kp, _ in expected]
            assert [(r.xs, r.ys) for r in got.rows] == [(r.xs, r.ys) for _, r in expected]
            for row, (_, table) in zip(got.rows, expected):
                xs = [*table.xs, 0, 1, table.xs[0] - 0.5, table.xs[-1] * 3 + 7, table.xs[-1] + 1]
                xs += [int(a + (b - a) * f) for a, b in zip(table.xs, table.xs[1:]) for f in (0.3, 0.71)]
                xs += [a + (b - a) / 3 for a, b in zip(table.xs, table.xs[1:])]
                assert [row.value(x) for x in xs] == [table.value(x) for x in xs]
            checked += 1
    assert checked > 1000


def test_a_row_of_unsorted_or_repeated_points_reads_as_a_table1d_of_them():
    from emulator.cost.interpolate import Table1D
    from emulator.cost.profiled import _Row
    for xs, ys in [([30.0, 10.0, 20.0], [3.5, 1.25, 2.0]), ([10.0, 20.0, 20.0, 40.0], [1.0, 2.0, 2.5, 4.0]),
                   ([5.0], [7.0])]:
        row, table = _Row(xs, ys), Table1D(xs, ys)
        probes = [0, 5, 10, 12.5, 15, 20, 25, 31, 40, 55.5, 1000]
        assert [row.value(x) for x in probes] == [table.value(x) for x in probes]
