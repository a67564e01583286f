"""The paged KV cache: prefix hits, LRU eviction, reference counts (vLLM 0.33 `v1/core/block_pool.py`,
`kv_cache_manager.py`, `single_type_kv_cache_manager.py`)."""
from __future__ import annotations

import numpy as np

from emulator.kv_cache import KVCacheManager
from emulator.request import Request

BS = 16


def tokens(n: int, start: int = 1) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.int64)


def request(rid: str, prompt: np.ndarray | int, output_len: int = 4) -> Request:
    if isinstance(prompt, int):
        return Request(rid, prompt, output_len)
    return Request(rid, len(prompt), output_len, prompt_token_ids=prompt)


def admit(kv: KVCacheManager, r: Request, num_new: int | None = None) -> int:
    """What the scheduler does on admission: look up the prefix, allocate, advance. Returns the hit."""
    blocks, hit = kv.get_computed_blocks(r)
    n = r.num_tokens - hit if num_new is None else num_new
    assert kv.allocate_slots(r, n, blocks, hit)
    r.num_computed_tokens = hit + n
    return hit


def extend(kv: KVCacheManager, r: Request, n: int) -> None:
    """A running request computes n more tokens."""
    assert kv.allocate_slots(r, n)
    r.num_computed_tokens += n


def queue(kv: KVCacheManager) -> list[int]:
    return list(kv.pool.free_queue)


# -- usage and allocation ---------------------------------------------------------------
def test_block_zero_is_never_free():
    kv = KVCacheManager(11, BS)
    assert queue(kv) == list(range(1, 11))
    assert kv.num_free_blocks == 10


def test_usage_is_one_minus_free_over_blocks_without_the_null_block():
    kv = KVCacheManager(11, BS)
    admit(kv, request("a", tokens(64)))
    assert kv.usage == 1 - 6 / 10


def test_allocation_pops_from_the_front_of_the_free_queue():
    kv = KVCacheManager(11, BS)
    a = request("a", tokens(50))
    admit(kv, a)
    assert queue(kv) == [5, 6, 7, 8, 9, 10]
    assert kv.num_blocks_held(a) == 4


def test_failed_allocation_changes_nothing():
    kv = KVCacheManager(5, BS)
    r = request("a", tokens(80))
    blocks, hit = kv.get_computed_blocks(r)
    assert not kv.allocate_slots(r, 80, blocks, hit)
    assert queue(kv) == [1, 2, 3, 4]
    assert kv.num_blocks_held(r) == 0


# -- prefix hits --------------------------------------------------------------------------
def test_prefix_hit_is_block_aligned():
    kv = KVCacheManager(64, BS)
    admit(kv, request("a", tokens(40)))
    assert admit(kv, request("b", np.concatenate([tokens(40), tokens(10, start=900)]))) == 32


def test_prefix_hit_leaves_at_least_one_token_to_compute():
    """A fully cached prompt of 2 blocks hits only 1: the last token is recomputed for its logits."""
    kv = KVCacheManager(64, BS)
    admit(kv, request("a", tokens(32)))
    assert admit(kv, request("b", tokens(32))) == 16


def test_prefix_hit_stops_at_the_first_missing_block():
    kv = KVCacheManager(64, BS)
    admit(kv, request("a", tokens(48)))
    b = np.concatenate([tokens(16), tokens(16, start=500), tokens(16, start=33), tokens(1, start=999)])
    assert admit(kv, request("b", b)) == 16


def test_blocks_are_cached_as_soon_as_they_are_scheduled():
    """vLLM caches full blocks at allocation, before the step runs: a later admission hits them."""
    kv = KVCacheManager(64, BS)
    admit(kv, request("a", tokens(100)), num_new=40)  # first chunk: two full blocks
    assert admit(kv, request("b", tokens(100))) == 32


def test_prefix_caching_disabled_never_hits():
    kv = KVCacheManager(64, BS, enable_caching=False)
    admit(kv, request("a", tokens(64)))
    assert admit(kv, request("b", tokens(64))) == 0


def test_request_hits_its_own_blocks_after_preemption():
    """Without token ids a request's content is its own, and a resumed request finds it again."""
    kv = KVCacheManager(64, BS)
    r = request("a", 50)
    admit(kv, r)
    kv.free(r)  # preemption: blocks freed, computed tokens reset
    r.num_computed_tokens = 0
    r.num_preemptions = 1
    blocks, hit = kv.get_computed_blocks(r)
    assert hit == 48
    assert len(blocks) == 3


# -- eviction order -----------------------------------------------------------------------
def test_freed_request_blocks_go_to_the_back_tail_first():
    kv = KVCacheManager(11, BS)
    a = request("a", tokens(64))
    admit(kv, a)
    kv.free(a)
    assert queue(kv) == [5, 6, 7, 8, 9, 10, 4, 3, 2, 1]


def test_freed_unhashed_block_goes_to_the_front():
    """The partial last block has no hash: it is reused first (LIFO), the hashed ones last (LRU)."""
    kv = KVCacheManager(11, BS)
    a = request("a", tokens(40))
    admit(kv, a)
    kv.free(a)
    assert queue(kv) == [3, 4, 5, 6, 7, 8, 9, 10, 2, 1]


