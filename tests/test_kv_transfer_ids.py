"""The names a P/D prefill's kv_transfer_params give its KV, shaped as vLLM 0.33's NixlConnector gives
them: remote_engine_id is the engine's kv_transfer_config.engine_id (a uuid4 unless configured; a
data-parallel rank appends _dp<rank>), new after a restart unless configured; remote_request_id is the
engine's request id, the client's with 8 random hex characters. Virtual time, plus one served pod."""
from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import aiohttp
import pytest

from emulator.cluster import ClusterSpec, build_cluster
from emulator.config import EngineArgs
from emulator.disaggregation import LostSource, PrefillSource
from emulator.instance import InstanceSpec
from emulator.kv_transfer import ExternalKV
from emulator.request import Request
from profiles.deployment import build_deployment
from server.testing import free_port, running_server

MODEL = "meta-llama/Llama-3.1-8B"
NIXL = "NixlConnector"


def producer(engine_id: str | None = None, dp: int = 1):
    config = {"kv_connector": NIXL, "kv_role": "kv_producer"}
    if engine_id is not None:
        config["engine_id"] = engine_id
    return build_deployment(MODEL, "H100", EngineArgs(max_model_len=16384, data_parallel_size=dp,
                                                      kv_transfer_config=json.dumps(config)))


def cluster(*deployments):
    specs = tuple(InstanceSpec(f"p{i}", d, ("llama",), "mixed", "n0") for i, d in enumerate(deployments))
    return build_cluster(ClusterSpec(specs, "round_robin"))


def engine_ids(sim) -> list[str]:
    return [sim.transfers.engine_id(engine) for engine in sim.engines]


def is_uuid4(text: str) -> bool:
    return str(uuid.UUID(text)) == text and uuid.UUID(text).version == 4


def test_engine_ids_are_uuid4s_unless_configured_and_data_parallel_ranks_append_their_rank():
    sim = cluster(producer(), producer(dp=2), producer("prefill-east"), producer("prefill-west", dp=2))
    plain, rank0, rank1, east, west0, west1 = engine_ids(sim)
    assert is_uuid4(plain)
    base = rank0.removesuffix("_dp0")
    assert is_uuid4(base) and rank1 == f"{base}_dp1" and base != plain  # one uuid per pod, vLLM's EngineCore suffix
    assert (east, west0, west1) == ("prefill-east", "prefill-west_dp0", "prefill-west_dp1")


def prefill(sim, name: str, rid: str, at: float) -> tuple[Request, dict]:
    request = Request(rid, 2000, 1, max_tokens=1, arrival_time=at)
    request.hold_kv = True
    sim.submit(request, instance=sim.instance(name))
    sim.advance(at + 5.0)
    sim.transfers.hold(request, NIXL)
    return request, sim.transfers.held_params(request, "10.0.0.1", 8100)


def test_a_restarted_pod_has_a_new_engine_id_unless_its_config_names_one_and_its_old_kv_is_lost():
    sim = cluster(producer(), producer("prefill-east"))
    _, drawn = prefill(sim, "p0", "a-1", 0.0)
    _, named = prefill(sim, "p1", "b-1", 0.0)
    assert isinstance(sim.transfers.remote_source(named, NIXL), PrefillSource)
    before = engine_ids(sim)
    for name in ("p0", "p1"):
        sim.fail_instance(name)
        sim.restore_instance(name)
    after = engine_ids(sim)
    assert after[0] != before[0] and is_uuid4(after[0])  # vLLM draws a fresh uuid4 at start-up
    assert after[1] == before[1] == "prefill-east"       # a configured engine_id is kept, as vLLM keeps it
    # either way the KV held before the failure is gone: a decode naming it fails its load
    assert isinstance(sim.transfers.remote_source(drawn, NIXL), LostSource)
    assert isinstance(sim.transfers.remote_source(named, NIXL), LostSource)
    _, fresh = prefill(sim, "p1", "b-2", sim.now)  # the restarted pod's own prefills are read as before
    assert fresh["remote_engine_id"] == "prefill-east"
    assert isinstance(sim.transfers.remote_source(fresh, NIXL), PrefillSource)
    reader = Request("read", 2000, 4, arrival_time=sim.now)
    reader.external_kv = ExternalKV(2000, sim.transfers.remote_source(fresh, NIXL))
    sim.submit(reader, instance=sim.instance("p0"))
    sim.advance(sim.now + 30.0)
    assert reader.finish_reason == "length" and reader.num_external_tokens > 0


