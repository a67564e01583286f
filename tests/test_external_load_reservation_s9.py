"""Async external KV loads and the prefills in flight (vLLM 0.33 v1/core/sched/scheduler.py: reserved_blocks,
_inflight_prefill_reserved_blocks, kv_holding_waiting): a load may take only the blocks the in-flight
prefills do not still need, and the requests holding blocks are tried before the other waiting ones.
Without both, loads could hold the blocks the others need and the engine deadlocked."""
from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest

from emulator.cluster import ClusterSpec, build_cluster
from emulator.config import EngineArgs
from emulator.instance import InstanceSpec
from emulator.kv_transfer import ExternalKV
from emulator.request import Request, RequestStatus
from profiles.deployment import build_deployment
from vllm_venv import run_vllm_side, vllm_python_or_skip

VLLM_SIDE = Path(__file__).resolve().parent / "external_load_vllm_side_s9.py"


def tokens(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 30000, n)


def request(rid: str, prompt: int, output: int, seed: int, **kw) -> Request:
    return Request(rid, prompt, output, prompt_token_ids=tokens(prompt, seed), **kw)


def loading(rid: str, prompt: int, external: int, seed: int, **kw) -> Request:
    r = request(rid, prompt, 4, seed, **kw)
    r.external_kv = ExternalKV(external, object())  # a P/D remote prefill, say: loaded asynchronously
    return r


def step(scheduler, now: float):
    out = scheduler.schedule(now)
    scheduler.update_from_output(out, now)
    return out


def test_a_load_is_refused_the_blocks_a_prefill_in_flight_still_needs(make_scheduler):
    # 16 usable blocks of 16 tokens; a 32-token cap on each prefill chunk
    scheduler = make_scheduler(17, long_prefill_token_threshold=32, watermark=0.0)
    kv = scheduler.kv
    a = request("a", 160, 2, 1)  # 10 blocks, prefilled 2 blocks a step
    b = loading("b", 192, 176, 2)  # its load takes 11 blocks
    scheduler.add_request(a)
    scheduler.add_request(b)
    out = scheduler.schedule(0.0)
    # a holds 2 blocks and needs 8 more: 14 free, 11 would fit, but not 11 with 8 kept for a
    assert out.num_scheduled_tokens == {a: 32} and not out.kv_loads
    assert a in scheduler.inflight_prefills and sum(map(kv.remaining_blocks, scheduler.inflight_prefills)) == 8
    assert kv.num_free_blocks == 14 and b.kv_blocks is None and not b.kv_loading
    scheduler.update_from_output(out, 0.0)
    t = 1.0
    while a.num_computed_tokens < 160:  # a's prefill runs to its end, never preempted
        out = step(scheduler, t)
        assert not out.kv_loads and not out.preempted
        t += 1
    assert a not in scheduler.inflight_prefills  # its last chunk took it out
    while not a.is_finished:
        step(scheduler, t)
        t += 1
    out = step(scheduler, t)  # a's blocks are back: b's load starts, and b waits in flight itself
    assert out.kv_loads == [(b, 0, 176)] and b.kv_loading and b in scheduler.inflight_prefills
    assert kv.remaining_blocks(b) == 1  # 12 blocks for 192 tokens, 11 held


def test_a_plain_admission_is_not_held_back_by_the_reservation(make_scheduler):
    # vLLM applies reserved_blocks to async loads only: a request with nothing to load is admitted as ever
    scheduler = make_scheduler(17, long_prefill_token_threshold=32, watermark=0.0)
    a, c = request("a", 160, 2, 1), request("c", 160, 2, 3)
    scheduler.add_request(a)
    scheduler.add_request(c)
    out = scheduler.schedule(0.0)
    # 14 free after a's chunk: c's 10 fit, though a still needs 8 of them
    assert out.num_scheduled_tokens == {a: 32, c: 32}
    assert scheduler.inflight_prefills == {a, c}


