"""A background Responses request naming no model, on a cluster whose entry is any_non_decode: its "queued" body
(and the response stored until it ends) names the model of the instance the core placed it on, as its finished
response does, not the cluster's first model (before: the queued body was built before the core placed it)."""
from __future__ import annotations

import asyncio

import aiohttp
import pytest

from server.testing import running_server
from test_model_less_cluster_requests import two_contexts


@pytest.fixture
def store(monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_RESPONSES_API_STORE", "1")  # read as the server starts


async def test_a_queued_background_response_names_the_model_it_runs_on(store):
    async with running_server("--speed", "200", deployment=two_contexts()) as server, \
            aiohttp.ClientSession() as http:
        queued = []
        for _ in range(4):
            async with http.post(server.url + "/v1/responses", json={
                    "input": "Hi", "max_output_tokens": 4, "ignore_eos": True, "background": True}) as r:
                assert r.status == 200
                queued.append(await r.json())
        assert [body["status"] for body in queued] == ["queued"] * 4
        # round robin over both models' instances
        assert [body["model"] for body in queued] == ["llama-short", "llama-long", "llama-short", "llama-long"]
        finished = []
        for body in queued:
            for _ in range(1200):
                async with http.get(server.url + f"/v1/responses/{body['id']}") as r:
                    stored = await r.json()
                if stored["status"] != "queued":
                    break
                assert stored["model"] == body["model"]
                await asyncio.sleep(0.05)
            finished.append(stored)
        assert [(b["status"], b["model"]) for b in finished] == [("incomplete", b["model"]) for b in queued]
        assert dict(server.engine.sim.routing_decisions) == {"short": 2, "long": 2}
