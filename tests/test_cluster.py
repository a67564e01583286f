"""The simulated cluster: cluster files, routing policies, faults, several models on one clock."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from emulator.cluster import ClusterSpec, FaultSpec, build_cluster
from emulator.config import EngineArgs
from emulator.instance import InstanceSpec
from emulator.request import Request
from emulator.stats import TimeSeries, request_record
from loadgen.replay import replay
from profiles.cluster_file import ClusterFileError, read_cluster_file
from profiles.deployment import build_deployment

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
MOONCAKE = SHARED / "traces" / "mooncake" / "conversation_trace.jsonl"
SHAREGPT = SHARED / "traces" / "sharegpt" / "sharegpt-llama-3.1-8b-300-sps10.jsonl"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data is not beside the repository")


@pytest.fixture(scope="module")
def h100_8b():
    return build_deployment("meta-llama/Llama-3.1-8B", "H100", EngineArgs(max_model_len=8192))


@pytest.fixture(scope="module")
def a100_8b():
    return build_deployment("meta-llama/Llama-3.1-8B", "A100", EngineArgs(max_model_len=8192))


def instances(deployment, n: int, stem: str = "i", **kw) -> tuple[InstanceSpec, ...]:
    return tuple(InstanceSpec(f"{stem}{k}", deployment, ("llama",), **kw) for k in range(n))


def write(tmp_path: Path, text: str, name: str = "cluster.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def run_requests(sim, requests: list[Request]) -> list[Request]:
    sim.run(requests)
    return requests


def assert_all_accounted_for(sim, requests: list[Request]) -> None:
    """Every request ended exactly once, and every block on every engine is free."""
    assert all(r.is_finished for r in requests)
    assert not sim.active
    for engine in sim.engines:
        assert engine.is_idle and engine.kv.num_free_blocks == engine.num_gpu_blocks - 1
    assert all(loop.is_idle for loop in sim.loops)


# -- cluster files --------------------------------------------------------------------------------
def test_the_shipped_example_cluster_reads_with_replicas_ports_and_a_fault():
    spec, notes = read_cluster_file(ROOT / "deploy" / "clusters" / "heterogeneous.yaml")
    names = [i.name for i in spec.instances]
    assert names == ["h100-70b-0", "h100-70b-1", "a100-8b-0", "a100-8b-1", "b200-8b"]
    assert [i.port for i in spec.instances[:2]] == [8101, 8102]
    assert spec.instances[0].deployment.config.tensor_parallel_size == 4
    assert spec.instances[0].deployment is spec.instances[1].deployment  # replicas share one deployment
    assert spec.instances[2].deployment.config.max_num_seqs == 128  # its own engine flags
    assert spec.instances[4].deployment.config.max_model_len == 16384  # the file's defaults
    assert spec.faults == (FaultSpec("a100-8b-1", 600.0, 900.0, True),)
    assert spec.links[0]["bandwidth"] == 50e9 and spec.nodes["rack-a"]["host_memory"] == 2 * 1024 ** 4


@pytest.mark.parametrize("text, where", [
    ("instances:\n  - model: meta-llama/Llama-3.1-8B\n    hardware: H1000\n", ":3: instances[0].hardware: unknown"),
    ("instances:\n  - model: meta-llama/Llama-3.1-8B\n    hardware: H100\n    tensor-parallel-size: two\n",
     ":4: instances[0].tensor-parallel-size: expected an integer"),
    ("instances:\n  - model: meta-llama/Llama-3.1-8B\n    hardware: H100\n    max-num-seqz: 8\n",
     ":4: instances[0].max-num-seqz: unknown field"),
    ("instances:\n  - hardware: H100\n", ":2: instances[0].model: every instance needs a model"),
    ("routing: fastest\ninstances:\n  - {model: meta-llama/Llama-3.1-8B, hardware: H100}\n",
     ":1: routing.policy: unknown policy 'fastest'"),
    ("instances:\n  - {model: meta-llama/Llama-3.1-8B, hardware: H100, name: a}\nfaults:\n  - {instance: b, at: 5}\n",
     ":4: faults[0].instance: no instance 'b'"),
    ("instances:\n  - {model: meta-llama/Llama-3.1-8B, hardware: H100, name: a}\nfaults:\n"
     "  - {instance: a, at: 5, restore_at: 2}\n", ":4: faults[0]: fault of 'a': `restore_at` (2.0) must come after"),
    ("instances:\n  - {model: meta-llama/Llama-3.1-8B, hardware: H100, role: both}\n",
     ":2: instances[0].role: expected one of mixed, prefill, decode"),
    ("instances:\n  - {model: meta-llama/Llama-3.1-8B, hardware: RTX4090, max-model-len: 131072}\n",
     ":2: instances[0]: To serve at least one request"),
    ("instances: [1, 2\n", ":2: not valid YAML or JSON"),
    ("", ": the cluster file is empty"),
])
def test_cluster_file_errors_name_the_line_and_the_field(tmp_path, text, where):
    path = write(tmp_path, text)
    with pytest.raises(ClusterFileError) as err:
        read_cluster_file(path)
    assert f"{path}{where}" in str(err.value)


@needs_shared
@pytest.mark.parametrize("config, tp, dp", [
    ("calibration/power-a6000/config/power_config_tp1.json", 1, 1),
    ("calibration/power-a6000/config/power_config_tp2.json", 2, 1),
    ("calibration/vllm-runs/RTXPRO6000/Qwen3-30B-A3B-Instruct-2507/config.json", 1, 2),
])
def test_llmservingsim_cluster_configs_are_read_as_they_are(config, tp, dp):
    spec, notes = read_cluster_file(SHARED / config)
    (instance,) = spec.instances  # a dp_group of two instances is one data-parallel deployment
    engine = instance.deployment.config
    assert (engine.tensor_parallel_size, engine.data_parallel_size) == (tp, dp)
    node = spec.nodes["node0"]
    assert node["host_memory"] > 0 and node["host_memory_bandwidth"] > 0
    assert ("power" in node) == ("power" in json.loads((SHARED / config).read_text())["nodes"][0])


def test_engine_flags_from_the_command_line_are_every_instances_defaults(tmp_path):
    path = write(tmp_path, "instances:\n  - {model: meta-llama/Llama-3.1-8B, hardware: H100, max-num-seqs: 64}\n"
                           "  - {model: meta-llama/Llama-3.1-8B, hardware: A100}\n")
    spec, _ = read_cluster_file(path, base_args={"max_model_len": 4096, "max_num_seqs": 32})
    assert [i.deployment.config.max_num_seqs for i in spec.instances] == [64, 32]
    assert {i.deployment.config.max_model_len for i in spec.instances} == {4096}


# -- routing ----------------------------------------------------------------------------------------
def test_requests_go_to_the_instances_serving_their_model(h100_8b):
    big = build_deployment("meta-llama/Llama-3.1-70B", "H100", EngineArgs(max_model_len=8192,
                                                                        tensor_parallel_size=4))
    spec = ClusterSpec((InstanceSpec("small", h100_8b, ("llama-8b",)), InstanceSpec("big", big, ("llama-70b",))))
    sim = build_cluster(spec)
    requests = [Request(f"r{i}", 100, 10, arrival_time=i * 0.01, model=("llama-8b", "llama-70b")[i % 2])
                for i in range(20)]
    run_requests(sim, requests)
    for r in requests:
        assert sim.instance_of[r.engine_index].name == ("small" if r.model == "llama-8b" else "big")
    with pytest.raises(ValueError, match="no instance serves model 'gpt-4'"):
        sim.submit(Request("x", 10, 1, model="gpt-4"))


def test_round_robin_takes_turns_and_every_policy_is_deterministic(h100_8b):
    def placements(policy: str) -> list[int]:
        sim = build_cluster(ClusterSpec(instances(h100_8b, 3), policy))
        requests = [Request(f"r{i}", 200 + 10 * i, 20, arrival_time=i * 0.05) for i in range(30)]
        run_requests(sim, requests)
        assert_all_accounted_for(sim, requests)
        return [r.engine_index for r in requests]
    assert placements("round_robin") == [i % 3 for i in range(30)]
    for policy in ("least_loaded", "least_outstanding_tokens", "least_kv_usage", "prefix_aware",
                   "session_affinity", "capacity_weighted"):
        assert placements(policy) == placements(policy)


def test_session_affinity_keeps_a_session_on_one_instance(h100_8b):
    sim = build_cluster(ClusterSpec(instances(h100_8b, 4), "session_affinity"))
    requests = [Request(f"r{i}", 300, 30, arrival_time=i * 0.1, session=f"user{i % 5}") for i in range(40)]
    run_requests(sim, requests)
    by_session: dict[str, set[int]] = {}
    for r in requests:
        by_session.setdefault(r.session, set()).add(r.engine_index)
    assert all(len(engines) == 1 for engines in by_session.values())
    assert len({e for engines in by_session.values() for e in engines}) > 1  # sessions spread over instances


def test_prefix_aware_sends_a_follow_up_turn_where_its_prefix_is_cached(h100_8b):
    import numpy as np
    sim = build_cluster(ClusterSpec(instances(h100_8b, 4), "prefix_aware"))
    rng = np.random.default_rng(0)
    conversations = [rng.integers(0, 30000, 2000) for _ in range(4)]
    first = [Request(f"c{c}-t0", 2000, 5, arrival_time=0.01 * c, prompt_token_ids=conversations[c])
             for c in range(4)]
    follow = [Request(f"c{c}-t1", 2100, 5, arrival_time=5.0 + 0.01 * i,
                      prompt_token_ids=np.concatenate([conversations[c], rng.integers(0, 30000, 100)]))
              for i, c in enumerate((2, 0, 3, 1))]
    run_requests(sim, first + follow)
    where = {r.request_id: r.engine_index for r in first + follow}
    for c in range(4):
        assert where[f"c{c}-t1"] == where[f"c{c}-t0"]
    assert all(r.num_cached_tokens >= 1984 for r in follow)


@needs_shared
def test_prefix_aware_routing_raises_hits_and_lowers_ttft_on_the_mooncake_conversations(tmp_path):
    """Mooncake's conversation trace (first 2,000 requests) over 4 H100s: the full trace's numbers are in
    BENCHMARKS.md (bench/cluster_routing.py)."""
    trace = tmp_path / "mooncake.jsonl"
    with MOONCAKE.open() as f:
        trace.write_text("".join(next(f) for _ in range(2000)))
    results = {}
    for policy in ("round_robin", "prefix_aware"):
        deployment = build_deployment("meta-llama/Llama-3.1-8B", "H100", EngineArgs(max_model_len=32768))
        summary = replay(str(trace), ClusterSpec(instances(deployment, 4), policy), tmp_path / policy,
                         skip_invalid=True)
        records = [json.loads(line) for line in (tmp_path / policy / "requests.jsonl").open()]
        results[policy] = (summary["cached_tokens"] / sum(r["input_tokens"] for r in records), summary["ttft"]["mean"])
    (rr_hits, rr_ttft), (pa_hits, pa_ttft) = results["round_robin"], results["prefix_aware"]
    assert pa_hits > 1.3 * rr_hits  # 8 % -> 14 % of prompt tokens from the cache
    assert pa_ttft < 0.99 * rr_ttft


def test_faster_devices_finish_more_requests_under_least_loaded(h100_8b, a100_8b):
    spec = ClusterSpec(instances(h100_8b, 2, "h100-") + instances(a100_8b, 2, "a100-"), "least_loaded")
    sim = build_cluster(spec)
    requests = [Request(f"r{i}", 1500, 200, arrival_time=i * 0.02) for i in range(1200)]
    run_requests(sim, requests)
    assert_all_accounted_for(sim, requests)
    done = {name: sum(sim.instance_of[r.engine_index].name.startswith(name) for r in requests)
            for name in ("h100", "a100")}
    assert done["h100"] > 1.2 * done["a100"]


def test_capacity_weighted_routing_gives_the_faster_device_more(h100_8b, a100_8b):
    spec = ClusterSpec(instances(h100_8b, 1, "h100-") + instances(a100_8b, 1, "a100-"), "capacity_weighted")
    sim = build_cluster(spec)
    h100, a100 = sim.instances
    assert h100.capacity > 1.3 * a100.capacity  # decode tokens per second, from each cost model
    requests = [Request(f"r{i}", 800, 100, arrival_time=i * 0.01) for i in range(600)]
    run_requests(sim, requests)
    assert h100.num_routed > a100.num_routed


# -- faults -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("reroute", [False, True])
def test_a_fault_mid_run_loses_nothing_and_frees_every_block(h100_8b, reroute):
    spec = ClusterSpec(instances(h100_8b, 3), "round_robin", faults=(FaultSpec("i1", 4.0, 9.0, reroute),))
    sim = build_cluster(spec)
    ended = []
    sim.add_finish_listener(ended.append)
    requests = [Request(f"r{i}", 1000, 300, arrival_time=i * 0.05) for i in range(300)]
    run_requests(sim, requests)
    assert_all_accounted_for(sim, requests)
    assert sorted(r.request_id for r in ended) == sorted(r.request_id for r in requests)  # each ended once
    failed = [r for r in requests if r.finish_reason == "error"]
    assert failed and all(r.finish_time == 4.0 for r in failed)
    if reroute:  # the ones that had not produced a token went elsewhere; those streaming could not
        assert all(r.num_output_tokens > 0 for r in failed)
    arrived_while_down = [r for r in requests if 4.0 <= r.arrival_time < 9.0]
    assert all(sim.instance_of[r.engine_index].name != "i1" for r in arrived_while_down)
    assert sim.instance_events == [(4.0, "i1", "down"), (9.0, "i1", "up")]
    assert any(sim.instance_of[r.engine_index].name == "i1" for r in requests if r.arrival_time > 9.0)


def test_a_reroute_retries_front_door_requests_only(h100_8b):
    """A request sent to an instance's own port has no router in front of it to retry it elsewhere."""
    sim = build_cluster(ClusterSpec(instances(h100_8b, 2), "round_robin"))
    first = sim.instances[0]
    direct = Request("direct", 8000, 50, arrival_time=0.0)
    routed = Request("routed", 8000, 50, arrival_time=0.0)
    sim.submit(direct, instance=first)
    sim.submit(routed)  # round robin's first pick
    assert sim.instance_of[routed.engine_index] is first
    sim.advance(0.01)  # (8,000-token prompts: no token yet)
    down = []
    sim.add_engine_down_listener(lambda engine, t: down.append((engine, t)))
    failed = sim.fail_instance(first.name, reroute=True)
    assert failed == [direct] and direct.finish_reason == "error"
    assert sim.instance_of[routed.engine_index] is sim.instances[1] and not routed.is_finished
    # its new pod sees a new request now; its client sent it at 0, and its latencies count from then
    assert (routed.arrival_time, routed.sent_time) == (0.01, 0.0)
    assert down == [(e.index, 0.01) for e in first.engines]
    sim.advance(60.0)
    record = request_record(routed)
    assert record["arrival_time"] == 0.0 and record["ttft"] == routed.first_token_time > 0.01


