"""LLMServingSim's cluster config JSON read as LLMServingSim reads it: mem_util's KV cache, DP groups,
its routing defaults, its per-instance overrides, complete power sections; what differs is a start-up
note, what it refuses is an error naming the file, the line and the field."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from emulator.hardware import GiB
from emulator.models import load_model
from profiles.cluster_file import ClusterFileError, read_cluster_file
from profiles.llmservingsim_cluster import llmservingsim_weight_bytes

LLAMA = "meta-llama/Llama-3.1-8B"
QWEN_MOE = "Qwen/Qwen3-30B-A3B-Instruct-2507"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
RTX4090_RUN = SHARED / "calibration" / "vllm-runs" / "RTX4090" / "Llama-3.1-8B"
A6000_MEM = {"mem_size": 48, "mem_bw": 768, "mem_latency": 0}
PRO6000_MEM = {"mem_size": 96, "mem_bw": 1597, "mem_latency": 0}
POWER = {"base_node_power": 60,
         "npu": {"A6000": {"idle_power": 25, "standby_power": 115, "active_power": 300, "standby_duration": 18}},
         "cpu": {"idle_power": 10, "active_power": 200, "util": 0.15},
         "dram": {"dimm_size": 32, "idle_power": 2.0, "energy_per_bit": 6.0},
         "link": {"num_links": 1, "idle_power": 5, "energy_per_bit": 4.0},
         "nic": {"num_nics": 1, "idle_power": 20}, "storage": {"num_devices": 2, "idle_power": 5}}


def instance(model: str = LLAMA, hardware: str = "A6000", **keys) -> dict:
    return {"model_name": model, "hardware": hardware, "npu_mem": dict(A6000_MEM), "pd_type": None, **keys}


def node(*instances: dict, **keys) -> dict:
    return {"num_instances": len(instances), "cpu_mem": {"mem_size": 128, "mem_bw": 256, "mem_latency": 0},
            "instances": list(instances), **keys}


def write(tmp_path: Path, *nodes: dict, **top) -> Path:
    config = {"num_nodes": len(nodes), "link_bw": 112, "link_latency": 0, **top, "nodes": list(nodes)}
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(config, indent=4))
    return path


def line_of(path: Path, text: str, after: int = 0) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if n > after and text in line)


def error_of(path: Path) -> str:
    with pytest.raises(ClusterFileError) as err:
        read_cluster_file(path)
    return str(err.value)


# -- npu_mem.mem_util: LLMServingSim 2.x's KV cache -------------------------------------------------
def rtx4090(tmp_path: Path, **npu_mem) -> Path:
    """LLMServingSim's validated RTX 4090 config (bench/examples/RTX4090/Llama-3.1-8B/config.json)."""
    return write(tmp_path, node(instance(hardware="RTX4090", num_npus=1, tp_size=1,
                                         npu_mem={"mem_size": 24, "mem_bw": 1008, "mem_latency": 0, **npu_mem})),
                 link_bw=16, link_latency=1000)


def test_mem_util_sizes_the_kv_cache_as_llmservingsim_does_the_blocks_of_the_real_vllm_run(tmp_path):
    spec, notes = read_cluster_file(rtx4090(tmp_path, mem_util=0.833919))
    deployment = spec.instances[0].deployment
    # mem_size GiB x mem_util - the weights per rank, as vLLM's kv_cache_memory_bytes: 2,588 blocks, the
    # num_gpu_blocks of the real vLLM run the figure was calibrated against (not vLLM's own profile here)
    weights = llmservingsim_weight_bytes(load_model(LLAMA), 1, 1, 1)
    assert deployment.config.kv_cache_memory_bytes == int(24 * GiB * 0.833919) - int(weights)
    assert deployment.num_gpu_blocks == 2588
    assert ("nodes[0].instances[0]: KV cache sized as LLMServingSim 2.x sizes it (npu_mem.mem_util, a calibration "
            "knob there): 24 GiB x 0.833919 - 14.96 GiB of weights per rank = 5.06 GiB (2588 blocks), as vLLM's "
            "kv_cache_memory_bytes") in notes
    assert ("nodes[0].instances[0].npu_mem.mem_size: 24 GiB is within 10 % of RTX4090's 23.52 GiB, so it names "
            "that card: RTX4090's own is simulated") in notes


