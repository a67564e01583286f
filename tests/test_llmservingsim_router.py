"""LLMServingSim's router as an imported cluster config runs it (emulator.routing's llmservingsim_rr and
llmservingsim_load, following llmservingsim/serving/core/router.py and the main loop of
llmservingsim/serving/__main__.py): when a request is routed and on which load, each member of a DP group
an instance of its own, a rank pinned by X-data-parallel-rank, and the scheduler defaults (sequence limit,
token budget, ...) an instance gets when its config sets none."""
from __future__ import annotations

import json
from pathlib import Path

from emulator.cluster import build_cluster
from emulator.request import Request
from profiles.cluster_file import read_cluster_file

LLAMA = "meta-llama/Llama-3.1-8B"
A6000_MEM = {"mem_size": 48, "mem_bw": 768, "mem_latency": 0}


def instance(**keys) -> dict:
    """A 2.x instance (num_npus/tp_size) of Llama 3.1 8B on an A6000."""
    return {"model_name": LLAMA, "hardware": "A6000", "npu_mem": dict(A6000_MEM), "num_npus": 1, "tp_size": 1,
            "pd_type": None, **keys}


def write(tmp_path: Path, *instances: dict, **top) -> Path:
    config = {"num_nodes": 1, "link_bw": 112, "link_latency": 0, **top,
              "nodes": [{"num_instances": len(instances), "cpu_mem": {"mem_size": 128, "mem_bw": 256,
                                                                     "mem_latency": 0},
                         "instances": list(instances)}]}
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(config, indent=4))
    return path


def engines_of(sim, batch: list[Request]) -> list[int]:
    sim.run(batch)
    assert all(r.finish_reason == "length" for r in batch)
    return [r.engine_index for r in batch]


# -- 1. when it routes: at the main loop's next pass, on the counts of that moment -----------------------
def test_requests_arriving_within_one_iteration_are_routed_in_turn_on_the_loads_at_its_end(tmp_path):
    """Both instances are in their first prefill when r2 and r3 arrive: LLMServingSim routes them at the end of
    that iteration, one after the other, before its completions; each sees the other's running request
    (1 / 128) and r3 also r2 waiting on instance0 (4 more)."""
    spec, _ = read_cluster_file(write(tmp_path, instance(), instance()))  # 2.x: LOAD by default
    sim = build_cluster(spec)
    batch = [Request("r0", 2000, 8, arrival_time=0.0), Request("r1", 2000, 8, arrival_time=0.0),
             Request("r2", 64, 4, arrival_time=1e-3), Request("r3", 64, 4, arrival_time=2e-3)]
    assert engines_of(sim, batch) == [0, 1, 0, 1]
    # r2 and r3 came while every engine was busy with its first step
    assert min(batch[0].first_token_time, batch[1].first_token_time) > batch[3].arrival_time


def test_a_request_arriving_as_an_iteration_ends_sees_that_iterations_requests_still_running(tmp_path):
    """r0 (one output token) ends with its first iteration, at T; r2 arrives at T. LLMServingSim routes before
    it applies that iteration's completions (route_arrived_requests, then add_done), so instance0 still counts
    r0: 1 / max_num_seqs 1 against instance1's 1 / 2, and r2 goes to instance1 (after r0's completion
    instance0's 0 would have taken it)."""
    path = write(tmp_path, instance(max_num_seqs=1), instance(max_num_seqs=2))
    alone = build_cluster(read_cluster_file(path)[0])
    first = Request("r0", 512, 1, arrival_time=0.0)
    alone.run([first])
    end = first.finish_time
    sim = build_cluster(read_cluster_file(path)[0])
    batch = [Request("r0", 512, 1, arrival_time=0.0), Request("r1", 4000, 64, arrival_time=0.0),
             Request("r2", 64, 4, arrival_time=end)]
    assert engines_of(sim, batch) == [0, 1, 1]
    assert batch[0].finish_time == end


# -- 2. a DP group: each member an instance of its router's ------------------------------------------
def dp_cluster(tmp_path: Path, routing: str) -> Path:
    """DP group A's two members listed around a plain instance, as LLMServingSim lists its schedulers:
    A's first member, the plain instance, A's second member."""
    return write(tmp_path, instance(dp_group="A"), instance(), instance(dp_group="A"), routing=routing)


