"""Offloading's upkeep made cheaper (session 13's speed work): when a request's run in an LRU CPU tier ends
exclusive, a run of its own kept at the log's end takes its blocks over as they are (one marker, the blocks'
index entries unchanged) instead of an entry per block pushed to the log's end; a run's blocks are found in
the index by its key (IN_RUN + its rank), not in a table per block. Checked against the same chains whose
CPU tier pushes an ended run's blocks to the log one by one, as before, with requests sharing prefixes,
loading what the tiers hold (pinned while they load), storing as their blocks fill (stores in flight, stores
that fail for want of room), finishing, and the engine idling in between."""
from __future__ import annotations

import random

import pytest

from emulator.kv_tiers import IN_RUN, KVTier, Offload, RequestRun, TierSpec


class _Pushed(KVTier):
    """The tier ending an exclusive run as before session 13: its blocks pushed to the log's end, an entry each."""

    def _end_run(self, run: RequestRun, block_hashes: list[int]) -> None:
        if not run.exclusive:
            super()._end_run(run, block_hashes)
            return
        run.live = False
        if run.anchor < 0:
            self._passed.remove(run)
        self._runs -= 1
        del self._run_of[run.key]
        live = run.tail_first()
        run.members = {}
        self._push(live)


def _chain(cls: type[KVTier], k: int, cpu: int, cxl: int, in_flight: bool, events: list | None) -> Offload:
    offload = Offload([cls(TierSpec("cpu", cpu, 1e4, 1e-3), 1.0, k), KVTier(TierSpec("cxl", cxl, 1e4, 1e-3), 1.0)],
                      blocks_per_chunk=k, stores_in_flight=in_flight)
    if events is not None:  # a KV-event recorder: what each store added to and pushed out of each tier
        offload.on_change = lambda changes: events.append([(t.spec.name, a, r) for t, a, r in changes])
    return offload


def _view(offload: Offload) -> tuple:
    """What either chain must agree on."""
    tiers = [(list(t.blocks), t.stored, t.loaded, t.evicted, t.num_held, dict(t.pins)) for t in offload.tiers]
    jobs = [(j.keys, j.num_blocks, j.start, j.end) for j in offload.in_flight]
    return (tiers, jobs, dict(offload.storing), offload.allocation_failures, offload.lookups,
            sorted(map(id, offload.failed)), offload.hits)


def _check_books(tier: KVTier) -> None:
    """The counts the walks trust, the runs kept in order, and the runs' blocks found by their keys."""
    ahead = tier._log[tier._head - tier._base:]
    markers = [(h, tier._head + i) for i, h in enumerate(ahead) if h.__class__ is RequestRun]
    dead = sum(1 for i, h in enumerate(ahead) if h.__class__ is not RequestRun and tier._index.get(h) != tier._head + i)
    assert (tier._markers, tier._holes) == (len(markers), len(markers) + dead)
    assert [(run, run.anchor) for run in tier._marks] == markers
    assert all(run.live and run.key == key for key, run in tier._run_of.items())
    assert all(run.kept and not run.live and run.key == key for key, run in tier._kept.items())
    ranked = {h: run.key for run in (*tier._run_of.values(), *tier._kept.values()) for h in run.members}
    assert ranked == {h: seq for h, seq in tier._index.items() if seq >= IN_RUN}
    assert tier._runs == len(tier._run_of)
    assert all(run.anchor == seq for run, seq in markers if run.kept)  # (a kept run is never passed)


@pytest.mark.parametrize("k,in_flight,events", [(1, True, False), (2, True, False), (1, False, True),
                                                (1, True, True), (2, False, False)])
