"""The simulation's per-record listeners: a run of decode steps heard at once reads the same as its steps heard
one by one (TimeSeries, InterTokenLatencies), and the power model's decode steps are priced by the key its
_split makes for them."""
from __future__ import annotations

import pytest

from emulator.cluster import build_simulation
from emulator.config import EngineArgs
from emulator.engine import RunRecord, StepRecord
from emulator.power import _CONTEXT_GRAIN, PowerModel
from emulator.request import Request
from emulator.stats import InterTokenLatencies, TimeSeries
from profiles.deployment import build_deployment


@pytest.fixture(scope="module")
def h100():
    return build_deployment("meta-llama/Llama-3.1-8B", "H100", EngineArgs(max_model_len=8192))


def workload() -> list[Request]:
    """Arrivals every 0.4 s, long enough outputs that decode runs span several ticks of 0.05 s."""
    return [Request(f"r{i}", 300 + 97 * (i % 7), 150 + 31 * (i % 5), arrival_time=0.4 * i) for i in range(24)]


def test_runs_heard_at_once_read_as_their_steps(h100):
    sim = build_simulation(h100)
    names = [sim.instance_of[e.index].name for e in sim.engines]
    at_once, by_step = TimeSeries(1, tick=0.05, instance_of=names), TimeSeries(1, tick=0.05, instance_of=names)
    itl_at_once, itl_by_step = InterTokenLatencies(names), InterTokenLatencies(names)
    runs: list[RunRecord] = []
    sim.add_listener(at_once.on_step, at_once.on_run)
    sim.add_listener(by_step.on_step)  # no on_run: the simulation hands it each step of a run
    sim.add_listener(itl_at_once.on_step, itl_at_once.on_run)
    sim.add_listener(itl_by_step.on_step)
    sim.add_listener(lambda record: None, runs.append)
    sim.add_finish_listener(itl_at_once.on_finish)
    sim.add_finish_listener(itl_by_step.on_finish)
    requests = workload()
    sim.run(requests)
    end = max(r.finish_time for r in requests)
    # runs of several steps, some ending in the tick they start in and some crossing ticks
    assert sum(r.num_steps for r in runs) > 100
    assert any(int(r.ends[0] / 0.05) != int(r.ends[-1] / 0.05) for r in runs)
    assert any(int(r.ends[0] / 0.05) == int(r.ends[-1] / 0.05) and r.num_steps > 1 for r in runs)
    rows = at_once.finish(end)
    assert rows == by_step.finish(end)
    assert sum(row["gen_throughput"] * at_once.width(k, end) for k, row in enumerate(rows)) == pytest.approx(
        sum(r.num_output_tokens for r in requests))
    assert itl_at_once.distribution() == itl_by_step.distribution()
    assert itl_at_once.distribution()["count"] == sum(r.num_output_tokens - 1 for r in requests)


def test_a_decode_step_is_priced_by_its_split_key(h100):
    sim = build_simulation(h100)
    model = PowerModel(sim)
    decode_steps: list[StepRecord] = []
    sim.add_listener(lambda record: decode_steps.append(record)  # steps heard as steps (the power model's too)
                     if record.shape is not None and record.shape.num_decode == record.shape.num_tokens else None,
                     lambda run: None)
    sim.run(workload())
    assert len(decode_steps) > 20
    e = model.engines[0]
    for record in decode_steps:
        shape = record.shape
        key = (shape.num_tokens, shape.num_reqs, 0, 0, shape.num_decode,
               shape.decode_context // shape.num_decode // _CONTEXT_GRAIN)
        assert e.priced[key] is model._split(e, shape)  # what on_step looked up is what _split prices
