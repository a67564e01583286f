"""Every cost model splits a step's time by what bounds it, and the parts add up to the step."""
from __future__ import annotations

import pytest

from emulator.batch import BatchShape
from emulator.config import EngineArgs
from profiles.deployment import build_deployment

CASES = {
    "profiled tables (RTX 4090, 8B)": ("meta-llama/Llama-3.1-8B", "RTX4090", {}),
    "profiled tables, TP 2 (RTX PRO 6000, 8B)": ("meta-llama/Llama-3.1-8B", "RTXPRO6000", {"tensor_parallel_size": 2}),
    "profiled MoE, DP 2 (RTX PRO 6000, Qwen3-30B-A3B)": ("Qwen/Qwen3-30B-A3B-Instruct-2507", "RTXPRO6000",
                                                          {"data_parallel_size": 2, "enable_expert_parallel": True}),
    "operator tables, TP 4 (H100, 70B)": ("meta-llama/Llama-3.1-70B", "H100", {"tensor_parallel_size": 4}),
    "operator tables, MoE (H200, gpt-oss-120b)": ("openai/gpt-oss-120b", "H200", {}),
    "roofline (B200, 8B)": ("meta-llama/Llama-3.1-8B", "B200", {}),
}
SHAPES = {
    "decode 8": BatchShape.from_chunks([(1, 1000)] * 8),
    "decode 256": BatchShape.from_chunks([(1, 2000)] * 256),
    "prefill 2048": BatchShape.from_chunks([(2048, 0)]),
    "mixed": BatchShape.from_chunks([(512, 1024)] + [(1, 3000)] * 64),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def deployment(request):
    model, hardware, args = CASES[request.param]
    return build_deployment(model, hardware, EngineArgs(max_model_len=8192, **args))


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_breakdown_adds_up_to_the_step_time(deployment, shape):
    ranks = deployment.config.data_parallel_size if deployment.lockstep_engines else 1
    shapes = [SHAPES[shape]] + [None] * (ranks - 1)
    cost = deployment.cost_model
    parts = cost.breakdown(shapes)
    assert min(parts) >= 0.0
    assert parts.total == pytest.approx(cost.group_step_time(shapes), rel=1e-9)


def test_breakdown_does_not_count_lookups(deployment):
    cost = deployment.cost_model
    before = cost.extrapolation_counts()
    cost.breakdown([BatchShape.from_chunks([(1, 10_000_000)] * 4)])  # far beyond every measured context
    assert cost.extrapolation_counts() == before


def test_small_decode_is_memory_bound_and_long_prefill_compute_bound():
    cost = build_deployment("meta-llama/Llama-3.1-8B", "H100", EngineArgs(max_model_len=8192)).cost_model
    decode = cost.breakdown([SHAPES["decode 8"]])
    prefill = cost.breakdown([SHAPES["prefill 2048"]])
    assert decode.memory > 0.8 * decode.total and decode.communication == 0.0
    assert prefill.compute > 0.8 * prefill.total


def test_tensor_parallel_steps_spend_time_communicating():
    one = build_deployment("meta-llama/Llama-3.1-70B", "H100", EngineArgs(max_model_len=8192,
                                                                        tensor_parallel_size=2)).cost_model
    shape = SHAPES["decode 256"]
    assert one.breakdown([shape]).communication > 0.0
