"""Shutdown as vLLM's (`--shutdown-timeout`): 0 aborts every request at once, more lets them finish
for that long, then aborts the rest; every stream ends with a `finish_reason: "abort"` chunk and
[DONE], every request has its line in the request log, and /sleep?mode=abort ends streams alike."""
from __future__ import annotations

import asyncio
import json

import aiohttp

from server.testing import running_server

LONG = 100_000  # tokens: no stream of this length ends by itself during a test


async def _stream(http: aiohttp.ClientSession, url: str, max_tokens: int, started: asyncio.Event | None = None,
                  path: str = "/v1/completions") -> list[dict | str]:
    """The events of one streamed request ("[DONE]" as a string)."""
    payload = {"prompt": "tell me a story", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    if path == "/v1/chat/completions":
        payload = {"messages": [{"role": "user", "content": "tell me a story"}], **payload}
        del payload["prompt"]
    events: list[dict | str] = []
    buffer = b""
    async with http.post(url + path, json=payload) as r:
        assert r.status == 200
        async for data in r.content.iter_any():
            buffer += data
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                text = event.decode().removeprefix("data: ")
                events.append(text if text == "[DONE]" else json.loads(text))
                if started is not None:
                    started.set()
    return events


def _finish_reasons(events: list) -> list:
    return [c["finish_reason"] for e in events if isinstance(e, dict) for c in e["choices"] if c["finish_reason"]]


async def test_shutdown_timeout_0_aborts_every_stream_with_vllms_final_chunk(tmp_path):
    log_path = tmp_path / "requests.jsonl"
    async with running_server("--speed", "1", "--request-log", str(log_path)) as server:
        async with aiohttp.ClientSession() as http:
            started = [asyncio.Event() for _ in range(3)]
            streams = [asyncio.ensure_future(_stream(http, server.url, LONG, e)) for e in started[:2]]
            streams.append(asyncio.ensure_future(_stream(http, server.url, LONG, started[2], "/v1/chat/completions")))
            for event in started:
                await asyncio.wait_for(event.wait(), 30)
            await server.running.shutdown(0)
            results = await asyncio.wait_for(asyncio.gather(*streams), 10)
    for events in results:
        assert events[-1] == "[DONE]" and _finish_reasons(events) == ["abort"]
        final = events[-2]["choices"][0]
        assert final["finish_reason"] == "abort" and final["stop_reason"] is None
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert len(records) == 3 and {r["finish_reason"] for r in records} == {"abort"}


async def test_shutdown_with_a_timeout_drains_what_finishes_in_time_then_aborts_the_rest(tmp_path):
    log_path = tmp_path / "requests.jsonl"
    async with running_server("--speed", "1", "--request-log", str(log_path)) as server:
        async with aiohttp.ClientSession() as http:
            started = asyncio.Event()
            long_stream = asyncio.ensure_future(_stream(http, server.url, LONG, started))
            await asyncio.wait_for(started.wait(), 30)
            short_started = asyncio.Event()
            short_stream = asyncio.ensure_future(_stream(http, server.url, 20, short_started))  # ~0.2 s at --speed 1
            await asyncio.wait_for(short_started.wait(), 30)
            shutdown = asyncio.ensure_future(server.running.shutdown(3.0))
            await asyncio.sleep(0.1)
            late = await _stream(http, server.url, 20)  # arrives while draining: aborted at once, as vLLM's engine
            short, long = await asyncio.wait_for(asyncio.gather(short_stream, long_stream), 20)
            await asyncio.wait_for(shutdown, 20)
    assert _finish_reasons(short) == ["length"] and len([e for e in short if isinstance(e, dict)]) == 20
    assert _finish_reasons(long) == ["abort"] and long[-1] == "[DONE]"
    assert _finish_reasons(late) == ["abort"] and late[-1] == "[DONE]"
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert sorted(r["finish_reason"] for r in records) == ["abort", "abort", "length"]



async def test_sleep_in_abort_mode_ends_streams_with_the_abort_chunk(dev_mode):
    async with running_server("--speed", "1") as server, aiohttp.ClientSession() as http:
        started = asyncio.Event()
        stream = asyncio.ensure_future(_stream(http, server.url, LONG, started, "/v1/chat/completions"))
        await asyncio.wait_for(started.wait(), 30)
        async with http.post(server.url + "/sleep?level=1&mode=abort") as r:
            assert r.status == 200
        events = await asyncio.wait_for(stream, 10)
    assert events[-1] == "[DONE]" and _finish_reasons(events) == ["abort"]
    assert events[-2]["choices"][0]["delta"] == {"content": ""}


async def test_a_request_aborted_before_its_first_token_streams_the_role_then_an_empty_delta(dev_mode):
    """vLLM's chat stream for an output that ends with nothing: the role chunk, then `delta: {}`."""
    async with running_server("--speed", "1") as server, aiohttp.ClientSession() as http:
        async with http.post(server.url + "/sleep?level=0&mode=keep") as r:
            assert r.status == 200
        stream = asyncio.ensure_future(_stream(http, server.url, 10, path="/v1/chat/completions"))
        while server.engine.num_unfinished == 0:
            await asyncio.sleep(0.01)
        await server.running.shutdown(0)
        events = await asyncio.wait_for(stream, 10)
    role, final, done = events
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert final["choices"][0]["delta"] == {} and final["choices"][0]["finish_reason"] == "abort"
    assert done == "[DONE]"
