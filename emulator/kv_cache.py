"""Paged KV cache with prefix caching: vLLM v1's block pool and KV cache manager.

`BlockPool` owns the blocks: reference counts, the hash of each cached block and
one free queue that is also the LRU eviction order. `KVCacheManager` answers the
scheduler's questions: which prefix of a request is cached, can its blocks be
allocated, and frees them. Rules follow vLLM 0.33 (`v1/core/block_pool.py`,
`kv_cache_manager.py`, `single_type_kv_cache_manager.py`) for one full-attention
group:

- block 0 is a reserved null block; usage = 1 - free / (num_blocks - 1);
- allocation pops from the front of the free queue and evicts the popped block's
  hash; a prefix hit removes the block from the queue ("touch");
- a finished or preempted request frees its blocks tail first; blocks that hold a
  cached hash go to the back of the queue (LRU), unhashed ones to the front;
- a full block is hashed and cached as soon as its tokens are scheduled.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

from emulator.block_hash import ensure_block_hashes
from emulator.request import Request, RequestStatus


class CacheEvents(Protocol):
    """What a KV-cache event publisher hears (vLLM's BlockStored, BlockRemoved, AllBlocksCleared)."""

    def request_added(self, request: Request) -> None:
        """A request reaches the engine, its token ids still known (the engine keeps only block hashes)."""

    def blocks_stored(self, request: Request, start: int, end: int) -> None:
        """The request's blocks [start, end) are now in the prefix cache (hashes: request.block_hashes)."""

    def block_removed(self, block_hash: int, copies_left: int) -> None:
        """A cached block was evicted; `copies_left` other blocks still hold the same content."""

    def all_cleared(self) -> None:
        """The prefix cache was reset."""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockPool:
    """Blocks, their reference counts and hashes, and the free queue."""

    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks (one is the null block); got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        # hash -> block id, or {block id: None} when equal blocks were computed twice
        self.cached: dict[int, int | dict[int, None]] = {}
        # Front = next to reuse or evict. Block 0 is the null block, never free.
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self.num_evictions = 0
        self.events: CacheEvents | None = None

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free_queue) / (self.num_blocks - 1)

    def get_cached_block(self, block_hash: int) -> int | None:
        entry = self.cached.get(block_hash)
        if entry is None or isinstance(entry, int):
            return entry
        return next(iter(entry))

    def get_new_blocks(self, n: int) -> list[int]:
        queue = self.free_queue
        if n > len(queue):
            raise ValueError(f"cannot get {n} free blocks from the pool ({len(queue)} free)")
        blocks = []
        block_hash, ref_cnt = self.block_hash, self.ref_cnt
        for _ in range(n):
            block = queue.popitem(last=False)[0]
            if block_hash[block] is not None:
                self._evict(block)
            ref_cnt[block] = 1
            blocks.append(block)
        return blocks

    def _evict(self, block: int) -> None:
        h = self.block_hash[block]
        self.block_hash[block] = None
        self.num_evictions += 1
        entry = self.cached.pop(h)
        left = 0
        if entry.__class__ is dict:
            del entry[block]
            left = len(entry)
            if left == 1:
                self.cached[h] = next(iter(entry))
            elif entry:
                self.cached[h] = entry
        if self.events is not None:
            self.events.block_removed(h, left)

    def touch(self, blocks: list[int]) -> None:
        ref_cnt, queue = self.ref_cnt, self.free_queue
        for block in blocks:
            if ref_cnt[block] == 0:
                del queue[block]
            ref_cnt[block] += 1

    def free_blocks(self, ordered_blocks) -> None:
        """Release one reference to each block; `ordered_blocks` is in eviction order."""
        ref_cnt, block_hash, queue = self.ref_cnt, self.block_hash, self.free_queue
        first = []
        for block in ordered_blocks:
            ref_cnt[block] -= 1
            if ref_cnt[block] == 0:
                if block_hash[block] is None:
                    first.append(block)  # reused first (LIFO), as vLLM does for unhashed blocks
                else:
                    queue[block] = None  # LRU: evicted last
        for block in reversed(first):
            queue[block] = None
            queue.move_to_end(block, last=False)

    def cache_block(self, block: int, block_hash: int) -> None:
        self.block_hash[block] = block_hash
        entry = self.cached.get(block_hash)
        if entry is None:
            self.cached[block_hash] = block
        elif isinstance(entry, int):
            self.cached[block_hash] = {entry: None, block: None}
        else:
            entry[block] = None

    def reset_prefix_cache(self) -> bool:
        """Drop every cached hash; only possible when no block is in use (vLLM)."""
        if len(self.free_queue) != self.num_blocks - 1:
            return False
        self.cached.clear()
        self.block_hash = [None] * self.num_blocks
        if self.events is not None:
            self.events.all_cleared()
        return True