def test_allocation_evicts_the_popped_blocks_hash():
    kv = KVCacheManager(11, BS)
    a = request("a", tokens(64))
    admit(kv, a)
    kv.free(a)
    admit(kv, request("b", tokens(112, start=5000)))  # 7 blocks: 6 never used, then a's tail block 4
    assert kv.pool.num_evictions == 1
    assert kv.pool.block_hash[4] is not None  # now b's
    again = request("a2", np.concatenate([tokens(64), tokens(1, start=9999)]))
    assert kv.get_computed_blocks(again)[1] == 48  # a's first three blocks are still cached


def test_earlier_freed_request_is_evicted_first():
    kv = KVCacheManager(9, BS)
    a, b = request("a", tokens(32)), request("b", tokens(32, start=100))
    admit(kv, a)
    admit(kv, b)
    kv.free(a)
    kv.free(b)
    admit(kv, request("c", tokens(96, start=5000)))  # 4 never-used blocks, then both of a's
    assert kv.get_computed_blocks(request("a2", np.concatenate([tokens(32), tokens(8, start=900)])))[1] == 0
    assert kv.get_computed_blocks(request("b2", np.concatenate([tokens(32, start=100), tokens(8, start=900)])))[1] == 32


# -- reference counts ---------------------------------------------------------------------
def test_shared_prefix_blocks_are_reference_counted():
    kv = KVCacheManager(64, BS)
    a = request("a", tokens(48))
    admit(kv, a)
    b = request("b", tokens(64))
    assert admit(kv, b) == 48
    shared = [1, 2, 3]
    assert [kv.pool.ref_cnt[x] for x in shared] == [2, 2, 2]
    kv.free(a)
    assert [kv.pool.ref_cnt[x] for x in shared] == [1, 1, 1]
    assert not set(shared) & set(queue(kv))
    kv.free(b)
    assert [kv.pool.ref_cnt[x] for x in shared] == [0, 0, 0]
    assert set(shared) <= set(queue(kv))


def test_hit_on_a_free_block_takes_it_out_of_the_free_queue():
    kv = KVCacheManager(11, BS)
    a = request("a", tokens(48))
    admit(kv, a)
    kv.free(a)
    free_before = kv.num_free_blocks
    b = request("b", tokens(49))
    blocks, hit = kv.get_computed_blocks(b)
    assert kv.allocate_slots(b, 1, blocks, hit)
    assert hit == 48 and blocks == [1, 2, 3]
    assert not {1, 2, 3} & set(queue(kv))
    assert [kv.pool.ref_cnt[x] for x in blocks] == [1, 1, 1]
    assert kv.num_free_blocks == free_before - 4  # three touched, one new


def test_evictable_hit_blocks_count_against_free_space():
    """vLLM's get_num_blocks_to_allocate adds the free (evictable) hit blocks to what must fit."""
    kv = KVCacheManager(6, BS)
    a = request("a", tokens(48))
    admit(kv, a)
    kv.free(a)
    b = request("b", tokens(96))  # 3 hit blocks (free) + 3 new = 6 > 5 free
    blocks, hit = kv.get_computed_blocks(b)
    assert hit == 48
    assert not kv.allocate_slots(b, 48, blocks, hit)
    c = request("c", tokens(80))  # 3 + 2 = 5 fits exactly
    blocks, hit = kv.get_computed_blocks(c)
    assert kv.allocate_slots(c, 32, blocks, hit)
    assert kv.num_free_blocks == 0


def test_duplicate_blocks_of_one_hash_stay_reachable():
    """Two requests that compute the same block both cache it; evicting one copy keeps the other."""
    kv = KVCacheManager(12, BS)
    b = request("b", tokens(48))
    admit(kv, b, num_new=16)  # b's first chunk: block 1
    a = request("a", tokens(48))
    assert admit(kv, a) == 16  # a hits block 1 and computes blocks 2, 3 itself
    extend(kv, b, 32)  # b computes the same two blocks again, as blocks 4 and 5
    h1 = kv.block_hashes(a)[1]
    assert kv.pool.get_cached_block(h1) == 2  # the first copy answers
    kv.free(a)  # a's private blocks 3, 2 go to the back of the queue
    admit(kv, request("c", tokens(128, start=5000)))  # 6 never-used blocks, then 3 and 2: evicted
    assert kv.pool.get_cached_block(h1) == 4


def test_reset_prefix_cache_fails_while_blocks_are_in_use():
    kv = KVCacheManager(11, BS)
    a = request("a", tokens(48))
    admit(kv, a)
    assert not kv.reset_prefix_cache()
    assert kv.get_computed_blocks(request("b", tokens(49)))[1] == 48


def test_reset_prefix_cache_drops_every_hash_when_all_blocks_are_free():
    kv = KVCacheManager(11, BS)
    a = request("a", tokens(48))
    admit(kv, a)
    kv.free(a)
    assert kv.reset_prefix_cache()
    assert kv.get_computed_blocks(request("b", tokens(49)))[1] == 0
    assert kv.num_free_blocks == 10


def test_allocation_is_capped_at_max_model_len():
    kv = KVCacheManager(64, BS, max_model_len=40)
    r = request("a", tokens(38), output_len=10)
    admit(kv, r)
    extend(kv, r, 1)
    extend(kv, r, 5)  # would need slots up to 44; capped at 40
    assert kv.num_blocks_held(r) == 3
