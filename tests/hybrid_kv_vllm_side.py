"""vLLM's side of test_hybrid_kv_capacity.py, run with the CPU venv's python (it imports vLLM 0.33).

Reads a JSON job on stdin, {"cases": [...]}, and prints one JSON answer, {"answers": [...]}. Each case
describes a model's attention layers and an engine: {"layer_types" (per layer, "sliding_attention" or
"full_attention"), "sliding_window", "num_kv_heads", "head_size", "block_size", "max_model_len",
"max_num_batched_tokens", "async_scheduling", "pp", "available_memory", "num_gpu_blocks_override"
(or null), "auto_fit"}. vLLM's own planner sizes its KV cache as the engine core does at start-up
(v1/core/kv_cache_planning.py get_global_kv_cache_groups and get_kv_cache_configs, one worker per
pipeline stage with the layers vLLM's get_pp_indices gives it, all with `available_memory`; then
kv_cache_utils.get_kv_cache_capacity), with the hybrid KV cache manager on. The answer per case:
{"groups": [[spec kind, number of layers], ...], "num_blocks", "tokens", "concurrency", "max_model_len"
(after auto-fit), "error" (the ValueError's text when vLLM refuses to start, else null)}.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 32_000,
    "max_position_embeddings": 1 << 20, "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5,
}


def vllm_config(case: dict, model_dir: str):
    from vllm.config import CacheConfig, DeviceConfig, ModelConfig, ParallelConfig, SchedulerConfig, VllmConfig
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"  # vLLM 0.33's GPU default
    model = ModelConfig(model=model_dir, skip_tokenizer_init=True, dtype="bfloat16",
                        max_model_len=case["max_model_len"])
    scheduler = SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=case["max_num_batched_tokens"],
                                max_model_len=case["max_model_len"], is_encoder_decoder=False,
                                async_scheduling=case["async_scheduling"])
    cache = CacheConfig(block_size=case["block_size"], num_gpu_blocks_override=case["num_gpu_blocks_override"])
    config = VllmConfig(device_config=DeviceConfig(device="cpu"), model_config=model, scheduler_config=scheduler,
                        cache_config=cache, parallel_config=ParallelConfig(pipeline_parallel_size=case["pp"]))
    config.cache_config.kv_cache_layout = "LBNHC"  # what the engine core resolves for FlashAttention
    config.scheduler_config.disable_hybrid_kv_cache_manager = False  # as on a GPU with no KV connector
    if case["auto_fit"]:
        config.model_config.original_max_model_len = -1
    return config


def worker_specs(case: dict) -> list[dict]:
    """Each pipeline stage's layers and their KV cache specs (vLLM's get_pp_indices split)."""
    import torch
    from vllm.distributed.utils import get_pp_indices
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec
    types = case["layer_types"]
    common = dict(block_size=case["block_size"], num_kv_heads=case["num_kv_heads"], head_size=case["head_size"],
                  dtype=torch.bfloat16)
    workers = []
    for rank in range(case["pp"]):
        start, end = get_pp_indices(len(types), rank, case["pp"])
        workers.append({
            f"model.layers.{i}.self_attn.attn": (
                SlidingWindowSpec(sliding_window=case["sliding_window"], **common)
                if types[i] == "sliding_attention" else FullAttentionSpec(**common))
            for i in range(start, end)})
    return workers


def answer(case: dict, model_dir: str) -> dict:
    from vllm.v1.core.kv_cache_planning import get_global_kv_cache_groups, get_kv_cache_configs
    from vllm.v1.core.kv_cache_utils import generate_scheduler_kv_cache_config, get_kv_cache_capacity
    config = vllm_config(case, model_dir)
    specs = worker_specs(case)
    groups = get_global_kv_cache_groups(config, specs)
    result = {"groups": [[type(g.kv_cache_spec).__name__, len(g.layer_names)] for g in groups],
              "num_blocks": None, "tokens": None, "concurrency": None, "max_model_len": None, "error": None}
    try:
        configs = get_kv_cache_configs(config, specs, [case["available_memory"]] * len(specs), groups)
    except ValueError as e:
        result["error"] = str(e)
        return result
    scheduler_config = generate_scheduler_kv_cache_config(configs)
    tokens, concurrency = get_kv_cache_capacity(config, scheduler_config)
    result.update(num_blocks=scheduler_config.num_blocks, tokens=tokens, concurrency=concurrency,
                  max_model_len=config.model_config.max_model_len)
    return result


def main() -> None:
    logging.disable(logging.WARNING)
    job = json.load(sys.stdin)
    model_dir = tempfile.mkdtemp(prefix="hybrid-kv-model-")
    Path(model_dir, "config.json").write_text(json.dumps(TINY_LLAMA))
    print(json.dumps({"answers": [answer(case, model_dir) for case in job["cases"]]}))


if __name__ == "__main__":
    main()