def test_rr_turns_over_the_members_of_a_dp_group_in_the_files_order(tmp_path):
    spec, _ = read_cluster_file(dp_cluster(tmp_path, "RR"))
    assert [i.deployment.config.data_parallel_size for i in spec.instances] == [2, 1]
    assert spec.routing_params == {"members": ("instance0", "instance1", "instance0")}
    sim = build_cluster(spec)
    batch = [Request(f"r{i}", 64, 4, arrival_time=float(i)) for i in range(6)]
    # engines: instance0's ranks 0 and 1, instance1's 2; the group takes two requests in three
    assert engines_of(sim, batch) == [0, 2, 1] * 2
    assert dict(sim.routing_decisions) == {"instance0": 4, "instance1": 2}


def test_load_scores_each_member_of_a_dp_group_on_its_own(tmp_path):
    """Six requests at once, in the members' turn (A's first, the plain one, A's second) as each holds one
    waiting request (4 / 128) when the fourth comes: the turn is back at A's first member. Scored as one
    instance, the group's 8 / (2 x 128) would tie the plain instance's 4 / 128 and the turn give it to the
    plain instance."""
    spec, _ = read_cluster_file(dp_cluster(tmp_path, "LOAD"))
    assert spec.routing_params == {"members": ("instance0", "instance1", "instance0")}
    sim = build_cluster(spec)
    batch = [Request(f"r{i}", 64, 4, arrival_time=0.0) for i in range(6)]
    assert engines_of(sim, batch) == [0, 2, 1] * 2


def test_a_cluster_of_one_dp_group_still_has_its_router_pick_the_member(tmp_path):
    spec, _ = read_cluster_file(write(tmp_path, instance(dp_group="A"), instance(dp_group="A"), routing="RR"))
    sim = build_cluster(spec)
    batch = [Request(f"r{i}", 64, 4, arrival_time=float(i)) for i in range(4)]
    assert engines_of(sim, batch) == [0, 1, 0, 1]


# -- 3. the sequence limit of an instance that sets none ---------------------------------------------------
def test_a_2x_instance_without_max_num_seqs_gets_llmservingsims_128(tmp_path):
    path = write(tmp_path, instance(), instance(max_num_seqs=64))
    spec, _ = read_cluster_file(path)
    assert [i.deployment.config.max_num_seqs for i in spec.instances] == [128, 64]
    # the command line's flag stands where LLMServingSim's --max-num-seqs does
    spec, _ = read_cluster_file(path, base_args={"max_num_seqs": 32})
    assert [i.deployment.config.max_num_seqs for i in spec.instances] == [32, 64]


def test_a_2x_dp_group_without_max_num_seqs_gets_128_per_member(tmp_path):
    spec, _ = read_cluster_file(write(tmp_path, instance(dp_group="A"), instance(dp_group="A")))
    assert spec.instances[0].deployment.config.max_num_seqs == 128


def test_a_20_instance_without_max_num_seqs_keeps_vllms_default_with_a_note(tmp_path):
    """2.0 has no limit by default (its --max-batch 0); the most vLLM accepts would make vLLM's memory profiling
    reserve room for that many sequences, so it is what `max_num_seqs: 0` asks for, not the default."""
    two_oh = {"model_name": LLAMA, "hardware": "A6000", "npu_mem": dict(A6000_MEM), "npu_num": 1, "npu_group": 1,
              "pd_type": None}
    spec, notes = read_cluster_file(write(tmp_path, two_oh, {**two_oh, "max_num_seqs": 16}, routing="LOAD"))
    default, limited = (i.deployment.config for i in spec.instances)
    assert (default.max_num_seqs, limited.max_num_seqs) == (256, 16)  # vLLM's default on an A6000
    assert spec.routing_params == {}
    assert ("nodes[0].instances[0]: no max_num_seqs, which LLMServingSim 2.0 runs without a sequence limit (its "
            "--max-batch default 0); here vLLM's default (max_num_seqs 0 asks for the most vLLM accepts, whose "
            "memory profiling then reserves room for that many sequences)") in notes


