"""A run of identical decode steps, taken in one go.

When every running request is decoding one token per step, nothing waits that
could be admitted, and no request will finish before the run ends, the next k
steps are fully predictable: the same requests, one token each, contexts one
longer every step. Instead of scheduling and updating every request k times,
this advances them all by k tokens at once, allocates the blocks the steps would
have allocated in the same order (so the KV cache ends in exactly the same
state), and reports the same step records. The run stops before anything that
could change the schedule: the next external event (`horizon`), a request's
last token, the first block allocation that would not fit.

It covers the engine loop from the point where it is about to schedule a step:
with async scheduling one step is then already in flight (batch b0); without,
none. New steps b1..bk are scheduled; the oldest ones complete, and the last
`queue_depth` stay in flight as real batches for the loop to finish normally.
"""
from __future__ import annotations

from emulator.batch import BatchShape
from emulator.instance import Instance, StepRecord
from emulator.request import Request, RequestStatus
from emulator.scheduler import SchedulerOutput

MIN_STEPS = 3  # shorter runs are cheaper the ordinary way


def _decode_batch(running: list[Request], contexts: int, context_max: int) -> SchedulerOutput:
    n = len(running)
    out = SchedulerOutput(num_scheduled_tokens=dict.fromkeys(running, 1), sampling=set(running),
                          total_num_scheduled_tokens=n)
    out.shape = BatchShape(n, n, 0, 0.0, n, contexts, context_max)
    return out


def _steady(rank: Instance, in_flight: list, async_: bool) -> bool:
    """Every running request decodes one token per step and nothing else is in flight."""
    running = rank.scheduler.running
    if async_:
        if len(in_flight) != 1:
            return False
        prev = in_flight[0].outs[0]
        if prev.total_num_scheduled_tokens != len(running) or list(prev.num_scheduled_tokens) != running:
            return False
        return all(r.num_output_placeholders == 1 and r.num_in_flight_tokens == 1
                   and r.num_computed_tokens == r.num_tokens for r in running)
    if in_flight:
        return False
    return all(r.num_output_placeholders == 0 and r.num_computed_tokens == r.num_tokens - 1 for r in running)


def _steps_left(running: list[Request], max_model_len: int, async_: bool) -> int:
    """How many new steps can run before any request could finish or be held back."""
    slack = 1 if async_ else 0  # async: the max_tokens guard looks one step ahead
    left = 1 << 30
    for r in running:
        tokens_left = min(r.output_len, r.max_tokens) - r.num_output_tokens - slack
        length_left = max_model_len - r.num_tokens - slack
        left = min(left, tokens_left, length_left)
    return left


def _waiting_stays_blocked(rank: Instance) -> bool:
    """The waiting head cannot be admitted now; a decode run only takes blocks, so it stays so."""
    scheduler = rank.scheduler
    if not scheduler.waiting:
        return True
    if any(r.num_stale_output_tokens for r in scheduler.waiting):
        return False  # its output lands during the run and may make it admissible
    budget = rank.config.max_num_batched_tokens - len(scheduler.running)
    threshold = rank.config.long_prefill_token_threshold  # more than one request: the cap applies
    return budget <= 0 or scheduler.admission_plan(scheduler.waiting.peek(), budget, threshold) is None