@pytest.mark.skipif(not RTX4090_RUN.exists(), reason="../shared/data is not beside the repository")
def test_llmservingsim_rtx4090_config_gives_the_num_gpu_blocks_vllm_measured():
    spec, _ = read_cluster_file(RTX4090_RUN / "config.json")
    measured = json.loads((RTX4090_RUN / "vllm" / "meta.json").read_text())["kv_cache"]["num_gpu_blocks"]
    assert spec.instances[0].deployment.num_gpu_blocks == measured == 2588


def test_without_mem_util_vllm_memory_profiling_sizes_the_kv_cache_and_says_so(tmp_path):
    spec, notes = read_cluster_file(rtx4090(tmp_path))
    deployment = spec.instances[0].deployment
    assert deployment.config.kv_cache_memory_bytes is None
    weights = llmservingsim_weight_bytes(load_model(LLAMA), 1, 1, 1)
    ours, theirs = deployment.num_gpu_blocks, int(24 * GiB - weights) // deployment.memory.block_bytes
    assert deployment.config.gpu_memory_utilization == 0.9  # 2.x's --npu-memory-utilization default (vLLM's: 0.92)
    assert (f"nodes[0].instances[0]: KV cache sized by vLLM's memory profiling ({ours} blocks: gpu_memory_utilization "
            f"0.9, less weights, activation peak and non-torch memory); LLMServingSim 2.0 gives it npu_mem - weights "
            f"({theirs} blocks), 2.x npu_mem x 0.9 - weights ({int(24 * GiB * 0.9 - weights) // (2 << 20)}); "
            f"npu_mem.mem_util sizes it LLMServingSim's way") in notes
    assert ours < theirs  # vLLM keeps room for activations, CUDA graphs and the rotary cache


@pytest.mark.parametrize("mem_util, message", [
    (90, "must be a number in (0, 1]; got 90. It is a fraction of npu_mem.mem_size, so 0.9 rather than 90"),
    (0, "must be a number in (0, 1]; got 0"),
    ("0.9", "must be a number in (0, 1]; got '0.9'"),
    (0.6, "0.6 of npu_mem.mem_size (24 GiB) less 14.96 GiB of weights per rank leaves -570.91 MiB for the KV "
          "cache, less than one 16-token block (2.00 MiB)"),
])
def test_mem_util_errors_name_npu_mem_mem_util(tmp_path, mem_util, message):
    path = rtx4090(tmp_path, mem_util=mem_util)
    assert f"{path}:{line_of(path, 'mem_util')}: nodes[0].instances[0].npu_mem.mem_util: {message}" in error_of(path)


# -- dp_group ---------------------------------------------------------------------------------------
def test_an_explicit_null_dp_group_is_no_group(tmp_path):
    path = write(tmp_path, node(instance(tp_size=1, dp_group=None), instance("microsoft/Phi-mini-MoE-instruct",
                                                                             tp_size=1, dp_group=None)))
    spec, _ = read_cluster_file(path)
    assert [(i.deployment.model.name, i.deployment.config.data_parallel_size) for i in spec.instances] == \
        [(LLAMA, 1), ("microsoft/Phi-mini-MoE-instruct", 1)]


def test_a_dp_group_is_named_across_the_cluster_and_its_members_one_deployment(tmp_path):
    a, other = instance(tp_size=1, dp_group="A"), instance(tp_size=1)
    spec, _ = read_cluster_file(write(tmp_path, node(a, other, dict(a))))
    assert [i.deployment.config.data_parallel_size for i in spec.instances] == [2, 1]


