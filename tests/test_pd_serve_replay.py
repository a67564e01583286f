"""A P/D cluster (its own proxy at the front door) served times every request as an offline replay of the
same arrivals does: a 1P+1D pair and a 2P+2D cluster, over HTTP, and driven as the server's pacer drives the
core (its timer firing late, by up to several decode steps) against Simulation.run. Virtual time only."""
from __future__ import annotations

import json
import math
import random

import pytest

from emulator.cluster import build_cluster
from emulator.request import Request
from loadgen.replay import replay
from profiles.cluster_file import read_cluster_file
from served_trace import TIMING_KEYS, differences, send_paced, write_served_trace
from server.testing import running_server


def advanced_as_served(sim, requests: list[Request], late: float) -> None:
    """As the server's pacer drives the core: advanced to its present (up to `late` past the next event), each
    arrival submitted then."""
    pending = list(requests)
    while (t := sim.next_event_time()) is not None or pending:
        if pending and (t is None or pending[0].arrival_time <= t):
            request = pending.pop(0)
            sim.advance(math.nextafter(request.arrival_time, -math.inf))
            sim.submit_group([request])
        else:
            before_arrival = math.nextafter(pending[0].arrival_time, -math.inf) if pending else math.inf
            sim.advance(max(t, min(t + late, before_arrival)))


def _pd_cluster(prefills: int, decodes: int) -> str:
    return f"""
routing: least_loaded
engine: {{max-model-len: 8192}}
instances:
  - {{name: prefill, model: meta-llama/Llama-3.1-8B, hardware: H100, count: {prefills},
     kv-transfer-config: {{kv_connector: NixlConnector, kv_role: kv_producer}}}}
  - {{name: decode, model: meta-llama/Llama-3.1-8B, hardware: H100, count: {decodes},
     kv-transfer-config: {{kv_connector: NixlConnector, kv_role: kv_consumer}}}}
"""


def _workload(seed: int, n: int) -> list[tuple[str, list[int], int, float]]:
    """(id, prompt, max_tokens, arrival): a third share a 256-token prefix."""
    rng = random.Random(seed)
    shared = [rng.randrange(1000, 30000) for _ in range(256)]
    work, t = [], 0.0
    for i in range(n):
        own = [rng.randrange(1000, 30000) for _ in range(rng.randrange(20, 1500))]
        t += rng.expovariate(1 / 0.004)
        work.append((f"r{i}", shared + own if i % 3 == 0 else own, rng.randrange(1, 120), t))
    return work


@pytest.mark.parametrize("prefills, decodes", [(1, 1), (2, 2)])
@pytest.mark.parametrize("late", [0.0, 0.05, 0.3])
def test_a_pd_cluster_advanced_as_a_server_does_times_requests_as_run_does(tmp_path, prefills, decodes, late):
    """The pacer advances the core to its present (`late` after the next event: a decode step is ~7 ms) and
    submits each arrival then; a prefill ending meanwhile hands its request to a decode engine, which must not
    have committed steps past that hand-over."""
    path = tmp_path / "cluster.yaml"
    path.write_text(_pd_cluster(prefills, decodes))
    work = _workload(7, 40)

    def requests():
        return [Request(rid, len(p), m, arrival_time=a, prompt_token_ids=p) for rid, p, m, a in work]
    offline = requests()
    build_cluster(read_cluster_file(path)[0]).run(offline)
    sim, served = build_cluster(read_cluster_file(path)[0]), requests()
    advanced_as_served(sim, served, late)
    assert not sim.active
    for a, b in zip(offline, served):
        assert a.num_external_tokens == b.num_external_tokens > 0 and a.finish_reason == b.finish_reason == "length"
        for key in TIMING_KEYS:
            assert getattr(b, key) == pytest.approx(getattr(a, key), abs=1e-9), (a.request_id, key)


@pytest.mark.parametrize("prefills, decodes", [(1, 1), (2, 2)])
async def test_a_served_pd_cluster_times_every_request_as_an_offline_replay_of_the_same_arrivals(
        tmp_path, prefills, decodes):
    path = tmp_path / "cluster.yaml"
    path.write_text(_pd_cluster(prefills, decodes))
    spec = read_cluster_file(path)[0]
    work = _workload(7, 36)  # sent `gap` wall seconds apart: at --speed 25, 25 times as far apart in virtual time
    workload = [{"id": rid, "prompt": prompt, "max_tokens": max_tokens, "gap": arrival - previous}
                for (rid, prompt, max_tokens, arrival), previous in zip(work, [0.0] + [w[3] for w in work])]
    log_path = tmp_path / "server.jsonl"
    async with running_server("--speed", "25", "--request-log", str(log_path), deployment=spec) as server:
        outputs = await send_paced(server.url, workload, lambda item: {
            "prompt": item["prompt"], "max_tokens": item["max_tokens"], "ignore_eos": True, "return_token_ids": True})
    served = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert len(served) == len(workload)
    trace = tmp_path / "trace.jsonl"
    write_served_trace(trace, served, workload, outputs)
    replay(str(trace), read_cluster_file(path)[0], tmp_path / "replay")
    replayed = [json.loads(line) for line in (tmp_path / "replay" / "requests.jsonl").read_text().splitlines()]
    diffs = differences(served, replayed)
    assert not diffs, diffs[:10]
