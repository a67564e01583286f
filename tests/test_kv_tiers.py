"""KV tiers below the GPU: LRU per tier, blocks pushed one tier down, lookups from the nearest holder."""
from __future__ import annotations

import random
from collections import OrderedDict

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
    first, second = offload.tiers
    assert list(first.blocks) == [3, 2, 1]  # a request's run is stored tail first: its head is evicted last
    offload.admit("a", [1, 2], 0, 2)  # a request loads them: ranked by it (it ranks its head last), ...
    offload.take([1, 2], 0, parts)  # ... and pinned
    assert list(first.blocks) == [3, 2, 1]
    assert offload.store([4, 5]) is False  # room for one (1 and 2 being read): vLLM's CPU tier stores none
    assert list(first.blocks) == [3, 2, 1] and not second.blocks and offload.allocation_failures == 1
    assert offload.store([4]) is True  # 4 pushes 3 (1 and 2 being read) one tier down
    assert list(first.blocks) == [2, 1, 4] and list(second.blocks) == [3] and first.loaded == 2
    offload.admit("b", [1], 0, 1)  # a second load of block 1, by a request ranked after 4 was stored
    offload.take([1], 0, offload.lookup([1], 0, 1))
    offload.release([1, 2], 0, parts)
    assert first.pins == {1: 1}
    offload.store([6])  # 2 is free to go again; 1 is still read
    assert list(first.blocks) == [4, 1, 6] and list(second.blocks) == [3, 2]
    assert offload.store([7, 8, 9]) is False and offload.allocation_failures == 2  # only 2 could make room
    offload.release([1], 0, [(first, 1)])
    assert first.pins == {} and second.pins == {}


def test_a_finished_request_makes_what_it_offered_the_most_recent_head_last():
    """vLLM's CPU LRU commits a finished request's recency: its chunks the newest, its head newest of all
    (on_request_finished); blocks the tier no longer holds stay gone."""
    offload = chain(6, 0)
    a, b = object(), object()
    offload.store_full_blocks([1, 2, 3], 0, 3, 3, a)  # request A
    offload.store_full_blocks([4, 5], 0, 2, 2, b)     # request B
    tier = offload.tiers[0]
    assert list(tier.blocks) == [3, 2, 1, 5, 4]
    offload.request_finished(a, [1, 2, 3, 9], full=4, prompt_blocks=4)  # A ends (its block 9 was never stored)
    assert list(tier.blocks) == [3, 2, 1, 5, 4] and a not in offload.requests and offload.step_work
    offload.finish_requests()  # the next step: A's end is applied (vLLM's finished_req_ids)
    assert list(tier.blocks) == [5, 4, 3, 2, 1] and not offload.step_work
    offload.request_finished(b, [4, 5], full=2, prompt_blocks=2)
    offload.finish_requests()
    assert list(tier.blocks) == [3, 2, 1, 5, 4] and not offload.requests
    c = object()  # a request that offered only its prompt's block
    offload.prompt_only = True
    offload.store_full_blocks([1, 7], 0, 2, 1, c)
    offload.request_finished(c, [1, 7], full=2, prompt_blocks=1)
    offload.finish_requests()
    assert list(tier.blocks) == [3, 2, 5, 4, 1]


class _ReferenceLRU:
    """A tier as an OrderedDict, put by put (what KVTier's log and index must behave as)."""

    def __init__(self, capacity: int) -> None:
        self.blocks: OrderedDict[int, None] = OrderedDict()
        self.capacity, self.pins, self.stored, self.evicted = capacity, {}, 0, 0

    def put(self, h: int) -> int | None:
        if h in self.blocks:
            self.blocks.move_to_end(h)
            return None
        if self.capacity <= 0:
            return h
        self.blocks[h] = None
        self.stored += 1
        if len(self.blocks) <= self.capacity:
            return None
        self.evicted += 1
        if not self.pins:
            return self.blocks.popitem(last=False)[0]
        victim = next(b for b in self.blocks if b not in self.pins)
        del self.blocks[victim]
        return victim


@pytest.mark.parametrize("seed", range(6))
def test_a_tier_orders_and_evicts_as_an_lru_put_by_put(seed):
    """Bulk stores (a run put tail first), refreshes (loads) and pins, against the plain LRU: the same
    blocks pushed out, in the same order, and the same blocks held, through the tier's rebuilds of its log."""
    rng = random.Random(seed)
    capacity, universe = rng.choice([(0, 20), (1, 20), (3, 20), (10, 200), (50, 5000)])
    tier, reference = KVTier(TierSpec("t", capacity, 1e9, 0.0), 1.0), _ReferenceLRU(capacity)
    for step in range(2000):  # ~12,000 entries logged: the log is rebuilt several times
        roll = rng.random()
        if roll < 0.6:
            hashes = [rng.randrange(universe) for _ in range(rng.randrange(1, 12))]
            if rng.random() < 0.5:
                hashes = list(dict.fromkeys(hashes))
            pushed = [h for h in map(reference.put, reversed(hashes)) if h is not None]  # tail first
            assert tier.put_many(hashes) == pushed
        elif roll < 0.8 and reference.blocks:
            h = rng.choice(list(reference.blocks))
            reference.blocks.move_to_end(h)
            tier.touch(h)
        elif roll < 0.9 and reference.blocks:
            h = rng.choice(list(reference.blocks))
            for pins in (reference.pins, tier.pins):
                pins[h] = pins.get(h, 0) + 1
        elif reference.pins:
            h = rng.choice(list(reference.pins))
            for pins in (reference.pins, tier.pins):
                pins[h] -= 1
                if not pins[h]:
                    del pins[h]
        if step % 100 == 0:
            assert list(tier.blocks) == list(reference.blocks)
            assert (tier.num_held, tier.stored, tier.evicted) == (len(reference.blocks), reference.stored,
                                                                  reference.evicted)
            assert all(tier.holds(h) == (h in reference.blocks) for h in range(min(universe, 300)))
