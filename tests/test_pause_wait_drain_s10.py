"""vLLM's dev-mode `/pause?mode=wait` answers once the engine has drained (its engine core completes the pause from
its idle callback, v1/engine/core.py pause_scheduler), and then resets the prefix cache unless clear_cache is false
(_finish_pause). HTTP answers only: the drain is seen in /metrics right after the pause answers."""
from __future__ import annotations

import json

import aiohttp
import pytest

from server.testing import running_server

PROMPT = "the same long prompt for the cache " * 30


async def _running(http, url: str) -> float:
    async with http.get(url + "/metrics") as r:
        text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:num_requests_running{"))


async def _cached(http, url: str) -> int:
    body = {"prompt": PROMPT, "max_tokens": 1}
    async with http.post(url + "/v1/completions", json=body) as r:
        return (await r.json())["usage"]["prompt_tokens_details"]["cached_tokens"]


@pytest.mark.parametrize("clear_cache", [True, False])
async def test_a_wait_pause_answers_once_drained_and_then_clears_the_cache(dev_mode, clear_cache):
    # ~120 decode steps at --speed 0.5 (~1.7 s): the stream is still running when the pause is asked for
    async with running_server("--speed", "0.5", "--enable-prompt-tokens-details") as server, \
            aiohttp.ClientSession() as http:
        body = {"prompt": PROMPT, "max_tokens": 120, "stream": True, "ignore_eos": True}
        async with http.post(server.url + "/v1/completions", json=body) as stream:
            await stream.content.readline()  # its first chunk: it runs
            flag = "true" if clear_cache else "false"
            async with http.post(server.url + f"/pause?mode=wait&clear_cache={flag}") as r:
                assert r.status == 200 and await r.json() == {"status": "paused"}
            assert await _running(http, server.url) == 0  # it answered once nothing ran
            chunks = [json.loads(line[6:]) for line in (await stream.text()).splitlines()
                      if line.startswith("data: {")]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # it ran to its end: not aborted
        async with http.post(server.url + "/resume") as r:
            assert r.status == 200
        cached = await _cached(http, server.url)
    assert (cached == 0) if clear_cache else (cached > 0)
