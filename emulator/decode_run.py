"""A run of identical decode steps, taken in one go.

When every running request is decoding one token per step, nothing waits that
could be admitted, and no request will finish before the run ends, the next k
steps are fully predictable: the same requests, one token each, contexts one
longer every step. With async scheduling and nothing waiting, a request that reaches
max_tokens does not end the run either: the scheduler stops scheduling it after its
last token (vLLM's look-ahead guard), it finishes when that token comes back and its
blocks are freed, and the run goes on with the others (its steps form segments, each
of one batch). Instead of scheduling and updating every request k times,
this advances them all by k tokens at once, allocates the blocks the steps would
have allocated in the same order (so the KV cache ends in exactly the same
state), and reports the same step records. The run stops before anything that
could change the schedule: the next external event (`horizon`), a request's
last token, the first block allocation that would not fit.

It covers the engine loop from the point where it is about to schedule a step:
with async scheduling one step is then already in flight (batch b0); without,
none. New steps b1..bk are scheduled; the oldest ones complete, and the last
`queue_depth` stay in flight as real batches for the loop to finish normally.

`plan_decode_run` only reads: it returns a `DecodeRun`, which the engine applies to its
requests and KV cache (`Engine.apply_decode_run`) and the loop to its batch queue. A plan
may be cut short before it is applied (`truncated`): its first steps are exactly what the
loop would have done up to then, so offline replay plans far ahead and applies a run only
when something needs the engine's state (an arrival routed to it, the run's own end).

No run is planned while the engine publishes KV events: vLLM publishes a batch of them per step, with a
BlockStored for each decode block the step filled and, for a blocked waiting head whose kv_cache_report_mode
is "full", its prefix hit reported again at every scheduling attempt; a run would merge or skip them. Nor on a
hybrid KV cache (emulator.sliding_window): its sliding-window group frees blocks at every step.
"""
from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from itertools import accumulate, count, cycle, islice
from dataclasses import dataclass

from emulator.cost.base import price_steps
from emulator.engine import Engine
from emulator.request import Request
from emulator.scheduler import SchedulerOutput, decode_batch

MIN_STEPS = 3  # shorter runs are cheaper the ordinary way


@dataclass
class DecodeRun:
    """k decode steps b1..bk of `running`, planned at once starting at `now`."""
    running: list[Request]       # the batch, in running order
    now: float                   # when step 1 is scheduled
    starts: list[float]          # GPU start of b0 (async only), then of b1..bk
    ends: list[float]            # and their ends
    crossings: list[list[int]]   # per new step: indices of the requests taking a block, in running order
    first_context: int           # summed context of the batch at step 1
    first_context_max: int
    depth: int                   # the loop's batch queue depth: the last `depth` steps stay in flight
    async_: bool
    # With requests leaving (async only): per request of `running`, the last new step it is in (None: all
    # of them), and the run's segments: (first step, its batch, summed and longest context at that step),
    # one per batch, in step order. None: every step has the whole of `running`.
    last_steps: list[int | None] | None = None
    segments: list[tuple[int, list[Request], int, int]] | None = None

    @property
    def k(self) -> int:
        return len(self.crossings)

    @property
    def completed(self) -> int:
        """Batches whose output is processed within the run (b0 among them, with async scheduling)."""
        return self.k + (1 if self.async_ else 0) - self.depth

    @property
    def context(self) -> int:
        """Summed context of the batch once all k steps are scheduled."""
        return self.first_context + len(self.running) * self.k

    @property
    def context_max(self) -> int:
        return self.first_context_max + self.k

    def truncated(self, until: float) -> DecodeRun:
        """The steps scheduled before `until` (an arrival then joins the batch after them)."""
        k = 0
        if self.now < until:  # step 1 is decided now; step s >= 2 when ends[s - lag] comes back (increasing)
            lag = self.depth + (0 if self.async_ else 1)
            k = 1 + bisect_left(self.ends, until, 2 - lag, self.k + 1 - lag) - (2 - lag)
        if k == self.k:
            return self
        keep = k + (1 if self.async_ else 0)
        segments = self.segments and [segment for segment in self.segments if segment[0] <= max(k, 1)]
        return DecodeRun(self.running, self.now, self.starts[:keep], self.ends[:keep], self.crossings[:k],
                         self.first_context, self.first_context_max, self.depth, self.async_, self.last_steps,
                         segments)

    def finished_before(self, until: float) -> int:
        """How many of its requests leave and finish by `until` (their last output processed before it:
        what applying the run up to `until` would finish)."""
        if self.last_steps is None:
            return 0
        depth = self.depth
        return sum(1 for end in self.last_steps if end is not None and end + depth <= self.k and self.ends[end] < until)

    def batch_at(self, step: int) -> tuple[list[Request], int, int]:
        """The requests of a new step (1..k) and their summed and longest context then."""
        if self.segments is None:
            n = len(self.running)
            return self.running, self.first_context + n * (step - 1), self.first_context_max + step - 1
        for first, batch, context, context_max in reversed(self.segments):
            if first <= step:
                return batch, context + len(batch) * (step - first), context_max + step - first
        raise ValueError(f"no step {step} in the run")

    def left_in_flight(self) -> list[tuple[SchedulerOutput, float, float]]:
        """(batch, start, end) of the steps still on the GPU when the run ends, oldest first."""
        if self.segments is None:
            n = len(self.running)
            base = self.context - n * self.depth
            return [(decode_batch(self.running, base + n * j, self.context_max - self.depth + j),
                     self.starts[self.completed + j], self.ends[self.completed + j]) for j in range(self.depth)]
        offset = 1 if self.async_ else 0  # starts/ends index of step s: s (b0 first) with async
        left = []
        for step in range(self.k - self.depth + 1, self.k + 1):  # step 0 (b0, kept as it is) only when k == 1
            batch, context, context_max = self.batch_at(max(step, 1))
            left.append((decode_batch(batch, context, context_max), self.starts[step - 1 + offset],
                         self.ends[step - 1 + offset]))
        return left


