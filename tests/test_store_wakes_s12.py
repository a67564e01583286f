"""Offline, an idle engine does not wake at its own offload store jobs' ends, nor when a P/D prefill's blocks
are freed by the decode side's read, when nothing else reads what those wakes would do
(EngineLoop._wait_for_stores, EngineLoop.defer_wake): every request, tier and counter ends as with those
wakes, and what is left when the simulation ends is done then (nothing stays pinned or in flight)."""
from __future__ import annotations

import numpy as np
import pytest

from emulator import engine_loop
from emulator.cluster import ClusterSpec, build_cluster
from emulator.config import EngineArgs
from emulator.instance import InstanceSpec
from emulator.kv_tiers import Offload
from emulator.request import Request
from profiles.deployment import build_deployment
from test_disaggregation import MODEL, assert_nothing_held_or_lost, multi_turn_requests


def replay(build, requests_of, monkeypatch, wake_always: bool):
    """Run the replay; with `wake_always`, as before: every idle engine wakes at each store job's end and at
    each free of a prefill's blocks."""
    with monkeypatch.context() as patch:
        if wake_always:
            patch.setattr(Offload, "unwatched", property(lambda self: False))
            patch.setattr(engine_loop.EngineLoop, "defer_wake", lambda self, now: False)
        runs = [0]
        run = engine_loop.EngineLoop.run

        def counted(self, *args, **kwargs):
            runs[0] += 1
            return run(self, *args, **kwargs)
        patch.setattr(engine_loop.EngineLoop, "run", counted)
        sim = build()
        requests = requests_of()
        sim.run(requests)
    assert_nothing_held_or_lost(sim, requests)
    tiers = []
    for engine in sim.engines:
        offload = engine.kv.offload
        if offload is None:
            continue
        assert not offload.in_flight and not offload.queued and not offload.storing  # every job ended
        assert not offload.finishing
        for tier in offload.tiers:
            tiers.append((list(tier.blocks), tier.stored, tier.evicted, tier.loaded))
    timings = [(r.request_id, r.first_token_time, r.finish_time, r.num_cached_tokens, r.num_external_tokens)
               for r in requests]
    return timings, tiers, runs[0]


def short_answers(requests: list[Request]) -> list[Request]:
    return [Request(r.request_id, r.num_prompt_tokens, 1, arrival_time=r.arrival_time,
                    prompt_token_ids=r.prompt_token_ids) for r in requests]


def offload_cluster():
    deployment = build_deployment(MODEL, "H100", EngineArgs(max_model_len=16384, num_gpu_blocks_override=1500,
                                                            kv_offloading_size=1.0))
    nodes = {"n0": {"cxl_memory": 64 * 2 ** 30, "cxl_bandwidth": 30e9, "cxl_latency": 2e-6}}
    return build_cluster(ClusterSpec((InstanceSpec("i", deployment, ("llama",), node="n0"),), nodes=nodes))


def pd_offload_cluster(offload: float | None = 1.0):
    prefill = build_deployment(MODEL, "H100", EngineArgs(max_model_len=16384, num_gpu_blocks_override=1500,
                                                         kv_offloading_size=offload))
    decode = build_deployment(MODEL, "H100", EngineArgs(max_model_len=16384))
    specs = (InstanceSpec("p", prefill, ("llama",), "prefill", "n0"),
             InstanceSpec("d", decode, ("llama",), "decode", "n0"))
    return build_cluster(ClusterSpec(specs, "least_loaded"))


def pd_cluster():
    return pd_offload_cluster(None)


@pytest.mark.parametrize("build", [offload_cluster, pd_offload_cluster, pd_cluster],
                         ids=["cpu+cxl", "pd, prefill offloads", "pd"])
def test_idle_engines_skip_store_wakes_with_the_same_results(build, monkeypatch):
    def requests():  # multi-turn chats (later turns hit what earlier ones stored) with short answers: the engine is
        # idle while the last stores still copy
        return short_answers(multi_turn_requests(20, 3))
    timings, tiers, runs = replay(build, requests, monkeypatch, wake_always=False)
    timings_before, tiers_before, runs_before = replay(build, requests, monkeypatch, wake_always=True)
    assert timings == timings_before
    assert tiers == tiers_before
    assert not tiers or any(t[1] for t in tiers)  # the tiers stored something
    assert runs < runs_before  # wakes were left out


