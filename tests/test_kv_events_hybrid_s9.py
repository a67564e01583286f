"""KV events of a hybrid KV cache (gpt-oss: a sliding-window group 0, a full-attention group 1, one block pool;
emulator/sliding_window.py) as vLLM 0.33 publishes them: each group's BlockStored, group by group, the sliding
group's naming only the blocks it caches (block_pool.cache_full_blocks with SlidingWindowManager's mask) with
its kind and window (KVCacheManager.take_events), each eviction's BlockRemoved under the evicted key's group,
a "full" report-mode hit reported per group (the coordinator's emit_cached_block_events). The streams are
compared batch by batch with vLLM's own scheduler and block pool by bench/kv_events_diff.py (vllm-marked
tests at the end)."""
from __future__ import annotations

import asyncio
import json
import subprocess

import aiohttp
import msgspec
import numpy as np
import pytest

from emulator.block_hash import ensure_block_hashes
from emulator.kv_cache import KVCacheManager
from emulator.kv_events import BlockHasher, BlockRemoved, BlockStored, KVEventRecorder, external_hash
from emulator.memory import KVCacheGroups
from emulator.request import Request
from emulator.sliding_window import NULL, HybridKVCacheManager
from server.kv_event_wire import BatchEncoder
from server.testing import free_port, running_server

BS = 16
WINDOW = 64  # the sliding group caches the cdiv(63, 16) = 4 blocks before a replay boundary
HASHER = BlockHasher("sha256")


def hybrid(num_blocks: int = 200) -> tuple[HybridKVCacheManager, KVEventRecorder]:
    kv = HybridKVCacheManager(num_blocks, BS, KVCacheGroups(("sliding", "full"), WINDOW, 1, 64))
    recorder = KVEventRecorder(HASHER, BS)
    kv.attach_events(recorder)
    return kv, recorder


def add(recorder: KVEventRecorder, rid: str, prompt: np.ndarray, mode: str = "incremental") -> Request:
    r = Request(rid, len(prompt), 4, prompt_token_ids=prompt, kv_cache_report_mode=mode)
    ensure_block_hashes(r, BS)
    recorder.request_added(r)
    return r


def admit(kv: KVCacheManager, r: Request, num_new: int | None = None) -> int:
    kv.report_prefix_hit(r)  # the scheduler's lookup of a waiting request
    hit, tokens_hit = kv.get_computed_blocks(r)
    n = r.num_tokens - tokens_hit if num_new is None else num_new
    assert kv.allocate_slots(r, n, hit, tokens_hit)
    r.num_computed_tokens = tokens_hit + n
    return tokens_hit


def tokens(n: int, start: int = 1) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.int64)


def vllm_hashes(ids) -> list[int]:
    return [external_hash(h) for h in HASHER.chain([int(t) for t in ids], BS)]


def on_the_wire(events) -> list[dict]:
    _, decoded, _ = msgspec.msgpack.decode(BatchEncoder().encode(0.0, events, 0))
    return decoded


def test_each_group_stores_its_blocks_the_sliding_group_first_and_only_those_a_hit_can_use():
    kv, recorder = hybrid()
    prompt = tokens(300)  # 18 full blocks; the replay boundary (token 299) is in block 18
    admit(kv, add(recorder, "a", prompt))
    sliding, full = recorder.take_events()
    hashes = vllm_hashes(prompt[:288])
    assert sliding == BlockStored(hashes[14:18], None, prompt[:288].tolist(), BS, extra_keys=[None] * 4, group_idx=0,
                                  kv_cache_spec_kind="sliding_window", kv_cache_spec_sliding_window=WINDOW)
    assert full == BlockStored(hashes, None, prompt[:288].tolist(), BS, extra_keys=[None] * 18, group_idx=1)
    wire = on_the_wire([sliding, full])
    assert (wire[0]["group_idx"], wire[0]["kv_cache_spec_kind"], wire[0]["kv_cache_spec_sliding_window"]) == \
        (0, "sliding_window", WINDOW)
    assert (wire[1]["group_idx"], wire[1]["kv_cache_spec_kind"]) == (1, "full_attention")
    assert "kv_cache_spec_sliding_window" not in wire[1]  # vLLM's omit_defaults: no window for full attention


