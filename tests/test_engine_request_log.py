"""--enable-log-requests: the lines vLLM's AsyncLLM writes besides the route's "Received request" (INFO, under
vllm.v1.engine.async_llm): "Added request <engine id>." as each engine request (each child of n > 1) is added,
"Aborted request(s) <engine id>." and "Request <id> aborted." when a client leaves, and "Request <id> failed
(bad request): <error>." for a prompt of a list refused at a queue bound (the prompts added before it then
aborted); and the ERROR line "Error with model <ErrorResponse>" vLLM's chat route writes for its 404 (its
completion route writes none). Texts from vllm/v1/engine/async_llm.py (_add_request, generate, abort) and
chat_completion/serving.py (render_chat_request). One server and a cluster's own P/D proxy; virtual time."""
from __future__ import annotations

import asyncio
import logging
import re

import aiohttp
import pytest

from server.testing import running_server
from test_refused_prompt_logging import PROMPTS, _pd_cluster

ENGINE = "vllm.v1.engine.async_llm"
SUFFIX = "-[0-9a-f]{8}"  # vLLM's random suffix of an engine request id
BUSY = ("The engine is currently busy and cannot accept new requests. Please try again later or on a different "
        "instance.")


def _engine_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == ENGINE and r.levelno == logging.INFO]


def _matches(lines: list[str], patterns: list[str]) -> bool:
    return len(lines) == len(patterns) and all(re.fullmatch(p, line) for p, line in zip(patterns, lines))


@pytest.mark.parametrize("pd", [False, True])
async def test_each_engine_request_added_is_logged_with_its_engine_id(caplog, tmp_path, pd):
    caplog.set_level(logging.INFO, ENGINE)
    where = {"deployment": _pd_cluster(tmp_path)} if pd else {}
    async with running_server("--speed", "1000", "--enable-log-requests", "--max-model-len", "4096", **where) \
            as server, aiohttp.ClientSession() as http:
        async with http.post(server.url + "/v1/completions", headers={"X-Request-Id": "one"},
                             json={"prompt": [11, 12], "max_tokens": 3}) as r:
            assert r.status == 200
        async with http.post(server.url + "/v1/completions", headers={"X-Request-Id": "two"},
                             json={"prompt": [11, 12], "max_tokens": 3, "n": 2}) as r:
            assert r.status == 200
    assert _matches(_engine_lines(caplog), [rf"Added request cmpl-one-0{SUFFIX}\.",
                                            rf"Added request 0_cmpl-two-0{SUFFIX}\.",
                                            rf"Added request 1_cmpl-two-0{SUFFIX}\."])


async def test_nothing_is_logged_without_the_flag(caplog):
    caplog.set_level(logging.INFO, ENGINE)
    async with running_server("--speed", "1000", "--max-model-len", "4096") as server, \
            aiohttp.ClientSession() as http:
        async with http.post(server.url + "/v1/completions", json={"prompt": [11, 12], "max_tokens": 3}) as r:
            assert r.status == 200
    assert _engine_lines(caplog) == []


@pytest.mark.parametrize("stream", [False, True])
async def test_a_refused_prompt_of_a_list_is_logged_failed_and_those_added_before_it_aborted(caplog, stream):
    caplog.set_level(logging.INFO, ENGINE)
    async with running_server("--speed", "1000", "--enable-log-requests", "--max-model-len", "4096",
                              "--max-num-queued-reqs", "2") as server, aiohttp.ClientSession() as http:
        async with http.post(server.url + "/v1/completions", headers={"X-Request-Id": "refused"},
                             json={"prompt": PROMPTS, "max_tokens": 4, "stream": stream}) as r:
            await r.read()
    assert _matches(_engine_lines(caplog), [  # (with --max-num-queued-reqs 2, the third prompt is refused)
        rf"Added request cmpl-refused-0{SUFFIX}\.", rf"Added request cmpl-refused-1{SUFFIX}\.",
        re.escape(f"Request cmpl-refused-2 failed (bad request): {BUSY}."),
        rf"Aborted request\(s\) cmpl-refused-0{SUFFIX}\.", r"Request cmpl-refused-0 aborted\.",
        rf"Aborted request\(s\) cmpl-refused-1{SUFFIX}\.", r"Request cmpl-refused-1 aborted\."])


@pytest.mark.parametrize("n", [1, 2])
async def test_a_client_that_leaves_has_its_requests_aborted_and_logged(caplog, n):
    caplog.set_level(logging.INFO, ENGINE)
    async with running_server("--speed", "1", "--enable-log-requests", "--max-model-len", "4096") as server, \
            aiohttp.ClientSession() as http:
        stream = await http.post(server.url + "/v1/completions", headers={"X-Request-Id": "gone"}, json={
            "prompt": [11, 12], "max_tokens": 2000, "ignore_eos": True, "stream": True, "n": n})
        await stream.content.readline()  # its first chunk: running
        stream.close()
        sim = server.engine.sim
        for _ in range(6000):
            if not sim.active:
                break
            await asyncio.sleep(0.01)
    added = [rf"Added request {c}_cmpl-gone-0{SUFFIX}\." for c in range(n)] if n > 1 else \
        [rf"Added request cmpl-gone-0{SUFFIX}\."]
    assert _matches(_engine_lines(caplog), added + [rf"Aborted request\(s\) cmpl-gone-0{SUFFIX}\.",
                                                    r"Request cmpl-gone-0 aborted\."])


async def test_the_chat_routes_404_is_logged_as_vllms_error_with_model_and_the_completions_is_not(caplog):
    caplog.set_level(logging.INFO)
    async with running_server("--speed", "1000", "--max-model-len", "4096") as server, \
            aiohttp.ClientSession() as http:
        async with http.post(server.url + "/v1/completions", json={"model": "nope", "prompt": "hi"}) as r:
            assert r.status == 404
        assert not [r for r in caplog.records if "Error with model" in r.getMessage()]
        async with http.post(server.url + "/v1/chat/completions", json={
                "model": "nope", "messages": [{"role": "user", "content": "hi"}]}) as r:
            assert r.status == 404
            message = (await r.json())["error"]["message"]
    [line] = [r for r in caplog.records if "Error with model" in r.getMessage()]
    assert line.levelno == logging.ERROR
    assert line.getMessage() == (f"Error with model error=ErrorInfo(message={message!r}, type='NotFoundError', "
                                 "param='model', code=404)")
