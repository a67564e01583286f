"""The KV cache of a model mixing sliding-window and full-attention layers (gpt-oss) sized as vLLM 0.33 sizes
it with its hybrid KV cache manager: the groups, the number of blocks, the logged "GPU KV cache size" and
"Maximum concurrency", --max-model-len auto and the refusal to start, against vLLM's own planner
(tests/hybrid_kv_vllm_side.py, run with the CPU venv's python; those tests are marked `vllm`)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from emulator.config import EngineArgs, resolve
from emulator.hardware import GiB, load_device
from emulator.memory import CapacityError, engine_kv_groups, kv_cache_groups, plan_memory
from emulator.models import load_model
from vllm_venv import run_vllm_side, vllm_python_or_skip

VLLM_SIDE = Path(__file__).resolve().parent / "hybrid_kv_vllm_side.py"
GPT_OSS = load_model("openai/gpt-oss-120b")
# a 5:1 sliding:full pattern over 30 layers (Gemma 3's), to check the grouping beyond gpt-oss's 1:1
FIVE_TO_ONE = replace(GPT_OSS, num_layers=30,
                      layer_types=tuple("full_attention" if i % 6 == 5 else "sliding_attention" for i in range(30)))


def _plan(model, **args):
    config = resolve(EngineArgs(**args), model, load_device("H100"))
    return config, plan_memory(model, load_device("H100"), config)


def test_gpt_oss_has_a_sliding_and_a_full_group_of_18_layers():
    config, plan = _plan(GPT_OSS, kv_cache_memory_bytes=40 * GiB)
    assert plan.groups.kinds == ("sliding", "full")  # layer 0 slides: its group comes first
    assert plan.groups.layers_per_block == 18 and plan.groups.sliding_window == 128
    # async scheduling keeps two batches in flight: a sliding group holds the window and them
    assert plan.groups.max_in_flight_tokens == 2 * config.max_num_batched_tokens
    per_layer = 2 * GPT_OSS.num_kv_heads * GPT_OSS.head_dim * 2 * config.block_size
    assert plan.block_bytes == 18 * per_layer
    assert plan.num_gpu_blocks == 40 * GiB // plan.block_bytes


def test_capacity_counts_a_requests_blocks_in_both_groups():
    config, plan = _plan(GPT_OSS, kv_cache_memory_bytes=40 * GiB, max_model_len=32768, max_num_batched_tokens=2048)
    full = 32768 // 16
    sliding = -(-(128 - 1 + 2 * 2048) // 16) + 1
    tokens, concurrency = plan.capacity(config.max_model_len, config.block_size)
    assert concurrency == plan.num_gpu_blocks / (full + sliding)
    assert tokens == int(concurrency * 32768) < plan.num_gpu_blocks * 16


def test_models_without_both_kinds_and_connector_configs_keep_one_group():
    llama = load_model("meta-llama/Llama-3.1-8B")
    config, plan = _plan(llama, kv_cache_memory_bytes=20 * GiB)
    assert plan.groups is None
    tokens, concurrency = plan.capacity(config.max_model_len, config.block_size)
    assert tokens == plan.num_gpu_blocks * 16 and concurrency == tokens / config.max_model_len
    # with offloading vLLM keeps the hybrid groups, which plan the memory; the engine runs one group of that size
    offload = resolve(EngineArgs(kv_offloading_size=8.0), GPT_OSS, load_device("H100"))
    assert kv_cache_groups(GPT_OSS, offload).kinds == ("sliding", "full")
    assert engine_kv_groups(kv_cache_groups(GPT_OSS, offload), offload) is None


def _cases():
    cases = []
    for model, args in [
        (GPT_OSS, dict(kv_cache_memory_bytes=40 * GiB)),
        (GPT_OSS, dict(kv_cache_memory_bytes=int(17.3 * GiB), max_model_len=32000, max_num_batched_tokens=2048)),
        (GPT_OSS, dict(kv_cache_memory_bytes=40 * GiB, async_scheduling=False, max_model_len=100_000)),
        (GPT_OSS, dict(kv_cache_memory_bytes=30 * GiB, pipeline_parallel_size=2)),
        (GPT_OSS, dict(kv_cache_memory_bytes=30 * GiB, pipeline_parallel_size=5, max_num_batched_tokens=4096)),
        (GPT_OSS, dict(kv_cache_memory_bytes=30 * GiB, num_gpu_blocks_override=3000, max_model_len=4000)),
        (GPT_OSS, dict(kv_cache_memory_bytes=2 * GiB, max_model_len=-1)),  # auto-fit shrinks the context
        (GPT_OSS, dict(kv_cache_memory_bytes=40 * GiB, max_model_len=-1)),  # the whole context fits
        (GPT_OSS, dict(kv_cache_memory_bytes=2 * GiB)),  # refused: one max_model_len request does not fit
        (GPT_OSS, dict(kv_cache_memory_bytes=40 * GiB, block_size=32, max_model_len=9000)),
        (FIVE_TO_ONE, dict(kv_cache_memory_bytes=12 * GiB, max_model_len=65536)),
        (FIVE_TO_ONE, dict(kv_cache_memory_bytes=1 * GiB, max_model_len=-1, max_num_batched_tokens=1024)),
    ]:
        config = resolve(EngineArgs(**args), model, load_device("H100"))
        vllm_case = {"layer_types": list(model.layer_types), "sliding_window": model.sliding_window,
                     "num_kv_heads": model.num_kv_heads, "head_size": model.head_dim,
                     "block_size": config.block_size, "max_model_len": config.max_model_len,
                     "max_num_batched_tokens": config.max_num_batched_tokens,
                     "async_scheduling": config.async_scheduling, "pp": config.pipeline_parallel_size,
                     "available_memory": args["kv_cache_memory_bytes"],
                     "num_gpu_blocks_override": config.num_gpu_blocks_override, "auto_fit": config.auto_max_model_len}
        cases.append((model, config, vllm_case))
    return cases


@pytest.mark.vllm
def test_sizing_equals_vllms_planner():
    python = vllm_python_or_skip()
    cases = _cases()
    answers = run_vllm_side(python, VLLM_SIDE, {"cases": [c for _, _, c in cases]})["answers"]
    refused = fitted = 0
    for (model, config, case), vllm in zip(cases, answers):
        kinds = tuple("sliding" if spec == "SlidingWindowSpec" else "full" for spec, _ in vllm["groups"])
        assert kv_cache_groups(model, config).kinds == kinds, case
        try:
            plan = plan_memory(model, load_device("H100"), config)
        except CapacityError as e:
            assert vllm["error"] is not None and str(e).startswith(vllm["error"]), (str(e), vllm["error"])
            refused += 1
            continue
        assert vllm["error"] is None, vllm["error"]
        assert plan.num_gpu_blocks == vllm["num_blocks"], case
        max_model_len = config.max_model_len
        if config.auto_max_model_len:
            max_model_len = plan.fit_max_model_len(config.max_model_len, config.block_size)
            fitted += max_model_len < config.max_model_len
        assert max_model_len == vllm["max_model_len"], case
        assert plan.capacity(max_model_len, config.block_size) == (vllm["tokens"], vllm["concurrency"]), case
    assert refused == 1 and fitted == 2
