"""LoRA adapters on the front end, as vLLM 0.33's OpenAIServingModels keeps them, and on a cluster's front door.

`LoRAAdapters` is the registry of one vLLM server (a pod): adapter name -> the adapter requests run with, its
`lora_int_id` taken from the pod's counter, which starts at 1 (a reload in place keeps its id). A request
whose `model` is an adapter's name runs on the base model with that adapter, and its response is named
after the adapter; `/v1/models` lists a card per adapter after the base models' (`root`: its path,
`parent`: its base model). Adapters come from `--lora-modules` at start-up (an error there stops the
server, as in vLLM) and, with VLLM_ALLOW_RUNTIME_LORA_UPDATING=1, from `POST /v1/load_lora_adapter` and
`POST /v1/unload_lora_adapter` (registered only then), answered with vLLM's texts and errors
(`entrypoints/openai/models/serving.py`, `entrypoints/serve/lora/`; the routes: server/lora_routes.py).
An unload only drops the name from the front end, as in vLLM: requests already running with the adapter
(or waiting for it) finish with it. A single deployment has one registry for every port
(--port-per-engine's too); a cluster instance's own port is that instance's registry, kept in the
simulation (emulator.lora.ServedAdapters) so that the front door routes by it.

`FrontDoorAdapters` is a cluster's front door, a router in front of those pods: it lists and routes by
what the pods serve, as a router that learns each pod's adapters from its /v1/models does (the vLLM
production stack's router merges its pods' /v1/models; it has no load route, and its LoRA tutorial loads
adapters on the engine pods). A load at the front door is a load on every pod of the pool serving its
first model with --enable-lora, as the Gateway API inference extension's LoRA syncer (llm-d's) loads the
adapters a pool should serve on each of its vLLM pods; an unload removes the name from every pod serving
it. Pods without --enable-lora never get an adapter. Prefill and decode pods load and unload adapters as mixed
ones do (the pool takes them in too): the cluster's P/D proxy routes a request's prefill and its decode each
among the pods serving its adapter. An adapter one side's pods do not serve gets that side's 404, as behind
vLLM's toy proxy, which picks pods without looking at adapters (`pod_not_found`): loaded on a prefill pod's
port alone, its requests run their prefill and then get a decode pod's 404; on a decode pod's alone, a
prefill pod's 404 at once.
No weights are read: profiles/lora_adapter_files.py checks an adapter's path and rank as vLLM's worker does.
"""
from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel

from emulator.disaggregation import ModelNotFound
from emulator.lora import LORA_NOT_ENABLED, LoRAAdapter, LoRAModulePath, PodAdapters
from profiles.lora_adapter_files import ENGINE_FAILED, AdapterFiles, AdapterLoadError, read_adapter_files
from server.errors import APIError, not_found

if TYPE_CHECKING:
    from emulator.instance import Instance
    from emulator.simulation import Simulation

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


def _engine_failed(message: str) -> APIError:
    return APIError(sanitized(ENGINE_FAILED + message), status=500, err_type="InternalServerError")


def _check_names(name: str, path: str, base_names: Sequence[str]) -> None:
    """vLLM's first checks of a load request (APIError)."""
    if not name or not path:
        raise _invalid("Both 'lora_name' and 'lora_path' must be provided.")
    if name in base_names:
        raise _invalid(f"The lora adapter '{name}' conflicts with a served base model.")


def _check_unload_name(name: str) -> None:
    if not name:
        raise _invalid("'lora_name' needs to be provided to unload a LoRA adapter.")


def _added(name: str) -> str:
    return f"Success: LoRA adapter '{name}' added successfully."


def _removed(name: str) -> str:
    return f"Success: LoRA adapter '{name}' removed successfully."


