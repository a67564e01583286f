"""The bytes of vLLM 0.33's KV cache pages under each --kv-cache-dtype, as its attention backends lay them out.

A page holds, per token and KV head (MLA: one latent row), a slot of K and V values (AttentionSpec's
state_content_size_bytes): plain values of the dtype, or the packed layouts with their scales. The packed
TurboQuant / UltraQuant dtypes leave a model's first and last two layers at its own dtype and grow the block
so that one page size covers both kinds of layer.
"""
from __future__ import annotations

from emulator.models import ModelSpec


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# TurboQuant presets (vLLM's TQ_PRESETS): (key bits, value bits); 8-bit keys are fp8, fewer are Lloyd-Max codes
TURBOQUANT_BITS = {"turboquant_k8v4": (8, 4), "turboquant_4bit_nc": (4, 4), "turboquant_k3v4_nc": (3, 4),
                   "turboquant_3bit_nc": (3, 3)}
PACKED_KV_DTYPES = (*TURBOQUANT_BITS, "ultraquant_4bit")  # one packed K+V slot per head; boundary layers unpacked
PACKED_BOUNDARY_LAYERS = 2  # TurboQuantConfig.get_boundary_skip_layers: the first and last 2 stay at the model dtype
PACKED_KERNEL_BLOCK = 16  # FlashAttention's smallest kernel block (MultipleOf(16)), boundary layer 0's backend
ULTRAQUANT_GROUP = 32  # UltraQuant's scale group (ultraquant/format.py GROUP_SIZE): one E8M0 byte per 32 values


def _turboquant_slot(kv_cache_dtype: str, head_dim: int) -> int:
    """TurboQuantConfig.slot_size_aligned: fp8 keys (1 byte a value) or Lloyd-Max codes plus a fp16 norm, then
    the values' codes plus a fp16 scale and zero, rounded up to an even byte count."""
    key_bits, value_bits = TURBOQUANT_BITS[kv_cache_dtype]
    key = head_dim if key_bits == 8 else cdiv(head_dim * key_bits, 8) + 2
    slot = key + cdiv(head_dim * value_bits, 8) + 4
    return slot + slot % 2


def kv_slot_bytes(model: ModelSpec, kv_cache_dtype: str) -> int:
    """Bytes one token takes in one KV head of one (quantized) layer, K and V together (MLA: its one latent
    row), as vLLM's attention backends lay out the page (AttentionSpec.state_content_size_bytes)."""
    if model.is_mla:
        width = model.kv_lora_rank + model.qk_rope_head_dim
        if kv_cache_dtype in ("fp8_ds_mla", "nvfp4_ds_mla"):
            # packed NoPE + RoPE + scales (layers/attention/mla_attention.py get_kv_cache_spec)
            return {"fp8_ds_mla": 656, "nvfp4_ds_mla": 352}[kv_cache_dtype]
        if kv_cache_dtype.endswith("_per_token_head"):  # MLACommonBackend.customize_spec: two fp32 scales inline
            return (width // 2 if kv_cache_dtype.startswith("int4") else width) + 8
        # no MLA backend takes turboquant/ultraquant/nvfp4: vLLM fails at start-up on the GPU (attention
        # selector), so the spec's one byte a value stands here
        if kv_cache_dtype == "auto":
            return width * model.activation_bytes
        return width * (2 if kv_cache_dtype in ("float16", "bfloat16") else 1)
    h = model.head_dim
    if kv_cache_dtype == "auto":
        return 2 * h * model.activation_bytes
    if kv_cache_dtype in ("float16", "bfloat16"):
        return 2 * h * 2
    if kv_cache_dtype.endswith("_per_token_head"):  # TritonAttentionBackend.customize_spec: a fp32 scale per K, V
        return (h if kv_cache_dtype.startswith("int4") else 2 * h) + 8
    if kv_cache_dtype.startswith("nvfp4") and kv_cache_dtype != "nvfp4_ds_mla":
        # FlashInferBackend.customize_spec: K and V each packed fp4 data + fp8 scale per 16 (nvfp4_kv_cache_full_dim)
        return 2 * (h // 2 + h // 16)
    if kv_cache_dtype in TURBOQUANT_BITS:
        return _turboquant_slot(kv_cache_dtype, h)
    if kv_cache_dtype == "ultraquant_4bit":  # ultraquant/format.py slot_size: fp4 codes + a scale byte per group
        return 2 * (h // 2 + h // ULTRAQUANT_GROUP)
    # fp8 (every variant; ds_mla on a non-MLA model finds no backend on the GPU and keeps the spec's uint8)
    return 2 * h


def packed_layers(model: ModelSpec, kv_cache_dtype: str) -> int:
    """Layers vLLM keeps at the model dtype under a packed (TurboQuant / UltraQuant) KV dtype: the first and
    last two (EngineArgs.create_engine_config adds them to kv_cache_dtype_skip_layers); 0 for any other."""
    if kv_cache_dtype not in PACKED_KV_DTYPES:
        return 0
    return 2 * min(PACKED_BOUNDARY_LAYERS, model.num_layers // 2)


def packed_block_size(model: ModelSpec, kv_cache_dtype: str, block_size: int) -> int:
    """The block size vLLM runs a packed KV dtype with (Platform._align_heterogeneous_kv_block_size, at
    start-up on one pipeline stage): the block grows, in kernel-aligned steps, until the packed layers' page
    covers a boundary layer's page of one kernel block (16 tokens). vLLM measures the packed page with the
    backend of the worker's first layer, and that is boundary layer 0, whose FlashAttention / FlashInfer
    backend does not pack: it sees one byte a value (the dtype's uint8), so a bf16 model's blocks grow to 32
    tokens whatever the preset."""
    if not packed_layers(model, kv_cache_dtype):
        return block_size
    full = kv_slot_bytes(model, "auto")
    seen = full // model.activation_bytes  # the slot at one byte a value
    if full <= seen:
        return block_size
    align = max(PACKED_KERNEL_BLOCK, block_size)
    return max(block_size, align * cdiv(full * PACKED_KERNEL_BLOCK, align * seen))
