"""Step pricing: table interpolation, CUDA-graph padding, batch folding, the profiled cost model."""
from __future__ import annotations

import numpy as np
import pytest

from emulator.config import EngineArgs
from emulator.batch import BatchShape
from emulator.cost.base import cudagraph_capture_sizes
from emulator.cost.profiled import ProfiledCostModel
from emulator.cost.work import expected_active_experts
from profiles.deployment import build_deployment
from emulator.hardware import load_device
from emulator.cost.interpolate import Table1D, bracket

CALIBRATION_ARGS = EngineArgs(max_num_seqs=256, max_num_batched_tokens=2048, max_model_len=32768,
                              gpu_memory_utilization=0.9)


@pytest.fixture(scope="module")
def rtx4090_llama():
    """The measured-table model of the calibration run (tables shipped in profiles/)."""
    cost = build_deployment("meta-llama/Llama-3.1-8B", "RTX4090", CALIBRATION_ARGS).cost_model
    assert isinstance(cost, ProfiledCostModel)
    return cost


def prefill(n: int, history: int = 0) -> BatchShape:
    return BatchShape.from_chunks([(n, history)])


def decodes(k: int, context: int) -> BatchShape:
    return BatchShape.from_chunks([(1, context)] * k)


# -- interpolation ---------------------------------------------------------------------------
def test_table_interpolates_linearly_between_points():
    t = Table1D([1, 3, 5], [10.0, 30.0, 40.0])
    assert t(2) == 20.0 and t(4) == 35.0 and t(3) == 30.0


def test_table_clamps_below_the_first_point():
    t = Table1D([8, 16], [5.0, 9.0])
    assert t(1) == 5.0 and t.extrapolations == 0


def test_table_extrapolates_above_the_last_point_and_counts_it():
    t = Table1D([1, 2], [10.0, 20.0])
    assert t(4) == 40.0
    t(4)
    assert t.extrapolations == 2


def test_table_sorts_its_points():
    assert Table1D([5, 1, 3], [50.0, 10.0, 30.0])(2) == 20.0


def test_bracket_weights_the_upper_neighbour():
    assert bracket([0.0, 10.0, 20.0], 15.0) == (1, 2, 0.5)
    assert bracket([0.0, 10.0], -3.0) == (0, 0, 0.0)
    assert bracket([0.0, 10.0], 30.0) == (0, 1, 3.0)  # beyond the axis: extrapolation weight


# -- CUDA graphs -------------------------------------------------------------------------------
def vllm_default_sizes(largest: int) -> list[int]:
    """vLLM 0.33 `VllmConfig._set_cudagraph_sizes`: 1, 2, 4, multiples of 8 below 256, multiples of 16 from 256."""
    return [s for s in [1, 2, 4, *range(8, 256, 8), *range(256, largest + 1, 16)] if s <= largest]


def test_capture_sizes_match_vllm_for_the_calibration_engine():
    assert cudagraph_capture_sizes(256, 2048, load_device("RTX4090")) == vllm_default_sizes(512)


def test_capture_sizes_stop_at_twice_max_num_seqs():
    assert cudagraph_capture_sizes(64, 2048, load_device("H100")) == vllm_default_sizes(128)


def test_capture_sizes_include_an_off_stride_max_num_batched_tokens():
    assert cudagraph_capture_sizes(256, 300, load_device("H100")) == vllm_default_sizes(300) + [300]


def test_blackwell_captures_up_to_1024():
    assert cudagraph_capture_sizes(1024, 16384, load_device("B200"))[-1] == 1024


def test_every_blackwell_datacenter_gpu_captures_up_to_1024():
    """vLLM checks the capability family 10.x (is_device_capability_family(100)): B300 (sm103) too."""
    assert cudagraph_capture_sizes(1024, 16384, load_device("B300"))[-1] == 1024


def test_capture_sizes_include_an_off_stride_max_num_seqs():
    """vLLM 0.33 adds a full decode batch (uniform_decode_sizes = [max_num_seqs]) when it is within the ceiling."""
    assert 100 in cudagraph_capture_sizes(100, 2048, load_device("H100"))


def test_steps_pad_to_the_next_capture_size(rtx4090_llama):
    assert [rtx4090_llama.padded_tokens(n) for n in (1, 3, 5, 129, 256, 257, 512)] == [1, 4, 8, 136, 256, 272, 512]