class LoRAAdapters:
    """One server's adapters (see the module docstring). `max_lora_rank`: the engine's (None: LoRA is off, and
    every load fails as vLLM's engine fails it); `base_names`: the served model names; `pod`: the table it
    keeps them in (a cluster instance's, shared with the simulation; else its own)."""

    def __init__(self, max_lora_rank: int | None, base_names: Sequence[str] = (), pod: PodAdapters | None = None
                 ) -> None:
        self.max_lora_rank = max_lora_rank
        self.base_names: list[str] = []
        self.add_base_names(base_names)
        self.pod = pod if pod is not None else PodAdapters()

    @property
    def adapters(self) -> dict[str, LoRAAdapter]:
        return self.pod.adapters

    def add_base_names(self, names: Sequence[str]) -> None:
        """Served model names (those of every port the registry serves; the first is an adapter's parent)."""
        self.base_names += [n for n in names if n not in self.base_names]

    def get(self, name: str | None) -> LoRAAdapter | None:
        return self.adapters.get(name) if name else None

    def load(self, name: str, path: str, load_inplace: bool = False, base_model_name: str | None = None) -> str:
        """vLLM's load_lora_adapter: its checks, then the engine's; the success text (APIError otherwise)."""
        self.check_request(name, path, load_inplace)
        lora_id = self.lora_id_for(name)  # taken before the engine is asked, as vLLM's front end takes it
        self.check_engine(name, path)
        self.add(name, path, lora_id, base_model_name)
        return _added(name)

    def lora_id_for(self, name: str) -> int:
        """The id a load of `name` gives it: a loaded adapter's own (a reload in place keeps it), else the next."""
        previous = self.adapters.get(name)
        return previous.lora_id if previous is not None else self.pod.take_id()

    def add(self, name: str, path: str, lora_id: int, base_model_name: str | None = None) -> None:
        """Serve adapter `name` from `path` (its checks passed); its parent is `base_model_name` if served."""
        previous = self.adapters.get(name)
        if previous is not None and previous.path == path:
            log.warning("Reloaded LoRA adapter '%s' in place from the same path '%s'. Prefix-cache blocks computed "
                        "with its previous weights are not invalidated; load changed weights from a new path to "
                        "avoid reusing them.", name, path)
        base = base_model_name if base_model_name in self.base_names else self.base_names[0] if self.base_names \
            else None
        self.adapters[name] = LoRAAdapter(name, lora_id, path, base)

    def check_request(self, name: str, path: str, load_inplace: bool) -> None:
        """vLLM's checks of a load request, before its engine is asked (APIError)."""
        _check_names(name, path, self.base_names)
        if name in self.adapters and not load_inplace:
            raise _invalid(f"The lora adapter '{name}' has already been loaded. If you want to load the adapter "
                           "in place, set 'load_inplace' to True.")

    def check_engine(self, name: str, path: str, files: AdapterFiles | None = None) -> AdapterFiles:
        """What vLLM's engine checks when it loads an adapter (its errors reach the client through the engine
        core's utility call: "Call to add_lora method failed: ..."). `files`: the adapter's files as another
        pod read them for the same load (else read here); returns them."""
        if self.max_lora_rank is None:
            raise _engine_failed(NOT_ENABLED)
        try:
            files = read_adapter_files(name, path) if files is None else files
            files.check(self.max_lora_rank)
        except AdapterLoadError as exc:
            if exc.not_found:
                raise not_found(sanitized(exc.message)) from None
            raise APIError(sanitized(exc.message), status=500, err_type="InternalServerError") from None
        return files

    def load_static(self, modules: Sequence[LoRAModulePath]) -> None:
        """`--lora-modules`: ValueError with vLLM's message when one fails (the server does not start)."""
        for module in modules:
            try:
                self.load(module.name, module.path, base_model_name=module.base_model_name)
            except APIError as exc:
                raise ValueError(exc.message) from None

    def unload(self, name: str) -> str:
        _check_unload_name(name)
        if name not in self.adapters:
            raise not_found(sanitized(f"The lora adapter '{name}' cannot be found."))
        del self.adapters[name]
        return _removed(name)

    def resolve_unknown(self) -> None:
        """A request named a model that is neither served nor loaded, with runtime updating on: vLLM asks its
        LoRA resolvers (none are installed here) and takes an id for the attempt all the same."""
        self.pod.take_id()

    def cards(self, now: int) -> list[dict]:
        """The adapters' /v1/models cards, in the order they were loaded."""
        return _cards(self.adapters.values(), self.base_names[0], now)


