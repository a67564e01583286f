"""LoRA adapters in a cluster: a cluster file gives each instance its adapters (vLLM's --enable-lora and
--lora-modules among its flags), the router sends a request naming one only to the instances that serve it,
the front door and each instance's own port list them as vLLM pods do, an unknown one gets vLLM's 404, and
a served cluster times adapter requests as an offline replay of the same arrivals does; `serve` checks the
adapters' files as vLLM does. Runtime loads: test_cluster_lora_runtime.py. Virtual time only."""
from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import aiohttp
import pytest

from emulator.cluster import build_cluster
from emulator.request import Request
from loadgen.replay import replay
from profiles.cluster_file import ClusterFileError, read_cluster_file
from served_trace import differences, send_paced, write_served_trace
from server.testing import free_port, running_server

BASE = "meta-llama/Llama-3.1-8B"


def _two_pods(port_a: int | None = None, port_b: int | None = None, max_loras: int = 1) -> str:
    """Pod a serves sql and chat, pod b chat alone (as an instance-level JSON entry), pod c no adapter."""
    ports = [f", port: {p}" if p else "" for p in (port_a, port_b)]
    return f"""
routing: least_loaded
engine: {{enable-lora: true, max-loras: {max_loras}, max-model-len: 2048, max-num-seqs: 16}}
instances:
  - {{name: a, model: {BASE}, hardware: H100, lora-modules: [sql=/adapters/sql, chat=/adapters/chat]{ports[0]}}}
  - name: b
    model: {BASE}
    hardware: H100
    engine:
      lora-modules:
        - {{name: chat, path: /adapters/chat}}
    {"port: " + str(port_b) if port_b else ""}
  - {{name: c, model: {BASE}, hardware: H100, enable-lora: false}}
"""


def _cluster(tmp_path: Path, text: str):
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    return read_cluster_file(path)[0], path


# -- the cluster file ------------------------------------------------------------------------------------
def test_instances_serve_the_adapters_their_lora_modules_name_each_numbering_its_own(tmp_path):
    spec, _ = _cluster(tmp_path, _two_pods())
    sim = build_cluster(spec)
    assert {n: (a.lora_id, a.path, a.base_model_name) for n, a in sim.adapters.adapters.items()} == {
        "sql": (1, "/adapters/sql", BASE), "chat": (2, "/adapters/chat", BASE)}  # as the first pod serving each
    assert {n: a.lora_id for n, a in sim.adapters.pod("b").adapters.items()} == {"chat": 1}  # b's own counter
    assert sim.adapters.serving("sql") == ["a"] and sim.adapters.serving("chat") == ["a", "b"]
    assert [i.deployment.config.lora is not None for i in sim.instances] == [True, True, False]
    # instances with the same flags and other adapters still share one deployment (adapters are not priced)
    assert spec.instances[0].deployment is spec.instances[1].deployment


@pytest.mark.parametrize("instance, message", [
    ("{name: x, model: M, hardware: H100, lora-modules: [s=/a]}",
     "lora-modules: Call to add_lora method failed: LoRA is not enabled. Use --enable-lora to enable LoRA."),
    ("{name: x, model: M, hardware: H100, enable-lora: true, lora-modules: [s=/a, s=/b]}",
     "The lora adapter 's' has already been loaded."),
    ("{name: x, model: M, hardware: H100, enable-lora: true, lora-modules: ['{\"name\": \"s\"}']}",
     "Invalid fields for --lora-modules"),
    ("{name: x, model: M, hardware: H100, enable-lora: true, lora-modules: [3]}",
     "expected name=path, or a mapping"),
    ("{name: x, model: M, hardware: H100, enable-lora: true, lora-modules: [sql=/a]}\n"
     "  - {name: y, model: M, hardware: H100, enable-lora: true, lora-modules: [sql=/b]}",
     "one name must be one adapter"),
    ("{name: x, model: M, hardware: H100, enable-lora: true, lora-modules: [M=/a]}",
     "The lora adapter 'M' conflicts with a served base model."),
])
def test_a_cluster_files_bad_adapters_are_named_at_their_line(tmp_path, instance, message):
    text = "instances:\n  - " + instance.replace("M", BASE) + "\n"
    with pytest.raises(ClusterFileError, match=None) as caught:
        _cluster(tmp_path, text)
    assert message.replace("M", BASE) in str(caught.value)
    assert str(caught.value).startswith(str(tmp_path / "cluster.yaml") + ":")


NIXL = "kv-transfer-config: {kv_connector: NixlConnector, kv_role: kv_"


