"""One serving instance: a vLLM engine core's scheduler and KV cache (one DP rank).

The instance holds the requests and their state; `engine_loop.EngineLoop` decides
when it schedules and how long each step takes.
"""
from __future__ import annotations

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
    num_prompt_tokens: int  # prompt tokens (less prefix hits) of the requests whose first token came now
    got_token: list[Request] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)
    # the engine's state once this step's output is processed
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0

    @property
    def end(self) -> float:
        return self.start + self.duration


class Instance:
    def __init__(self, index: int, config: EngineConfig, num_gpu_blocks: int) -> None:
        self.index = index
        self.config = config
        self.num_gpu_blocks = num_gpu_blocks
        self.kv = KVCacheManager(num_gpu_blocks, config.block_size, enable_caching=config.enable_prefix_caching,
                                 max_model_len=config.max_model_len, watermark=config.watermark)
        self.scheduler = Scheduler(config, self.kv)
        self.inbox: list[Request] = []  # arrived, not yet taken in by the engine loop
        self.loop = None  # the EngineLoop driving this instance; woken on input
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
        self.loop.wake(now)

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
        return not self.inbox and not self.scheduler.has_unfinished_requests()

    # -- what the engine loop asks of a rank ---------------------------------------------
    def take_inbox(self, now: float) -> None:
        """vLLM's `_process_input_queue`: arrived requests enter the scheduler, stamped queued."""
        if self.inbox:
            for request in self.inbox:
                request.queued_time = now
                self.scheduler.add_request(request)
            self.inbox.clear()

    def complete(self, out: SchedulerOutput, start: float, end: float) -> StepRecord:
        """Process a finished step's output (vLLM `update_from_output`)."""
        got_token, finished, prefilled = self.scheduler.update_from_output(out, end)
        self.num_steps += 1
        self.busy_time += end - start
        return StepRecord(self.index, self.num_steps, start, end - start, out.num_scheduled_tokens, out.preempted,
                          out.cached_tokens, prefilled, got_token, finished,
                          self.num_running, self.num_waiting, self.kv.usage)
