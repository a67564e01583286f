"""The hybrid KV cache of a model mixing sliding-window and full-attention layers (gpt-oss), as vLLM 0.33
manages it (v1/core/kv_cache_coordinator.py HybridKVCacheCoordinator, single_type_kv_cache_manager.py
SlidingWindowManager): a sliding group that frees what falls out of its window, a full group beside it,
both from one pool; the prefix hit both agree on. Step-for-step parity with vLLM's own scheduler on such a
cache is checked by the *_hybrid workloads of bench/scheduler_diff.py (test_vllm_scheduler_parity.py)."""
from __future__ import annotations

import numpy as np

from emulator.config import EngineConfig
from emulator.memory import KVCacheGroups
from emulator.request import Request
from emulator.scheduler import Scheduler
from emulator.sliding_window import NULL, HybridKVCacheManager
from test_kv_cache import admit, extend  # the scheduler's admission and a running request's step, as there

BS = 16
WINDOW = 64  # a hit needs cdiv(63, 16) = 4 contiguous sliding blocks
IN_FLIGHT = 2 * 32


def manager(num_blocks: int = 200, caching: bool = True, max_model_len: int = 4096) -> HybridKVCacheManager:
    return HybridKVCacheManager(num_blocks, BS, KVCacheGroups(("sliding", "full"), WINDOW, 1, IN_FLIGHT),
                                enable_caching=caching, max_model_len=max_model_len)


def request(rid: str, prompt: np.ndarray, output_len: int = 4) -> Request:
    return Request(rid, len(prompt), output_len, prompt_token_ids=prompt)


def tokens(n: int, start: int = 1) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.int64)


def held(kv: HybridKVCacheManager) -> int:
    return kv.pool.num_blocks - 1 - kv.num_free_blocks


def test_the_sliding_group_frees_blocks_behind_the_window():
    kv = manager()
    r = request("a", tokens(300))
    admit(kv, r, 160)  # 10 blocks in each group
    sliding, full = kv.tables[r]
    assert len(sliding) == len(full) == 10 and NULL not in sliding and r.kv_blocks is full
    extend(kv, r, 140)  # first frees what the 160 computed tokens no longer see: tokens 0..96, 6 blocks
    assert sliding[:6] == [NULL] * 6 and NULL not in sliding[6:] and len(sliding) == len(full) == 19
    assert NULL not in full
    assert kv.num_blocks_held(r) == held(kv) == 13 + 19
    assert kv.usage == 1 - kv.num_free_blocks / 199 and kv.num_free_blocks == 199 - 32


def test_tokens_in_flight_keep_their_window():
    kv = manager()
    r = request("a", tokens(300))
    admit(kv, r, 160)
    r.num_in_flight_tokens = 64  # computed, not yet processed: their window is still read
    extend(kv, r, 16)
    assert kv.tables[r][0][:3] == [NULL] * 2 + [kv.tables[r][0][2]] and kv.tables[r][0][2] != NULL


