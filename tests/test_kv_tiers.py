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
        for h in range(30):
            found = offload.lookup([h], 0, 1)
            assert (found[0][0] if found else None) is nearest(offload, h), h
        for tier in offload.tiers:
            assert len(tier.blocks) <= max(tier.capacity_blocks, 0)
    first = offload.tiers[0]
    assert first.stored - first.evicted == len(first.blocks)


def test_a_block_pushed_out_after_its_lookup_is_still_loaded():
    offload = chain(2)
    offload.store([1, 2])
    parts = offload.lookup([1, 2], 0, 2)
    assert [(tier.spec.name, n) for tier, n in parts] == [("t0", 2)]
    offload.store([3, 4])  # the engine ran on before the load started: both found blocks are gone
    offload.take([1, 2], 0, parts)
    assert offload.tiers[0].loaded == 2 and list(offload.tiers[0].blocks) == [3, 4]