def test_a_loaded_request_is_tried_before_a_waiting_head_that_holds_no_blocks(make_scheduler):
    # priority policy: h outranks b, but b holds blocks (vLLM's kv_holding_waiting is drained first)
    scheduler = make_scheduler(17, max_num_batched_tokens=256, scheduling_policy="priority", watermark=0.0)
    kv = scheduler.kv
    r = request("r", 160, 100, 1, priority=0)
    scheduler.add_request(r)
    step(scheduler, 0.0)  # r prefills whole: 10 blocks, 11 once it decodes
    b = loading("b", 64, 48, 2, priority=1)
    scheduler.add_request(b)
    out = step(scheduler, 1.0)
    assert out.kv_loads == [(b, 0, 48)] and kv.num_blocks_held(b) == 3 and kv.num_free_blocks == 2
    h = request("h", 96, 2, 3, priority=0)  # 6 blocks: it cannot be admitted while r runs
    scheduler.add_request(h)
    scheduler.external_kv_loaded(b, True)
    assert list(scheduler.waiting) == [b, h]
    out = step(scheduler, 2.0)
    assert out.num_scheduled_tokens == {r: 1, b: 16} and b.status == RequestStatus.RUNNING
    assert h.status == RequestStatus.WAITING and kv.num_blocks_held(h) == 0


def test_a_paused_engine_admits_only_the_requests_holding_blocks(make_scheduler):
    # PAUSED_NEW: vLLM still drains kv_holding_waiting (an async load's request), and nothing else
    scheduler = make_scheduler(65, watermark=0.0)
    b = loading("b", 64, 48, 2)
    scheduler.add_request(b)
    out = step(scheduler, 0.0)
    assert out.kv_loads == [(b, 0, 48)]
    p = request("p", 32, 2, 4)
    scheduler.add_request(p)
    scheduler.external_kv_loaded(b, True)
    out = scheduler.schedule(1.0, admit=False)
    assert out.num_scheduled_tokens == {b: 16}
    assert p.status == RequestStatus.WAITING and list(scheduler.waiting) == [p]
    scheduler.update_from_output(out, 1.0)
    out = scheduler.schedule(2.0, admit=False)
    assert p not in out.num_scheduled_tokens


def _offload_run(seed: int, caching: bool) -> tuple[list[Request], object]:
    """The review's reproducer: Llama-8B with 150 KV blocks and a 2 GiB CPU offload tier, 80 requests sharing
    5 prefixes, their loads slow (0.1 GB/s host memory)."""
    rng = np.random.default_rng(seed)
    d = build_deployment("meta-llama/Llama-3.1-8B", "H100", EngineArgs(
        max_model_len=1500, num_gpu_blocks_override=150, kv_offloading_size=2.0, enable_prefix_caching=caching,
        max_num_batched_tokens=512))
    sim = build_cluster(ClusterSpec((InstanceSpec("i0", d, ("m",), node="n0"),),
                                    nodes={"n0": {"host_memory_bandwidth": 1e8}}))
    prefixes = [rng.integers(0, 30000, 1000) for _ in range(5)]
    reqs, t = [], 0.0
    for i in range(80):
        t += float(rng.exponential(0.05))
        p = prefixes[int(rng.integers(0, 5))]
        prompt = np.concatenate([p[:int(rng.integers(200, 1000))], rng.integers(0, 30000, int(rng.integers(1, 200)))])
        r = Request(f"r{i}", len(prompt), int(rng.integers(1, 100)), arrival_time=t, prompt_token_ids=prompt)
        reqs.append(r)
        sim.advance(t)
        sim.submit(r)
    sim.advance(1e6)
    return reqs, sim


def test_offload_tier_loads_no_longer_deadlock_the_engine():
    # seed 0 without prefix caching deadlocked on loaded requests behind a head needing more blocks; seed 1
    # with caching on loads that took the blocks of prefills in flight
    for seed, caching in ((0, False), (1, True)):
        reqs, sim = _offload_run(seed, caching)
        engine = sim.engines[0]
        engine.kv.offload.advance(math.inf)
        assert all(r.is_finished for r in reqs) and all(r.status != RequestStatus.FINISHED_ABORTED for r in reqs)
        assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks - 1
        assert sim.transfers.stats[0].tier_loading_blocks == 0 and not engine.scheduler.inflight_prefills
        assert not sim.transfers.loads and not engine.scheduler.held


