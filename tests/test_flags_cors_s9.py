"""CORS as `vllm serve` 0.33 answers it (server/cors.py): Starlette's CORSMiddleware, always installed, from
--allowed-origins (default [], cross-origin access off), --allowed-methods and --allowed-headers (default
["*"]) and --allow-credentials (vllm/entrypoints/serve/middleware/register.py)."""
from __future__ import annotations

import aiohttp
import pytest

from server.cors import ALL_METHODS, PREFLIGHT_VARY
from server.testing import running_server
from vllm_emulator.cli import build_parser
from server.serve import normalize_argv
from server.serving import frontend_switches

SITE = "https://app.example"
PREFLIGHT = {"Origin": SITE, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "content-type, authorization"}
COMPLETION = {"prompt": "hi", "max_tokens": 2}


def _names(raw) -> list[str]:
    return [name.decode().lower() for name, _ in raw]


async def test_by_default_a_preflight_is_refused_and_no_origin_is_allowed():
    async with running_server("--speed", "1000") as server, aiohttp.ClientSession() as http:
        async with http.options(server.url + "/v1/completions", headers=PREFLIGHT) as r:
            assert r.status == 400 and await r.text() == "Disallowed CORS origin"
            assert r.headers["Vary"] == PREFLIGHT_VARY
            assert r.headers["Access-Control-Allow-Methods"] == ", ".join(ALL_METHODS)
            assert r.headers["Access-Control-Max-Age"] == "600"
            assert r.headers["Access-Control-Allow-Headers"] == "content-type, authorization"  # "*": mirrored
            assert "Access-Control-Allow-Origin" not in r.headers
            assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
        async with http.post(server.url + "/v1/completions", json=COMPLETION, headers={"Origin": SITE}) as r:
            assert r.status == 200 and r.headers["Vary"] == "Origin"
            assert "Access-Control-Allow-Origin" not in r.headers
        async with http.get(server.url + "/v1/models") as r:  # every response varies by origin
            assert r.headers["Vary"] == "Origin"


async def test_any_origin_with_a_star():
    async with running_server("--speed", "1000", "--allowed-origins", '["*"]') as server, \
            aiohttp.ClientSession() as http:
        async with http.options(server.url + "/v1/chat/completions", headers=PREFLIGHT) as r:
            assert r.status == 200 and await r.text() == "OK"
            assert r.headers["Access-Control-Allow-Origin"] == "*"
            names = _names(r.raw_headers)
            assert names[:3] == ["date", "server", "vary"] and names[-2:] == ["content-length", "content-type"]
        async with http.options(server.url + "/no/such/route", headers=PREFLIGHT) as r:
            assert r.status == 200  # the middleware answers before any route is looked for
        async with http.post(server.url + "/v1/completions", json={**COMPLETION, "stream": True},
                             headers={"Origin": SITE}) as r:
            await r.read()
            assert r.headers["Access-Control-Allow-Origin"] == "*" and r.headers["Vary"] == "Origin"
        async with http.get(server.url + "/no/such/route", headers={"Origin": SITE}) as r:
            assert r.status == 404 and r.headers["Access-Control-Allow-Origin"] == "*"
        async with http.options(server.url + "/v1/completions") as r:  # no Origin: not a preflight, no route
            assert r.status == 405


async def test_listed_origins_are_echoed_and_credentials_allowed():
    async with running_server("--speed", "1000", "--allowed-origins", f'["{SITE}"]', "--allowed-methods",
                              '["GET", "POST"]', "--allowed-headers", '["Authorization"]', "--allow-credentials") \
            as server, aiohttp.ClientSession() as http:
        async with http.options(server.url + "/v1/completions", headers=PREFLIGHT) as r:
            assert r.status == 200, await r.text()
            assert r.headers["Access-Control-Allow-Origin"] == SITE
            assert r.headers["Access-Control-Allow-Methods"] == "GET, POST"
            assert r.headers["Access-Control-Allow-Headers"] == \
                "Accept, Accept-Language, Authorization, Content-Language, Content-Type"
            assert r.headers["Access-Control-Allow-Credentials"] == "true"
        refused = {**PREFLIGHT, "Origin": "https://other.example", "Access-Control-Request-Method": "DELETE",
                   "Access-Control-Request-Headers": "x-custom"}
        async with http.options(server.url + "/v1/completions", headers=refused) as r:
            assert r.status == 400 and await r.text() == "Disallowed CORS origin, method, headers"
        async with http.post(server.url + "/v1/completions", json=COMPLETION, headers={"Origin": SITE}) as r:
            assert r.headers["Access-Control-Allow-Origin"] == SITE and r.headers["Vary"] == "Origin"
            assert r.headers["Access-Control-Allow-Credentials"] == "true"
        async with http.post(server.url + "/v1/completions", json=COMPLETION,
                             headers={"Origin": "https://other.example"}) as r:
            assert "Access-Control-Allow-Origin" not in r.headers
            assert r.headers["Access-Control-Allow-Credentials"] == "true"  # Starlette adds it for any origin


async def test_star_with_credentials_echoes_the_origin():
    async with running_server("--speed", "1000", "--allowed-origins", '["*"]', "--allow-credentials") as server, \
            aiohttp.ClientSession() as http:
        async with http.options(server.url + "/v1/completions", headers=PREFLIGHT) as r:
            assert r.headers["Access-Control-Allow-Origin"] == SITE
        async with http.get(server.url + "/v1/models", headers={"Origin": SITE}) as r:
            assert r.headers["Access-Control-Allow-Origin"] == SITE and r.headers["Vary"] == "Origin"


async def test_the_api_key_check_is_outside_cors():
    async with running_server("--speed", "1000", "--api-key", "k", "--allowed-origins", '["*"]') as server, \
            aiohttp.ClientSession() as http:
        async with http.options(server.url + "/v1/completions", headers=PREFLIGHT) as r:
            assert r.status == 200  # a preflight carries no key
        async with http.post(server.url + "/v1/completions", json=COMPLETION, headers={"Origin": SITE}) as r:
            assert r.status == 401 and "Vary" not in r.headers and "Access-Control-Allow-Origin" not in r.headers


def test_the_cors_flags_are_json_lists(capsys):
    parser = build_parser("serve")
    with pytest.raises(SystemExit):
        parser.parse_args(normalize_argv(["--allowed-origins", "*"], parser))
    assert "argument --allowed-origins: invalid loads value: '*'" in capsys.readouterr().err
    args = parser.parse_args(normalize_argv(["--allowed-methods", '"GET"'], parser))
    with pytest.raises(ValueError, match=r'--allowed-methods: expected a JSON list of strings, got "GET"'):
        frontend_switches(args)
