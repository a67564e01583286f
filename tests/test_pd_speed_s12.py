"""What session 12 restructured in the P/D plumbing, pinned: a prefill's lease ends exactly where its own cluster
event would (its time, and its place among the events of that time by when it was scheduled), though only the
earliest lease still held has an event queued; a lease belongs to its prefill, not to the key it is held under;
the instances a role's candidates come from. Virtual time and state only."""
from __future__ import annotations

import random

from emulator.cluster import ClusterSpec, build_cluster
from emulator.instance import InstanceSpec
from emulator.request import Request
from test_pd_hardening import NIXL, assert_all_blocks_free, deployment, pd_pair

LEASE = 5.0


def held_prefill(sim, rid: str, at: float, run_for: float = 1.0, pod: str = "p0"):
    """A prefill run on `pod` from `at`, held for a decode side from `at + run_for` (as a do_remote_decode
    prefill)."""
    request = Request(rid, 3000, 1, max_tokens=1, arrival_time=at)
    request.hold_kv = True
    sim.submit(request, instance=sim.instance(pod))
    sim.advance(at + run_for)
    assert request.finish_reason == "length"
    return request, sim.transfers.hold(request, NIXL)


def lease_pair():
    return pd_pair(prefill=deployment(extra={"kv_lease_duration": LEASE}))


def test_read_prefills_leave_no_lease_event_and_the_unread_one_runs_out_on_time():
    sim = lease_pair()
    stats = sim.transfers.stats[0]
    _, a = held_prefill(sim, "a", 0.0)    # held at 1, read at once
    sim.transfers.release(a)
    _, b = held_prefill(sim, "b", 1.0)    # held at 2, never read: its lease ends at 7
    _, c = held_prefill(sim, "c", 2.0)    # held at 3, read at once
    sim.transfers.release(c)
    assert len(sim._events) == 1          # one lease event (a's, which moves on to b's) for three prefills
    sim.advance(2.0 + LEASE - 0.01)
    assert sim.transfers.held and stats.pd_expired == 0
    sim.advance(2.0 + LEASE)
    assert not sim.transfers.held and stats.pd_expired == 1
    assert sim.next_event_time() is None  # c's lease, read, has no event
    assert_all_blocks_free(sim)


def test_a_lease_runs_out_in_its_place_among_the_events_of_its_time():
    """b's lease (7.0) gets its event only when a's (read) comes round, yet keeps the place it was scheduled at:
    after a fault scheduled before b was held it finds b lost, before one scheduled after it frees b as expired."""
    for fault_first in (True, False):
        sim = lease_pair()
        stats = sim.transfers.stats[0]
        _, a = held_prefill(sim, "a", 0.0)
        sim.transfers.release(a)
        sim.advance(1.5)
        if fault_first:
            sim.schedule(2.0 + LEASE, lambda s=sim: s.fail_instance("p0"))
        _, b = held_prefill(sim, "b", 1.5, run_for=0.5)  # held at 2.0
        if not fault_first:
            sim.schedule(2.0 + LEASE, lambda s=sim: s.fail_instance("p0"))
        sim.advance(2.0 + LEASE)
        assert not sim.instance("p0").up and not sim.transfers.held
        assert stats.pd_expired == (0 if fault_first else 1)
        assert (b.key in sim.transfers.lost_prefills) is fault_first


def test_a_lease_is_its_prefills_not_that_of_a_later_one_held_under_the_same_key():
    sim = lease_pair()
    stats = sim.transfers.stats[0]
    _, first = held_prefill(sim, "x", 0.0)            # held at 1.0 (lease to 6.0), read at once
    sim.transfers.release(first)
    _, second = held_prefill(sim, "x", 2.0)           # the same id again: held at 3.0 (lease to 8.0)
    assert second.key == first.key
    sim.advance(1.0 + LEASE + 0.5)                    # past the first's lease: the second stays held
    assert sim.transfers.held == {second.key: second} and stats.pd_expired == 0
    sim.advance(3.0 + LEASE)
    assert not sim.transfers.held and stats.pd_expired == 1
    assert_all_blocks_free(sim)


def test_leases_of_two_lengths_read_or_not_each_run_out_at_their_own_end():
    """Prefills held on pods of a 3 s and a 5 s lease, half of them read at once, in a random order: each unread one
    runs out exactly at its hold plus its pod's lease (a later hold with a shorter lease gets its event first)."""
    specs = (InstanceSpec("p0", deployment(extra={"kv_lease_duration": 3}), ("llama",), "prefill", "n0"),
             InstanceSpec("p1", deployment(extra={"kv_lease_duration": 5}), ("llama",), "prefill", "n0"),
             InstanceSpec("d0", deployment(), ("llama",), "decode", "n0"))
    sim = build_cluster(ClusterSpec(specs, "least_loaded"))
    ran_out: dict[tuple[str, str], float] = {}
    untracked = sim.transfers._untracked
    sim.transfers._untracked = lambda source: (ran_out.__setitem__(source.key, sim.now), untracked(source))
    rng = random.Random(12)
    expected = {}
    for i in range(40):
        pod = rng.choice(("p0", "p1"))
        _, source = held_prefill(sim, f"r{i}", i * 0.7, run_for=0.4, pod=pod)
        if rng.random() < 0.5:
            sim.transfers.release(source)
        else:
            expected[source.key] = sim.now + (3 if pod == "p0" else 5)
    sim.advance(40 * 0.7 + 6)
    assert ran_out == expected and not sim.transfers.held
    assert sum(stats.pd_expired for stats in sim.transfers.stats) == len(expected)
    assert sim.next_event_time() is None
