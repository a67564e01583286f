"""A streamed request through the cluster's own P/D proxy that the server aborts while its prefill pod runs it
(a shutdown's abort) is still answered as a stream: the proxy's client gets its SSE stream, which ends with the
abort's chunk and [DONE] (only a prefill that errors is an HTTP error: test_pd_proxy_stream_opening; a prefill
its own pod aborts goes on to the decode pod: test_pd_prefill_abort_s9). Virtual time."""
from __future__ import annotations

import asyncio

import aiohttp
import pytest

from server.testing import running_server
from test_refused_prompt_logging import _pd_cluster

PROMPT = list(range(1000, 4000))


def _abort_client_request(server) -> None:
    server.engine.pacer.abort([next(iter(server.engine.sim.pd.prefill_of))])  # a shutdown's abort


@pytest.mark.parametrize("abort", [_abort_client_request])
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions", "/v1/responses"])
async def test_a_stream_aborted_in_its_prefill_is_still_a_stream(tmp_path, abort, route):
    body = {"completions": {"prompt": PROMPT, "max_tokens": 3},
            "chat/completions": {"messages": [{"role": "user", "content": "hi " * 3000}], "max_tokens": 3},
            "responses": {"input": "hi " * 3000, "max_output_tokens": 3}}[route.removeprefix("/v1/")]
    async with running_server("--speed", "0.02", "--tokenizer", "builtin", deployment=_pd_cluster(tmp_path)) \
            as server, aiohttp.ClientSession() as http:
        sim = server.engine.sim
        answer = asyncio.ensure_future(http.post(server.url + route, json={**body, "stream": True}))
        while not sim.pd.prefill_of:  # its prefill runs on the prefill pod
            await asyncio.sleep(0.01)
        server.engine.pacer.catch_up()
        abort(server)
        server.engine.pacer.catch_up()
        response = await answer
        text = await response.text()
        assert response.status == 200 and response.content_type == "text/event-stream", text
        if route == "/v1/responses":
            assert text.startswith("event: response.created") and "event: response.completed" in text, text
        else:
            assert '"finish_reason":"abort"' in text and text.endswith("data: [DONE]\n\n"), text
        assert not sim.active and not sim.pd.group_of and not sim.transfers.held


async def test_a_non_streamed_request_aborted_in_its_prefill_answers_its_body(tmp_path):
    async with running_server("--speed", "0.02", deployment=_pd_cluster(tmp_path)) as server, \
            aiohttp.ClientSession() as http:
        sim = server.engine.sim
        answer = asyncio.ensure_future(http.post(server.url + "/v1/completions",
                                                 json={"prompt": PROMPT, "max_tokens": 3}))
        while not sim.pd.prefill_of:
            await asyncio.sleep(0.01)
        server.engine.pacer.catch_up()
        _abort_client_request(server)
        server.engine.pacer.catch_up()
        response = await answer
        assert response.status == 200
        assert (await response.json())["choices"][0]["finish_reason"] == "abort"
