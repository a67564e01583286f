"""vLLM's `load_aware_call`: a route counted in `/load` while it runs (with --enable-server-load-tracking).

A streamed answer counts until its last byte is written, as vLLM's counts until its stream's
background task ends.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Awaitable, Callable, Iterator

from aiohttp import web

from server.serving import SERVING, Serving

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def load_aware(handler: Handler) -> Handler:
    @functools.wraps(handler)
    async def counted(request: web.Request) -> web.StreamResponse:
        with counted_load(request.app[SERVING]):
            return await handler(request)
    return counted


@contextlib.contextmanager
def counted_load(serving: Serving) -> Iterator[None]:
    """What runs inside counts in the port's /load (with --enable-server-load-tracking)."""
    if not serving.options.enable_server_load_tracking:
        yield
        return
    serving.server_load += 1
    try:
        yield
    finally:
        serving.server_load -= 1
