"""A preempted request resumes from what the CPU tier holds of it, output included: with offload_prompt_only
off, vLLM's OffloadingConnector stores decode blocks too, and its lookup on re-admission reaches num_tokens
(offloading/scheduler.py get_num_new_matched_tokens), so the scheduler loads them rather than recomputing its
output. Before, the load was capped at the prompt. Virtual time only."""
from __future__ import annotations

import json

from emulator.cluster import ClusterSpec, build_cluster
from emulator.config import EngineArgs
from emulator.instance import InstanceSpec
from emulator.request import Request
from profiles.deployment import build_deployment
from tests.test_disaggregation import assert_nothing_held_or_lost


def _resumes(prompt_only: bool) -> tuple[list[Request], dict[str, tuple[int, int]]]:
    config = json.dumps({"kv_connector": "OffloadingConnector", "kv_role": "kv_both", "kv_connector_extra_config": {
        "cpu_bytes_to_use": 8 << 30, "offload_prompt_only": prompt_only}})
    deployment = build_deployment("meta-llama/Llama-3.1-8B", "H100", EngineArgs(
        max_model_len=4096, num_gpu_blocks_override=300, kv_transfer_config=config))
    sim = build_cluster(ClusterSpec((InstanceSpec("i", deployment, ("llama",)),)))
    requests = [Request(f"r{i}", 100, 3000, arrival_time=0.01 * i) for i in range(3)]  # 300 blocks hold two
    resumed: dict[str, tuple[int, int]] = {}  # a preempted request's first step back: (tokens computed, loaded)

    def on_step(record):
        for request, n in record.scheduled.items():
            if request.num_preemptions and n > 1:
                resumed.setdefault(request.request_id, (n, request.num_external_tokens))
    sim.add_listener(on_step)
    sim.run(requests)
    assert_nothing_held_or_lost(sim, requests)
    return requests, resumed


def test_a_resumed_request_loads_its_offloaded_output_instead_of_recomputing_it():
    requests, resumed = _resumes(prompt_only=False)
    assert all(r.num_output_tokens == 3000 for r in requests) and len(resumed) == 2
    for computed, loaded in resumed.values():
        assert loaded > 100  # past its 100-token prompt: decode blocks came back from the CPU tier
        assert computed < 32  # what no whole chunk held


def test_with_prompt_only_stores_a_resumed_request_recomputes_its_output():
    _, resumed = _resumes(prompt_only=True)  # vLLM's default: decode blocks are never stored
    assert resumed and all(loaded <= 100 and computed > 500 for computed, loaded in resumed.values())
