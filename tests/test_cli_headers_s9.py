"""The response head as vLLM's uvicorn writes it: `date` and `server: uvicorn` first, then the app's headers
(Starlette's content-length before content-type; uvicorn's transfer-encoding last), every name in lower case
(plain, streamed and error answers alike)."""
from __future__ import annotations

import email.utils

import aiohttp

from server.testing import running_server


def _names(raw: tuple[tuple[bytes, bytes], ...]) -> list[str]:
    return [name.decode() for name, _ in raw]


async def test_uvicorns_date_and_server_headers_lead_in_lower_case():
    completion = {"prompt": "hi", "max_tokens": 2}
    async with running_server("--speed", "1000", "--enable-request-id-headers") as server, \
            aiohttp.ClientSession() as http:
        async with http.get(server.url + "/v1/models") as r:
            plain = r.raw_headers
            assert r.headers["Server"] == "uvicorn"
            assert email.utils.parsedate_to_datetime(r.headers["Date"]).tzname() == "UTC"
        async with http.post(server.url + "/v1/completions", json={**completion, "stream": True}) as r:
            await r.read()
            streamed = r.raw_headers
        async with http.get(server.url + "/no/such/route") as r:
            assert r.status == 404
            missing = r.raw_headers
    for raw in (plain, streamed, missing):
        names = _names(raw)
        assert names[:2] == ["date", "server"], names
        assert all(name == name.lower() for name in names), names
        assert names.count("server") == 1 and "x-request-id" in names
    # Starlette's order; vary: Origin from vLLM's CORS middleware, on every response
    assert _names(plain) == ["date", "server", "content-length", "content-type", "vary", "x-request-id"]
    assert _names(streamed) == ["date", "server", "content-type", "vary", "x-request-id", "transfer-encoding"]
    assert dict(plain)[b"content-type"] == b"application/json"
    assert dict(streamed)[b"content-type"] == b"text/event-stream; charset=utf-8"