def test_steps_above_the_largest_capture_size_run_eager(rtx4090_llama):
    assert rtx4090_llama.padded_tokens(513) == 513


def test_enforce_eager_pads_nothing():
    cost = build_deployment("meta-llama/Llama-3.1-8B", "RTX4090", CALIBRATION_ARGS.with_(enforce_eager=True)).cost_model
    assert cost.padded_tokens(129) == 129


# -- batch folding -----------------------------------------------------------------------------
def test_batch_shape_folds_prefills_into_one_chunk_of_equal_attention_work():
    shape = BatchShape.from_chunks([(100, 0), (50, 200), (1, 500), (1, 300)])
    assert (shape.num_tokens, shape.num_reqs, shape.prefill_tokens, shape.num_decode) == (152, 4, 150, 2)
    work = 100 * (0 + 50) + 50 * (200 + 25)  # sum of c * (h + c/2)
    assert shape.prefill_work == work
    assert 150 * (shape.prefill_history + 75) == pytest.approx(work)
    assert (shape.decode_context, shape.decode_context_max, shape.mean_decode_context) == (800, 500, 400)


def test_batch_shape_of_decodes_only_has_no_prefill():
    shape = decodes(3, 100)
    assert (shape.prefill_tokens, shape.prefill_history, shape.num_decode) == (0, 0.0, 3)


# -- the profiled model ------------------------------------------------------------------------
def test_empty_step_costs_nothing(rtx4090_llama):
    assert rtx4090_llama.step_time(BatchShape()) == 0.0


def test_step_time_grows_with_decode_batch(rtx4090_llama):
    times = [rtx4090_llama.step_time(decodes(k, 1000)) for k in range(1, 257)]
    assert all(b >= a for a, b in zip(times, times[1:]))
    assert times[-1] > 2 * times[0]


def test_step_time_grows_with_context(rtx4090_llama):
    times = [rtx4090_llama.step_time(decodes(32, c)) for c in range(0, 32768, 256)]
    assert all(b >= a for a, b in zip(times, times[1:]))
    times = [rtx4090_llama.step_time(prefill(512, h)) for h in range(0, 30000, 512)]
    assert all(b >= a for a, b in zip(times, times[1:]))


def test_step_time_grows_with_prefill_tokens_within_measurement_noise(rtx4090_llama):
    """The measured dense tables dip by up to ~0.25 % between neighbouring sizes; over 64 tokens time always grows."""
    times = np.array([rtx4090_llama.step_time(prefill(n)) for n in range(2, 2049)])
    assert (np.diff(times) / times[:-1]).min() > -0.005
    coarse = times[::64]
    assert (np.diff(coarse) > 0).all()


def test_step_time_never_drops_when_tokens_grow(rtx4090_llama):
    times = np.array([rtx4090_llama.step_time(prefill(n)) for n in range(2, 2049)])
    assert (np.diff(times) >= 0).all()


def test_calibration_shapes_are_inside_the_measured_grid(rtx4090_llama):
    before = dict(rtx4090_llama.extrapolation_counts())
    rtx4090_llama.step_time(prefill(2048))
    rtx4090_llama.step_time(decodes(256, 2000))
    assert rtx4090_llama.extrapolation_counts()["dense"] == before["dense"]
    assert rtx4090_llama.extrapolation_counts()["per_sequence"] == before["per_sequence"]


def test_lookups_beyond_the_measured_grid_are_counted(rtx4090_llama):
    before = rtx4090_llama.extrapolation_counts()
    rtx4090_llama.step_time(BatchShape.from_chunks([(1, 10_000_000)] * 4))
    after = rtx4090_llama.extrapolation_counts()
    assert after["attention"] == before["attention"] + 1


def test_describe_names_the_profile_and_its_source(rtx4090_llama):
    text = rtx4090_llama.describe()
    assert "RTX4090" in text and "Llama-3.1-8B" in text and "LLMServingSim" in text


# -- MoE ---------------------------------------------------------------------------------------
def test_one_token_activates_top_k_experts():
    assert expected_active_experts(1, 128, 8) == pytest.approx(8)


def test_many_tokens_activate_every_expert():
    assert expected_active_experts(4096, 128, 8) == pytest.approx(128, rel=1e-6)
    assert expected_active_experts(0, 128, 8) == 0.0
