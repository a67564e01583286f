"""Async external KV loads and the prefills in flight (vLLM 0.33 v1/core/sched/scheduler.py: reserved_blocks,
_inflight_prefill_reserved_blocks, kv_holding_waiting): a load may take only the blocks the in-flight
prefills do not still need, and the requests holding blocks are tried before the other waiting ones.
Without both, loads could hold the blocks the others need and the engine deadlocked."""
from __future__ import annotations

import math

import numpy as np

from emulator.cluster import ClusterSpec, build_cluster
from emulator.config import EngineArgs
from emulator.instance import InstanceSpec
from emulator.kv_transfer import ExternalKV
from emulator.request import Request, RequestStatus
from profiles.deployment import build_deployment


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
