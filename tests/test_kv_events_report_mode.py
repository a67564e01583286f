"""kv_cache_report_mode "full": vLLM 0.33 (v1/core/kv_cache_manager.py get_computed_blocks, block_pool.py
emit_cached_block_events) reports a prefix hit of a request whose SamplingParams.extra_args say so as one
BlockStored of its hit blocks, from the first (no parent), each time it looks the request's prefix up; the cache
holds no new copy. The request's extra args are a chat or completion body's `vllm_xargs`, a generate request's
sampling_params.extra_args. The event stream, batch by batch and byte for byte, against vLLM's own block pool:
the vllm-marked test at the end (bench/kv_events_diff.py --report-mode full)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from emulator.block_hash import ensure_block_hashes
from emulator.kv_cache import KVCacheManager
from emulator.kv_events import BlockHasher, BlockStored, KVEventRecorder, external_hash
from emulator.request import Request
from server.kv_events import kv_cache_report_mode
from server.testing import running_server
from test_kv_events_session_id import FAST, Captured, kv_events_flag

BS = 16
HASHER = BlockHasher("sha256")
REPO = Path(__file__).resolve().parents[1]


def add(recorder: KVEventRecorder, rid: str, prompt: np.ndarray, mode: str = "incremental") -> Request:
    r = Request(rid, len(prompt), 4, prompt_token_ids=prompt, kv_cache_report_mode=mode, session_id=f"s-{rid}")
    ensure_block_hashes(r, BS)
    recorder.request_added(r)
    return r


def admit(kv: KVCacheManager, r: Request) -> int:
    kv.report_prefix_hit(r)  # the scheduler's lookup of a waiting request
    blocks, hit = kv.get_computed_blocks(r)
    assert kv.allocate_slots(r, r.num_tokens - hit, blocks, hit)
    r.num_computed_tokens = r.num_tokens
    return hit


@pytest.mark.parametrize("extra_args, mode", [
    (None, "incremental"), ({}, "incremental"), ({"session_id": "s"}, "incremental"),
    ({"kv_cache_report_mode": "full"}, "full"), ({"kv_cache_report_mode": "FULL"}, "FULL"),  # only "full" reports
])
def test_the_report_mode_is_the_extra_args_one_else_incremental(extra_args, mode):
    assert kv_cache_report_mode(extra_args) == mode


def test_a_full_mode_prefix_hit_is_reported_from_the_first_block():
    kv = KVCacheManager(32, BS)
    recorder = KVEventRecorder(HASHER, BS)
    kv.attach_events(recorder)
    shared = np.arange(1, 65, dtype=np.int64)  # 4 blocks
    first = add(recorder, "a", np.concatenate([shared, [900, 901]]))
    assert admit(kv, first) == 0
    (stored,) = recorder.take_events()
    assert len(stored.block_hashes) == 4

    full = add(recorder, "b", np.concatenate([shared[:48], np.arange(500, 530)]), mode="full")
    assert admit(kv, full) == 48
    reported, new = recorder.take_events()
    assert reported == BlockStored(stored.block_hashes[:3], None, shared[:48].tolist(), BS, extra_keys=[None] * 3,
                                   session_id="s-b")
    assert new.parent_block_hash == stored.block_hashes[2] and len(new.block_hashes) == 1

    incremental = add(recorder, "c", np.concatenate([shared, [7, 8, 9]]))
    assert admit(kv, incremental) == 64
    assert recorder.take_events() == []  # (its blocks were all cached)
    miss = add(recorder, "d", np.arange(2000, 2040, dtype=np.int64), mode="full")
    assert admit(kv, miss) == 0
    assert [e.parent_block_hash for e in recorder.take_events()] == [None]  # its own blocks, stored; no report


def test_each_lookup_of_a_waiting_request_reports_its_hit_again():
    kv = KVCacheManager(8, BS)
    recorder = KVEventRecorder(HASHER, BS)
    kv.attach_events(recorder)
    prompt = np.arange(1, 50, dtype=np.int64)
    admit(kv, add(recorder, "a", prompt))
    recorder.take_events()
    waiting = add(recorder, "b", prompt, mode="full")
    for _ in range(3):  # no room for it yet: vLLM looks it up, and reports, on every attempt
        kv.report_prefix_hit(waiting)
    events = recorder.take_events()
    assert len(events) == 3 and len({tuple(e.block_hashes) for e in events}) == 1
    assert events[0].block_hashes == [external_hash(h) for h in HASHER.chain(prompt[:48].tolist(), BS)]


def test_no_report_without_events_or_prefix_caching():
    kv = KVCacheManager(16, BS, enable_caching=False)
    recorder = KVEventRecorder(HASHER, BS)
    kv.attach_events(recorder)
    prompt = np.arange(1, 50, dtype=np.int64)
    admit(kv, add(recorder, "a", prompt))
    admit(kv, add(recorder, "b", prompt, mode="full"))
    assert recorder.take_events() == []
    kv = KVCacheManager(8, BS)  # caching, no recorder attached: nothing to report to
    kv.report_prefix_hit(Request("c", 40, 1, kv_cache_report_mode="full"))


async def test_a_served_request_with_full_report_mode_republishes_its_prefix_hit():
    async with running_server(*FAST, *kv_events_flag(), "--enable-scale-out") as server, \
            aiohttp.ClientSession() as http:
        captured = Captured(server)
        shared = list(range(100, 164))  # 4 blocks of 16

        async def complete(prompt: list[int], **fields) -> list[dict]:
            start = len(captured.events)
            body = {"prompt": prompt, "max_tokens": 2, "ignore_eos": True, **fields}
            async with http.post(server.url + "/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
            return captured.stored_since(start)

        (first,) = await complete(shared + [1, 2, 3])
        assert first["block_size"] == 16 and len(first["block_hashes"]) == 4
        reported, own = await complete(shared + list(range(4, 20)), vllm_xargs={"kv_cache_report_mode": "full"})
        assert reported["block_hashes"] == first["block_hashes"] and reported["parent_block_hash"] is None
        assert reported["token_ids"] == shared and own["parent_block_hash"] == first["block_hashes"][-1]
        assert [e["parent_block_hash"] for e in await complete(shared + list(range(20, 36)))] == \
            [first["block_hashes"][-1]]  # without the mode: its own block alone

        start = len(captured.events)
        body = {"token_ids": shared + [8, 9],
                "sampling_params": {"max_tokens": 2, "extra_args": {"kv_cache_report_mode": "full"}}}
        async with http.post(server.url + "/inference/v1/generate", json=body) as r:
            assert r.status == 200, await r.text()
        assert captured.stored_since(start)[0]["block_hashes"] == first["block_hashes"]


@pytest.mark.vllm
def test_full_report_mode_event_stream_equals_vllms_block_pool_batch_by_batch():
    """Prefix hits under KV pressure (blocked requests looked up step after step), aborts, preemptions and
    adapters, sync and async scheduling, against vLLM's own scheduler and block pool."""
    from vllm_venv import vllm_python_or_skip
    python = vllm_python_or_skip("msgspec", "zmq")
    workloads = ["prefix_pressure_aborts", "priority_self_preempt", "lora_prefix_sharing"]
    done = subprocess.run([python, str(REPO / "bench" / "kv_events_diff.py"), "--json", "--report-mode", "full",
                           *(a for w in workloads for a in ("--only", w))],
                          capture_output=True, text=True, cwd=REPO, timeout=900)
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == len(workloads) * 2 * 2
    for r in results:
        assert r["agrees"], (r["workload"], r["mode"], r["algo"], r["first_divergence"], r["errors"])
    pressure = [r for r in results if r["workload"] == "prefix_pressure_aborts"]
    assert all(r["stored"] > 7000 for r in pressure)  # the reports (about 700 blocks are stored incrementally)
