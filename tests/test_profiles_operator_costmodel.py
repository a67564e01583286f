"""Composing a step from operators, and the order in which cost models are chosen."""
import dataclasses

import numpy as np
import pytest

from emulator.config import EngineArgs, resolve
from profiles.cost_selection import NoProfileError, select_cost_model
from emulator.batch import BatchShape
from emulator.cost.profiled import ProfiledCostModel
from emulator.hardware import load_device
from emulator.models import load_model
from emulator.cost.operators import OperatorCostModel, attention_layers, layer_precisions


def build(model_name, hardware, level=None, **engine):
    model = load_model(model_name)
    device = load_device(hardware)
    config = resolve(EngineArgs(max_model_len=8192, **engine), model, device)
    return select_cost_model(model, device, config, level)


def build_with_backend(model_name, hardware, moe_backend, **engine):
    model = load_model(model_name)
    device = load_device(hardware)
    config = resolve(EngineArgs(max_model_len=8192, **engine), model, device)
    return select_cost_model(model, device, config, None, moe_backend)


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
    rows = cm.op_table(shape)
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


@pytest.mark.slow  # a wall-clock bound: on a busy machine it measures the machine
def test_pricing_a_step_is_cheap():
    import time
    cm = build("meta-llama/Llama-3.1-70B", "H200", tensor_parallel_size=4)
    shapes = [BatchShape.from_chunks([(1, 1000 + i)] * 64 + [(256, i)]) for i in range(2000)]
    start = time.perf_counter()
    for shape in shapes:
        cm.step_time(shape)
    assert (time.perf_counter() - start) / len(shapes) < 200e-6


def test_marlin_backend_prices_mxfp4_experts_with_the_marlin_kernel():
    default = build("openai/gpt-oss-120b", "H200")
    marlin = build_with_backend("openai/gpt-oss-120b", "H200", "marlin")
    assert marlin.expert_dtype == "w4a16_mxfp4_marlin" and "marlin" in marlin.methods["moe"][0]
    decode = BatchShape(4, 4, 0, 0.0, 4, 4000, 1000)
    prefill = BatchShape(8192, 1, 8192, 8192 * 4096.0, 0, 0, 0)
    # Marlin streams 4-bit weights well at a few tokens and computes slowly at thousands
    assert marlin.step_time(decode) < default.step_time(decode)
    assert marlin.step_time(prefill) > 1.5 * default.step_time(prefill)
    assert build_with_backend("Qwen/Qwen3-32B", "H200", "marlin").expert_dtype == "bf16"  # nothing to switch
    # vLLM's other backends are priced as auto's kernels (serve and replay warn: unsimulated_values)
    assert build_with_backend("openai/gpt-oss-120b", "H200", "cutlass").expert_dtype == default.expert_dtype


def test_a_moe_layer_measured_for_another_model_is_read_at_the_same_tokens_per_expert():
    from emulator.cost.table_pricer import TablePricer
    from profiles.operator_tables import find_operator_tables
    from profiles.roofline_fit import roofline_for

    device = load_device("H200")
    pricer = TablePricer(find_operator_tables("H200").grids, roofline_for(device), "H200")
    source = pricer._table("moe/w4a16_mxfp4_marlin/h3584_i3072_k16_e896/tp1_ep1")
    tokens = np.array([64.0, 1024.0, 8192.0])
    here = pricer.moe(tokens, 2880, 2880, 4, 128, 1, 1, "w4a16_mxfp4_marlin")
    assert here.method == "scaled"
    load = (4 / 128) / (16 / 896)  # tokens per expert here / there
    # the expert weights Marlin multiplies: gpt-oss' 2880 x 2880 padded to 3072 x 2944 as vLLM loads them
    weights = (128 * 3072 * 2944) / (896 * 3584 * 3072)
    assert here.us == pytest.approx(source(tokens * load)[0] * weights)
    assert np.all(np.diff(pricer.moe(2.0 ** np.arange(13), 2880, 2880, 4, 128, 8, 1, "w4a16_mxfp4_marlin").us) >= 0)


def test_minimax_qk_norm_all_reduces_its_variances_over_tensor_parallel_ranks():
    tp1 = build("MiniMaxAI/MiniMax-M2.5", "H200", tensor_parallel_size=1)
    tp4 = build("MiniMaxAI/MiniMax-M2.5", "H200", tensor_parallel_size=4)
    assert "qk_norm_all_reduce" not in tp1.methods and "qk_norm_all_reduce" in tp4.methods
    assert "qk_norm_all_reduce" not in build("Qwen/Qwen3-32B", "H200", tensor_parallel_size=4).methods


def test_mxfp4_experts_are_priced_as_vllm_pads_them_for_the_kernel():
    from emulator.cost.table_pricer import kernel_expert_shape

    # Marlin: hidden to a multiple of 256, each rank's intermediate slice to 128 (360 -> 384 at TP 8)
    assert kernel_expert_shape("w4a16_mxfp4_marlin", 2880, 2880, 1) == (3072, 2944)
    assert kernel_expert_shape("w4a16_mxfp4_marlin", 2880, 2880, 8) == (3072, 8 * 384)
    assert kernel_expert_shape("w4a16_mxfp4", 2880, 2880, 2) == (2880, 2 * 1472)  # other kernels: slice to 64
    assert kernel_expert_shape("w4a16_mxfp4_marlin", 3584, 3072, 8) == (3584, 3072)  # already aligned
    assert kernel_expert_shape("fp8_block", 3072, 1536, 4) == (3072, 1536)
