"""A client that goes away aborts its request in the core: blocks freed, nothing left running."""
from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from server.testing import running_server


async def _metric(http: aiohttp.ClientSession, url: str, name: str) -> float:
    async with http.get(url + "/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_200_mid_stream_disconnects_free_every_block(tmp_path):
    log_path = tmp_path / "requests.jsonl"
    async with running_server("--speed", "5", "--request-log", str(log_path)) as server:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:
            async def stream_then_leave(i):
                payload = {"prompt": f"request {i} " * (5 + i % 40), "max_tokens": 5000, "ignore_eos": True,
                           "stream": True}
                response = await http.post(server.url + "/v1/completions", json=payload)
                seen = 0
                async for _ in response.content.iter_any():
                    seen += 1
                    if seen >= 2 + i % 3:
                        break
                response.close()  # drop the connection mid-stream

            await asyncio.gather(*(stream_then_leave(i) for i in range(200)))
            for _ in range(100):  # the server notices each disconnect on its next loop turn
                if server.engine.num_unfinished == 0:
                    break
                await asyncio.sleep(0.01)
            kv_usage = await _metric(http, server.url, "vllm:kv_cache_usage_perc")
            running = await _metric(http, server.url, "vllm:num_requests_running")
            waiting = await _metric(http, server.url, "vllm:num_requests_waiting")
        engine = server.engine
        assert engine.num_unfinished == 0 and engine.num_prefill_tokens == 0
        assert not engine.sim.active
        for instance in engine.sim.engines:
            assert instance.num_running == 0 and instance.num_waiting == 0
            assert instance.kv.usage == 0 and instance.kv.num_free_blocks == instance.num_gpu_blocks - 1
        result = kv_usage, running, waiting
    assert result == (0.0, 0.0, 0.0)
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert len(records) == 200 and {r["finish_reason"] for r in records} == {"abort"}
    assert all(0 < r["output_tokens"] < 5000 for r in records)


async def test_disconnect_while_waiting_for_a_non_streamed_answer_aborts():
    async with running_server("--speed", "1") as server:
        async with aiohttp.ClientSession() as http:
            payload = {"prompt": "hello", "max_tokens": 3000, "ignore_eos": True}
            task = asyncio.ensure_future(http.post(server.url + "/v1/completions", json=payload))
            for _ in range(1000):  # until it runs (not a fixed wait: the machine may be busy)
                if server.engine.sim.engines[0].num_running == 1:
                    break
                await asyncio.sleep(0.01)
            assert server.engine.sim.engines[0].num_running == 1
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            for _ in range(2000):  # (a busy machine notices the disconnect later)
                if server.engine.num_unfinished == 0:
                    break
                await asyncio.sleep(0.01)
        instance = server.engine.sim.engines[0]
        result = server.engine.num_unfinished, instance.num_running, instance.kv.usage
    assert result == (0, 0, 0)


async def test_disconnect_of_a_queued_request_removes_it_from_the_queue():
    async with running_server("--speed", "1", "--max-num-seqs", "1") as server:
        async with aiohttp.ClientSession() as http:
            payload = {"prompt": "hello", "max_tokens": 3000, "ignore_eos": True, "stream": True}
            first = await http.post(server.url + "/v1/completions", json=payload)
            second = await http.post(server.url + "/v1/completions", json=payload)  # the stream is open
            instance = server.engine.sim.engines[0]
            for _ in range(1000):  # until both are in the engine
                if (instance.num_running, instance.num_waiting) == (1, 1):
                    break
                await asyncio.sleep(0.01)
            assert (instance.num_running, instance.num_waiting) == (1, 1)
            second.close()
            for _ in range(2000):
                if instance.num_waiting == 0:
                    break
                await asyncio.sleep(0.01)
            state = (instance.num_running, instance.num_waiting)
            first.close()
            result = state
    assert result == (1, 0)


@pytest.mark.merging
async def test_a_client_that_does_not_read_gets_merged_chunks_and_memory_stays_bounded():
    from server.sse import HIGH_WATER
    async with running_server("--speed", "2000") as server:
        host, port = server.url.split("//")[1].split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        body = json.dumps({"prompt": "x", "max_tokens": 30000, "ignore_eos": True, "stream": True,
                           "return_token_ids": True, "stream_options": {"include_usage": True}}).encode()
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
        peak = 0
        for _ in range(40):  # do not read for a while: the server must hold tokens back
            await asyncio.sleep(0.02)
            for transport in [p.transport for p in server.running.runners[0].server.connections
                              if p.transport is not None]:
                peak = max(peak, transport.get_write_buffer_size())
        data = b""
        while not data.endswith(b"0\r\n\r\n"):
            data += await reader.read(1 << 20)
        writer.close()
        peak, data = peak, data
    # never more than the high-water mark plus one merged chunk (the tokens held back meanwhile;
    # without them 30,000 unread tokens would be ~8 MB)
    assert peak < HIGH_WATER + 30000 * 16
    events = [e for e in data.split(b"\n\n") if e.startswith(b"data: {") or b"data: {" in e]
    payloads = [json.loads(e[e.index(b"data: ") + 6:]) for e in events]
    usage = payloads[-1]["usage"]
    token_chunks = [p for p in payloads if p["choices"]]
    sizes = [len(p["choices"][0]["token_ids"]) for p in token_chunks]
    assert usage["completion_tokens"] == sum(sizes) == 30000  # every token arrived, in order of chunks
    assert max(sizes) > 1  # some reached the slow client merged, as vLLM merges outputs for a slow consumer
