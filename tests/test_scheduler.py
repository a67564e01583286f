"""The vLLM v1 scheduler's rules (vLLM 0.33 `v1/core/sched/scheduler.py`), one rule per test.

Expected steps were checked against vLLM 0.33's own Scheduler driven with the same
requests (block size 16, the same number of KV blocks and the same budget).
"""
from __future__ import annotations

import numpy as np

from emulator.request import Request, RequestStatus
from emulator.scheduler import Scheduler, SchedulerOutput


def step(s: Scheduler, now: float = 0.0) -> SchedulerOutput:
    """One synchronous engine step: schedule, run, process its output."""
    out = s.schedule(now)
    s.update_from_output(out, now + 1.0)
    return out


def scheduled(out: SchedulerOutput) -> dict[str, int]:
    return {r.request_id: n for r, n in out.num_scheduled_tokens.items()}


def preempted(out: SchedulerOutput) -> list[str]:
    return [r.request_id for r in out.preempted]


def add(s: Scheduler, rid: str, prompt: int, output: int = 30, **kw) -> Request:
    r = Request(rid, prompt, output, **kw)
    s.add_request(r)
    return r


# -- budget and slots ----------------------------------------------------------------------
def test_token_budget_caps_the_step(make_scheduler):
    s = make_scheduler()
    add(s, "a", 50)
    add(s, "b", 50)
    out = step(s)
    assert scheduled(out) == {"a": 50, "b": 14}
    assert out.total_num_scheduled_tokens == 64


def test_max_num_seqs_caps_the_running_requests(make_scheduler):
    s = make_scheduler(max_num_seqs=2)
    for rid in "abc":
        add(s, rid, 10)
    assert scheduled(step(s)) == {"a": 10, "b": 10}
    assert [r.request_id for r in s.waiting] == ["c"]


def test_running_requests_go_first_in_admission_order(make_scheduler):
    s = make_scheduler()
    add(s, "a", 40)
    add(s, "b", 40)
    assert scheduled(step(s)) == {"a": 40, "b": 24}
    add(s, "c", 30)
    out = step(s, 1.0)
    assert list(scheduled(out).items()) == [("a", 1), ("b", 16), ("c", 30)]


def test_long_prompt_is_chunked_by_the_budget(make_scheduler):
    s = make_scheduler()
    a = add(s, "a", 150)
    assert [scheduled(step(s, t))["a"] for t in range(4)] == [64, 64, 22, 1]
    assert a.num_output_tokens == 2


def test_prefill_chunk_samples_nothing(make_scheduler):
    s = make_scheduler()
    a = add(s, "a", 100)
    out = step(s)
    assert a not in out.sampling and a.num_output_tokens == 0 and a.first_token_time is None
    out = step(s, 1.0)
    assert a in out.sampling and a.num_output_tokens == 1 and a.first_token_time == 2.0


def test_without_chunked_prefill_a_prompt_over_the_budget_left_waits(make_scheduler):
    """vLLM stops admitting (break): the smaller request behind it waits too."""
    s = make_scheduler(enable_chunked_prefill=False)
    add(s, "a", 40)
    add(s, "b", 40)
    add(s, "c", 10)
    assert scheduled(step(s)) == {"a": 40}
    assert scheduled(step(s, 1.0)) == {"a": 1, "b": 40, "c": 10}


def test_long_prefill_threshold_caps_each_chunk(make_scheduler):
    s = make_scheduler(long_prefill_token_threshold=16)
    add(s, "a", 40)
    add(s, "b", 40)
    assert scheduled(step(s)) == {"a": 16, "b": 16}


def test_long_prefill_threshold_is_ignored_for_a_lone_request(make_scheduler):
    """vLLM applies the cap only when more than one request is running or waiting: nobody else to starve."""
    s = make_scheduler(long_prefill_token_threshold=16)
    add(s, "a", 40)
    assert scheduled(step(s)) == {"a": 40}


def test_step_never_reaches_max_model_len(make_scheduler):
    """A request stops when its tokens reach max_model_len ("length"), one short of it computed."""
    s = make_scheduler(max_model_len=40)
    a = add(s, "a", 30, output=100)
    for t in range(20):
        if a.is_finished:
            break
        step(s, t)
    assert a.finish_reason == "length"
    assert a.num_tokens == 40 and a.num_output_tokens == 10


def test_request_stops_when_it_reaches_its_output_length(make_scheduler):
    s = make_scheduler()
    a = add(s, "a", 20, output=3)
    b = add(s, "b", 20, output=2, max_tokens=5)  # an EOS before max_tokens
    for t in range(3):
        step(s, t)
    assert (a.finish_reason, a.num_output_tokens, a.finish_time) == ("length", 3, 3.0)
    assert (b.finish_reason, b.num_output_tokens, b.finish_time) == ("stop", 2, 2.0)
    assert s.kv.num_free_blocks == 63