@pytest.mark.parametrize("second, key, message", [
    ({"num_npus": 2, "tp_size": 2}, "tp_size", "DP group 'A': tp_size mismatch (1 vs 2)"),
    ({"num_npus": 2, "pp_size": 2}, "pp_size", "DP group 'A': pp_size mismatch (1 vs 2)"),
    ({"model_name": "microsoft/Phi-mini-MoE-instruct"}, "model_name",
     "DP group 'A': model_name mismatch ('meta-llama/Llama-3.1-8B' vs 'microsoft/Phi-mini-MoE-instruct'); the "
     "group is one vLLM deployment of data_parallel_size 2, whose engines share one configuration"),
    ({"pd_type": "decode"}, "pd_type", "DP group 'A': pd_type mismatch (None vs 'decode')"),
    ({"npu_mem": {"mem_size": 40, "mem_bw": 768, "mem_latency": 0}}, "npu_mem", "DP group 'A': npu_mem mismatch"),
    ({"max_num_seqs": 64}, "max_num_seqs", "DP group 'A': max_num_seqs mismatch (None vs 64)"),
])
def test_dp_group_members_must_agree(tmp_path, second, key, message):
    path = write(tmp_path, node(instance(tp_size=1, dp_group="A"), instance(**{"tp_size": 1, "dp_group": "A",
                                                                               **second})))
    where = line_of(path, f'"{key}"', after=line_of(path, '"instances"') + 12)
    assert f"{path}:{where}: nodes[0].instances[1].{key}: {message}" in error_of(path)


def test_a_dp_group_across_nodes_is_refused(tmp_path):
    member = instance(QWEN_MOE, "RTXPRO6000", npu_mem=dict(PRO6000_MEM), tp_size=1, ep_size=2, dp_group="A")
    path = write(tmp_path, node(member), node(dict(member)))
    second = line_of(path, "dp_group", after=line_of(path, "dp_group"))
    assert (f"{path}:{second}: nodes[1].instances[0].dp_group: DP group 'A' spans nodes[0] and nodes[1]: data "
            "parallelism across nodes is not simulated") in error_of(path)


@pytest.mark.parametrize("members, message", [
    ([{"tp_size": 1, "ep_size": 2}], "ep_size: ep_size (2) > tp_size (1) requires dp_group to be set"),
    ([{"tp_size": 1, "dp_group": "A"}] * 2, "ep_size: DP group 'A': ep_size (1) not divisible by dp_group_size (2)"),
    ([{"tp_size": 1, "ep_size": 4, "dp_group": "A"}] * 2, "ep_size: DP group 'A': local_ep (2) > tp_size (1)"),
    ([{"tp_size": 1, "ep_size": 3}], "ep_size: ep_size (3) > tp_size (1) requires dp_group"),
])
def test_expert_parallel_sizes_are_checked_as_llmservingsim_checks_them(tmp_path, members, message):
    path = write(tmp_path, node(*(instance(QWEN_MOE, "RTXPRO6000", npu_mem=dict(PRO6000_MEM), **m) for m in members)))
    assert f"nodes[0].instances[0].{message}" in error_of(path)


@pytest.mark.parametrize("keys, expert_parallel, note", [
    ({"tp_size": 1, "ep_size": 2, "dp_group": "A"}, True, None),  # ep = tp x dp: vLLM's EP group
    ({"num_npus": 4, "tp_size": 4, "ep_size": 2}, True,
     "ep_size: 2 is not tp_size x DP group size (4), which vLLM cannot run; simulated: vLLM's expert parallelism, "
     "which spreads the experts over all tp_size x DP = 4 ranks"),
    ({"num_npus": 2, "tp_size": 2, "ep_size": 1}, False,
     "ep_size: 1 is not tp_size x DP group size (2), which vLLM cannot run; simulated: vLLM without expert "
     "parallelism: every expert sliced over the 2 ranks"),
])
def test_an_ep_size_vllm_cannot_make_is_noted_with_what_is_simulated(tmp_path, keys, expert_parallel, note):
    members = [instance(QWEN_MOE, "RTXPRO6000", npu_mem=dict(PRO6000_MEM), **keys)] * (2 if "dp_group" in keys else 1)
    spec, notes = read_cluster_file(write(tmp_path, node(*members)))
    assert spec.instances[0].deployment.config.enable_expert_parallel is expert_parallel
    ep_notes = [n for n in notes if ".ep_size:" in n]
    assert ep_notes == ([f"nodes[0].instances[0].{note}"] if note else [])


