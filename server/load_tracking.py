"""vLLM's `load_aware_call`: a route counted in `/load` while it runs (with --enable-server-load-tracking).

A streamed answer counts until its last byte is written, as vLLM's counts until its stream's
background task ends.
"""
from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

from aiohttp import web

from server.serving import SERVING

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def load_aware(handler: Handler) -> Handler:
    @functools.wraps(handler)
    async def counted(request: web.Request) -> web.StreamResponse:
        serving = request.app[SERVING]
        if not serving.options.enable_server_load_tracking:
            return await handler(request)
        serving.server_load += 1
        try:
            return await handler(request)
        finally:
            serving.server_load -= 1
    return counted