TO_DECODE = {"do_remote_decode": True, "do_remote_prefill": False}  # a prefill whose KV waits for a decode side


# a prefill's lease on its blocks, in virtual seconds: at --speed 200 NIXL's 30 s would be 0.15 s of wall time,
# which a busy machine can spend between two requests of a test (the held KV would go back early)
LONG_LEASE = "kv_connector_extra_config: {kv_lease_duration: 1000000}"


def one_prefill_pod(tmp_path) -> Path:
    """A cluster file of one NIXL producer answering on its own port."""
    path = tmp_path / "cluster.yaml"
    path.write_text(f"""
engine: {{max-model-len: 4096}}
instances:
  - {{name: p, model: {MODEL}, hardware: H100, port: {free_port()},
     kv-transfer-config: {{kv_connector: NixlConnector, kv_role: kv_producer, {LONG_LEASE}}}}}
""")
    return path


async def test_a_served_prefill_names_its_engine_and_request_as_vllm_does(tmp_path):
    cluster_file = one_prefill_pod(tmp_path)
    body = {"prompt": list(range(100, 400)), "max_tokens": 1, "kv_transfer_params": TO_DECODE}
    async with running_server("--cluster", str(cluster_file), "--speed", "200") as server, \
            aiohttp.ClientSession() as http:
        answers = []
        for _ in range(2):  # the same X-Request-Id twice: two engine requests, told apart by their suffix
            async with http.post(server.urls[1] + "/v1/completions", json=body,
                                 headers={"X-Request-Id": "same"}) as r:
                answers.append((await r.json())["kv_transfer_params"])
        held = set(server.engine.sim.transfers.held)
    first, second = answers
    assert is_uuid4(first["remote_engine_id"]) and second["remote_engine_id"] == first["remote_engine_id"]
    assert all(re.fullmatch(r"cmpl-same-0-[0-9a-f]{8}", a["remote_request_id"]) for a in answers)
    assert first["remote_request_id"] != second["remote_request_id"]
    assert held == {(a["remote_engine_id"], a["remote_request_id"]) for a in answers}


async def test_with_request_id_randomization_disabled_the_engine_keeps_the_clients_id(tmp_path, monkeypatch, caplog):
    """VLLM_DISABLE_REQUEST_ID_RANDOMIZATION=1: vLLM names the engine request (and remote_request_id) by the
    client's id alone. A second request under an id still held (a prefill's KV awaiting its decode side)
    would clash; it gets the suffix after all, with a warning, and both holds are kept and released."""
    monkeypatch.setenv("VLLM_DISABLE_REQUEST_ID_RANDOMIZATION", "1")
    log_file = tmp_path / "requests.jsonl"
    cluster_file = one_prefill_pod(tmp_path)
    body = {"prompt": list(range(100, 400)), "max_tokens": 1, "kv_transfer_params": TO_DECODE}
    async with running_server("--cluster", str(cluster_file), "--speed", "200", "--request-log",
                              str(log_file)) as server, aiohttp.ClientSession() as http:
        answers = []
        for _ in range(2):
            async with http.post(server.urls[1] + "/v1/completions", json=body,
                                 headers={"X-Request-Id": "same"}) as r:
                answers.append((await r.json())["kv_transfer_params"])
        sim = server.engine.sim
        held = set(sim.transfers.held)
        assert held == {(a["remote_engine_id"], a["remote_request_id"]) for a in answers}
        sim.advance(sim.now + 2_000_000.0)  # past every lease: the blocks held go back
        assert all(e.kv.num_free_blocks == e.kv.pool.num_blocks - 1 for e in sim.engines)
    first, second = answers
    assert first["remote_request_id"] == "cmpl-same-0"
    assert re.fullmatch(r"cmpl-same-0-[0-9a-f]{8}", second["remote_request_id"])
    assert "already running" in caplog.text
    logged = [json.loads(line)["request_id"] for line in log_file.read_text().splitlines()]
    assert logged == ["cmpl-same-0", "cmpl-same-0"]  # the request log names them as the client did


