"""The engine loop: when each step is scheduled, and when its output comes back.

It follows vLLM's `EngineCore`: with async scheduling (the default) a batch
queue two deep lets the scheduler plan step k+1 while step k runs on the GPU, so
a request that arrives during step k is first scheduled after step k ends and
runs in step k+2; without it, schedule, execute and update alternate. CPU work
is taken as hidden behind the GPU (what async scheduling is for), so time only
advances by the priced GPU time of each step.

One loop drives one instance, or the data-parallel ranks of an MoE model in
lockstep: their MoE layers exchange tokens every step, so every rank executes
each forward together (an idle rank runs a dummy batch) and a step lasts as long
as the slowest rank plus the MoE exchange (`cost_model.group_step_time`).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from emulator.decode_run import decode_run
from emulator.instance import Instance, StepRecord
from emulator.scheduler import SchedulerOutput


@dataclass
class _Batch:
    outs: list[SchedulerOutput]  # one per rank
    start: float
    end: float


class EngineLoop:
    def __init__(self, ranks: list[Instance], cost_model, async_scheduling: bool, decode_runs: bool = True) -> None:
        self.ranks = ranks
        self.decode_runs = decode_runs and len(ranks) == 1  # see decode_run; same results either way
        self.cost_model = cost_model
        self.queue_depth = 2 if async_scheduling else 1
        self.in_flight: deque[_Batch] = deque()
        self.gpu_free_at = 0.0
        self.last_step_duration = 0.0
        self.wake_at: float | None = None  # when the loop must run next; None = waits for input
        self.blocked = False  # waiting on the oldest batch in flight
        # vLLM's pause states: None, "new" (running requests go on, nothing is admitted),
        # "all" (nothing is scheduled). New arrivals wait in the inbox until resumed.
        self.paused: str | None = None
        for rank in ranks:
            rank.loop = self

    def pause(self, state: str) -> None:
        if state not in ("new", "all"):
            raise ValueError(f"pause state must be 'new' or 'all'; got {state!r}")
        self.paused = state

    def resume(self, now: float) -> None:
        self.paused = None
        self.wake(now)

    def wake(self, now: float) -> None:
        """New input: an idle loop runs now; a busy one takes it when it next comes round."""
        if self.wake_at is None:
            self.wake_at = now

    @property
    def is_idle(self) -> bool:
        return not self.in_flight and all(r.is_idle for r in self.ranks)

    def make_batch(self, out: SchedulerOutput, start: float, end: float) -> _Batch:
        return _Batch([out], start, end)

    def run(self, now: float, horizon: float = float("inf"),
            report: Callable[[StepRecord], None] | None = None) -> list[StepRecord]:
        """Run the loop at virtual time `now` until it blocks; return the steps that finished.

        `horizon` is the time of the next event outside this loop (an arrival, another
        engine's step): decisions before it may be taken in bulk (see decode_run).
        `report`, if given, gets each finished step at once, before the next step is
        scheduled (a server delivers its tokens without waiting for the scheduler).
        """
        records: list[StepRecord] = []
        emit = report or records.append
        ranks = self.ranks
        while True:
            if self.blocked:
                oldest = self.in_flight[-1]
                if oldest.end > now:
                    self.wake_at = oldest.end
                    return records
                self.in_flight.pop()
                self.blocked = False
                for rank, out in zip(ranks, oldest.outs):
                    if out:
                        emit(rank.complete(out, oldest.start, oldest.end))
                continue  # back to the top: take inputs, then schedule
            if self.paused == "all" or (self.paused == "new" and not any(r.scheduler.running for r in ranks)):
                if self.in_flight:
                    self.blocked = True
                    continue
                self.wake_at = None
                return records
            if self.paused is None:
                for rank in ranks:
                    rank.take_inbox(now)
            if self.decode_runs and horizon > now and self.paused is None:
                run = decode_run(self, now, horizon)
                if run is not None:
                    for record in run:
                        emit(record)
                    self.blocked = True
                    continue
            if any(r.scheduler.has_unfinished_requests() for r in ranks):
                admit = self.paused is None
                outs = [r.scheduler.schedule(now, admit) if r.scheduler.has_unfinished_requests() else SchedulerOutput()
                        for r in ranks]
                executed = any(outs)
                if not executed and not any(any(b.outs) for b in self.in_flight):
                    stuck = [r for r in ranks if r.scheduler.waiting]
                    raise RuntimeError(
                        f"engine {stuck[0].index}: {len(stuck[0].scheduler.waiting)} waiting requests can never be "
                        f"scheduled ({stuck[0].kv.num_free_blocks} of {stuck[0].num_gpu_blocks} KV blocks free)")
                start = max(now, self.gpu_free_at)
                end = start + self._price(outs)
                self.gpu_free_at = end
                self.last_step_duration = end - start
                self.in_flight.appendleft(_Batch(outs, start, end))
                if executed and len(self.in_flight) < self.queue_depth and self.in_flight[-1].end > now:
                    continue  # fill the batch queue before waiting on a result
            elif not self.in_flight:
                self.wake_at = None
                return records
            self.blocked = True

    def _price(self, outs: list[SchedulerOutput]) -> float:
        if len(outs) == 1:
            return self.cost_model.step_time(outs[0].shape) if outs[0] else 0.0
        if not any(outs):
            return 0.0
        return self.cost_model.group_step_time([out.shape if out else None for out in outs])
