"""LoRA adapters on the front end, as vLLM 0.33's OpenAIServingModels keeps them.

`LoRAAdapters` is the registry of a server: adapter name -> the adapter requests run with, its
`lora_int_id` taken from a counter that starts at 1 (a reload in place keeps its id). A request whose
`model` is an adapter's name runs on the base model with that adapter, and its response is named after
the adapter; `/v1/models` lists a card per adapter after the base models' (`root`: its path, `parent`:
its base model). Adapters come from `--lora-modules` at start-up (an error there stops the server, as
in vLLM) and, with VLLM_ALLOW_RUNTIME_LORA_UPDATING=1, from `POST /v1/load_lora_adapter` and
`POST /v1/unload_lora_adapter` (registered only then), answered with vLLM's texts and errors
(`entrypoints/openai/models/serving.py`, `entrypoints/serve/lora/`; the routes: server/lora_routes.py).
One registry serves every port of the server (--port-per-engine's too).

No weights are read. A path is checked as vLLM's worker resolves it: an absolute (or ~) path must exist,
else vLLM's 404 "No adapter found"; a relative one that does not exist locally is taken for a Hugging Face
repository (found: there is no hub here); a local directory's adapter_config.json, when present, has its
rank checked against --max-lora-rank and its bias refused, as vLLM's PEFTHelper does.
"""
from __future__ import annotations

import json
import logging
import os
import re
import uuid
from collections.abc import Sequence

from pydantic import BaseModel

from emulator.lora import LORA_NOT_ENABLED, LoRAAdapter, LoRAModulePath
from server.errors import APIError, not_found

log = logging.getLogger("vllm_emulator.server")

NOT_ENABLED = LORA_NOT_ENABLED


def runtime_updating() -> bool:
    """VLLM_ALLOW_RUNTIME_LORA_UPDATING, read as vLLM reads it."""
    return os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "0").strip().lower() in ("1", "true")


class LoadLoRAAdapterRequest(BaseModel):
    lora_name: str
    lora_path: str
    load_inplace: bool = False
    is_3d_lora_weight: bool = False


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: str
    lora_int_id: int | None = None


def sanitized(message: str) -> str:
    """vLLM's sanitize_message, applied to every error it answers: paths become <path>."""
    message = re.sub(r"/(?:home|usr|opt|var|tmp|root|lib|mnt|srv)(?:/[\w.\-]+)+", "<path>", message)
    message = re.sub(r"(?:/[\w\-]+)+/[\w\-]+\.\w+", "<path>", message)
    return message.strip()


def _invalid(message: str) -> APIError:
    return APIError(sanitized(message), err_type="InvalidUserInput")


