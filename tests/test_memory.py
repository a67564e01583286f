"""KV capacity as vLLM computes it at start-up: memory x utilisation - weights - activations - non-torch."""
from __future__ import annotations

import json

import pytest

from emulator.config import EngineArgs, resolve
from profiles.deployment import build_deployment
from emulator.hardware import GiB, load_device
from emulator.memory import CapacityError, block_bytes, plan_memory, weight_bytes_per_rank
from emulator.models import load_model

MiB = 1 << 20
VLLM_019_RTX4090_BLOCKS = 2588  # calibration run: vllm/meta.json kv_cache.num_gpu_blocks


def plan(model: str = "meta-llama/Llama-3.1-8B", hardware: str = "RTX4090", **args):
    m, d = load_model(model), load_device(hardware)
    return plan_memory(m, d, resolve(EngineArgs(**args), m, d))


CALIBRATION_ARGS = dict(max_num_seqs=256, max_num_batched_tokens=2048, max_model_len=32768,
                        gpu_memory_utilization=0.9)


def test_rtx4090_llama_8b_lands_within_2_percent_of_vllm_019():
    blocks = plan(**CALIBRATION_ARGS).num_gpu_blocks
    assert abs(blocks - VLLM_019_RTX4090_BLOCKS) / VLLM_019_RTX4090_BLOCKS <= 0.02


def test_calibration_run_capacity_from_its_own_metadata(shared_data):
    meta = json.loads((shared_data / "calibration/vllm-runs/RTX4090/Llama-3.1-8B/vllm/meta.json").read_text())
    engine, kv = meta["engine_kwargs"], meta["kv_cache"]
    blocks = plan(engine["model"], "RTX4090", max_num_seqs=engine["max_num_seqs"],
                  max_num_batched_tokens=engine["max_num_batched_tokens"], max_model_len=engine["max_model_len"],
                  gpu_memory_utilization=kv["gpu_memory_utilization"], block_size=kv["block_size"]).num_gpu_blocks
    assert load_device("RTX4090").memory_bytes == meta["hardware"]["device_total_memory_bytes"]
    assert abs(blocks - kv["num_gpu_blocks"]) / kv["num_gpu_blocks"] <= 0.02


