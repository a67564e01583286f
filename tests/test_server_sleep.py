"""vLLM's dev-mode sleep routes: /sleep pauses the engines, /wake_up resumes them, /is_sleeping tells."""
from __future__ import annotations

import asyncio

import aiohttp
import pytest

from server.testing import running_server

FLAGS = ("--speed", "200", "--hardware", "RTX4090", "--max-model-len", "4096")
pytestmark = pytest.mark.usefixtures("dev_mode")


async def _complete(http: aiohttp.ClientSession, url: str, max_tokens: int) -> dict:
    payload = {"prompt": "hello there", "max_tokens": max_tokens, "ignore_eos": True}
    async with http.post(url + "/v1/completions", json=payload) as r:
        return await r.json()


async def test_sleep_aborts_running_requests_and_frees_their_blocks():
    # at --speed 1 the 4,000 tokens take a minute: the sleep comes while the request runs, whatever the machine's load
    async with running_server("--speed", "1", *FLAGS[2:]) as server, aiohttp.ClientSession() as http:
        long_running = asyncio.ensure_future(_complete(http, server.url, 4000))
        instance = server.engine.sim.engines[0]
        while instance.num_running == 0:
            await asyncio.sleep(0.01)
        async with http.post(server.url + "/sleep?level=1") as r:
            answer = await r.json()
        body = await long_running
        async with http.get(server.url + "/is_sleeping") as r:
            sleeping = await r.json()
        usage, running = instance.kv.usage, instance.num_running
    assert answer == {"status": "sleeping", "level": 1}
    assert body["choices"][0]["finish_reason"] == "abort"
    assert sleeping == {"is_sleeping": True}
    assert usage == 0.0 and running == 0


async def test_a_request_made_while_asleep_waits_for_wake_up():
    async with running_server(*FLAGS) as server, aiohttp.ClientSession() as http:
        async with http.post(server.url + "/sleep?level=0&mode=keep") as r:
            assert r.status == 200
        pending = asyncio.ensure_future(_complete(http, server.url, 8))
        await asyncio.sleep(0.3)
        waited = not pending.done() and server.engine.sim.engines[0].num_running == 0
        async with http.post(server.url + "/wake_up") as r:
            woke = await r.json()
        body = await asyncio.wait_for(pending, 10)
        async with http.get(server.url + "/is_sleeping") as r:
            sleeping = await r.json()
        waited, woke, body, sleeping = waited, woke, body, sleeping
    assert waited, "a sleeping engine must not run the request"
    assert woke == {"status": "awake", "tags": None}
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 8
    assert sleeping == {"is_sleeping": False}


async def test_sleep_with_a_bad_level_or_mode_is_a_400():
    async with running_server(*FLAGS) as server, aiohttp.ClientSession() as http:
        statuses = []
        for query in ("level=3", "level=x", "mode=later"):
            async with http.post(server.url + "/sleep?" + query) as r:
                statuses.append((r.status, (await r.json())["error"]["type"]))
        async with http.get(server.url + "/is_sleeping") as r:
            statuses, sleeping = statuses, await r.json()
    assert statuses == [(400, "BadRequestError")] * 3
    assert sleeping == {"is_sleeping": False}


async def test_sleep_routes_need_dev_mode(monkeypatch):
    monkeypatch.delenv("VLLM_SERVER_DEV_MODE")
    async with running_server(*FLAGS) as server, aiohttp.ClientSession() as http:
        async with http.post(server.url + "/sleep") as r:
            result = r.status
    assert result == 404