def _steady(engine: Engine, in_flight: Sequence, async_: bool) -> bool:
    """Every running request decodes one token per step from step 1 on, and nothing else is in flight.
    With async scheduling b0 is in flight: every running request is in it and samples there, with nothing
    else in flight for it (b0 may be the last chunk of a prefill: from step 1 on that request decodes too)."""
    running = engine.scheduler.running
    if async_:
        if len(in_flight) != 1:
            return False
        prev = in_flight[0].outs[0]
        scheduled = prev.num_scheduled_tokens
        if len(scheduled) != len(running) or list(scheduled) != running:
            return False
        if prev.total_num_scheduled_tokens == len(running):  # b0 decoded one token each (the common case)
            return all(r.num_output_placeholders == 1 and r.num_in_flight_tokens == 1
                       and r.num_computed_tokens == r.num_tokens for r in running)
        sampling = prev.sampling
        return all(r.num_output_placeholders == 1 and r.num_in_flight_tokens == scheduled[r]
                   and r.num_computed_tokens == r.num_tokens and r in sampling for r in running)
    if in_flight:
        return False
    return all(r.num_output_placeholders == 0 and r.num_computed_tokens == r.num_tokens - 1 for r in running)


def _steps_left(running: list[Request], max_model_len: int, async_: bool, leaving: bool) -> int:
    """How many new steps can run before any request could finish or be held back; with `leaving`, one
    capped by max_tokens leaves the batch instead, and only the last to leave ends the run."""
    slack = 1 if async_ else 0  # async: the max_tokens guard looks one step ahead
    if leaving:
        limits = [r.output_len - r.num_output_tokens for r in running if r.output_len < r.max_tokens]
        tokens_left = min(min(limits, default=1 << 30), max(r.max_tokens - r.num_output_tokens for r in running))
    else:
        tokens_left = min(min(r.output_len, r.max_tokens) - r.num_output_tokens for r in running)
    length_left = max_model_len - max(r.num_tokens for r in running)
    return min(1 << 30, tokens_left - slack, length_left - slack)


def _last_steps(running: list[Request], k_max: int) -> list[int | None] | None:
    """Per request, the last new step of one capped by max_tokens whose last token comes before step
    k_max's (it is not scheduled after it); None for the others, or when nobody leaves so early."""
    last = [r.max_tokens - r.num_output_tokens - 1 if r.output_len == r.max_tokens else None for r in running]
    if all(step is None or step >= k_max for step in last):
        return None
    return [None if step is None or step >= k_max else step for step in last]


def _segment_at(running: list[Request], last: list[int | None], step: int) -> tuple[int, list[Request], int, int]:
    """The segment beginning at `step`: those still in the batch, their summed and longest context."""
    batch = [r for r, end in zip(running, last) if end is None or end >= step]
    computed = [r.num_computed_tokens for r in batch]
    return step, batch, sum(computed) + len(batch) * (step - 1), max(computed) + step - 1


def _in_batch(crossing: list[int], last: list[int | None], step: int) -> list[int]:
    return [i for i in crossing if last[i] is None or last[i] >= step]


def _waiting_stays_blocked(engine: Engine) -> bool:
    """The waiting head cannot be admitted now; a decode run only takes blocks, so it stays so."""
    scheduler = engine.scheduler
    if not scheduler.waiting:
        return True
    if scheduler.has_stale_waiting():
        return False  # its output lands during the run and may make it admissible
    # requests whose external KV load is in flight are skipped (their end settles the loop), and so are those
    # max_loras keeps out (a run changes no adapter of the batch)
    head = scheduler.admission_head()
    if head is None:
        return True
    if head.external_kv is not None:
        return False  # admission may start its load
    budget = engine.config.max_num_batched_tokens - len(scheduler.running)
    threshold = engine.config.long_prefill_token_threshold  # more than one request: the cap applies
    return budget <= 0 or scheduler.admission_plan(head, budget, threshold) is None