# -- preemption ----------------------------------------------------------------------------
def test_fcfs_preempts_the_newest_running_request(make_scheduler):
    s = make_scheduler(num_blocks=7, max_num_batched_tokens=128)  # 6 usable blocks
    a = add(s, "a", 47)
    b = add(s, "b", 33)
    step(s)  # a: 3 blocks, b: 3 blocks
    step(s, 1.0)
    out = step(s, 2.0)  # a's 49th slot needs a 4th block
    assert preempted(out) == ["b"]
    assert scheduled(out) == {"a": 1}
    assert (b.status, b.num_computed_tokens, b.num_preemptions) == (RequestStatus.PREEMPTED, 0, 1)
    assert a.status == RequestStatus.RUNNING


def test_preempted_request_goes_to_the_front_of_the_waiting_queue(make_scheduler):
    s = make_scheduler(num_blocks=7, max_num_batched_tokens=128, max_num_seqs=2)
    add(s, "a", 47)
    add(s, "b", 33)
    add(s, "c", 5)  # no sequence slot: waits
    step(s)
    step(s, 1.0)
    step(s, 2.0)
    assert [r.request_id for r in s.waiting] == ["b", "c"]


def test_priority_preempts_the_worst_priority_not_the_newest(make_scheduler):
    s = make_scheduler(num_blocks=9, max_num_batched_tokens=128, scheduling_policy="priority")
    add(s, "h", 47, priority=0)
    add(s, "l", 17, priority=5)
    assert scheduled(step(s)) == {"h": 47, "l": 17}
    add(s, "m", 33, priority=1, arrival_time=1.0)
    assert scheduled(step(s, 1.0)) == {"h": 1, "l": 1, "m": 33}
    out = step(s, 2.0)
    assert preempted(out) == ["l"]
    assert scheduled(out) == {"h": 1, "m": 1}


def test_priority_ties_are_broken_by_latest_arrival(make_scheduler):
    s = make_scheduler(num_blocks=9, max_num_batched_tokens=128, scheduling_policy="priority")
    add(s, "h", 47, priority=0)
    add(s, "late", 17, priority=3, arrival_time=0.5)
    add(s, "early", 33, priority=3, arrival_time=0.1)
    step(s)
    step(s, 1.0)
    out = step(s, 2.0)
    assert preempted(out) == ["late"]


def test_priority_request_that_preempts_itself_lets_the_next_running_one_run(make_scheduler):
    """Under priority the victim is the worst request, not the last: vLLM goes on (`continue`) to the ones after it."""
    s = make_scheduler(num_blocks=7, scheduling_policy="priority")
    add(s, "low", 47, priority=5)
    step(s)
    add(s, "high", 33, priority=0, arrival_time=1.0)
    assert scheduled(step(s, 1.0)) == {"low": 1, "high": 33}
    out = step(s, 2.0)  # low needs a 4th block; it is its own victim
    assert preempted(out) == ["low"]
    assert scheduled(out) == {"high": 1}


def test_no_admission_in_a_step_that_preempted(make_scheduler):
    s = make_scheduler(num_blocks=7, max_num_batched_tokens=128, scheduling_policy="priority")
    add(s, "h", 47, priority=0)
    add(s, "l", 40, priority=5)
    step(s)
    w = add(s, "w", 20, priority=1, arrival_time=1.0)  # 2 blocks; none free
    assert scheduled(step(s, 1.0)) == {"h": 1, "l": 1}
    out = step(s, 2.0)
    assert preempted(out) == ["l"] and scheduled(out) == {"h": 1}
    assert s.kv.num_free_blocks == 2 and w.status == RequestStatus.WAITING  # it fit, but had to wait
    assert scheduled(step(s, 3.0)) == {"h": 1, "w": 20}


def test_preempted_request_recomputes_from_its_own_cached_blocks(make_scheduler):
    s = make_scheduler(num_blocks=7, max_num_batched_tokens=128)
    add(s, "a", 47, output=3)
    b = add(s, "b", 33, output=30)
    for t in range(3):
        step(s, t)
    assert b.num_preemptions == 1
    t = 3.0
    while b.status != RequestStatus.RUNNING:
        out = step(s, t)
        t += 1
    assert out.cached_tokens[b] == 32  # its two full prompt blocks were still cached
    assert scheduled(out)["b"] == b.num_prompt_tokens + 2 - 32  # prompt and both sampled tokens, minus the hit
    assert b.num_cached_tokens == 0  # the hit of its first admission is what counts


