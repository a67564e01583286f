"""Composing a step from operators, and the order in which cost models are chosen."""
import dataclasses

import pytest

from emulator.config import EngineArgs, resolve
from emulator.cost_selection import NoProfileError, select_cost_model
from emulator.costmodel import BatchShape, ProfiledCostModel
from emulator.hardware import load_device
from emulator.models import load_model
from emulator.operator_costmodel import OperatorCostModel, attention_layers, layer_precisions


def build(model_name, hardware, level=None, **engine):
    model = load_model(model_name)
    device = load_device(hardware)
    config = resolve(EngineArgs(max_model_len=8192, **engine), model, device)
    return select_cost_model(model, device, config, level)


def test_selection_prefers_model_tables_then_operator_tables_then_roofline():
    assert isinstance(build("meta-llama/Llama-3.1-8B", "RTX4090"), ProfiledCostModel)
    on_tables = build("meta-llama/Llama-3.1-8B", "H100")
    assert isinstance(on_tables, OperatorCostModel) and "operator tables H100" in on_tables.describe()
    spec_only = build("meta-llama/Llama-3.1-8B", "B200")
    assert isinstance(spec_only, OperatorCostModel) and "roofline" in spec_only.describe()
    assert "roofline" in build("meta-llama/Llama-3.1-8B", "RTX4090", "roofline").describe()


def test_forcing_a_level_without_data_is_an_error():
    with pytest.raises(NoProfileError, match="no measured profile"):
        build("meta-llama/Llama-3.1-8B", "B200", "profiled")
    with pytest.raises(NoProfileError, match="no operator tables"):
        build("meta-llama/Llama-3.1-8B", "B200", "operators")


def test_decode_step_grows_with_batch_and_context_and_tp_shortens_it():
    cm = build("meta-llama/Llama-3.1-70B", "H200", tensor_parallel_size=4)
    t = lambda b, ctx: cm.step_time(BatchShape.from_chunks([(1, ctx)] * b))  # noqa: E731
    assert t(1, 1000) < t(64, 1000) < t(64, 8000)
    assert build("meta-llama/Llama-3.1-70B", "H200", tensor_parallel_size=8).step_time(
        BatchShape.from_chunks([(1, 1000)] * 8)) < t(8, 1000)


def test_breakdown_names_every_op_with_its_source_and_sums_to_the_step():
    cm = build("Qwen/Qwen3-30B-A3B", "H100")
    shape = BatchShape.from_chunks([(512, 0)] + [(1, 2000)] * 16)
    rows = cm.breakdown(shape)
    ops = {r["op"] for r in rows}
    assert {"qkv_proj", "moe", "router", "context_attention", "generation_attention", "lm_head"} <= ops
    assert all(r["method"] in ("interpolated", "extrapolated", "scaled", "roofline") for r in rows)
    assert sum(r["us"] for r in rows) * 1e-6 == pytest.approx(cm.step_time(shape), rel=1e-6)


def test_lookups_beyond_the_measured_grid_are_counted():
    cm = build("meta-llama/Llama-3.1-8B", "H100")
    cm.step_time(BatchShape.from_chunks([(1, 200_000)] * 4))  # context beyond every measured kv_len
    assert cm.extrapolation_counts().get("generation_attention", 0) >= 1


def test_gpt_oss_runs_mxfp4_experts_and_alternating_sliding_window_layers():
    model = load_model("openai/gpt-oss-120b")
    assert layer_precisions(model, load_device("H200")) == ("bf16", "w4a16_mxfp4")
    assert attention_layers(model, model.num_layers) == [(128, 18), (0, 18)]
    cm = build("openai/gpt-oss-120b", "H200")
    methods = dict((k, v[1]) for k, v in cm.methods.items())
    assert methods["moe"] == "interpolated"  # the exact gpt-oss expert shape was measured


def test_fp8_checkpoints_use_block_fp8_gemms():
    model = load_model("Qwen/Qwen3-235B-A22B-FP8")
    assert layer_precisions(model, load_device("H200")) == ("fp8_block", "fp8_block")
    llama = dataclasses.replace(load_model("meta-llama/Llama-3.1-70B"), weight_dtype="fp8")
    assert layer_precisions(llama, load_device("H200")) == ("fp8", "fp8")


def test_pricing_a_step_is_cheap():
    import time
    cm = build("meta-llama/Llama-3.1-70B", "H200", tensor_parallel_size=4)
    shapes = [BatchShape.from_chunks([(1, 1000 + i)] * 64 + [(256, i)]) for i in range(2000)]
    start = time.perf_counter()
    for shape in shapes:
        cm.step_time(shape)
    assert (time.perf_counter() - start) / len(shapes) < 200e-6
