"""A prompt list the serving layer's queue-bound check lets in but whose later prompt the engine refuses
(vLLM's AsyncLLM.add_request raising QueueOverflowError / MaxQueuedTokensError as it adds each prompt):
streamed, vLLM's response has begun, so it is a 200 whose stream carries the 503 error event and [DONE]
(completion_stream_generator's `except Exception`); not streamed, a plain 503. Either way the rejection is
counted once and nothing is left behind. Virtual time only."""
from __future__ import annotations

import json
import re

import aiohttp
import pytest

import front_door
from server.testing import running_server

BACKLOG = ("The engine has reached its prefill token backlog limit. Please try again later or on a different "
           "instance.")
BUSY = ("The engine is currently busy and cannot accept new requests. Please try again later or on a "
        "different instance.")


def _rejections(metrics: str) -> dict[str, float]:
    found = re.findall(r'^vllm:admission_rejections_total\{([^}]*)\} (\S+)$', metrics, re.M)
    out: dict[str, float] = {}
    for labels, value in found:
        reason = re.search(r'reason="([^"]*)"', labels).group(1)
        out[reason] = out.get(reason, 0.0) + float(value)
    return out


@pytest.mark.parametrize("bound, prompts, message, reason", [
    (("--max-num-queued-tokens", "6"), [[11, 12, 13, 14, 15, 16], [17]], BACKLOG, "max_num_queued_tokens"),
    (("--max-num-queued-reqs", "2"), [[11, 12], [13], [14]], BUSY, "max_num_queued_reqs"),
])
@pytest.mark.parametrize("stream", [True, False])
async def test_a_later_prompt_refused_is_an_error_event_in_a_stream_and_a_plain_503_otherwise(
        bound, prompts, message, reason, stream):
    async with running_server("--speed", "1000", "--max-model-len", "4096", *bound) as server, \
            aiohttp.ClientSession() as http:
        async with http.post(server.url + "/v1/completions", json={
                "prompt": prompts, "max_tokens": 4, "stream": stream}) as r:
            status, content_type, text = r.status, r.content_type, await r.text()
        async with http.get(server.url + "/load") as r:
            load = (await r.json())["server_load"]
        async with http.get(server.url + "/metrics") as r:
            metrics = await r.text()
        engine = server.engine
        leftovers = front_door.leftovers(engine)
        async with http.post(server.url + "/v1/completions", json={
                "prompt": prompts[1:], "max_tokens": 4, "stream": stream}) as r:
            after = r.status, await r.text()
    error = {"error": {"message": message, "type": "Service Unavailable", "param": None, "code": 503}}
    if stream:  # vLLM's create_streaming_error_response: json.dumps of the ErrorResponse, then [DONE]
        assert (status, content_type) == (200, "text/event-stream")
        assert text == f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n"
    else:
        assert status == 503 and json.loads(text) == error
    assert load == 0 and leftovers == (0, 0, 0, [True] * len(engine.sim.engines))
    assert _rejections(metrics) == {"max_num_queued_reqs": 0.0, "max_num_queued_tokens": 0.0, reason: 1.0}
    assert not re.search(r'^vllm:request_success_total\{[^}]*\} [1-9]', metrics, re.M)
    assert after[0] == 200 and (not stream or after[1].rstrip().endswith("data: [DONE]"))


async def test_a_request_the_first_check_refuses_is_a_plain_503_even_streamed():
    """vLLM's serving layer checks before the stream begins (_preflight): a plain JSON 503."""
    async with running_server("--speed", "1000", "--max-model-len", "4096", "--max-num-queued-reqs", "2") as server, \
            aiohttp.ClientSession() as http:
        async with http.post(server.url + "/v1/completions", json={
                "prompt": "hi", "n": 3, "max_tokens": 4, "stream": True}) as r:
            status, body = r.status, await r.json()
        async with http.get(server.url + "/metrics") as r:
            metrics = await r.text()
    assert status == 503 and body["error"] == {"message": BUSY, "type": "Service Unavailable", "param": None,
                                               "code": 503}
    assert _rejections(metrics)["max_num_queued_reqs"] == 1.0
