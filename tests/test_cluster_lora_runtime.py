"""Runtime LoRA loads on a served cluster (VLLM_ALLOW_RUNTIME_LORA_UPDATING=1), as a fleet of vLLM pods behind
a router: a load on a pod's own port makes that pod serve the adapter (the front door lists it and routes
requests for it there), an unload takes it away; a load at the front door goes to every pod of the pool with
--enable-lora (all or none), an unload there to every pod serving the name. Each pod numbers its own
adapters, as each vLLM front end counts its own lora_int_ids; an unload lets running requests finish, as
vLLM's does; a restored pod starts with its lora-modules alone. Prefill and decode pods load adapters as mixed ones
do, and the cluster's P/D proxy finds them on both sides. Virtual time only."""
from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from emulator.cluster import build_cluster
from emulator.request import Request
from profiles.cluster_file import read_cluster_file
from server.lora import FrontDoorAdapters, pod_adapters
from server.testing import free_port, running_server

BASE = "meta-llama/Llama-3.1-8B"
NOT_ENABLED = "Call to add_lora method failed: LoRA is not enabled. Use --enable-lora to enable LoRA."


@pytest.fixture
def runtime_lora(monkeypatch):
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "1")


def _cluster(tmp_path: Path, ports: bool = True):
    """Pods a (sql, chat) and b (chat) with --enable-lora, c without; each on a port of its own."""
    port = {name: f", port: {free_port()}" if ports else "" for name in "abc"}
    path = tmp_path / "cluster.yaml"
    path.write_text(f"""
routing: round_robin
engine: {{enable-lora: true, max-loras: 2, max-model-len: 2048, max-num-seqs: 16}}
instances:
  - {{name: a, model: {BASE}, hardware: H100, lora-modules: [sql=org/sql, chat=org/chat]{port['a']}}}
  - {{name: b, model: {BASE}, hardware: H100, lora-modules: [chat=org/chat]{port['b']}}}
  - {{name: c, model: {BASE}, hardware: H100, enable-lora: false{port['c']}}}
""")
    return read_cluster_file(path)[0]


class Client:
    def __init__(self, http: aiohttp.ClientSession) -> None:
        self.http = http

    async def post(self, url: str, route: str, body: dict) -> tuple[int, str]:
        async with self.http.post(url + route, json=body) as r:
            return r.status, await r.text()

    async def load(self, url: str, name: str, path: str, **extra) -> tuple[int, str]:
        return await self.post(url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path, **extra})

    async def unload(self, url: str, name: str) -> tuple[int, str]:
        return await self.post(url, "/v1/unload_lora_adapter", {"lora_name": name})

    async def cards(self, url: str) -> list[tuple]:
        async with self.http.get(url + "/v1/models") as r:
            return [(c["id"], c["root"], c["parent"]) for c in (await r.json())["data"]]

    async def complete(self, url: str, model: str, max_tokens: int = 3) -> tuple[int, dict]:
        async with self.http.post(url + "/v1/completions", json={"model": model, "prompt": list(range(100, 164)),
                                                                 "max_tokens": max_tokens, "ignore_eos": True}) as r:
            return r.status, await r.json()


def _ids(sim, instance: str) -> dict[str, int]:
    return {name: a.lora_id for name, a in sim.adapters.pod(instance).adapters.items()}


def _error(answer: tuple[int, str]) -> tuple[int, str]:
    status, text = answer
    return status, json.loads(text)["error"]["message"]


async def test_a_load_on_a_pods_port_is_served_there_and_routed_to_by_the_front_door(runtime_lora, tmp_path):
    async with running_server("--speed", "500", deployment=_cluster(tmp_path)) as server, \
            aiohttp.ClientSession() as http:
        client, sim = Client(http), server.engine.sim
        done = []
        sim.add_finish_listener(done.append)
        front, a, b, c = server.urls
        assert await client.load(b, "math", "org/math") == (200, "Success: LoRA adapter 'math' added successfully.")
        assert ("math", "org/math", BASE) in await client.cards(front)
        assert ("math", "org/math", BASE) in await client.cards(b)
        assert "math" not in [card[0] for card in await client.cards(a)]
        answers = [await client.complete(front, "math") for _ in range(4)]
        assert [(status, body["model"]) for status, body in answers] == [(200, "math")] * 4
        assert {(sim.instance_of[r.engine_index].name, r.lora.lora_id) for r in done} == {("b", 2)}  # b's own id
        status, body = await client.complete(a, "math")  # a pod that does not serve it
        assert (status, body["error"]["message"]) == (404, f"The model `math` does not exist. Valid aliases: {BASE}.")

        # a name nobody serves: the front door answers it itself (no pod's counter moves); a pod takes an id
        assert (await client.complete(front, "nope"))[0] == 404
        assert (await client.complete(b, "nope"))[0] == 404  # b: 3, its resolver attempt
        assert await client.load(b, "poem", "org/poem") == (200, "Success: LoRA adapter 'poem' added successfully.")
        assert _ids(sim, "b") == {"chat": 1, "math": 2, "poem": 4} and _ids(sim, "a") == {"sql": 1, "chat": 2}

        assert await client.unload(b, "math") == (200, "Success: LoRA adapter 'math' removed successfully.")
        assert "math" not in [card[0] for card in await client.cards(front)]
        status, body = await client.complete(front, "math")
        assert (status, body["error"]["message"]) == (404, f"The model `math` does not exist. Valid aliases: {BASE}.")
        assert _error(await client.load(c, "math", "org/math")) == (500, NOT_ENABLED)  # c runs no adapter


