"""A pod whose generation is paused (vLLM's dev-mode /pause: AsyncLLM.pause_generation) takes a request carrying
kv_transfer_params. In abort and wait modes vLLM's engine core rejects every new request with its retryable error
(EngineCore._reject_add_while_paused: a 503 ServiceUnavailableError, "Generation is paused. Please retry after it
resumes.", inside the stream of a streamed request), and adds one with kv_transfer_params aborted at once, so that
NIXL's request_finished, seeing do_remote_prefill still set, sends the prefill side an empty read's notice which
frees its blocks unread; a non-streamed request's route then sends a second (its rejection cleanup, counted late by
the prefill side). In keep mode, and under /sleep (pause_scheduler alone), the request queues and loads its KV once
resumed. Two emulated pods over HTTP; virtual time."""
from __future__ import annotations

import asyncio

import aiohttp
import pytest

from emulator.request import Request
from pd_pair import pd_pair_file
from profiles.cluster_file import read_cluster_file
from server.testing import free_port, running_server
from test_kv_read_notice import CONSUMER, FAST, PRODUCER, _held_after
from test_pd_abort_notice import prefill_params
from test_pd_hardening import assert_all_blocks_free, pd_pair

PROMPT = list(range(1000, 3000))
PAUSED = {"message": "Generation is paused. Please retry after it resumes.", "type": "ServiceUnavailableError",
          "param": None, "code": 503}


async def _late_reads(stats, expected: int) -> int:
    for _ in range(1200):
        if stats.pd_late_reads >= expected:
            break
        await asyncio.sleep(0.05)
    return stats.pd_late_reads


@pytest.mark.parametrize("mode", ["abort", "wait"])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_paused_decode_pod_rejects_the_request_and_frees_the_prefills_blocks(mode, stream):
    async with running_server(*FAST, "--kv-transfer-config", PRODUCER) as prefill, \
            running_server(*FAST, "--kv-transfer-config", CONSUMER) as decode, aiohttp.ClientSession() as http:
        params = await prefill_params(http, prefill.url, PROMPT)
        assert len(prefill.engine.sim.transfers.held) == 1
        decode.engine.pause_generation(mode)  # what the decode pod's POST /pause?mode= does
        async with http.post(decode.url + "/v1/completions", json={
                "prompt": PROMPT, "max_tokens": 5, "kv_transfer_params": params, "stream": stream}) as r:
            status, text = r.status, await r.text()
            body = None if stream else await r.json()
        if stream:  # vLLM's stream had begun: its error event, then [DONE]
            assert status == 200 and '"type": "ServiceUnavailableError"' in text and text.endswith("data: [DONE]\n\n")
            assert "Generation is paused. Please retry after it resumes." in text
        else:
            assert status == 503 and body == {"error": PAUSED}
        assert await _held_after(prefill.engine.sim, 60.0) == 0  # (the lease is far away: it was the notice)
        stats = prefill.engine.sim.transfers.stats[0]
        # the engine core's empty read frees them; a non-streamed request's route cleanup sends another (late)
        assert (stats.pd_sent, stats.pd_expired) == (0, 0)
        assert await _late_reads(stats, 0 if stream else 1) == (0 if stream else 1)
        sim = decode.engine.sim
        assert not sim.active and sim.transfers.num_transfers == 0 and sim.rejects_new()
        decode.engine.resume_generation()  # POST /resume: new requests are taken again
        async with http.post(decode.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 3}) as r:
            assert r.status == 200 and (await r.json())["choices"][0]["finish_reason"] == "length"
        assert not sim.rejects_new()


async def test_a_paused_prefill_pod_rejects_a_prefill_and_holds_nothing():
    async with running_server(*FAST, "--kv-transfer-config", PRODUCER) as prefill, aiohttp.ClientSession() as http:
        prefill.engine.pause_generation("abort")
        async with http.post(prefill.url + "/v1/completions", json={
                "prompt": PROMPT, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}) as r:
            assert r.status == 503 and (await r.json()) == {"error": PAUSED}
        assert not prefill.engine.sim.transfers.held and not prefill.engine.sim.active


@pytest.mark.parametrize("pause", ["keep", "sleep"])
async def test_a_decode_pod_paused_in_keep_mode_or_asleep_queues_the_request_which_loads_its_kv_once_resumed(pause):
    async with running_server(*FAST, "--kv-transfer-config", PRODUCER) as prefill, \
            running_server(*FAST, "--kv-transfer-config", CONSUMER) as decode, aiohttp.ClientSession() as http:
        params = await prefill_params(http, prefill.url, PROMPT)
        sim = decode.engine.sim
        if pause == "keep":
            decode.engine.pause_generation("keep")
        else:  # /sleep?level=0: vLLM's pause_scheduler, which queues new requests
            decode.engine.pacer.catch_up()
            sim.pause("abort")
        assert not sim.rejects_new()
        answer = asyncio.ensure_future(http.post(decode.url + "/v1/completions", json={
            "prompt": PROMPT, "max_tokens": 4, "kv_transfer_params": params}))
        while not sim.active:
            await asyncio.sleep(0.01)
        assert len(prefill.engine.sim.transfers.held) == 1 and not sim.transfers.num_transfers  # queued, not loading
        decode.engine.resume_generation()
        response = await answer
        body = await response.json()
        assert response.status == 200 and body["choices"][0]["finish_reason"] == "length"
        assert sim.transfers.num_transfers == 1 and await _held_after(prefill.engine.sim, 60.0) == 0


