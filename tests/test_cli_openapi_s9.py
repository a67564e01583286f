"""/openapi.json documents vLLM's API only: the emulator's own routes under /emulator/ (a decode pod's KV-read
notice, the dev-mode fault injection) are served but not listed, as vLLM's document has no such paths."""
from __future__ import annotations

import aiohttp

from server.kv_read_notice import ROUTE
from server.testing import running_server


async def test_emulator_routes_are_served_but_not_documented(monkeypatch):
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")
    async with running_server("--speed", "1000") as server, aiohttp.ClientSession() as http:
        async with http.get(server.url + "/openapi.json") as r:
            paths = (await r.json())["paths"]
        async with http.post(server.url + ROUTE, json={"remote_engine_id": "e", "remote_request_id": "r"}) as r:
            assert r.status == 200 and await r.json() == {"released": False}  # served all the same
        async with http.post(server.url + "/emulator/instances/nope/fail") as r:
            assert r.status == 404  # served: an instance it does not have
    assert not [path for path in paths if path.startswith("/emulator/")]
    # vLLM's own routes, dev mode's included, stay documented
    assert {"/v1/completions", "/v1/models", "/metrics", "/kv_event_sources", "/sleep", "/wake_up"} <= set(paths)


async def test_online_docs_have_fastapis_oauth2_redirect_page():
    async with running_server("--speed", "1000") as server, aiohttp.ClientSession() as http:
        async with http.get(server.url + "/docs") as r:
            page = await r.text()
        async with http.get(server.url + "/docs/oauth2-redirect") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")
            redirect = await r.text()
        async with http.get(server.url + "/openapi.json") as r:
            paths = (await r.json())["paths"]
    assert 'oauth2RedirectUrl: window.location.origin + "/docs/oauth2-redirect"' in page
    assert "window.opener.swaggerUIRedirectOauth2" in redirect and "window.close()" in redirect
    assert not [path for path in paths if path.startswith("/docs")]  # FastAPI's docs routes are not in it
