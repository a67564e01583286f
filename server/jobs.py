"""One API request in flight: its engine requests (choices) and where their tokens go.

A completion with several prompts or `n > 1`, like a chat with `n > 1`, becomes several
engine requests (vLLM's child requests); each is a `Choice`. The engine client calls
`note` from the step listener when a choice got tokens and `on_finish` when it
ended; a streaming job notes the choice and, when the engine client delivers (after the
core has advanced to the present), writes the chunks of every noted choice in one write
to its channel: a chunk per token, or, when the delivery is late (the server fell behind)
or the client does not read, one chunk with every token since the choice's last one, as
vLLM's output collector merges what a slow consumer has not yet taken. A non-streaming
job only waits for its last choice. A choice that ends without a token (aborted: at shutdown, by /sleep)
still gets its terminal chunk, as vLLM sends one with `finish_reason: "abort"`.
"""
from __future__ import annotations

import asyncio
from typing import Protocol

from emulator.request import Request
from server.errors import APIError, internal_error, streaming_error
from server.generation import PlannedOutput
from server.sse import DONE, SSEChannel


class Choice:
    __slots__ = ("index", "prompt_index", "request", "plan", "num_produced", "num_sent", "finish_reason",
                 "stop_reason", "job", "final_sent", "noted", "backlog", "kv_transfer_params", "client_request_id")

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
        self.noted = False                # waits in its job's list for the next delivery
        self.backlog = None               # the instance counts that hold it (EngineClient's Backlog)
        self.kv_transfer_params: dict | None = None  # a P/D prefill's params for the decode side, once ended
        self.client_request_id = ""       # its request's id as the client named it ("c_<id>" with n > 1)

    def settle(self, request: Request) -> None:
        """Record how the engine ended this choice, with the stop reason the plan knew of."""
        reason = request.finish_reason
        if reason == "length" and self.plan.ends_with_stop and request.num_output_tokens == self.plan.length:
            reason = "stop"  # a stop string or token at max_tokens wins, as in vLLM's detokenizer
        self.finish_reason = reason
        self.stop_reason = self.plan.stop_reason if reason == "stop" else None


class ChunkFormat(Protocol):
    """How an endpoint spells its stream. A format that subclasses it ends the stream as the OpenAI APIs do
    (`closing`, `failure`); one that ends otherwise (Anthropic's Messages API) overrides them."""

    def first_output(self, job: Job) -> bytes: ...

    def tokens(self, job: Job, choice: Choice, end: int, last: bool) -> bytes: ...

    def usage(self, job: Job) -> bytes: ...

    def closing(self, job: Job) -> bytes:
        """The end of the stream: the usage chunk if asked for, then [DONE] (only [DONE] after an error)."""
        return (b"" if job.failed else self.usage(job)) + DONE

    def failure(self, error: APIError) -> bytes:
        """The event that ends a stream whose request failed (vLLM's GenerationError)."""
        return streaming_error(error)

    def logged_output(self, choice: Choice, text: str) -> str:
        """What --enable-log-outputs logs for a whole response's choice whose output is `text`."""
        return text

    def logged_delta(self, text: str) -> str:
        """What --enable-log-outputs logs for the chunk just made (`tokens`) of new output `text`."""
        return text


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
        self.noted: list[Choice] = []     # choices with something to write at the next delivery
        self.kv_transfer_params: dict | None = None  # those of its first prompt (vLLM's response has them)
        self.failed = False  # a choice failed (its instance went down): the stream ended with vLLM's error
        self.error: APIError | None = None  # what a failed choice answers, if not vLLM's 500 (a P/D pod's 404)
        self.prefill_answer: asyncio.Future | None = None  # awaited: its P/D prefill pod's answer (prefill_answered)

    def add_choice(self, choice: Choice) -> None:
        self.choices.append(choice)
        self.remaining += 1

    # -- from the engine ----------------------------------------------------------------
    def note(self, choice: Choice) -> bool:
        """`choice` has new tokens to write at the next delivery (the engine client counts them in
        `num_produced`; an ending is known by then: the finish listeners run before deliveries).
        True if the job has just become one to deliver (it had nothing noted)."""
        if self.channel is None or choice.noted:
            return False
        choice.noted = True
        self.noted.append(choice)
        return len(self.noted) == 1

    def prefill_answered(self, ok: bool) -> None:
        """The P/D prefill pod the cluster's proxy sent the job to has answered: `ok`, with a 200 (its requests
        go on to a decode pod, or an abort ended them there: vLLM's route answers an aborted request with its
        body); else with an error status, which the proxy passes on."""
        if self.prefill_answer is not None and not self.prefill_answer.done():
            self.prefill_answer.set_result(ok)

    def on_finish(self, choice: Choice, request: Request) -> bool:
        """`choice` ended (finished, stopped or aborted); True as for `note`."""
        choice.settle(request)
        self.prefill_answered(choice.finish_reason != "error")
        self.remaining -= 1
        if self.remaining == 0 and not self.done.done():
            self.done.set_result(None)  # its waiter runs after this delivery: the last chunk goes first
        return self.note(choice)

    # -- to the client --------------------------------------------------------------------
    def deliver(self, late: bool) -> None:
        """Write the chunks of every noted choice, in one write: one per token, or, `late` or to a
        client that does not read, one with all its tokens since its last chunk."""
        channel, fmt = self.channel, self.format
        if not self.started:
            self.started = True
            head = fmt.first_output(self)
            if head:
                channel.queue(head)
        congested = channel.congested
        merge = late or congested
        for choice in self.noted:
            choice.noted = False
            if self.failed or choice.finish_reason == "error":  # vLLM's GenerationError ends the stream
                if not self.failed:
                    self.failed = True
                    channel.queue(fmt.failure(self.error or internal_error()))
                choice.final_sent = True
                continue
            start, end, last = choice.num_sent, choice.num_produced, choice.finish_reason is not None
            if not last and start and (end - start < self.stream_interval or congested):
                continue  # held back: sent merged with later tokens (the client is slow, or --stream-interval)
            step = max(end - start, 1) if merge or self.stream_interval > 1 else 1
            for upto in range(min(start + step, end), end, step):  # every chunk but the last
                channel.queue(fmt.tokens(self, choice, upto, False))
                choice.num_sent = upto
            channel.queue(fmt.tokens(self, choice, end, last))
            choice.num_sent = end
            choice.final_sent = last
        self.noted.clear()
        channel.flush()

    async def wait_for_prefill_answer(self) -> bool:
        """Until the P/D prefill pod has answered for the job (call while its requests are with that pod): True
        if its requests went on to a decode pod."""
        self.prefill_answer = asyncio.get_running_loop().create_future()
        return await self.prefill_answer

    async def wait(self) -> None:
        """Until every choice has ended (at once for a request with no prompts)."""
        if self.remaining:
            await self.done

    def finish_stream(self) -> None:
        """The end of a stream, as its format closes it."""
        self.channel.send(self.format.closing(self))

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_output_tokens(self) -> int:
        return sum(c.request.num_output_tokens for c in self.choices if c.request is not None)

    @property
    def num_cached_tokens(self) -> int | None:
        """vLLM's usage prompt_tokens_details.cached_tokens (its first request's): the prompt tokens not
        computed (local prefix hits, KV loaded), or on a P/D decode side those its prefill did not compute."""
        first = self.choices[0].request if self.choices else None
        if first is None:
            return None
        return first.num_cached_tokens_reported
