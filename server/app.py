"""The aiohttp application: vLLM 0.33's routes over one engine client.

Handlers are thin (parse, call the engine client, format); the generation
endpoints live in `completions.py` and `chat.py`. Cross-cutting behaviour follows
`vllm serve`: `--api-key` guards the /v1, /v2, /inference and /cohere paths with
vLLM's own 401 body; errors are answered in vLLM's shape (a route that does not
exist gets FastAPI's `{"detail": "Not Found"}`); `--enable-request-id-headers`
echoes X-Request-Id; every exchange is reported to the metrics' `http_*` families;
a client that disconnects cancels its handler, which aborts its requests in the core.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from types import SimpleNamespace

from aiohttp import web
from pydantic import ValidationError

from server import (chat_batch, cors, harmony_prompt, kv_read_notice, lora_routes, messages_api, pause_routes,
                    responses_api, scale_out, tokenizer_info, vllm_logging)
from server.chat import conversation, create_chat_completion, render as render_chat_prompt
from server.completions import create_completion
from server.errors import APIError, http_error, json_response, validation_error
from server.openapi import add_documentation_routes
from server.harmony import harmony_tokens, uses_harmony
from server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeChatRequest,
                             TokenizeCompletionRequest)
from server.query_params import query_flag
from server.request_body import MAX_BODY_BYTES, UndecodableBody
from server.load_tracking import counted_load
from server.lora import model_permission
from server.serving import FORWARDED_TO, METRICS, SERVING, Serving, auth_error

VLLM_VERSION = "0.33.0"
GUARDED_PREFIXES = ("/v1", "/v2", "/inference", "/cohere")
KV_EVENT_SOURCES = web.AppKey("kv_event_sources", dict)
POD_METRICS = web.AppKey("pod_metrics", dict)  # a front door's: each instance's own port's metrics, by name

# the top-level fields a large body keeps (server/request_body.py)
GENERATION_FIELDS = frozenset(CompletionRequest.model_fields) | frozenset(ChatCompletionRequest.model_fields)
TOKENIZE_FIELDS = frozenset(TokenizeCompletionRequest.model_fields) | frozenset(TokenizeChatRequest.model_fields)

log = logging.getLogger("vllm_emulator.server")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(body: object, status: int = 200) -> web.Response:
    return json_response(body, status)


# -- generation ----------------------------------------------------------------------------
async def completions(request: web.Request) -> web.StreamResponse:
    return await _load_tracked(request, create_completion)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _load_tracked(request, create_chat_completion)


async def invocations(request: web.Request) -> web.StreamResponse:
    """SageMaker's entry point: the first API whose request the body validates as (chat, then
    completion), with vLLM's answers to a body that is neither or not JSON at all."""
    serving = request.app[SERVING]
    try:
        data, _ = await serving.read_body(request, GENERATION_FIELDS)
    except UndecodableBody as exc:
        if exc.position is None:
            raise APIError(str(exc)) from None
        raise APIError(f"JSON decode error: {exc}", err_type=HTTPStatus.BAD_REQUEST.phrase) from None
    for model, create in ((ChatCompletionRequest, create_chat_completion), (CompletionRequest, create_completion)):
        try:
            model.model_validate(data)
        except ValidationError:
            continue
        return await _load_tracked(request, create)
    raise APIError("Cannot find suitable handler for request. Expected one of: "
                   "['ChatCompletionRequest', 'CompletionRequest']")


async def _load_tracked(request: web.Request, create) -> web.StreamResponse:
    serving = request.app[SERVING]
    with counted_load(serving):
        return await create(serving, request)