@pytest.mark.parametrize("prefill_modules, decode_modules, mixed_modules, missing, line, field", [
    ("", ", lora-modules: [s=/a]", "", "prefill", 5, "instances[1].lora-modules[0]"),
    (", lora-modules: [s=/a]", "", "", "decode", 4, "instances[0].lora-modules[0]"),
    ("", "", ", lora-modules: [s=/a]", "prefill", 6, "instances[2].lora-modules[0]"),  # a mixed one is no P/D side
])
def test_an_adapter_the_pd_proxy_cannot_send_to_both_sides_is_named_at_its_line(
        tmp_path, prefill_modules, decode_modules, mixed_modules, missing, line, field):
    text = f"""
engine: {{enable-lora: true}}
instances:
  - {{name: p, model: {BASE}, hardware: H100, {NIXL}producer}}{prefill_modules}}}
  - {{name: d, model: {BASE}, hardware: H100, {NIXL}consumer}}{decode_modules}}}
  - {{name: m, model: {BASE}, hardware: H100{mixed_modules}}}
"""
    with pytest.raises(ClusterFileError) as caught:
        _cluster(tmp_path, text)
    assert str(caught.value) == (
        f"{tmp_path / 'cluster.yaml'}:{line}: {field}: LoRA adapter 's' runs on {BASE}, which the cluster's P/D "
        f"proxy serves, but no {missing} instance serves the adapter: a request naming it would have no {missing} "
        f"pod to go to")


def test_serve_checks_a_cluster_files_adapters_on_disk_as_vllm_serve_and_names_the_entrys_line(tmp_path):
    from server.serve import load_target
    from server.testing import serve_args
    for name, rank in (("fits", 16), ("wide", 64)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"r": rank, "bias": "none"}))

    def cluster(entries: str, flags: str = "") -> Path:
        path = tmp_path / "cluster.yaml"
        path.write_text(f"engine: {{enable-lora: true{flags}}}\ninstances:\n  - name: a\n    model: {BASE}\n"
                        f"    hardware: H100\n    lora-modules:\n{entries}")
        return path

    fine = f"      - fits={tmp_path / 'fits'}\n      - hub=org/hub-lora\n"  # a relative path: a Hugging Face repo
    read_cluster_file(cluster(fine), check_adapter_files=True)
    path = cluster(fine + "      - gone=/nonexistent/adapters/gone\n")
    read_cluster_file(path)  # a replay reads no adapter
    with pytest.raises(ClusterFileError) as caught:
        read_cluster_file(path, check_adapter_files=True)
    assert str(caught.value) == (f"{path}:9: instances[0].lora-modules[2]: Loading lora gone failed: No adapter "
                                 f"found for /nonexistent/adapters/gone")
    with pytest.raises(ClusterFileError) as caught:  # serve's reading of --cluster checks them
        load_target(serve_args("--cluster", str(path)))
    assert str(caught.value).startswith(f"{path}:9: ")
    path = cluster(fine + f"      - {{name: wide, path: {tmp_path / 'wide'}}}\n")
    with pytest.raises(ClusterFileError) as caught:
        read_cluster_file(path, check_adapter_files=True)
    assert str(caught.value) == (f"{path}:9: instances[0].lora-modules[2]: Call to add_lora method failed: LoRA "
                                 f"rank 64 is greater than max_lora_rank 16.")
    read_cluster_file(cluster(fine + f"      - wide={tmp_path / 'wide'}\n", ", max-lora-rank: 64"),
                      check_adapter_files=True)


# -- routing ---------------------------------------------------------------------------------------------
def test_a_request_naming_an_adapter_goes_only_to_instances_that_serve_it(tmp_path):
    spec, _ = _cluster(tmp_path, _two_pods())
    sim = build_cluster(spec)
    sql, chat = sim.adapters.get("sql"), sim.adapters.get("chat")
    requests = [Request(f"r{i}", 64, 8, arrival_time=i * 0.001, model=BASE, lora=(sql, chat, None)[i % 3])
                for i in range(30)]
    sim.run(requests)
    went = {}
    for r in requests:
        went.setdefault(r.lora.name if r.lora else None, set()).add(sim.instance_of[r.engine_index].name)
    assert went["sql"] == {"a"} and went["chat"] == {"a", "b"}
    assert "c" in went[None] <= {"a", "b", "c"}  # the base model's go anywhere: c, serving no adapter, takes them
    # each pod runs a request with its own lora_int_id (a numbers chat 2, after sql; b numbers it 1)
    assert {(sim.instance_of[r.engine_index].name, r.lora.lora_id) for r in requests
            if r.lora and r.lora.name == "chat"} == {("a", 2), ("b", 1)}


