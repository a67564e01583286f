"""vLLM's side of test_lora_vllm.py, run with the CPU venv's python (it imports vLLM 0.33).

Reads one JSON job on stdin and prints one JSON answer:

- {"job": "hashes", "cases": [{"algo", "block_size", "prompt", "lora": [name, id, path] | null, "cache_salt"}]}:
  the block hashes of vLLM's request block hasher for a request with that LoRARequest (hex), and ours.
- {"job": "models", "base": [names], "ops": [["load", name, path, inplace, base_model_name] | ["unload", name]
  | ["models"]]}: what vLLM's OpenAIServingModels answers to each operation (its engine's add_lora
  succeeds): the success text, the error body, or the /v1/models data without its times and ids.
- {"job": "gauge", "max_loras", "steps": [[[op, request, adapter], ...], ...]}: op one of waiting, running,
  finished, applied to vLLM's LoRARequestStates, then its PrometheusStatLogger records the step; the label
  sets of vllm:lora_requests_info after each step, the one set last first.
"""
from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def hashes(job: dict) -> dict:
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    from emulator.kv_events import BlockHasher, none_hash_seed
    from emulator.lora import LoRAAdapter
    answers = []
    for case in job["cases"]:
        hash_fn = get_hash_fn_by_name(case["algo"])
        init_none_hash(hash_fn)
        lora = case["lora"]
        request = Request("r", case["prompt"], SamplingParams(max_tokens=1), None, cache_salt=case["cache_salt"],
                          lora_request=LoRARequest(*lora) if lora else None,
                          block_hasher=get_request_block_hasher(case["block_size"], hash_fn))
        ours = BlockHasher(case["algo"], none_hash_seed(case["algo"], None)).chain(
            case["prompt"], case["block_size"], cache_salt=case["cache_salt"],
            lora=LoRAAdapter(lora[0], lora[1], lora[2]) if lora else None)
        answers.append({"vllm": [h.hex() for h in request.block_hashes], "ours": [h.hex() for h in ours]})
    return {"answers": answers}


def models(job: dict) -> dict:
    from unittest.mock import AsyncMock, MagicMock

    from vllm.entrypoints.openai.models.protocol import BaseModelPath
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
    engine = MagicMock()
    engine.model_config.max_model_len = 4096
    engine.add_lora = AsyncMock(return_value=True)
    serving = OpenAIServingModels(engine, [BaseModelPath(name, "/models/base") for name in job["base"]])

    async def run() -> list:
        answers = []
        for op, *args in job["ops"]:
            if op == "load":
                name, path, inplace, base = args
                result = await serving.load_lora_adapter(
                    LoadLoRAAdapterRequest(lora_name=name, lora_path=path, load_inplace=inplace), base)
            elif op == "unload":
                result = await serving.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=args[0]))
            else:
                cards = (await serving.show_available_models()).model_dump()["data"]
                result = [{k: v for k, v in card.items() if k not in ("created", "permission")} for card in cards]
            answers.append(result if isinstance(result, (str, list)) else result.model_dump())
        return answers
    return {"answers": asyncio.run(run()), "ids": {n: r.lora_int_id for n, r in serving.lora_requests.items()}}


def gauge(job: dict) -> dict:
    from types import SimpleNamespace
    from unittest.mock import MagicMock

    import prometheus_client
    from vllm.v1.metrics.loggers import PrometheusStatLogger
    from vllm.v1.metrics.stats import LoRARequestStates, SchedulerStats
    config = MagicMock()
    config.model_config.served_model_name = "m"
    config.model_config.max_model_len = 1024
    config.model_config.is_diffusion = False
    config.observability_config.show_hidden_metrics = False
    config.observability_config.kv_cache_metrics = False
    config.observability_config.custom_histogram_buckets = None
    config.observability_config.enable_mfu_metrics = False
    for absent in ("speculative_config", "kv_transfer_config", "ec_transfer_config", "watermark_config"):
        setattr(config, absent, None)
    config.lora_config.max_loras = job["max_loras"]
    logger = PrometheusStatLogger(config, [0])
    clock = iter(range(1, 1 << 20))  # the gauge holds the step's number, not the time of day
    prometheus_client.metrics.time = SimpleNamespace(time=lambda: next(clock))
    states = LoRARequestStates(log_stats=True)
    calls = {"waiting": states.request_waiting, "running": states.request_running,
             "finished": states.request_finished}
    answers = []
    for step in job["steps"]:
        for op, request, adapter in step:
            calls[op](request, adapter)
        stats = SchedulerStats()
        states.update_scheduler_stats(stats)
        logger.record(scheduler_stats=stats, iteration_stats=None, engine_idx=0)
        samples = [s for family in prometheus_client.REGISTRY.collect() if family.name == "vllm:lora_requests_info"
                   for s in family.samples]
        answers.append([s.labels for s in sorted(samples, key=lambda s: -s.value)])
    return {"answers": answers}


if __name__ == "__main__":
    job = json.loads(sys.stdin.read())
    print(json.dumps({"hashes": hashes, "models": models, "gauge": gauge}[job["job"]](job)))
