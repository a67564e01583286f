"""vLLM's hybrid KV cache manager, for models that mix sliding-window and full-attention layers (gpt-oss).

Each KV cache group (emulator.memory.KVCacheGroups: gpt-oss has a sliding group of 18 layers, then a
full-attention one) keeps its own block table per request, and every group draws its blocks from one
pool. Rules follow vLLM 0.33 (`v1/core/kv_cache_coordinator.py` HybridKVCacheCoordinator,
`single_type_kv_cache_manager.py` SlidingWindowManager, `kv_cache_manager.py` allocate_slots):

- a cached block is keyed by its hash and its group; the full group's keys are the plain hashes, the
  others' (hash, group);
- a prefix hit is the longest prefix cached in the full group, then, within it, the rightmost run of
  cdiv(window - 1, block_size) blocks cached in the sliding group (or the sliding group's cached run from
  the start when there is no such run); the full group's hit is cut to it. The blocks before that run are
  the null block in the sliding table;
- every allocate_slots first frees the sliding blocks that fell out of the window of the tokens already
  processed (computed less those in flight), putting the null block in their place; then every group
  takes the blocks for the new tokens, sliding group first;
- the admission gate caps a sliding group's blocks at its share for one request (the window, the tokens in
  flight and one block), as vLLM's pool sizing does;
- the sliding group caches (hashes) only the blocks a later request could hit: the run before the prompt's
  replay boundary (its last token) and before a shared prefix a lookup found cached in the full group only
  (vLLM's default prefix_cache_retention_interval 0); the full group caches every full block;
- an external KV load (P/D: emulator.disaggregation) counts its tokens as computed: a sliding group puts the
  null block before the window of the whole loaded prefix and allocates from there on (allocate_slots with
  num_external_computed_tokens); a finished P/D prefill frees its sliding blocks before the window before it
  is held for the decode side (Scheduler._connector_finished); a transfer moves a sliding group's in-window
  tail only (NIXL's get_exchange_clipped_blocks: `transfer_tail`);
- a freed request returns each group's blocks, group by group, tail first (its null head skipped);
- KV events are every group's, as vLLM's pool emits them (emulator.kv_events): each cache_blocks call one
  BlockStored per group, in group order (a sliding group's naming only the blocks it cached); an eviction
  one BlockRemoved of the evicted key's group; a "full" report-mode hit one BlockStored per group.
"""
from __future__ import annotations

from emulator.config import EngineConfig
from emulator.kv_cache import KVCacheManager, cdiv
from emulator.memory import KVCacheGroups
from emulator.request import Request

NULL = 0  # the null block's id


class GroupHit(tuple):
    """A prefix hit, per group its blocks (a sliding group's skipped ones the null block); `tokens` the hit's
    length, `boundary` the shared prefix cached in the full group beyond it (vLLM's shared_prefix_boundary;
    0: none)."""
    tokens: int
    boundary: int

    def __new__(cls, blocks, tokens: int, boundary: int) -> GroupHit:
        hit = super().__new__(cls, blocks)
        hit.tokens, hit.boundary = tokens, boundary
        return hit


