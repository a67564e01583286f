"""vLLM 0.33's dev-mode pause routes (/pause, /resume, /is_paused: registered with VLLM_SERVER_DEV_MODE=1 only,
entrypoints/launchers/api_server/routers.py), and /tokenize of a gpt-oss chat rendered with Harmony as vLLM's
tokenize serving renders it (entrypoints/serve/tokenize/serving.py): the ids its chat route would run."""
from __future__ import annotations

import aiohttp

from profiles.tokenizer import load_tokenizer
from server.harmony import harmony_tokens
from server.harmony_prompt import encode, render
from server.testing import running_server

GPT_OSS = ("--model", "openai/gpt-oss-120b", "--hardware", "H200", "--max-model-len", "8192", "--speed", "1000")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


async def test_pause_routes_are_served_in_dev_mode_only(dev_mode):
    async with running_server("--speed", "1000") as server, aiohttp.ClientSession() as http:
        async with http.get(server.url + "/is_paused") as r:
            assert r.status == 200 and await r.json() == {"is_paused": False}
        async with http.post(server.url + "/pause?mode=keep&clear_cache=false") as r:
            assert r.status == 200 and await r.json() == {"status": "paused"}
        async with http.get(server.url + "/is_paused") as r:
            assert await r.json() == {"is_paused": True}
        async with http.post(server.url + "/pause?clear_cache=maybe") as r:  # read as FastAPI reads a bool
            assert r.status == 400 and "clear_cache must be a boolean" in (await r.json())["error"]["message"]
        async with http.post(server.url + "/resume") as r:
            assert r.status == 200 and await r.json() == {"status": "resumed"}
        async with http.get(server.url + "/is_paused") as r:
            assert await r.json() == {"is_paused": False}


async def test_without_dev_mode_there_are_no_pause_routes(monkeypatch):
    monkeypatch.delenv("VLLM_SERVER_DEV_MODE", raising=False)
    async with running_server("--speed", "1000") as server, aiohttp.ClientSession() as http:
        for method, path in (("POST", "/pause"), ("POST", "/resume"), ("GET", "/is_paused")):
            async with http.request(method, server.url + path) as r:
                assert r.status == 404 and await r.json() == {"detail": "Not Found"}


async def test_tokenize_renders_a_gpt_oss_chat_with_harmony_as_the_chat_route_does():
    tokens = harmony_tokens(load_tokenizer(None, "gpt_oss"))
    async with running_server(*GPT_OSS) as server, aiohttp.ClientSession() as http:
        for tools in (None, TOOLS):
            body = {"model": "openai/gpt-oss-120b", "messages": MESSAGES, **({"tools": tools} if tools else {})}
            async with http.post(server.url + "/tokenize", json={**body, "return_token_strs": True}) as r:
                assert r.status == 200, await r.text()
                tokenized = await r.json()
            ids, text = encode(tokens, render(MESSAGES, tools, None))
            assert tokenized["tokens"] == ids and tokenized["count"] == len(ids)
            assert text.startswith("<|start|>system<|message|>") and text.endswith("<|start|>assistant")
            assert tokenized["token_strs"][:3] == ["<|start|>", "system", "<|message|>"]
            async with http.post(server.url + "/v1/chat/completions", json={**body, "max_tokens": 1}) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["usage"]["prompt_tokens"] == tokenized["count"]
