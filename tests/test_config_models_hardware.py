"""Engine defaults and checks as vLLM 0.33 applies them, model specs from config.json, the device catalogue."""
from __future__ import annotations

import json

import pytest

from emulator.config import ConfigError, EngineArgs, resolve
from emulator.hardware import GiB, UnknownHardwareError, load_device, shipped_devices
from emulator.models import UnknownModelError, load_model, shipped_models

LLAMA_8B = "meta-llama/Llama-3.1-8B"


def config(hardware: str = "RTX4090", model: str = LLAMA_8B, **args):
    return resolve(EngineArgs(**args), load_model(model), load_device(hardware))


# -- engine defaults (vLLM EngineArgs.get_batch_defaults, OPENAI_API_SERVER context) -----------------
@pytest.mark.parametrize("hardware, seqs, tokens", [
    ("RTX4090", 256, 2048),  # other GPUs
    ("A100", 256, 2048),  # 80 GB, but A100 keeps the small defaults
    ("H100", 1024, 8192),  # >= 70 GiB
    ("RTXPRO6000", 1024, 8192),
    ("B200", 1024, 16384),  # >= 160 GiB
])
def test_batch_defaults_follow_vllms_device_tiers(hardware, seqs, tokens):
    c = config(hardware)
    assert (c.max_num_seqs, c.max_num_batched_tokens) == (seqs, tokens)


def test_serve_defaults():
    c = config()
    assert (c.block_size, c.gpu_memory_utilization, c.enable_prefix_caching, c.enable_chunked_prefill,
            c.async_scheduling, c.scheduling_policy, c.max_model_len) == (16, 0.92, True, True, True, "fcfs", 131072)


def test_disabling_chunked_prefill_raises_the_budget_to_max_model_len():
    assert config(enable_chunked_prefill=False, max_model_len=32768).max_num_batched_tokens == 32768


def test_throughput_mode_doubles_both_defaults():
    c = config("H100", performance_mode="throughput")
    assert (c.max_num_seqs, c.max_num_batched_tokens) == (2048, 16384)


def test_max_num_seqs_default_is_capped_by_the_budget():
    assert config(max_num_batched_tokens=128).max_num_seqs == 128


def test_max_model_len_above_the_models_limit_is_refused():
    with pytest.raises(ConfigError, match=r"User-specified max_model_len \(200000\) is greater than the derived "
                                          r"max_model_len \(max_position_embeddings=131072"):
        config(max_model_len=200000)


def test_budget_below_max_num_seqs_is_refused():
    with pytest.raises(ConfigError, match=r"max_num_batched_tokens \(64\) must be greater than or equal to "
                                          r"max_num_seqs \(128\)"):
        config(max_num_batched_tokens=64, max_num_seqs=128)


def test_budget_below_max_model_len_without_chunked_prefill_is_refused():
    with pytest.raises(ConfigError, match=r"max_num_batched_tokens \(2048\) is smaller than max_model_len \(4096\)"):
        config(enable_chunked_prefill=False, max_num_batched_tokens=2048, max_model_len=4096)


def test_tensor_parallel_size_must_divide_the_attention_heads():
    with pytest.raises(ConfigError, match=r"Total number of attention heads \(32\) must be divisible by tensor "
                                          r"parallel size \(3\)"):
        config(tensor_parallel_size=3)


def test_block_fp8_experts_split_over_tp_need_whole_scale_blocks():
    """MiniMax-M2.5 (experts 1536 wide, 128x128 FP8 blocks): 8 ranks get 192 columns, vLLM refuses; EP is fine."""
    minimax = "MiniMaxAI/MiniMax-M2.5"
    assert load_model(minimax).weight_block_size == (128, 128)
    with pytest.raises(ConfigError, match=r"The output_size of gate's and up's weight = 192 is not divisible by "
                                          r"weight quantization block_n = 128\."):
        config("H200", minimax, tensor_parallel_size=8)
    config("H200", minimax, tensor_parallel_size=4)
    config("H200", minimax, tensor_parallel_size=8, enable_expert_parallel=True)


@pytest.mark.parametrize("args, word", [({"block_size": 24}, "block_size"),
                                        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
                                        ({"scheduling_policy": "lifo"}, "scheduling_policy")])
def test_bad_engine_arguments_are_named(args, word):
    with pytest.raises(ConfigError, match=word):
        config(**args)


# -- models --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, params_b", [
    ("meta-llama/Llama-3.1-8B", 8.03), ("meta-llama/Llama-3.1-70B", 70.55), ("Qwen/Qwen3-32B", 32.76),
    ("Qwen/Qwen3-30B-A3B", 30.53), ("mistralai/Mixtral-8x7B-v0.1", 46.70),
])
def test_shipped_models_have_their_published_parameter_counts(name, params_b):
    assert load_model(name).num_params() / 1e9 == pytest.approx(params_b, abs=0.01)


