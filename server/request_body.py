"""Reading a request's JSON body without stalling everyone else's streams.

A small body is decoded on the event loop. A large one (over `INLINE_BYTES`) is passed on, as
it arrives, to a child process (server/json_worker.py) that decodes it and keeps only the
top-level fields the endpoint knows (vLLM accepts unknown fields and ignores them): json.loads
holds the GIL, so decoding tens of megabytes here would freeze every stream for seconds, and a
big array in an unknown field would leave hundreds of megabytes of Python objects behind.

A body is refused past `MAX_BODY_BYTES` (413; vLLM's Rust front end's limit,
VLLM_HTTP_MAX_REQUEST_BODY_SIZE) or when it has not arrived within `BODY_TIMEOUT` seconds
(408: a client trickling its body ties up nothing for long). A body json.loads refuses raises
UndecodableBody; the endpoints answer it as vLLM does (`Serving.read_json`).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import sys
from collections.abc import Collection
from pathlib import Path
from typing import Any

from aiohttp import web

from server.json_worker import ANSWER, CHUNK, decode

INLINE_BYTES = 1 << 20  # decoded on the loop: ~10 ms of json.loads at most
MAX_BODY_BYTES = int(os.environ.get("VLLM_HTTP_MAX_REQUEST_BODY_SIZE", 32 * 1024 * 1024)) or None
BODY_TIMEOUT = 60.0
# run as a script in isolated mode: only the standard library on its path, whatever the cwd
WORKER = [sys.executable, "-I", str(Path(__file__).with_name("json_worker.py"))]

log = logging.getLogger("vllm_emulator.server")


class UndecodableBody(Exception):
    """A body json.loads refuses. `position` is set when it is not JSON (a JSONDecodeError, whose
    `msg` is the message); otherwise (invalid UTF-8, too deep, too many digits) it is None."""

    def __init__(self, message: str, position: int | None = None, text: str | None = None) -> None:
        super().__init__(text or message)
        self.message = message
        self.position = position


class BodyDecoder:
    """Reads and decodes request bodies; owns the worker process (started on the first large body)."""

    def __init__(self) -> None:
        self._worker: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()  # one body at a time through the worker's pipe

    async def read(self, request: web.Request, fields: Collection[str] | None = None) -> Any:
        """The JSON value of the request's body; a large object keeps only `fields` (all when None).
        Raises UndecodableBody, or aiohttp's 413 / 408."""
        try:
            result = await asyncio.wait_for(self._read(request, fields), BODY_TIMEOUT)
        except asyncio.TimeoutError:
            raise web.HTTPRequestTimeout(text=f"The request body did not arrive within {BODY_TIMEOUT:g} s") from None
        if result[0] == "ok":
            return result[1]
        raise UndecodableBody(*result[1:])

    async def _read(self, request: web.Request, fields: Collection[str] | None) -> tuple:
        chunks: list[bytes] = []
        size = 0
        stream = request.content
        while chunk := await stream.readany():
            size += len(chunk)
            if MAX_BODY_BYTES is not None and size > MAX_BODY_BYTES:
                raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY_BYTES, actual_size=size)
            chunks.append(chunk)
            if size > INLINE_BYTES:
                return await self._decode_in_worker(chunks, stream, size, None if fields is None else sorted(fields))
        return decode(b"".join(chunks))

    async def _decode_in_worker(self, chunks: list[bytes], stream, size: int, fields: list[str] | None) -> tuple:
        async with self._lock:
            try:
                worker = await self._started()
                names = json.dumps(fields).encode()
                pipe = worker.stdin
                pipe.write(CHUNK.pack(len(names)) + names)
                for chunk in chunks:
                    pipe.write(CHUNK.pack(len(chunk)) + chunk)
                chunks.clear()
                while chunk := await stream.readany():
                    size += len(chunk)
                    if MAX_BODY_BYTES is not None and size > MAX_BODY_BYTES:
                        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY_BYTES, actual_size=size)
                    pipe.write(CHUNK.pack(len(chunk)) + chunk)
                    await pipe.drain()
                pipe.write(CHUNK.pack(0))
                await pipe.drain()
                answer_size, = ANSWER.unpack(await worker.stdout.readexactly(ANSWER.size))
                return pickle.loads(await worker.stdout.readexactly(answer_size))
            except (OSError, asyncio.IncompleteReadError):  # the worker died (out of memory, say)
                log.warning("the body decoder process died; starting another")
                await self.close()
                return "error", "the body could not be decoded", None, None
            except (asyncio.CancelledError, web.HTTPException):  # the pipe is left mid-request
                await asyncio.shield(self.close())
                raise

    async def _started(self) -> asyncio.subprocess.Process:
        if self._worker is None or self._worker.returncode is not None:
            self._worker = await asyncio.create_subprocess_exec(
                *WORKER, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        return self._worker

    async def close(self) -> None:
        """Stop the worker, if one runs."""
        worker, self._worker = self._worker, None
        if worker is not None:
            if worker.returncode is None:
                worker.kill()
            await worker.wait()