# -- against vLLM's own scheduler, with a KV connector whose loads are all asynchronous ---------------------------
def _jobs() -> list[dict]:
    """The two scenarios above, then random ones: requests sharing prefixes, and others loading part of their
    (unshared) prompt for 1-4 steps, in a cache too small for all of them. (Loads of a shared prefix are left
    out: vLLM caches a received load's blocks when its scheduler reaches the request in its queue, ours when
    the load ends, so two loads ending together can leave different copies cached.)"""
    rng = np.random.default_rng(0)

    def spec(rid, prompt, max_tokens, arrive=0, external=0, load_steps=1, priority=0):
        return {"id": rid, "prompt": [int(t) for t in prompt], "max_tokens": max_tokens, "priority": priority,
                "arrive": arrive, "external": external, "load_steps": load_steps}

    jobs = [
        {"num_blocks": 17, "budget": 64, "threshold": 32, "policy": "fcfs", "requests": [
            spec("a", tokens(160, 1), 2), spec("b", tokens(192, 2), 4, external=176, load_steps=2)]},
        {"num_blocks": 17, "budget": 256, "threshold": 0, "policy": "priority", "requests": [
            spec("r", tokens(160, 1), 100), spec("b", tokens(64, 2), 4, arrive=1, external=48, priority=1),
            spec("h", tokens(96, 3), 2, arrive=2, priority=0)]},
    ]
    for seed in range(10):
        pick = random.Random(seed)
        prefixes = [rng.integers(0, 30000, 400) for _ in range(3)]
        requests = []
        for i in range(14):
            prompt = np.concatenate([prefixes[pick.randrange(3)][:pick.randrange(0, 400)],
                                     rng.integers(0, 30000, pick.randrange(1, 120))])
            external = pick.choice((0, 0, len(prompt) // 2, len(prompt), len(prompt) - len(prompt) % 16))
            if external:
                prompt = rng.integers(0, 30000, len(prompt))
            requests.append(spec(f"q{i}", prompt, pick.randrange(1, 40), arrive=pick.randrange(0, 30),
                                 external=external, load_steps=pick.randrange(1, 5), priority=pick.randrange(2)))
        jobs.append({"num_blocks": pick.choice((40, 60, 90)), "budget": pick.choice((64, 128, 256)),
                     "threshold": pick.choice((0, 48)), "policy": pick.choice(("fcfs", "priority")),
                     "requests": requests})
    return jobs


def _ours(make_scheduler, job: dict) -> list[dict]:
    """What our Scheduler does on `job`, in the vLLM side's terms (tests/external_load_vllm_side_s9.py)."""
    scheduler = make_scheduler(job["num_blocks"], max_num_batched_tokens=job["budget"], max_model_len=1024,
                               long_prefill_token_threshold=job["threshold"], scheduling_policy=job["policy"],
                               watermark=0.0, enable_prefix_caching=True, enable_chunked_prefill=True)
    requests: dict[str, Request] = {}
    received: dict[int, list[Request]] = {}
    steps = []
    last_arrival = max(r["arrive"] for r in job["requests"])
    load_steps = {r["id"]: r["load_steps"] for r in job["requests"]}
    for k in range(400):
        for r in received.pop(k, ()):
            scheduler.external_kv_loaded(r, True)  # reported with the last call's output
        for r in job["requests"]:
            if r["arrive"] == k:
                req = requests[r["id"]] = Request(r["id"], len(r["prompt"]), r["max_tokens"], arrival_time=float(k),
                                                  priority=r["priority"],
                                                  prompt_token_ids=np.array(r["prompt"], dtype=np.int64))
                if r["external"]:
                    req.external_kv = ExternalKV(r["external"], object())
                scheduler.add_request(req)
        if k > last_arrival and not scheduler.has_unfinished_requests():
            break
        running = set(scheduler.running)
        out = scheduler.schedule(float(k))
        scheduled = out.num_scheduled_tokens
        hits = {r.request_id: r.num_computed_tokens - n for r, n in scheduled.items() if r not in running}
        started = sorted(r.request_id for r, _, _ in out.kv_loads)
        for r, _, _ in out.kv_loads:
            received.setdefault(k + load_steps[r.request_id], []).append(r)
        scheduler.update_from_output(out, float(k))
        steps.append({"scheduled": {r.request_id: n for r, n in scheduled.items()}, "loads": started,
                      "preempted": sorted(r.request_id for r in out.preempted), "hits": hits,
                      "free": scheduler.kv.num_free_blocks,
                      "held": {r.request_id: len(r.kv_blocks) for r in requests.values() if r.kv_blocks}})
    return steps


def _trimmed(steps: list[dict]) -> list[dict]:
    while steps and not steps[-1]["scheduled"] and not steps[-1]["loads"]:
        steps = steps[:-1]
    return steps


@pytest.mark.vllm
def test_loads_and_admissions_step_by_step_as_vllms_scheduler_with_an_async_connector(make_scheduler):
    python = vllm_python_or_skip()
    for i, job in enumerate(_jobs()):
        theirs = _trimmed(run_vllm_side(python, VLLM_SIDE, job)["steps"])
        ours = _trimmed(_ours(make_scheduler, job))
        for k, (a, b) in enumerate(zip(ours, theirs)):
            assert a == b, (i, k, a, b)
        assert len(ours) == len(theirs), i