@pytest.mark.parametrize("seed", range(5))
def test_kept_runs_evict_rank_and_order_as_blocks_pushed_one_by_one(k, in_flight, events, seed):
    rng = random.Random(seed)
    cpu, cxl = rng.choice([(8, 12), (24, 40), (64, 32), (160, 96)])
    logs: list[list] = [[], []]
    kept, pushed = (_chain(cls, k, cpu, cxl, in_flight, log if events else None)
                    for cls, log in ((KVTier, logs[0]), (_Pushed, logs[1])))
    prefixes = [[rng.getrandbits(60) for _ in range(rng.randrange(2, 12))] for _ in range(6)]
    running: dict[int, list] = {}  # request -> [its blocks, blocks offered, prompt blocks]
    loads: list[tuple[list[int], int, list, list]] = []  # (blocks, start, parts in kept, parts in pushed)
    now, most_kept = 0.0, 0
    for step in range(1500):
        now += rng.choice([0.0, 2e-4, 1e-3, 4e-3])
        roll = rng.random()
        if roll < 0.3 or not running:  # an arrival looks the tiers up and loads what they hold
            request = step
            blocks = (rng.choice(prefixes) if rng.random() < 0.6 else []) + [
                rng.getrandbits(60) for _ in range(rng.randrange(1, 24))]
            prompt = rng.randrange(1, len(blocks) + 1)
            for offload in (kept, pushed):
                offload.advance(now)
            parts = [offload.lookup(blocks, 0, prompt - 1, request) for offload in (kept, pushed)]
            assert [[(t.spec.name, n) for t, n in p] if p is not None else None for p in parts][0] == \
                [[(t.spec.name, n) for t, n in p] if p is not None else None for p in parts][1]
            if parts[0] is None:
                continue  # deferred: it asks again as another arrival
            loaded = sum(n for _, n in parts[0])
            for offload, part in zip((kept, pushed), parts):
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
            for offload in (kept, pushed):
                offload.advance(now)
                offload.store_full_blocks(blocks, done, full, prompt, request)
                offload.retry(request, blocks, full, prompt)
                offload.step_ended(now + 5e-4)
            running[request][1] = full
        elif roll < 0.78 and loads:  # a load ends
            blocks, start, part_kept, part_pushed = loads.pop(rng.randrange(len(loads)))
            kept.release(blocks, start, part_kept)
            pushed.release(blocks, start, part_pushed)
        elif roll < 0.92:  # a request finishes: its end comes at the next step
            request = rng.choice(list(running))
            blocks, done, prompt = running.pop(request)
            for offload in (kept, pushed):
                offload.request_finished(request, blocks, done, prompt)
        else:  # the engine idles: the finished requests' ends, and the store jobs that end
            assert kept.idle_until(now) == pushed.idle_until(now)
        assert _view(kept) == _view(pushed)
        assert logs[0] == logs[1]
        _check_books(kept.tiers[0])
        most_kept = max(most_kept, len(kept.tiers[0]._kept))
    assert not pushed.tiers[0]._kept and most_kept  # (the old way keeps no run; the new one did)
    assert kept.tiers[0].evicted and kept.tiers[1].stored  # (the CPU tier was full: kept runs were evicted)


def test_a_kept_run_ranks_its_blocks_where_its_end_put_them_not_by_its_rank():
    """A request ranked before another ended holds the blocks that one kept as newer than its rank (they went
    to the log's end when it ended), though that one's rank is older: it does not take them over."""
    p = [101, 102, 103, 104]

    def script(cls: type[KVTier]) -> list:
        offload = _chain(cls, 1, 6, 20, False, None)
        cpu, cxl = offload.tiers
        cxl.put_many(p)  # the prefix lies below the CPU tier only
        q, r, s = [*p, 201], [*p, 301], [401, 402]
        for request, blocks in (("q", q), ("r", r)):  # both load the prefix's head from CXL: each gets a rank
            parts = offload.lookup(blocks, 0, 2, request)
            assert [(t.spec.name, n) for t, n in parts] == [("cxl", 2)]
            offload.admit(request, blocks, 0, 2)
            offload.take(blocks, 0, parts)
            offload.release(blocks, 0, parts)
        offload.admit("s", s)
        offload.store_full_blocks(s, 0, 2, 2, "s")  # s stores and ends first: its blocks sit before q's
        offload.request_finished("s", s, 2, 2)
        offload.finish_requests()
        offload.store_full_blocks(q, 2, 4, 4, "q")  # q stores the prefix's tail and ends: its run is kept
        offload.request_finished("q", q, 4, 4)
        offload.finish_requests()
        assert bool(cpu._kept) == (cls is KVTier)
        offload.store_full_blocks(r, 2, 5, 5, "r")  # r offers them again (held: newer than its rank) and its own
        order = list(cpu.blocks)
        offload.request_finished("r", r, 5, 5)
        offload.finish_requests()
        return [order, list(cpu.blocks), cpu.stored, cpu.evicted, list(cxl.blocks)]

    kept, pushed = script(KVTier), script(_Pushed)
    assert kept == pushed
    assert kept[0] == [301, 402, 401, 104, 103]  # r's own block at its rank; q's kept after s's
    assert kept[1] == [402, 401, 301, 104, 103]  # r's end renews what it saw, the head most recent