def test_a_request_id_randomization_value_vllm_cannot_read_is_a_start_up_error(monkeypatch):
    from server.engine_client import request_id_randomization
    monkeypatch.setenv("VLLM_DISABLE_REQUEST_ID_RANDOMIZATION", "yes")
    with pytest.raises(ValueError, match="reads it as an integer"):
        request_id_randomization()
    monkeypatch.setenv("VLLM_DISABLE_REQUEST_ID_RANDOMIZATION", "0")
    assert request_id_randomization()


async def test_a_decode_pod_reports_its_prefills_cached_tokens_as_vllm_does(tmp_path):
    """vLLM's scheduler puts a finished prefill's cached tokens in its kv_transfer_params
    (remote_prefill_cached_tokens) and the decode side's front end reports them as the response's
    cached_tokens, instead of its own (near 100 %) hit from the transfer."""
    prefill_port, decode_port = free_port(), free_port()
    cluster_file = tmp_path / "cluster.yaml"
    cluster_file.write_text(f"""
engine: {{max-model-len: 4096}}
instances:
  - {{name: p, model: {MODEL}, hardware: H100, port: {prefill_port},
     kv-transfer-config: {{kv_connector: NixlConnector, kv_role: kv_producer, {LONG_LEASE}}}}}
  - {{name: d, model: {MODEL}, hardware: H100, port: {decode_port},
     kv-transfer-config: {{kv_connector: NixlConnector, kv_role: kv_consumer}}}}
""")
    prompt = list(range(100, 400))  # 300 tokens: a second look-up hits its 18 full blocks
    async with running_server("--cluster", str(cluster_file), "--speed", "200", "--enable-prompt-tokens-details") \
            as server, aiohttp.ClientSession() as http:
        async def post(port: int, params: dict, max_tokens: int) -> dict:
            body = {"prompt": prompt, "max_tokens": max_tokens, "kv_transfer_params": params}
            async with http.post(f"http://127.0.0.1:{port}/v1/completions", json=body) as r:
                assert r.status == 200
                return await r.json()
        first = await post(prefill_port, TO_DECODE, 1)
        second = await post(prefill_port, TO_DECODE, 1)  # the same prompt: a local prefix hit on the prefill pod
        decoded = await post(decode_port, second["kv_transfer_params"], 5)
        async with http.get(f"http://127.0.0.1:{decode_port}/metrics") as r:
            decode_metrics = await r.text()
        sim = server.engine.sim
        sim.advance(sim.now + 2_000_000.0)  # the first prefill's lease ends: its blocks go back
    assert first["kv_transfer_params"]["remote_prefill_cached_tokens"] == 0
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 288
    assert second["kv_transfer_params"]["remote_prefill_cached_tokens"] == 288
    assert decoded["usage"]["prompt_tokens_details"]["cached_tokens"] == 288
    # its prefill-KV-computed histogram counts the prompt less those tokens too (vLLM's loggers.py)
    computed = re.search(r'^vllm:request_prefill_kv_computed_tokens_sum\{.*\} (\S+)$',
                         decode_metrics, re.M)
    assert computed is not None and float(computed.group(1)) == 300 - 288


async def test_through_the_clusters_own_proxy_the_response_reports_the_prefills_cached_tokens(tmp_path):
    cluster_file = tmp_path / "cluster.yaml"
    cluster_file.write_text(f"""
engine: {{max-model-len: 4096}}
routing: round_robin
instances:
  - {{name: p, model: {MODEL}, hardware: H100, role: prefill, count: 2,
     kv-transfer-config: {{kv_connector: NixlConnector, kv_role: kv_producer}}}}
  - {{name: d, model: {MODEL}, hardware: H100, role: decode,
     kv-transfer-config: {{kv_connector: NixlConnector, kv_role: kv_consumer}}}}
""")
    body = {"prompt": list(range(100, 400)), "max_tokens": 3}
    async with running_server("--cluster", str(cluster_file), "--speed", "200", "--enable-prompt-tokens-details") \
            as server, aiohttp.ClientSession() as http:
        cached = []
        for _ in range(3):  # prefills on p-0, p-1, p-0: only the third hits (the first's 18 full blocks)
            async with http.post(server.url + "/v1/completions", json=body) as r:
                cached.append((await r.json())["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert cached == [0, 0, 288]  # the decode instance's own hits (288 from the second on) are not reported
