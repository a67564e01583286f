"""One serving instance (a vLLM engine core) stepping in virtual time.

The engine loop follows vLLM's `EngineCore`: with async scheduling (the default)
a batch queue two deep lets the scheduler plan step k+1 while step k runs on the
GPU, so a request that arrives during step k is first scheduled after step k
ends and runs in step k+2; without it, schedule, execute and update alternate.
CPU work is assumed hidden behind the GPU (async scheduling exists for that), so
time advances only by the priced GPU time of each step.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from emulator.block_hash import request_block_hashes
from emulator.config import EngineConfig
from emulator.kv_cache import KVCacheManager
from emulator.request import Request, RequestStatus
from emulator.scheduler import Scheduler, SchedulerOutput


@dataclass
class StepRecord:
    """One executed engine step, reported when its output is processed."""
    engine: int
    step: int
    start: float
    duration: float
    scheduled: dict[Request, int]
    preempted: list[Request]
    cached_tokens: dict[Request, int]
    num_prompt_tokens: int
    got_token: list[Request] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)

    @property
    def end(self) -> float:
        return self.start + self.duration


@dataclass
class _Batch:
    out: SchedulerOutput
    start: float
    end: float


class Instance:
    def __init__(self, index: int, config: EngineConfig, cost_model, num_gpu_blocks: int) -> None:
        self.index = index
        self.config = config
        self.cost_model = cost_model
        self.num_gpu_blocks = num_gpu_blocks
        self.kv = KVCacheManager(num_gpu_blocks, config.block_size, enable_caching=config.enable_prefix_caching,
                                 max_model_len=config.max_model_len, watermark=config.watermark)
        self.scheduler = Scheduler(config, self.kv)
        self.queue_depth = 2 if config.async_scheduling else 1
        self.in_flight: deque[_Batch] = deque()
        self.inbox: list[Request] = []  # arrived, not yet taken in by the engine loop
        self.gpu_free_at = 0.0
        self.wake_at: float | None = None  # when the loop must run next; None = waits for input
        self.blocked = False  # the loop waits on the oldest batch in flight
        self.num_steps = 0
        self.busy_time = 0.0

    # -- requests -------------------------------------------------------------------
    def add_request(self, request: Request, now: float) -> None:
        request.engine_index = self.index
        # The engine keeps the block hashes of a prompt, not its token ids (a long queue stays small).
        if request.block_hashes is None:
            request.block_hashes = request_block_hashes(request, self.config.block_size)
        request.prompt_token_ids = request.output_token_ids = None
        self.inbox.append(request)
        if self.wake_at is None:
            self.wake_at = now  # an idle engine wakes on input

    def abort(self, request: Request, now: float) -> bool:
        """Abort wherever the request is; False if it had already finished."""
        if request in self.inbox:  # never reached the scheduler
            self.inbox.remove(request)
            request.status = RequestStatus.FINISHED_ABORTED
            request.finish_time = now
            return True
        return self.scheduler.abort(request, now)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + len(self.inbox)

    @property
    def is_idle(self) -> bool:
        return not self.in_flight and not self.inbox and not self.scheduler.has_unfinished_requests()

    # -- the engine loop ------------------------------------------------------------
    def run(self, now: float) -> list[StepRecord]:
        """Run the engine loop at virtual time `now` until it blocks; return finished steps."""
        records = []
        scheduler = self.scheduler
        while True:
            if self.blocked:  # waiting on the oldest batch in flight
                oldest = self.in_flight[-1]
                if oldest.end > now:
                    self.wake_at = oldest.end
                    return records
                self.in_flight.pop()
                self.blocked = False
                if oldest.out:
                    records.append(self._complete(oldest))
                continue  # back to the loop: take inputs, then schedule
            if self.inbox:
                for request in self.inbox:
                    request.queued_time = now
                    scheduler.add_request(request)
                self.inbox.clear()
            if scheduler.has_unfinished_requests():
                out = scheduler.schedule(now)
                if not out and not any(b.out for b in self.in_flight):
                    raise RuntimeError(
                        f"engine {self.index}: {len(scheduler.waiting)} waiting requests can never be scheduled "
                        f"({self.kv.num_free_blocks} of {self.num_gpu_blocks} KV blocks free)")
                start = max(now, self.gpu_free_at)
                end = start + self._price(out)
                self.gpu_free_at = end
                self.in_flight.appendleft(_Batch(out, start, end))
                if out and len(self.in_flight) < self.queue_depth and self.in_flight[-1].end > now:
                    continue  # fill the batch queue before waiting on a result
            elif not self.in_flight:
                self.wake_at = None
                return records
            self.blocked = True

    def _price(self, out: SchedulerOutput) -> float:
        if not out:
            return 0.0
        return self.cost_model.step_time(out.shape)

    def _complete(self, batch: _Batch) -> StepRecord:
        got_token, finished = self.scheduler.update_from_output(batch.out, batch.end)
        self.num_steps += 1
        self.busy_time += batch.end - batch.start
        out = batch.out
        return StepRecord(self.index, self.num_steps, batch.start, batch.end - batch.start,
                          out.num_scheduled_tokens, out.preempted, out.cached_tokens, out.num_prompt_tokens,
                          got_token, finished)
