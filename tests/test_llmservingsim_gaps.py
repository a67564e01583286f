"""LLMServingSim cluster configs where the file leaves things to LLMServingSim: what it inherits from its
hardware files (npu_mem, link_bw, link_latency), where its router sends a request that names no model
(any non-decode instance, of any model), how a config that mixes plain and P/D instances is served
(a request enters at a mixed or a prefill instance, as the policy picks; a prefill goes on to decode), its
router's RR and LOAD (a turn for each side; LOAD over max_num_seqs, ties rotating), and a replayed trace's
lines that name no model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from emulator.cluster import build_cluster
from emulator.hardware import GiB, load_device
from emulator.models import load_model
from emulator.request import Request
from emulator.routing import make_policy
from loadgen.replay import ReplayError, replay
from profiles.cluster_file import ClusterFileError, read_cluster_file
from profiles.llmservingsim_cluster import llmservingsim_hardware, llmservingsim_weight_bytes

LLAMA = "meta-llama/Llama-3.1-8B"
PHI_MOE = "microsoft/Phi-mini-MoE-instruct"
QWEN_MOE = "Qwen/Qwen3-30B-A3B-Instruct-2507"
A6000_MEM = {"mem_size": 48, "mem_bw": 768, "mem_latency": 0}
CPU_MEM = {"mem_size": 128, "mem_bw": 256, "mem_latency": 0}


def instance(model: str = LLAMA, hardware: str = "A6000", **keys) -> dict:
    return {"model_name": model, "hardware": hardware, "npu_mem": dict(A6000_MEM), "pd_type": None, **keys}


def write(tmp_path: Path, *nodes: list[dict], **top) -> Path:
    config = {"num_nodes": len(nodes), **top,
              "nodes": [{"num_instances": len(n), "cpu_mem": dict(CPU_MEM), "instances": n} for n in nodes]}
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(config, indent=4))
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ClusterFileError) as err:
        read_cluster_file(path)
    return str(err.value)


# -- 1. what LLMServingSim 2.x inherits from its hardware files ----------------------------------------
def pro6000(**npu_mem) -> dict:
    """LLMServingSim's own RTX PRO 6000 example (bench/examples/RTXPRO6000/Qwen3-30B-A3B-Instruct-2507):
    npu_mem gives mem_util only, and the file no link."""
    return {"model_name": QWEN_MOE, "hardware": "RTXPRO6000", "npu_mem": {"mem_util": 0.9, **npu_mem},
            "num_npus": 1, "tp_size": 1, "pd_type": None}


def test_npu_mem_and_link_left_out_are_inherited_from_its_hardware_file(tmp_path):
    path = write(tmp_path, [pro6000()], [pro6000()])
    spec, notes = read_cluster_file(path)
    facts = llmservingsim_hardware()["RTXPRO6000"]
    assert (facts["npu_mem"]["mem_size"]["value"], facts["link_bw"]["value"], facts["link_latency"]["value"]) == \
        (95, 28.731784, 6600)
    # its KV cache: the inherited 95 GiB (not the card's 94.97) x mem_util less the weights per rank
    weights = llmservingsim_weight_bytes(load_model(QWEN_MOE), 1, 1, 1)
    assert spec.instances[0].deployment.config.kv_cache_memory_bytes == int(95 * GiB * 0.9) - int(weights)
    # two nodes: the inherited link is the link between them, in GiB/s as ASTRA-Sim reads link_bw
    (link,) = spec.links
    assert (link["between"], link["bandwidth"], link["latency"]) == (("node0", "node1"), 28.731784 * GiB, 6600e-9)
    assert ("cluster: link_bw 28.7318 GiB/s (measured), link_latency 6600 ns (measured): not given, so inherited "
            "from LLMServingSim's hardware file for RTXPRO6000, as LLMServingSim 2.x inherits it") in notes
    assert ("nodes[0].instances[0].npu_mem: mem_size 95 GiB (spec), mem_bw 1597.6 GB/s (spec), mem_latency 0 ns "
            "(assumed): not given, so inherited from LLMServingSim's hardware file for RTXPRO6000, as "
            "LLMServingSim 2.x inherits it") in notes


def test_a_value_the_file_gives_wins_and_null_is_left_out(tmp_path):
    path = write(tmp_path, [pro6000(mem_size=80, mem_bw=None)], link_bw=25, link_latency=None)
    spec, notes = read_cluster_file(path)
    deployment = spec.instances[0].deployment
    assert deployment.device.memory_bytes == 80 * GiB  # given (and 16 % off the card's: applied)
    weights = llmservingsim_weight_bytes(load_model(QWEN_MOE), 1, 1, 1)
    assert deployment.config.kv_cache_memory_bytes == int(80 * GiB * 0.9) - int(weights)
    assert ("nodes[0].instances[0].npu_mem: mem_bw 1597.6 GB/s (spec), mem_latency 0 ns (assumed): not given, so "
            "inherited from LLMServingSim's hardware file for RTXPRO6000, as LLMServingSim 2.x inherits it") in notes
    assert ("cluster: link_latency 6600 ns (measured): not given, so inherited from LLMServingSim's hardware file "
            "for RTXPRO6000, as LLMServingSim 2.x inherits it") in notes
    assert not [n for n in notes if "link_bw" in n and "inherited" in n]


def test_rtx4090_inherits_its_memory_but_has_no_link_to_inherit(tmp_path):
    rtx = {"model_name": LLAMA, "hardware": "RTX4090", "npu_mem": {"mem_util": 0.833919}, "num_npus": 1,
           "pd_type": None}
    spec, notes = read_cluster_file(write(tmp_path, [rtx]))
    weights = llmservingsim_weight_bytes(load_model(LLAMA), 1, 1, 1)
    # the KV cache of LLMServingSim's validated RTX 4090 config, which writes the same 24 GiB out
    assert spec.instances[0].deployment.config.kv_cache_memory_bytes == int(24 * GiB * 0.833919) - int(weights)
    assert ("cluster.link_bw, link_latency: not given, and LLMServingSim refuses the file (its hardware file for "
            "RTX4090 has no link measurement); here tensor-parallel collectives and same-node KV transfers take "
            "the device's own interconnect and transfers between nodes a default network") in notes


def test_hardware_without_a_file_there_is_noted_and_simulated_with_the_cards_own(tmp_path):
    path = write(tmp_path, [{"model_name": LLAMA, "hardware": "H100", "pd_type": None}],
                 [instance()])
    spec, notes = read_cluster_file(path)
    assert spec.instances[0].deployment.device.memory_bytes == load_device("H100").memory_bytes
    assert ("nodes[0].instances[0].npu_mem: mem_size, mem_bw, mem_latency not given, and LLMServingSim has no "
            "hardware file for H100 to inherit it from (it refuses the file); H100's own figures are "
            "simulated") in notes
    assert any(n.startswith("cluster.link_bw, link_latency: not given, and LLMServingSim refuses the file (the "
                            "cluster mixes hardware (A6000, H100), so there is no one link to inherit)")
               for n in notes)
    assert spec.links == ()  # between the nodes: the emulator's default network


def test_an_inherited_figure_is_read_as_the_field_it_fills(tmp_path):
    """A bad value the file gives is still an error naming its field."""
    path = write(tmp_path, [pro6000(mem_size="lots")])
    assert "nodes[0].instances[0].npu_mem.mem_size: expected GB, got 'lots'" in error_of(path)


# -- 2. a request naming no model: any non-decode instance, of any model -------------------------------
def two_models(tmp_path: Path, **top) -> Path:
    return write(tmp_path, [instance(LLAMA, npu_num=1, npu_group=1), instance(PHI_MOE, npu_num=1, npu_group=1)],
                 link_bw=112, link_latency=0, **top)


def run(sim, n: int, model: str | None = None) -> list[str]:
    """n requests, one a millisecond, run to the end: the instance each one finished on."""
    batch = [Request(f"r{i}", 64, 4, arrival_time=i * 1e-3, model=model) for i in range(n)]
    sim.run(batch)
    assert all(r.num_output_tokens == 4 for r in batch)
    return [sim.instance_of[r.engine_index].name for r in batch]


def test_a_request_naming_no_model_goes_round_robin_over_every_models_instances(tmp_path):
    spec, _ = read_cluster_file(two_models(tmp_path))
    assert (spec.routing, spec.entry) == ("llmservingsim_rr", "any_non_decode")  # 2.0's default, RR
    sim = build_cluster(spec)
    assert run(sim, 6) == ["instance0", "instance1"] * 3
    assert dict(sim.routing_decisions) == {"instance0": 3, "instance1": 3}


def test_a_request_naming_a_model_goes_to_that_models_instances(tmp_path):
    sim = build_cluster(read_cluster_file(two_models(tmp_path))[0])
    assert run(sim, 4, PHI_MOE) == ["instance1"] * 4


def test_unnamed_requests_go_to_the_least_loaded_instance_of_any_model_under_load(tmp_path):
    spec, _ = read_cluster_file(two_models(tmp_path, routing="LOAD"))
    sim = build_cluster(spec)
    for request in [Request(f"r{i}", 64, 200, arrival_time=0.0) for i in range(4)]:
        sim.submit(request)
    assert dict(sim.routing_decisions) == {"instance0": 2, "instance1": 2}


# -- 3. mixed and P/D instances in one config ----------------------------------------------------------
def mixed_and_pd(tmp_path: Path) -> Path:
    return write(tmp_path, [instance(npu_num=1, npu_group=1), instance(npu_num=1, npu_group=1, pd_type="prefill"),
                            instance(npu_num=1, npu_group=1, pd_type="decode")], link_bw=112, link_latency=0)


def test_requests_enter_at_the_mixed_and_the_prefill_instance_in_turn(tmp_path):
    spec, _ = read_cluster_file(mixed_and_pd(tmp_path))
    assert [i.role for i in spec.instances] == ["mixed", "prefill", "decode"]
    sim = build_cluster(spec)
    # RR over the non-decode instances; each prefill then goes on to the decode instance
    assert run(sim, 4, LLAMA) == ["instance0", "instance2", "instance0", "instance2"]
    assert dict(sim.routing_decisions) == {"instance0": 2, "instance1": 2, "instance2": 2}


def test_an_unnamed_request_enters_at_a_prefill_instance_too(tmp_path):
    sim = build_cluster(read_cluster_file(mixed_and_pd(tmp_path))[0])
    assert run(sim, 2) == ["instance0", "instance2"]


@pytest.mark.parametrize("roles, field, message", [
    (["prefill"], "nodes[0].instances[1].pd_type",
     "prefill instances without a decode instance: LLMServingSim hands every prefill from a prefill instance to a "
     "decode instance"),
    (["decode", "decode"], "nodes[0].instances[0].pd_type",
     "every instance is a decode instance: LLMServingSim sends requests to the others"),
])
def test_pd_instances_its_router_cannot_use_are_an_error_naming_pd_type(tmp_path, roles, field, message):
    members = [instance(npu_num=1, npu_group=1, pd_type=role) for role in roles]
    if roles == ["prefill"]:
        members.insert(0, instance(npu_num=1, npu_group=1))
    path = write(tmp_path, members, link_bw=112, link_latency=0)
    assert f"{field}: {message}" in error_of(path)


def test_pd_instances_of_two_models_are_an_error_naming_the_model(tmp_path):
    path = write(tmp_path, [instance(npu_num=1, npu_group=1, pd_type="prefill"),
                            instance(PHI_MOE, npu_num=1, npu_group=1, pd_type="decode")], link_bw=112, link_latency=0)
    assert ("nodes[0].instances[1].model_name: prefill and decode instances of meta-llama/Llama-3.1-8B "
            "(nodes[0].instances[0]) and microsoft/Phi-mini-MoE-instruct: LLMServingSim hands a prefill to any "
            "decode instance, whatever its model, so P/D instances of more than one model are not "
            "simulated") in error_of(path)


def test_decode_instances_without_a_prefill_instance_take_nothing_and_are_noted(tmp_path):
    path = write(tmp_path, [instance(npu_num=1, npu_group=1), instance(npu_num=1, npu_group=1, pd_type="decode")],
                 link_bw=112, link_latency=0)
    spec, notes = read_cluster_file(path)
    assert ("nodes[0].instances[1].pd_type: decode instances without a prefill instance take no request, as in "
            "LLMServingSim (only a prefill instance hands requests to them)") in notes
    sim = build_cluster(spec)
    assert run(sim, 3, LLAMA) == ["instance0"] * 3


def test_a_request_rerouted_from_a_failed_mixed_instance_may_enter_at_the_prefill_instance(tmp_path):
    sim = build_cluster(read_cluster_file(mixed_and_pd(tmp_path))[0])
    sim.schedule(1e-6, lambda: sim.fail_instance("instance0", reroute=True))  # before its first token
    assert run(sim, 1, LLAMA) == ["instance2"]  # prefilled on instance1, decoded on instance2
    assert dict(sim.routing_decisions) == {"instance0": 1, "instance1": 1, "instance2": 1}


# -- 4. its router: RR and LOAD, each with a turn for the requests it sends in and one for decode ----------
def two_by_two(tmp_path: Path, **top) -> Path:
    return write(tmp_path, [instance(npu_num=1, npu_group=1, pd_type=role) for role in
                            ("prefill", "prefill", "decode", "decode")], link_bw=112, link_latency=0, **top)


def test_rr_keeps_one_turn_for_entries_and_another_for_decode_instances(tmp_path):
    """Each request is done before the next arrives: a shared turn would send every one to the second decode
    instance (entry 0, decode 1, entry 2, decode 3, ...); LLMServingSim's two turns alternate both sides."""
    sim = build_cluster(read_cluster_file(two_by_two(tmp_path))[0])
    batch = [Request(f"r{i}", 64, 4, arrival_time=float(i)) for i in range(4)]
    sim.run(batch)
    assert [sim.instance_of[r.engine_index].name for r in batch] == ["instance2", "instance3"] * 2
    assert dict(sim.routing_decisions) == {f"instance{i}": 2 for i in range(4)}