class KVCacheManager:
    """The scheduler's view of the KV cache (one full-attention group)."""

    def __init__(self, num_blocks: int, block_size: int, *, enable_caching: bool = True,
                 max_model_len: int = 1 << 30, watermark: float = 0.0) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.max_model_len = max_model_len
        self.pool = BlockPool(num_blocks, enable_caching)
        self.watermark_blocks = int(watermark * num_blocks)
        # prefix-cache statistics, as vLLM's PrefixCacheStats: lookups of admitted new requests
        self.prefix_queries = 0
        self.prefix_hits = 0
        # the same for KV from outside (a KV connector: P/D transfers, offload tiers)
        self.external_queries = 0
        self.external_hits = 0
        self.offload = None  # emulator.kv_tiers.Offload: full blocks are copied down to it

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def block_hashes(self, request: Request) -> list[int]:
        return ensure_block_hashes(request, self.block_size)

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Longest cached prefix, block-aligned, leaving at least one token to compute."""
        if not self.enable_caching:
            return [], 0
        hashes = self.block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        get = self.pool.get_cached_block
        blocks = []
        for i in range(min(max_blocks, len(hashes))):
            block = get(hashes[i])
            if block is None:
                break
            blocks.append(block)
        return blocks, len(blocks) * self.block_size

    def cached_prefix_length(self, block_hashes: list[int]) -> int:
        """How many leading blocks of a prompt with these hashes are cached here (a router's question)."""
        if not self.enable_caching:
            return 0
        cached = self.pool.cached
        n = 0
        for h in block_hashes:
            if h not in cached:
                break
            n += 1
        return n

    def record_prefix_cache_stats(self, request: Request, num_hits: int) -> None:
        """Count a lookup that led to admission; resumed (preempted) requests are not counted (vLLM)."""
        if self.enable_caching and request.num_preemptions == 0:
            self.prefix_queries += request.num_tokens
            self.prefix_hits += num_hits

    def _num_blocks_to_allocate(self, request: Request, num_tokens: int, new_computed: list[int]) -> int:
        required = cdiv(num_tokens, self.block_size)
        held = request.kv_blocks
        if held is not None:  # running: no new prefix hits
            return max(required - len(held), 0)
        evictable = sum(1 for b in new_computed if self.pool.ref_cnt[b] == 0)
        return max(required - len(new_computed), 0) + evictable

    def can_fit_full_sequence(self, request: Request, new_computed: list[int], has_scheduled_reqs: bool) -> bool:
        """Admission gate: blocks for the whole known sequence (plus watermark) are free."""
        full = min(request.num_tokens, self.max_model_len)
        need = self._num_blocks_to_allocate(request, full, new_computed) + self._watermark(request, has_scheduled_reqs)
        return need <= self.pool.num_free_blocks

    def _watermark(self, request: Request, has_scheduled_reqs: bool) -> int:
        if has_scheduled_reqs and request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            return self.watermark_blocks
        return 0

    def can_allocate(self, request: Request, num_new_tokens: int, new_computed: list[int],
                     num_new_computed_tokens: int, has_scheduled_reqs: bool) -> bool:
        """Would `allocate_slots` succeed? (No side effects.)"""
        need_slots = min(request.num_computed_tokens + num_new_computed_tokens + num_new_tokens, self.max_model_len)
        n_alloc = self._num_blocks_to_allocate(request, need_slots, new_computed)
        return n_alloc + self._watermark(request, has_scheduled_reqs) <= len(self.pool.free_queue)

    def allocate_slots(self, request: Request, num_new_tokens: int, new_computed: list[int] | None = None,
                       num_new_computed_tokens: int = 0, has_scheduled_reqs: bool = True, cache: bool = True) -> bool:
        """Reserve blocks for `num_new_tokens` more tokens; False if they do not fit. `cache=False`: the
        tokens come from an external load still in flight, so their blocks are cached when it ends."""
        bs = self.block_size
        computed = request.num_computed_tokens + num_new_computed_tokens
        need_slots = computed + num_new_tokens
        if need_slots > self.max_model_len:
            need_slots = self.max_model_len
        blocks = request.kv_blocks
        if blocks is None or new_computed or need_slots > len(blocks) * bs:
            new_computed = new_computed or []
            n_alloc = self._num_blocks_to_allocate(request, need_slots, new_computed)
            if n_alloc + self._watermark(request, has_scheduled_reqs) > len(self.pool.free_queue):
                return False
            if blocks is None:
                blocks = request.kv_blocks = []
                request.kv_num_cached = 0
            if new_computed:
                self.pool.touch(new_computed)
                blocks.extend(new_computed)
                request.kv_num_cached = len(blocks)
            n_new = cdiv(need_slots, bs) - len(blocks)
            if n_new > 0:
                blocks.extend(self.pool.get_new_blocks(n_new))
        if not cache:
            return True
        # cache the blocks this step fills with known tokens (not placeholders)
        filled = computed + num_new_tokens
        if filled > request.num_tokens:
            filled = request.num_tokens
        if filled // bs > request.kv_num_cached and self.enable_caching:
            self.cache_blocks(request, filled)
        return True

    def append_block(self, request: Request) -> None:
        """One more block for a running request whose next token starts a block (what `allocate_slots`
        does for a decode step that crosses a block boundary, without its checks: the caller planned it)."""
        request.kv_blocks.extend(self.pool.get_new_blocks(1))

    def cache_blocks(self, request: Request, num_tokens: int) -> None:
        """Hash and cache the request's blocks that `num_tokens` fills."""
        full = num_tokens // self.block_size
        done = request.kv_num_cached
        if full <= done or not self.enable_caching:
            return
        hashes = self.block_hashes(request)
        blocks = request.kv_blocks
        cache = self.pool.cache_block
        upto = min(full, len(hashes))
        for i in range(done, upto):
            cache(blocks[i], hashes[i])
        request.kv_num_cached = full
        if self.pool.events is not None and upto > done:
            self.pool.events.blocks_stored(request, done, upto)
        if self.offload is not None and upto > done:
            self.offload.store(hashes[done:upto])

    def free(self, request: Request) -> None:
        blocks = request.kv_blocks
        request.kv_blocks = None
        request.kv_num_cached = 0
        if blocks:
            self.pool.free_blocks(reversed(blocks))

    def num_blocks_held(self, request: Request) -> int:
        return len(request.kv_blocks or ())

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()

    def attach_events(self, events: CacheEvents | None) -> None:
        """Report the cache's events to `events` (a KV-event publisher); None stops reporting."""
        self.pool.events = events