def test_a_long_decode_holds_a_bounded_sliding_table():
    kv = manager()
    r = request("a", tokens(100), output_len=2000)
    admit(kv, r)
    for _ in range(1500):
        r.num_tokens += 1
        extend(kv, r, 1)
    sliding, full = kv.tables[r]
    assert len(full) == len(sliding) == -(-r.num_computed_tokens // BS)
    assert len(sliding) - sliding.count(NULL) <= -(-(WINDOW - 1) // BS) + 1
    kv.free(r)
    assert kv.num_free_blocks == 199 and r.kv_blocks is None


def test_freeing_returns_each_groups_blocks_tail_first_without_the_null_head():
    kv = manager(caching=False)
    r = request("a", tokens(200))
    admit(kv, r, 128)
    extend(kv, r, 72)
    sliding, full = (list(t) for t in kv.tables[r])
    kv.free(r)
    real = [b for b in sliding if b != NULL]
    # unhashed blocks go to the front, each group's tail first; the full group, freed last, ahead
    assert list(kv.pool.free_queue)[:len(full) + len(real)] == full[::-1] + real[::-1]


def test_a_resent_prompt_hits_up_to_its_replay_boundary():
    kv = manager()
    prompt = tokens(330)
    a = request("a", prompt)
    admit(kv, a)
    kv.free(a)
    b = request("b", prompt)
    hit, n = kv.get_computed_blocks(b)
    # the sliding group cached the 4 blocks before block (330 - 1) // 16 = 20 only; the hit ends there
    assert n == 20 * BS and hit.boundary == 0
    assert hit[0][:16] == [NULL] * 16 and NULL not in hit[0][16:] and len(hit[0]) == len(hit[1]) == 20
    assert admit(kv, b) == 320


def test_a_shared_prefix_the_sliding_group_lacks_is_cached_once_a_request_passes_it():
    kv = manager()
    system = tokens(200, start=10_000)
    a = request("a", np.concatenate([system, tokens(90)]))
    admit(kv, a)
    kv.free(a)
    b = request("b", np.concatenate([system, tokens(70, start=500)]))
    hit, n = kv.get_computed_blocks(b)
    # the full group holds the 12 blocks of the system prompt; the sliding group none of them
    assert n == 0 and hit.boundary == 12 * BS
    admit(kv, b)  # computed anew, and its sliding blocks before the junction cached this time
    kv.free(b)
    c = request("c", np.concatenate([system, tokens(50, start=900)]))
    assert kv.get_computed_blocks(c)[1] == 12 * BS


def test_no_prefix_caching_takes_no_hit_and_hashes_nothing():
    kv = manager(caching=False)
    a = request("a", tokens(300))
    admit(kv, a)
    kv.free(a)
    assert kv.get_computed_blocks(request("b", tokens(300)))[1] == 0 and not kv.pool.cached


def test_admission_caps_the_sliding_groups_share_at_its_window():
    kv = manager(num_blocks=100)
    r = request("a", tokens(1200))
    full, sliding = 1200 // BS, -(-(WINDOW - 1 + IN_FLIGHT) // BS) + 1
    assert kv.can_fit_full_sequence(r, [], False)  # 75 + 9 blocks of 99
    big = request("b", tokens(1500))
    assert not kv.can_fit_full_sequence(big, [], False) and 1500 // BS + sliding > 99 >= full + sliding


def _config(**changes) -> EngineConfig:
    base = dict(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=4096, block_size=BS,
                gpu_memory_utilization=0.9, enable_prefix_caching=True, enable_chunked_prefill=True,
                num_gpu_blocks_override=200, kv_cache_memory_bytes=None, tensor_parallel_size=1,
                pipeline_parallel_size=1, data_parallel_size=1, enable_expert_parallel=False,
                scheduling_policy="fcfs", long_prefill_token_threshold=0, watermark=0.0,
                scheduler_reserve_full_isl=True, async_scheduling=False, kv_cache_dtype="auto")
    return EngineConfig(**{**base, **changes})


def test_the_scheduler_frees_sliding_blocks_on_steps_that_take_no_block():
    kv = manager()
    scheduler = Scheduler(_config(), kv)
    r = Request("a", 100, 200, prompt_token_ids=tokens(100))
    scheduler.add_request(r)
    for step in range(30):
        out = scheduler.schedule(float(step))
        scheduler.update_from_output(out, float(step))
    # 100 + 28 decoded tokens computed: every sliding block before token 128 - 63 is freed already,
    # though the last steps filled no new block
    sliding = kv.tables[r][0]
    assert r.num_computed_tokens == 128
    assert sliding.count(NULL) == (128 - WINDOW + 1) // BS
    assert held(kv) == kv.num_blocks_held(r)


def test_an_engine_gets_the_hybrid_manager_only_for_hybrid_groups():
    from emulator.hardware import GiB, load_device
    from emulator.config import EngineArgs, resolve
    from emulator.memory import plan_memory
    from emulator.models import load_model
    from emulator.sliding_window import kv_cache_manager
    gpt_oss, llama = load_model("openai/gpt-oss-120b"), load_model("meta-llama/Llama-3.1-8B")
    for model, hybrid in ((gpt_oss, True), (llama, False)):
        config = resolve(EngineArgs(kv_cache_memory_bytes=20 * GiB), model, load_device("H100"))
        plan = plan_memory(model, load_device("H100"), config)
        kv = kv_cache_manager(plan.num_gpu_blocks, config, plan.groups)
        assert isinstance(kv, HybridKVCacheManager) == kv.recycles_blocks == hybrid
        assert kv.pool.num_blocks == plan.num_gpu_blocks and kv.max_model_len == config.max_model_len
