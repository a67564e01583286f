"""vLLM's side of test_self_describing_kv_events.py, run with the CPU venv's python (it imports vLLM 0.33).

Reads one JSON job on stdin, {"runs": [{"prompts", "k", "events"}]}: each event names chunks (prompt index, chunk
index) of `k` 16-token blocks and whether they were stored or removed, with our encoding. vLLM's
OffloadingEventsTracker (self-describing events on) records a store of every chunk named (as its
scheduler's _build_store_jobs does) and translates a CPU OffloadingEvent of those chunk keys; the event it
yields, in a KVEventBatch(0.0, [event], 0), is encoded by msgspec and compared with ours. Prints
{"runs": [{"compared", "mismatches"}]} (each mismatch: the chunks and both events decoded).
"""
from __future__ import annotations

import json
import logging
import sys


def run(job: dict) -> dict:
    import msgspec
    from vllm.distributed.kv_events import KVEventBatch
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading.events import (OffloadingEventGroupSpec,
                                                                                 OffloadingEventsTracker)
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading.scheduler import GroupOffloadConfig
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.kv_offload.base import Medium, OffloadingEvent, OffloadingKVEventsConfig, make_offload_key
    from vllm.v1.request import Request

    hash_fn = get_hash_fn_by_name("sha256")
    init_none_hash(hash_fn)
    k = job["k"]
    requests = [Request(f"r{i}", prompt, SamplingParams(max_tokens=1), None,
                        block_hasher=get_request_block_hasher(16, hash_fn)) for i, prompt in enumerate(job["prompts"])]
    group = GroupOffloadConfig(group_idx=0, tokens_per_block=16, tokens_per_chunk=16 * k, hashes_per_chunk=k,
                               kv_event_group_spec=OffloadingEventGroupSpec("full_attention", None),
                               sliding_window_size_in_chunks=None, kv_cache_spec=None, manager_cls=None)
    tracker = OffloadingEventsTracker(OffloadingKVEventsConfig(enable_kv_cache_events=True,
                                                               self_describing_kv_events=True))
    encoder, decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(type=KVEventBatch)
    mismatches = []
    for event in job["events"]:
        keys = []
        for p, c in event["chunks"]:
            request = requests[p]
            key = make_offload_key(request.block_hashes[c * k + k - 1], 0)
            if not event["removed"]:
                tracker.record_store(request, group, c, key)
            keys.append(key)
        theirs = list(tracker.take_events([OffloadingEvent(keys=keys, medium=Medium.CPU, removed=event["removed"])]))
        payload = encoder.encode(KVEventBatch(0.0, theirs, 0))
        if payload.hex() != event["ours"]:
            mismatches.append({"job": event["chunks"], "vllm": msgspec.to_builtins(decoder.decode(payload)),
                               "ours": msgspec.to_builtins(decoder.decode(bytes.fromhex(event["ours"])))})
    return {"compared": len(job["events"]), "mismatches": mismatches[:5]}


if __name__ == "__main__":
    logging.disable(logging.WARNING)
    print(json.dumps({"runs": [run(job) for job in json.load(sys.stdin)["runs"]]}, default=str))
