"""The engine loop: when each step is scheduled, and when its output comes back.

It follows vLLM's `EngineCore`: with async scheduling (the default) a batch
queue two deep lets the scheduler plan step k+1 while step k runs on the GPU, so
a request that arrives during step k is first scheduled after step k ends and
runs in step k+2; without it, schedule, execute and update alternate. Time
advances by each step's priced time: the GPU's, or the host's where that is
longer (async scheduling hides the rest) or adds to it (without: CostModel.with_host).

One loop drives one engine, or the data-parallel engines of an MoE model in
lockstep: their MoE layers exchange tokens every step, so every engine executes
each forward together (an idle one runs a dummy batch) and a step lasts as long
as the slowest engine plus the MoE exchange (`cost_model.group_step_time`).

With pipeline parallelism a batch passes through the stages in turn, each a GPU of its own, handing its
activations on (`cost_model.stage_transfer`); the next batch enters the first stage as soon as it is free.
vLLM 0.33's V2 model runner keeps async scheduling there, with a batch queue of PP + 1, and a request
decodes at most once every PP schedule() calls (emulator.scheduler's decode stagger); calls that schedule
nothing fill the queue too, as vLLM's `step_with_batch_queue` makes them, since they count. A decode
scheduled before its last token is back enters the first stage once that token has left the last. Its V1 runner
(no async scheduling) keeps a queue of PP, and a request's next step waits for its output to come back
from the last stage. Runs of decode steps are not taken in bulk then (the loop steps one at a time).

A step reads as schedule -> execute (priced) -> process the output; runs of identical
decode steps are planned and applied in one go (emulator.decode_run). Offline (`lazy`), a
planned run is kept pending until the loop's next own event or until the simulation needs the
engine's state at some time (`settle`: an arrival routed to it), and only the steps decided
before then are applied: a loop need not stop at every arrival in the cluster.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from emulator.cost.base import CostModel
from emulator.decode_run import DecodeRun, plan_decode_run
from emulator.engine import Engine, RunRecord, StepRecord
from emulator.scheduler import SchedulerOutput

Report = Callable[[StepRecord | RunRecord], None]


@dataclass
class _Batch:
    outs: list[SchedulerOutput]  # one per engine
    start: float
    end: float


class EngineLoop:
    def __init__(self, engines: list[Engine], cost_model: CostModel, async_scheduling: bool,
                 decode_runs: bool = True) -> None:
        self.engines = engines
        self.stages = cost_model.pipeline_stages
        # see decode_run; same results either way
        self.decode_runs = decode_runs and len(engines) == 1 and self.stages == 1
        self.cost_model = cost_model
        # vLLM's max_concurrent_batches
        self.queue_depth = (self.stages + (1 if async_scheduling else 0) if self.stages > 1
                            else 2 if async_scheduling else 1)
        self.staggered = async_scheduling and self.stages > 1  # see the module docstring
        self.in_flight: deque[_Batch] = deque()
        self.stage_free_at = [0.0] * self.stages  # when each pipeline stage's GPU finishes its batches
        self.gpu_free_at = 0.0  # when the first stage can take the next batch
        self.last_step_duration = 0.0
        self.wake_at: float | None = None  # when the loop must run next; None = waits for input
        self.waits_on_store = False  # wake_at is an offload store's end only: input may wake it sooner
        self.stores_due: float | None = None  # offline, the first idle wake it left out (see _wait_for_stores)
        self.blocked = False  # waiting on the oldest batch in flight
        self.pending: DecodeRun | None = None  # a planned decode run not applied yet (lazy runs only)
        # vLLM's pause states: None, "new" (running requests go on, nothing is admitted),
        # "all" (nothing is scheduled). New arrivals wait in the inbox until resumed.
        self.paused: str | None = None

    def pause(self, state: str) -> None:
        if state not in ("new", "all"):
            raise ValueError(f"pause state must be 'new' or 'all'; got {state!r}")
        self.paused = state

    def resume(self, now: float) -> None:
        self.paused = None
        self.wake(now)

    def reset(self, now: float) -> None:
        """Its engines failed: the batches on the GPU are lost; the loop waits for input."""
        self.in_flight.clear()
        self.pending = None
        self.blocked = False
        self.wake_at = None
        self.stores_due = None  # (its engines' offloads are cleared with them)
        self.gpu_free_at = now
        self.stage_free_at = [now] * self.stages

    def wake(self, now: float) -> None:
        """New input: an idle loop runs now; a busy one takes it when it next comes round."""
        if self.wake_at is None or (self.waits_on_store and now < self.wake_at):
            self.wake_at = now

    @property
    def is_idle(self) -> bool:
        return not self.in_flight and self.pending is None and all(e.is_idle for e in self.engines)

    def settle(self, until: float, report: Report) -> None:
        """Apply the pending run's steps scheduled before `until`, so the engine's state is its state
        then (something arriving at `until` joins the batch after them)."""
        if self.pending is not None:
            run, self.pending = self.pending.truncated(until), None
            if run.k == 0:  # nothing was decided before `until`: the loop is back where it planned
                self.blocked = False
                self.wake_at = run.now
                return
            self._apply(run, report)

    def run(self, now: float, horizon: float = float("inf"), report: Report | None = None,
            lazy: bool = False) -> list[StepRecord | RunRecord]:
        """Run the loop at virtual time `now` until it blocks; return the records of the steps that finished.

        `horizon` is the time of the next event outside this loop (an arrival, a cluster event):
        decisions before it may be taken in bulk (see decode_run). `report`, if given, gets each
        record at once, before the next step is scheduled (a server delivers its tokens without
        waiting for the scheduler). `lazy`: keep a planned decode run pending (see `settle`).
        """
        records: list[StepRecord | RunRecord] = []
        emit = report or records.append
        self.waits_on_store = False
        if self.stores_due is not None:  # the idle wakes it left out before now come first (this run is now's)
            self.catch_up(now)
            self.stores_due = None
        if self.pending is not None:  # its own end has come: all of it happened
            self.settle(float("inf"), emit)
        while True:
            if self.blocked:  # waiting on the oldest batch in flight
                oldest = self.in_flight[-1]
                if oldest.end > now:
                    self.wake_at = oldest.end
                    return records
                self._process_output(self.in_flight.pop(), emit)
                continue  # back to the top: take inputs, then schedule
            # paused for new requests, an engine still steps for those running or waiting with KV blocks held
            if self.paused == "all" or (self.paused == "new" and not any(
                    e.scheduler.running or e.scheduler.waiting.holding for e in self.engines)):
                if self.in_flight:
                    self.blocked = True
                    continue
                self.wake_at = None
                return records
            if self.paused is None:
                for engine in self.engines:
                    engine.take_inbox(now)
            if self.decode_runs and horizon > now and self.paused is None:
                run = plan_decode_run(self.engines[0], self.in_flight, self.gpu_free_at, self.last_step_duration,
                                      self.queue_depth, now, horizon, self.cost_model.decode_pricer)
                if run is not None:
                    if lazy:
                        self.pending = run
                        self.blocked = True
                        self.wake_at = run.ends[run.completed]  # when the oldest batch left in flight ends
                        return records
                    self._apply(run, emit)
                    continue
            if any(e.scheduler.has_unfinished_requests() for e in self.engines):
                executed = self._schedule_and_execute(now)
                if executed is None:  # the end of a KV transfer wakes it, or that of an offload store
                    self._wait_for_stores(now)
                    return records
                if executed:
                    continue  # fill the batch queue before waiting on a result
            elif not self.in_flight:
                self._wait_for_stores(now, idle=lazy)
                return records
            self.blocked = True

    def _wait_for_stores(self, now: float, idle: bool = False) -> None:
        """Nothing runs: vLLM's engine steps on while offload store jobs are pending; wake at the next one's end.

        `idle` (offline, nothing running or waiting): when only the engine's own schedules read its offload
        (`Offload.unwatched`), such a wake is left out (`stores_due`) and done later, in order, where something
        comes to the engine first (`catch_up`: its next run, a free, an abort, a fault), or at the simulation's
        end: it would do nothing that anything reads before then."""
        wake = self._idle_wake(now)
        if wake is not None and idle and self._unwatched():
            self.stores_due, wake = wake, None
        self.wake_at = wake
        self.waits_on_store = wake is not None

    def _idle_wake(self, now: float) -> float | None:
        """What an idle run at `now` does to the offloads (their finished requests, their jobs); returns when the
        next job in flight ends."""
        ends = [e.kv.offload.idle_until(now) for e in self.engines if e.kv.offload is not None]
        return min((t for t in ends if t is not None), default=None)

    def _unwatched(self) -> bool:
        return all(e.kv.offload.unwatched for e in self.engines if e.kv.offload is not None)

    def defer_wake(self, now: float) -> bool:
        """Offline, blocks came free outside a step: may the idle run this would wake be left out? Yes when
        nothing runs or waits and only the engines' own schedules read their offloads: the requests the free
        finished there are then taken as that run would (`stores_due`, see `_wait_for_stores`)."""
        if self.wake_at is not None or self.paused is not None or not self.is_idle or not self._unwatched():
            return False
        if any(e.kv.offload is not None for e in self.engines):
            self.stores_due = now if self.stores_due is None else min(self.stores_due, now)
        return True

    def catch_up(self, before: float = float("inf")) -> float | None:
        """Do the idle wakes it left out that came before `before`, in order: something else is about to read or
        change its engines' offloads then (events at one time go before the loops'), or, with no bound, the
        simulation ends. Returns the time of the last one done (None: none)."""
        t, last = self.stores_due, None
        while t is not None and t < before:
            last, t = t, self._idle_wake(t)
        self.stores_due = t
        return last

    def _process_output(self, batch: _Batch, emit: Callable[[StepRecord], None]) -> None:
        self.blocked = False
        for engine, out in zip(self.engines, batch.outs):
            if out:
                emit(engine.complete(out, batch.start, batch.end))

    def _schedule_and_execute(self, now: float) -> bool | None:
        """Schedule one step on every engine and put it on the GPU; True if the batch queue has room
        for another before a result is needed; None if nothing can run until KV comes from outside."""
        admit = self.paused is None
        outs = [e.scheduler.schedule(now, admit) if e.scheduler.has_unfinished_requests() else SchedulerOutput()
                for e in self.engines]
        for engine, out in zip(self.engines, outs):
            if out.kv_loads:
                engine.started_loads.extend((r, hit, n, now) for r, hit, n in out.kv_loads)
            if out.kv_unread:
                engine.unread_sources.extend(out.kv_unread)
        executed = any(outs)
        if not executed and not any(any(b.outs) for b in self.in_flight):
            if any(e.awaits_kv for e in self.engines):
                return None  # nothing can run until KV comes in (or held blocks are read and freed)
            stuck = next((e for e in self.engines if e.scheduler.has_unfinished_requests()), self.engines[0])
            raise RuntimeError(
                f"engine {stuck.index}: {len(stuck.scheduler.waiting)} waiting and {len(stuck.scheduler.running)} "
                f"running requests can never be scheduled ({stuck.kv.num_free_blocks} of {stuck.num_gpu_blocks} KV "
                f"blocks free; a request longer than max_model_len={stuck.config.max_model_len} never fits)")
        start = max(now, self.gpu_free_at)
        if self.staggered and executed:
            start = max(start, self._sampled_in_flight(outs))
        duration = self._price(outs)
        end = start + duration if self.stages == 1 else self._through_stages(start, duration, outs)
        self.gpu_free_at = end if self.stages == 1 else self.stage_free_at[0]
        self.last_step_duration = end - start
        self.in_flight.appendleft(_Batch(outs, start, end))
        return (executed or self.staggered) and len(self.in_flight) < self.queue_depth and self.in_flight[-1].end > now

    def _sampled_in_flight(self, outs: list[SchedulerOutput]) -> float:
        """When the tokens a new batch's decodes feed on are back: the end of the newest batch in flight in
        which one of its requests sampled (async scheduling with PP schedules a request again before its
        token has left the last stage; vLLM's V2 runner hands it to the first stage, which waits for it)."""
        for batch in self.in_flight:  # newest first; they end in order
            if any(not out.sampling.isdisjoint(new.num_scheduled_tokens) for out, new in zip(batch.outs, outs)):
                return batch.end
        return 0.0

    def _apply(self, run: DecodeRun, emit: Report) -> None:
        """Apply a decode run: the engine's requests and blocks, then the batches left on the GPU."""
        keep_b0 = run.async_ and run.completed == 0  # b0's output is not back yet: it stays in flight as it is
        first = self.in_flight.pop().outs[0] if run.async_ and not keep_b0 else None
        records = self.engines[0].apply_decode_run(run, first)
        if not keep_b0:
            self.in_flight.clear()
        for out, start, end in run.left_in_flight()[1 if keep_b0 else 0:]:
            self.in_flight.appendleft(_Batch([out], start, end))
        self.gpu_free_at = run.ends[-1]
        self.blocked = True
        self.wake_at = self.in_flight[-1].end
        for record in records:
            emit(record)

    def _through_stages(self, start: float, duration: float, outs: list[SchedulerOutput]) -> float:
        """Lay a batch through the pipeline from `start`: each stage takes it when its GPU is free, for its
        share of the step (`cost_model.stage_seconds`), then hands it on; returns when it leaves the last
        stage (an empty batch runs nothing and comes back behind the batches before it)."""
        if not duration:
            return max(start, self.stage_free_at[-1])
        first, middle, last = self.cost_model.stage_seconds(duration, max(out.shape.num_reqs for out in outs if out))
        transfer = self.cost_model.stage_transfer(max(out.total_num_scheduled_tokens for out in outs))
        t = start
        for i, free_at in enumerate(self.stage_free_at):
            t = max(t, free_at) + (first if i == 0 else last if i == self.stages - 1 else middle)
            self.stage_free_at[i] = t
            if i < self.stages - 1:
                t += transfer
        return t

    def _price(self, outs: list[SchedulerOutput]) -> float:
        if len(outs) == 1:
            return self.cost_model.step_time(outs[0].shape) if outs[0] else 0.0
        if not any(outs):
            return 0.0
        return self.cost_model.group_step_time([out.shape if out else None for out in outs])
