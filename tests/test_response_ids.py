"""A request that names no id gets vLLM 0.33's: random_uuid(), 64 random bits as 16 hex digits (vllm/utils),
under each route's prefix (cmpl-, chatcmpl-, generate-tokens-), on every route that makes one."""
from __future__ import annotations

import json
import re

import aiohttp

from server.protocol import random_uuid
from server.testing import running_server

FAST = ("--speed", "1000")
HELLO = [{"role": "user", "content": "Hello there"}]
HEX16 = "[0-9a-f]{16}"


def test_random_uuid_is_vllms_16_hex_digits():
    ids = {random_uuid() for _ in range(200)}
    assert len(ids) == 200 and all(re.fullmatch(HEX16, i) for i in ids)


async def post(http: aiohttp.ClientSession, url: str, body: dict) -> dict:
    async with http.post(url, json=body) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def stream_ids(http: aiohttp.ClientSession, url: str, body: dict) -> set[str]:
    async with http.post(url, json={**body, "stream": True}) as r:
        raw = (await r.read()).decode()
    events = [json.loads(e[len("data: "):]) for e in raw.split("\n\n") if e.startswith("data: {")]
    return {e.get("id", e.get("request_id")) for e in events}


async def test_every_route_makes_vllms_id_shape():
    async with running_server(*FAST, "--enable-scale-out") as server, aiohttp.ClientSession() as http:
        url = server.url
        completion = await post(http, url + "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        completion_stream = await stream_ids(http, url + "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        chat = await post(http, url + "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2})
        chat_stream = await stream_ids(http, url + "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2})
        batch = await post(http, url + "/v1/chat/completions/batch", {"messages": [HELLO, HELLO], "max_tokens": 2})
        generate = await post(http, url + "/inference/v1/generate",
                              {"token_ids": [128000, 9906], "sampling_params": {"max_tokens": 2}})
        generate_stream = await stream_ids(http, url + "/inference/v1/generate",
                                           {"token_ids": [128000, 9906], "sampling_params": {"max_tokens": 2}})
        rendered = await post(http, url + "/v1/completions/render", {"prompt": "Hi", "max_tokens": 2})
        rendered_chat = await post(http, url + "/v1/chat/completions/render", {"messages": HELLO})
        named = await post(http, url + "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "request_id": "mine"})
    assert re.fullmatch(f"cmpl-{HEX16}", completion["id"])
    assert len(completion_stream) == 1 and re.fullmatch(f"cmpl-{HEX16}", completion_stream.pop())
    assert re.fullmatch(f"chatcmpl-{HEX16}", chat["id"])
    assert len(chat_stream) == 1 and re.fullmatch(f"chatcmpl-{HEX16}", chat_stream.pop())
    assert re.fullmatch(f"chatcmpl-{HEX16}", batch["id"])
    assert re.fullmatch(f"generate-tokens-{HEX16}", generate["request_id"])
    assert len(generate_stream) == 1 and re.fullmatch(f"generate-tokens-{HEX16}", generate_stream.pop())
    assert re.fullmatch(f"cmpl-{HEX16}", rendered[0]["request_id"])
    assert re.fullmatch(f"chatcmpl-{HEX16}", rendered_chat["request_id"])
    assert named["id"] == "cmpl-mine"  # a body's own id is kept, as vLLM keeps it
