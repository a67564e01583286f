"""One engine's loop in virtual time: sync and async scheduling, waking, timestamps.

Every step costs exactly 1 s here (a fixed step cost), so times are step boundaries.
vLLM's EngineCore takes new requests between steps; with async scheduling its batch
queue is two deep, so the step after the running one is already planned.
"""
from __future__ import annotations

import pytest

from emulator.engine import StepRecord
from emulator.request import Request, RequestStatus
from emulator.simulation import Simulation


def run(sim: Simulation, requests: list[Request]) -> list[StepRecord]:
    records: list[StepRecord] = []
    sim.add_listener(records.append)
    sim.run(requests)
    return records


def first_step_of(records: list[StepRecord], request_id: str) -> int:
    return next(r.step for r in records if any(q.request_id == request_id for q in r.scheduled))


@pytest.mark.parametrize("async_scheduling, first_step, first_token", [(False, 3, 3.0), (True, 4, 4.0)])
def test_request_arriving_during_step_k_runs_in_step_k_plus_1_sync_or_k_plus_2_async(
        make_simulation, async_scheduling, first_step, first_token):
    a = Request("a", 20, 10, arrival_time=0.0)
    b = Request("b", 20, 2, arrival_time=1.5)  # during step 2, which runs from 1 s to 2 s
    records = run(make_simulation(async_scheduling=async_scheduling), [a, b])
    assert first_step_of(records, "b") == first_step
    assert b.queued_time == 2.0  # the loop takes input when step 2's output is processed
    assert b.scheduled_time == 2.0
    assert b.first_token_time == first_token


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_steps_run_back_to_back_while_there_is_work(make_simulation, async_scheduling):
    records = run(make_simulation(async_scheduling=async_scheduling), [Request("a", 20, 5)])
    assert [(r.start, r.duration) for r in records] == [(float(t), 1.0) for t in range(5)]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_request_timestamps(make_simulation, async_scheduling):
    a = Request("a", 100, 3, arrival_time=0.25)  # two prefill chunks of the 64-token budget
    run(make_simulation(async_scheduling=async_scheduling), [a])
    assert (a.queued_time, a.scheduled_time) == (0.25, 0.25)
    assert a.first_token_time == 2.25
    assert a.finish_time == a.last_token_time == 4.25
    assert a.finish_reason == "length"


def test_idle_engine_wakes_when_a_request_arrives(make_simulation):
    a = Request("a", 20, 1, arrival_time=0.0)
    b = Request("b", 20, 1, arrival_time=10.0)
    records = run(make_simulation(), [a, b])
    assert [r.start for r in records] == [0.0, 10.0]
    assert (b.queued_time, b.scheduled_time, b.finish_time) == (10.0, 10.0, 11.0)


def test_engine_with_nothing_to_do_sleeps(make_simulation):
    sim = make_simulation()
    assert sim.next_event_time() is None
    sim.run([Request("a", 20, 2)])
    assert sim.next_event_time() is None and sim.engines[0].is_idle


@pytest.mark.parametrize("async_scheduling, planned", [(False, 1), (True, 2)])
def test_engine_wakes_at_the_end_of_the_step_it_waits_on(make_simulation, async_scheduling, planned):
    sim = make_simulation(async_scheduling=async_scheduling)
    steps: list[StepRecord] = []
    sim.add_listener(steps.append)
    a = Request("a", 20, 5)
    sim.submit(a)
    assert sim.next_event_time() == 0.0
    sim.advance(0.5)
    assert not steps and a.num_computed_tokens == 20 + planned - 1  # the prompt, and a decode if async
    assert sim.next_event_time() == 1.0
    sim.advance(1.0)
    assert [r.step for r in steps] == [1] and a.num_output_tokens == 1
    assert sim.next_event_time() == 2.0


def test_every_block_is_free_and_every_request_finished_at_the_end(make_simulation):
    sim = make_simulation(num_blocks=20, async_scheduling=True)
    requests = [Request(f"r{i}", 30 + 7 * i, 40, arrival_time=0.1 * i) for i in range(8)]
    records = run(sim, requests)
    assert sum(len(r.preempted) for r in records) > 0  # the cache was too small for all of them at once
    assert all(r.status == RequestStatus.FINISHED_LENGTH_CAPPED and r.num_output_tokens == 40 for r in requests)
    assert sim.engines[0].is_idle and sim.engines[0].kv.num_free_blocks == 19
    assert not sim.active


def test_abort_before_the_engine_takes_the_request(make_simulation):
    sim = make_simulation()
    a = Request("a", 20, 5, arrival_time=0.0)
    sim.submit(a)
    assert sim.abort("a")
    assert a.status == RequestStatus.FINISHED_ABORTED and a.finish_time == 0.0
    sim.advance(5.0)
    assert a.num_computed_tokens == 0 and sim.engines[0].is_idle


def test_abort_of_a_running_request_frees_its_blocks_and_reports_it(make_simulation):
    sim = make_simulation()
    kv = sim.engines[0].kv
    ended: list[Request] = []
    sim.add_finish_listener(ended.append)
    a = Request("a", 40, 100)
    sim.submit(a)
    sim.advance(5.0)
    assert a.num_output_tokens == 5 and kv.num_free_blocks < 63
    assert sim.abort("a")
    assert ended == [a] and a.finish_reason == "abort" and a.finish_time == 5.0
    assert kv.num_free_blocks == 63
    sim.advance(10.0)
    assert sim.engines[0].is_idle and not sim.abort("a")


def test_arrival_at_a_step_boundary_joins_the_next_step(make_simulation):
    """Ties go to arrivals: a request arriving exactly when a step ends is in the next schedule."""
    a = Request("a", 20, 10, arrival_time=0.0)
    b = Request("b", 20, 2, arrival_time=2.0)
    records = run(make_simulation(), [a, b])
    assert first_step_of(records, "b") == 3


def test_unsorted_arrivals_are_rejected(make_simulation):
    with pytest.raises(ValueError, match="not sorted"):
        make_simulation().run([Request("a", 20, 2, arrival_time=1.0), Request("b", 20, 2, arrival_time=0.5)])