# -- routing ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keys, routing", [
    ({"npu_num": 1, "npu_group": 1}, "llmservingsim_rr"),  # 2.0: RR, its --request-routing-policy default then
    ({}, "llmservingsim_rr"),
    ({"tp_size": 1}, "llmservingsim_load"),  # 2.x: LOAD, vLLM's weighted least-loaded over max_num_seqs
    ({"npu_mem": dict(A6000_MEM, mem_util=0.9)}, "llmservingsim_load"),
])
def test_routing_defaults_to_the_llmservingsim_generation_default(tmp_path, keys, routing):
    spec, _ = read_cluster_file(write(tmp_path, node(instance(**keys), instance(**keys))))
    assert spec.routing == routing


@pytest.mark.parametrize("value, routing", [("RR", "llmservingsim_rr"), ("LOAD", "llmservingsim_load"),
                                            ("prefix_aware", "prefix_aware"),
                                            ({"policy": "prefix_aware", "queue_weight": 1}, "prefix_aware")])
def test_the_routing_key_chooses_the_policy(tmp_path, value, routing):
    spec, _ = read_cluster_file(write(tmp_path, node(instance(tp_size=1)), routing=value))
    assert spec.routing == routing


def test_routing_llmservingsim_does_not_simulate_is_an_error(tmp_path):
    path = write(tmp_path, node(instance(tp_size=1)), routing="RAND")
    assert (f"{path}:{line_of(path, 'routing')}: routing: LLMServingSim's RAND routing is not simulated; choose RR, "
            f"LOAD or one of the emulator's") in error_of(path)


def test_one_file_uses_one_generations_parallelism_keys(tmp_path):
    path = write(tmp_path, node(instance(npu_num=1, npu_group=1), instance(tp_size=1)))
    assert (f"{path}:{line_of(path, 'tp_size')}: nodes[0].instances[1].tp_size: LLMServingSim 2.x's 'tp_size' and "
            f"2.0's 'npu_num' (nodes[0].instances[0], line {line_of(path, 'npu_num')}) in one file") in error_of(path)


# -- errors and notes ---------------------------------------------------------------------------------
def test_an_unknown_model_is_an_error_at_its_model_name(tmp_path):
    path = write(tmp_path, node(instance("Qwen/Qwen3.8-27B")))
    assert f"{path}:{line_of(path, 'model_name')}: nodes[0].instances[0].model_name: unknown model 'Qwen/Qwen3.8-27B'" \
        in error_of(path)


def test_what_is_not_applied_is_a_start_up_note(tmp_path):
    path = write(tmp_path, node(instance(num_npus=2, tp_size=2), cpu_mem={"mem_size": 128, "mem_bw": 256,
                                                                          "mem_latency": 100}),
                 link_bw=[112, 25], link_latency=[0, 1000],
                 cxl_mem={"mem_size": 256, "mem_bw": 64, "mem_latency": 250, "num_devices": 4})
    spec, notes = read_cluster_file(path)
    assert (f"{path}:{line_of(path, 'link_bw')}: link_bw, link_latency: LLMServingSim's link between NPUs (112 GiB/s, "
            "0 ns) is not applied within a node: tensor-parallel collectives and same-node KV transfers take the "
            "device's own interconnect (A6000: nvlink-bridge, 56.25 GB/s per direction, 5 µs)") in notes
    assert ("nodes[0].cpu_mem.mem_latency: 100 ns is not simulated: host-memory transfers take the device's host "
            "link (its bandwidth and latency)") in notes
    assert ("cxl_mem.num_devices: 4 devices are not simulated: each node's CXL tier is one pool, split "
            "among the engines that offload to it") in notes
    assert spec.nodes["node0"]["cxl_latency"] == pytest.approx(250e-9)
    assert "host_latency" not in spec.nodes["node0"]


