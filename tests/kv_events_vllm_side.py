"""vLLM's side of test_kv_events_vllm.py, run with the CPU venv's python (it imports vLLM 0.33).

Reads one JSON job on stdin and prints one JSON answer:

- {"job": "hashes", "cases": [{"algo", "seed", "block_size", "prompt", "output", "cache_salt"?, "lora"?}]}: for
  each case the block hashes vLLM's own request block hasher gives the request (its Request, prompt then
  appended output tokens, `lora` [name, id, path] its LoRARequest; NONE_HASH from init_none_hash with
  PYTHONHASHSEED = seed, or unset), and ours (emulator.kv_events.BlockHasher), as hex digests. An
  xxhash algorithm without a seed draws a random one on each side (`drawn`: ours differs from vLLM's);
  ours then hashes from vLLM's (get_none_hash_seed), to compare what follows the seed.
- {"job": "decode", "runs": [{"algo", "seed", "block_size", "payloads", "sequences"}]}: each
  payload (hex) decoded with vLLM's KVEventBatch decoder and re-encoded by vLLM's msgspec
  encoder (`same_bytes`), the events as plain data, and the external hashes vLLM computes for
  every sequence (prompt + output token ids of a request the server answered).
- {"job": "session_ids", "cases": [{"body", "headers"}]}: the session id vLLM's front end gives the engine
  for each completion request `body` sent with `headers` (None: no HTTP request, as in a batch file).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _set_seed(seed: str | None) -> None:
    if seed is None:
        os.environ.pop("PYTHONHASHSEED", None)
    else:
        os.environ["PYTHONHASHSEED"] = seed


def vllm_block_hashes(algo: str, seed: str | None, block_size: int, prompt: list[int], output: list[int],
                      cache_salt: str | None = None, lora: list | None = None) -> list:
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request
    hash_fn = get_hash_fn_by_name(algo)
    _set_seed(seed)
    init_none_hash(hash_fn)
    request = Request("r", list(prompt), SamplingParams(max_tokens=max(1, len(output))), None,
                      cache_salt=cache_salt, lora_request=LoRARequest(*lora) if lora else None,
                      block_hasher=get_request_block_hasher(block_size, hash_fn))
    if output:
        request.append_output_token_ids(list(output))
    return list(request.block_hashes)


def hashes(job: dict) -> dict:
    from vllm.v1.core.kv_cache_utils import get_none_hash_seed

    from emulator.kv_events import BlockHasher, none_hash_seed
    from emulator.lora import LoRAAdapter
    answers = []
    for case in job["cases"]:
        salt, lora, algo = case.get("cache_salt"), case.get("lora"), case["algo"]
        theirs = vllm_block_hashes(algo, case["seed"], case["block_size"], case["prompt"], case["output"], salt, lora)
        seed = none_hash_seed(algo, case["seed"])
        drawn = seed != get_none_hash_seed()
        ours = BlockHasher(algo, get_none_hash_seed() if drawn else seed).chain(
            case["prompt"] + case["output"], case["block_size"], cache_salt=salt,
            lora=LoRAAdapter(*lora) if lora else None)
        answers.append({"vllm": [h.hex() for h in theirs], "ours": [h.hex() for h in ours], "drawn": drawn})
    return {"answers": answers}


def decode(job: dict) -> dict:
    import msgspec
    from vllm.distributed.kv_events import KVEventBatch
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash
    decoder, encoder = msgspec.msgpack.Decoder(type=KVEventBatch), msgspec.msgpack.Encoder()
    runs = []
    for run in job["runs"]:
        batches = []
        for payload in map(bytes.fromhex, run["payloads"]):
            batch = decoder.decode(payload)
            batches.append({"same_bytes": encoder.encode(batch) == payload, "ts": batch.ts,
                            "rank": batch.data_parallel_rank,
                            "events": [{"type": type(e).__name__, **msgspec.structs.asdict(e)} for e in batch.events]})
        expected = [[maybe_convert_block_hash(h) for h in vllm_block_hashes(run["algo"], run["seed"],
                                                                             run["block_size"], prompt, output)]
                    for prompt, output in run["sequences"]]
        runs.append({"batches": batches, "expected": expected})
    return {"runs": runs}


def session_ids(job: dict) -> dict:
    from starlette.datastructures import Headers
    from vllm.entrypoints.generate.base.serving import GenerateBaseServing
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    class RawRequest:  # what the session id is read from: the headers, as FastAPI's Request holds them
        def __init__(self, headers: dict) -> None:
            self.headers = Headers(headers)

    return {"answers": [GenerateBaseServing._get_session_id(
        CompletionRequest.model_validate(case["body"]),
        None if case["headers"] is None else RawRequest(case["headers"])) for case in job["cases"]]}


if __name__ == "__main__":
    import logging
    logging.disable(logging.WARNING)
    request = json.load(sys.stdin)
    print(json.dumps({"hashes": hashes, "decode": decode, "session_ids": session_ids}[request["job"]](request)))