async def test_a_load_at_the_front_door_goes_to_every_lora_pod_of_the_pool_all_or_none(runtime_lora, tmp_path):
    async with running_server("--speed", "500", deployment=_cluster(tmp_path)) as server, \
            aiohttp.ClientSession() as http:
        client, sim = Client(http), server.engine.sim
        done = []
        sim.add_finish_listener(done.append)
        front, a, b, c = server.urls
        assert await client.load(front, "ext", "org/ext") == (200, "Success: LoRA adapter 'ext' added successfully.")
        assert sim.adapters.serving("ext") == ["a", "b"]  # c has no --enable-lora: never gets it
        assert (_ids(sim, "a")["ext"], _ids(sim, "b")["ext"]) == (3, 2)  # each pod numbers it as its own
        for pod in (front, a, b):
            assert ("ext", "org/ext", BASE) in await client.cards(pod)
        assert "ext" not in [card[0] for card in await client.cards(c)]
        assert [(await client.complete(front, "ext"))[0] for _ in range(6)] == [200] * 6
        assert {sim.instance_of[r.engine_index].name for r in done} == {"a", "b"}

        # one pod's refusal is the answer, and no pod loads it
        assert _error(await client.load(front, "sql", "org/sql")) == (
            400, "The lora adapter 'sql' has already been loaded. If you want to load the adapter in place, set "
                 "'load_inplace' to True.")
        assert sim.adapters.serving("sql") == ["a"]
        assert (await client.load(front, "sql", "org/sql", load_inplace=True))[0] == 200
        assert sim.adapters.serving("sql") == ["a", "b"] and _ids(sim, "a")["sql"] == 1  # in place: its id kept
        assert _error(await client.load(front, BASE, "org/x")) == (
            400, f"The lora adapter '{BASE}' conflicts with a served base model.")

        assert await client.unload(front, "chat") == (200, "Success: LoRA adapter 'chat' removed successfully.")
        assert sim.adapters.serving("chat") == []
        assert _error(await client.unload(front, "chat")) == (404, "The lora adapter 'chat' cannot be found.")
        assert _error(await client.unload(front, "")) == (
            400, "'lora_name' needs to be provided to unload a LoRA adapter.")


async def test_a_front_door_load_with_no_lora_pod_in_the_pool_fails_as_vllms_engine(runtime_lora, tmp_path):
    path = tmp_path / "plain.yaml"
    path.write_text(f"instances:\n  - {{name: p, model: {BASE}, hardware: H100}}\n"
                    f"  - {{name: q, model: {BASE}, hardware: H100}}\n")
    async with running_server("--speed", "500", deployment=read_cluster_file(path)[0]) as server, \
            aiohttp.ClientSession() as http:
        assert _error(await Client(http).load(server.url, "x", "org/x")) == (500, NOT_ENABLED)


async def test_an_unload_lets_the_requests_running_with_the_adapter_finish(runtime_lora, tmp_path):
    async with running_server("--speed", "500", deployment=_cluster(tmp_path)) as server, \
            aiohttp.ClientSession() as http:
        client, sim = Client(http), server.engine.sim
        front = server.url
        payload = {"model": "chat", "prompt": list(range(100, 164)), "max_tokens": 40, "ignore_eos": True,
                   "stream": True}
        async with http.post(front + "/v1/completions", json=payload) as r:
            assert r.status == 200
            first = await r.content.readline()
            assert json.loads(first.removeprefix(b"data: "))["model"] == "chat"
            assert await client.unload(front, "chat") == (200, "Success: LoRA adapter 'chat' removed successfully.")
            rest = (await r.read()).decode().split("\n\n")
        chunks = [json.loads(e.removeprefix("data: ")) for e in rest if e.startswith("data: {")]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length" and {c["model"] for c in chunks} == {"chat"}
        assert rest[-2] == "data: [DONE]"
        assert (await client.complete(front, "chat"))[0] == 404
        assert sim.adapters.serving("chat") == []


