"""Reading a request's JSON body without stalling everyone else's streams.

A small body is decoded on the event loop. A large one (over `INLINE_BYTES`) is decoded in a
worker process that keeps only the top-level fields the endpoint knows (vLLM accepts unknown
fields and ignores them): json.loads holds the GIL, so decoding tens of megabytes here would
freeze every stream for seconds, and a big array in an unknown field would leave hundreds of
megabytes of Python objects behind.

A body json.loads refuses raises UndecodableBody; the endpoints answer it as vLLM does
(`Serving.read_json`: FastAPI's body errors).
"""
from __future__ import annotations

import asyncio
import json
import multiprocessing
from collections.abc import Collection
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

INLINE_BYTES = 1 << 20  # decoded on the loop: ~10 ms of json.loads at most


class UndecodableBody(Exception):
    """A body json.loads refuses. `position` is set when it is not JSON (a JSONDecodeError, whose
    `msg` is the message); otherwise (invalid UTF-8, too deep, too many digits) it is None."""

    def __init__(self, message: str, position: int | None = None, text: str | None = None) -> None:
        super().__init__(text or message)
        self.message = message
        self.position = position


def decode(body: bytes, keep: frozenset[str] | None = None) -> tuple:
    """("ok", value) with only the `keep` fields of a top-level object, or ("error", message,
    position, text) as UndecodableBody takes them. Runs in the worker for large bodies, so it
    raises nothing."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError as exc:
        return "error", exc.msg, exc.pos, str(exc)
    except (ValueError, RecursionError) as exc:
        return "error", str(exc), None, None
    if keep is not None and isinstance(value, dict):
        value = {k: v for k, v in value.items() if k in keep}
    return "ok", value


class BodyDecoder:
    """Decodes request bodies; owns the worker process (started on the first large body)."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None

    async def decode(self, body: bytes, fields: Collection[str] | None = None) -> Any:
        """The JSON value of `body`; a large object keeps only `fields` (all when None).
        Raises UndecodableBody."""
        if len(body) <= INLINE_BYTES:
            result = decode(body)
        else:
            result = await self._decode_in_worker(body, None if fields is None else frozenset(fields))
        if result[0] == "ok":
            return result[1]
        raise UndecodableBody(*result[1:])

    async def _decode_in_worker(self, body: bytes, keep: frozenset[str] | None) -> tuple:
        if self._pool is None:
            # spawn, not fork: a fork would copy the server's heap and whatever its threads hold
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, decode, body, keep)
        except BrokenProcessPool:  # the worker died (out of memory, say): a fresh one next time
            self._pool = None
            return "error", "the body could not be decoded", None, None
        except Exception as exc:  # the value could not be sent back (nested too deep to pickle)
            return "error", str(exc), None, None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