def test_a_prefill_dp_groups_members_take_the_entering_requests_in_turn(tmp_path):
    """Prefill group P's members and two decode instances: RR's entry turn goes over P's members, its decode
    turn over the decode instances."""
    path = write(tmp_path, instance(dp_group="P", pd_type="prefill"), instance(pd_type="decode"),
                 instance(dp_group="P", pd_type="prefill"), instance(pd_type="decode"), routing="RR")
    sim = build_cluster(read_cluster_file(path)[0])
    ran = []
    sim.add_finish_listener(lambda r: ran.append((r.request_id, r.engine_index)), prefills=True)
    sim.run([Request(f"r{i}", 64, 4, arrival_time=float(i)) for i in range(4)])
    # engines: P's ranks 0 and 1, then the decode instances' 2 and 3
    assert ran == [(f"r{i}{side}", engine) for i in range(4)
                   for side, engine in (("@prefill", i % 2), ("", 2 + i % 2))]


def test_a_prefill_dp_groups_member_is_the_one_the_router_picked_when_vllms_balancer_would_pick_another(tmp_path):
    """Prefill group P's members and a decode instance, LOAD. r0 (6000 tokens) goes to P0 and r1 (16) to P1,
    whose prefill is soon done; r2 arrives while r0's prefill still runs: LOAD picks the idle member P1, and
    its prefill runs there (vLLM's DP balancer, left to choose the rank, puts it on rank 0, behind r0)."""
    path = write(tmp_path, instance(dp_group="P", pd_type="prefill"), instance(dp_group="P", pd_type="prefill"),
                 instance(pd_type="decode"), routing="LOAD")
    sim = build_cluster(read_cluster_file(path)[0])
    ran = {}
    sim.add_finish_listener(lambda r: ran.setdefault(r.request_id, (r.engine_index, r.finish_time)), prefills=True)
    sim.run([Request("r0", 6000, 4, arrival_time=0.0), Request("r1", 16, 4, arrival_time=0.0),
             Request("r2", 16, 4, arrival_time=0.05)])
    assert [ran[f"r{i}@prefill"][0] for i in range(3)] == [0, 1, 1]
    assert ran["r1@prefill"][1] < 0.05 < ran["r2@prefill"][1] < ran["r0@prefill"][1]  # P1 was idle at r2's pick


def test_load_counts_a_request_handed_to_a_decode_instance_as_running(tmp_path):
    """r0 decodes on D0 (max_num_seqs 2: 1 / 2); r1 and r2 end their prefills in one iteration and are handed
    over one after the other: r1 to D1 (max_num_seqs 8, idle), then r2 finds D1 holding r1, which LLMServingSim's
    add_decode put in running (1 / 8) while its KV is still on its way here; as waiting (4 / 8) it would tie
    D0 and the turn give r2 to D0."""
    path = write(tmp_path, instance(pd_type="prefill"), instance(pd_type="decode", max_num_seqs=2),
                 instance(pd_type="decode", max_num_seqs=8))
    sim = build_cluster(read_cluster_file(path)[0])
    batch = [Request("r0", 64, 400, arrival_time=0.0), Request("r1", 64, 4, arrival_time=0.5),
             Request("r2", 64, 4, arrival_time=0.5)]
    assert engines_of(sim, batch) == [1, 2, 2]
    assert batch[0].finish_time > batch[2].first_token_time  # r0 was still decoding on D0


# -- 4. a rank pinned by X-data-parallel-rank --------------------------------------------------------------
def test_a_pinned_routed_request_leaves_no_member_choice_behind(tmp_path):
    """Group A's two members, RR. r0 and r1 come in on instance0's own port pinned to rank 0; r2 comes through
    the router pinned to rank 1, where its pin puts it though RR's turn picked member A0; r3 then comes in on
    instance0's own port with no pin: vLLM's balancer places it (on rank 1, the emptier), as it does behind
    any other policy, not the router's leftover choice for r2 (rank 0). The turn still moved: r4 goes to A1."""
    def placed(routing: str) -> list[int]:
        sim = build_cluster(read_cluster_file(write(tmp_path, instance(dp_group="A"), instance(dp_group="A"),
                                                    routing=routing))[0])
        own_port = sim.instance("instance0")
        arrivals = [(0, own_port), (0, own_port), (1, None), (None, own_port), (None, None)]  # (pin, port)
        return [sim.submit(Request(f"r{i}", 64, 4), pin, port).index for i, (pin, port) in enumerate(arrivals)]
    assert placed("RR")[:4] == placed("round_robin")[:4] == [0, 0, 1, 1]
    assert placed("RR")[4] == 1


