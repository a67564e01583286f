"""The OffloadingConnector is asked about the waiting head on every scheduling attempt, as vLLM's scheduler
asks it (v1/core/sched/scheduler.py: get_num_new_matched_tokens before allocate_slots), even when the
request then finds no room: each ask is a vllm:kv_offload_lookup_sync_delay_seconds observation. A decode
run (steps taken in bulk) counts its steps' asks too. Virtual time only."""
from __future__ import annotations

from emulator.cluster import ClusterSpec, build_cluster
from emulator.config import EngineArgs
from emulator.instance import InstanceSpec
from emulator.request import Request
from profiles.deployment import build_deployment


def blocked_head(decode_runs: bool) -> tuple[int, int, Request]:
    """A long request, then one whose prompt does not fit beside it until it ends: (lookups, scheduling
    attempts with a request waiting, the blocked request)."""
    d = build_deployment("meta-llama/Llama-3.1-8B", "H100", EngineArgs(max_model_len=1000, num_gpu_blocks_override=64,
                                                                       kv_offloading_size=1.0))
    sim = build_cluster(ClusterSpec((InstanceSpec("i0", d, ("m",)),)))
    sim.loops[0].decode_runs = decode_runs
    scheduler = sim.engines[0].scheduler
    attempts = []
    schedule = scheduler.schedule

    def counting(now, admit=True):
        attempts.append(len(scheduler.waiting))
        return schedule(now, admit)
    scheduler.schedule = counting
    blocked = Request("blocked", 800, 20, arrival_time=0.5, content_seed=2)
    sim.run([Request("long", 300, 600, content_seed=1), blocked])
    return sim.engines[0].kv.offload.lookups, sum(1 for n in attempts if n), blocked


def test_a_blocked_head_is_looked_up_on_every_scheduling_attempt():
    lookups, attempts, blocked = blocked_head(decode_runs=False)
    assert blocked.scheduled_time > 4.0  # it waited for the long request's blocks
    assert lookups == attempts > 500  # each step asked about it (and once about the long request)


def test_a_decode_run_counts_the_lookups_of_the_steps_it_takes_in_bulk():
    assert blocked_head(decode_runs=True)[0] == blocked_head(decode_runs=False)[0]
