"""A LoRA adapter's files, checked as vLLM 0.33's worker checks them when it loads the adapter.

No weights are read. An absolute (or ~) path must exist, else vLLM's LoRAAdapterNotFoundError ("No adapter
found"); a relative one that does not exist locally is taken for a Hugging Face repository (found: there
is no hub here). A local directory's adapter_config.json, when present, has its rank (`r`, and the largest
of `rank_pattern`) checked against max_lora_rank and a bias refused, as vLLM's PEFTHelper validates them
(`lora/peft_helper.py`). Both `vllm serve --lora-modules` (server/lora.py) and a cluster file's
lora-modules (profiles/cluster_file.py) check their adapters here.
"""
from __future__ import annotations

import json
import os

ENGINE_FAILED = "Call to add_lora method failed: "  # how vLLM's engine-core utility call reports a failure


class AdapterLoadError(ValueError):
    """vLLM's error loading an adapter: `not_found` (its 404, LoRAAdapterNotFoundError), else the engine's
    failure (its 500). The message is vLLM's, unsanitized."""

    def __init__(self, message: str, not_found: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.not_found = not_found


def check_adapter_files(name: str, path: str, max_lora_rank: int) -> None:
    """Raise AdapterLoadError where vLLM's worker would fail to load adapter `name` from `path`."""
    local = os.path.expanduser(path)
    if not os.path.exists(local):
        if not os.path.isabs(local):
            return  # a Hugging Face repository
        raise AdapterLoadError(f"Loading lora {name} failed: No adapter found for {path}", not_found=True)
    config_file = os.path.join(local, "adapter_config.json")
    if not os.path.isfile(config_file):
        return
    try:
        with open(config_file) as f:
            config = json.load(f)
        rank = max([int(config.get("r", 8)), *map(int, (config.get("rank_pattern") or {}).values())])
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise AdapterLoadError(ENGINE_FAILED + str(exc)) from None
    problems = []
    if rank > max_lora_rank:
        problems.append(f"LoRA rank {rank} is greater than max_lora_rank {max_lora_rank}.")
    if config.get("bias", "none") != "none":
        problems.append("Adapter bias is not supported.")
    if problems:
        raise AdapterLoadError(ENGINE_FAILED + " ".join(problems))
