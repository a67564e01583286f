"""vLLM's side of test_kv_event_spec_fields.py, run with the CPU venv's python (it imports vLLM 0.33).

Reads one JSON job on stdin and prints one JSON answer. For each case {"spec": "full" | "mla" | "sliding",
"block_size", "prompt", "ours"}: vLLM's own KVCacheManager over one KV cache group of that spec (FullAttentionSpec,
MLAAttentionSpec, or a 128-token SlidingWindowSpec), with KV cache events on and no lookahead hashing (no
speculative config: VllmConfig.num_hash_lookahead_tokens is 0), caches the prompt's full blocks; its first
BlockStored as take_events annotates it (kv_cache_spec_kind, kv_cache_spec_sliding_window), as plain data and as
the bytes vLLM's msgspec encoder writes; and ours (hex, our wire's encoding of our event for the same prompt)
decoded with vLLM's BlockStored, with whether its bytes are vLLM's.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def spec_of(name: str, block_size: int):
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec, SlidingWindowSpec
    if name == "full":
        return FullAttentionSpec(block_size=block_size, num_kv_heads=8, head_size=128, dtype=torch.bfloat16)
    if name == "mla":
        return MLAAttentionSpec(block_size=block_size, num_kv_heads=1, head_size=576, dtype=torch.bfloat16)
    return SlidingWindowSpec(block_size=block_size, num_kv_heads=8, head_size=64, dtype=torch.bfloat16,
                             sliding_window=128)


def first_stored(case: dict):
    from vllm.distributed.kv_events import BlockStored
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.request import Request
    bs = case["block_size"]
    config = KVCacheConfig(num_blocks=64, kv_cache_tensors=[],
                           kv_cache_groups=[KVCacheGroupSpec(["layers.0.attn"], spec_of(case["spec"], bs))])
    manager = KVCacheManager(config, max_model_len=4096, scheduler_block_size=bs, hash_block_size=bs,
                             enable_caching=True, enable_kv_cache_events=True)
    init_none_hash(sha256)
    request = Request("r", list(case["prompt"]), SamplingParams(max_tokens=1), None,
                      block_hasher=get_request_block_hasher(bs, sha256))
    blocks, hit, _ = manager.get_computed_blocks(request)
    assert manager.allocate_slots(request, request.num_tokens - hit, hit, blocks) is not None
    return next(e for e in manager.take_events() if isinstance(e, BlockStored))


def main(job: dict) -> dict:
    import msgspec
    from vllm.distributed.kv_events import BlockStored
    encoder, decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(type=BlockStored)
    answers = []
    for case in job["cases"]:
        theirs = first_stored(case)
        ours = bytes.fromhex(case["ours"])
        decoded = decoder.decode(ours)
        answers.append({"vllm": msgspec.structs.asdict(theirs), "ours": msgspec.structs.asdict(decoded),
                        "same_bytes": encoder.encode(theirs) == ours})
    return {"answers": answers}


if __name__ == "__main__":
    import logging
    logging.disable(logging.WARNING)
    print(json.dumps(main(json.load(sys.stdin))))