# -- the server ------------------------------------------------------------------------------------------
async def test_the_front_door_and_each_pod_list_their_adapters_route_by_them_and_404_an_unknown_one(tmp_path):
    port_a, port_b = free_port(), free_port()
    spec, _ = _cluster(tmp_path, _two_pods(port_a, port_b))
    async with running_server("--speed", "200", deployment=spec) as server:
        done = []
        server.engine.sim.add_finish_listener(done.append)
        front, pod_a, pod_b = server.urls
        async with aiohttp.ClientSession() as http:
            async def cards(url):
                async with http.get(url + "/v1/models") as r:
                    return [(c["id"], c["root"], c["parent"]) for c in (await r.json())["data"]]
            assert await cards(front) == [(BASE, BASE, None), ("sql", "/adapters/sql", BASE),
                                          ("chat", "/adapters/chat", BASE)]
            assert await cards(pod_a) == [(BASE, BASE, None), ("sql", "/adapters/sql", BASE),
                                          ("chat", "/adapters/chat", BASE)]
            assert await cards(pod_b) == [(BASE, BASE, None), ("chat", "/adapters/chat", BASE)]

            async def complete(url, model):
                async with http.post(url + "/v1/completions", json={"model": model, "prompt": list(range(100, 164)),
                                                                    "max_tokens": 3, "ignore_eos": True}) as r:
                    return r.status, await r.json()
            answers = await asyncio.gather(*(complete(front, m) for m in ["sql", "chat", BASE] * 4))
            assert all(status == 200 for status, _ in answers)
            assert [body["model"] for _, body in answers] == ["sql", "chat", BASE] * 4  # named after the adapter
            status, body = await complete(pod_b, "sql")  # a pod that does not serve it: vLLM's 404
            assert status == 404 and body["error"]["message"] == \
                f"The model `sql` does not exist. Valid aliases: {BASE}."
            status, body = await complete(front, "nope")
            assert status == 404 and body["error"]["message"].startswith("The model `nope` does not exist.")
    went = {}
    for r in done:
        went.setdefault(r.lora.name if r.lora else None, set()).add(server.engine.sim.instance_of[r.engine_index].name)
    assert went["sql"] == {"a"} and went["chat"] <= {"a", "b"}
    assert all(r.model == BASE for r in done)  # the engine runs the base model, with the adapter


async def test_lora_modules_on_the_command_line_of_a_cluster_are_refused():
    from server.serving import frontend_switches
    from server.testing import serve_args
    with pytest.raises(ValueError, match="give each instance its own lora-modules in the cluster file"):
        frontend_switches(serve_args("--cluster", "x.yaml", "--lora-modules", "a=/b"))


async def test_a_served_cluster_with_adapters_times_requests_as_a_replay_of_the_same_arrivals(tmp_path):
    spec, path = _cluster(tmp_path, _two_pods())
    rng = random.Random(3)
    workload = [{"id": f"r{i}", "prompt": [rng.randrange(1000, 30000) for _ in range(rng.randrange(20, 400))],
                 "max_tokens": rng.randrange(1, 60), "model": rng.choice(["sql", "chat", BASE]),
                 "gap": rng.expovariate(1 / 0.004)} for i in range(36)]
    log_path = tmp_path / "server.jsonl"
    async with running_server("--speed", "25", "--request-log", str(log_path), deployment=spec) as server:
        outputs = await send_paced(server.url, workload, lambda item: {
            "model": item["model"], "prompt": item["prompt"], "max_tokens": item["max_tokens"], "ignore_eos": True,
            "return_token_ids": True})
    served = [json.loads(line) for line in log_path.read_text().splitlines()]
    trace = tmp_path / "trace.jsonl"  # each line names its adapter, as a multi-LoRA trace does
    write_served_trace(trace, served, workload, outputs,
                       extra=lambda item: {} if item["model"] == BASE else {"lora": item["model"]})
    replay(str(trace), read_cluster_file(path)[0], tmp_path / "replay")
    replayed = [json.loads(line) for line in (tmp_path / "replay" / "requests.jsonl").read_text().splitlines()]
    assert {r["lora"] for r in replayed} == {"sql", "chat", None}
    by_id = {f"cmpl-{w['id']}-0": w for w in workload}
    for r in replayed:
        asked = by_id[r["request_id"]]["model"]
        assert r["lora"] == (None if asked == BASE else asked)
    assert not differences(served, replayed)  # a replay may add fields (energy, instance, lora), not change any