def _crossings(by_phase: dict[int, list[tuple[int, int]]], bs: int) -> Iterator[list[int]]:
    """For steps 1, 2, ...: the indices of the requests taking a new block at that step. `by_phase`: per
    phase (step % bs), the (index, first crossing step) of its requests; each takes one every bs steps."""
    # once every request of a phase has reached its first crossing, the phase's steps take them all
    all_in = {phase: (max(first for _, first in members), [i for i, _ in members])
              for phase, members in by_phase.items()}
    none: list[int] = []
    for step in count(1):
        phase = all_in.get(step % bs)
        if phase is None:
            yield none
        elif step >= phase[0]:
            yield phase[1]
        else:
            yield [i for i, first in by_phase[step % bs] if step >= first]


def _first_crossings(by_phase: dict[int, list[tuple[int, int]]], bs: int, last_first: int, k: int) -> list[list[int]]:
    """The first k items of `_crossings` (`last_first`: the latest first crossing), those from step last_first
    on a period of bs steps repeated: every request then takes a block every bs steps."""
    head = list(islice(_crossings(by_phase, bs), min(k, last_first)))
    if k <= last_first:
        return head
    everyone = {phase: [i for i, _ in members] for phase, members in by_phase.items()}
    none: list[int] = []
    period = [everyone.get(step % bs, none) for step in range(last_first + 1, last_first + 1 + bs)]
    repeats, rest = divmod(k - last_first, bs)
    return head + period * repeats + period[:rest]


def _while_blocks_last(crossings: list[list[int]], free: int) -> list[list[int]]:
    """The steps before the first whose block allocations would not fit in `free` blocks."""
    for k, crossing in enumerate(crossings):
        if len(crossing) > free:
            return crossings[:k]  # the allocation would fail: the scheduler must preempt
        free -= len(crossing)
    return crossings


def _durations(step_time: Callable[[int, int], float], contexts: int, context_max: int, n: int, k: int) -> list[float]:
    """Seconds of k steps of n decodes from the first step's (summed, longest) context: at once where the
    pricer can (`step_time.steps`: CostModel.decode_pricer's), else step by step."""
    at_once = getattr(step_time, "steps", None)
    if at_once is not None:
        return at_once(contexts, context_max, k)
    return price_steps(step_time, contexts, context_max, n, k)