async def test_a_sleep_after_a_pause_leaves_the_rejection_on_and_a_pause_in_keep_mode_turns_it_off():
    async with running_server(*FAST) as server, aiohttp.ClientSession() as http:
        sim = server.engine.sim
        server.engine.pause_generation("wait")
        sim.pause("keep")  # /sleep?mode=keep: pause_scheduler alone
        assert sim.rejects_new()
        async with http.post(server.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}) as r:
            assert r.status == 503
        server.engine.pause_generation("keep")
        assert not sim.rejects_new() and sim.is_paused()
        server.engine.resume_generation()
        async with http.post(server.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}) as r:
            assert r.status == 200


async def test_a_prompt_too_long_is_the_input_processors_400_before_a_paused_engine_sees_it():
    async with running_server("--max-model-len", "1024") as server, aiohttp.ClientSession() as http:
        server.engine.pause_generation("abort")
        async with http.post(server.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}) as r:
            assert r.status == 400 and "1024" in (await r.json())["error"]["message"]


async def test_the_pause_routes_pause_tell_and_resume_the_ports_engines():
    """server.pause_routes as app.py's dev-mode block registers them (served here on an app of their own over the
    server's Serving; a bad mode is the APIError app.py's middleware answers as vLLM's 400)."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

    from server import pause_routes
    from server.errors import APIError
    from server.serving import SERVING
    async with running_server(*FAST) as server, aiohttp.ClientSession() as http:
        app = web.Application()
        app[SERVING] = server.running.runners[0].app[SERVING]
        pause_routes.add_routes(app)
        async with TestClient(TestServer(app, port=free_port())) as routes:
            with pytest.raises(APIError, match="mode must be one of 'abort', 'wait', 'keep'"):
                await pause_routes.pause(make_mocked_request("POST", "/pause?mode=later", app=app))
            r = await routes.post("/pause?mode=wait&clear_cache=false")
            assert r.status == 200 and await r.json() == {"status": "paused"}
            assert await (await routes.get("/is_paused")).json() == {"is_paused": True}
            async with http.post(server.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}) as r:
                assert r.status == 503 and (await r.json()) == {"error": PAUSED}
            r = await routes.post("/resume")
            assert r.status == 200 and await r.json() == {"status": "resumed"}
            assert await (await routes.get("/is_paused")).json() == {"is_paused": False}
            async with http.post(server.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}) as r:
                assert r.status == 200


@pytest.mark.parametrize("paused_for, expired", [(10.0, False), (100.0, True)])
def test_a_decode_pod_paused_with_nothing_running_sends_no_heartbeats_so_the_prefills_lease_may_run_out(
        paused_for, expired):
    """NIXL's decode side renews the prefill's lease (30 s) with heartbeats in each step's connector metadata; a pod
    paused with nothing running runs no step: the request it queued meanwhile loads its KV if the pause was short,
    and finds it expired (a failed load: kv_load_failure_policy "fail") if not."""
    sim = pd_pair()
    decode = sim.instance("d0")
    sim.pause("keep", decode)
    request = Request("r", 3000, 4, prompt_token_ids=list(range(3000)))
    sim.submit(request)
    while sim.pd.in_prefill(request):
        sim.advance(sim.next_event_time())
    assert sim.instance_of[request.engine_index] is decode and len(sim.transfers.held) == 1
    sim.advance(sim.now + paused_for)
    sim.resume(decode)
    while (t := sim.next_event_time()) is not None:
        sim.advance(t)
    prefill, reader = (sim.transfers.stats[sim.instance(name).engines[0].index] for name in ("p0", "d0"))
    assert (prefill.pd_expired, reader.pd_failed, reader.pd_loads) == ((1, 1, 0) if expired else (0, 0, 1))
    assert request.finish_reason == ("error" if expired else "length")
    assert_all_blocks_free(sim)


@pytest.mark.parametrize("paused", ["p", "d"])
@pytest.mark.parametrize("stream", [False, True])
async def test_through_the_clusters_proxy_a_paused_pods_503_is_relayed(tmp_path, paused, stream):
    """The cluster's own P/D proxy relays a pod's error: a paused prefill pod's 503 before any stream opens; a
    paused decode pod's after the prefill pod has answered (in the stream, as the decode pod's own answer), its
    engine having freed the prefill's blocks unread."""
    path = pd_pair_file(tmp_path, free_port(), free_port(), prefill="p", decode="d")
    async with running_server("--speed", "200", deployment=read_cluster_file(path)[0]) as server, \
            aiohttp.ClientSession() as http:
        sim = server.engine.sim
        server.engine.pause_generation("abort", sim.instance(paused))  # the pod's own POST /pause
        prefills = []
        sim.add_finish_listener(lambda r: prefills.append(r.finish_reason), prefills=True)
        async with http.post(server.url + "/v1/completions",
                             json={"prompt": PROMPT, "max_tokens": 3, "stream": stream}) as r:
            status, text = r.status, await r.text()
        if stream and paused == "d":
            assert status == 200 and '"type": "ServiceUnavailableError"' in text and text.endswith("data: [DONE]\n\n")
        else:
            assert status == 503 and '"message":"Generation is paused. Please retry after it resumes."' in text, text
        assert prefills == (["length", "error"] if paused == "d" else [])  # (the client's request: an error)
        stats = sim.transfers.stats[sim.instance("p").engines[0].index]
        assert not sim.transfers.held and (stats.pd_sent, stats.pd_expired) == (0, 0)
        assert not sim.active and not sim.pd.group_of
