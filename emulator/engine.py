"""One engine: a vLLM engine core's scheduler and KV cache (one data-parallel rank of a deployment).

The engine holds the requests and their state; `engine_loop.EngineLoop` decides when
it schedules and how long each step takes, and `simulation.Simulation` hands it requests.
"""
from __future__ import annotations

from collections.abc import Iterator
from functools import reduce
from itertools import accumulate, chain
from operator import add, sub
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from emulator.batch import BatchShape
from emulator.block_hash import ensure_block_hashes
from emulator.config import EngineConfig
from emulator.kv_cache import PrefixLookups
from emulator.request import Request, RequestStatus
from emulator.scheduler import Scheduler, SchedulerOutput, decode_batch
from emulator.memory import KVCacheGroups
from emulator.sliding_window import kv_cache_manager

if TYPE_CHECKING:
    from emulator.decode_run import DecodeRun


@dataclass(slots=True)
class StepRecord:
    """One executed engine step, reported when its output is processed."""
    engine: int
    step: int
    start: float
    duration: float
    scheduled: dict[Request, int]
    preempted: list[Request]
    cached_tokens: dict[Request, int]
    num_prompt_tokens: int  # prompt tokens computed (less prefix hits, KV loaded) of those whose first token came now
    got_token: list[Request] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)
    # the engine's state once this step's output is processed
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    shape: BatchShape | None = None  # what the step computed (its cost depends on it)
    lookups: PrefixLookups | None = None  # prefix lookups since the engine's last record (None: none)

    @property
    def end(self) -> float:
        return self.start + self.duration


@dataclass(slots=True)
class RunRecord:
    """Consecutive decode steps of one engine taken as one run (emulator.decode_run), reported at once:
    at the end of every step each of `requests` got one token; nothing else changed but the KV usage.
    `steps()` gives the same StepRecords one at a time."""
    engine: int
    first_step: int          # the number of the first step (StepRecord.step)
    starts: list[float]
    ends: list[float]
    requests: list[Request]
    kv_usage: list[float]    # after each step's output is processed
    num_waiting: int
    first_context: int       # summed context of the batch at the first step; one token more each step
    first_context_max: int

    @property
    def num_steps(self) -> int:
        return len(self.starts)

    def shape(self, i: int) -> BatchShape:
        n = len(self.requests)
        return BatchShape.decode(n, self.first_context + n * i, self.first_context_max + i)

    def steps(self) -> Iterator[StepRecord]:
        n, scheduled = len(self.requests), dict.fromkeys(self.requests, 1)
        for i, (start, end, usage) in enumerate(zip(self.starts, self.ends, self.kv_usage)):
            yield StepRecord(self.engine, self.first_step + i, start, end - start, scheduled, [], {}, 0,
                             self.requests, [], n, self.num_waiting, usage, self.shape(i))


