"""vLLM's side of test_external_load_reservation_s9.py, run with the CPU venv's python (it imports vLLM 0.33).

Reads one JSON job on stdin, {"num_blocks", "budget", "threshold", "policy", "requests": [{"id", "prompt",
"max_tokens", "priority", "arrive", "external", "load_steps"}]}, and drives vLLM's own Scheduler (one
full-attention group, a tiny Llama config, no weights) with a KV connector whose every load is asynchronous:
a request is offered its first `external` prompt tokens (less its local prefix hit) once, and a load started
by schedule() call k is reported received with the output of call k + load_steps - 1. A request arrives
before call `arrive`. Prints one JSON line, per call: the tokens scheduled, the loads started, the requests
preempted, the tokens each admitted request starts from, the free blocks and the blocks each request holds.
"""
from __future__ import annotations

import json
import sys
import tempfile
import types
from pathlib import Path

import torch
from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorMetadata
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output import StructuredOutputManager

OFFERS: dict[str, int] = {}  # request id -> prompt tokens the connector can load, until its load starts


class AsyncLoadConnector(KVConnectorBase_V1):
    """Scheduler side only: every hit beyond the local one is loaded asynchronously."""

    def start_load_kv(self, forward_context, **kwargs) -> None: ...
    def wait_for_layer_load(self, layer_name) -> None: ...
    def save_kv_layer(self, *args, **kwargs) -> None: ...
    def wait_for_save(self) -> None: ...

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        extra = OFFERS.get(request.request_id, 0) - num_computed_tokens
        return (extra, True) if extra > 0 else (0, False)

    def update_state_after_alloc(self, request, blocks, num_external_tokens) -> None:
        if num_external_tokens:
            OFFERS.pop(request.request_id, None)

    def build_connector_meta(self, scheduler_output):
        return KVConnectorMetadata()


sys.modules["external_load_connector_s9"] = types.SimpleNamespace(AsyncLoadConnector=AsyncLoadConnector)

_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
          "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 32_000,
          "max_position_embeddings": 8192, "torch_dtype": "float16", "rms_norm_eps": 1e-5}


def scheduler(job: dict) -> Scheduler:
    model_dir = tempfile.mkdtemp(prefix="external-load-model-")
    Path(model_dir, "config.json").write_text(json.dumps(_LLAMA))
    model = ModelConfig(model=model_dir, skip_tokenizer_init=True, dtype="float16", max_model_len=1024)
    sched = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=job["budget"], max_model_len=1024,
                            is_encoder_decoder=False, enable_chunked_prefill=True, policy=job["policy"],
                            long_prefill_token_threshold=job["threshold"], watermark=0.0)
    cache = CacheConfig(block_size=16, enable_prefix_caching=True)
    cache.num_gpu_blocks = job["num_blocks"]
    transfer = KVTransferConfig(kv_connector="AsyncLoadConnector",
                                kv_connector_module_path="external_load_connector_s9", kv_role="kv_both")
    config = VllmConfig(device_config=DeviceConfig(device="cpu"), model_config=model, scheduler_config=sched,
                        cache_config=cache, kv_transfer_config=transfer)
    full = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.float16)
    kv_config = KVCacheConfig(num_blocks=job["num_blocks"], kv_cache_tensors=[],
                              kv_cache_groups=[KVCacheGroupSpec(["layers.0.attn"], full)])
    return Scheduler(vllm_config=config, kv_cache_config=kv_config,
                     structured_output_manager=StructuredOutputManager(config), block_size=16, log_stats=False)


def main() -> None:
    job = json.loads(sys.stdin.read())
    s = scheduler(job)
    init_none_hash(sha256)
    hasher = get_request_block_hasher(16, sha256)
    specs = {r["id"]: r for r in job["requests"]}
    requests: dict[str, Request] = {}
    received: dict[int, set[str]] = {}  # call -> loads reported received with its output
    loading: set[str] = set()
    steps = []
    for k in range(job.get("max_steps", 400)):
        for r in job["requests"]:
            if r["arrive"] == k:
                requests[r["id"]] = req = Request(r["id"], r["prompt"], SamplingParams(max_tokens=r["max_tokens"],
                                                  ignore_eos=True), None, arrival_time=float(k),
                                                  priority=r["priority"], block_hasher=hasher)
                if r["external"]:
                    OFFERS[r["id"]] = r["external"]
                s.add_request(req)
        if k > max(r["arrive"] for r in job["requests"]) and not s.has_requests():
            break
        running = {r.request_id for r in s.running}
        out = s.schedule()
        # the computed tokens each admitted request starts from (its prefix hit, or what its load brought)
        hits = {rid: requests[rid].num_computed_tokens - n for rid, n in out.num_scheduled_tokens.items()
                if rid not in running}
        started = sorted(rid for rid, req in requests.items()
                         if req.status == RequestStatus.WAITING_FOR_REMOTE_KVS and rid not in loading)
        for rid in started:
            loading.add(rid)
            received.setdefault(k + specs[rid]["load_steps"] - 1, set()).add(rid)
        ids = list(out.num_scheduled_tokens)
        tokens = [[] if requests[rid].is_prefill_chunk else [7] for rid in ids]
        recv = received.pop(k, set())
        s.update_from_output(out, ModelRunnerOutput(
            req_ids=ids, req_id_to_index={rid: i for i, rid in enumerate(ids)}, sampled_token_ids=tokens,
            kv_connector_output=KVConnectorOutput(finished_recving=recv) if recv else None))
        steps.append({"scheduled": dict(out.num_scheduled_tokens), "loads": started,
                      "preempted": sorted(out.preempted_req_ids), "hits": hits,
                      "free": s.kv_cache_manager.block_pool.get_num_free_blocks(),
                      "held": {rid: len(b) for rid, b in
                               s.kv_cache_manager.coordinator.single_type_managers[0].req_to_blocks.items() if b}})
    print(json.dumps({"steps": steps}))


if __name__ == "__main__":
    main()
