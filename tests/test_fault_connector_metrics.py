"""The KV connector series around an instance fault and its restore, as real vLLM pods show them (see
test_fault_metrics.py for the engine series): a failed pod's connector series (vllm:kv_offload_*, NIXL,
Mooncake, the fetch stages) leave every /metrics showing it until it is restored; the restored pod is a new
process whose series start as a fresh engine's and count only what it does from then on. Other engines'
series and the emulator's own count on. All on virtual time."""
from __future__ import annotations


from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from emulator.cluster import ClusterSpec, FaultSpec, build_cluster
from emulator.config import EngineArgs
from emulator.instance import InstanceSpec
from emulator.request import Request
from profiles.deployment import build_deployment
from server.connector_metrics import ConnectorMetrics
from test_connector_metrics import pd_sim  # a prefill and a decode H100 with a P/D connector

MODEL = "meta-llama/Llama-3.1-8B"


def registry_of(sim, engines=None, emulator_series=False) -> CollectorRegistry:
    registry = CollectorRegistry()
    ConnectorMetrics(sim, registry, engines, emulator_series)
    return registry


def scrape(registry: CollectorRegistry) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) -> value, less the `_created` stamps."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(generate_latest(registry).decode())
            for s in family.samples if not s.name.endswith("_created")}


def of_engine(samples: dict, engine: str, prefix: str = "vllm:") -> dict:
    return {k: v for k, v in samples.items() if k[0].startswith(prefix) and ("engine", engine) in k[1]}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def offloading_pair():
    """Instances a (engine 0) and b (engine 1), each with its own CPU tier, behind round robin."""
    d = build_deployment(MODEL, "H100", EngineArgs(max_model_len=4096, num_gpu_blocks_override=300,
                                                   kv_offloading_size=1.0))
    return build_cluster(ClusterSpec((InstanceSpec("a", d, ("m",)), InstanceSpec("b", d, ("m",))), "round_robin"))


def prompts(tag: str, n: int, shared: list[int]) -> list[Request]:
    return [Request(f"{tag}{i}", 1600, 40, arrival_time=i * 0.2, model="m",
                    prompt_token_ids=shared + list(range(i * 1000 + 50_000, i * 1000 + 50_000 + 1600 - len(shared))))
            for i in range(n)]


def run_until_idle(sim) -> None:
    while (t := sim.next_event_time()) is not None:
        sim.advance(t)


# -- offloading -----------------------------------------------------------------------------------------
def test_a_failed_pods_offload_series_leave_until_restore_and_restart_from_zero():
    sim = offloading_pair()
    front, pod_a = registry_of(sim, emulator_series=True), registry_of(sim, engines=[0])
    shared = list(range(7, 1031))
    for request in prompts("r", 8, shared):
        sim.submit(request)
    run_until_idle(sim)
    before = scrape(front)
    e0 = {"engine": "0", "model_name": "m"}
    assert value(before, "vllm:kv_offload_store_bytes_total", **e0) > 0
    assert value(before, "vllm:kv_offload_lookup_sync_delay_seconds_count", **e0) > 0
    b_stored = value(before, "vllm:kv_offload_store_bytes_total", engine="1", model_name="m")
    tier_hits = value(before, "vllm_emulator:kv_tier_hit_tokens_total", cluster_instance="a", tier="cpu")

    sim.fail_instance("a")
    down, down_pod = scrape(front), scrape(pod_a)
    assert not of_engine(down, "0") and not of_engine(down_pod, "0")  # its scrape fails
    assert value(down, "vllm:kv_offload_store_bytes_total", engine="1", model_name="m") == b_stored
    sim.advance(sim.now + 5.0)
    assert not of_engine(scrape(front), "0")  # no scrape revives them while it is down

    sim.restore_instance("a")
    for samples in (scrape(front), scrape(pod_a)):
        fresh = of_engine(samples, "0")
        # a new process binds only the deprecated series at start, at zero; the rest come with payloads and steps
        assert fresh and all(v == 0 for v in fresh.values())
        assert {name for name, _ in fresh} == {  # (--kv-offloading-size makes it a kv_both consumer)
            "vllm:kv_offload_total_bytes_total", "vllm:kv_offload_total_time_total", "vllm:kv_offload_size_bucket",
            "vllm:kv_offload_size_count", "vllm:kv_offload_size_sum", "vllm:num_requests_kv_fetch_by_stage"}
    assert value(scrape(front), "vllm_emulator:kv_tier_hit_tokens_total", cluster_instance="a", tier="cpu") == tier_hits

    # what it does next is all it counts
    offload, cpu = sim.engines[0].kv.offload, sim.engines[0].kv.offload.tiers[0]
    lookups, stored = offload.lookups, cpu.stored
    again = Request("again", 1600, 40, model="m", prompt_token_ids=list(range(90_000, 91_600)))
    sim.submit(again, instance=sim.instances[0])
    run_until_idle(sim)
    for samples in (scrape(front), scrape(pod_a)):
        assert value(samples, "vllm:kv_offload_lookup_sync_delay_seconds_count", **e0) == offload.lookups - lookups == 1
        new_bytes = (cpu.stored - stored) * cpu.block_bytes
        assert new_bytes > 0 and value(samples, "vllm:kv_offload_store_bytes_total", **e0) == new_bytes
        assert value(samples, "vllm:kv_offload_total_bytes_total", transfer_type="GPU_to_CPU", **e0) == new_bytes
        assert ("vllm:kv_offload_config_info", frozenset({**e0, "cpu_num_chunks": str(cpu.capacity_blocks),
                                                          "cpu_blocks_per_chunk": "1",
                                                          "cpu_kv_cache_size_bytes": str(2 ** 30),
                                                          "cpu_kv_cache_size_tokens": str(512 * 16)}.items())) \
            in samples


