"""A request aborted while it loads its prompt's KV from offload tiers: as vLLM's scheduler delays freeing the blocks
of a request WAITING_FOR_REMOTE_KVS until its worker reports the load done, and the OffloadingConnector completes a
load job (unpinning its chunks) only then, the load runs to its end: the request's blocks stay held and the tiers'
chunks pinned until it ends, then everything is free. Virtual time only."""
from __future__ import annotations

import pytest

from emulator.request import Request, RequestStatus
from test_tier_load_pod_failure import PROMPT, _loading_from_tiers, _nothing_left


def _run_out(sim) -> None:
    while (t := sim.next_event_time()) is not None:
        sim.advance(t)


@pytest.mark.parametrize("backend", ["native", "lmcache"])
def test_an_aborted_requests_tier_load_runs_to_its_end_and_holds_its_blocks_until_then(backend):
    sim, engine, r1, ended = _loading_from_tiers(("a",), {"n0": {}} if backend == "lmcache" else None,
                                                 backend=backend)
    load = sim.transfers.loads["r1"]
    tier = engine.kv.offload.tiers[0]
    free, pins = engine.kv.num_free_blocks, dict(tier.pins)
    assert pins and load.transfer.remaining > 0
    aborted_at = sim.now
    assert sim.abort("r1")
    assert r1.status == RequestStatus.FINISHED_ABORTED and ended[-1] is r1
    # the load goes on: the request's blocks and the tier's chunks are still taken
    assert sim.transfers.loads["r1"] is load and engine.kv.num_free_blocks == free and tier.pins == pins
    assert engine.scheduler.held and engine.scheduler.num_loading == 0
    with pytest.raises(ValueError, match="already in use"):  # (its id is taken until the load ends)
        sim.submit(Request("r1", len(PROMPT), 4, model="m", prompt_token_ids=PROMPT, session="s"))
    _run_out(sim)
    stats = sim.transfers.stats[engine.index]
    assert stats.tier_loads == 1 and stats.tier_load_seconds > 0 and load.transfer.remaining <= 1e-6
    assert sim.transfers.num_failed == 0 and ended.count(r1) == 1 and r1.finish_time == aborted_at
    _nothing_left(sim)


def test_an_aborted_load_from_two_tiers_runs_on_both_links_to_its_end():
    sim, engine, r1, _ = _loading_from_tiers(("a",), {"n0": {"cxl_memory": 64 * 2 ** 30}}, cpu_gib=0.1,
                                             prompt=PROMPT[:640], push_out=True)
    load = sim.transfers.loads["r1"]
    assert len(load.rest) == 1
    sim.abort("r1")
    assert all(link.active for link in (load.link, load.rest[0][0]))
    _run_out(sim)
    assert all(transfer.remaining <= 1e-6 for transfer in (load.transfer, load.rest[0][1]))
    _nothing_left(sim)


def test_the_blocks_an_aborted_load_held_are_free_for_the_next_request_once_it_ends():
    """The next request with the same prompt, arriving after the load ended, finds it in the tier again (and the
    aborted request's blocks free)."""
    sim, engine, r1, ended = _loading_from_tiers(("a",))
    sim.abort("r1")
    _run_out(sim)
    again = Request("r2", len(PROMPT), 4, arrival_time=sim.now, model="m", prompt_token_ids=PROMPT, session="s")
    sim.submit(again)
    _run_out(sim)
    assert again.finish_reason == "length" and again.num_prompt_tokens_not_computed > 0
    _nothing_left(sim)
