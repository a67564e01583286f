"""The CPU tier's LRU order while requests run, against a transcription of vLLM's LRUCachePolicy rules
(kv_offload/cpu/policies/lru.py, as its CPUOffloadingManager drives it): a request gets one rank when it
first loads or stores, and each chunk it stores, loads or offers that is older than that rank is ranked
(its rank, its position), so that its tail goes before its head, all of it before anything ranked after it
started, whatever step stored it; when it finishes, what it saw is ranked anew, head most recent."""
from __future__ import annotations

import random

import pytest

from emulator.kv_tiers import KVTier, Offload, TierSpec


class VllmLRURanks:
    """vLLM's ranks, key by key: evicted lowest (rank, -position) first, a store all or nothing."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.next_rank = capacity, 0
        self.ranks: dict[int, tuple[int, int]] = {}
        self.request_rank: dict[object, int] = {}
        self.seen: dict[object, dict[int, int]] = {}  # request -> key -> position
        self.pins: dict[int, int] = {}

    def order(self) -> list[int]:
        return sorted(self.ranks, key=self.ranks.__getitem__)

    def _rank(self, request) -> int:
        if request not in self.request_rank:
            self.next_rank += 1
            self.request_rank[request] = self.next_rank
        return self.request_rank[request]

    def _access(self, request, keys: list[int], start: int) -> None:  # on_request_access of the unseen keys
        seen = self.seen.setdefault(request, {})
        new = [(key, start + j) for j, key in enumerate(keys) if key not in seen]
        if not new:
            return
        rank = self._rank(request)
        for key, position in new:
            seen[key] = position
            if key in self.ranks and self.ranks[key] < (rank, -position):
                self.ranks[key] = (rank, -position)

    def load(self, request, keys: list[int], start: int) -> None:
        for key in keys:
            self.pins[key] = self.pins.get(key, 0) + 1
        self._access(request, keys, start)

    def release(self, keys: list[int]) -> None:
        for key in keys:
            self.pins[key] -= 1
            if not self.pins[key]:
                del self.pins[key]

    def store(self, request, keys: list[int], start: int) -> bool:
        self._access(request, keys, start)
        new = [(key, start + j) for j, key in enumerate(keys) if key not in self.ranks]
        over = len(self.ranks) + len(new) - self.capacity
        if over > 0:
            idle = [key for key in self.order() if key not in self.pins and key not in keys]
            if len(idle) < over:
                return False
            for key in idle[:over]:
                del self.ranks[key]
        for key, position in new:
            self.ranks[key] = (self._rank(request), -position)
        return True

    def finish(self, request) -> None:
        seen = self.seen.pop(request, {})
        for key in sorted(seen, key=seen.__getitem__, reverse=True):  # tail first: the head most recent
            if key in self.ranks:
                self.next_rank += 1
                self.ranks[key] = (self.next_rank, 0)
        self.request_rank.pop(request, None)


def test_a_running_requests_chunks_stored_over_several_steps_go_before_what_finished_after_it_started():
    offload = Offload([KVTier(TierSpec("cpu", 6, 1e9, 0.0), 1.0)])
    tier = offload.tiers[0]
    a, b = object(), object()
    offload.admit(a)
    offload.admit(b)
    offload.store_full_blocks([1, 2, 3, 4], 0, 2, 1 << 30, a)  # a stores its head: a gets its rank
    offload.store_full_blocks([7, 8], 0, 2, 1 << 30, b)
    offload.request_finished(b, [7, 8], 2, 1 << 30)
    offload.finish_requests()  # b is done: ranked after a started
    offload.store_full_blocks([1, 2, 3, 4], 2, 4, 1 << 30, a)  # a's tail, a step later
    assert list(tier.blocks) == [4, 3, 2, 1, 8, 7]  # a's tail, then its head, then b (head most recent)
    offload.store_full_blocks([9], 0, 1, 1 << 30, object())  # a new request's store pushes out a's tail
    assert list(tier.blocks) == [3, 2, 1, 8, 7, 9]
    offload.request_finished(a, [1, 2, 3, 4], 4, 1 << 30)
    offload.finish_requests()  # a's end ranks what it saw anew, its head most recent
    assert list(tier.blocks) == [8, 7, 9, 3, 2, 1]


@pytest.mark.parametrize("seed", range(8))
def test_the_tier_orders_and_evicts_as_vllms_lru_ranks_requests(seed):
    """Requests of shared documents' chunks and fresh ones, interleaved: admitted with a load of what the
    tier holds after a GPU hit or not, stores step by step, preempted and admitted again, finished; after
    every op the tier's blocks, least recently used first, are vLLM's order. Small tiers: stores evict (and
    fail) while requests run; a log rebuilt several times."""
    rng = random.Random(seed)
    capacity = rng.choice([4, 7, 12, 30])
    offload = Offload([KVTier(TierSpec("cpu", capacity, 1e9, 0.0), 1.0)])
    tier, vllm = offload.tiers[0], VllmLRURanks(capacity)
    documents = [list(range(1000 * d, 1000 * d + 15)) for d in range(4)]
    live: dict[int, list] = {}  # id -> [request, keys, next, load]
    fresh, number = 100_000, 0
    for _ in range(1500):
        if len(live) < 3:
            number += 1
            doc = rng.choice(documents)
            keys = doc[:rng.randrange(1, len(doc) + 1)] + list(range(fresh, fresh + rng.randrange(0, 5)))
            fresh += 5
            live[number] = [object(), keys, 0, None]
            rid = number
            op = "admit"
        else:
            rid = rng.choice(list(live))
            op = rng.choice(["admit", "step", "step", "step", "finish", "release"])
        request, keys, next_, load = live[rid]
        if op == "admit" and load is None:  # (re)admitted: offers afresh, after a load if one
            hit = rng.randrange(0, len(keys))
            end = hit
            while end < len(keys) - 1 and tier.holds(keys[end]):
                end += 1
            if end > hit and rng.random() < 0.7:
                offload.admit(request, keys, hit, end)
                offload.take(keys, hit, [(tier, end - hit)])
                vllm.load(request, keys[hit:end], hit)
                live[rid][2:] = [end, (hit, end)]
            else:
                offload.admit(request)
                live[rid][2] = 0
        elif op == "release" and load is not None:
            offload.release(keys, load[0], [(tier, load[1] - load[0])])
            vllm.release(keys[load[0]:load[1]])
            live[rid][3] = None
        elif op == "step":
            end = min(len(keys), next_ + rng.randrange(0, 4))
            if end > next_:
                state = offload.requests[request]
                ok = offload.store(keys[next_:end], state, next_)
                assert ok == vllm.store(request, keys[next_:end], next_)
                if ok:
                    live[rid][2] = end
                    state.next_block = end
        elif op == "finish" and load is None:
            offload.request_finished(request, keys, live[rid][2], 1 << 30)
            offload.finish_requests()
            vllm.finish(request)
            del live[rid]
        assert list(tier.blocks) == vllm.order()
        assert tier.num_held == len(vllm.ranks)
        assert all(tier.holds(key) == (key in vllm.ranks) for doc in documents for key in doc)
    assert tier.evicted > 0 and (offload.allocation_failures > 0 or capacity > 10)
