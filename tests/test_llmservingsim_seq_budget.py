"""LLMServingSim cluster configs whose max_num_seqs is above the token budget: LLMServingSim takes them, vLLM
refuses them (max_num_batched_tokens must be >= max_num_seqs). Its scheduler admits a waiting request only while
the step's token budget lasts, after every running request has taken a token of it, so its running set never
outgrows the budget: the import runs the instance with max_num_seqs = the budget, says so at start-up, and its
LOAD router still divides by the file's figure."""
from __future__ import annotations

import pytest

from emulator.config import ConfigError, EngineArgs, resolve
from emulator.hardware import load_device
from emulator.models import load_model
from profiles.cluster_file import read_cluster_file
from test_llmservingsim_gaps import LLAMA, instance, placements, write

LINK = {"link_bw": 112, "link_latency": 0}


def x2(**keys) -> dict:
    return instance(num_npus=1, tp_size=1, **keys)  # LLMServingSim 2.x's spelling


def test_vllm_refuses_what_llmservingsim_takes():
    with pytest.raises(ConfigError, match=r"max_num_batched_tokens \(2048\) must be greater than or equal to "
                                          r"max_num_seqs \(4096\)"):
        resolve(EngineArgs(max_num_seqs=4096, max_num_batched_tokens=2048), load_model(LLAMA), load_device("A6000"))


@pytest.mark.parametrize("keys", [{"num_npus": 1, "tp_size": 1}, {"npu_num": 1, "npu_group": 1}], ids=["2.x", "2.0"])
def test_max_num_seqs_above_the_default_budget_runs_as_many_as_the_budget(tmp_path, keys):
    spec, notes = read_cluster_file(write(tmp_path, [instance(max_num_seqs=4096, **keys)], **LINK))
    config = spec.instances[0].deployment.config
    assert (config.max_num_seqs, config.max_num_batched_tokens) == (2048, 2048)  # LLMServingSim's default budget
    assert any("nodes[0].instances[0].max_num_seqs: 4096, above the token budget (2048), which vLLM refuses: 2048, "
               "as many as LLMServingSim's scheduler runs at once; its LOAD router still scores the instance over "
               "4096" in note for note in notes)


def test_a_budget_given_bounds_it_and_one_at_or_above_leaves_it(tmp_path):
    path = write(tmp_path, [x2(max_num_seqs=300, max_num_batched_tokens=256),
                            x2(max_num_seqs=300, max_num_batched_tokens=300),
                            x2(max_num_seqs=300, max_num_batched_tokens=4096)], **LINK)
    spec, notes = read_cluster_file(path)
    assert [i.deployment.config.max_num_seqs for i in spec.instances] == [256, 300, 300]
    assert sum("above the token budget" in note for note in notes) == 1
    assert spec.routing_params == {"max_num_seqs": {"instance0": 300}}


def test_pipeline_parallel_instances_say_where_llmservingsim_differs(tmp_path):
    spec, notes = read_cluster_file(write(tmp_path, [instance(num_npus=2, tp_size=1, pp_size=2, max_num_seqs=3000)],
                                          **LINK))
    assert spec.instances[0].deployment.config.max_num_seqs == 2048
    assert any("with pp_size 2 its running set may outgrow the budget while a batch is in flight, not here" in note
               for note in notes)


def test_load_scores_the_capped_instance_over_the_files_max_num_seqs(tmp_path):
    """4096 (run as 2048) beside 2048: instance0's load is divided by 4096, so it takes twice the requests
    before the scores meet (dividing both by 2048 would alternate them)."""
    path = write(tmp_path, [x2(max_num_seqs=4096), x2(max_num_seqs=2048)], routing="LOAD", **LINK)
    spec, _ = read_cluster_file(path)
    assert spec.routing_params == {"max_num_seqs": {"instance0": 4096}}
    assert [i.deployment.config.max_num_seqs for i in spec.instances] == [2048, 2048]
    # scores (waiting x 4 over 4096 | over 2048): 0|0; 1/1024|0; 1/1024|1/512; 1/512|1/512, tie from instance1;
    # 1/512|1/256; 3/1024|1/256; 1/256|1/256, tie from instance1
    assert placements(spec, 7) == ["instance0", "instance1", "instance0", "instance1", "instance0", "instance0",
                                   "instance1"]


def test_round_robin_takes_no_limits(tmp_path):
    spec, _ = read_cluster_file(write(tmp_path, [x2(max_num_seqs=4096), x2()], routing="RR", **LINK))
    assert spec.routing == "llmservingsim_rr" and spec.routing_params == {}
