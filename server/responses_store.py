"""What a vLLM 0.33 server keeps of its Responses API requests, per port, in memory.

vLLM stores nothing unless the server starts with VLLM_ENABLE_RESPONSES_API_STORE=1 (a request's
`store: true`, the OpenAI default, is then silently ignored): with it, every request with `store`
keeps its input messages and its final response (GET /v1/responses/{id}, `previous_response_id`),
and `background` requests run detached from their client, the stream's events kept for readers
(GET ?stream=true&starting_after=N). As in vLLM nothing is ever evicted (vLLM warns of the leak).
"""
from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator

from aiohttp import web

log = logging.getLogger("vllm_emulator.server")

TERMINAL_EVENTS = (b"event: response.completed\n", b"event: response.incomplete\n")


def store_enabled() -> bool:
    """vLLM's envs.VLLM_ENABLE_RESPONSES_API_STORE: bool(int(value)), "0" by default."""
    value = os.environ.get("VLLM_ENABLE_RESPONSES_API_STORE", "0")
    try:
        return bool(int(value))
    except ValueError:
        raise ValueError(f"VLLM_ENABLE_RESPONSES_API_STORE={value!r}: vLLM reads it as an integer (1 keeps "
                         "Responses API requests, 0 does not)") from None


class EventLog:
    """A background stream's events, kept for every reader: it stands where a client's SSEChannel
    would (server/jobs.py writes to it), splits what it is sent into events (an SSE event ends with
    a blank line, which no event's JSON contains) and wakes the readers."""

    def __init__(self) -> None:
        self.events: list[bytes] = []
        self.closed = False
        self._queued: list[bytes] = []
        self._changed = asyncio.Event()

    # -- the SSEChannel side ------------------------------------------------------------------
    congested = False
    response = None

    async def open(self) -> None:
        pass

    def queue(self, data: bytes) -> None:
        self._queued.append(data)

    def flush(self) -> None:
        queued, self._queued = self._queued, []
        self.send(b"".join(queued))

    def send(self, data: bytes) -> None:
        if data and not self.closed:  # (a cancelled stream's abort is delivered after its log closed)
            self.events.extend(e + b"\n\n" for e in data.split(b"\n\n") if e)
            self._changed.set()

    async def close(self) -> None:
        self.closed = True
        self._changed.set()

    # -- readers -----------------------------------------------------------------------------
    async def replay(self, starting_after: int | None) -> AsyncIterator[bytes]:
        """The events after sequence number `starting_after` (all without it), as they come, to the
        terminal one (or to the end of a stream cut short: cancelled or failed)."""
        index = 0 if starting_after is None else starting_after + 1
        while True:
            while index < len(self.events):
                event = self.events[index]
                index += 1
                yield event
                if event.startswith(TERMINAL_EVENTS):
                    return
            if self.closed:
                return
            self._changed.clear()
            await self._changed.wait()


class ResponseStore:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.responses: dict[str, dict] = {}          # response id -> its response object
        # response id -> its request's input messages (a gpt-oss model's: its Harmony messages, output included)
        self.messages: dict[str, list] = {}
        self.tasks: dict[str, asyncio.Task] = {}      # background responses still running
        self.event_logs: dict[str, EventLog] = {}     # background streams' events
        if enabled:
            log.warning("`VLLM_ENABLE_RESPONSES_API_STORE` is enabled. This may cause a memory leak since we never "
                        "remove responses from the store.")

    def run_in_background(self, response_id: str, work) -> None:
        """Run `work` (a coroutine) detached from the request that started it."""
        task = asyncio.ensure_future(work)
        self.tasks[response_id] = task
        task.add_done_callback(lambda _: self.tasks.pop(response_id, None))

    async def cancel_all(self, app: web.Application) -> None:
        """At shutdown: stop the background responses still running (their requests are aborted)."""
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
