"""/openapi.json lists the routes the app registers, as FastAPI's document of `vllm serve` does: not the 403
stand-ins of disabled scale-out routes (vLLM adds them with include_in_schema=False), and the runtime LoRA
routes with their request bodies (vLLM's LoadLoRAAdapterRequest / UnloadLoRAAdapterRequest)."""
from __future__ import annotations

import aiohttp

from server.scale_out import PATHS
from server.testing import running_server

FAST = ("--speed", "1000")


async def _document(*argv: str) -> dict:
    async with running_server(*FAST, *argv) as server, aiohttp.ClientSession() as http:
        async with http.get(server.url + "/openapi.json") as r:
            assert r.status == 200
            return await r.json()


async def _status(server, path: str) -> int:
    async with aiohttp.ClientSession() as http, http.post(server.url + path, json={}) as r:
        return r.status


async def test_disabled_scale_out_routes_answer_403_but_are_not_documented():
    async with running_server(*FAST) as server:
        assert await _status(server, "/inference/v1/generate") == 403
    document = await _document()
    assert not set(PATHS) & set(document["paths"])
    assert "GenerateRequest" not in document["components"]["schemas"]  # no schema of an undocumented route


async def test_enabled_scale_out_routes_are_documented_with_their_bodies():
    document = await _document("--enable-scale-out")
    assert set(PATHS) - {"/inference/v1/abort_requests"} <= set(document["paths"])
    body = document["paths"]["/inference/v1/generate"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/GenerateRequest"}
    assert "/inference/v1/abort_requests" in document["paths"]  # its body is read raw, as vLLM's: no schema


async def test_runtime_lora_routes_are_documented_with_vllms_request_bodies(monkeypatch):
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "1")
    document = await _document("--enable-lora")
    schemas = document["components"]["schemas"]
    for path, model, required in (("/v1/load_lora_adapter", "LoadLoRAAdapterRequest", ["lora_name", "lora_path"]),
                                  ("/v1/unload_lora_adapter", "UnloadLoRAAdapterRequest", ["lora_name"])):
        body = document["paths"][path]["post"]["requestBody"]
        assert body["required"] and body["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{model}"}
        assert schemas[model]["required"] == required
    assert set(schemas["LoadLoRAAdapterRequest"]["properties"]) == {"lora_name", "lora_path", "load_inplace",
                                                                    "is_3d_lora_weight"}
    assert set(schemas["UnloadLoRAAdapterRequest"]["properties"]) == {"lora_name", "lora_int_id"}
