"""Pipeline parallelism as vLLM runs it: a batch passes the stages in turn, up to PP batches in flight."""
from __future__ import annotations

import numpy as np
import pytest

from emulator.batch import BatchShape
from emulator.cluster import build_simulation
from emulator.config import EngineArgs
from emulator.request import Request
from profiles.deployment import build_deployment


def _deployment(pp: int, **args):
    return build_deployment("meta-llama/Llama-3.1-8B", "H100",
                            EngineArgs(pipeline_parallel_size=pp, max_model_len=4096, **args))


def _serve(deployment, requests: list[Request]) -> tuple[list[Request], list]:
    sim = build_simulation(deployment, "least_loaded")
    done, steps = [], []
    sim.add_finish_listener(done.append)
    sim.add_listener(steps.append)
    sim.run(iter(requests))
    return done, steps


def _one_request(pp: int) -> Request:
    done, _ = _serve(_deployment(pp), [Request("r", 1000, 100, arrival_time=0.0)])
    return done[0]


def test_a_stage_is_priced_with_its_share_of_the_layers():
    full, half = _deployment(1).cost_model, _deployment(2).cost_model
    assert half.num_layers == full.num_layers // 2 and half.pipeline_stages == 2
    shape = BatchShape.from_chunks([(1, 1000)] * 16)
    assert half.step_time(shape) < full.step_time(shape)
    assert half.stage_transfer(16) > 0.0 and full.stage_transfer(16) == 0.0


@pytest.mark.parametrize("pp", [2, 4])
def test_one_request_is_no_faster_than_without_pipeline(pp):
    alone, piped = _one_request(1), _one_request(pp)
    cost = _deployment(pp).cost_model
    transfers = (pp - 1) * cost.stage_transfer(1)
    tpot = (piped.last_token_time - piped.first_token_time) / (piped.num_output_tokens - 1)
    tpot_alone = (alone.last_token_time - alone.first_token_time) / (alone.num_output_tokens - 1)
    # every token passes all the stages and the hand-offs; only the last stage runs the LM head
    assert tpot >= tpot_alone + transfers
    stage = cost.step_time(BatchShape.from_chunks([(1, 1050)]))
    assert tpot == pytest.approx(pp * stage - (pp - 1) * cost.head_seconds(1) + transfers, rel=0.02)
    assert piped.first_token_time - piped.arrival_time >= alone.first_token_time - alone.arrival_time


def test_throughput_under_load_rises():
    """With the first stage free as soon as a batch moves on, batches of different requests overlap:
    when the server is saturated (here: more arrivals than one GPU serves) the pipeline finishes sooner."""
    finished_by = {}
    for pp in (1, 2):
        rng = np.random.default_rng(1)
        arrivals = np.cumsum(rng.exponential(1 / 160.0, 600))
        requests = [Request(f"r{i}", int(rng.integers(200, 800)), 200, arrival_time=float(t))
                    for i, t in enumerate(arrivals)]
        done, _ = _serve(_deployment(pp), requests)
        finished_by[pp] = max(r.finish_time for r in done)
    assert finished_by[2] < 0.8 * finished_by[1]


@pytest.mark.parametrize("v2,queue", [(True, 3), (False, 2)])
def test_each_stage_runs_one_batch_at_a_time_and_the_queue_bounds_the_batches_in_flight(v2, queue):
    """vLLM 0.33's default V2 model runner keeps async scheduling with PP (a queue of PP + 1); its V1
    runner (VLLM_USE_V2_MODEL_RUNNER=0) turns it off (a queue of PP)."""
    rng = np.random.default_rng(2)
    requests = [Request(f"r{i}", int(rng.integers(50, 400)), 50, arrival_time=float(t))
                for i, t in enumerate(np.cumsum(rng.exponential(1 / 30.0, 200)))]
    deployment = _deployment(2, model_runner_v2=v2)
    _, steps = _serve(deployment, requests)
    assert deployment.config.async_scheduling == v2
    cost = deployment.cost_model
    spans = sorted((s.start, s.end) for s in steps)
    for (start, end), (next_start, _) in zip(spans, spans[1:]):
        assert next_start >= start  # the first stage takes batches in order ...
    first_stage = [(s.start, s.start + cost.stage_seconds(cost.step_time(s.shape), s.shape.num_reqs)[0])
                   for s in steps if s.shape.num_tokens]
    first_stage.sort()
    assert all(b[0] >= a[1] - 1e-12 for a, b in zip(first_stage, first_stage[1:]))  # ... one at a time
    for start, _ in spans:
        assert sum(1 for s, e in spans if s <= start < e) <= queue


@pytest.mark.parametrize("value, v2", [(None, True), ("1", True), ("0", False), ("false", False)])
def test_vllm_use_v2_model_runner_picks_the_runner_as_vllm_reads_it(monkeypatch, value, v2):
    from emulator.engine_flags import model_runner_v2
    if value is None:
        monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    else:
        monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", value)
    assert model_runner_v2() is v2
    assert _deployment(2, model_runner_v2=model_runner_v2()).config.async_scheduling is v2
