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
from dataclasses import dataclass

ENGINE_FAILED = "Call to add_lora method failed: "  # how vLLM's engine-core utility call reports a failure


class AdapterLoadError(ValueError):
    """vLLM's error loading an adapter: `not_found` (its 404, LoRAAdapterNotFoundError), else the engine's
    failure (its 500). The message is vLLM's, unsanitized."""

    def __init__(self, message: str, not_found: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.not_found = not_found


@dataclass(frozen=True)
class AdapterFiles:
    """What vLLM's worker reads of an adapter before it loads it: its rank and bias (no rank: no local
    adapter_config.json, nothing to check)."""
    rank: int | None = None
    bias: str = "none"

    def check(self, max_lora_rank: int) -> None:
        """Raise AdapterLoadError where an engine of this max_lora_rank would refuse the adapter."""
        problems = []
        if self.rank is not None and self.rank > max_lora_rank:
            problems.append(f"LoRA rank {self.rank} is greater than max_lora_rank {max_lora_rank}.")
        if self.bias != "none":
            problems.append("Adapter bias is not supported.")
        if problems:
            raise AdapterLoadError(ENGINE_FAILED + " ".join(problems))


def read_adapter_files(name: str, path: str) -> AdapterFiles:
    """Adapter `name`'s files at `path`, read once; AdapterLoadError where vLLM's worker finds none or cannot
    read them."""
    local = os.path.expanduser(path)
    if not os.path.exists(local):
        if not os.path.isabs(local):
            return AdapterFiles()  # a Hugging Face repository
        raise AdapterLoadError(f"Loading lora {name} failed: No adapter found for {path}", not_found=True)
    config_file = os.path.join(local, "adapter_config.json")
    if not os.path.isfile(config_file):
        return AdapterFiles()
    try:
        with open(config_file) as f:
            config = json.load(f)
        rank = max([int(config.get("r", 8)), *map(int, (config.get("rank_pattern") or {}).values())])
        return AdapterFiles(rank, config.get("bias", "none"))
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise AdapterLoadError(ENGINE_FAILED + str(exc)) from None


def check_adapter_files(name: str, path: str, max_lora_rank: int) -> None:
    """Raise AdapterLoadError where vLLM's worker would fail to load adapter `name` from `path`."""
    read_adapter_files(name, path).check(max_lora_rank)