def test_each_pod_runs_a_request_with_its_own_adapter_numbering_and_path(tmp_path):
    sim = build_cluster(_cluster(tmp_path, ports=False))
    front = FrontDoorAdapters(sim)
    front.add_base_names([BASE])
    # one name loaded on two pods from two paths (each pod loads what it is told): each runs its own
    pod_adapters(sim, sim.instance("a")).load("v", "org/v1")
    pod_adapters(sim, sim.instance("b")).load("v", "org/v2")
    asked = front.get("v")  # what the front door hands a request: the first pod's
    assert (asked.lora_id, asked.path) == (3, "org/v1")
    requests = [Request(f"r{i}", 64, 4, arrival_time=i * 0.001, model=BASE, lora=asked) for i in range(6)]
    sim.run(requests)
    ran = {(sim.instance_of[r.engine_index].name, r.lora.lora_id, r.lora.path) for r in requests}
    assert ran == {("a", 3, "org/v1"), ("b", 2, "org/v2")}


def test_a_restored_pod_starts_with_its_lora_modules_alone(tmp_path):
    sim = build_cluster(_cluster(tmp_path, ports=False))
    front = FrontDoorAdapters(sim)
    front.add_base_names([BASE])
    front.load("ext", "org/ext")
    pod_adapters(sim, sim.instance("b")).resolve_unknown()
    assert _ids(sim, "b") == {"chat": 1, "ext": 2}
    sim.fail_instance("b")
    sim.restore_instance("b")
    assert _ids(sim, "b") == {"chat": 1} and sim.adapters.pod("b").last_id == 1  # its counter restarts too
    assert sim.adapters.serving("ext") == ["a"]


def test_an_unloaded_adapter_keeps_running_the_requests_that_have_it(tmp_path):
    sim = build_cluster(_cluster(tmp_path, ports=False))
    front = FrontDoorAdapters(sim)
    front.add_base_names([BASE])
    running = Request("running", 64, 200, arrival_time=0.0, model=BASE, lora=front.get("chat"))
    sim.submit(running)
    sim.advance(0.05)
    assert running.num_output_tokens > 0 and not running.status.is_finished
    front.unload("chat")  # vLLM drops the name from its front end; the engine keeps the adapter of its requests
    sim.advance(60.0)
    assert running.status.is_finished and running.num_output_tokens == 200 and running.lora.name == "chat"


def _pd_cluster(tmp_path: Path):
    """Prefill pods p0 and p1, decode pod d0, all with --enable-lora and no adapter; each on a port of its own."""
    nixl = "kv-transfer-config: {kv_connector: NixlConnector, kv_role: kv_"
    path = tmp_path / "pd.yaml"
    path.write_text(f"routing: round_robin\nengine: {{enable-lora: true, max-model-len: 2048}}\ninstances:\n"
                    f"  - {{name: p0, model: {BASE}, hardware: H100, port: {free_port()}, {nixl}producer}}}}\n"
                    f"  - {{name: p1, model: {BASE}, hardware: H100, port: {free_port()}, {nixl}producer}}}}\n"
                    f"  - {{name: d0, model: {BASE}, hardware: H100, port: {free_port()}, {nixl}consumer}}}}\n")
    return read_cluster_file(path)[0]


def _pd_sides(done: list[Request], sim) -> list[tuple[str, str, int]]:
    """(instance, adapter, its id there) of each finished engine request placed on a pod, sorted."""
    return sorted((sim.instance_of[r.engine_index].name, r.lora.name, r.lora.lora_id) for r in done
                  if r.engine_index is not None)