# -- admission -----------------------------------------------------------------------------
def test_head_of_line_request_blocks_smaller_ones_behind_it(make_scheduler):
    """Admission reserves the whole prompt: a waiting prompt that does not fit stops admission."""
    s = make_scheduler(num_blocks=9)  # 8 usable blocks
    add(s, "a", 48, output=50)
    step(s)  # a holds 3 blocks, and a 4th for its next token
    add(s, "big", 80)  # needs 5 blocks: its first 63-token chunk would fit in 4, the whole prompt does not
    add(s, "small", 10)
    out = step(s, 1.0)
    assert scheduled(out) == {"a": 1}
    assert [r.request_id for r in s.waiting] == ["big", "small"]


def test_without_full_prompt_reservation_the_first_chunk_is_admitted(make_scheduler):
    s = make_scheduler(num_blocks=9, scheduler_reserve_full_isl=False)
    add(s, "a", 48, output=50)
    step(s)
    add(s, "big", 80)
    assert scheduled(step(s, 1.0)) == {"a": 1, "big": 63}


def test_watermark_applies_when_another_request_runs(make_scheduler):
    for watermark, admitted in ((0.0, {"a": 1, "b": 63}), (0.2, {"a": 1})):
        s = make_scheduler(num_blocks=11, watermark=watermark)  # int(0.2 * 11) = 2 blocks kept free
        add(s, "a", 64, output=50)
        step(s)
        add(s, "b", 64)  # 4 blocks; 5 free once a has its next block: 4 + 2 watermark do not fit
        assert scheduled(step(s, 1.0)) == admitted


def test_watermark_is_not_applied_to_the_first_request(make_scheduler):
    s = make_scheduler(num_blocks=11, watermark=0.5)  # 5 blocks of watermark
    add(s, "a", 64)  # 4 blocks + 5 > 10 free, but nothing else runs
    assert scheduled(step(s)) == {"a": 64}


def test_prefix_hit_is_reported_in_the_step_it_is_taken(make_scheduler):
    s = make_scheduler()
    ids = np.arange(1, 41)
    add(s, "a", 40, prompt_token_ids=ids)
    step(s)
    b = add(s, "b", 40, prompt_token_ids=ids)
    out = step(s, 1.0)
    assert out.cached_tokens == {b: 32}
    assert scheduled(out)["b"] == 8
    assert b.num_cached_tokens == 32


def test_prefix_cache_queries_are_counted_once_per_admission(make_scheduler):
    """vLLM records them at admission (record_prefix_cache_stats), not at each head-of-line lookup."""
    s = make_scheduler(num_blocks=9)
    add(s, "a", 64, output=3)
    step(s)
    add(s, "big", 80)
    for t in range(1, 6):
        step(s, float(t))
    assert s.kv.prefix_queries == 64 + 80


# -- async scheduling ----------------------------------------------------------------------
def test_async_decode_is_scheduled_before_the_last_chunks_output_is_known(make_scheduler):
    s = make_scheduler(async_scheduling=True)
    a = add(s, "a", 40, output=5)
    first = s.schedule(0.0)
    second = s.schedule(0.0)  # step 1 still in flight
    assert scheduled(first) == {"a": 40} and scheduled(second) == {"a": 1}
    assert a.num_output_tokens == 0 and a.num_output_placeholders == 2
    s.update_from_output(first, 1.0)
    assert a.num_output_tokens == 1 and a.first_token_time == 1.0 and a.num_output_placeholders == 1


def test_async_never_schedules_a_step_past_max_tokens(make_scheduler):
    s = make_scheduler(async_scheduling=True)
    a = add(s, "a", 40, output=1)
    first = s.schedule(0.0)
    assert scheduled(s.schedule(0.0)) == {}  # the step in flight already yields the only token
    s.update_from_output(first, 1.0)
    assert a.finish_reason == "length" and a.num_output_tokens == 1


def test_async_two_token_request_runs_two_steps(make_scheduler):
    s = make_scheduler(async_scheduling=True)
    a = add(s, "a", 40, output=2)
    first, second = s.schedule(0.0), s.schedule(0.0)
    s.update_from_output(first, 1.0)
    assert scheduled(s.schedule(1.0)) == {}
    s.update_from_output(second, 2.0)
    assert (a.num_output_tokens, a.finish_time) == (2, 2.0)


