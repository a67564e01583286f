"""KV tiers below the GPU: LRU per tier, blocks pushed one tier down, lookups from the nearest holder."""
from __future__ import annotations

import random

import pytest

from emulator.kv_tiers import KVTier, Offload, TierSpec


def chain(*capacities: int) -> Offload:
    return Offload([KVTier(TierSpec(f"t{i}", capacity, 1e9, 0.0), 1.0) for i, capacity in enumerate(capacities)])


def nearest(offload: Offload, h: int) -> KVTier | None:
    return next((tier for tier in offload.tiers if h in tier.blocks), None)


@pytest.mark.parametrize("capacities", [(4, 8), (3, 0, 5), (0, 4), (2, 3, 4), (5,)])
def test_lookups_find_the_nearest_tier_holding_a_block(capacities):
    offload, rng = chain(*capacities), random.Random(7)
    for _ in range(400):  # stores of new and re-computed blocks, loads that refresh them
        hashes = [rng.randrange(30) for _ in range(rng.randrange(1, 6))]
        if rng.random() < 0.8:
            offload.store(hashes)
        else:
            parts = offload.lookup(hashes, 0, len(hashes))
            offload.take(hashes, 0, parts)
            offload.release(hashes, 0, parts)
        for h in range(30):
            found = offload.lookup([h], 0, 1)
            assert (found[0][0] if found else None) is nearest(offload, h), h
        for tier in offload.tiers:
            assert len(tier.blocks) <= max(tier.capacity_blocks, 0)
    first = offload.tiers[0]
    assert first.stored - first.evicted == len(first.blocks)


def test_blocks_being_loaded_are_pinned_until_their_load_ends():
    offload = chain(3, 2)
    offload.store([1, 2, 3])
    parts = offload.lookup([1, 2], 0, 2)
    assert [(tier.spec.name, n) for tier, n in parts] == [("t0", 2)]
    offload.take([1, 2], 0, parts)  # a load decided: 1 and 2 are the most recent, and pinned
    offload.store([4, 5])  # pushes out 3, then (1 and 2 being read) the 4 just stored
    first, second = offload.tiers
    assert list(first.blocks) == [1, 2, 5] and list(second.blocks) == [3, 4] and first.loaded == 2
    offload.take([1], 0, offload.lookup([1], 0, 1))  # a second load of block 1
    offload.release([1, 2], 0, parts)
    assert first.pins == {1: 1}
    offload.store([6])  # 2 is free to go again; 1 is still read
    assert list(first.blocks) == [5, 1, 6] and list(second.blocks) == [4, 2]
    offload.release([1], 0, [(first, 1)])
    assert first.pins == {} and second.pins == {}
