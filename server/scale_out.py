"""vLLM 0.33's scale-out routes (`scale_out/factories.py`): render, derender and token-in/token-out.

`vllm serve` of a generate model registers them only with --enable-scale-out (or --tokens-only, which is
dedicated to them and adds the unauthenticated legacy /abort_requests); otherwise each of their paths
answers 403 with vLLM's PermissionDeniedError, whatever the request.
"""
from __future__ import annotations

import functools
import logging
from http import HTTPStatus

from aiohttp import web

from server import derender_api, generate_api, render_api
from server.errors import error_body, json_response
from server.openapi import hidden
from server.serving import SERVING

log = logging.getLogger("vllm_emulator.server")
DISABLED = "Scale-out endpoints are disabled. Restart vllm serve with --enable-scale-out to enable them."
PATHS = ("/v1/chat/completions/render", "/v1/messages/render", "/v1/completions/render", "/v1/responses/render",
         "/v1/chat/completions/derender", "/v1/completions/derender", "/inference/v1/generate",
         "/inference/v1/abort_requests")


def add_routes(app: web.Application) -> None:
    options = app[SERVING].options
    if options.enable_scale_out or options.tokens_only:
        render_api.add_routes(app)
        derender_api.add_routes(app)
        generate_api.add_routes(app, legacy_abort=options.tokens_only)
        return
    _log_disabled()
    for path in PATHS:
        app.router.add_post(path, disabled_scale_out)


@functools.cache
def _log_disabled() -> None:
    """vLLM logs it once, as its API server starts; a cluster's front door and instance ports are one process."""
    log.info(DISABLED)


@hidden  # vLLM adds these stand-ins with include_in_schema=False
async def disabled_scale_out(request: web.Request) -> web.Response:
    status = HTTPStatus.FORBIDDEN
    return json_response(error_body(DISABLED, "PermissionDeniedError", None, status), status)