class Engine:
    def __init__(self, index: int, config: EngineConfig, num_gpu_blocks: int,
                 kv_groups: KVCacheGroups | None = None) -> None:
        self.index = index
        self.config = config
        self.num_gpu_blocks = num_gpu_blocks
        self.kv = kv_cache_manager(num_gpu_blocks, config, kv_groups)  # hybrid with sliding-window groups
        self.scheduler = Scheduler(config, self.kv)
        self.inbox: list[Request] = []  # arrived, not yet taken in by the engine loop
        self.started_loads: list[tuple[Request, int, int, float]] = []  # external KV loads to start (+ when)
        self.unread_sources: list[object] = []  # where KV was that admitted requests did not read (see take_unread)
        self.num_steps = 0
        self.busy_time = 0.0
        # Offline: when the simulation will next settle this engine for sure (its next arrival; see
        # decode_run); a time already past means nothing is known.
        self.settle_at = 0.0

    # -- requests -------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """An arrival: it waits in the inbox until the engine loop next comes round."""
        request.engine_index = self.index
        # The engine keeps the block hashes of a prompt, not its token ids (a long queue stays small).
        ensure_block_hashes(request, self.config.block_size)
        if self.kv.pool.events is not None:
            self.kv.pool.events.request_added(request)
        request.prompt_token_ids = request.output_token_ids = None
        self.inbox.append(request)

    def abort(self, request: Request, now: float, keep_blocks: bool = False) -> bool:
        """Abort wherever the request is; False if it had already finished (`keep_blocks`: Scheduler.abort's)."""
        if request in self.inbox:  # never reached the scheduler
            self.inbox.remove(request)
            request.status = RequestStatus.FINISHED_ABORTED
            request.finish_time = now
            return True
        return self.scheduler.abort(request, now, keep_blocks)

    def drain(self) -> list[Request]:
        """Take every request off the engine (it failed): blocks freed, queues emptied, the prefix
        cache and its own offload tiers dropped. The requests' fate is the caller's (finished P/D
        prefills held for a decode side are not returned: their KV is lost with them)."""
        dropped = list(self.inbox) + list(self.scheduler.waiting) + list(self.scheduler.running)
        held = list(self.scheduler.held.values())
        self.inbox.clear()
        self.started_loads.clear()
        self.unread_sources.clear()
        self.scheduler.clear()
        for request in dropped + held:
            request.kv_loading = False
            self.kv.free(request)
        self.kv.reset_prefix_cache()
        if self.kv.offload is not None:  # its host (and CXL) memory went with the process
            self.kv.offload.clear()
        return dropped

    # -- KV from and to other instances ----------------------------------------------------
    @property
    def awaits_kv(self) -> bool:
        """Something it waits on will come from outside: an external KV load, or a decode side
        that will read (and so free) the blocks of a finished prefill, or the end of an offload store a
        deferred lookup waits for."""
        offload = self.kv.offload
        return bool(self.scheduler.num_loading or self.scheduler.held or (offload is not None and offload.storing))

    def take_unread(self) -> list[object]:
        """Where the KV of requests its scheduler admitted without reading it was (P/D prefills' blocks:
        SchedulerOutput.kv_unread), for their sides to be told of an empty read."""
        sources, self.unread_sources = self.unread_sources, []
        return sources

    def take_started_loads(self) -> list[tuple[Request, int, int, float]]:
        """The external KV loads its scheduler started: (request, local hit tokens, tokens to load, when)."""
        loads, self.started_loads = self.started_loads, []
        return loads

    def external_kv_loaded(self, request: Request, ok: bool) -> None:
        self.scheduler.external_kv_loaded(request, ok)

    def release_held(self, request: Request) -> bool:
        return self.scheduler.release_held(request)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + len(self.inbox)

    @property
    def is_idle(self) -> bool:
        return not self.inbox and not self.scheduler.has_unfinished_requests()

    # -- what the engine loop asks of an engine ----------------------------------------
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
        return self.record_step(start, end, out, prefilled, got_token, finished, self.num_running, self.num_waiting,
                                self.kv.usage)

    def record_step(self, start: float, end: float, out: SchedulerOutput, num_prompt_tokens: int,
                    got_token: list[Request], finished: list[Request], num_running: int, num_waiting: int,
                    kv_usage: float) -> StepRecord:
        """Count an executed step and describe it (the state fields: once its output is processed)."""
        self.num_steps += 1
        self.busy_time += end - start
        return StepRecord(self.index, self.num_steps, start, end - start, out.num_scheduled_tokens, out.preempted,
                          out.cached_tokens, num_prompt_tokens, got_token, finished, num_running, num_waiting,
                          kv_usage, out.shape, self.kv.take_lookups())

    def record_run(self, run: DecodeRun, first: int, kv_usage: list[float], num_waiting: int) -> RunRecord:
        """Count the steps of a decode run from its record `first` on, and describe them."""
        starts, ends = run.starts[first:run.completed], run.ends[first:run.completed]
        record = RunRecord(self.index, self.num_steps + 1, starts, ends, run.running, kv_usage[first:], num_waiting,
                           run.first_context + len(run.running) * (first - (1 if run.async_ else 0)),
                           run.first_context_max + first - (1 if run.async_ else 0))
        self.busy_time = reduce(add, map(sub, ends, starts), self.busy_time)  # each step's time, added in order
        self.num_steps += len(starts)
        return record

    def apply_decode_run(self, run: DecodeRun, first: SchedulerOutput | None) -> list[StepRecord | RunRecord]:
        """Advance the batch by a planned run of decode steps (emulator.decode_run). Returns the records of
        its completed steps in order: b0's (`first`, the batch that was in flight, with async scheduling) if
        its output came back within the run, then the others'."""
        self.scheduler.blocked_lookups(run.k)
        if run.segments is not None:
            return self._apply_segments(run, first)
        kv, running, k, completed = self.kv, run.running, run.k, run.completed
        usable = kv.pool.num_blocks - 1
        # free blocks once new step m+1 is scheduled
        free_after = list(accumulate(map(len, run.crossings), sub, initial=kv.num_free_blocks))[1:]
        # blocks in step order, as the steps would have taken them
        kv.append_blocks(list(map(running.__getitem__, chain.from_iterable(run.crossings))))
        prefilled = 0  # async only: requests whose first token comes with b0
        first_end, last_end = (run.ends[0], run.ends[completed - 1]) if completed else (None, None)
        placeholders = k - completed if run.async_ else 0
        bs, caching = kv.block_size, kv.tracks_full_blocks  # (offload stores: with prefix caching off too)
        # b0's output takes back the tokens it computed: one for a decode, the prompt's last chunk for a prefill
        b0_tokens = None
        if first is not None and first.total_num_scheduled_tokens > len(running):
            b0_tokens = first.num_scheduled_tokens
        for r in running:
            r.num_computed_tokens += k
            r.num_output_tokens += completed
            num_tokens = r.num_tokens = r.num_tokens + completed
            r.num_output_placeholders += placeholders
            r.num_in_flight_tokens += k - completed
            if b0_tokens is not None:
                r.num_in_flight_tokens -= b0_tokens[r] - 1
            if completed:
                if r.first_token_time is None:
                    r.first_token_time = first_end
                    prefilled += r.num_computed_prompt_tokens
                r.last_token_time = last_end
            if caching and num_tokens // bs > r.kv_num_cached:
                kv.cache_blocks(r, num_tokens)
        # A batch's output is processed once the batch depth-1 places later is scheduled.
        later = run.depth - 1 - (1 if run.async_ else 0)
        usage = [1.0 - free / usable for free in free_after[later:later + completed]]
        num_waiting = self.num_waiting
        head = None
        if first is not None and completed:
            head = self.record_step(run.starts[0], run.ends[0], first, prefilled, list(running), [], len(running),
                                    num_waiting, usage[0])
        rest = 1 if head is not None else 0
        tail = self.record_run(run, rest, usage, num_waiting) if completed > rest else None
        assert all(r.status == RequestStatus.RUNNING for r in running)
        return [record for record in (head, tail) if record is not None]

    def _apply_segments(self, run: DecodeRun, first: SchedulerOutput | None) -> list[StepRecord | RunRecord]:
        """`apply_decode_run` for a run that requests leave (async): as the loop would, each output processed
        in turn (a request whose last token it brings finishes and frees its blocks) before the step after
        next takes its blocks. Worked stretch by stretch: between two outputs at which someone finishes or
        a segment begins, steps are alike (one RunRecord)."""
        kv, scheduler, running, k, completed = self.kv, self.scheduler, run.running, run.k, run.completed
        last, ends = run.last_steps, run.ends
        usable = kv.pool.num_blocks - 1
        bs, caching = kv.block_size, kv.tracks_full_blocks  # (offload stores: with prefix caching off too)
        b0_tokens = None  # b0's output takes back the tokens it computed (a prefill's last chunk: more than one)
        if first is not None and first.total_num_scheduled_tokens > len(running):
            b0_tokens = first.num_scheduled_tokens
        prefilled = 0  # prompt tokens of the requests whose first token comes with b0

        def advance(i: int, r: Request) -> None:
            """The request's counters once the run's steps are scheduled and its completed outputs processed."""
            nonlocal prefilled
            steps = k if last[i] is None else min(k, last[i])
            outputs = completed if last[i] is None else min(completed, last[i] + 1)
            r.num_computed_tokens += steps
            r.num_output_tokens += outputs
            r.num_tokens += outputs
            r.num_output_placeholders += steps - outputs
            r.num_in_flight_tokens += steps - outputs
            if b0_tokens is not None:
                r.num_in_flight_tokens -= b0_tokens[r] - 1
            if outputs:
                if r.first_token_time is None:
                    r.first_token_time = ends[0]
                    prefilled += r.num_computed_prompt_tokens
                r.last_token_time = ends[outputs - 1]

        leaving_at: dict[int, list[int]] = {}  # output -> the requests whose last token it brings
        for i, end in enumerate(last):
            if end is not None and end < completed:
                leaving_at.setdefault(end, []).append(i)
        marks = sorted({0, *leaving_at, *(s[0] for s in run.segments[1:] if s[0] < completed)}) if completed else []
        taken = list(accumulate(map(len, run.crossings), initial=0))  # blocks taken by steps 1..s
        free0, freed, allocated = kv.num_free_blocks, 0, 0
        usage = [0.0] * completed
        records: list[StepRecord | RunRecord] = []
        num_waiting = self.num_waiting
        for m, j0 in enumerate(marks):
            j1 = marks[m + 1] if m + 1 < len(marks) else completed
            leaving = leaving_at.get(j0, ())
            if leaving:  # the steps decided before this output take their blocks, then these free theirs
                through = min(j0 + 1, k)
                kv.append_blocks([running[i] for c in run.crossings[allocated:through] for i in c])
                allocated = through
                for i in leaving:
                    r = running[i]
                    advance(i, r)
                    if caching and r.num_computed_tokens // bs > r.kv_num_cached:
                        kv.cache_blocks(r, r.num_computed_tokens)
                    scheduler.running.remove(r)
                    r.status = RequestStatus.FINISHED_LENGTH_CAPPED
                    r.finish_time = ends[j0]
                    before = kv.num_free_blocks
                    kv.free(r)
                    freed += kv.num_free_blocks - before  # blocks another request shares stay in use
                    r.block_hashes = None
            # output j is processed once step j + 1 is scheduled (j + 1 <= completed <= k)
            usage[j0:j1] = [1.0 - (free0 - t + freed) / usable for t in taken[j0 + 1:j1 + 1]]
            rest = j0
            if j0 == 0 or leaving:
                finished = [running[i] for i in leaving]
                if j0 == 0:
                    record = self.record_step(run.starts[0], ends[0], first, 0, list(running), finished,
                                              len(scheduler.running), num_waiting, usage[0])
                else:
                    batch, context, context_max = run.batch_at(j0)
                    record = self.record_step(run.starts[j0], ends[j0], decode_batch(batch, context, context_max), 0,
                                              list(batch), finished, len(scheduler.running), num_waiting, usage[j0])
                records.append(record)
                rest = j0 + 1
            if rest < j1:
                records.append(self._record_stretch(run, rest, j1, usage))
        kv.append_blocks([running[i] for c in run.crossings[allocated:] for i in c])
        for i, r in enumerate(running):
            if last[i] is None or last[i] >= completed:
                advance(i, r)
                # cached: what the last step that scheduled it knew, and what its last output brought
                known = r.num_tokens if last[i] is None or last[i] > completed else r.num_tokens - 1
                if caching and known // bs > r.kv_num_cached:
                    kv.cache_blocks(r, known)
        if first is not None and completed:
            records[0].num_prompt_tokens = prefilled  # b0's record: known once every request is advanced
        return records

    def _record_stretch(self, run: DecodeRun, j0: int, j1: int, usage: list[float]) -> RunRecord:
        """The RunRecord of completed steps j0..j1-1 of one batch, in which nobody finishes."""
        batch, context, context_max = run.batch_at(j0)
        starts, ends = run.starts[j0:j1], run.ends[j0:j1]
        record = RunRecord(self.index, self.num_steps + 1, starts, ends, list(batch), usage[j0:j1],
                           self.num_waiting, context, context_max)
        self.busy_time = reduce(add, map(sub, ends, starts), self.busy_time)
        self.num_steps += len(starts)
        return record
