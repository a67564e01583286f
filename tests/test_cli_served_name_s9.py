"""`serve --served-model-name X [Y]` without a model: as `vllm serve --served-model-name X` (vLLM serves its
default model under those names only): /v1/models lists X and Y, each with the default model as its root;
requests name X, Y or nothing and are answered as X (the first name, vLLM's model_name); the default model's
own name is not served (vLLM's 404 with the valid aliases); the metrics' model_name is X. The default model is
the emulator's embedded one (vLLM's own default, Qwen/Qwen3-0.6B, has no shipped config here)."""
from __future__ import annotations

import aiohttp

from server.serve import DEFAULT_MODEL, resolve_defaults
from server.testing import running_server, serve_args


async def test_served_names_without_a_model_serve_the_default_model_under_those_names_only():
    assert resolve_defaults(serve_args("--served-model-name", "X")) == DEFAULT_MODEL
    async with running_server("--speed", "1000", "--served-model-name", "X", "Y") as server, \
            aiohttp.ClientSession() as http:
        async with http.get(server.url + "/v1/models") as r:
            cards = (await r.json())["data"]
        assert [(card["id"], card["root"]) for card in cards] == [("X", DEFAULT_MODEL), ("Y", DEFAULT_MODEL)]
        for model in ("X", "Y", None):
            body = {"prompt": "hi", "max_tokens": 2} | ({"model": model} if model else {})
            async with http.post(server.url + "/v1/completions", json=body) as r:
                assert r.status == 200 and (await r.json())["model"] == "X"
        async with http.post(server.url + "/v1/completions", json={"model": DEFAULT_MODEL, "prompt": "hi"}) as r:
            assert r.status == 404
            assert (await r.json())["error"] == {
                "message": f"The model `{DEFAULT_MODEL}` does not exist. Valid aliases: X, Y.",
                "type": "NotFoundError", "param": "model", "code": 404}
        async with http.get(server.url + "/metrics") as r:
            text = await r.text()
    served = [line for line in text.splitlines() if line.startswith("vllm:request_success_total{")]
    assert served and all('model_name="X"' in line for line in served)