def test_a_chunk_the_sliding_group_caches_nothing_of_still_gets_its_event():
    kv, recorder = hybrid()
    prompt = tokens(300)
    r = add(recorder, "a", prompt)
    admit(kv, r, 160)  # blocks 0..9: none is among the 4 before the replay boundary
    hashes = vllm_hashes(prompt[:288])
    empty, full = recorder.take_events()
    assert (empty.block_hashes, empty.extra_keys, empty.parent_block_hash, empty.group_idx) == ([], None, None, 0)
    assert empty.token_ids == prompt[:160].tolist()  # the range's tokens all the same, as vLLM's
    assert full.block_hashes == hashes[:10] and full.group_idx == 1
    wire = on_the_wire([empty])[0]
    assert wire["block_hashes"] == [] and "extra_keys" not in wire
    assert kv.allocate_slots(r, 140)  # frees the 6 blocks behind the window first
    r.num_computed_tokens = 300
    assert kv.tables[r][0][:6] == [NULL] * 6
    sliding, full = recorder.take_events()
    assert sliding.block_hashes == hashes[14:18] and sliding.parent_block_hash == hashes[9]
    assert sliding.token_ids == prompt[160:288].tolist() and sliding.extra_keys == [None] * 4
    assert full.block_hashes == hashes[10:18] and full.parent_block_hash == hashes[9]


def test_an_eviction_is_removed_under_the_evicted_keys_group():
    kv, recorder = hybrid(num_blocks=39)  # 38 usable: the first request's two tables fill it
    first = add(recorder, "a", tokens(300))
    admit(kv, first)
    sliding, full = recorder.take_events()
    kv.free(first)
    admit(kv, add(recorder, "b", tokens(300, start=5000)))  # takes every block: all of a's cached ones go
    removed = [e for e in recorder.take_events() if isinstance(e, BlockRemoved)]
    by_group = {g: sorted(h for e in removed if e.group_idx == g for h in e.block_hashes) for g in (0, 1)}
    assert all(len(e.block_hashes) == 1 and e.medium == "GPU" for e in removed)
    assert by_group == {0: sorted(sliding.block_hashes), 1: sorted(full.block_hashes)}
    assert len(removed) == 4 + 18


def test_a_full_mode_hit_is_reported_for_each_group_that_hit():
    kv, recorder = hybrid()
    shared = tokens(300)
    admit(kv, add(recorder, "a", shared))
    recorder.take_events()
    hit = add(recorder, "b", np.concatenate([shared[:288], tokens(30, start=9000)]), mode="full")
    assert admit(kv, hit) == 288  # the full group's 18 blocks, the sliding group's last 4 within them
    sliding, full, *stored = recorder.take_events()
    hashes = vllm_hashes(shared[:288])
    # the sliding group's hit names every block up to it, its null blocks' too (vLLM hashes by position)
    assert (sliding.block_hashes, sliding.group_idx, sliding.kv_cache_spec_kind, sliding.parent_block_hash) == \
        (hashes, 0, "sliding_window", None)
    assert (full.block_hashes, full.group_idx, full.kv_cache_spec_kind) == (hashes, 1, "full_attention")
    assert [e.group_idx for e in stored] == [0, 1] and stored[1].parent_block_hash == hashes[-1]


def test_a_one_group_model_still_publishes_group_0_without_a_window():
    kv = KVCacheManager(32, BS)
    recorder = KVEventRecorder(HASHER, BS)
    kv.attach_events(recorder)
    admit(kv, add(recorder, "a", tokens(40)))
    (event,) = recorder.take_events()
    assert (event.group_idx, event.kv_cache_spec_kind, event.kv_cache_spec_sliding_window) == (0, "full_attention",
                                                                                                None)
    assert "kv_cache_spec_sliding_window" not in on_the_wire([event])[0]


