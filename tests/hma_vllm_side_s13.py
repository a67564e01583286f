"""vLLM's side of test_hma_flags_s13.py, run with the CPU venv's python: tests/hybrid_kv_vllm_side.py's planner
with the case's `disable_hma` as SchedulerConfig.disable_hybrid_kv_cache_manager (vLLM's
--disable-hybrid-kv-cache-manager: get_kv_cache_groups unifies the sliding-window specs into full-attention ones)."""
from __future__ import annotations

import hybrid_kv_vllm_side as side

_planner_config = side.vllm_config


def vllm_config(case: dict, model_dir: str):
    config = _planner_config(case, model_dir)
    config.scheduler_config.disable_hybrid_kv_cache_manager = case["disable_hma"]
    return config


side.vllm_config = vllm_config

if __name__ == "__main__":
    side.main()
