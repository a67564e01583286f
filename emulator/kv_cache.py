"""Paged KV cache with prefix caching: vLLM v1's block pool and KV cache manager.

`BlockPool` owns the blocks: reference counts, the hash of each cached block and
one free queue that is also the LRU eviction order. `KVCacheManager` answers the
scheduler's questions: which prefix of a request is cached, can its blocks be
allocated, and frees them. Rules follow vLLM 0.33 (`v1/core/block_pool.py`,
`kv_cache_manager.py`, `single_type_kv_cache_manager.py`) for one full-attention
group (emulator.sliding_window extends it to vLLM's hybrid groups of sliding-window models):

- block 0 is a reserved null block; usage = 1 - free / (num_blocks - 1);
- allocation pops from the front of the free queue and evicts the popped block's
  hash; a prefix hit removes the block from the queue ("touch");
- a finished or preempted request frees its blocks tail first; blocks that hold a
  cached hash go to the back of the queue (LRU), unhashed ones to the front;
- a full block is hashed and cached as soon as its tokens are scheduled.
"""
from __future__ import annotations

from typing import NamedTuple, Protocol

from emulator.block_hash import ensure_block_hashes
from emulator.kv_tiers import TierSource
from emulator.request import Request, RequestStatus


class CacheEvents(Protocol):
    """What a KV-cache event publisher hears (vLLM's BlockStored, BlockRemoved, AllBlocksCleared)."""

    def request_added(self, request: Request) -> None:
        """A request reaches the engine, its token ids still known (the engine keeps only block hashes)."""

    def blocks_stored(self, request: Request, start: int, end: int) -> None:
        """The request's blocks [start, end) are now in the prefix cache (hashes: request.block_hashes)."""

    def blocks_reused(self, request: Request, num_blocks: int) -> None:
        """The request's first `num_blocks` blocks were found cached (reported only for kv_cache_report_mode
        "full")."""

    def block_removed(self, block_hash: int, copies_left: int) -> None:
        """A cached block was evicted; `copies_left` other blocks still hold the same content."""

    def all_cleared(self) -> None:
        """The prefix cache was reset."""