def test_moe_models_count_active_parameters():
    assert load_model("Qwen/Qwen3-30B-A3B").active_params_per_token() / 1e9 == pytest.approx(3.35, abs=0.01)
    assert load_model("mistralai/Mixtral-8x7B-v0.1").active_params_per_token() / 1e9 == pytest.approx(12.88, abs=0.01)


def test_llama_8b_shape():
    m = load_model(LLAMA_8B)
    assert (m.num_layers, m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim, m.vocab_size, m.dtype) == \
        (32, 4096, 32, 8, 128, 128256, "bfloat16")
    assert m.kv_bytes_per_token_per_layer() == 2 * 8 * 128 * 2


def test_model_resolves_by_bare_name_any_case():
    assert load_model("llama-3.1-8b").name == LLAMA_8B


def test_model_from_a_local_config_json(tmp_path):
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
           "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 8192,
           "vocab_size": 128256, "max_position_embeddings": 131072, "torch_dtype": "bfloat16",
           "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = load_model(str(tmp_path))
    assert (m.num_layers, m.head_dim, m.tie_word_embeddings) == (16, 64, True)
    assert m.num_params() / 1e9 == pytest.approx(1.24, abs=0.01)  # Llama-3.2-1B


def test_unknown_model_is_named_with_a_suggestion():
    with pytest.raises(UnknownModelError, match=r"unknown model 'Llama-3.1-8X'.*Did you mean 'Llama-3.1-8B'\?"):
        load_model("Llama-3.1-8X")


def test_broken_config_json_is_reported(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UnknownModelError, match="not valid JSON"):
        load_model(str(tmp_path))


def test_config_without_layers_is_reported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4}))
    with pytest.raises(UnknownModelError, match="num_hidden_layers"):
        load_model(str(tmp_path))


def test_issue_models_are_shipped():
    assert {"meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-70B", "Qwen/Qwen3-32B", "Qwen/Qwen3-30B-A3B",
            "mistralai/Mixtral-8x7B-v0.1"} <= set(shipped_models())


# -- hardware -----------------------------------------------------------------------------------
def test_device_resolves_by_alias_ignoring_case_and_punctuation():
    assert load_device("NVIDIA GeForce RTX 4090").name == "RTX4090"
    assert load_device("rtx-4090").name == "RTX4090"
    assert load_device("h100_sxm").name == "H100"


def test_rtx4090_memory_is_what_torch_reported_in_the_calibration_run():
    assert load_device("RTX4090").memory_bytes == 25250627584


def test_every_shipped_device_loads_with_positive_specs():
    for name in shipped_devices():
        d = load_device(name)
        assert d.memory_bytes > GiB and d.memory_bandwidth > 0 and max(d.flops.values()) > 0, name


def test_unknown_hardware_is_named_with_a_suggestion():
    with pytest.raises(UnknownHardwareError, match=r"unknown hardware 'H1000'\. Did you mean 'H100'\?"):
        load_device("H1000")


def test_device_from_a_yaml_file(tmp_path):
    path = tmp_path / "mygpu.yaml"
    path.write_text("name: MyGPU\nmemory_bytes: 17179869184\nmemory_bandwidth: 5.0e11\nflops: {bf16: 1.0e14}\n")
    d = load_device(str(path))
    assert (d.name, d.memory_gib, d.peak_flops("bf16"), d.peak_flops("fp8")) == ("MyGPU", 16.0, 1e14, 1e14)


def test_device_yaml_missing_a_field_is_reported(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: Bad\nflops: {bf16: 1.0e14}\n")
    with pytest.raises(UnknownHardwareError, match=r"bad\.yaml: memory_bytes: missing; a device spec needs name, "
                       "memory_bytes, memory_bandwidth and flops"):
        load_device(str(path))


def test_device_yaml_with_a_key_given_twice_is_reported_with_both_lines(tmp_path):
    """YAML would keep the second memory_bandwidth silently; a device file says each field once."""
    path = tmp_path / "twice.yaml"
    path.write_text("name: Twice\nmemory_bytes: 17179869184\nmemory_bandwidth: 5.0e11\nflops: {bf16: 1.0e14}\n"
                    "memory_bandwidth: 3.0e12\n")
    with pytest.raises(UnknownHardwareError) as err:
        load_device(str(path))
    assert str(err.value) == (f"{path}:5: 'memory_bandwidth' is given twice in one mapping (first on line 3); "
                              "say it once")
    path.write_text("name: Twice\nmemory_bytes: 17179869184\nmemory_bandwidth: 5.0e11\n"
                    "flops:\n  bf16: 1.0e14\n  bf16: 2.0e14\n")
    with pytest.raises(UnknownHardwareError, match=r":6: 'bf16' is given twice .*first on line 5"):
        load_device(str(path))
