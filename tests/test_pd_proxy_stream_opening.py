"""The cluster's own P/D proxy answers a streamed request as vLLM's toy proxy does
(tests/v1/kv_connector/nixl_integration/toy_proxy_server.py, _handle_completions): it awaits the prefill pod's
whole (non-streamed) response before it returns its StreamingResponse of the decode pod's stream, so the client
gets its headers once the prefill pod has answered, and a prefill that fails is an HTTP error status, not an
error event in an open stream (before: the stream opened as soon as the prefill was placed). What fails after
(the decode pod's own answer) stays in the stream. Virtual time."""
from __future__ import annotations

import asyncio

import aiohttp

from server.testing import running_server
from test_refused_prompt_logging import _pd_cluster

PROMPT = list(range(1000, 4000))


async def test_the_stream_opens_once_the_prefill_pod_has_answered(tmp_path):
    async with running_server("--speed", "0.2", deployment=_pd_cluster(tmp_path)) as server, \
            aiohttp.ClientSession() as http:
        sim = server.engine.sim
        prefills = []
        sim.add_finish_listener(lambda r: prefills.append(r.finish_reason) if r.request_id.endswith("@prefill")
                                else None, prefills=True)
        async with http.post(server.url + "/v1/completions",
                             json={"prompt": PROMPT, "max_tokens": 3, "stream": True}) as r:
            assert r.status == 200
            assert prefills == ["length"]  # its prefill pod had answered (its prefill takes a second of wall time)
            text = await r.text()
        assert text.endswith("data: [DONE]\n\n") and '"finish_reason":"length"' in text


async def test_a_prefill_pod_that_fails_answers_a_stream_with_an_http_error(tmp_path):
    async with running_server("--speed", "0.02", deployment=_pd_cluster(tmp_path)) as server, \
            aiohttp.ClientSession() as http:
        sim = server.engine.sim
        answer = asyncio.ensure_future(http.post(server.url + "/v1/completions",
                                                 json={"prompt": PROMPT, "max_tokens": 3, "stream": True}))
        while not sim.pd.prefill_of:  # its prefill runs on the prefill pod
            await asyncio.sleep(0.01)
        server.engine.pacer.catch_up()
        sim.fail_instance("p")
        server.engine.pacer.catch_up()
        response = await answer
        assert response.status == 500 and response.content_type == "application/json"
        assert (await response.json())["error"]["code"] == 500
        response.release()
        assert not sim.active and not sim.pd.group_of and not sim.transfers.held