def test_the_emulators_own_round_robin_turns_as_llmservingsims_rr(tmp_path):
    spec, _ = read_cluster_file(two_by_two(tmp_path, routing="round_robin"))
    sim = build_cluster(spec)
    batch = [Request(f"r{i}", 64, 4, arrival_time=float(i)) for i in range(4)]
    sim.run(batch)
    assert [sim.instance_of[r.engine_index].name for r in batch] == ["instance2", "instance3"] * 2
    assert dict(sim.routing_decisions) == {f"instance{i}": 2 for i in range(4)}


def test_load_rotates_equal_loads_where_least_loaded_takes_the_first(tmp_path):
    """Idle instances (every request done before the next arrives) score alike: the scan starts past the
    last instance chosen."""
    three = write(tmp_path, [instance(npu_num=1, npu_group=1) for _ in range(3)], link_bw=112, link_latency=0,
                  routing="LOAD")
    spec, _ = read_cluster_file(three)
    assert (spec.routing, spec.routing_params) == ("llmservingsim_load", {})
    sim = build_cluster(spec)
    batch = [Request(f"r{i}", 64, 4, arrival_time=float(i)) for i in range(5)]
    sim.run(batch)
    assert [sim.instance_of[r.engine_index].name for r in batch] == \
        ["instance0", "instance1", "instance2", "instance0", "instance1"]


