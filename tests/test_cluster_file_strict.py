"""A cluster file says each thing once: a key given twice, one setting under two spellings, or one
vLLM engine_id for two instances is an error naming the file, the line and the field; LLMServingSim's
JSON is read against the keys LLMServingSim reads (its per-instance overrides applied, others noted)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from profiles.cluster_file import ClusterFileError, read_cluster_file

LLAMA = "meta-llama/Llama-3.1-8B"


def write(tmp_path: Path, text: str, name: str = "cluster.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ClusterFileError) as err:
        read_cluster_file(path)
    return str(err.value)


# -- a key given twice ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text, where", [
    (f"routing: round_robin\ninstances:\n  - {{model: {LLAMA}, hardware: H100}}\nrouting: least_loaded\n",
     ":4: routing: given twice (first on line 1)"),
    (f"instances:\n  - model: {LLAMA}\n    hardware: H100\n    max-num-seqs: 8\n    max-num-seqs: 16\n",
     ":5: instances[0].max-num-seqs: given twice (first on line 4)"),
    (f"instances:\n  - {{model: {LLAMA}, hardware: H100}}\n  - model: {LLAMA}\n    hardware: H100\n"
     "    engine:\n      block-size: 16\n      block-size: 32\n", ":7: instances[1].engine.block-size: given twice"),
    (f"nodes:\n  box:\n    host_memory: 1TiB\n    host_memory: 2TiB\ninstances:\n"
     f"  - {{model: {LLAMA}, hardware: H100, node: box}}\n", ":4: nodes.box.host_memory: given twice"),
])
def test_a_key_given_twice_is_an_error_on_its_second_line(tmp_path, text, where):
    path = write(tmp_path, text)
    assert f"{path}{where}" in error_of(path)


def test_a_key_given_twice_in_llmservingsim_json_is_an_error_too(tmp_path):
    path = write(tmp_path, '{"num_nodes": 1,\n "nodes": [],\n "num_nodes": 2}\n', "cluster.json")
    assert f"{path}:3: num_nodes: given twice (first on line 1)" in error_of(path)


# -- one setting, two spellings ------------------------------------------------------------------------
@pytest.mark.parametrize("flags, where", [
    ("tp: 2, tensor-parallel-size: 2", "instances[0].tensor-parallel-size: 'tensor-parallel-size' and 'tp' (line 2) "
                                       "both set tensor_parallel_size"),
    ("tensor_parallel_size: 1, tp: 2", "instances[0].tp: 'tp' and 'tensor_parallel_size' (line 2) both set "
                                       "tensor_parallel_size"),
    ("max-num-seqs: 8, max_num_seqs: 8", "instances[0].max_num_seqs: 'max_num_seqs' and 'max-num-seqs' (line 2) "
                                         "both set max_num_seqs"),
    ("served-model-name: a, served_model_name: b", "instances[0].served_model_name: 'served_model_name' and "
                                                   "'served-model-name' (line 2) both set served_model_name"),
])
def test_one_setting_under_two_spellings_is_an_error_naming_both(tmp_path, flags, where):
    path = write(tmp_path, f"instances:\n  - {{model: {LLAMA}, hardware: H100, {flags}}}\n")
    assert f"{path}:2: {where}; keep one" in error_of(path)


def test_a_flag_beside_an_instance_fields_and_under_its_engine_is_set_twice(tmp_path):
    path = write(tmp_path, f"instances:\n  - model: {LLAMA}\n    hardware: H100\n    tp: 1\n    engine:\n"
                           "      tensor-parallel-size: 2\n")
    assert (f"{path}:6: instances[0].engine.tensor-parallel-size: 'tensor-parallel-size' and 'tp' (line 4) both set "
            "tensor_parallel_size; keep one") in error_of(path)


def test_the_cluster_engine_section_is_still_every_instance_default_that_an_instance_overrides(tmp_path):
    path = write(tmp_path, f"engine: {{tp: 1, max-num-seqs: 32}}\ninstances:\n"
                           f"  - {{name: a, model: {LLAMA}, hardware: H100, max-num-seqs: 64}}\n"
                           f"  - {{name: b, model: {LLAMA}, hardware: H100}}\n")
    spec, _ = read_cluster_file(path)
    assert [i.deployment.config.max_num_seqs for i in spec.instances] == [64, 32]


def test_two_instances_may_not_share_a_vllm_engine_id(tmp_path):
    nixl = "{kv_connector: NixlConnector, kv_role: kv_producer, engine_id: prefill-a}"
    path = write(tmp_path, f"instances:\n  - {{name: p, model: {LLAMA}, hardware: H100, kv-transfer-config: {nixl}}}\n"
                           f"  - {{name: q, model: {LLAMA}, hardware: H100, kv-transfer-config: {nixl}}}\n")
    assert f"{path}:3: instances[1].kv-transfer-config: engine_id 'prefill-a' is already p's" in error_of(path)
    replicas = write(tmp_path, f"instances:\n  - {{model: {LLAMA}, hardware: H100, count: 2, "
                               f"kv-transfer-config: {nixl}}}\n", "replicas.yaml")
    assert "engine_id 'prefill-a' is already h100-llama-3.1-8b-0's" in error_of(replicas)


# -- LLMServingSim's JSON ------------------------------------------------------------------------------
def llmservingsim(tmp_path: Path, instance: dict, **top) -> Path:
    config = {"num_nodes": 1, "link_bw": 16, "link_latency": 0, **top,
              "nodes": [{"num_instances": 1, "cpu_mem": {"mem_size": 128, "mem_bw": 256, "mem_latency": 0},
                         "instances": [{"model_name": LLAMA, "hardware": "H100", "pd_type": None, **instance}]}]}
    return write(tmp_path, json.dumps(config, indent=2), "cluster.json")


def test_a_key_llmservingsim_does_not_read_is_named_at_start_up_with_what_was_meant(tmp_path):
    path = llmservingsim(tmp_path, {"npu_nm": 2, "npu_mem": {"mem_size": 80, "mem_bandwidth": 3350}},
                         link_latncy=0)
    spec, notes = read_cluster_file(path)
    lines = path.read_text().splitlines()

    def line_of(key: str) -> int:
        return next(n for n, text in enumerate(lines, 1) if f'"{key}"' in text)
    assert [note for note in notes if "not a key LLMServingSim reads" in note] == [
        f"{path}:{line_of('link_latncy')}: cluster.link_latncy: not a key LLMServingSim reads; ignored, as "
        f"LLMServingSim ignores it; did you mean 'link_latency'?",
        f"{path}:{line_of('npu_nm')}: nodes[0].instances[0].npu_nm: not a key LLMServingSim reads; ignored, as "
        f"LLMServingSim ignores it; did you mean 'npu_num'?",
        f"{path}:{line_of('mem_bandwidth')}: nodes[0].instances[0].npu_mem.mem_bandwidth: not a key LLMServingSim "
        f"reads; ignored, as LLMServingSim ignores it",
    ]
    assert spec.instances[0].deployment.config.tensor_parallel_size == 1  # npu_num's default, as it was ignored


def test_llmservingsim_per_instance_overrides_become_the_instance_engine_flags(tmp_path):
    path = llmservingsim(tmp_path, {"num_npus": 4, "tp_size": 2, "max_num_seqs": 48, "max_num_batched_tokens": 0,
                                    "block_size": 32, "enable_prefix_caching": False, "reserve_full_isl": False,
                                    "dtype": "bfloat16"})
    spec, notes = read_cluster_file(path, base_args={"max_num_seqs": 8, "max_num_batched_tokens": 4096})
    config = spec.instances[0].deployment.config
    assert (config.tensor_parallel_size, config.pipeline_parallel_size) == (2, 2)  # num_npus = tp_size x pp_size
    assert (config.max_num_seqs, config.block_size, config.enable_prefix_caching) == (48, 32, False)
    assert config.scheduler_reserve_full_isl is False  # vLLM's scheduler_reserve_full_isl, which it ports
    # 0 is LLMServingSim's "no limit", which its scheduler caps at the model's max_position_embeddings
    assert config.max_num_batched_tokens == 131072
    assert "nodes[0].instances[0].max_num_batched_tokens: 0 (no limit, in LLMServingSim, which caps it at the " \
           "model's max_position_embeddings): 131072" in notes
    assert "nodes[0].instances[0].dtype: accepted, not simulated" in notes
    assert not any("reserve_full_isl" in note for note in notes)


def test_llmservingsim_max_num_seqs_0_is_the_most_vllm_accepts(tmp_path):
    spec, notes = read_cluster_file(llmservingsim(tmp_path, {"tp_size": 1, "max_num_seqs": 0,
                                                            "max_num_batched_tokens": 3072}))
    config = spec.instances[0].deployment.config
    assert config.max_num_seqs == config.max_num_batched_tokens == 3072  # vLLM refuses more seqs than tokens
    assert "nodes[0].instances[0].max_num_seqs: 0 (no limit, in LLMServingSim): 3072, max_num_batched_tokens, " \
           "the most vLLM accepts" in notes
    spec, _ = read_cluster_file(llmservingsim(tmp_path, {"tp_size": 1, "max_num_seqs": 0}))
    assert spec.instances[0].deployment.config.max_num_seqs == 2048  # LLMServingSim's default token budget


@pytest.mark.parametrize("instance, message", [
    ({"num_npus": 4, "tp_size": 2, "pp_size": 4},
     "instances[0].num_npus: num_npus (4) is not tp_size (2) x pp_size (4)"),
    ({"num_npus": 3, "tp_size": 2}, "instances[0].num_npus: num_npus (3) is not a multiple of tp_size (2)"),
    ({"pp_size": 2}, "instances[0].pp_size: pp_size (2) needs num_npus or tp_size"),
    ({"tp_size": 2, "npu_num": 2}, "instances[0].tp_size: 'tp_size' and 'npu_num' (line 19) both give the "
                                   "instance's NPUs: use num_npus/tp_size/pp_size or npu_num/npu_group"),
    ({"kv_cache_dtype": "fp9"}, "instances[0].kv_cache_dtype: expected one of auto, float16, bfloat16, fp8, "),
])
def test_llmservingsim_parallelism_and_overrides_are_checked_as_it_checks_them(tmp_path, instance, message):
    assert message in error_of(llmservingsim(tmp_path, instance))


@pytest.mark.parametrize("model, instance, expert_parallel", [
    ("Qwen/Qwen3-30B-A3B", {"tp_size": 2}, True),  # a MoE model: ep_size defaults to tp_size
    ("Qwen/Qwen3-30B-A3B", {"tp_size": 2, "ep_size": 1}, False),
    ("Qwen/Qwen3-30B-A3B", {}, False),  # one NPU: nothing to spread over
    (LLAMA, {"tp_size": 2}, False),  # dense: ep_size defaults to 1
])
def test_llmservingsim_ep_size_defaults_as_llmservingsim_resolves_it(tmp_path, model, instance, expert_parallel):
    spec, _ = read_cluster_file(llmservingsim(tmp_path, {"model_name": model, **instance}))
    assert spec.instances[0].deployment.config.enable_expert_parallel is expert_parallel