# -- model information --------------------------------------------------------------------
async def models(request: web.Request) -> web.Response:
    """The served names of this port's instances: each with its model and context (the shortest of
    the instances that serve it)."""
    serving = request.app[SERVING]
    by_model = serving.engine.sim.by_model
    now = int(time.time())

    def about(name: str) -> tuple[str, int]:
        instances = [i for i in by_model.get(name, ()) if serving.instance in (None, i)]
        if not instances or len(serving.engine.sim.instances) == 1:  # one deployment: the name asked for
            return serving.options.model_root, serving.max_model_len
        return instances[0].deployment.model.name, serving.max_model_len_for(name)
    cards = [{
        "id": name, "object": "model", "created": now, "owned_by": "vllm", "root": about(name)[0],
        "parent": None, "max_model_len": about(name)[1],
        "permission": [model_permission(now)]}
        for name in serving.options.served_model_names]
    cards += serving.lora_adapters.cards(now)  # then the LoRA adapters', as vLLM lists them
    return _json({"object": "list", "data": cards})


async def health(request: web.Request) -> web.Response:
    """200 while the port's instance is up (the front door: while any is); 503 while it is down."""
    serving = request.app[SERVING]
    serving.engine.pacer.catch_up()
    up = serving.instance.up if serving.instance is not None else any(i.up for i in serving.engine.sim.instances)
    return web.Response(status=200 if up else 503)


async def version(request: web.Request) -> web.Response:
    return _json({"version": VLLM_VERSION})


async def load(request: web.Request) -> web.Response:
    return _json({"server_load": request.app[SERVING].server_load})


