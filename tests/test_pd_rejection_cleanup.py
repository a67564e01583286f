"""A decode pod that turns a do_remote_prefill request away before its engine has it frees the prefill's blocks
unread, as vLLM's _with_kv_transfer_rejection_cleanup (entrypoints/generate/base/serving.py) has its engine
client submit the request pre-aborted (AsyncLLM.notify_kv_transfer_request_rejected), whose connector's
request_finished, seeing do_remote_prefill still set, sends the prefill side an empty read's notification
(nixl/pull_scheduler.py request_finished). Before, the prefill waited for its lease and counted as expired.
A body that fails validation never reaches vLLM's route (FastAPI answers it): nothing is freed. Core, and two
emulated pods over HTTP (server.kv_read_notice)."""
from __future__ import annotations

import asyncio
import json

import aiohttp

from server.testing import running_server
from test_kv_read_notice import FAST, PRODUCER, _held_after
from test_pd_abort_notice import PARAMS, notices, prefill_params
from test_pd_hardening import NIXL, assert_all_blocks_free, pd_pair, prefill_over_http

# a decode pod that takes one engine request at a time
CONSUMER = json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_consumer"})


def test_a_rejected_request_frees_a_prefill_held_in_this_process_and_tells_one_elsewhere():
    sim = pd_pair()
    told = notices(sim, lambda params, move: (params["remote_request_id"], move))
    _, params = prefill_over_http(sim)
    assert len(sim.transfers.held) == 1
    sim.transfers.rejected(params, NIXL)
    assert not sim.transfers.held and told == []  # freed here, unread: nothing sent, nothing expired
    stats = sim.transfers.stats[0]
    assert (stats.pd_sent, stats.pd_expired) == (0, 0)
    sim.transfers.rejected(dict(PARAMS), NIXL)  # a prefill in another process: its process is told
    assert told == [("pre-1", None)]
    assert_all_blocks_free(sim)


async def _held_once(sim, count: int, seconds: float = 60.0) -> int:
    """How many prefills the pod holds once it is down to `count` or `seconds` have passed (notices are
    delivered in the background)."""
    for _ in range(int(seconds / 0.05)):
        if len(sim.transfers.held) <= count:
            break
        await asyncio.sleep(0.05)
    return len(sim.transfers.held)


async def test_over_http_a_decode_pods_404_503_and_400_free_the_prefills_they_name():
    async with running_server(*FAST, "--kv-transfer-config", PRODUCER) as prefill, \
            running_server(*FAST, "--kv-transfer-config", CONSUMER, "--max-num-queued-reqs", "1") as decode, \
            aiohttp.ClientSession() as http:
        prompts = [list(range(1000 + 3000 * i, 3000 + 3000 * i)) for i in range(6)]
        params = [await prefill_params(http, prefill.url, prompt) for prompt in prompts]
        held = prefill.engine.sim.transfers.held
        assert len(held) == 6
        turned_away = [  # (route, body, status): each turned away before the decode pod's engine
            ("/v1/completions", {"model": "nope"}, 404),
            ("/v1/completions", {"n": 2}, 503),  # past --max-num-queued-reqs 1 at once
            ("/v1/completions", {"max_tokens": 10 ** 6}, 400),  # max_tokens past max_model_len
            ("/v1/completions", {"model": "nope", "stream": True}, 404),  # before its stream opened
            ("/v1/chat/completions", {"model": "nope"}, 404),
        ]
        for (route, extra, status), prompt, p in zip(turned_away, prompts, params):
            body = {"prompt": prompt, "max_tokens": 5, "kv_transfer_params": p, **extra}
            if route.startswith("/v1/chat"):
                body = {"messages": [{"role": "user", "content": "hi"}], **{k: v for k, v in body.items()
                                                                               if k != "prompt"}}
            async with http.post(decode.url + route, json=body) as r:
                assert r.status == status, (route, extra, await r.text())
        # a body FastAPI refuses never reaches vLLM's route: its prefill stays held (for its lease)
        async with http.post(decode.url + "/v1/completions", json={
                "prompt": prompts[5], "max_tokens": 5, "temperature": "hot", "kv_transfer_params": params[5]}) as r:
            assert r.status == 400
        assert await _held_once(prefill.engine.sim, 1) == 1  # (the lease is far away: it was the notices)
        assert [key[1] for key in held] == [params[5]["remote_request_id"]]
        stats = prefill.engine.sim.transfers.stats[0]
        assert (stats.pd_sent, stats.pd_expired, stats.pd_late_reads) == (0, 0, 0)  # freed unread
        # the held one is still there to read
        async with http.post(decode.url + "/v1/completions", json={
                "prompt": prompts[5], "max_tokens": 5, "kv_transfer_params": params[5]}) as r:
            assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] == 5
        assert await _held_after(prefill.engine.sim, 60.0) == 0
        engine = prefill.engine.sim.engines[0]
        assert engine.kv.num_free_blocks == engine.num_gpu_blocks - 1
        assert decode.engine.sim.transfers.num_failed == 0


async def test_a_pod_without_a_kv_connector_frees_nothing():
    """vLLM's cleanup runs only where the pod has a KV connector (has_kv_connector)."""
    async with running_server(*FAST, "--kv-transfer-config", PRODUCER) as prefill, running_server(*FAST) as plain, \
            aiohttp.ClientSession() as http:
        prompt = list(range(1000, 3000))
        params = await prefill_params(http, prefill.url, prompt)
        async with http.post(plain.url + "/v1/completions", json={
                "model": "nope", "prompt": prompt, "max_tokens": 5, "kv_transfer_params": params}) as r:
            assert r.status == 404
        await asyncio.sleep(0.5)  # (time for a notice to arrive, were one sent)
        assert len(prefill.engine.sim.transfers.held) == 1