def plan_decode_run(engine: Engine, in_flight: Sequence, gpu_free_at: float, last_step_duration: float,
                    queue_depth: int, now: float, horizon: float,
                    pricer: Callable[[int], Callable[[int, int], float]]) -> DecodeRun | None:
    """Plan a run of decode steps starting at `now`; None when the conditions do not hold.

    `in_flight`: the loop's batches on the GPU, newest first (each with `outs`, `start`, `end`);
    `gpu_free_at`: when the GPU finishes them; `horizon`: the next event outside this engine;
    `pricer(n)`: seconds of a step of n decodes by (summed, longest) context (CostModel.decode_pricer; it may
    price k steps at once with `.steps(context, context_max, k)`)."""
    scheduler, kv, config = engine.scheduler, engine.kv, engine.config
    running = scheduler.running
    async_ = scheduler.async_scheduling
    depth = queue_depth
    if not running or len(running) > config.max_num_batched_tokens or engine.inbox:
        return None
    if kv.pool.events is not None:  # vLLM publishes each step's KV events (see the docstring above)
        return None
    if kv.recycles_blocks:  # a sliding-window group frees a block as often as it takes one
        return None
    if horizon - max(now, gpu_free_at) < (MIN_STEPS - 1) * last_step_duration:
        return None  # the next outside event comes too soon for a run to pay off
    # (the waiting head first: about every other call fails there, as a new arrival can be admitted)
    if not _waiting_stays_blocked(engine) or not _steady(engine, in_flight, async_):
        return None
    # Requests leave a run only where a later event bounds it (a server's present, the next arrival of a
    # one-instance replay): in a cluster a run planned to its blocks' end would price steps far past the
    # arrival that truncates it, and pay for every segment, for nothing.
    bounded = horizon < float("inf") or engine.settle_at > now
    leaving = bounded and async_ and not scheduler.waiting and not any(r.hold_kv for r in running)
    k_max = _steps_left(running, config.max_model_len, async_, leaving)
    if k_max < MIN_STEPS:
        return None
    last = _last_steps(running, k_max) if leaving else None

    # Durations, decision times and the block each crossing request needs.
    # Request i takes a new block at step first_i and every block_size steps after.
    bs = kv.block_size
    n = len(running)
    by_phase: dict[int, list[int]] = {}  # the requests of each phase (first crossing % bs)
    firsts = []
    contexts = context_max = last_first = 0
    for i, r in enumerate(running):  # one pass: the contexts, and each request's first crossing
        computed = r.num_computed_tokens
        contexts += computed
        if computed > context_max:
            context_max = computed
        first = len(r.kv_blocks) * bs - computed + 1
        firsts.append(first)
        if first > last_first:
            last_first = first
        members = by_phase.get(first % bs)
        if members is None:
            by_phase[first % bs] = [i]
        else:
            members.append(i)
    # The common case: nobody holds a spare block, so each phase's requests first cross at the same step,
    # one of the first bs, and every bs steps after: the crossings of steps 1..bs repeat (else see _crossings).
    none: list[int] = []
    period = [by_phase.get(step % bs, none) for step in range(1, bs + 1)] if last_first <= bs else None
    by_first = None if period is not None else {
        phase: [(i, firsts[i]) for i in members] for phase, members in by_phase.items()}
    segments = None
    begins_at, first_leave = frozenset(), 1 << 30
    if last is not None:  # requests leave: the batch, its contexts and its price change where a segment begins
        segments = [_segment_at(running, last, 1)]
        _, members, contexts, context_max = segments[0]
        n = len(members)
        begins_at = frozenset(end + 1 for end in last if end is not None and end >= 1)
        first_leave = min(end for end in last if end is not None) + 1  # the first step someone is not in
    # (the blocks leaving requests free are not counted: such a run may stop before the blocks run out, never after)
    free = kv.num_free_blocks
    first_context, first_context_max = contexts, context_max
    step_time = pricer(n)
    ends = [in_flight[0].end] if async_ else []  # end times of b0 (async), b1, b2, ...
    starts = [in_flight[0].start] if async_ else []
    gpu_free = max(now, gpu_free_at)
    crossings: list[list[int]] = []
    crossing_at = cycle(period) if period is not None else _crossings(by_first, bs)
    steps = zip(range(1, k_max + 1), crossing_at)  # (step, the requests taking a block then)
    # Offline, something certain to settle the engine comes at `engine.settle_at` (its next arrival):
    # the steps decided from then on would be dropped unapplied, so they are neither priced nor kept;
    # past that cut only whether the whole run reaches MIN_STEPS matters (else it is not taken at all).
    cut = engine.settle_at if engine.settle_at > now and horizon == float("inf") else float("inf")
    if horizon == cut == float("inf"):  # (never with requests leaving: they need a bound, see `bounded`)
        # Nothing but its own batch decides where the run ends (offline, in a cluster): find how far the
        # blocks last, then price those steps at once. By step last_first + m * bs every request has taken
        # m + 1 blocks, so the free blocks run out by then if they are to run out before k_max.
        k = min(k_max, last_first + (free // n + 1) * bs)
        crossings = (list(islice(crossing_at, k)) if period is not None
                     else _first_crossings(by_first, bs, last_first, k))
        if sum(map(len, crossings)) > free:
            crossings = _while_blocks_last(crossings, free)
        if len(crossings) < MIN_STEPS:
            return None
        times = list(accumulate(_durations(step_time, contexts, context_max, n, len(crossings)), initial=gpu_free))
        starts += times[:-1]  # each step starts when the one before ends
        ends += times[1:]
        return DecodeRun(list(running), now, starts, ends, crossings, first_context, first_context_max, depth, async_)
    past_cut = False
    lag = depth + (0 if async_ else 1)  # step s >= 2 is decided when the batch ending at ends[s - lag] is back
    k = 0
    for step, crossing in steps:
        if not past_cut:
            decided_at = now if step == 1 else ends[step - lag]
            if decided_at >= horizon:
                break
            past_cut = decided_at >= cut
        if past_cut and k >= MIN_STEPS:
            break
        if crossing:
            if step >= first_leave:
                crossing = _in_batch(crossing, last, step)
            if len(crossing) > free:
                break  # the allocation would fail: the scheduler must preempt
            free -= len(crossing)
        k = step
        if past_cut:
            continue
        if step in begins_at:
            segments.append(_segment_at(running, last, step))
            _, members, contexts, context_max = segments[-1]
            n, step_time = len(members), pricer(len(members))
        duration = step_time(contexts, context_max)
        starts.append(gpu_free)
        gpu_free += duration
        ends.append(gpu_free)
        crossings.append(crossing)
        contexts += n
        context_max += 1
    if k < MIN_STEPS:
        return None
    return DecodeRun(list(running), now, starts, ends, crossings, first_context, first_context_max, depth, async_,
                     last, segments)
