"""One API request in flight: its engine requests (choices) and where their tokens go.

A completion with several prompts or `n > 1`, like a chat with `n > 1`, becomes several
engine requests (vLLM's child requests); each is a `Choice`. The engine client calls
`on_tokens` from the step listener when a choice got tokens and `on_finish` when it
ended; a streaming job writes the chunk right away through its `ChunkFormat` and
channel, a non-streaming one only waits for the last choice. A choice that ends without a
token (aborted: at shutdown, by /sleep) still gets its terminal chunk, as vLLM sends one
with `finish_reason: "abort"`.
"""
from __future__ import annotations

import asyncio
from typing import Protocol

from emulator.request import Request
from server.generation import PlannedOutput
from server.sse import DONE, SSEChannel


class Choice:
    __slots__ = ("index", "prompt_index", "request", "plan", "num_produced", "num_sent", "finish_reason",
                 "stop_reason", "job", "final_sent")

    def __init__(self, index: int, prompt_index: int, plan: PlannedOutput, job: Job) -> None:
        self.index = index                # the `index` of the choice in the response
        self.prompt_index = prompt_index
        self.request: Request | None = None
        self.plan = plan
        self.num_produced = 0             # output tokens the engine's finished steps have produced
        self.num_sent = 0                 # output tokens already written to the client
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.job: Job | None = job       # cleared when the choice ends (no Choice-Job reference cycle)
        self.final_sent = False           # the chunk with its finish_reason has been written

    def settle(self, request: Request) -> None:
        """Record how the engine ended this choice, with the stop reason the plan knew of."""
        reason = request.finish_reason
        if reason == "length" and self.plan.ends_with_stop and request.num_output_tokens == self.plan.length:
            reason = "stop"  # a stop string or token at max_tokens wins, as in vLLM's detokenizer
        self.finish_reason = reason
        self.stop_reason = self.plan.stop_reason if reason == "stop" else None


class ChunkFormat(Protocol):
    """How an endpoint spells its stream."""

    def first_output(self, job: Job) -> bytes: ...

    def tokens(self, job: Job, choice: Choice, end: int, last: bool) -> bytes: ...

    def usage(self, job: Job) -> bytes: ...


class Job:
    def __init__(self, prompts: list[list[int]], channel: SSEChannel | None = None,
                 chunk_format: ChunkFormat | None = None, stream_interval: int = 1) -> None:
        self.prompts = prompts
        self.stream_interval = stream_interval  # tokens per chunk, but the first and last go at once
        self.choices: list[Choice] = []
        self.channel = channel
        self.format = chunk_format
        self.started = False              # the first engine output arrived
        self.remaining = 0
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()

    def add_choice(self, choice: Choice) -> None:
        self.choices.append(choice)
        self.remaining += 1

    # -- from the engine ----------------------------------------------------------------
    def on_tokens(self, choice: Choice, request: Request) -> None:
        """One more token for `choice` (counted per step: a run of steps reported at once
        has already advanced the request to its last step)."""
        end = choice.num_produced
        if request.is_finished and end == request.num_output_tokens:
            choice.settle(request)
        channel = self.channel
        if channel is None:
            return
        if not self.started:
            self.started = True
            head = self.format.first_output(self)
            if head:
                channel.send(head)
        if choice.finish_reason is None and choice.num_sent and (
                end - choice.num_sent < self.stream_interval or channel.congested):
            return  # held back: sent merged with the next tokens (the client is slow, or --stream-interval)
        last = choice.finish_reason is not None
        channel.send(self.format.tokens(self, choice, end, last))
        choice.num_sent = end
        choice.final_sent = last

    def on_finish(self, choice: Choice, request: Request) -> None:
        if choice.finish_reason is None:
            choice.settle(request)
        if self.channel is not None and not choice.final_sent:  # ended with no token: aborted
            if not self.started:
                self.started = True
                head = self.format.first_output(self)
                if head:
                    self.channel.send(head)
            self.channel.send(self.format.tokens(self, choice, choice.num_produced, True))
            choice.num_sent = choice.num_produced
            choice.final_sent = True
        self.remaining -= 1
        if self.remaining == 0 and not self.done.done():
            self.done.set_result(None)

    async def wait(self) -> None:
        """Until every choice has ended (at once for a request with no prompts)."""
        if self.remaining:
            await self.done

    # -- to the client --------------------------------------------------------------------
    def finish_stream(self) -> None:
        """The end of a stream: the usage chunk if asked for, then [DONE]."""
        usage = self.format.usage(self)
        self.channel.send(usage + DONE if usage else DONE)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_output_tokens(self) -> int:
        return sum(c.request.num_output_tokens for c in self.choices if c.request is not None)

    @property
    def num_cached_tokens(self) -> int | None:
        first = self.choices[0].request if self.choices else None
        return None if first is None else max(first.num_cached_tokens, 0)
