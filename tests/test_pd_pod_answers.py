"""What the cluster's own P/D proxy answers when one side's pods do not serve a request's adapter, as a deployment
behind vLLM's toy proxy answers (it picks pods without looking at adapters): an adapter loaded at runtime on a
prefill pod's port alone runs its prefill and then gets the decode pod's 404 (vLLM's NotFoundError, "Valid
aliases": that pod's names); on a decode pod's port alone, a prefill pod's 404 at once. Nothing stays behind
(no request, held KV or lease), and each pod that answered 404 took an id for its resolver attempt, as vLLM's
_check_model does with runtime updating on. Virtual time, and HTTP through the front door."""
from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from emulator.cluster import build_cluster
from emulator.disaggregation import ModelNotFound
from emulator.lora import LoRAAdapter
from emulator.request import Request
from profiles.cluster_file import read_cluster_file
from server.testing import free_port, running_server

BASE = "meta-llama/Llama-3.1-8B"
NIXL = "kv-transfer-config: {kv_connector: NixlConnector, kv_role: kv_"
NOT_FOUND = "The model `{}` does not exist. Valid aliases: " + BASE + "."


def _cluster_file(tmp_path: Path, ports: bool = False) -> Path:
    """Prefill pods p0 and p1, decode pod d0, all with --enable-lora and no adapter."""
    port = {name: f", port: {free_port()}" if ports else "" for name in ("p0", "p1", "d0")}
    path = tmp_path / "pd.yaml"
    path.write_text(f"routing: round_robin\nengine: {{enable-lora: true, max-model-len: 4096}}\ninstances:\n"
                    f"  - {{name: p0, model: {BASE}, hardware: H100{port['p0']}, {NIXL}producer}}}}\n"
                    f"  - {{name: p1, model: {BASE}, hardware: H100{port['p1']}, {NIXL}producer}}}}\n"
                    f"  - {{name: d0, model: {BASE}, hardware: H100{port['d0']}, {NIXL}consumer}}}}\n")
    return path


def _load(sim, pod: str, name: str) -> None:
    """A runtime load of adapter `name` on `pod`'s own port (its next id there)."""
    table = sim.adapters.pod(pod)
    table.adapters[name] = LoRAAdapter(name, table.take_id(), f"org/{name}", BASE)


def _request(sim, name: str, adapter: str, length: int = 1500) -> Request:
    return Request(name, length, 16, max_tokens=16, prompt_token_ids=np.arange(length, dtype=np.int64) + 7,
                   model=BASE, lora=sim.adapters.get(adapter))


def _prefilling(tmp_path: Path, pods: tuple[str, ...], adapter: str):
    """A cluster whose `pods` serve `adapter`, and a request under it whose prefill is under way."""
    sim = build_cluster(read_cluster_file(_cluster_file(tmp_path))[0])
    for pod in pods:
        _load(sim, pod, adapter)
    r = _request(sim, "r", adapter, length=3000)
    sim.submit(r)
    sim.advance(0.001)
    assert sim.pd.in_prefill(r)
    return sim, r


def _nothing_left(sim) -> None:
    assert not sim.active and not sim.transfers.held and not sim.pd.group_of and not sim.pd.refused
    assert not sim.pd.prefill_of and not sim.pd.client_of
    for engine in sim.engines:
        assert engine.is_idle and engine.kv.num_free_blocks == engine.num_gpu_blocks - 1


def test_an_adapter_no_decode_pod_serves_runs_its_prefill_then_gets_the_decode_pods_404(tmp_path):
    sim = build_cluster(read_cluster_file(_cluster_file(tmp_path))[0])
    _load(sim, "p1", "sql")
    ended, prefills = [], []
    seen = {}  # what a finish listener (a server) reads of the decode pod's answer as each request ends

    def finished(request: Request) -> None:
        (prefills if request.request_id.endswith("@prefill") else ended).append(request)
        seen[request.request_id] = sim.pd.refused.get(request.request_id)
    sim.add_finish_listener(finished, prefills=True)
    a, b = _request(sim, "a", "sql"), _request(sim, "b", "sql", length=900)
    sim.submit_group([a, b])
    sim.run([])
    assert [(p.request_id, p.finish_reason, sim.instance_of[p.engine_index].name) for p in prefills] == \
        [("a@prefill", "length", "p1"), ("b@prefill", "length", "p1")]  # the prefill pod answered for both
    assert [(r.request_id, r.finish_reason, r.engine_index) for r in ended] == \
        [("a", "error", None), ("b", "error", None)]
    assert a.error == b.error == NOT_FOUND.format("sql")  # the error its client reads (a replay's records too)
    refusal = seen["a"]
    assert isinstance(refusal, ModelNotFound) and seen["b"] is refusal and refusal.instance.name == "d0"
    assert sim.routing_decisions["d0"] == 1  # one HTTP request to the decode pod
    _nothing_left(sim)