def test_a_failed_instances_time_series_drops_to_nothing_at_once(h100_8b):
    """Its requests failed or went elsewhere: it runs and holds nothing until restored (not its last state)."""
    spec = ClusterSpec(instances(h100_8b, 2), "round_robin", faults=(FaultSpec("i1", 3.0, None, True),))
    sim = build_cluster(spec)
    series = TimeSeries(len(sim.engines), instance_of=[sim.instance_of[e.index].name for e in sim.engines])
    sim.add_listener(series.on_step, series.on_run)
    sim.add_engine_down_listener(series.on_engine_down)
    requests = [Request(f"r{i}", 3000, 400, arrival_time=i * 0.02) for i in range(200)]
    run_requests(sim, requests)
    rows = [row for row in series.by_instance(10.0) if row["instance"] == "i1"]
    assert any(row["running"] for row in rows[:3])
    assert all((row["running"], row["waiting"], row["kv_cache_pct"]) == (0, 0, 0.0) for row in rows[3:])


def test_when_every_instance_is_down_arrivals_fail_at_once(h100_8b):
    spec = ClusterSpec(instances(h100_8b, 1), faults=(FaultSpec("i0", 1.0),))
    sim = build_cluster(spec)
    requests = [Request(f"r{i}", 100, 50, arrival_time=i * 0.5) for i in range(6)]
    run_requests(sim, requests)
    late = [r for r in requests if r.arrival_time > 1.0]
    assert late and all(r.finish_reason == "error" and r.finish_time == r.arrival_time for r in late)
    assert_all_accounted_for(sim, requests)