# -- P/D connectors ----------------------------------------------------------------------------------------
def test_a_restored_decode_pod_counts_no_failed_transfers_of_the_dead_process():
    slow = {"between": ("n0", "n1"), "bandwidth": 1e9, "latency": 1e-3}
    sim = pd_sim("NixlConnector", faults=(FaultSpec("p0", 3.0, restore_at=4.0),), links=(slow,), nodes=("n0", "n1"))
    registry = registry_of(sim)
    sim.run([Request(f"r{i}", 4000, 50, arrival_time=i * 0.05, model="m") for i in range(60)])
    d = {"engine": "1", "model_name": "m"}
    failed = sim.transfers.stats[1].pd_failed
    assert failed > 0 and value(scrape(registry), "vllm:nixl_num_failed_transfers_total", **d) == failed

    sim.fail_instance("d0")
    down = scrape(registry)
    assert not of_engine(down, "1")  # NIXL series and the fetch-stage gauge alike
    assert value(down, "vllm:nixl_xfer_time_seconds_count", engine="0", model_name="m") == 0  # the prefill's stay
    sim.restore_instance("d0")
    fresh = of_engine(scrape(registry), "1")
    assert value(fresh, "vllm:nixl_num_failed_transfers_total", **d) == 0
    assert value(fresh, "vllm:nixl_xfer_time_seconds_count", **d) == 0
    assert {dict(labels)["stage"] for name, labels in fresh if name == "vllm:num_requests_kv_fetch_by_stage"} == {
        "waiting_to_start", "in_progress", "completed_waiting"}
    assert all(v == 0 for (name, _), v in fresh.items() if name == "vllm:num_requests_kv_fetch_by_stage")

    sim.run([Request("after", 4000, 10, arrival_time=sim.now, model="m")])
    after = scrape(registry)
    assert value(after, "vllm:nixl_xfer_time_seconds_count", **d) == 1
    assert value(after, "vllm:nixl_num_failed_transfers_total", **d) == 0


def test_a_mooncake_prefill_pod_back_from_a_fault_counts_only_its_new_pushes():
    sim = pd_sim("MooncakeConnector")
    registry, pod = registry_of(sim), registry_of(sim, engines=[0])
    sim.run([Request("r", 3000, 10, model="m")])
    p = {"engine": "0", "model_name": "m"}
    assert value(scrape(registry), "vllm:mooncake_xfer_time_seconds_count", **p) == 1
    sim.fail_instance("p0")
    assert not of_engine(scrape(registry), "0") and not of_engine(scrape(pod), "0")
    assert value(scrape(registry), "vllm:mooncake_num_failed_recvs_total", engine="1", model_name="m") == 0
    sim.restore_instance("p0")
    for samples in (scrape(registry), scrape(pod)):
        assert value(samples, "vllm:mooncake_xfer_time_seconds_count", **p) == 0
        assert value(samples, "vllm:mooncake_num_kv_expired_reqs_total", **p) == 0
    sim.run([Request(f"s{i}", 3000, 10, arrival_time=sim.now + i, model="m") for i in range(2)])
    for samples in (scrape(registry), scrape(pod)):
        assert value(samples, "vllm:mooncake_xfer_time_seconds_count", **p) == 2
