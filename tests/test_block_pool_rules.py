"""The block pool (its two-list free queue, its hash table with copies of one content) against vLLM's rules
written plainly, one block at a time, on random sequences of takes, caches (the same content computed
twice), prefix hits and frees, with and without KV events."""
from __future__ import annotations

import random

import pytest

from emulator.kv_cache import BlockPool


class OneByOne:
    """vLLM's block pool rules, one block at a time: the reference."""

    def __init__(self, num_blocks: int) -> None:
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, list[int]] = {}  # hash -> its blocks, oldest first
        self.queue = list(range(1, num_blocks))
        self.num_evictions = 0
        self.removed: list[tuple[int, int]] = []

    def get_new_blocks(self, n: int) -> list[int]:
        blocks, self.queue = self.queue[:n], self.queue[n:]
        for block in blocks:
            self.ref_cnt[block] = 1
            h = self.block_hash[block]
            if h is not None:
                self.block_hash[block] = None
                self.num_evictions += 1
                self.cached[h].remove(block)
                if not self.cached[h]:
                    del self.cached[h]
                self.removed.append((h, len(self.cached.get(h, ()))))
        return blocks

    def cache_blocks(self, blocks: list[int], hashes: list[int]) -> None:
        for block, h in zip(blocks, hashes):
            self.block_hash[block] = h
            if block not in self.cached.setdefault(h, []):
                self.cached[h].append(block)

    def touch(self, blocks: list[int]) -> None:
        for block in blocks:
            if self.ref_cnt[block] == 0:
                self.queue.remove(block)
            self.ref_cnt[block] += 1

    def free_blocks(self, ordered: list[int]) -> None:
        first, last = [], []
        for block in ordered:
            self.ref_cnt[block] -= 1
            if not self.ref_cnt[block]:
                (first if self.block_hash[block] is None else last).append(block)
        self.queue = first + self.queue + last  # the first freed unhashed block is reused first


class Removed:
    """A KV-event listener that keeps the evictions it hears."""

    def __init__(self) -> None:
        self.removed: list[tuple[int, int]] = []

    def block_removed(self, block_hash: int, copies_left: int) -> None:
        self.removed.append((block_hash, copies_left))


def same(pool: BlockPool, ref: OneByOne) -> None:
    assert pool.ref_cnt == ref.ref_cnt
    assert pool.block_hash == ref.block_hash
    assert list(pool.free_queue) == ref.queue
    assert pool.num_evictions == ref.num_evictions
    cached = {h: [entry] if isinstance(entry, int) else list(entry) for h, entry in pool.cached.items()}
    assert cached == ref.cached
    for h, blocks in ref.cached.items():
        assert pool.get_cached_block(h) == blocks[0]


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("events", [False, True])
def test_the_pool_equals_its_rules_one_block_at_a_time(seed: int, events: bool) -> None:
    rng = random.Random(seed)
    num_blocks = rng.choice([8, 40, 200])
    pool, ref = BlockPool(num_blocks, enable_caching=True), OneByOne(num_blocks)
    listener = Removed()
    if events:
        pool.events = listener
    held: list[list[int]] = []  # per holder, its blocks in order
    contents = rng.choice([4, 30, 10_000])  # few contents: the same one is often computed twice
    for _ in range(400):
        op = rng.random()
        if op < 0.35 and len(pool.free_queue):
            n = rng.randint(1, min(len(pool.free_queue), rng.choice([1, 3, 20])))
            blocks = pool.get_new_blocks(n)
            assert blocks == ref.get_new_blocks(n)
            held.append(blocks)
        elif op < 0.6 and held:
            blocks = [block for block in rng.choice(held) if ref.block_hash[block] is None]  # filled, not yet cached
            hashes = [rng.randrange(contents) for _ in blocks]
            if rng.random() < 0.5:
                hashes = list(dict.fromkeys(hashes))[:len(blocks)]
            pool.cache_blocks(blocks[:len(hashes)], hashes)
            ref.cache_blocks(blocks[:len(hashes)], hashes)
        elif op < 0.7:  # a prefix hit on cached blocks, free or in use
            hits = list(dict.fromkeys(block for block in ref.cached and
                                      [ref.cached[h][0] for h in rng.sample(sorted(ref.cached),
                                                                              min(3, len(ref.cached)))]))
            if hits:
                pool.touch(hits)
                ref.touch(hits)
                held.append(hits)
        elif held:
            blocks = held.pop(rng.randrange(len(held)))
            pool.free_blocks(reversed(blocks))
            ref.free_blocks(blocks[::-1])
        same(pool, ref)
    if events:
        assert listener.removed == ref.removed
    while held:
        blocks = held.pop()
        pool.free_blocks(reversed(blocks))
        ref.free_blocks(blocks[::-1])
    same(pool, ref)
    assert len(pool.free_queue) == num_blocks - 1