async def test_a_front_door_load_on_a_pd_pool_goes_to_its_prefill_and_decode_pods(runtime_lora, tmp_path):
    async with running_server("--speed", "500", deployment=_pd_cluster(tmp_path)) as server, \
            aiohttp.ClientSession() as http:
        client, sim = Client(http), server.engine.sim
        done: list[Request] = []
        sim.add_finish_listener(done.append, prefills=True)
        front, p0, p1, d0 = server.urls
        assert await client.load(d0, "own", "org/own") == (200, "Success: LoRA adapter 'own' added successfully.")
        assert await client.load(front, "ext", "org/ext") == (200, "Success: LoRA adapter 'ext' added successfully.")
        assert sim.adapters.serving("ext") == ["p0", "p1", "d0"]
        assert (_ids(sim, "p0"), _ids(sim, "d0")) == ({"ext": 1}, {"own": 1, "ext": 2})  # each pod's own ids
        for url in (front, p0, d0):
            assert ("ext", "org/ext", BASE) in await client.cards(url)
        answers = [await client.complete(front, "ext") for _ in range(2)]
        assert [(status, body["model"]) for status, body in answers] == [(200, "ext")] * 2
        assert _pd_sides(done, sim) == [("d0", "ext", 2), ("d0", "ext", 2), ("p0", "ext", 1), ("p1", "ext", 1)]

        assert _error(await client.load(front, "ext", "org/ext"))[0] == 400  # loaded already: no pod loads again
        assert await client.unload(front, "ext") == (200, "Success: LoRA adapter 'ext' removed successfully.")
        assert sim.adapters.serving("ext") == [] and _ids(sim, "d0") == {"own": 1}
        status, body = await client.complete(front, "ext")
        assert (status, body["error"]["message"]) == (404, f"The model `ext` does not exist. Valid aliases: {BASE}.")


async def test_loads_on_a_prefill_and_a_decode_pods_ports_route_pd_requests_to_them(runtime_lora, tmp_path):
    async with running_server("--speed", "500", deployment=_pd_cluster(tmp_path)) as server, \
            aiohttp.ClientSession() as http:
        client, sim = Client(http), server.engine.sim
        done: list[Request] = []
        sim.add_finish_listener(done.append, prefills=True)
        front, p0, p1, d0 = server.urls
        for url in (p1, d0):
            assert await client.load(url, "sql", "org/sql") == (200, "Success: LoRA adapter 'sql' added successfully.")
        assert sim.adapters.serving("sql") == ["p1", "d0"]
        assert "sql" not in [card[0] for card in await client.cards(p0)]
        answers = [await client.complete(front, "sql") for _ in range(3)]  # round robin would take p0 in turn
        assert [(status, body["model"]) for status, body in answers] == [(200, "sql")] * 3
        assert _pd_sides(done, sim) == [("d0", "sql", 1)] * 3 + [("p1", "sql", 1)] * 3

        done.clear()
        assert await client.unload(d0, "sql") == (200, "Success: LoRA adapter 'sql' removed successfully.")
        status, body = await client.complete(front, "sql")  # its prefill runs on p1; no decode pod serves it
        assert (status, body["error"]["message"]) == (404, f"The model `sql` does not exist. Valid aliases: {BASE}.")
        assert _pd_sides(done, sim) == [("p1", "sql", 1)] and len(done) == 2  # its client's request placed nowhere
        assert (server.engine.num_unfinished, len(sim.active), len(sim.pd.group_of), len(sim.transfers.held)) == \
            (0, 0, 0, 0)


def test_a_front_door_load_reads_the_adapter_once_and_checks_it_against_each_pods_rank(tmp_path, monkeypatch):
    import server.lora
    from server.errors import APIError
    path = tmp_path / "ranks.yaml"
    path.write_text(f"engine: {{enable-lora: true, max-model-len: 2048}}\ninstances:\n"
                    f"  - {{name: big, model: {BASE}, hardware: H100, max-lora-rank: 64}}\n"
                    f"  - {{name: small, model: {BASE}, hardware: H100, max-lora-rank: 16}}\n")
    sim = build_cluster(read_cluster_file(path)[0])
    front = FrontDoorAdapters(sim)
    front.add_base_names([BASE])
    reads = []
    real_read = server.lora.read_adapter_files
    monkeypatch.setattr(server.lora, "read_adapter_files", lambda *a: reads.append(a) or real_read(*a))
    adapter = tmp_path / "r32"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 32}))
    with pytest.raises(APIError) as caught:  # the small pod refuses it, so no pod loads it
        front.load("r32", str(adapter))
    assert "LoRA rank 32 is greater than max_lora_rank 16." in caught.value.message
    assert reads == [("r32", str(adapter))] and sim.adapters.serving("r32") == []
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8}))
    reads.clear()
    front.load("r32", str(adapter))
    assert len(reads) == 1 and sim.adapters.serving("r32") == ["big", "small"]
    assert _ids(sim, "big") == _ids(sim, "small") == {"r32": 1}