class HybridKVCacheManager(KVCacheManager):
    """The scheduler's view of a hybrid KV cache. A request's table in the (first) full group rides on
    `request.kv_blocks` (its length is every group's), its cached count on `request.kv_num_cached`. Every
    group draws from the one BlockPool; an eviction of any group's key is published under that group."""

    recycles_blocks = True

    def __init__(self, num_blocks: int, block_size: int, groups: KVCacheGroups, *, enable_caching: bool = True,
                 max_model_len: int = 1 << 30, watermark: float = 0.0) -> None:
        super().__init__(num_blocks, block_size, enable_caching=enable_caching, max_model_len=max_model_len,
                         watermark=watermark)
        self.groups = groups
        self.sliding = [kind == "sliding" for kind in groups.kinds]
        self.full_groups = [g for g, s in enumerate(self.sliding) if not s]  # the order a prefix hit is searched in
        self.sliding_groups = [g for g, s in enumerate(self.sliding) if s]
        self.main = groups.kinds.index("full")
        self.window = groups.sliding_window
        self.run_blocks = cdiv(self.window - 1, block_size)  # a sliding hit's contiguous cached blocks
        self.sliding_cap = groups.sliding_blocks_per_request(max_model_len, block_size)
        self.transfer_tail = groups.transfer_blocks(block_size)  # per group, what a P/D transfer moves (0: all)
        # per request: its block table in each group, how many of each are cached, its shared-prefix boundary
        self.tables: dict[Request, list[list[int]]] = {}
        self.num_cached: dict[Request, list[int]] = {}
        self.boundaries: dict[Request, int] = {}
        self.empty = GroupHit([[] for _ in groups.kinds], 0, 0)

    def _key(self, h: int, group: int):
        return h if group == self.main else (h, group)

    def _lookup(self, h: int, groups: list[int]) -> list[int] | None:
        """The cached block of hash `h` in each of `groups`, or None if one of them lacks it."""
        cached, found = self.pool.cached, []
        for g in groups:
            entry = cached.get(self._key(h, g))
            if entry is None:
                return None
            found.append(entry if entry.__class__ is int else next(iter(entry)))
        return found

    # -- prefix hits ------------------------------------------------------------------------
    def get_computed_blocks(self, request: Request) -> tuple[GroupHit, int]:
        """The hit both kinds of group agree on (HybridKVCacheCoordinator.find_longest_cache_hit for one
        full and one sliding spec: the full groups left to right, then the sliding ones right to left)."""
        if not self.enable_caching or request.skip_reading_prefix_cache:
            return self.empty, 0
        bs = self.block_size
        hashes = self.block_hashes(request)
        full, sliding = self.full_groups, self.sliding_groups
        hits: list[list[int]] = [[] for _ in self.sliding]
        for h in hashes[:(request.num_tokens - 1) // bs]:
            found = self._lookup(h, full)
            if found is None:
                break
            for g, block in zip(full, found):
                hits[g].append(block)
        full_tokens = len(hits[full[0]]) * bs
        n = full_tokens // bs
        for g in sliding:
            hits[g] = [NULL] * n
        run, matched = 0, False
        for i in range(n - 1, -1, -1):  # the rightmost run of run_blocks cached blocks
            found = self._lookup(hashes[i], sliding)
            if found is None:
                run = 0
                continue
            for g, block in zip(sliding, found):
                hits[g][i] = block
            run += 1
            if run >= self.run_blocks:
                for g in sliding:
                    del hits[g][i + run:]
                matched = True
                break
        if not matched:  # the run from the start, however short
            for g in sliding:
                del hits[g][run:]
        tokens = len(hits[sliding[0]]) * bs
        for g in full:
            del hits[g][tokens // bs:]
        return GroupHit(hits, tokens, full_tokens if full_tokens > tokens else 0), tokens

    def attach_events(self, events) -> None:
        super().attach_events(events)
        if events is not None:  # the recorder learns the groups (vLLM's kv_cache_event_metadata)
            events.use_groups(self.sliding, self.window, self.main)

    def report_prefix_hit(self, request: Request) -> None:
        """kv_cache_report_mode "full": each group's hit reported, group by group (vLLM's coordinator
        emit_cached_block_events; a sliding group's hit counts its null blocks)."""
        events = self.pool.events
        if events is not None and request.kv_cache_report_mode == "full":
            hit, _ = self.get_computed_blocks(request)
            for g, blocks in enumerate(hit):
                if blocks:
                    events.blocks_reused(request, len(blocks), g)

    # -- allocation -------------------------------------------------------------------------
    def _skipped_blocks(self, num_computed_tokens: int) -> int:
        """Whole blocks before the window of the next token (SlidingWindowManager.get_num_skipped_tokens)."""
        return max(0, num_computed_tokens - self.window + 1) // self.block_size

    def _num_blocks_to_allocate(self, request: Request, num_tokens: int, hit: GroupHit | list,
                                num_computed_tokens: int = 0, admission: bool = False) -> int:
        required = cdiv(num_tokens, self.block_size)
        tables = self.tables.get(request)
        if tables is not None:  # holding blocks: no new prefix hits (a sliding group capped first, as vLLM's)
            return sum(max((min(required, self.sliding_cap) if admission and sliding else required) - len(table), 0)
                       for table, sliding in zip(tables, self.sliding))
        hit = hit or self.empty
        ref_cnt = self.pool.ref_cnt
        skipped = self._skipped_blocks(num_computed_tokens)
        total = 0
        for g, sliding in enumerate(self.sliding):
            blocks = hit[g]
            if not sliding:
                total += max(required - len(blocks), 0) + [ref_cnt[b] for b in blocks].count(0)
                continue
            need = min(required, self.sliding_cap) if admission else required
            total += max(need - max(skipped, len(blocks)), 0)
            total += sum(1 for b in blocks[skipped:] if b != NULL and ref_cnt[b] == 0)
        return total

    def can_fit_full_sequence(self, request: Request, new_computed: GroupHit | list, has_scheduled_reqs: bool) -> bool:
        """The admission gate; a request about to load external KV counts those tokens as computed too (vLLM's
        total_computed_tokens: a sliding group needs no block before the window of the loaded prompt)."""
        full = min(request.num_tokens, self.max_model_len)
        computed = request.num_computed_tokens + (new_computed.tokens if new_computed else 0)
        external = request.external_kv
        if external is not None and request.kv_blocks is None and not request.skip_reading_prefix_cache:
            computed = max(computed, min(external.tokens, request.num_tokens))
        computed = min(computed, self.max_model_len)
        need = self._num_blocks_to_allocate(request, full, new_computed, computed, admission=True)
        return need + self._watermark(request, has_scheduled_reqs) <= self.pool.num_free_blocks

    def can_allocate_reserving(self, request: Request, num_new_tokens: int, new_computed: GroupHit | list,
                               num_new_computed_tokens: int, has_scheduled_reqs: bool, reserved_blocks: int) -> bool:
        """Room for an external KV load (the scheduler's only use): its `num_new_tokens` are computed on arrival,
        so a sliding group takes blocks only from the window of the whole loaded prefix on (vLLM's allocate_slots
        with num_external_computed_tokens)."""
        total = min(request.num_computed_tokens + num_new_computed_tokens + num_new_tokens, self.max_model_len)
        n_alloc = self._num_blocks_to_allocate(request, total, new_computed, total)
        return n_alloc + self._watermark(request, has_scheduled_reqs) + reserved_blocks <= len(self.pool.free_queue)

    def can_allocate(self, request: Request, num_new_tokens: int, new_computed: GroupHit | list,
                     num_new_computed_tokens: int, has_scheduled_reqs: bool) -> bool:
        computed = request.num_computed_tokens + num_new_computed_tokens
        need_slots = min(computed + num_new_tokens, self.max_model_len)
        n_alloc = self._num_blocks_to_allocate(request, need_slots, new_computed, computed)
        return n_alloc + self._watermark(request, has_scheduled_reqs) <= len(self.pool.free_queue)

    def allocate_slots(self, request: Request, num_new_tokens: int, new_computed: GroupHit | list | None = None,
                       num_new_computed_tokens: int = 0, has_scheduled_reqs: bool = True, cache: bool = True) -> bool:
        """`cache=False`: the new tokens are an external load's (vLLM's num_external_computed_tokens, its blocks
        cached when the load ends): computed already as far as the window goes, so a sliding group puts the null
        block before the window of the whole loaded prefix and takes blocks from there on only."""
        bs = self.block_size
        computed = request.num_computed_tokens + num_new_computed_tokens
        total = min(computed, self.max_model_len)
        need_slots = min(total + num_new_tokens, self.max_model_len)
        tables = self.tables.get(request)
        if tables is not None:  # vLLM frees first, whether or not the new blocks then fit
            self._remove_skipped_blocks(tables, max(0, total - request.num_in_flight_tokens))
        hit = new_computed or self.empty
        known = computed if cache else need_slots  # the tokens whose KV is (or will be, loaded) in place
        n_alloc = self._num_blocks_to_allocate(request, need_slots, hit, known)
        if n_alloc + self._watermark(request, has_scheduled_reqs) > len(self.pool.free_queue):
            return False
        if tables is None:
            tables = self.tables[request] = [[] for _ in self.sliding]
            counts = self.num_cached[request] = [0] * len(tables)
            self.boundaries[request] = hit.boundary
            skipped = self._skipped_blocks(known)
            if any(hit) or skipped:  # every group's hit blocks are taken (touched) before any new block is popped
                for g, sliding in enumerate(self.sliding):
                    blocks = hit[g][skipped:] if sliding else hit[g]
                    self.pool.touch([b for b in blocks if b != NULL])
                    tables[g] += [NULL] * skipped + blocks if sliding else blocks
                    counts[g] = len(tables[g])
            request.kv_blocks = tables[self.main]
            request.kv_num_cached = counts[self.main]
        required = cdiv(need_slots, bs)
        for table in tables:
            if required > len(table):
                table += self.pool.get_new_blocks(required - len(table))
        if not cache:
            return True
        filled = min(total + num_new_tokens, request.num_tokens)
        if filled // bs > request.kv_num_cached and self.enable_caching:
            self.cache_blocks(request, filled)
        return True

    def _remove_skipped_blocks(self, tables: list[list[int]], processed_tokens: int) -> None:
        """Free the sliding blocks wholly before the window of the processed tokens, tail first, stopping at
        the null block (those before it went earlier)."""
        skipped = self._skipped_blocks(processed_tokens)
        if not skipped:
            return
        for table, sliding in zip(tables, self.sliding):
            if not sliding:
                continue
            freed = []
            for i in range(min(skipped, len(table)) - 1, -1, -1):
                if table[i] == NULL:
                    break
                freed.append(table[i])
                table[i] = NULL
            if freed:
                self.pool.free_blocks(freed)

    def free_out_of_window(self, request: Request) -> None:
        """A finished request whose blocks a KV connector keeps (a P/D prefill) gives back its sliding blocks
        wholly before the window of its processed tokens first (vLLM's Scheduler._connector_finished)."""
        tables = self.tables.get(request)
        if tables is not None:
            self._remove_skipped_blocks(tables, max(0, request.num_computed_tokens - request.num_in_flight_tokens))

    def group_block_ids(self, request: Request) -> list[list[int]]:
        """Per group, the blocks a P/D connector sends of a held request (NIXL's get_exchange_clipped_blocks, in its
        kv_transfer_params' remote_block_ids): a sliding group's tail of the table as it is, so with the null block
        (id 0) where the window starts past it, as vLLM clips it (the decode side reads only as many as it
        allocated); every other group's blocks."""
        out = []
        for table, tail in zip(self.tables.get(request, ()), self.transfer_tail):
            out.append(table[-tail:] if tail else [b for b in table if b != NULL])
        return out

    def loading_blocks(self, request: Request) -> list[list[int]]:
        """Per group, the blocks an external load that just started fills (those not cached: NIXL's and
        Mooncake's unhashed blocks), a sliding group's clipped to the in-window tail it moves."""
        out = []
        for table, done, tail in zip(self.tables[request], self.num_cached[request], self.transfer_tail):
            blocks = [b for b in table[done:] if b != NULL]
            out.append(blocks[-tail:] if tail else blocks)
        return out

    def append_blocks(self, requests: list[Request]) -> None:
        raise NotImplementedError("decode runs are not planned on a hybrid KV cache")

    def cache_blocks(self, request: Request, num_tokens: int) -> None:
        """Hash and cache the blocks `num_tokens` fills: every one in a full group, in a sliding group only
        those a later hit could use (SlidingWindowManager.reachable_block_mask with retention 0)."""
        if not self.enable_caching:
            return
        bs = self.block_size
        hashes = self.block_hashes(request)
        full = min(num_tokens, len(hashes) * bs) // bs
        tables, counts = self.tables[request], self.num_cached[request]
        ends = [(request.num_prompt_tokens - 1) // bs]  # the replay boundary's block, and a shared prefix's
        if self.boundaries[request]:
            ends.append(self.boundaries[request] // bs)
        events = self.pool.events
        for g, sliding in enumerate(self.sliding):
            done = counts[g]
            if full <= done:
                continue
            blocks, keys, cached = [], [], []
            for i in range(done, full):
                block = tables[g][i]
                if block == NULL or sliding and not any(end - self.run_blocks <= i < end for end in ends):
                    continue
                blocks.append(block)
                keys.append(self._key(hashes[i], g))
                cached.append(i)
            self.pool.cache_blocks(blocks, keys)
            counts[g] = full
            if events is not None:  # vLLM emits it even when the group cached none of them
                events.group_blocks_stored(request, g, done, full, cached, keys)
        request.kv_num_cached = counts[self.main]

    def free(self, request: Request) -> None:
        tables = self.tables.pop(request, None)
        self.num_cached.pop(request, None)
        self.boundaries.pop(request, None)
        request.kv_blocks = None
        request.kv_num_cached = 0
        for table in tables or ():
            start = 0
            while start < len(table) and table[start] == NULL:
                start += 1
            if start < len(table):
                self.pool.free_blocks(reversed(table[start:]))

    def num_blocks_held(self, request: Request) -> int:
        return sum(len(table) - table.count(NULL) for table in self.tables.get(request, ()))


def kv_cache_manager(num_blocks: int, config: EngineConfig, groups: KVCacheGroups | None = None) -> KVCacheManager:
    """An engine's KV cache manager: hybrid for a model's sliding-window and full-attention groups
    (MemoryPlan.groups), else the one-group manager."""
    args = dict(enable_caching=config.enable_prefix_caching, max_model_len=config.max_model_len,
                watermark=config.watermark)
    if groups is None:
        return KVCacheManager(num_blocks, config.block_size, **args)
    return HybridKVCacheManager(num_blocks, config.block_size, groups, **args)