def test_the_clusters_one_cxl_pool_is_shared_out_among_its_nodes(tmp_path):
    spec, notes = read_cluster_file(write(tmp_path, node(instance(tp_size=1)), node(instance(tp_size=1)),
                                          cxl_mem={"mem_size": 256, "mem_bw": 64, "mem_latency": 250}))
    assert [spec.nodes[n]["cxl_memory"] for n in ("node0", "node1")] == [128 * 2**30] * 2
    assert any(n.startswith("cxl_mem: one pool of the cluster in LLMServingSim; here each of the 2 nodes has an "
                            "equal share of it") for n in notes)


def test_between_nodes_the_link_is_the_outermost_topology_dimension(tmp_path):
    spec, _ = read_cluster_file(write(tmp_path, node(instance(tp_size=1)), node(instance(tp_size=1)),
                                      link_bw=[112, 25], link_latency=[0, 1000]))
    assert spec.links == ({"between": ("node0", "node1"), "bandwidth": 25 * 2**30, "latency": pytest.approx(1e-6)},)


# -- power --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, field, message", [
    (lambda p: p.pop("cpu"), "nodes[0].power.cpu", "missing; LLMServingSim requires it (its \"Missing required "
                                                   "key 'cpu' in power configuration\")"),
    (lambda p: p.pop("storage"), "nodes[0].power.storage", "missing; LLMServingSim requires it"),
    (lambda p: p["nic"].pop("idle_power"), "nodes[0].power.nic.idle_power", "missing; LLMServingSim requires it in "
                                                                            "nic power"),
    (lambda p: p.update(npu={"H100": p["npu"]["A6000"]}), "nodes[0].power.npu",
     "no entry for nodes[0].instances[0]'s hardware 'A6000' (entries: 'H100'); LLMServingSim needs one per hardware"),
    (lambda p: p["npu"]["A6000"].pop("standby_duration"), "nodes[0].power.npu.A6000.standby_duration",
     "missing; LLMServingSim requires it of every npu entry"),
])
def test_an_incomplete_power_section_is_an_error_as_in_llmservingsim(tmp_path, change, field, message):
    power = json.loads(json.dumps(POWER))
    change(power)
    path = write(tmp_path, node(instance(npu_num=1), power=power))
    assert f"{field}: {message}" in error_of(path)


def test_a_complete_power_section_is_read_and_an_instance_power_is_noted(tmp_path):
    spec, notes = read_cluster_file(write(tmp_path, node(instance(npu_num=1, power=POWER["npu"]["A6000"]),
                                                         power=POWER)))
    assert spec.nodes["node0"]["power"]["cpu"]["util"] == 0.15
    assert spec.instances[0].extra == {}
    assert ("nodes[0].instances[0].power: LLMServingSim does not read an instance's power (its node's power.npu "
            "entry prices the device); ignored, as there") in notes
    spec, _ = read_cluster_file(write(tmp_path, node(instance(npu_num=1, power={"idle_w": 30}))))
    assert spec.instances[0].extra == {"power": {"idle_w": 30}}  # the emulator's own fields apply


def test_a_node_without_power_beside_one_with_it_is_noted(tmp_path):
    _, notes = read_cluster_file(write(tmp_path, node(instance(npu_num=1), power=POWER), node(instance(npu_num=1))))
    assert ("power: LLMServingSim models power only when every node has a `power` section and nodes[1] has none: "
            "the sections given are applied, the other nodes' devices draw their catalogue figures") in notes
