"""A Responses request's X-data-parallel-rank is checked where vLLM checks it: as its engine takes the request
(AsyncLLM.add_request's input processor, run by the route's lazy generator), so a foreground request out of range
is vLLM's 400, while a background one is answered 200 "queued" first and its task's failure leaves the stored
response "queued" (vLLM's _run_background_request lets the error go; entrypoints/openai/responses/serving.py).
The same on a pod and on a front door of several instances (which checks the rank its pod would: [0, 1))."""
from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from profiles.cluster_file import read_cluster_file
from server.testing import running_server

BASE = "meta-llama/Llama-3.1-8B"
BODY = {"model": BASE, "input": "hello", "max_output_tokens": 3}


def _two_instances(tmp_path: Path):
    path = tmp_path / "two.yaml"
    path.write_text(f"engine: {{max-model-len: 4096}}\ninstances:\n"
                    f"  - {{name: a, model: {BASE}, hardware: H100}}\n"
                    f"  - {{name: b, model: {BASE}, hardware: H100}}\n")
    return read_cluster_file(path)[0]


@pytest.mark.parametrize("front_door", [False, True])
async def test_a_background_response_with_a_rank_out_of_range_stays_queued(tmp_path, monkeypatch, front_door):
    monkeypatch.setenv("VLLM_ENABLE_RESPONSES_API_STORE", "1")
    deployment = _two_instances(tmp_path) if front_door else None
    async with running_server("--speed", "500", deployment=deployment) as server, aiohttp.ClientSession() as http:
        bad = {"X-data-parallel-rank": "7"}
        async with http.post(server.url + "/v1/responses", headers=bad, json={**BODY, "background": True}) as r:
            assert r.status == 200
            queued = await r.json()
        assert queued["status"] == "queued"
        async with http.post(server.url + "/v1/responses", headers=bad, json=BODY) as r:  # (after its task ran)
            assert r.status == 400
            assert (await r.json())["error"]["message"] == "data_parallel_rank 7 is out of range [0, 1)."
        async with http.get(server.url + f"/v1/responses/{queued['id']}") as r:
            assert r.status == 200 and (await r.json())["status"] == "queued"
        assert not server.engine.sim.active
