"""vLLM's runtime LoRA routes, `POST /v1/load_lora_adapter` and `POST /v1/unload_lora_adapter`: registered
only with VLLM_ALLOW_RUNTIME_LORA_UPDATING=1, as vLLM registers them (with its warning). A success is
vLLM's plain-text sentence, a failure its error body (server/lora.py has the registry and its checks; on a
cluster, an instance's port loads on that pod, the front door on its pool's pods)."""
from __future__ import annotations

import logging

from aiohttp import web

from server.lora import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest, runtime_updating
from server.serving import SERVING

log = logging.getLogger("vllm_emulator.server")


async def load_lora_adapter(request: web.Request) -> web.Response:
    serving = request.app[SERVING]
    data, _ = await serving.read_json(request)
    req = serving.parse(LoadLoRAAdapterRequest, data)
    text = serving.lora_adapters.load(req.lora_name, req.lora_path, req.load_inplace)
    log.info("Loaded new LoRA adapter: name '%s', path '%s'", req.lora_name, req.lora_path)
    return web.Response(text=text)


async def unload_lora_adapter(request: web.Request) -> web.Response:
    serving = request.app[SERVING]
    data, _ = await serving.read_json(request)
    req = serving.parse(UnloadLoRAAdapterRequest, data)
    text = serving.lora_adapters.unload(req.lora_name)
    log.info("Removed LoRA adapter: name '%s'", req.lora_name)
    return web.Response(text=text)


def add_routes(app: web.Application) -> None:
    if not runtime_updating():
        return
    log.warning("LoRA dynamic loading & unloading is enabled in the API server. This should ONLY be used for "
                "local development!")
    app.router.add_post("/v1/load_lora_adapter", load_lora_adapter)
    app.router.add_post("/v1/unload_lora_adapter", unload_lora_adapter)