async def kv_event_sources(request: web.Request) -> web.Response:
    """Each data-parallel rank's KV-event publisher config (server/kv_events.py); {} without events."""
    return _json(request.app[KV_EVENT_SOURCES])


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text; 503 on the port of an instance that is down, as a scrape of a dead pod fails (so
    Prometheus marks the target down and a router reading it does not take the pod for an idle one)."""
    serving = request.app[SERVING]
    engine_metrics = request.app[METRICS]
    pacer = serving.engine.pacer
    pacer.catch_up()
    if serving.instance is not None and not serving.instance.up:
        return web.Response(status=503)
    engine_metrics.set_clock(pacer.virtual_now(), pacer.speed)
    body, content_type = engine_metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


# -- tokenizer ----------------------------------------------------------------------------
async def tokenize(request: web.Request) -> web.Response:
    serving = request.app[SERVING]
    data, _ = await serving.read_json(request, TOKENIZE_FIELDS)
    if isinstance(data, dict) and "messages" in data:
        req = serving.parse(TokenizeChatRequest, data)
        serving.check_model(req.model)
        tools = [tool.template_dict() for tool in req.tools] if req.tools else None
        if uses_harmony(serving, req.model):  # vLLM renders a gpt-oss chat with Harmony here too, as its chat route
            chat = SimpleNamespace(model=req.model, messages=req.messages, reasoning_effort=None)  # (chat's default)
            ids, text = harmony_prompt.chat_prompt(serving, chat, tools)
        else:
            text = render_chat_prompt(serving, req, conversation(req.messages), tools)
            ids = serving.encode_text(text, req.add_special_tokens, req.model)
    else:
        req = serving.parse(TokenizeCompletionRequest, data)
        serving.check_model(req.model)
        text = req.prompt
        ids = serving.encode_text(text, req.add_special_tokens, req.model)
    _log_tokenizer_input(serving, request, req.model, text, ids)
    token_strs = _token_strs(serving, req, ids) if req.return_token_strs else None
    return _json({"count": len(ids), "max_model_len": serving.max_model_len_for(req.model), "tokens": ids,
                  "token_strs": token_strs})


def _token_strs(serving: Serving, req, ids: list[int]) -> list[str]:
    """The tokens' strings; a Harmony prompt's markers by their names (a tokenizer without them as tokens, the
    default for gpt-oss, has o200k_harmony's ids for them: server/harmony.py)."""
    tokenizer = serving.tokenizer_for(req.model)
    if not (isinstance(req, TokenizeChatRequest) and uses_harmony(serving, req.model)):
        return tokenizer.convert_ids_to_tokens(ids)
    markers = harmony_tokens(tokenizer).names
    return [markers[i] if i in markers else tokenizer.convert_ids_to_tokens([i])[0] for i in ids]


async def detokenize(request: web.Request) -> web.Response:
    serving = request.app[SERVING]
    data, _ = await serving.read_json(request, DetokenizeRequest.model_fields)
    req = serving.parse(DetokenizeRequest, data)
    serving.check_model(req.model)
    _log_tokenizer_input(serving, request, req.model, None, req.tokens)
    serving.require_tokenizer(req.model)
    serving.check_token_ids(req.tokens)
    return _json({"prompt": serving.decoder(req.model)(req.tokens)})  # vLLM's default decode: special tokens kept


def _log_tokenizer_input(serving, request: web.Request, model: str | None, text: str | None, ids: list[int]) -> None:
    """--enable-log-requests: vLLM's /tokenize and /detokenize log their input as "tokenize-<id>", no params."""
    if serving.options.request_logger is not None:
        request_id = f"tokenize-{serving.base_request_id(request, f'{uuid.uuid4().int & (2**64 - 1):016x}')}"
        serving.options.request_logger.inputs(request_id, text, ids, None, serving.lora_of(model))


# -- dev mode (VLLM_SERVER_DEV_MODE=1) --------------------------------------------------------
# An instance's own port acts on that instance alone, as its own `vllm serve` would; the front door
# (and a single deployment's port) on every engine.
async def reset_prefix_cache(request: web.Request) -> web.Response:
    serving = request.app[SERVING]
    serving.engine.pacer.catch_up()
    return _json({"success": serving.engine.reset_prefix_cache(serving.instance)})


async def sleep(request: web.Request) -> web.Response:
    """vLLM's /sleep?level=&mode=: pause the port's engines (level >= 1 also drops the prefix cache)."""
    serving = request.app[SERVING]
    try:
        level = int(request.query.get("level", "1"))
    except ValueError:
        raise validation_error("level must be an integer", "level", request.query.get("level")) from None
    mode = request.query.get("mode", "abort")
    if not 0 <= level <= 2:
        raise validation_error("level must be between 0 and 2", "level", level)
    if mode not in ("abort", "wait", "keep"):
        raise validation_error("mode must be one of 'abort', 'wait', 'keep'", "mode", mode)
    engine = serving.engine
    engine.pacer.catch_up()
    engine.sim.pause(mode, serving.instance)
    if level >= 1:  # the KV cache is discarded: nothing stays cached (blocks still in use are kept)
        engine.reset_prefix_cache(serving.instance)
    request.app[METRICS].set_sleep_level(level)
    serving.engine.pacer.catch_up()
    return _json({"status": "sleeping", "level": level})


async def wake_up(request: web.Request) -> web.Response:
    serving = request.app[SERVING]
    tags = request.query.getall("tags", []) or None
    serving.engine.pacer.catch_up()
    serving.engine.sim.resume(serving.instance)
    request.app[METRICS].set_sleep_level(0)
    serving.engine.pacer.catch_up()
    return _json({"status": "awake", "tags": tags})


async def is_sleeping(request: web.Request) -> web.Response:
    serving = request.app[SERVING]
    return _json({"is_sleeping": serving.engine.sim.is_paused(serving.instance)})


async def fail_instance(request: web.Request) -> web.Response:
    """The emulator's fault injection: the instance goes down now (`?reroute=true`: its requests that
    have no token yet are retried on another instance; the others fail with vLLM's error)."""
    serving = request.app[SERVING]
    name = request.match_info["name"]
    reroute = query_flag(request, "reroute")
    serving.engine.pacer.catch_up()
    try:
        failed = serving.engine.sim.fail_instance(name, reroute)
    except KeyError as exc:
        return http_error(404, str(exc.args[0]))
    serving.engine.pacer.catch_up()
    return _json({"instance": name, "up": False, "failed_requests": len(failed)})


async def restore_instance(request: web.Request) -> web.Response:
    serving = request.app[SERVING]
    name = request.match_info["name"]
    serving.engine.pacer.catch_up()
    try:
        serving.engine.sim.restore_instance(name)
    except KeyError as exc:
        return http_error(404, str(exc.args[0]))
    return _json({"instance": name, "up": True})


# -- middleware ---------------------------------------------------------------------------
def _auth_middleware(api_keys: list[str]):
    digests = [hashlib.sha256(k.encode()).digest() for k in api_keys]

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method != "OPTIONS" and request.path.startswith(GUARDED_PREFIXES):
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            digest = hashlib.sha256(token.encode()).digest()
            if scheme.lower() != "bearer" or not any(secrets.compare_digest(digest, d) for d in digests):
                return auth_error()
        return await handler(request)

    return authenticate


@web.middleware
async def vllm_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure answered in vLLM's shape, never a traceback."""
    try:
        return await handler(request)
    except APIError as exc:
        return exc.response()
    except web.HTTPNotFound:
        return _json({"detail": "Not Found"}, status=404)
    except web.HTTPMethodNotAllowed:
        return _json({"detail": "Method Not Allowed"}, status=405)
    except web.HTTPException as exc:  # 413, a body over the size limit; 408, a body too slow to arrive
        response = http_error(exc.status, exc.text or exc.reason)
        if exc.status in (408, 413):
            response.force_close()  # the rest of the body is not worth waiting for
        return response
    except ConnectionError:  # the client went away before its answer: one line, not a traceback
        log.info("%s left before the response to %s %s", request.remote, request.method, request.path)
        raise asyncio.CancelledError from None  # what aiohttp does quietly with a client that left
    except Exception as exc:  # a bug of ours: logged here, answered like vLLM's catch-all handler
        log.exception("error while handling %s %s", request.method, request.path)
        return APIError(str(exc) or type(exc).__name__, status=500, err_type="InternalServerError").response()


@web.middleware
async def http_metrics(request: web.Request, handler: Handler) -> web.StreamResponse:
    """prometheus-fastapi-instrumentator's view of each exchange, in virtual seconds."""
    pacer = request.app[SERVING].engine.pacer
    start = pacer.virtual_now()
    response = await handler(request)
    resource = request.match_info.route.resource
    template = resource.canonical if resource is not None else None
    exchange = (template, request.method, response.status, request.content_length or 0,
                response.content_length or 0, pacer.virtual_now() - start)
    request.app[METRICS].observe_http(*exchange)
    pod = request.app[POD_METRICS].get(request.get(FORWARDED_TO))
    if pod is not None:  # the front door passed it on: that instance's own pod saw it too, as behind a gateway
        pod.observe_http(*exchange)
    return response


async def _request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["X-Request-Id"] = request.headers.get("X-Request-Id") or uuid.uuid4().hex


# where uvicorn and Starlette put a header in vLLM's head: Starlette's content-length then content-type, the
# others (its middleware's), then uvicorn's own connection and transfer-encoding; date and server lead
_HEAD_ORDER = {"content-length": 0, "content-type": 1, "connection": 3, "transfer-encoding": 4}
# CORSMiddleware's own answer to a preflight: its CORS headers, then Starlette's content-length and content-type
_PREFLIGHT_ORDER = {"content-length": 1, "content-type": 2, "connection": 4, "transfer-encoding": 5}


async def _uvicorn_headers(request: web.Request, response: web.StreamResponse) -> None:
    """The head as uvicorn writes vLLM's: `date` and `server: uvicorn` first, then the app's own headers in
    Starlette's order, every name in lower case (aiohttp would send `Server: Python/3.x aiohttp/3.x`,
    canonical casing, content-type first)."""
    headers = response.headers
    date = headers.get("Date")
    if response.get(cors.PREFLIGHT):
        def rank(name: str) -> int:
            return 0 if name.startswith("access-control-") or name == "vary" else _PREFLIGHT_ORDER.get(name, 3)
    else:
        def rank(name: str) -> int:
            return _HEAD_ORDER.get(name, 2)
    own = sorted(((name.lower(), value) for name, value in headers.items() if name.lower() not in ("date", "server")),
                 key=lambda item: rank(item[0]))
    headers.clear()
    if date is not None:
        headers["date"] = date
    headers["server"] = "uvicorn"
    for name, value in own:
        headers.add(name, value)


def _access_line(logger: logging.Logger):
    """uvicorn's access log (`INFO:     127.0.0.1:PORT - "POST /v1/completions HTTP/1.1" 200 OK`), a line as each
    response head goes out."""
    async def log_access(request: web.Request, response: web.StreamResponse) -> None:
        vllm_logging.log_access(logger, request, response.status)
    return log_access


async def kv_read(request: web.Request) -> web.Response:
    """A decode pod in another process has read a prefill's KV (server/kv_read_notice.py)."""
    engine = request.app[SERVING].engine
    return await kv_read_notice.read_notice(request, engine.sim, engine.pacer.catch_up)


def build_app(serving: Serving, engine_metrics, *, dev_mode: bool | None = None,
              kv_events: dict | None = None, pod_metrics: dict | None = None,
              access_log: logging.Logger | None = None) -> web.Application:
    """The app of one port; `access_log`: uvicorn's access logger (None: --disable-uvicorn-access-log)."""
    middlewares = [http_metrics, vllm_errors, cors.middleware(serving.options.cors)]  # CORS inside the key check
    if serving.options.api_keys:
        middlewares.insert(1, _auth_middleware(serving.options.api_keys))
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES or sys.maxsize)
    app[SERVING] = serving
    app[METRICS] = engine_metrics
    app[KV_EVENT_SOURCES] = kv_events or {}  # /kv_event_sources
    app[POD_METRICS] = pod_metrics or {}
    app.on_response_prepare.append(cors.on_prepare(serving.options.cors))  # before X-Request-Id: it is inner
    if serving.options.enable_request_id_headers:
        app.on_response_prepare.append(_request_id_header)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/invocations", invocations)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/ping", health)
    app.router.add_post("/ping", health)
    app.router.add_get("/version", version)
    app.router.add_get("/load", load)
    app.router.add_get("/kv_event_sources", kv_event_sources)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    tokenizer_info.add_routes(app)  # /tokenizer_info (with --enable-tokenizer-info-endpoint)
    app.router.add_post(kv_read_notice.ROUTE, kv_read)
    responses_api.add_routes(app)  # OpenAI Responses API
    messages_api.add_routes(app)   # Anthropic Messages API
    chat_batch.add_routes(app)     # vLLM's /v1/chat/completions/batch
    scale_out.add_routes(app)      # render, derender, /inference/v1/generate (with --enable-scale-out)
    lora_routes.add_routes(app)    # /v1/load_lora_adapter, /v1/unload_lora_adapter (runtime LoRA updating)
    if serving.options.fastapi_docs:
        add_documentation_routes(app, offline=serving.options.offline_docs)
    if dev_mode if dev_mode is not None else os.environ.get("VLLM_SERVER_DEV_MODE") == "1":
        app.router.add_post("/reset_prefix_cache", reset_prefix_cache)
        app.router.add_post("/sleep", sleep)
        app.router.add_post("/wake_up", wake_up)
        app.router.add_get("/is_sleeping", is_sleeping)
        pause_routes.add_routes(app)  # /pause, /resume, /is_paused (vLLM's RL router, dev mode only)
        app.router.add_post("/emulator/instances/{name}/fail", fail_instance)
        app.router.add_post("/emulator/instances/{name}/restore", restore_instance)
    app.on_response_prepare.append(_uvicorn_headers)  # last: it sees every header the others set
    if access_log is not None:
        app.on_response_prepare.append(_access_line(access_log))
    return app
