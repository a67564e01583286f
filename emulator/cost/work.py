"""What each operator does: FLOPs and bytes by shape, and the counting rules behind them.

Pure formulas, shared by the roofline (which turns work into time on a spec sheet),
the table pricer (which scales a measured variant to an unmeasured one by the ratio
of their work) and the cost models' breakdown into compute- and memory-bound time.
"""
from __future__ import annotations

import numpy as np

# dtype of a GEMM or MoE -> (compute dtype, weight bytes, activation bytes)
PRECISIONS = {
    "bf16": ("bf16", 2.0, 2.0), "fp16": ("fp16", 2.0, 2.0), "fp32": ("fp32", 4.0, 4.0),
    "fp8": ("fp8", 1.0, 1.0), "fp8_block": ("fp8", 1.0, 1.0),
    "int8": ("int8", 1.0, 1.0),
    "int4_wo": ("bf16", 0.5, 2.0), "w4a16_mxfp4": ("bf16", 0.5, 2.0), "w4a16_mxfp4_marlin": ("bf16", 0.5, 2.0),
    "nvfp4": ("fp4", 0.5, 0.5),
}
KV_BYTES = {"bf16": 2.0, "fp16": 2.0, "fp8": 1.0}
COLLECTIVE_TRAFFIC = {"all_reduce": 2.0, "all_gather": 1.0, "reduce_scatter": 1.0, "all_to_all": 1.0,
                      "send_recv": None}


def gemm_work(m, n, k, dtype: str):
    """(FLOPs, bytes) of an (m x k) @ (k x n) GEMM with weights of the given dtype."""
    _, wb, ab = PRECISIONS[dtype]
    m = np.asarray(m, dtype=np.float64)
    return 2.0 * m * n * k, n * k * wb + m * k * ab + m * n * 2.0


def context_attention_work(batch, isl, heads, kv_heads, head_dim, window, kv_dtype: str):
    """Causal prefill of `batch` sequences of `isl` tokens (a sliding window caps each query's keys)."""
    batch, isl = np.asarray(batch, dtype=np.float64), np.asarray(isl, dtype=np.float64)
    keys = isl / 2.0 if not window else np.where(isl > window, window - window * window / (2.0 * isl), isl / 2.0)
    flops = 4.0 * batch * isl * keys * heads * head_dim
    traffic = batch * isl * head_dim * (2.0 * heads * 2.0 + 2.0 * kv_heads * KV_BYTES[kv_dtype])
    return flops, traffic


def generation_attention_work(batch, kv_len, heads, kv_heads, head_dim, window, kv_dtype: str):
    """One new token for each of `batch` sequences attending to `kv_len` cached tokens."""
    batch, kv_len = np.asarray(batch, dtype=np.float64), np.asarray(kv_len, dtype=np.float64)
    keys = np.minimum(kv_len, window) if window else kv_len
    flops = 4.0 * batch * keys * heads * head_dim
    traffic = batch * keys * 2.0 * kv_heads * head_dim * KV_BYTES[kv_dtype] + batch * heads * head_dim * 4.0
    return flops, traffic


def moe_work(tokens, hidden, inter, topk, experts, moe_tp, moe_ep, dtype: str):
    """Fused MoE on one rank: routed tokens through the experts it holds (gate, up, down)."""
    _, wb, ab = PRECISIONS[dtype]
    tokens = np.asarray(tokens, dtype=np.float64)
    local = experts / moe_ep
    width = inter / moe_tp
    hit = local * (1.0 - (1.0 - topk / experts) ** tokens)  # distinct local experts that get a token
    routed = tokens * topk / moe_ep
    flops = 2.0 * routed * 3.0 * hidden * width
    traffic = hit * 3.0 * hidden * width * wb + routed * (hidden * ab + 3.0 * width * 2.0) + tokens * hidden * 2.0
    return flops, traffic


def collective_traffic(kind: str, num_bytes, gpus):
    """Bytes each GPU sends over its link (ring algorithms)."""
    num_bytes, gpus = np.asarray(num_bytes, dtype=np.float64), np.asarray(gpus, dtype=np.float64)
    factor = COLLECTIVE_TRAFFIC[kind]
    return num_bytes if factor is None else factor * num_bytes * (gpus - 1.0) / np.maximum(gpus, 1.0)


def expected_active_experts(num_tokens: float, num_experts: int, top_k: int) -> float:
    """Distinct experts hit by num_tokens tokens routed uniformly to top_k of num_experts."""
    if num_tokens <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** num_tokens)
