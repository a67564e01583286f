"""A decode request aborted while its KV is read from its prefill: vLLM lets the read run to its end. The NIXL
worker has no way to stop a read under way (nixl/pull_worker.py: the transfer handles are polled until done,
then _send_pending_recv_notifs tells the prefill side, base_worker.py get_finished), and the scheduler keeps the
request's blocks until then (v1/core/sched/scheduler.py finish_requests: delay_free_blocks for a request
WAITING_FOR_REMOTE_KVS, freed on finished_recving). So the prefill is freed when the read would have ended, as
a read, not an expiry (before: the transfer was cancelled, and a prefill in another process waited for its
lease). Virtual time: the in-process cluster (its P/D proxy, and a decode naming a prefill elsewhere), and two
emulated pods over HTTP."""
from __future__ import annotations

import asyncio
import json

import aiohttp

from emulator.request import Request
from server.testing import running_server
from test_kv_read_notice import FAST, PRODUCER
from test_pd_abort_notice import _decode, notices, prefill_params
from test_pd_hardening import assert_all_blocks_free, moves_of, pd_pair

CONSUMER = json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_consumer"})


def _until_reading(sim, rid: str) -> None:
    """Advance event by event until the request's KV load is under way."""
    while rid not in sim.transfers.loads:
        sim.advance(sim.next_event_time())


def _proxied(abort: bool) -> tuple:
    """A client request through the cluster's P/D proxy, aborted (or not) as soon as its read began; returns
    the simulation, when the prefill's blocks were freed, and the transfers that ended."""
    sim = pd_pair()
    moves = moves_of(sim)
    freed = []
    prefill_engine = sim.instance("p0").engines[0]
    request = Request("r", 6000, 20, arrival_time=0.0)
    sim.submit(request)
    _until_reading(sim, "r")
    decode_engine = sim.engines[request.engine_index]
    in_use = decode_engine.kv.num_free_blocks
    if abort:
        assert sim.abort("r") and request.finish_reason == "abort"
        assert len(sim.transfers.held) == 1  # the prefill is still read
        assert decode_engine.kv.num_free_blocks == in_use and "r" in decode_engine.scheduler.held  # held too
    while sim.transfers.held:
        sim.advance(sim.next_event_time())
    freed.append(sim.now)
    sim.advance(sim.now + 60.0)
    assert prefill_engine.kv.num_free_blocks == prefill_engine.num_gpu_blocks - 1
    return sim, freed[0], moves


def test_an_abort_mid_read_lets_the_read_end_then_frees_both_sides():
    sim, freed, moves = _proxied(abort=True)
    _, freed_unaborted, moves_unaborted = _proxied(abort=False)
    assert freed == freed_unaborted  # when the read would have ended
    assert [(m.kind, m.num_bytes, m.seconds) for m in moves] == \
        [(m.kind, m.num_bytes, m.seconds) for m in moves_unaborted]  # the whole read, counted
    stats = sim.transfers.stats
    assert (stats[0].pd_sent, stats[0].pd_expired, stats[1].pd_loads, sim.transfers.num_failed) == (1, 0, 1, 0)
    assert_all_blocks_free(sim)


def test_an_abort_mid_read_of_a_prefill_elsewhere_tells_it_when_the_read_ends():
    sim = pd_pair()
    told = notices(sim, lambda params, move: (sim.now, move))
    request = _decode(sim, "r")
    _until_reading(sim, "r")
    started = sim.now
    assert sim.abort("r") and told == []
    sim.advance(sim.now + 60.0)
    [(when, move)] = told
    assert move is not None and move.num_bytes > 0 and when == started + move.seconds  # a read, at its end
    assert request.num_output_tokens == 0
    assert_all_blocks_free(sim)


def test_a_decode_pod_that_fails_mid_read_of_an_aborted_request_tells_nothing():
    sim = pd_pair()
    told = notices(sim)
    _decode(sim, "r")
    _until_reading(sim, "r")
    sim.abort("r")
    sim.fail_instance("d0")
    sim.advance(sim.now + 60.0)
    assert told == [] and not sim.transfers.loads
    assert all(not link.active for link in sim.transfers.links.links.values())  # its read stopped with it
    assert_all_blocks_free(sim)


async def test_over_http_a_stream_aborted_mid_read_frees_the_prefill_pod_when_the_read_ends():
    """The decode pod runs slowed down (--speed) so that its read of the prefill takes seconds of wall time."""
    prompt = list(range(1000, 7000))
    async with running_server(*FAST, "--kv-transfer-config", PRODUCER) as prefill, \
            running_server(*FAST, "--kv-transfer-config", CONSUMER, "--speed", "0.005") as decode, \
            aiohttp.ClientSession() as http:
        params = await prefill_params(http, prefill.url, prompt)
        sim = decode.engine.sim
        stream = await http.post(decode.url + "/v1/completions", json={
            "prompt": prompt, "max_tokens": 5, "stream": True, "kv_transfer_params": params})
        assert stream.status == 200
        while not sim.transfers.loads:
            await asyncio.sleep(0.01)
        stream.close()  # the client leaves
        while sim.active:  # the decode pod sees it leave
            await asyncio.sleep(0.01)
        assert len(prefill.engine.sim.transfers.held) == 1 and sim.transfers.loads  # the read goes on
        while prefill.engine.sim.transfers.held:
            await asyncio.sleep(0.05)
        stats = prefill.engine.sim.transfers.stats[0]
        assert (stats.pd_sent, stats.pd_expired, stats.pd_late_reads) == (1, 0, 0)  # freed as read
        assert not sim.transfers.loads and not sim.engines[0].scheduler.held
        engine = sim.engines[0]
        assert engine.kv.num_free_blocks == engine.num_gpu_blocks - 1


async def test_over_http_a_non_streamed_client_that_leaves_mid_read_frees_the_prefill_at_once():
    """vLLM's completion route answers a non-streamed request whose client left with an ErrorResponse ("Client
    disconnected"), so _with_kv_transfer_rejection_cleanup has the prefill side told of an empty read at once,
    while the worker's read goes on; the read's own notice then finds a request the prefill side no longer
    tracks, which it counts late (record_notification_after_expiry)."""
    prompt = list(range(1000, 7000))
    async with running_server(*FAST, "--kv-transfer-config", PRODUCER) as prefill, \
            running_server(*FAST, "--kv-transfer-config", CONSUMER, "--speed", "0.005") as decode, \
            aiohttp.ClientSession() as http:
        params = await prefill_params(http, prefill.url, prompt)
        sim, held = decode.engine.sim, prefill.engine.sim.transfers.held
        waiting = asyncio.ensure_future(http.post(decode.url + "/v1/completions", json={
            "prompt": prompt, "max_tokens": 5, "kv_transfer_params": params}))
        while not sim.transfers.loads:
            await asyncio.sleep(0.01)
        waiting.cancel()  # the client leaves
        await asyncio.gather(waiting, return_exceptions=True)
        while held:
            await asyncio.sleep(0.01)
        assert sim.transfers.loads  # freed while the read still runs
        while sim.transfers.loads:
            await asyncio.sleep(0.05)
        stats = prefill.engine.sim.transfers.stats[0]
        for _ in range(1200):  # (the read's notice is delivered in the background)
            if stats.pd_late_reads:
                break
            await asyncio.sleep(0.05)
        assert (stats.pd_sent, stats.pd_expired, stats.pd_late_reads) == (0, 0, 1)
        engine = sim.engines[0]
        assert engine.kv.num_free_blocks == engine.num_gpu_blocks - 1 and not engine.scheduler.held