def test_blocks_are_what_the_leftover_memory_holds():
    p = plan(**CALIBRATION_ARGS)
    assert p.requested_bytes == -(-load_device("RTX4090").memory_bytes * 9 // 10)
    assert p.available_bytes == (p.requested_bytes - p.weight_bytes - p.activation_bytes - p.non_torch_bytes
                                 - p.compile_bytes)
    assert p.num_gpu_blocks == p.available_bytes // p.block_bytes


def test_llama_8b_block_is_2_mib():
    """32 layers x (K and V) x 8 KV heads x 128 dims x 2 bytes x 16 tokens."""
    assert plan(**CALIBRATION_ARGS).block_bytes == 2 * MiB


def test_llama_8b_weights_are_about_15_gib():
    weights = plan(**CALIBRATION_ARGS).weight_bytes
    assert 14.9 * GiB < weights < 15.1 * GiB  # vLLM 0.19 logged 14.99 GiB for this model


def test_higher_utilisation_gives_more_blocks():
    low = plan(**{**CALIBRATION_ARGS, "gpu_memory_utilization": 0.8, "max_model_len": 8192}).num_gpu_blocks
    high = plan(**{**CALIBRATION_ARGS, "max_model_len": 8192}).num_gpu_blocks
    assert high > low


def test_num_gpu_blocks_override_sets_the_block_count():
    assert plan(**{**CALIBRATION_ARGS, "max_model_len": 8192}, num_gpu_blocks_override=1000).num_gpu_blocks == 1000


def test_kv_cache_memory_bytes_sizes_the_cache():
    assert plan(**{**CALIBRATION_ARGS, "max_model_len": 8192}, kv_cache_memory_bytes=4 * GiB).num_gpu_blocks == 2048


def test_fp8_kv_cache_halves_the_block():
    m, d = load_model("meta-llama/Llama-3.1-8B"), load_device("H100")
    assert block_bytes(m, resolve(EngineArgs(kv_cache_dtype="fp8"), m, d)) == 1 * MiB


def test_tensor_parallel_divides_the_weights():
    m, d = load_model("meta-llama/Llama-3.1-70B"), load_device("H100")
    one = weight_bytes_per_rank(m, resolve(EngineArgs(max_model_len=8192), m, d))
    four = weight_bytes_per_rank(m, resolve(EngineArgs(max_model_len=8192, tensor_parallel_size=4), m, d))
    rope = m.max_position_embeddings * m.head_dim * 2  # the cos/sin cache is not sharded
    assert four - rope == pytest.approx((one - rope) / 4, rel=1e-9)


def test_tensor_parallel_divides_kv_heads_until_each_rank_has_one():
    m, d = load_model("meta-llama/Llama-3.1-70B"), load_device("H100")
    sizes = {tp: block_bytes(m, resolve(EngineArgs(max_model_len=8192, tensor_parallel_size=tp), m, d))
             for tp in (1, 2, 8, 16)}
    assert sizes[2] == sizes[1] // 2
    assert sizes[8] == sizes[1] // 8
    assert sizes[16] == sizes[8]  # 8 KV heads over 16 ranks: replicated, one head each


def test_model_that_fits_only_with_tensor_parallelism():
    with pytest.raises(CapacityError, match="No available memory for the cache blocks"):
        plan("meta-llama/Llama-3.1-70B", "H100", max_model_len=8192)
    assert plan("meta-llama/Llama-3.1-70B", "H100", max_model_len=8192, tensor_parallel_size=4).num_gpu_blocks > 0


def test_weights_that_do_not_fit_name_the_model_and_device():
    with pytest.raises(CapacityError) as err:
        plan("meta-llama/Llama-3.1-70B", "RTX4090", max_model_len=8192)
    message = str(err.value)
    assert message.startswith("No available memory for the cache blocks")
    assert "Llama-3.1-70B" in message and "RTX4090" in message and "gpu_memory_utilization" in message


def test_max_model_len_larger_than_the_cache_is_refused_with_vllms_estimate():
    """vLLM: 'To serve at least one request with the model's max seq len (...)', with the largest length that fits
    in all blocks but the null block."""
    fits = plan(**{**CALIBRATION_ARGS, "max_model_len": 8192})
    with pytest.raises(CapacityError) as err:
        plan(**{**CALIBRATION_ARGS, "max_model_len": 131072})
    message = str(err.value)
    assert "max seq len (131072)" in message
    assert f"the estimated maximum model length is {(fits.num_gpu_blocks - 1) * 16}." in message
    assert "Try increasing `gpu_memory_utilization`" in message and "decreasing `max_model_len`" in message


def test_max_model_len_that_fills_every_block_but_the_null_block_fits():
    blocks = plan(**CALIBRATION_ARGS).num_gpu_blocks
    assert plan(**{**CALIBRATION_ARGS, "max_model_len": (blocks - 1) * 16}).num_gpu_blocks == blocks
    with pytest.raises(CapacityError):
        plan(**{**CALIBRATION_ARGS, "max_model_len": (blocks - 1) * 16 + 1})


def test_override_too_small_for_max_model_len_is_refused():
    with pytest.raises(CapacityError, match="max seq len"):
        plan(**CALIBRATION_ARGS, num_gpu_blocks_override=100)


def test_max_model_len_error_uses_vllm_033_wording():
    """0.19 wrote "models's"; 0.33 (kv_cache_planning.py) writes "model's"."""
    with pytest.raises(CapacityError, match="To serve at least one request with the model's max seq len"):
        plan(**{**CALIBRATION_ARGS, "max_model_len": 131072})


def test_startup_lines_report_capacity_like_vllm():
    text = "\n".join(build_deployment("meta-llama/Llama-3.1-8B", "RTX4090",
                                      EngineArgs(**CALIBRATION_ARGS)).startup_lines())
    blocks = plan(**CALIBRATION_ARGS).num_gpu_blocks
    assert f"GPU KV cache size: {blocks * 16:,} tokens" in text
    assert f"Maximum concurrency for 32,768 tokens per request: {blocks * 16 / 32768:.2f}x" in text