def test_async_pipeline_decodes_a_request_once_every_pp_schedule_calls(make_scheduler):
    """vLLM 0.33's V2 model runner with PP 2: a request that sampled is next eligible two calls later,
    whether or not its output is back; a call that schedules nothing counts."""
    s = make_scheduler(async_scheduling=True, pipeline_parallel_size=2)
    a = add(s, "a", 40, output=10)
    assert scheduled(s.schedule(0.0)) == {"a": 40}
    assert scheduled(s.schedule(0.0)) == {}  # step 2: not yet
    assert scheduled(s.schedule(0.0)) == {"a": 1}  # step 3: again, its first token still in flight
    assert a.num_output_placeholders == 2
    b = add(s, "b", 20, output=10)
    assert scheduled(s.schedule(0.0)) == {"b": 20}  # step 4: a waits, b is admitted
    assert scheduled(s.schedule(0.0)) == {"a": 1}  # step 5: a, not b (sampled at step 4)
    assert b.num_output_placeholders == 1


def test_async_without_pipeline_decodes_every_call(make_scheduler):
    s = make_scheduler(async_scheduling=True)
    add(s, "a", 40, output=10)
    assert [scheduled(s.schedule(0.0)) for _ in range(3)] == [{"a": 40}, {"a": 1}, {"a": 1}]


def test_async_preempted_request_keeps_the_token_sampled_in_flight(make_scheduler):
    """vLLM 0.33 delivers the output of a step that was in flight at preemption (num_stale_output_tokens)."""
    s = make_scheduler(num_blocks=7, max_num_batched_tokens=128, async_scheduling=True)
    add(s, "a", 47, output=30)
    b = add(s, "b", 33, output=30)
    in_flight = s.schedule(0.0)
    t = 0.0
    while True:  # the engine loop with a queue two deep
        nxt = s.schedule(t)
        if nxt.preempted:
            break
        t += 1.0
        s.update_from_output(in_flight, t)
        in_flight = nxt
    assert nxt.preempted == [b]
    tokens_before = b.num_output_tokens
    s.update_from_output(in_flight, t + 1.0)  # the step b was part of completes
    assert b.num_output_tokens == tokens_before + 1


def test_async_in_flight_token_can_finish_a_preempted_request(make_scheduler):
    """b's last token is in flight when a's growth preempts it (the newest): the token still comes back and b
    finishes from the waiting queue, as vLLM's update_from_output does (stopped_preempted_reqs)."""
    s = make_scheduler(num_blocks=7, max_num_batched_tokens=128, async_scheduling=True)
    a = add(s, "a", 47, output=30)
    b = add(s, "b", 33, output=2)
    first, second = s.schedule(0.0), s.schedule(0.0)
    s.update_from_output(first, 1.0)
    third = s.schedule(1.0)  # a needs a 4th block: b is preempted although its last step is in flight
    assert third.preempted == [b] and b.num_output_tokens == 1
    s.update_from_output(second, 2.0)
    assert (b.status, b.num_output_tokens, b.finish_time) == (RequestStatus.FINISHED_LENGTH_CAPPED, 2, 2.0)
    assert b not in list(s.waiting) and s.running == [a]
    s.update_from_output(third, 3.0)
    assert s.kv.num_free_blocks == 6 - 4


# -- abort ---------------------------------------------------------------------------------
def test_abort_running_request_frees_its_blocks(make_scheduler):
    s = make_scheduler()
    a = add(s, "a", 100)
    step(s)  # a first chunk of 64 tokens: 4 blocks
    assert s.kv.num_free_blocks == 63 - 4
    assert s.abort(a, 5.0)
    assert (a.status, a.finish_reason, a.finish_time) == (RequestStatus.FINISHED_ABORTED, "abort", 5.0)
    assert s.kv.num_free_blocks == 63 and not s.running


def test_abort_waiting_request_removes_it_from_the_queue(make_scheduler):
    s = make_scheduler(max_num_seqs=1)
    add(s, "a", 10)
    b = add(s, "b", 10)
    step(s)
    assert s.abort(b, 1.0)
    assert not s.waiting and b.finish_reason == "abort"
    assert not s.abort(b, 2.0)  # already finished


def test_abort_of_preempted_request_leaves_no_block_behind(make_scheduler):
    s = make_scheduler(num_blocks=7, max_num_batched_tokens=128)
    add(s, "a", 47, output=3)
    b = add(s, "b", 33)
    for t in range(3):
        step(s, t)
    assert b.status == RequestStatus.PREEMPTED
    assert s.abort(b, 3.0)
    while s.has_unfinished_requests():
        step(s, 4.0)
    assert s.kv.num_free_blocks == 6


def test_priority_queue_orders_by_priority_then_arrival(make_scheduler):
    s = make_scheduler(scheduling_policy="priority", max_num_seqs=1)
    add(s, "late-urgent", 10, priority=0, arrival_time=2.0)
    add(s, "early-lazy", 10, priority=1, arrival_time=0.0)
    add(s, "early-urgent", 10, priority=0, arrival_time=1.0)
    assert scheduled(step(s)) == {"early-urgent": 10}
    assert [r.request_id for r in s.waiting] == ["late-urgent", "early-lazy"]