def placements(spec, n: int) -> list[str]:
    """n requests at time 0, placed one after another (each waits, so it counts 4 on its instance)."""
    sim = build_cluster(spec)
    out = []
    for i in range(n):
        sim.submit(Request(f"r{i}", 64, 200, arrival_time=0.0))
        out.append(next(name for name, count in sim.routing_decisions.items() if count > out.count(name)))
    return out


def test_load_divides_the_load_by_max_num_seqs(tmp_path):
    """max_num_seqs 4 and 8: the scores are waiting x 4 / 4 and / 8. The third request finds 1 and 0.5
    (least_loaded's raw 4 and 4 would tie and take instance0); the fourth a tie, 1 and 1, from the turn
    the third left at instance0."""
    path = write(tmp_path, [instance(npu_num=1, npu_group=1, max_num_seqs=4),
                            instance(npu_num=1, npu_group=1, max_num_seqs=8)], link_bw=112, link_latency=0,
                 routing="LOAD")
    spec, _ = read_cluster_file(path)
    assert placements(spec, 5) == ["instance0", "instance1", "instance1", "instance0", "instance1"]


def test_load_scores_an_instance_without_a_sequence_limit_by_its_raw_load(tmp_path):
    """max_num_seqs 0 (no limit there: its score is not divided) beside max_num_seqs 4."""
    path = write(tmp_path, [instance(npu_num=1, npu_group=1, max_num_seqs=4),
                            instance(npu_num=1, npu_group=1, max_num_seqs=0)], link_bw=112, link_latency=0,
                 routing="LOAD")
    spec, _ = read_cluster_file(path)
    assert spec.routing_params == {"unlimited": ("instance1",)}
    # scores (instance0 / 4, instance1 raw): 0|0 -> 0; 1|0 -> 1; 1|4 -> 0; 2|4 -> 0; 3|4 -> 0; 4|4, tie from 1
    assert placements(spec, 6) == ["instance0", "instance1", "instance0", "instance0", "instance0", "instance1"]