def test_an_engine_wakes_for_its_store_jobs_when_their_ends_are_watched(monkeypatch):
    """KV events or connector metrics read a store job's end: the idle engine wakes for it as before."""
    watched = [False]

    def build():
        sim = offload_cluster()
        offload = sim.engines[0].kv.offload
        if watched[0]:
            offload.job_listeners.append(lambda job: None)
        return sim
    _, _, quiet = replay(build, lambda: short_answers(multi_turn_requests(20, 3)), monkeypatch, wake_always=False)
    watched[0] = True
    _, _, woken = replay(build, lambda: short_answers(multi_turn_requests(20, 3)), monkeypatch, wake_always=False)
    _, _, before = replay(build, lambda: short_answers(multi_turn_requests(20, 3)), monkeypatch, wake_always=True)
    assert quiet < woken == before


def test_the_jobs_left_at_the_end_end_at_their_own_times(monkeypatch):
    """A lone prefill: its stores are still copying when it finishes, and nothing comes after it."""
    def run(wake_always: bool):
        with monkeypatch.context() as patch:
            if wake_always:
                patch.setattr(Offload, "unwatched", property(lambda self: False))
            sim = offload_cluster()
            request = Request("r", 6000, 1, arrival_time=0.0)
            sim.run([request])
        offload = sim.engines[0].kv.offload
        assert not offload.in_flight and not offload.storing and not any(tier.pins for tier in offload.tiers)
        assert sim.loops[0].stores_due is None and sim.loops[0].wake_at is None
        return sim.now, request.finish_time
    now, finished = run(wake_always=False)
    assert now > finished  # the clock stands at the last store's end, as its wake left it
    assert (now, finished) == run(wake_always=True)


def test_a_free_after_a_left_out_store_end_sees_that_store_ended(monkeypatch):
    """A prefill's store fails (its CPU tier is full of chunks still being copied over a slow host link); the
    decode side's read frees it after those copies ended, and the free retries the store: the wakes left out
    at the copies' ends are done first (EngineLoop.catch_up), so the retry finds them unpinned, as it did when
    the idle engine woke at each end (found by review: without the catch-up, one more store failed)."""
    def build():
        prefill = build_deployment(MODEL, "H100", EngineArgs(max_model_len=16384, num_gpu_blocks_override=1500,
                                                             kv_offloading_size=1.0))
        decode = build_deployment(MODEL, "H100", EngineArgs(max_model_len=16384))
        specs = (InstanceSpec("p", prefill, ("llama",), "prefill", "n0"),
                 InstanceSpec("d", decode, ("llama",), "decode", "n1"))
        nodes = {"n0": {"host_memory_bandwidth": 2e9}}
        links = ({"between": ("n0", "n1"), "bandwidth": 2e9, "latency": 1e-5},)
        return build_cluster(ClusterSpec(specs, "least_loaded", nodes=nodes, links=links))

    def requests():
        rng = np.random.default_rng(1)
        a, b = rng.integers(0, 30000, 6000), rng.integers(0, 30000, 6000)
        c = np.concatenate([b, rng.integers(0, 30000, 100)])
        return [Request("A", 6000, 1, arrival_time=0.0, prompt_token_ids=a),
                Request("B", 6000, 1, arrival_time=0.0, prompt_token_ids=b),
                Request("C", 6100, 1, arrival_time=20.0, prompt_token_ids=c)]

    def run(wake_always: bool):
        with monkeypatch.context() as patch:
            if wake_always:
                patch.setattr(Offload, "unwatched", property(lambda self: False))
            sim = build()
            offload = sim.engines[0].kv.offload
            rs = requests()
            sim.run(rs)
        timings = [(r.first_token_time, r.finish_time, r.num_cached_tokens, r.num_external_tokens) for r in rs]
        return timings, offload.allocation_failures, [(t.stored, t.evicted) for t in offload.tiers]
    new, old = run(False), run(True)
    assert old[1] >= 1  # the case: a store failed
    assert new == old
