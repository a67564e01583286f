"""An engine left idle with offload store jobs in flight wakes when the next one ends (vLLM's engine steps on
while they are pending) only when someone could see it: it holds a request, or metrics or KV events listen.
Otherwise the job is reported at the engine's next schedule, with the same effect on what it then does.
Virtual time only."""
from __future__ import annotations

import numpy as np
import pytest

from emulator.cluster import ClusterSpec, build_cluster
from emulator.config import EngineArgs
from emulator.instance import InstanceSpec
from emulator.request import Request
from profiles.deployment import build_deployment

SLOW = 1e8  # 0.1 GB/s of host link: a 1,000-token prompt's blocks (2 MiB each) take ~1.3 s to store


def engine(listen: bool):
    d = build_deployment("meta-llama/Llama-3.1-8B", "H100", EngineArgs(max_model_len=1500, num_gpu_blocks_override=100,
                                                                        kv_offloading_size=4.0))
    sim = build_cluster(ClusterSpec((InstanceSpec("i0", d, ("m",), node="n0"),),
                                    nodes={"n0": {"host_memory_bandwidth": SLOW}}))
    if listen:  # (as server.connector_metrics does)
        sim.engines[0].kv.offload.store_listeners.append(lambda chunks, blocks: None)
    return sim


@pytest.mark.parametrize("listen", [False, True])
def test_an_idle_engine_wakes_at_its_store_end_only_when_someone_listens(listen):
    sim = engine(listen)
    prompt = np.random.default_rng(3).integers(0, 30000, 1000)
    sim.submit(Request("a", 1000, 2, arrival_time=0.0, prompt_token_ids=prompt))
    sim.advance(0.5)  # A finished; its store is still being copied
    offload, loop = sim.engines[0].kv.offload, sim.loops[0]
    assert sim.engines[0].is_idle and offload.in_flight
    assert loop.wake_at == (offload.in_flight[0].end if listen else None)


def test_what_an_idle_engine_does_next_is_the_same_whether_it_woke_at_its_store_ends():
    runs = {}
    for listen in (False, True):
        sim = engine(listen)
        rng = np.random.default_rng(3)
        prompt = rng.integers(0, 30000, 1000)
        requests = [Request("a", 1000, 2, arrival_time=0.0, prompt_token_ids=prompt),
                    Request("c", 1400, 2, arrival_time=9.0, prompt_token_ids=rng.integers(0, 30000, 1400)),
                    Request("d", 1000, 2, arrival_time=20.0, prompt_token_ids=prompt)]  # C took A's GPU blocks
        sim.run(requests)
        offload = sim.engines[0].kv.offload
        runs[listen] = ([(r.scheduled_time, r.first_token_time, r.finish_time, r.num_external_tokens)
                         for r in requests], offload.async_delays, offload.tiers[0].stored, offload.tiers[0].evicted)
    assert runs[False] == runs[True]
    timings, delays, _, _ = runs[False]
    assert timings[2][3] > 0 and not delays  # D loads from the tier at once (its copy was reported)


def test_an_idle_engine_holding_finished_requests_blocks_does_not_wake_for_them():
    """A P/D prefill engine with nothing left to run still holds its finished requests' blocks until their decode
    reads them: their end only ranks their blocks anew, so no copy's end needs to wake it; an engine whose
    requests wait (for KV from outside) still wakes."""
    from emulator.kv_tiers import KVTier, Offload, TierSpec
    o = Offload([KVTier(TierSpec("cpu", 100 * 1e6, 1e9, 1e-3), 1e6)], stores_in_flight=True)
    request = object()
    o.advance(0.0)
    o.admit(request)
    o.store_full_blocks([1, 2, 3], 0, 3, 3, request)
    o.step_ended(0.01)
    end = o.in_flight[0].end
    assert o.idle_until(0.012, idle=True) is None and o.requests  # finished, its blocks held: no wake
    assert o.idle_until(0.012) == end  # a request waiting to run: it wakes at the copy's end
    o.request_finished(request, [1, 2, 3], 3, 3)  # its decode read the blocks
    o.advance(1.0)  # the next schedule: the copy and the request's end are reported
    assert not o.in_flight and not o.finishing and not o.requests and not o.tiers[0].pins