# -- replay of a cluster ------------------------------------------------------------------------------
@needs_shared
def test_replay_of_a_cluster_reports_each_instance(tmp_path, h100_8b, a100_8b):
    spec = ClusterSpec(instances(h100_8b, 2, "h100-") + instances(a100_8b, 1, "a100-"), "least_loaded")
    summary = replay(str(SHAREGPT), spec, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "requests.jsonl").open()]
    assert {r["instance"] for r in records} == {"h100-0", "h100-1", "a100-0"}
    per_instance = {i["name"]: i for i in summary["instances"]}
    assert sum(i["num_requests"] for i in per_instance.values()) == summary["num_requests"] == 300
    assert sum(per_instance[n]["routed"] for n in per_instance) == 300
    rows = (tmp_path / "timeseries_by_instance.csv").read_text().splitlines()
    assert rows[0].startswith("instance,t,") and {row.split(",")[0] for row in rows[1:]} == set(per_instance)


def test_an_instance_role_follows_its_kv_transfer_config_and_may_not_contradict_it(tmp_path):
    text = """
engine: {max-model-len: 4096}
instances:
  - name: p
    model: meta-llama/Llama-3.1-8B
    hardware: H100
    kv-transfer-config: {kv_connector: NixlConnector, kv_role: kv_producer}
  - name: d
    model: meta-llama/Llama-3.1-8B
    hardware: H100
    engine: {kv-transfer-config: '{"kv_connector": "P2pNcclConnector", "kv_role": "kv_consumer"}'}
  - {name: m, model: meta-llama/Llama-3.1-8B, hardware: H100}
"""
    spec, _ = read_cluster_file(write(tmp_path, text))
    roles = {i.name: (i.role, i.deployment.config.kv_transfer.get("kv_connector")) for i in spec.instances}
    assert roles == {"p": ("prefill", "NixlConnector"), "d": ("decode", "P2pNcclConnector"), "m": ("mixed", None)}
    bad = text.replace("    hardware: H100\n    kv-transfer-config", "    hardware: H100\n    role: decode\n"
                       "    kv-transfer-config", 1)
    with pytest.raises(ClusterFileError, match=r"cluster.yaml:7: instances\[0\].role: role decode contradicts "
                                               r"kv-transfer-config's kv_role 'kv_producer'"):
        read_cluster_file(write(tmp_path, bad))
    with pytest.raises(ClusterFileError, match=r"kv_role\n  Input should be 'kv_producer', 'kv_both' or 'kv_consumer'"):
        read_cluster_file(write(tmp_path, text.replace("kv_producer", "producer")))