def test_an_adapter_unloaded_from_the_decode_pods_while_its_prefill_runs_gets_their_404(tmp_path):
    sim, r = _prefilling(tmp_path, ("p0", "d0"), "chat")
    del sim.adapters.pod("d0").adapters["chat"]  # unloaded on the decode pod's port meanwhile
    sim.run([])
    assert r.finish_reason == "error" and r.error == NOT_FOUND.format("chat")
    _nothing_left(sim)


def test_an_adapter_no_prefill_pod_serves_gets_a_prefill_pods_404_and_nothing_runs(tmp_path):
    sim = build_cluster(read_cluster_file(_cluster_file(tmp_path))[0])
    _load(sim, "d0", "dec")
    a, b = _request(sim, "a", "dec"), _request(sim, "b", "dec")
    with pytest.raises(ModelNotFound) as caught:
        sim.submit_group([a, b])
    assert str(caught.value) == NOT_FOUND.format("dec") and caught.value.instance.name == "p0"  # round robin's
    assert sim.routing_decisions == {"p0": 1}
    assert a.engine_index is None and b.engine_index is None
    _nothing_left(sim)


def test_a_retry_after_the_only_prefill_pod_serving_the_adapter_fails_ends_the_request(tmp_path):
    """A router's retry on another prefill pod would get its 404: the request fails (no retry), leaving nothing."""
    sim, r = _prefilling(tmp_path, ("p1", "d0"), "sql")
    assert sim.fail_instance("p1", reroute=True) == [r]
    assert r.finish_reason == "error"
    sim.run([])
    _nothing_left(sim)


@pytest.fixture
def runtime_lora(monkeypatch):
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "1")


async def test_over_http_each_side_that_lacks_the_adapter_answers_its_404(runtime_lora, tmp_path):
    spec = read_cluster_file(_cluster_file(tmp_path, ports=True))[0]
    async with running_server("--speed", "500", deployment=spec) as server, aiohttp.ClientSession() as http:
        sim = server.engine.sim
        front, p0, p1, d0 = server.urls
        prefills: list[Request] = []
        sim.add_finish_listener(lambda r: prefills.append(r) if r.request_id.endswith("@prefill") else None,
                                prefills=True)

        async def post(url: str, route: str, body: dict) -> tuple[int, str]:
            async with http.post(url + route, json=body) as r:
                return r.status, await r.text()

        assert (await post(p1, "/v1/load_lora_adapter", {"lora_name": "pre", "lora_path": "org/pre"}))[0] == 200
        assert (await post(d0, "/v1/load_lora_adapter", {"lora_name": "dec", "lora_path": "org/dec"}))[0] == 200
        ids = {pod: sim.adapters.pod(pod).last_id for pod in ("p0", "p1", "d0")}
        completion = {"prompt": [list(range(100, 900)), list(range(100, 150))], "max_tokens": 4}

        status, text = await post(front, "/v1/completions", dict(completion, model="pre"))
        assert (status, json.loads(text)) == (404, _body("pre"))
        assert [(p.finish_reason, sim.instance_of[p.engine_index].name) for p in prefills] == [("length", "p1")] * 2
        # the decode pod's resolver attempt took one id there, for the one HTTP request it got
        assert {pod: sim.adapters.pod(pod).last_id - ids[pod] for pod in ids} == {"p0": 0, "p1": 0, "d0": 1}

        status, text = await post(front, "/v1/completions", dict(completion, model="pre", stream=True))
        assert status == 200  # (the stream opens once the prefill pod answered: the 404 is its error event)
        assert text == f'data: {json.dumps(_body("pre"))}\n\ndata: [DONE]\n\n'

        prefills.clear()
        for stream in (False, True):
            status, text = await post(front, "/v1/completions", dict(completion, model="dec", stream=stream))
            assert (status, json.loads(text)) == (404, _body("dec"))
        assert prefills == []  # no prefill pod ran it
        assert {pod: sim.adapters.pod(pod).last_id - ids[pod] for pod in ids} == {"p0": 1, "p1": 1, "d0": 2}
        assert (server.engine.num_unfinished, len(sim.active), len(sim.pd.group_of), len(sim.transfers.held)) == \
            (0, 0, 0, 0)
        assert all(e.kv.num_free_blocks == e.num_gpu_blocks - 1 for e in sim.engines)


def _body(model: str) -> dict:
    """vLLM's 404 error body for a model a pod does not serve."""
    return {"error": {"message": NOT_FOUND.format(model), "type": "NotFoundError", "param": "model", "code": 404}}
