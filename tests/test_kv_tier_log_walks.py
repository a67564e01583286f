"""An LRU tier's log upkeep (issue 9's speed work): the walk from the head that goes by the runs' markers
instead of looking each entry up, the index that drops what eviction passes, and the log trimmed behind the
head, against the same tier walking by index look-ups, with requests storing, loading and finishing as an
engine's OffloadingConnector drives them."""
from __future__ import annotations

import random

import pytest

from emulator.kv_tiers import IN_RUN, KVTier, Offload, RequestRun, TierSpec


class _LookedUp(KVTier):
    """The tier walking from its head by index look-ups only (never by its count of markers)."""

    def _live_from(self, seq: int, limit: int) -> int:
        markers, self._markers = self._markers, -1  # (never equal to the holes: the look-up path)
        try:
            return super()._live_from(seq, limit)
        finally:
            self._markers = markers


def _chain(cls: type[KVTier], cpu: int, cxl: int) -> Offload:
    return Offload([cls(TierSpec("cpu", cpu, 1e9, 0.0), 1.0), KVTier(TierSpec("cxl", cxl, 1e9, 0.0), 1.0)])


def _check_upkeep(tier: KVTier) -> None:
    """The counts the fast walks trust: markers and holes from the head on, and no index entry behind it."""
    ahead = tier._log[tier._head - tier._base:]
    markers = sum(h.__class__ is RequestRun for h in ahead)
    dead = sum(1 for i, h in enumerate(ahead)
               if h.__class__ is not RequestRun and tier._index.get(h) != tier._head + i)
    assert (tier._markers, tier._holes) == (markers, markers + dead)
    assert all(seq == IN_RUN or seq >= tier._head for seq in tier._index.values())


@pytest.mark.parametrize("seed", range(8))
def test_walking_by_markers_evicts_and_orders_as_walking_by_look_ups(seed):
    rng = random.Random(seed)
    cpu, cxl = rng.choice([(6, 10), (20, 40), (64, 64), (200, 100)])
    fast, slow = _chain(KVTier, cpu, cxl), _chain(_LookedUp, cpu, cxl)
    prefixes = [[rng.getrandbits(60) for _ in range(rng.randrange(1, 12))] for _ in range(6)]
    running: dict[int, tuple[list[int], int, int]] = {}  # request -> (its blocks, blocks offered, prompt blocks)
    walks = 0
    for step in range(1500):
        roll = rng.random()
        if roll < 0.35 or not running:  # an arrival: maybe a shared prefix, and a load of what the tiers hold
            request = step
            blocks = (rng.choice(prefixes) if rng.random() < 0.5 else []) + [
                rng.getrandbits(60) for _ in range(rng.randrange(1, 30))]
            prompt = rng.randrange(1, len(blocks) + 1)
            parts = [o.lookup(blocks, 0, prompt - 1) for o in (fast, slow)]
            assert [[(t.spec.name, n) for t, n in p or []] for p in parts][0] == \
                [[(t.spec.name, n) for t, n in p or []] for p in parts][1]
            loaded = sum(n for _, n in parts[0] or [])
            for offload, part in zip((fast, slow), parts):
                offload.admit(request, blocks, 0, loaded)
                if loaded:
                    offload.take(blocks, 0, part)
                    offload.release(blocks, 0, part)
            running[request] = (blocks, loaded, prompt)
        elif roll < 0.75:  # a step fills some of a request's blocks: the chunks now full are offered
            request = rng.choice(list(running))
            blocks, done, prompt = running[request]
            full = min(len(blocks), done + rng.randrange(1, 16))
            for offload in (fast, slow):
                offload.store_full_blocks(blocks, done, full, prompt, request)
            running[request] = (blocks, full, prompt)
        else:  # a request finishes: its end is applied at the next step
            request = rng.choice(list(running))
            blocks, done, prompt = running.pop(request)
            for offload in (fast, slow):
                offload.request_finished(request, blocks, done, prompt)
                offload.finish_requests()
        nearest = fast.tiers[0]
        walks += nearest._holes == nearest._markers > 0
        for mine, theirs in zip(fast.tiers, slow.tiers):
            _check_upkeep(mine)
            assert list(mine.blocks) == list(theirs.blocks)
            assert (mine.stored, mine.evicted, mine.num_held) == (theirs.stored, theirs.evicted, theirs.num_held)
        assert fast.allocation_failures == slow.allocation_failures
    assert walks  # the marker walk was there to take