def test_load_keeps_a_turn_for_decode_instances_too(tmp_path):
    """Two idle decode instances tie at every hand-over: they alternate, whatever the entries did."""
    spec, _ = read_cluster_file(two_by_two(tmp_path, routing="LOAD"))
    sim = build_cluster(spec)
    batch = [Request(f"r{i}", 64, 4, arrival_time=float(i)) for i in range(4)]
    sim.run(batch)
    assert [sim.instance_of[r.engine_index].name for r in batch] == ["instance2", "instance3"] * 2


def test_llmservingsim_policies_take_their_parameters_by_name():
    assert make_policy("llmservingsim_load", unlimited=["a"]).unlimited == {"a"}
    with pytest.raises(ValueError, match="routing policy 'llmservingsim_rr'"):
        make_policy("llmservingsim_rr", unlimited=["a"])


# -- 5. replay --cluster: a trace line naming no model ----------------------------------------------------
def trace(tmp_path: Path, *input_lens: int) -> Path:
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps({"input_toks": n, "output_toks": 4, "arrival_time_ns": i * 10**6}) + "\n"
                            for i, n in enumerate(input_lens)))
    return path


def test_replayed_lines_naming_no_model_go_to_every_models_instances(tmp_path):
    spec, _ = read_cluster_file(two_models(tmp_path))
    replay(str(trace(tmp_path, *[64] * 4)), spec, tmp_path / "out")
    records = [json.loads(line) for line in (tmp_path / "out" / "requests.jsonl").read_text().splitlines()]
    assert [(r["instance"], r["model"]) for r in records] == [("instance0", LLAMA), ("instance1", PHI_MOE)] * 2


def test_a_replayed_line_naming_no_model_goes_where_it_fits_and_must_fit_one_models_context(tmp_path):
    spec, _ = read_cluster_file(two_models(tmp_path))
    contexts = {i.name: i.deployment.config.max_model_len for i in spec.instances}
    shortest, longest = min(contexts.values()), max(contexts.values())
    assert shortest < longest
    replay(str(trace(tmp_path, 64, shortest)), spec, tmp_path / "out")
    records = [json.loads(line) for line in (tmp_path / "out" / "requests.jsonl").read_text().splitlines()]
    assert contexts[records[1]["instance"]] == longest and records[1]["output_tokens"] == 4
    with pytest.raises(ReplayError, match=f"trace.jsonl:2: prompt of {longest} tokens does not fit "
                                          f"max_model_len={longest} \\(vLLM answers 400"):
        replay(str(trace(tmp_path, 64, longest)), spec, tmp_path / "out2")