class FrontDoorAdapters:
    """A cluster's front door (see the module docstring): `sim`'s instances, each a pod with its own registry."""

    def __init__(self, sim: Simulation) -> None:
        self.served = sim.adapters
        self.base_names: list[str] = []
        self.instances = sim.instances
        self.pods = {i.name: pod_adapters(sim, i) for i in sim.instances}
        sim.add_restore_listener(lambda instance: self.served.restart(instance.name))  # a pod restarts afresh

    @property
    def adapters(self) -> dict[str, LoRAAdapter]:
        return self.served.adapters

    def add_base_names(self, names: Sequence[str]) -> None:
        self.base_names += [n for n in names if n not in self.base_names]

    def get(self, name: str | None) -> LoRAAdapter | None:
        return self.served.get(name)

    def load(self, name: str, path: str, load_inplace: bool = False) -> str:
        """A load on every pod of the pool (those serving the front door's first model with --enable-lora), all
        or none: each pod's checks first (the first refusal is the answer, and no pod loads), then each
        loads it, numbering it as it numbers its own."""
        _check_names(name, path, self.base_names)
        base = self.base_names[0]
        pool = [self.pods[i.name] for i in self.instances if base in i.served_model_names]
        enabled = [pod for pod in pool if pod.max_lora_rank is not None]
        if not enabled:
            raise _engine_failed(NOT_ENABLED)
        for pod in enabled:
            pod.check_request(name, path, load_inplace)
        files = None  # the adapter's files, read by the first pod that checks them
        for pod in enabled:
            files = pod.check_engine(name, path, files)
        for pod in enabled:
            pod.add(name, path, pod.lora_id_for(name), base_model_name=base)
        return _added(name)

    def unload(self, name: str) -> str:
        """An unload on every pod serving the adapter."""
        _check_unload_name(name)
        holders = [pod for pod in self.pods.values() if name in pod.adapters]
        if not holders:
            raise not_found(sanitized(f"The lora adapter '{name}' cannot be found."))
        for pod in holders:
            pod.unload(name)
        return _removed(name)

    def resolve_unknown(self) -> None:
        """A model no pod serves: the front door answers it itself (no pod's resolvers are asked, no id taken)."""

    def cards(self, now: int) -> list[dict]:
        """Every pod's adapters, each once, in instance order (as the first pod serving it lists it)."""
        return _cards(self.adapters.values(), self.base_names[0], now)


def pod_not_found(sim: Simulation, refusal: ModelNotFound) -> APIError:
    """The 404 of the pod the cluster's P/D proxy sent a request to that does not serve its adapter, as that
    pod's vLLM answers it (its _check_model: with runtime updating on, its resolver attempt takes an id there)."""
    if runtime_updating():
        pod_adapters(sim, refusal.instance).resolve_unknown()
    return not_found(str(refusal), param="model")


def pod_adapters(sim: Simulation, instance: Instance) -> LoRAAdapters:
    """The registry of a cluster instance (an emulator Instance): its table in `sim.adapters`, its LoRA config."""
    lora = instance.deployment.config.lora
    return LoRAAdapters(None if lora is None else lora.max_lora_rank, instance.served_model_names,
                        sim.adapters.pod(instance.name))


def cluster_adapters(sim: Simulation, instance: Instance | None = None) -> LoRAAdapters | FrontDoorAdapters:
    """The adapters a port of a cluster serves: `instance`'s own (its port), or the front door's (None)."""
    return pod_adapters(sim, instance) if instance is not None else FrontDoorAdapters(sim)


def _cards(adapters: Iterable[LoRAAdapter], parent: str, now: int) -> list[dict]:
    return [{"id": a.name, "object": "model", "created": now, "owned_by": "vllm", "root": a.path,
             "parent": a.base_model_name or parent, "max_model_len": None,
             "permission": [model_permission(now)]} for a in adapters]


def model_permission(now: int) -> dict:
    """vLLM's ModelPermission, as every card carries it."""
    return {"id": f"modelperm-{uuid.uuid4().hex[:16]}", "object": "model_permission", "created": now,
            "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
            "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False, "organization": "*",
            "group": None, "is_blocking": False}
