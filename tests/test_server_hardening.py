"""Every input answered: what a fuzzer and a storm of odd bodies found, pinned.

Expected bodies marked "(vLLM)" follow vLLM 0.33's handlers: FastAPI's "There was an error
parsing the body" for what json.loads refuses, its ValueError handler (400 with the
exception's text) for a lone surrogate the tokenizer or the response encoder chokes on.
"""
from __future__ import annotations

import asyncio
import gc
import json
import logging

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from server import request_body
from server.jobs import Job
from server.request_body import BodyDecoder
from server.testing import running_server

pytestmark = pytest.mark.asyncio(loop_scope="module")


def error(message: str, err_type: str = "BadRequestError", code: int = 400) -> dict:
    return {"error": {"message": message, "type": err_type, "param": None, "code": code}}


PARSING = error("There was an error parsing the body", "Bad Request")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server():
    async with running_server("--speed", "1000", "--enable-server-load-tracking") as running:
        yield running


async def post_raw(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, str, bytes]:
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=body, headers={"Content-Type": content_type}) as r:
            return r.status, r.headers["Content-Type"], await r.read()


async def test_empty_prompt_list_is_answered_with_no_choices_as_vllm(server):
    status, _, body = await post_raw(server.url + "/v1/completions", b'{"prompt": []}')
    answer = json.loads(body)
    assert status == 200 and answer["choices"] == []
    assert answer["usage"] == {"prompt_tokens": 0, "total_tokens": 0, "completion_tokens": 0,
                               "prompt_tokens_details": None, "completion_tokens_details": None}
    status, content_type, body = await post_raw(server.url + "/v1/completions", b'{"prompt": [], "stream": true}')
    assert (status, content_type, body) == (200, "text/event-stream; charset=utf-8", b"data: [DONE]\n\n")
    status, _, body = await post_raw(server.url + "/invocations", b'{"prompt": []}')
    assert status == 200 and json.loads(body)["choices"] == []
    async with aiohttp.ClientSession() as http:
        async with http.get(server.url + "/load") as r:
            assert await r.json() == {"server_load": 0}


SURROGATE = "'utf-8' codec can't encode character '\\ud800' in position {}: surrogates not allowed"
ODD_BODIES = [
    ("lone surrogate in the prompt (vLLM)", "/v1/completions", b'{"prompt": "a\\ud800b"}',
     error(SURROGATE.format(1))),
    ("lone surrogate in a chat message (vLLM)", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "\\ud800"}]}', None),
    ("lone surrogate in the model name, echoed by the 404 (vLLM)", "/v1/completions",
     b'{"prompt": "hi", "model": "\\ud800"}', error(SURROGATE.format(32))),
    ("lone surrogate in /tokenize (vLLM)", "/tokenize", b'{"prompt": "\\ud800"}', error(SURROGATE.format(0))),
    ("nesting 1,000 deep in an unknown field (vLLM)", "/v1/completions",
     b'{"prompt": "hi", "x": ' + b"[" * 1000 + b"]" * 1000 + b"}", PARSING),
    ("nesting 1,000 deep in the prompt (vLLM)", "/v1/completions",
     b'{"prompt": ' + b"[" * 1000 + b"]" * 1000 + b"}", PARSING),
    ("an integer of 5,000 digits (vLLM)", "/v1/completions", b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}",
     PARSING),
    ("invalid UTF-8 (vLLM)", "/v1/completions", b'{"prompt": "hi\xff"}', PARSING),
    ("not JSON on /invocations (vLLM)", "/invocations", b"not json",
     error("JSON decode error: Expecting value: line 1 column 1 (char 0)", "Bad Request")),
    ("neither API on /invocations (vLLM)", "/invocations", b'{"prompt": 5}',
     error("Cannot find suitable handler for request. Expected one of: ['ChatCompletionRequest', "
           "'CompletionRequest']")),
]


@pytest.mark.parametrize("name,path,body,expected", ODD_BODIES, ids=[c[0] for c in ODD_BODIES])
async def test_odd_body_gets_a_vllm_shaped_400(server, name, path, body, expected):
    status, content_type, answer = await post_raw(server.url + path, body)
    assert (status, content_type) == (400, "application/json")
    answer = json.loads(answer)
    if expected is None:  # the position depends on the chat template
        assert answer["error"]["message"].startswith("'utf-8' codec can't encode character '\\ud800'")
    else:
        assert answer == expected
    assert server.engine.num_unfinished == 0