class LoRAAdapters:
    """A server's adapters (see the module docstring). `max_lora_rank`: the engine's (None: LoRA is off, and
    every load fails as vLLM's engine fails it); `base_names`: the served model names."""

    def __init__(self, max_lora_rank: int | None, base_names: Sequence[str] = ()) -> None:
        self.max_lora_rank = max_lora_rank
        self.base_names: list[str] = []
        self.add_base_names(base_names)
        self.adapters: dict[str, LoRAAdapter] = {}
        self._last_id = 0  # vLLM's lora_id_counter

    def add_base_names(self, names: Sequence[str]) -> None:
        """Served model names (those of every port the registry serves; the first is an adapter's parent)."""
        self.base_names += [n for n in names if n not in self.base_names]

    def get(self, name: str | None) -> LoRAAdapter | None:
        return self.adapters.get(name) if name else None

    def load(self, name: str, path: str, load_inplace: bool = False, base_model_name: str | None = None) -> str:
        """vLLM's load_lora_adapter: its checks, then the engine's; the success text (APIError otherwise)."""
        if not name or not path:
            raise _invalid("Both 'lora_name' and 'lora_path' must be provided.")
        if name in self.base_names:
            raise _invalid(f"The lora adapter '{name}' conflicts with a served base model.")
        previous = self.adapters.get(name)
        if previous is not None and not load_inplace:
            raise _invalid(f"The lora adapter '{name}' has already been loaded. If you want to load the adapter "
                           "in place, set 'load_inplace' to True.")
        if previous is not None:
            lora_id = previous.lora_id
        else:
            self._last_id += 1
            lora_id = self._last_id
        self._check_engine(name, path)
        if previous is not None and previous.path == path:
            log.warning("Reloaded LoRA adapter '%s' in place from the same path '%s'. Prefix-cache blocks computed "
                        "with its previous weights are not invalidated; load changed weights from a new path to "
                        "avoid reusing them.", name, path)
        base = base_model_name if base_model_name in self.base_names else None
        self.adapters[name] = LoRAAdapter(name, lora_id, path, base)
        return f"Success: LoRA adapter '{name}' added successfully."

    def serve(self, adapters: Sequence[LoRAAdapter]) -> None:
        """Adapters a cluster's instances serve (emulator.lora.ServedAdapters), with the ids they run with."""
        for adapter in adapters:
            self.adapters[adapter.name] = adapter
            self._last_id = max(self._last_id, adapter.lora_id)

    def load_static(self, modules: Sequence[LoRAModulePath]) -> None:
        """`--lora-modules`: ValueError with vLLM's message when one fails (the server does not start)."""
        for module in modules:
            try:
                self.load(module.name, module.path, base_model_name=module.base_model_name)
            except APIError as exc:
                raise ValueError(exc.message) from None

    def unload(self, name: str) -> str:
        if not name:
            raise _invalid("'lora_name' needs to be provided to unload a LoRA adapter.")
        if name not in self.adapters:
            raise not_found(sanitized(f"The lora adapter '{name}' cannot be found."))
        del self.adapters[name]
        return f"Success: LoRA adapter '{name}' removed successfully."

    def resolve_unknown(self) -> None:
        """A request named a model that is neither served nor loaded, with runtime updating on: vLLM asks its
        LoRA resolvers (none are installed here) and takes an id for the attempt all the same."""
        self._last_id += 1

    def cards(self, now: int) -> list[dict]:
        """The adapters' /v1/models cards, in the order they were loaded."""
        return [{"id": a.name, "object": "model", "created": now, "owned_by": "vllm", "root": a.path,
                 "parent": a.base_model_name or self.base_names[0], "max_model_len": None,
                 "permission": [model_permission(now)]} for a in self.adapters.values()]

    def _check_engine(self, name: str, path: str) -> None:
        """What vLLM's engine checks when it loads an adapter (its errors reach the client through the engine
        core's utility call: "Call to add_lora method failed: ...")."""
        failed = "Call to add_lora method failed: "
        if self.max_lora_rank is None:
            raise APIError(sanitized(failed + NOT_ENABLED), status=500, err_type="InternalServerError")
        local = os.path.expanduser(path)
        if not os.path.exists(local):
            if not os.path.isabs(local):
                return  # a Hugging Face repository
            raise not_found(sanitized(f"Loading lora {name} failed: No adapter found for {path}"))
        config_file = os.path.join(local, "adapter_config.json")
        if not os.path.isfile(config_file):
            return
        try:
            with open(config_file) as f:
                config = json.load(f)
            rank = max([int(config.get("r", 8)), *map(int, (config.get("rank_pattern") or {}).values())])
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise APIError(sanitized(failed + str(exc)), status=500, err_type="InternalServerError") from None
        problems = []
        if rank > self.max_lora_rank:
            problems.append(f"LoRA rank {rank} is greater than max_lora_rank {self.max_lora_rank}.")
        if config.get("bias", "none") != "none":
            problems.append("Adapter bias is not supported.")
        if problems:
            raise APIError(sanitized(failed + " ".join(problems)), status=500, err_type="InternalServerError")


def model_permission(now: int) -> dict:
    """vLLM's ModelPermission, as every card carries it."""
    return {"id": f"modelperm-{uuid.uuid4().hex[:16]}", "object": "model_permission", "created": now,
            "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
            "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False, "organization": "*",
            "group": None, "is_blocking": False}
