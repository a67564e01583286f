"""Server-sent events written straight to the client's transport.

Tokens are delivered from the pacer's timer callback, for every stream that got one
in an engine step; awaiting a write per stream would cost a task switch each and
put the last stream of a large batch milliseconds late. So a channel writes the
HTTP/1.1 chunk framing itself (aiohttp has sent the headers and finishes the body
with its own `write_eof`), synchronously. A client that does not read fills its
socket buffer; past `HIGH_WATER` bytes the channel reports itself congested and the
stream merges the tokens it holds back into the next chunk it sends, as vLLM's
output collector merges outputs for a slow consumer, so memory stays bounded.

A channel is opened (the status line and headers sent) only once its request is in the
engine, so that a request the engine refuses gets a JSON error, not a stream cut short;
anything written before that waits and goes out right after the headers.
"""
from __future__ import annotations

import functools
import json
from typing import Any

from aiohttp import web

HIGH_WATER = 256 * 1024


def compact_json(value: Any, allow_nan: bool = True) -> str:
    """JSON as vLLM writes it: no spaces, UTF-8 kept, as its stream chunks are (pydantic's); with `allow_nan`
    False as its JSON responses are (Starlette's JSONResponse: NaN or an infinity is a ValueError)."""
    return json.dumps(value, ensure_ascii=False, allow_nan=allow_nan, separators=(",", ":"))


def chunk_start(response_id: str, kind: str, created: int, model: str) -> str:
    """A stream chunk's event up to and including its `model` (the `object` being `kind`)."""
    return (f'data: {{"id":{compact_json(response_id)},"object":"{kind}","created":{created},'
            f'"model":{compact_json(model)}')


class ChunkStart:
    """The start of an OpenAI stream's chunks, for a format with `serving`, `req`, `response_id`, `created`
    and its `object_kind`: built at the first chunk, once the core placed the request (one naming no model
    on an any_non_decode cluster takes the model of the instance that serves it)."""
    object_kind: str

    @functools.cached_property
    def base(self) -> str:
        """Every chunk's start, through its `model`."""
        model = self.serving.response_model(self.req.model)
        return chunk_start(self.response_id, self.object_kind, self.created, model)

    @functools.cached_property
    def head(self) -> str:
        """A chunk's start through its first choice's `index` key."""
        return self.base + ',"choices":[{"index":'


DONE = b"data: [DONE]\n\n"


class SSEChannel:
    def __init__(self, request: web.Request) -> None:
        self._request = request
        self._response: web.StreamResponse | None = None
        self._transport = None
        self._chunked = request.version >= (1, 1)
        self._queued: list[bytes] = []
        self._before_open: list[bytes] = []  # written while the headers were not sent yet

    async def open(self) -> None:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        if self._chunked:
            response.enable_chunked_encoding()
        else:
            response.force_close()  # HTTP/1.0: the body ends when the connection does
        await response.prepare(self._request)  # sends the status line and headers now
        self._response = response
        self._transport = self._request.transport
        before, self._before_open = self._before_open, []
        for data in before:
            self.send(data)

    @property
    def response(self) -> web.StreamResponse:
        return self._response

    @property
    def is_open(self) -> bool:
        transport = self._transport
        return transport is not None and not transport.is_closing()

    @property
    def congested(self) -> bool:
        transport = self._transport
        return transport is not None and not transport.is_closing() and transport.get_write_buffer_size() > HIGH_WATER

    def queue(self, data: bytes) -> None:
        """Add whole events to the next write (`flush`)."""
        self._queued.append(data)

    def flush(self) -> None:
        """Write the queued events, as one HTTP chunk."""
        queued = self._queued
        if queued:
            self.send(queued[0] if len(queued) == 1 else b"".join(queued))
            queued.clear()

    def send(self, data: bytes) -> None:
        """Write one or more whole events; dropped when the client is gone (kept until `open` before it)."""
        if not data:  # nothing to write (a delta a parser holds back): an empty HTTP chunk would end the body
            return
        transport = self._transport
        if transport is None:
            if self._response is None:
                self._before_open.append(data)
            return
        if transport.is_closing():
            return
        if self._chunked:
            transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            transport.write(data)

    async def close(self) -> None:
        if self._response is not None and self.is_open:
            await self._response.write_eof()