async def test_request_id_header_bytes_are_latin_1_as_starlette_reads_them(server):
    """A header byte that is not UTF-8 (0xE9) is "é" to Starlette, not a lone surrogate."""
    host, port = server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = b'{"prompt": "hi", "max_tokens": 2}'
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"X-Request-Id: caf\xe9\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
    answer = await reader.read()
    writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert json.loads(payload)["id"] == "cmpl-caf\xe9"


async def test_large_body_is_decoded_off_the_loop_and_unknown_fields_dropped():
    """A body over the inline limit goes through the worker process, which keeps only the fields asked for."""
    decoder = BodyDecoder()

    async def echo_keys(request: web.Request) -> web.Response:
        data = await decoder.read(request, ["prompt", "max_tokens"])
        return web.json_response(sorted(data))

    app = web.Application(client_max_size=1 << 30)
    app.router.add_post("/", echo_keys)
    body = {"prompt": "hello", "max_tokens": 3, "junk": list(range(400_000))}
    assert len(json.dumps(body)) > request_body.INLINE_BYTES
    try:
        async with TestClient(TestServer(app)) as client:
            for _ in range(2):  # the second reuses the worker
                r = await client.post("/", json=body)
                assert r.status == 200 and await r.json() == ["max_tokens", "prompt"]
            r = await client.post("/", data=b"[" * 2_000_000)  # too deep for the worker's parser
            assert r.status == 500  # (this bare app has no vLLM error handler)
            r = await client.post("/", json=body)  # the worker is still usable
            assert await r.json() == ["max_tokens", "prompt"]
    finally:
        await decoder.close()


async def test_body_over_the_limit_gets_413_in_vllms_shape(server, monkeypatch):
    monkeypatch.setattr(request_body, "MAX_BODY_BYTES", 1000)
    status, _, answer = await post_raw(server.url + "/v1/completions",
                                       json.dumps({"prompt": "x" * 2000}).encode())
    assert status == 413
    assert json.loads(answer) == error("Maximum request body size 1000 exceeded.",
                                       "Request Entity Too Large", 413)


async def test_finished_requests_leave_no_job_behind_without_a_collection(server):
    """No Choice-Job reference cycle: a response's objects are freed by reference counting."""
    gc.collect()
    gc.disable()
    try:
        for stream in (False, True):
            status, _, _ = await post_raw(server.url + "/v1/completions",
                                          json.dumps({"prompt": "hi", "max_tokens": 5, "n": 2,
                                                      "stream": stream}).encode())
            assert status == 200
        assert not [o for o in gc.get_objects() if isinstance(o, Job)]
    finally:
        gc.enable()


async def _raw_connection(url: str):
    host, port = url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def test_a_request_head_trickled_in_is_cut_at_the_keep_alive_timeout(monkeypatch):
    monkeypatch.setattr("server.serve.KEEP_ALIVE_TIMEOUT", 0.3)
    async with running_server("--speed", "1000") as server:
        reader, writer = await _raw_connection(server.url)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the server
        writer.close()


async def test_a_body_trickled_in_gets_408_after_the_body_timeout(server, monkeypatch):
    monkeypatch.setattr(request_body, "BODY_TIMEOUT", 0.3)
    reader, writer = await _raw_connection(server.url)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"prompt\"")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])  # uvicorn writes names in lower case
    body = await reader.readexactly(length)
    writer.close()
    assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head
    assert json.loads(body) == error("The request body did not arrive within 0.3 s", "Request Timeout", 408)


async def test_a_client_that_leaves_mid_body_is_logged_in_one_line(server, caplog):
    caplog.set_level(logging.INFO)
    reader, writer = await _raw_connection(server.url)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"prompt\"")
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.close()
    for _ in range(100):
        if "left before the response" in caplog.text:
            break
        await asyncio.sleep(0.02)
    assert "127.0.0.1 left before the response to POST /v1/completions" in caplog.text
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.exc_info]
