"""LoRA adapters on prefill and decode instances: vLLM's P/D proxies send the request's `model` (the adapter's
name) to both pods, so the cluster's own proxy runs a request's prefill and its decode with its adapter, each
on an instance serving it and priced there as on a mixed instance (max_loras, adapter-keyed prefix blocks).
Virtual time only; a cluster file that cannot serve an adapter on both sides: test_cluster_lora.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from emulator.cluster import build_cluster
from emulator.request import Request
from profiles.cluster_file import read_cluster_file

BASE = "meta-llama/Llama-3.1-8B"
NIXL = "kv-transfer-config: {kv_connector: NixlConnector, kv_role: kv_"


def pd_sim(tmp_path: Path, adapters: bool = True, max_loras: int = 1):
    """p0 serves no adapter, p1 and d0 serve s and t."""
    modules = ", lora-modules: [s=/adapters/s, t=/adapters/t]" if adapters else ""
    path = tmp_path / "pd-lora.yaml"
    path.write_text(f"""
routing: round_robin
engine: {{enable-lora: true, max-loras: {max_loras}, max-model-len: 8192}}
instances:
  - {{name: p0, model: {BASE}, hardware: H100, {NIXL}producer}}}}
  - {{name: p1, model: {BASE}, hardware: H100, {NIXL}producer}}{modules}}}
  - {{name: d0, model: {BASE}, hardware: H100, {NIXL}consumer}}{modules}}}
""")
    return build_cluster(read_cluster_file(path)[0])


def run(sim, requests: list[Request]) -> dict[str, Request]:
    """Run the requests (arriving at 0) to the end; their prefills, by client request id."""
    prefills: dict[str, Request] = {}
    sim.add_finish_listener(lambda r: prefills.setdefault(r.request_id.removesuffix("@prefill"), r)
                            if r.request_id.endswith("@prefill") else None, prefills=True)
    for request in requests:
        sim.submit(request)
    sim.run([])
    assert not sim.active and not sim.transfers.held and not sim.pd.group_of
    for engine in sim.engines:
        assert engine.is_idle and engine.kv.num_free_blocks == engine.num_gpu_blocks - 1
    return prefills


def request(sim, name: str, adapter: str | None, length: int = 1500, output_len: int = 64) -> Request:
    prompt = np.arange(length, dtype=np.int64) + 7
    return Request(name, length, output_len, max_tokens=output_len, prompt_token_ids=prompt, model=BASE,
                   lora=sim.adapters.get(adapter))


def test_an_adapter_request_runs_its_prefill_and_decode_with_the_adapter_on_pods_serving_it(tmp_path):
    sim = pd_sim(tmp_path)
    r = request(sim, "sql-1", "s")
    prefills = run(sim, [r])
    prefill = prefills["sql-1"]
    assert sim.instance_of[prefill.engine_index].name == "p1"  # p0 does not serve s (round robin's turn was p0)
    assert prefill.lora.name == "s" and r.lora.name == "s" and sim.instance_of[r.engine_index].name == "d0"
    assert r.finish_reason == "length" and r.num_external_tokens > 0  # its prompt's KV came from p1


def test_max_loras_holds_on_both_sides(tmp_path):
    """Two requests with two adapters and max_loras 1: the second's prefill waits for the first's on the prefill
    pod, and its decode for the first's on the decode pod; without adapters both run together on each."""
    sim = pd_sim(tmp_path)
    s, t = request(sim, "a", "s"), request(sim, "b", "t")
    prefills = run(sim, [s, t])
    assert prefills["b"].scheduled_time >= prefills["a"].finish_time
    assert t.first_token_time > s.finish_time  # d0 admits t only once s, with the other adapter, has left

    plain = pd_sim(tmp_path, adapters=False)
    s0, t0 = request(plain, "a", None), request(plain, "b", None)
    prefills0 = run(plain, [s0, t0])
    assert prefills0["b"].scheduled_time < prefills0["a"].finish_time
    assert t0.first_token_time < s0.finish_time


def test_the_prefix_cache_keeps_adapters_apart_on_the_prefill_side(tmp_path):
    sim = pd_sim(tmp_path, max_loras=2)
    first, same, other = request(sim, "a", "s"), request(sim, "b", "s"), request(sim, "c", "t")
    run(sim, [first])
    prefills = run(sim, [same, other])
    assert prefills["b"].num_cached_tokens > 1000  # the same adapter's prefix is cached on p1
    assert prefills["c"].num_cached_tokens == 0  # another adapter's blocks are other blocks


async def test_over_http_an_adapter_and_a_prompt_list_go_through_the_clusters_pd_proxy(tmp_path):
    import aiohttp

    from server.testing import running_server
    modules = "lora-modules: [sql=org/sql-lora]"  # (a Hugging Face repo: serve does not read it)
    path = tmp_path / "pd-http.yaml"
    path.write_text(f"""
engine: {{enable-lora: true, max-model-len: 4096}}
instances:
  - {{name: p, model: {BASE}, hardware: H100, {modules}, {NIXL}producer}}}}
  - {{name: d, model: {BASE}, hardware: H100, {modules}, {NIXL}consumer}}}}
""")
    prefills: list[Request] = []
    async with running_server("--cluster", str(path), "--speed", "1000") as server, \
            aiohttp.ClientSession() as http:
        sim = server.engine.sim
        sim.add_finish_listener(lambda r: prefills.append(r) if r.request_id.endswith("@prefill") else None,
                                prefills=True)
        async with http.post(server.url + "/v1/completions", json={
                "model": "sql", "prompt": [list(range(10, 900)), list(range(10, 40))], "max_tokens": 5,
                "ignore_eos": True}) as r:
            status, body = r.status, await r.json()
        async with http.get(server.url + "/v1/models") as r:
            models = {card["id"] for card in (await r.json())["data"]}
        leftovers = (server.engine.num_unfinished, len(sim.active), len(sim.pd.group_of), len(sim.transfers.held),
                     [e.kv.num_free_blocks == e.num_gpu_blocks - 1 for e in sim.engines])
    assert status == 200 and body["model"] == "sql" and len(body["choices"]) == 2
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "length"]
    assert models == {BASE, "sql"}
    assert len(prefills) == 2 and {p.lora.name for p in prefills} == {"sql"}
    assert leftovers == (0, 0, 0, 0, [True, True])
