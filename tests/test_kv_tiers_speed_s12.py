"""Offloading's upkeep made cheaper (session 12's speed work), against the same chains kept the old way:
a store job in flight pins its chunks once (`Offload.storing`, which the nearest tier reads as pins where a
chunk key is what the tier pins: an LRU tier of one-block chunks, an ARC tier) instead of in the tier's pins
too, and an LRU tier walks from its head to the next run's marker by the runs it keeps in order (`_marks`)
instead of looking at the type of each entry. Requests arrive (looking the tiers up, loading what they
hold), store as their blocks fill, finish, and time passes, store jobs ending in between."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from emulator.kv_tiers import TIER_POLICIES, KVTier, Offload, RequestRun, TierSpec


def _chain(policy: str, k: int, cpu: int, cxl: int, one_table: bool) -> Offload:
    nearest = TIER_POLICIES[policy](TierSpec("cpu", cpu, 1e4, 1e-3), 1.0, k)
    offload = Offload([nearest, KVTier(TierSpec("cxl", cxl, 1e4, 1e-3), 1.0)], blocks_per_chunk=k,
                      stores_in_flight=True)
    if not one_table:
        nearest.stores = {}  # (its store jobs pin the tier's own table too, as before)
    return offload


def _view(offload: Offload, request: object = None) -> tuple:
    """What either chain must agree on."""
    tiers = [(list(t.blocks), t.stored, t.loaded, t.evicted, t.num_held) for t in offload.tiers]
    jobs = [(j.keys, j.num_blocks, j.start, j.end) for j in offload.in_flight]
    return (tiers, jobs, dict(offload.storing), offload.allocation_failures, offload.lookups,
            sorted(map(id, offload.failed)), offload.hits)


def _check_marks(tier: KVTier) -> None:
    """The runs kept in order are those whose markers lie from the head on, each at its anchor."""
    ahead = tier._log[tier._head - tier._base:]
    markers = [(h, tier._head + i) for i, h in enumerate(ahead) if h.__class__ is RequestRun]
    assert [(run, run.anchor) for run in tier._marks] == markers


@pytest.mark.parametrize("policy,k", [("lru", 1), ("lru", 2), ("arc", 1), ("arc", 2)])
@pytest.mark.parametrize("seed", range(4))
def test_store_pins_in_one_table_evict_load_and_defer_as_in_two(policy, k, seed):
    rng = random.Random(seed)
    cpu, cxl = rng.choice([(8, 12), (24, 40), (64, 32)])
    one, two = _chain(policy, k, cpu, cxl, True), _chain(policy, k, cpu, cxl, False)
    nearest = one.tiers[0]
    assert (nearest.stores is one.storing) == (policy == "arc" or k == 1) and two.tiers[0].stores == {}
    prefixes = [[rng.getrandbits(60) for _ in range(rng.randrange(2, 10))] for _ in range(5)]
    running: dict[int, list] = {}  # request -> [its blocks, blocks offered, prompt blocks]
    loads: list[tuple[list[int], int, list, list]] = []  # (blocks, start, parts in one, parts in two)
    now = 0.0
    for step in range(1200):
        now += rng.choice([0.0, 2e-4, 1e-3, 4e-3])
        roll = rng.random()
        if roll < 0.3 or not running:  # an arrival looks the tiers up and loads what they hold
            request = step
            blocks = (rng.choice(prefixes) if rng.random() < 0.6 else []) + [
                rng.getrandbits(60) for _ in range(rng.randrange(1, 20))]
            prompt = rng.randrange(1, len(blocks) + 1)
            for offload in (one, two):
                offload.advance(now)
            parts = [offload.lookup(blocks, 0, prompt - 1, request) for offload in (one, two)]
            assert [[(t.spec.name, n) for t, n in p] if p is not None else None for p in parts][0] == \
                [[(t.spec.name, n) for t, n in p] if p is not None else None for p in parts][1]
            if parts[0] is None:
                continue  # deferred: it asks again as another arrival
            loaded = sum(n for _, n in parts[0])
            for offload, part in zip((one, two), parts):
                offload.admit(request, blocks, 0, loaded)
                if loaded:
                    offload.take(blocks, 0, part)
            if loaded:
                loads.append((blocks, 0, *parts))
            running[request] = [blocks, loaded, prompt]
        elif roll < 0.65:  # a step fills some of a request's blocks; its output comes back later
            request = rng.choice(list(running))
            blocks, done, prompt = running[request]
            full = min(len(blocks), done + rng.randrange(1, 12))
            for offload in (one, two):
                offload.advance(now)
                offload.store_full_blocks(blocks, done, full, prompt, request)
                offload.retry(request, blocks, full, prompt)
                offload.step_ended(now + 5e-4)
            running[request][1] = full
        elif roll < 0.8 and loads:  # a load ends
            blocks, start, part_one, part_two = loads.pop(rng.randrange(len(loads)))
            one.release(blocks, start, part_one)
            two.release(blocks, start, part_two)
        elif roll < 0.9:  # a request finishes: its end comes at the next step
            request = rng.choice(list(running))
            blocks, done, prompt = running.pop(request)
            for offload in (one, two):
                offload.request_finished(request, blocks, done, prompt)
        else:  # the engine idles until the next store job ends
            assert one.idle_until(now) == two.idle_until(now)
        assert _view(one) == _view(two)
        if nearest.stores is one.storing:  # the tier's own pins are the loads' alone
            assert Counter(two.tiers[0].pins) == Counter(nearest.pins) + Counter(one.storing)
        else:
            assert nearest.pins == two.tiers[0].pins
        if isinstance(nearest, KVTier):
            _check_marks(nearest)
    assert one.allocation_failures or one.tiers[0].evicted  # (the tier was full: pins decided what went)


def test_an_all_or_nothing_tier_stores_nothing_of_a_run_longer_than_it_holds():
    """A store of new blocks that outgrows the whole tier is refused before anything is entered."""
    tier = KVTier(TierSpec("cpu", 3, 1e4, 1e-3), 1.0, all_or_nothing=True)
    assert tier.put_many([1, 2]) == []
    assert tier.put_many([3, 4, 5, 6]) is None
    assert (list(tier.blocks), tier.stored, tier.evicted, tier._index) == ([2, 1], 2, 0, {2: 0, 1: 1})
    assert tier.put_many([5, 6]) == [2] and list(tier.blocks) == [1, 6, 5]