async def test_a_gpt_oss_server_publishes_both_groups():
    pub, replay = free_port(), free_port()
    flag = ("--kv-events-config", json.dumps({"enable_kv_cache_events": True, "endpoint": f"tcp://*:{pub}",
                                              "replay_endpoint": f"tcp://*:{replay}"}))
    async with running_server("--model", "openai/gpt-oss-120b", "--hardware", "H200", "--max-model-len", "8192",
                              "--speed", "1000", *flag) as server:
        assert isinstance(server.engine.sim.engines[0].kv, HybridKVCacheManager)
        prompt = list(range(1, 301))
        async with aiohttp.ClientSession() as http:
            payload = {"prompt": prompt, "max_tokens": 4, "ignore_eos": True}
            async with http.post(server.url + "/v1/completions", json=payload) as r:
                assert r.status == 200, await r.text()
        import zmq
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.connect(f"tcp://127.0.0.1:{replay}")
        events = []
        try:
            for _ in range(600):  # the prefill's batch is published when its step ends (up to 60 s)
                dealer.send_multipart((b"", (0).to_bytes(8, "big")))
                assert dealer.poll(5000), "no answer from the replay socket"
                while True:
                    _, _, seq, payload = dealer.recv_multipart()
                    if seq == (-1).to_bytes(8, "big", signed=True):
                        break
                    events += msgspec.msgpack.decode(payload)[1]
                if events:
                    break
                await asyncio.sleep(0.1)
        finally:
            dealer.close(linger=0)
    stored = [e for e in events if e["type"] == "BlockStored"]
    bs = stored[0]["block_size"]
    hashes = [external_hash(h) for h in HASHER.chain(prompt, bs)]
    sliding, full = stored[:2]
    assert (sliding["group_idx"], sliding["kv_cache_spec_kind"], sliding["kv_cache_spec_sliding_window"]) == \
        (0, "sliding_window", 128)
    run = -(-127 // bs)  # the blocks a later hit on the window needs, before the replay boundary's block
    end = 299 // bs
    assert sliding["block_hashes"] == hashes[max(0, end - run):end]
    assert (full["group_idx"], full["kv_cache_spec_kind"], full["block_hashes"]) == (1, "full_attention", hashes)


# -- against vLLM's own scheduler and block pool -------------------------------------------------------
@pytest.mark.vllm
def test_hybrid_event_streams_equal_vllms_batch_by_batch():
    """Hybrid workloads under KV pressure, with aborts and prefix hits, sync and async, sha256 and its CBOR."""
    from vllm_venv import kv_events_diff, vllm_python_or_skip
    results = kv_events_diff(vllm_python_or_skip("msgspec"), ["prefix_pressure_aborts_hybrid", "kv_pressure_hybrid",
                                                              "long_prefill_threshold_hybrid"])
    assert sum(r["removed"] for r in results) > 1000 and sum(r["stored"] for r in results) > 1000


@pytest.mark.vllm
def test_hybrid_full_report_mode_and_random_hybrid_workloads_equal_vllms():
    from vllm_venv import REPO, vllm_python_or_skip
    python = vllm_python_or_skip("msgspec")
    for extra in (["--only", "prefix_sharing_hybrid", "--only", "prefix_pressure_hybrid", "--report-mode", "full"],
                  ["--fuzz", "6", "--fuzz-seed", "150", "--hybrid", "--algo", "sha256"]):
        done = subprocess.run([python, str(REPO / "bench" / "kv_events_diff.py"), "--json", *extra],
                              capture_output=True, text=True, cwd=REPO, timeout=900)
        results = json.loads(done.stdout.strip().splitlines()[-1])
        assert len(results) >= 4 and all(r["workload"].endswith("_hybrid") for r in results)
        for r in results:
            assert r["agrees"], (r["workload"], r["mode"], r["algo"], r["first_divergence"], r["errors"])