class PrefixLookups(NamedTuple):
    """The prefix lookups of new requests admitted since the last report, as the PrefixCacheStats a vLLM
    step reports: the GPU cache's and, on an engine with a KV connector, the connector's (requests,
    tokens queried, tokens hit); `reset`: a reset_prefix_cache succeeded meanwhile."""
    requests: int
    queries: int
    hits: int
    external_requests: int
    external_queries: int
    external_hits: int
    reset: bool


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class FreeQueue:
    """vLLM's free block queue: the blocks to reuse (or evict) next, front first.

    vLLM keeps a doubly linked list; here it is two Python lists, so that the common operations
    (pop n blocks from the front, put a freed request's blocks at the back) are list slices:
    - `_back`: blocks put at the back, in order; `_head` indexes the frontmost one still queued;
    - `_front`: blocks put at the front (unhashed ones, reused first), a stack: its end is frontmost.
    A block taken out of the middle (a prefix hit on a free block, `remove`) stays in `_back` as a
    stale entry, counted in `_stale`, and is skipped when it reaches the front. Only hashed blocks
    are ever taken out of the middle, and a free hashed block is always in `_back` (blocks are
    hashed while in use, and freed hashed ones go to the back), so `_front` has no stale entries.
    Entries of one block in `_back` are in the order they were put there, and all but the newest are
    stale: so while a block has stale entries, the frontmost of its entries is one of them.
    """

    def __init__(self, blocks: range) -> None:
        self._back = list(blocks)
        self._head = 0
        self._front: list[int] = []
        self._stale: dict[int, int] = {}  # block -> how many of its entries in _back are stale
        self._len = len(self._back)

    def __len__(self) -> int:
        return self._len

    def __iter__(self):
        """The queue in order, front first (a copy: for tests and inspection, not the hot path)."""
        order = self._front[::-1]
        stale = dict(self._stale)
        for block in self._back[self._head:]:
            if stale.get(block):
                stale[block] -= 1
            else:
                order.append(block)
        return iter(order)

    def popleft(self, n: int) -> list[int]:
        """Take the n frontmost blocks (the caller checked that there are n)."""
        if n <= 0:
            return []
        self._len -= n
        front = self._front
        if n <= len(front):
            blocks = front[:-n - 1:-1]
            del front[-n:]
            return blocks
        blocks = front[::-1]
        front.clear()
        need = n - len(blocks)
        back, head, stale = self._back, self._head, self._stale
        taken = back[head:head + need]
        if not stale or stale.keys().isdisjoint(taken):
            blocks += taken
            head += need
        else:
            while need:
                block = back[head]
                head += 1
                count = stale.get(block)
                if count:  # an older entry of a block taken out of the middle
                    if count == 1:
                        del stale[block]
                    else:
                        stale[block] = count - 1
                    continue
                blocks.append(block)
                need -= 1
        if head > 4096 and 2 * head > len(back):  # drop the consumed entries now and then
            del back[:head]
            head = 0
        self._head = head
        return blocks

    def append(self, blocks: list[int]) -> None:
        """Put blocks at the back, in this order (the last is evicted last)."""
        self._back += blocks
        self._len += len(blocks)

    def appendleft(self, blocks: list[int]) -> None:
        """Put blocks at the front, the first of them frontmost."""
        self._front += reversed(blocks)
        self._len += len(blocks)

    def remove(self, block: int) -> None:
        """Take out a free hashed block (it is in `_back`: see the class docstring)."""
        self._stale[block] = self._stale.get(block, 0) + 1
        self._len -= 1


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
        self.free_queue = FreeQueue(range(1, num_blocks))
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
        """Pop n blocks from the front of the free queue, evicting the hashes they held."""
        if n > len(self.free_queue):
            raise ValueError(f"cannot get {n} free blocks from the pool ({len(self.free_queue)} free)")
        blocks = self.free_queue.popleft(n)
        block_hash, ref_cnt, pop, events = self.block_hash, self.ref_cnt, self.cached.pop, self.events
        evicted = 0
        for block in blocks:
            ref_cnt[block] = 1
            h = block_hash[block]
            if h is not None:  # evict (inlined: this runs for most blocks of a busy cache)
                block_hash[block] = None
                evicted += 1
                entry = pop(h)
                if entry.__class__ is dict or events is not None:
                    self._evicted_copy(h, entry, block)
        self.num_evictions += evicted
        return blocks

    def _evicted_copy(self, h: int, entry: int | dict[int, None], block: int) -> None:
        """The rest of evicting `block` (hash `h`, whose table entry was `entry`): keep the other copies."""
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
                queue.remove(block)
            ref_cnt[block] += 1

    def free_blocks(self, ordered_blocks) -> None:
        """Release one reference to each block; `ordered_blocks` is in eviction order."""
        ref_cnt, block_hash = self.ref_cnt, self.block_hash
        first, last = [], []
        for block in ordered_blocks:
            count = ref_cnt[block] - 1
            ref_cnt[block] = count
            if not count:
                if block_hash[block] is None:
                    first.append(block)  # reused first (LIFO), as vLLM does for unhashed blocks
                else:
                    last.append(block)  # LRU: evicted last
        if last:
            self.free_queue.append(last)
        if first:
            self.free_queue.appendleft(first)

    def cache_blocks(self, blocks: list[int], hashes: list[int]) -> None:
        """Enter full blocks into the prefix cache under their hashes."""
        block_hash, setdefault = self.block_hash, self.cached.setdefault
        for block, h in zip(blocks, hashes):
            block_hash[block] = h
            entry = setdefault(h, block)
            if entry != block:  # equal content computed twice: keep every copy
                if entry.__class__ is dict:
                    entry[block] = None
                else:
                    self.cached[h] = {entry: None, block: None}

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

    # whether allocate_slots frees blocks of running requests (emulator.sliding_window's sliding groups):
    # then the scheduler calls it on every step, and no decode run is planned
    recycles_blocks = False

    def __init__(self, num_blocks: int, block_size: int, *, enable_caching: bool = True,
                 max_model_len: int = 1 << 30, watermark: float = 0.0) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.max_model_len = max_model_len
        self.pool = BlockPool(num_blocks, enable_caching)
        self.watermark_blocks = int(watermark * num_blocks)
        # prefix-cache statistics, as vLLM's PrefixCacheStats: lookups of admitted new requests
        self.prefix_requests = 0
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.prefix_resets = 0  # successful reset_prefix_cache calls (vLLM's PrefixCacheStats.reset)
        # the same for KV from outside (a KV connector: P/D transfers, offload tiers)
        self.external_requests = 0
        self.external_queries = 0
        self.external_hits = 0
        self._reported = (0, 0, 0, 0, 0, 0, 0)  # the counts take_lookups last reported
        self.offload = None  # emulator.kv_tiers.Offload: full blocks are copied down to it

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def tracks_full_blocks(self) -> bool:
        """Blocks a step fills are handed on (`cache_blocks`): to the prefix cache, or an offload layer's
        stores (vLLM offloads with prefix caching off too)."""
        return self.enable_caching or self.offload is not None

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def block_hashes(self, request: Request) -> list[int]:
        return ensure_block_hashes(request, self.block_size)

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Longest cached prefix, block-aligned, leaving at least one token to compute; none for a request
        that skips reading the prefix cache (vLLM's prefix_cache_lookup_enabled)."""
        if not self.enable_caching or request.skip_reading_prefix_cache:
            return [], 0
        hashes = self.block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        get = self.pool.cached.get
        blocks = []
        for h in hashes[:max_blocks]:  # BlockPool.get_cached_block, inlined
            entry = get(h)
            if entry is None:
                break
            blocks.append(entry if entry.__class__ is int else next(iter(entry)))
        return blocks, len(blocks) * self.block_size

    def report_prefix_hit(self, request: Request) -> None:
        """A waiting request's prefix lookup (vLLM's get_computed_blocks): with KV events on and the request's
        kv_cache_report_mode "full", its hit blocks are reported again (v1/core/kv_cache_manager.py)."""
        events = self.pool.events
        if events is not None and request.kv_cache_report_mode == "full":
            blocks, _ = self.get_computed_blocks(request)
            if blocks:
                events.blocks_reused(request, len(blocks))

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

    def take_lookups(self) -> PrefixLookups | None:
        """The lookups since the last call (None: none, and no reset)."""
        seen = self._reported
        if self.prefix_requests == seen[0] and self.external_requests == seen[3] and self.prefix_resets == seen[6]:
            return None  # (queries and hits only grow with requests)
        now = self._reported = (self.prefix_requests, self.prefix_queries, self.prefix_hits, self.external_requests,
                                self.external_queries, self.external_hits, self.prefix_resets)
        return PrefixLookups(now[0] - seen[0], now[1] - seen[1], now[2] - seen[2], now[3] - seen[3],
                             now[4] - seen[4], now[5] - seen[5], now[6] != seen[6])

    def record_connector_lookup(self, request: Request, num_hit: int, num_external: int) -> int:
        """Count a new request's look-up in the KV connector (vLLM's connector prefix-cache stats): it asks
        for what the GPU cache lacks, its prompt less the local hit `num_hit`, and finds `num_external`
        tokens. Returns the tokens asked for (0: not counted, a resumed request)."""
        queried = request.num_tokens - num_hit if request.num_preemptions == 0 else 0
        if queried > 0:
            self.external_requests += 1
            self.external_queries += queried
            self.external_hits += num_external
        return queried

    def record_prefix_cache_stats(self, request: Request, num_hits: int) -> None:
        """Count a lookup that led to admission; resumed (preempted) requests are not counted, nor one that
        skipped the lookup (vLLM)."""
        if self.enable_caching and request.num_preemptions == 0 and not request.skip_reading_prefix_cache:
            self.prefix_requests += 1
            self.prefix_queries += request.num_tokens
            self.prefix_hits += num_hits

    def _num_blocks_to_allocate(self, request: Request, num_tokens: int, new_computed: list[int],
                                num_computed_tokens: int = 0, admission: bool = False) -> int:
        # (one full-attention group: no tokens are skipped and no admission cap applies)
        required = cdiv(num_tokens, self.block_size)
        held = request.kv_blocks
        if held is not None:  # running: no new prefix hits
            return max(required - len(held), 0)
        ref_cnt = self.pool.ref_cnt
        evictable = [ref_cnt[b] for b in new_computed].count(0)
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

    def can_allocate_reserving(self, request: Request, num_new_tokens: int, new_computed, num_new_computed_tokens: int,
                               has_scheduled_reqs: bool, reserved_blocks: int) -> bool:
        """`can_allocate` with `reserved_blocks` of the free blocks kept for others (vLLM's allocate_slots
        `reserved_blocks`, which its scheduler passes for an async KV load only). Shared by the hybrid manager:
        its `_num_blocks_to_allocate` counts every group's blocks."""
        computed = request.num_computed_tokens + num_new_computed_tokens
        need_slots = min(computed + num_new_tokens, self.max_model_len)
        n_alloc = self._num_blocks_to_allocate(request, need_slots, new_computed, computed)
        return n_alloc + self._watermark(request, has_scheduled_reqs) + reserved_blocks <= len(self.pool.free_queue)

    def remaining_blocks(self, request: Request) -> int:
        """Blocks a request that holds blocks still needs to hold its whole known sequence, capped as at
        admission (vLLM's Scheduler._request_remaining_blocks, apply_admission_cap=True)."""
        full = min(request.num_tokens, self.max_model_len)
        return self._num_blocks_to_allocate(request, full, [], request.num_computed_tokens, admission=True)

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
                if self.offload is not None:
                    self._offload_admit(request, cache)
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
        if filled // bs > request.kv_num_cached and self.tracks_full_blocks:
            self.cache_blocks(request, filled)
        return True

    def append_blocks(self, requests: list[Request]) -> None:
        """One more block for each of these running requests, in this order (a request may come more than
        once): what `allocate_slots` does for decode steps that cross a block boundary, without its checks
        (the caller planned them). The blocks are popped at once, in the order single pops would take them."""
        for request, block in zip(requests, self.pool.get_new_blocks(len(requests))):
            request.kv_blocks.append(block)

    def cache_blocks(self, request: Request, num_tokens: int) -> None:
        """Hash and cache the request's blocks that `num_tokens` fills, and offer them to the offload tiers.
        With prefix caching off, nothing is cached, but an offload layer is still offered each newly full
        block: vLLM hashes a request's blocks whenever a KV connector is set (v1/engine/core.py), and the
        OffloadingConnector stores from each step's computed tokens whatever the GPU cache does. Then
        `request.kv_num_cached` counts the blocks offered so far (none is in the GPU prefix cache)."""
        full = num_tokens // self.block_size
        done = request.kv_num_cached
        if full <= done:
            return
        if not self.enable_caching:
            if self.offload is not None:
                hashes = self.block_hashes(request)
                upto = min(full, len(hashes))
                request.kv_num_cached = full
                if upto > done:
                    self.offload.store_full_blocks(hashes, done, upto, request.num_prompt_tokens // self.block_size,
                                                   request)
            return
        hashes = self.block_hashes(request)
        upto = min(full, len(hashes))
        self.pool.cache_blocks(request.kv_blocks[done:upto], hashes[done:upto])
        request.kv_num_cached = full
        if self.pool.events is not None and upto > done:
            self.pool.events.blocks_stored(request, done, upto)
        if self.offload is not None and upto > done:
            self.offload.store_full_blocks(hashes, done, upto, request.num_prompt_tokens // self.block_size, request)

    def _offload_admit(self, request: Request, cache: bool) -> None:
        """The request gets its blocks (admitted, or starting a load): its offload offers start afresh, after
        the blocks a load from the offload tiers brings (vLLM's OffloadingConnector)."""
        source = request.external_kv.source if not cache and request.external_kv is not None else None
        if isinstance(source, TierSource):
            self.offload.admit(request, self.block_hashes(request), source.start, source.end)
        else:
            self.offload.admit(request)

    def retry_stores(self, requests) -> None:
        """A step ran these requests: those whose last offload store failed offer it again; then the requests
        that finished since the last step make their last offer and end (vLLM's finished_req_ids, after the
        step's scheduled requests)."""
        failed = self.offload.failed
        for request in [r for r in requests if r in failed]:
            self.offload.retry(request, self.block_hashes(request), request.kv_num_cached,
                               request.num_prompt_tokens // self.block_size)
        self.offload.finish_requests()

    def free_out_of_window(self, request: Request) -> None:
        """A finished request whose blocks a KV connector keeps gives back those no later step reads (a hybrid KV
        cache's sliding blocks before the window: emulator.sliding_window); every block here is read."""

    def free(self, request: Request) -> None:
        blocks = request.kv_blocks
        if self.offload is not None and request.is_finished and request.block_hashes is not None:
            self.offload.request_finished(request, request.block_hashes, request.kv_num_cached if blocks else 0,
                                          request.num_prompt_tokens // self.block_size)
        request.kv_blocks = None
        request.kv_num_cached = 0
        if blocks:
            self.pool.free_blocks(reversed(blocks))

    def num_blocks_held(self, request: Request) -> int:
        return len(request.kv_blocks or ())

    def reset_prefix_cache(self) -> bool:
        if not self.pool.reset_prefix_cache():
            return False
        self.prefix_resets += 1
        return True

    def attach_events(self, events: CacheEvents | None) -> None:
        """Report the cache's events to `events` (a KV-event publisher); None stops reporting."""
        self.pool.events = events