def test_kv_offloading_must_fit_the_node_host_memory_and_runs_no_faster_than_its_dram(tmp_path):
    text = """
engine: {max-model-len: 4096}
nodes:
  box: {host_memory: 100GiB, host_memory_bandwidth: 20GB/s}
instances:
  - {name: a, model: meta-llama/Llama-3.1-8B, hardware: H100, node: box, kv-offloading-size: 40, count: 2}
  - {name: b, model: meta-llama/Llama-3.1-8B, hardware: H100, node: box, kv-offloading-size: 30,
     kv-offloading-backend: lmcache, count: 3}
"""
    # 2 x 40 GiB native + one 30 GiB pool shared by the three lmcache instances
    with pytest.raises(ClusterFileError, match=r"cluster.yaml:4: nodes.box.host_memory: its instances offload "
                                               r"110 GiB of KV \(--kv-offloading-size\), more than its 100 GiB"):
        read_cluster_file(write(tmp_path, text))
    spec, _ = read_cluster_file(write(tmp_path, text.replace("100GiB", "110GiB")))
    sim = build_cluster(spec)
    tiers = [e.kv.offload.tiers[0].spec for e in sim.engines]
    assert all(t.bandwidth == 20e9 for t in tiers)  # the H100's PCIe link is faster than this DRAM
    assert len({id(e.kv.offload) for e in sim.engines[2:]}) == 1  # the lmcache pool is one


def test_a_request_past_max_model_len_handed_to_the_core_is_a_clear_error(h100_8b):
    """The front ends refuse such a request (vLLM's 400); the core, given one directly, refuses it with vLLM's
    message rather than place it where it never finishes."""
    sim = build_cluster(ClusterSpec(instances(h100_8b, 1)))
    with pytest.raises(RuntimeError, match=r"The decoder prompt \(length 20000\) is longer than the maximum model "
                                           r"length of 8192"):
        sim.submit(Request("long", 20000, 5, arrival_time=0.0))
    assert not sim.active