def test_a_pick_is_the_rank_of_the_request_it_was_made_for_only(tmp_path):
    """The policy answers for the request it picked for, once: a request placed without a pick of its own (one
    that came in on the instance's port) gets none, nor does the picked one asked a second time."""
    spec, _ = read_cluster_file(write(tmp_path, instance(dp_group="A"), instance(dp_group="A"), routing="RR"))
    sim = build_cluster(spec)
    router, group = sim.routing, sim.instance("instance0")
    picked, other = Request("r0", 64, 4), Request("r1", 64, 4)
    assert router.pick(picked, [group]) is group
    assert router.rank_for(other, group) is None
    router.pick(picked, [group])
    assert router.rank_for(picked, group) == 1 and router.rank_for(picked, group) is None


def test_a_pinned_request_entering_at_a_prefill_dp_group_runs_its_prefill_on_the_pinned_rank(tmp_path):
    """Prefill group P's members and a decode instance, RR: r0 comes through the router pinned to rank 1, where
    its prefill runs though RR's turn picked member P0; r1, unpinned, takes the next turn (P1)."""
    path = write(tmp_path, instance(dp_group="P", pd_type="prefill"), instance(dp_group="P", pd_type="prefill"),
                 instance(pd_type="decode"), routing="RR")
    sim = build_cluster(read_cluster_file(path)[0])
    assert [sim.submit(Request(f"r{i}", 64, 4), pin).index for i, pin in enumerate((1, None))] == [1, 1]
    sim.run([])


# -- 5. its other scheduler defaults, where vLLM's differ ----------------------------------------------------
H100_MEM = {"mem_size": 80, "mem_bw": 3350, "mem_latency": 0}


def test_a_2x_instance_gets_llmservingsims_token_budget_and_memory_utilisation(tmp_path):
    """On an H100 vLLM's serve would batch 8,192 tokens; LLMServingSim's --max-num-batched-tokens is 2,048, its
    --npu-memory-utilization 0.9 (vLLM's 0.92); prefix caching and chunked prefill stay on, as in both."""
    path = write(tmp_path, instance(hardware="H100", npu_mem=dict(H100_MEM)),
                 instance(hardware="H100", npu_mem=dict(H100_MEM), max_num_batched_tokens=4096))
    default, own = (i.deployment.config for i in read_cluster_file(path)[0].instances)
    assert (default.max_num_batched_tokens, own.max_num_batched_tokens) == (2048, 4096)
    assert default.gpu_memory_utilization == 0.9
    assert default.enable_prefix_caching and default.enable_chunked_prefill and default.block_size == 16
    # the command line's flags stand where LLMServingSim's do
    spec, _ = read_cluster_file(path, base_args={"max_num_batched_tokens": 8192, "gpu_memory_utilization": 0.8})
    assert [(i.deployment.config.max_num_batched_tokens, i.deployment.config.gpu_memory_utilization)
            for i in spec.instances] == [(8192, 0.8), (4096, 0.8)]


def test_a_20_instance_gets_its_token_budget_and_no_prefix_caching_and_a_note_on_chunking(tmp_path):
    two_oh = {"model_name": LLAMA, "hardware": "H100", "npu_mem": dict(H100_MEM), "npu_num": 1, "npu_group": 1,
              "pd_type": None}
    spec, notes = read_cluster_file(write(tmp_path, two_oh, {**two_oh, "enable_prefix_caching": True}))
    default, caching = (i.deployment.config for i in spec.instances)
    assert default.max_num_batched_tokens == 2048
    assert (default.enable_prefix_caching, caching.enable_prefix_caching) == (False, True)
    assert default.gpu_memory_utilization == 0.92  # 2.0 has no such fraction (its KV cache: npu_mem - weights)
    assert ("LLMServingSim 2.0 does not chunk prefills (its scheduler takes a prompt whole, within "
            "max_num_batched_tokens); here vLLM's chunked prefill") in notes
    spec, notes = read_cluster_file(write(tmp_path, two_oh), base_args={"enable_prefix_caching": True})
    assert spec.instances[0].deployment.config.enable_prefix_caching
