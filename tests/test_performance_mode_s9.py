"""--performance-mode as vLLM 0.33 reads it: interactivity captures CUDA graphs of every batch size from 1 to 32
(config/vllm.py _set_cudagraph_sizes), so a small step pads less and costs less; throughput doubles the default
batch limits (EngineArgs._set_default_max_num_seqs_and_batched_tokens_args) and with them the capture sizes."""
from __future__ import annotations

from emulator.batch import BatchShape
from emulator.config import EngineArgs
from emulator.cost.base import cudagraph_capture_sizes
from emulator.hardware import load_device
from profiles.deployment import build_deployment

ARGS = dict(max_num_seqs=256, max_num_batched_tokens=2048, max_model_len=32768, gpu_memory_utilization=0.9)


def balanced_sizes(largest: int) -> list[int]:
    return [s for s in [1, 2, 4, *range(8, 256, 8), *range(256, largest + 1, 16)] if s <= largest]


def test_interactivity_captures_every_size_to_32_then_vllms_steps():
    device = load_device("RTX4090")
    sizes = cudagraph_capture_sizes(256, 2048, device, "interactivity")
    assert sizes == [*range(1, 33), *range(40, 256, 8), *range(256, 513, 16)]
    assert cudagraph_capture_sizes(256, 2048, device) == balanced_sizes(512)
    assert cudagraph_capture_sizes(256, 2048, device, "throughput") == balanced_sizes(512)


def test_interactivity_stops_at_the_largest_capture_size():
    device = load_device("H100")
    assert cudagraph_capture_sizes(4, 2048, device, "interactivity") == [1, 2, 3, 4, 5, 6, 7, 8]  # 2 x 4 seqs
    assert cudagraph_capture_sizes(4, 2048, device) == [1, 2, 4, 8]
    assert cudagraph_capture_sizes(256, 20, device, "interactivity") == list(range(1, 21))  # the token budget
    assert cudagraph_capture_sizes(256, 20, device) == [1, 2, 4, 8, 16, 20]


def test_a_small_decode_pads_less_and_steps_faster_under_interactivity():
    balanced = build_deployment("meta-llama/Llama-3.1-8B", "RTX4090", EngineArgs(**ARGS)).cost_model
    interactive = build_deployment("meta-llama/Llama-3.1-8B", "RTX4090",
                                   EngineArgs(**ARGS, performance_mode="interactivity")).cost_model
    assert (balanced.padded_tokens(17), interactive.padded_tokens(17)) == (24, 17)
    assert (balanced.padded_tokens(3), interactive.padded_tokens(3)) == (4, 3)
    assert balanced.padded_tokens(100) == interactive.padded_tokens(100) == 104
    decode17 = BatchShape.from_chunks([(1, 1000)] * 17)
    assert interactive.step_time(decode17) < balanced.step_time(decode17)
    decode24 = BatchShape.from_chunks([(1, 1000)] * 24)
    assert interactive.step_time(decode24) == balanced.step_time(decode24)


def test_throughput_doubles_the_batch_limits_and_the_capture_ceiling_follows():
    d = build_deployment("meta-llama/Llama-3.1-8B", "H100", EngineArgs(performance_mode="throughput"))
    assert (d.config.max_num_seqs, d.config.max_num_batched_tokens) == (2048, 16384)
    assert d.cost_model.max_capture == 512  # min(2 x 2048 seqs, 512)
    assert d.config.performance_mode == "throughput"
    eager = build_deployment("meta-llama/Llama-3.1-8B", "H100",
                             EngineArgs(performance_mode="interactivity", enforce_eager=True)).cost_model
    assert eager.capture_sizes == [] and eager.padded_tokens(17) == 17