def decode_run(loop, now: float, horizon: float) -> list[StepRecord] | None:
    """Take a run of decode steps starting at `now`; None when the conditions do not hold."""
    rank = loop.ranks[0]
    scheduler, kv, config = rank.scheduler, rank.kv, rank.config
    running = scheduler.running
    async_ = scheduler.async_scheduling
    depth = loop.queue_depth
    if not running or len(running) > config.max_num_batched_tokens or rank.inbox:
        return None
    if horizon - max(now, loop.gpu_free_at) < (MIN_STEPS - 1) * loop.last_step_duration:
        return None  # the next outside event comes too soon for a run to pay off
    if not _steady(rank, loop.in_flight, async_) or not _waiting_stays_blocked(rank):
        return None
    k_max = _steps_left(running, config.max_model_len, async_)
    if k_max < MIN_STEPS:
        return None

    # Plan the steps: durations, decision times and the block each crossing request needs.
    # Request i takes a new block at step first_i and every block_size steps after.
    bs = kv.block_size
    n = len(running)
    by_phase: dict[int, list[tuple[int, int]]] = {}
    for i, r in enumerate(running):
        first = len(r.kv_blocks) * bs - r.num_computed_tokens + 1
        by_phase.setdefault(first % bs, []).append((i, first))
    free = kv.num_free_blocks
    contexts = sum(r.num_computed_tokens for r in running)
    context_max = max(r.num_computed_tokens for r in running)
    ends = [loop.in_flight[0].end] if async_ else []  # end times of b0 (async), b1, b2, ...
    starts = [loop.in_flight[0].start] if async_ else []
    gpu_free = max(now, loop.gpu_free_at)
    crossings: list[list[int]] = []  # per new step: indices of requests taking a block, in running order
    cost = loop.cost_model.step_time
    k = 0
    while k < k_max:
        step = k + 1
        decided_at = now if step == 1 else ends[step - depth - (0 if async_ else 1)]
        if decided_at >= horizon:
            break
        crossing = [i for i, first in by_phase.get(step % bs, ()) if step >= first]
        if len(crossing) > free:
            break  # the allocation would fail: the scheduler must preempt
        free -= len(crossing)
        duration = cost(BatchShape(n, n, 0, 0.0, n, contexts, context_max))
        starts.append(gpu_free)
        gpu_free += duration
        ends.append(gpu_free)
        crossings.append(crossing)
        contexts += n
        context_max += 1
        k = step
    if k < MIN_STEPS:
        return None

    # Apply it: blocks in step order, then every request k tokens further on.
    pool = kv.pool
    usable = kv.pool.num_blocks - 1
    free_after = []  # free blocks once new step m+1 is scheduled
    free_now = kv.num_free_blocks
    for crossing in crossings:
        free_now -= len(crossing)
        free_after.append(free_now)
    for crossing in crossings:
        for i in crossing:
            running[i].kv_blocks.extend(pool.get_new_blocks(1))
    completed = k + (1 if async_ else 0) - depth  # batches whose output is processed in the run
    first_end = ends[0]
    last_end = ends[completed - 1]
    prefilled = 0  # async only: requests whose first token comes with b0
    for r in running:
        r.num_computed_tokens += k
        r.num_output_tokens += completed
        r.num_tokens += completed
        r.num_output_placeholders += k - completed if async_ else 0
        r.num_in_flight_tokens += k - completed
        if r.first_token_time is None:
            r.first_token_time = first_end
            prefilled += r.num_prompt_tokens - max(r.num_cached_tokens, 0)
        r.last_token_time = last_end
        if kv.enable_caching:
            kv.cache_blocks(r, r.num_tokens)

    # The step records of the completed batches, and the batches left in flight.
    # A batch's output is processed once the batch depth-1 places later is scheduled.
    records = []
    num_waiting = rank.num_waiting
    scheduled, got = dict.fromkeys(running, 1), list(running)
    offset = 1 if async_ else 0
    for m in range(completed):
        usage = 1.0 - free_after[m - offset + depth - 1] / usable
        rank.num_steps += 1
        rank.busy_time += ends[m] - starts[m]
        if m == 0 and async_:
            out0 = loop.in_flight.pop().outs[0]
            records.append(StepRecord(rank.index, rank.num_steps, starts[0], ends[0] - starts[0],
                                      out0.num_scheduled_tokens, out0.preempted, out0.cached_tokens,
                                      prefilled, got, [], n, num_waiting, usage))
        else:
            records.append(StepRecord(rank.index, rank.num_steps, starts[m], ends[m] - starts[m], scheduled, [], {},
                                      0, got, [], n, num_waiting, usage))
    batches = []
    base = contexts - n * depth
    for j in range(depth):
        m = completed + j
        out = _decode_batch(running, base + n * j, context_max - depth + j)
        batches.append(loop.make_batch(out, starts[m], ends[m]))
    loop.in_flight.clear()
    for batch in batches:
        loop.in_flight.appendleft(batch)
    loop.gpu_free_at = ends[-1]
    assert all(r.status == RequestStatus.RUNNING for r in running)
    return records
