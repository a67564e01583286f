"""A decode request whose prefill is in another process, aborted before its load began: vLLM's NIXL
request_finished sees do_remote_prefill still set and has its worker send the prefill side an empty read's
notification, which frees the prefill's blocks at once (pull_scheduler.request_finished, pull_worker's
"just notify P worker"); so the decode pod tells the prefill pod (server.kv_read_notice, no transfer) and the
prefill side frees them without counting a send or an expiry. A read already done, or a decode pod that
failed, tells nothing more. Virtual time, and two emulated pods over HTTP."""
from __future__ import annotations

import asyncio

import aiohttp

from emulator.kv_transfer import ExternalKV
from emulator.request import Request
from server.testing import running_server
from test_kv_read_notice import CONSUMER, FAST, PRODUCER, _held_after
from test_pd_hardening import NIXL, assert_all_blocks_free, pd_pair

PARAMS = {"do_remote_prefill": True, "remote_engine_id": "elsewhere", "remote_request_id": "pre-1",
          "remote_block_ids": [list(range(188))], "remote_host": "10.0.0.9", "remote_port": 8100, "tp_size": 1}


def _decode(sim, rid: str, prompt: int = 3000) -> Request:
    request = Request(rid, prompt, 20, arrival_time=sim.now)
    request.external_kv = ExternalKV(prompt, sim.transfers.remote_source(dict(PARAMS), NIXL))
    sim.submit(request, instance=sim.instance("d0"))
    return request


def notices(sim, what=lambda params, move: move) -> list:
    """What the decode side tells prefill pods in other processes (a read's move, None for an empty read), as
    `what` makes of each notice."""
    told = []
    sim.transfers.remote_read_listeners.append(lambda params, move: told.append(what(params, move)))
    return told


async def prefill_params(http: aiohttp.ClientSession, url: str, prompt: list[int]) -> dict:
    """The kv_transfer_params a prefill pod answers for `prompt` (a do_remote_decode request)."""
    async with http.post(url + "/v1/completions", json={
            "prompt": prompt, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}) as r:
        return (await r.json())["kv_transfer_params"]


def test_an_abort_before_the_load_tells_the_remote_prefill_to_free_its_blocks_unread():
    sim = pd_pair()
    told = notices(sim, lambda params, move: (params["remote_request_id"], move))
    _decode(sim, "waiting")
    assert sim.abort("waiting")  # before any step: its blocks not even allocated
    assert told == [("pre-1", None)]

    done = _decode(sim, "read")
    sim.advance(sim.now + 60.0)
    assert done.finish_reason == "length" and [m is not None for _, m in told] == [False, True]  # its read's notice
    sim.abort("read")  # (finished: nothing to abort, nothing more to tell)
    assert len(told) == 2
    assert_all_blocks_free(sim)


def test_a_failed_decode_pod_tells_nothing():
    sim = pd_pair()
    told = notices(sim)
    _decode(sim, "r")
    sim.fail_instance("d0")
    assert told == []


async def test_over_http_the_prefill_pod_frees_an_aborted_decodes_blocks_unread():
    prompt = list(range(1000, 3000))
    async with running_server(*FAST, "--kv-transfer-config", PRODUCER) as prefill, \
            running_server(*FAST, "--kv-transfer-config", CONSUMER) as decode, aiohttp.ClientSession() as http:
        params = await prefill_params(http, prefill.url, prompt)
        assert len(prefill.engine.sim.transfers.held) == 1
        # the decode pod, paused with its requests kept (vLLM's /sleep mode keep), holds the request before its
        # load; the client leaves
        sim = decode.engine.sim
        decode.engine.pacer.catch_up()
        sim.pause("keep")
        waiting = asyncio.ensure_future(http.post(decode.url + "/v1/completions", json={
            "prompt": prompt, "max_tokens": 5, "kv_transfer_params": params}))
        while not sim.active:
            await asyncio.sleep(0.01)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        assert await _held_after(prefill.engine.sim, 60.0) == 0  # (the lease is far away: it was the notice)
        stats = prefill.engine.sim.transfers.stats[0]
        # freed unread; the route's rejection cleanup (a non-streamed request whose client left) sends a second
        # empty read, which the prefill side, no longer tracking the request, counts late, as vLLM's does
        for _ in range(1200):
            if stats.pd_late_reads:
                break
            await asyncio.sleep(0.05)
        assert (stats.pd_sent, stats.pd_expired, stats.pd_late_reads) == (0, 0, 1)
        engine = prefill.engine.sim.engines[0]
        assert engine.kv.num_free_blocks == engine.num_gpu_blocks - 1
        assert not sim.active and sim.transfers.num_transfers == 0
