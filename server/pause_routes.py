"""vLLM's dev-mode generation pause routes (its RL router, registered with VLLM_SERVER_DEV_MODE=1): `POST /pause`
(?mode=abort|wait|keep, ?clear_cache=), `POST /resume`, `GET /is_paused`. Unlike /sleep, a pause in abort or
wait mode has the port's engines reject new requests with vLLM's retryable 503 until /resume (EngineClient
.pause_generation; a request whose kv_transfer_params load a prefill's KV still frees that prefill's blocks).
In wait mode the answer comes once the engines have drained (vLLM's engine completes the pause from its idle
callback), and the prefix cache is reset then unless clear_cache is false. On a cluster an instance's own port
pauses that pod, the front door every pod."""
from __future__ import annotations

from aiohttp import web

from server.errors import json_response, validation_error
from server.query_params import query_flag
from server.serving import SERVING

MODES = ("abort", "wait", "keep")  # vLLM's PauseMode


async def pause(request: web.Request) -> web.Response:
    serving = request.app[SERVING]
    mode = request.query.get("mode", "abort")
    if mode not in MODES:
        raise validation_error(f"mode must be one of {', '.join(repr(m) for m in MODES)}", "mode", mode)
    clear_cache = query_flag(request, "clear_cache", True)
    serving.engine.pause_generation(mode, serving.instance, clear_cache)
    if mode == "wait":
        await serving.engine.drain(serving.instance, clear_cache)
    return json_response({"status": "paused"})


async def resume(request: web.Request) -> web.Response:
    serving = request.app[SERVING]
    serving.engine.resume_generation(serving.instance)
    return json_response({"status": "resumed"})


async def is_paused(request: web.Request) -> web.Response:
    serving = request.app[SERVING]
    return json_response({"is_paused": serving.engine.sim.is_paused(serving.instance)})


def add_routes(app: web.Application) -> None:
    """The routes, for app.py's dev-mode block."""
    app.router.add_post("/pause", pause)
    app.router.add_post("/resume", resume)
    app.router.add_get("/is_paused", is_paused)
