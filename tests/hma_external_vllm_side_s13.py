"""vLLM's side of test_hma_external_s13.py, run with the CPU venv's python (it imports vLLM 0.33): an external KV
load's allocation on a hybrid KV cache (a sliding-window group, then a full-attention one), by vLLM's own
KVCacheManager. Reads {"cases": [...]} on stdin; each case {"num_blocks", "window", "max_model_len",
"max_in_flight", "prompt" (token ids), "prefix" (0, or the length of an earlier request's prompt, the prompt's
start, allocated and freed first so its blocks are cached)}. Per case, as the scheduler calls it for a load
(v1/core/sched/scheduler.py: allocate_slots with num_new_tokens 0, the local hit, num_external_computed_tokens
the rest of the prompt, delay_cache_blocks, full_sequence_must_fit): {"hit" (local hit tokens), "ok", "nulls" and
"blocks" (per group: the null head, the other blocks), "free" (free blocks after), "moved" (per group: the
unhashed blocks NIXL's get_exchange_clipped_blocks keeps: a sliding group's last cdiv(window, 16) + 1)}."""
from __future__ import annotations

import json
import logging
import sys

BS = 16


def answer(case: dict) -> dict:
    import torch
    from vllm.utils.hashing import sha256
    from vllm.sampling_params import SamplingParams
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, SlidingWindowSpec
    from vllm.v1.request import Request
    common = dict(block_size=BS, num_kv_heads=2, head_size=64, dtype=torch.float16)
    groups = [KVCacheGroupSpec(["layers.0.attn"], SlidingWindowSpec(sliding_window=case["window"], **common)),
              KVCacheGroupSpec(["layers.1.attn"], FullAttentionSpec(**common))]
    # (the engine core passes CacheConfig's prefix_cache_retention_interval, 0 by default)
    config = KVCacheConfig(num_blocks=case["num_blocks"], kv_cache_tensors=[], kv_cache_groups=groups,
                           prefix_cache_retention_interval=0)
    kv = KVCacheManager(config, case["max_model_len"], scheduler_block_size=BS, hash_block_size=BS,
                        max_in_flight_tokens=case["max_in_flight"], enable_caching=True)
    init_none_hash(sha256)
    hasher = get_request_block_hasher(BS, sha256)

    def request(rid, tokens):
        return Request(rid, list(tokens), SamplingParams(max_tokens=8, ignore_eos=True), None, arrival_time=0.0,
                       block_hasher=hasher)
    prompt = case["prompt"]
    if case["prefix"]:
        first = request("first", prompt[:case["prefix"]])
        blocks, hit, _ = kv.get_computed_blocks(first)
        assert kv.allocate_slots(first, len(first.prompt_token_ids) - hit, hit, blocks) is not None
        first.num_computed_tokens = len(first.prompt_token_ids)
        kv.free(first)
    load = request("load", prompt)
    blocks, hit, _ = kv.get_computed_blocks(load)
    external = len(prompt) - hit
    done = kv.allocate_slots(load, 0, num_new_computed_tokens=hit, new_computed_blocks=blocks,
                             num_external_computed_tokens=external, delay_cache_blocks=True,
                             full_sequence_must_fit=True, has_scheduled_reqs=False)
    result = {"hit": hit, "ok": done is not None, "free": kv.block_pool.get_num_free_blocks()}
    if done is not None:
        tables = kv.get_blocks(load.request_id).blocks
        result["nulls"] = [sum(b.is_null for b in t) for t in tables]
        result["blocks"] = [sum(not b.is_null for b in t) for t in tables]
        unhashed = kv.get_blocks(load.request_id).get_unhashed_block_ids_all_groups()
        tail = -(-case["window"] // BS) + 1
        result["moved"] = [len(unhashed[0][-tail:]), len(unhashed[1])]
    return result


def main() -> None:
    logging.disable(logging.WARNING)
    job = json.load(sys.stdin)
    print(json.dumps({"answers": [answer(case) for case in job["cases"]]}))


if __name__ == "__main__":
    main()
