"""The time of one engine step composed from operator costs, for any decoder config.

A step on one rank runs, per decoder layer of its pipeline stage,

    norm, QKV GEMM, rope, KV-cache write, attention (prefill chunks + decodes),
    O GEMM, all-reduce, norm, then either the dense MLP (gate/up GEMM, activation,
    down GEMM) or the MoE block (router GEMM, fused experts, shared expert),
    all-reduce

and once per step the embedding, final norm, LM head over the scheduled
sequences, the logits gather and the sampler. Shapes follow the model config
and the parallel layout (heads and MLP width split by tensor parallelism, KV
heads replicated when fewer than ranks; experts split by TP or EP, tokens of the
whole DP group through each MoE layer). Each op is priced by a pricer: measured
operator tables of the device (emulator.cost.table_pricer.TablePricer) or the
roofline (emulator.cost.roofline.Roofline); collectives by the link's measured tables
or its model (emulator.cost.collectives.Collectives). Token counts are padded to the
CUDA-graph size vLLM replays. Decodes of mixed lengths are priced at their mean context
plus a share of the gap to the longest (`decode_skew`). Everything that depends only on
the token or sequence count is tabulated once per engine, so pricing a step is a few
array reads.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from emulator.batch import IDLE_RANK, BatchShape
from emulator.config import EngineConfig
from emulator.cost.base import CostModel, StepBreakdown, decode_skew
from emulator.cost.collectives import Collectives
from emulator.cost.interpolate import Grid2D
from emulator.cost.operators_decode import make_decode_pricer
from emulator.cost.work import PRECISIONS
from emulator.hardware import DeviceSpec
from emulator.models import ModelSpec

_CTX_BATCH = 2.0 ** np.arange(0, 10)      # sequences per context-attention call
_CTX_LEN = 2.0 ** np.arange(0, 19)        # tokens per sequence
_GEN_BATCH = 2.0 ** np.arange(0, 13)      # decoding sequences
_GEN_LEN = 2.0 ** np.arange(0, 20)        # context per decoding sequence
_GROUP_OPS = ("moe", "dp_dispatch")       # run once over the tokens of every DP rank
# For the breakdown: what bounds each op. GEMMs are compute-bound past the ridge point (enough
# tokens per weight byte), memory-bound below it; the routed experts likewise by tokens per expert.
_COMMUNICATION = frozenset({"all_reduce", "qk_norm_all_reduce", "dp_dispatch", "logits_gather"})
_GEMMS = frozenset({"qkv_proj", "o_proj", "gate_up_proj", "down_proj", "router", "shared_expert", "lm_head"})


def layer_precisions(model: ModelSpec, device: DeviceSpec) -> tuple[str, str]:
    """(dtype of the linear layers, dtype of the routed experts) as vLLM runs them."""
    quant = (model.raw.get("quantization_config") or {})
    method = str(quant.get("quant_method", "")).lower()
    if model.expert_weight_dtype == "fp4" and model.weight_dtype != "fp4":  # gpt-oss: MXFP4 experts only
        return "bf16", "nvfp4" if "fp4" in device.flops else "w4a16_mxfp4"
    if model.weight_dtype == "fp8":
        dtype = "fp8_block" if quant.get("weight_block_size") else "fp8"
        return dtype, dtype
    if model.weight_dtype == "fp4":
        experts = "nvfp4" if "fp4" in device.flops else "w4a16_mxfp4"
        if method == "mxfp4":  # gpt-oss: only the experts are MXFP4; attention stays in bf16
            return "bf16", experts
        return experts, experts
    if model.weight_dtype == "int4":
        if method == "compressed-tensors":  # Kimi-style: int4 experts, the rest in bf16
            return "bf16", "int4_wo"
        return "int4_wo", "int4_wo"
    return "bf16", "bf16"


def attention_layers(model: ModelSpec, num_layers: int) -> list[tuple[int, int]]:
    """(window, layers) pairs: sliding-window layers (gpt-oss alternates) and full ones."""
    types = model.raw.get("layer_types") or (model.raw.get("text_config") or {}).get("layer_types")
    if types and model.sliding_window:
        sliding = round(num_layers * sum(t == "sliding_attention" for t in types) / len(types))
        return [(w, n) for w, n in ((model.sliding_window, sliding), (0, num_layers - sliding)) if n]
    return [(model.sliding_window or 0, num_layers)]


class OperatorCostModel(CostModel):
    """Step time of one engine (one DP rank) from an operator pricer; see the module docstring."""

    def __init__(self, model: ModelSpec, device: DeviceSpec, config: EngineConfig, pricer, label: str,
                 moe_backend: str = "auto", collectives: Collectives | None = None) -> None:
        """`moe_backend`: the fused-MoE kernel vLLM runs ("auto": its default; "marlin": `--moe-backend marlin`,
        or VLLM_MXFP4_USE_MARLIN=1, which runs 4-bit experts through the Marlin kernel; any other: as auto)."""
        super().__init__(config, device)
        self.model, self.device, self.config, self.pricer, self.label = model, device, config, pricer, label
        self.collectives = collectives or Collectives(device.interconnect, device.arch)
        self.skew = decode_skew(device)
        tp, dp = config.tensor_parallel_size, config.data_parallel_size
        self.tp, self.dp = tp, dp
        self.num_layers = -(-model.num_layers // config.pipeline_parallel_size)  # the largest stage
        self.pp = config.pipeline_parallel_size
        self.linear_dtype, self.expert_dtype = layer_precisions(model, device)
        if moe_backend == "marlin" and self.expert_dtype == "w4a16_mxfp4":
            self.expert_dtype = "w4a16_mxfp4_marlin"  # (any other backend is priced as auto's kernels)
        self.kv_dtype = ("fp8" if config.kv_cache_dtype.startswith("fp8") else
                         {"float16": "fp16"}.get(model.dtype, "bf16"))
        self.extrapolations: dict[str, int] = {}
        self.methods: dict[str, tuple[str, str]] = {}  # op -> (source, method)
        self.max_tokens = max(config.max_num_batched_tokens, self.max_capture, 1)
        self._token_ops = self._per_token_ops(np.arange(1, self.max_tokens + 1, dtype=np.float64))
        local = {k: v for k, v in self._token_ops.items() if k not in _GROUP_OPS}
        self.per_token, self._token_flags = self._fold(local, self.max_tokens)
        group = {k: v for k, v in self._token_ops.items() if k in _GROUP_OPS}
        self.per_group_token, self._group_flags = self._fold(group, self.max_tokens)
        self._seq_ops = self._per_sequence_ops(np.arange(1, config.max_num_seqs + 1, dtype=np.float64))
        self.per_sequence, self._seq_flags = self._fold(self._seq_ops, config.max_num_seqs)
        self._context = self._attention_grids("context")
        self._generation = self._attention_grids("generation")
        self._beyond: dict[int, tuple[float, float, tuple[str, ...]]] = {}
        self._decode_pricers: dict[int, Callable[[int, int], float]] = {}  # by number of decodes
        # the last attention sums looked up: (tokens, work, us) of prefill chunks, (decodes, context, us at
        # the mean) of decodes
        self._last_prefill: tuple[int, float, float] = (0, 0.0, 0.0)
        self._last_decode: tuple[int, int, float] = (0, 0, 0.0)
        self._ridge = {dtype: self._ridge_tokens(dtype) for dtype in {"bf16", self.linear_dtype, self.expert_dtype}}
        # as lists of Python floats: the power model asks for a breakdown per new step shape, and numpy's
        # per-call overhead on 3-element rows would dominate it
        self._token_split = self._split(local, self.max_tokens).tolist()
        self._group_split = self._split(group, self.max_tokens).tolist()
        self._seq_split = self._split(self._seq_ops, config.max_num_seqs).tolist()

    # -- composition ------------------------------------------------------------------
    def _record(self, name: str, priced, count: float, ops: dict) -> None:
        ops[name] = (priced.us * count, priced.extrapolated)
        self.methods[name] = (priced.source, priced.method)

    def _per_token_ops(self, n: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        m, p, c, tp, L = self.model, self.pricer, self.collectives, self.tp, self.num_layers
        h, d = m.hidden_size, m.head_dim
        heads = m.num_heads // tp
        kv_heads = m.kv_heads_per_device(tp)
        act = 2.0
        kv_bytes = 1.0 if self.kv_dtype == "fp8" else 2.0
        ops: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        gemm = lambda mm, nn, kk, dt=self.linear_dtype: p.gemm(mm, nn, kk, dt)  # noqa: E731
        self._record("qkv_proj", gemm(n, (heads + 2 * kv_heads) * d, h), L, ops)
        self._record("o_proj", gemm(n, h, heads * d), L, ops)
        qk = (heads + kv_heads) * d
        # memory-bound kernels of a layer, as vLLM's compiled graph runs them
        self._record("rms_norm", p.memory_bound(n * 4 * h * act), 2 * L, ops)  # fused residual add + norm
        self._record("rope", p.memory_bound(n * 2 * qk * act), L, ops)
        self._record("kv_cache_write", p.memory_bound(n * kv_heads * d * 2 * (act + kv_bytes)), L, ops)
        if m.model_type.startswith("qwen3") or m.raw.get("use_qk_norm"):
            self._record("qk_norm", p.memory_bound(n * 2 * qk * act), L, ops)
            if tp > 1 and m.raw.get("qk_norm_type") == "per_layer":
                # MiniMax-M2 normalises q and k over all heads: vLLM all-reduces the two fp32
                # variances of every token over the TP group (MiniMaxText01RMSNormTP.forward_qk)
                self._record("qk_norm_all_reduce", c.collective("all_reduce", n * 2 * 4.0, tp), L, ops)
        dense_layers = L if not m.is_moe else round(L * m.num_dense_layers / m.num_layers)
        moe_layers = L - dense_layers
        if dense_layers:
            width = m.intermediate_size // tp
            self._record("gate_up_proj", gemm(n, 2 * width, h), dense_layers, ops)
            self._record("act_fn", p.memory_bound(n * 3 * width * act), dense_layers, ops)
            self._record("down_proj", gemm(n, h, width), dense_layers, ops)
        if moe_layers:
            ep_enabled = self.config.enable_expert_parallel
            group = tp * self.dp
            moe_tp, moe_ep = (1, group) if ep_enabled else (group, 1)
            tokens = n * self.dp  # every rank of the DP group runs the experts on the group's tokens
            self._record("router", p.gemm(n, m.num_experts, h, "bf16"), moe_layers, ops)
            self._record("moe", p.moe(tokens, h, m.moe_intermediate_size, m.num_experts_per_tok, m.num_experts,
                                      moe_tp, moe_ep, self.expert_dtype), moe_layers, ops)
            if m.shared_expert_intermediate_size:
                width = m.shared_expert_intermediate_size // tp
                self._record("shared_expert", self._sum(gemm(n, 2 * width, h), gemm(n, h, width)), moe_layers, ops)
            if self.dp > 1:  # vLLM gathers the DP group's tokens and router logits before the experts,
                # reduce-scatters their outputs after
                gather = c.collective("all_gather", tokens * (h + m.num_experts) * act, self.dp)
                scatter = c.collective("reduce_scatter", tokens * h * act, self.dp)
                self._record("dp_dispatch", self._sum(gather, scatter), moe_layers, ops)
        if tp > 1:
            self._record("all_reduce", c.collective("all_reduce", n * h * act, tp), 2 * L, ops)
        self._record("embedding_final_norm", p.memory_bound(n * h * act * 4), 1, ops)
        return ops

    def _per_sequence_ops(self, s: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        m, p, tp = self.model, self.pricer, self.tp
        vocab = m.vocab_size // tp
        ops: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._record("lm_head", p.gemm(s, vocab, m.hidden_size, "bf16"), 1, ops)
        if tp > 1:
            self._record("logits_gather", self.collectives.collective("all_gather", s * m.vocab_size * 2.0, tp), 1,
                         ops)
        # sampler: fp32 logits copy, softmax/log-softmax and the sampling pass over the vocabulary
        self._record("sampler", p.memory_bound(s * m.vocab_size * 4.0 * 4), 1, ops)
        return ops

    @staticmethod
    def _sum(a, b):
        return type(a)(a.us + b.us, a.extrapolated | b.extrapolated, a.source, a.method)

    @staticmethod
    def _fold(ops: dict, size: int) -> tuple[list[float], list[tuple[str, ...]]]:
        total = np.zeros(size + 1)
        flags: list[tuple[str, ...]] = [()] * (size + 1)
        for name, (us, extrapolated) in ops.items():
            total[1:] += us
            for i in np.flatnonzero(extrapolated):
                flags[i + 1] = flags[i + 1] + (name,)
        return total.tolist(), flags

    def _attention_grids(self, phase: str) -> list[tuple[int, Grid2D]]:
        m, tp = self.model, self.tp
        heads, kv_heads = m.num_heads // tp, m.kv_heads_per_device(tp)
        xs, ys = (_CTX_BATCH, _CTX_LEN) if phase == "context" else (_GEN_BATCH, _GEN_LEN)
        bx, by = np.meshgrid(xs, ys, indexing="ij")
        grids = []
        for window, count in attention_layers(m, self.num_layers):
            price = self.pricer.context_attention if phase == "context" else self.pricer.generation_attention
            priced = price(bx, by, heads, kv_heads, m.head_dim, window, self.kv_dtype)
            self.methods[f"{phase}_attention" + (f"_w{window}" if window else "")] = (priced.source, priced.method)
            grids.append((count, Grid2D(xs, ys, priced.us, priced.extrapolated, log=phase == "context")))
        return grids

    # -- pricing a step -----------------------------------------------------------------
    def _count(self, names) -> None:
        for name in names:
            self.extrapolations[name] = self.extrapolations.get(name, 0) + 1

    def _tokens_beyond(self, n: int) -> tuple[float, float, tuple[str, ...]]:
        cached = self._beyond.get(n)
        if cached is None:
            ops = self._per_token_ops(np.array([float(n)]))
            cached = self._beyond[n] = (sum(float(us[0]) for k, (us, _) in ops.items() if k not in _GROUP_OPS),
                                        sum(float(us[0]) for k, (us, _) in ops.items() if k in _GROUP_OPS),
                                        tuple(k for k, (_, ex) in ops.items() if ex[0]))
        return cached

    def attention_us(self, shape: BatchShape, count: bool = True) -> float:
        """Microseconds of a step's attention; `count`: count lookups beyond the measured grid."""
        us = 0.0
        if shape.prefill_tokens:
            us = self._prefill_attention_us(shape.prefill_tokens, shape.prefill_work, count)
        if shape.num_decode:
            us += self._decode_attention_us(shape.num_decode, shape.decode_context, shape.decode_context_max, count)
        return us

    def _prefill_attention_us(self, tokens: int, work: float, count: bool) -> float:
        """Prefill chunks of `tokens` tokens in all, of causal attention work `work`; kept for the breakdown,
        which the power model asks for the step just priced (`_breakdown_attention`)."""
        length = max(2.0 * work / tokens, 1.0)  # equal-work prefill of whole sequences
        batch = tokens / length
        us = 0.0
        for layers, grid in self._context:
            t, ex = grid(max(batch, 1.0), length)
            us += layers * (t * batch if batch < 1.0 else t)
            if ex and count:
                self._count(("context_attention",))
        self._last_prefill = tokens, work, us
        return us

    def _decode_attention_us(self, n: int, context: int, context_max: int, count: bool) -> float:
        """n decodes attending to `context` tokens in all (the longest `context_max`): at the mean, plus
        the share `skew` of the gap to a batch of the longest. The sum at the mean alone is kept for the
        breakdown (`_breakdown_attention`)."""
        mean = context / n + 1.0
        skewed = self.skew and n > 1 and context_max + 1.0 > mean
        us = at_mean = 0.0
        for layers, grid in self._generation:
            column = grid.at_x(float(n))
            t, ex = column(mean)
            at_mean += layers * t
            if skewed:
                longest, ex_longest = column(context_max + 1.0)
                if longest > t:
                    t += self.skew * (longest - t)
                ex = ex or ex_longest
            us += layers * t
            if ex and count:
                self._count(("generation_attention",))
        self._last_decode = n, context, at_mean
        return us

    def _breakdown_attention(self, shape: BatchShape) -> tuple[float, float]:
        """(prefill, decode) microseconds of a step's attention as the breakdown splits it: `attention_us` of
        its prefill chunks alone and of its decodes alone at their mean context (no skew), taken from what
        pricing the step last computed where that was the same shape (a lookup costs more than the rest of
        the breakdown), else looked up again, uncounted."""
        prefill = decode = 0.0
        tokens, work, n, context = shape.prefill_tokens, shape.prefill_work, shape.num_decode, shape.decode_context
        if tokens:
            last_tokens, last_work, prefill = self._last_prefill
            if last_tokens != tokens or last_work != work:
                prefill = self._prefill_attention_us(tokens, work, False)
        if n:
            last_n, last_context, at_mean = self._last_decode
            if last_n != n or last_context != context:
                at_mean = self._decode_attention_us(n, context, 0, False)
            decode += at_mean
        return prefill, decode

    def group_step_time(self, shapes: Sequence[BatchShape | None]) -> float:
        """Every rank is padded to the largest token count; each rank runs its own
        attention and dense layers, and the MoE layers run once over all ranks' tokens.
        """
        live = [s if s is not None else IDLE_RANK for s in shapes]
        local, group = self._token_us(max(s.num_tokens for s in live))
        return self.with_host((max(self._rank_us(s, local) for s in live) + group) * 1e-6,
                              max(s.num_reqs for s in live))

    def step_time(self, shape: BatchShape) -> float:
        """`group_step_time([shape])`, without its lists (this prices every step of a replay)."""
        if shape.num_tokens == 0:
            return 0.0
        local, group = self._token_us(shape.num_tokens)
        return self.with_host((self._rank_us(shape, local) + group) * 1e-6, shape.num_reqs)

    def _token_terms(self, num_tokens: int) -> tuple[float, float, tuple[str, ...]]:
        """Microseconds of the per-token ops of a step of `num_tokens` (padded): the rank's own, the
        group's (MoE over the DP group), and the tables read beyond their measured range (not counted)."""
        n = self.padded_tokens(num_tokens)
        if n <= self.max_tokens:
            return self.per_token[n], self.per_group_token[n], self._token_flags[n] + self._group_flags[n]
        return self._tokens_beyond(n)

    def _token_us(self, num_tokens: int) -> tuple[float, float]:
        """`_token_terms`' microseconds, its lookups beyond the measured range counted."""
        local, group, flags = self._token_terms(num_tokens)
        if flags:
            self._count(flags)
        return local, group

    def decode_pricer(self, num_decode: int) -> Callable[[int, int], float]:
        """`group_step_time` of one engine's decode step, with everything but the context done once:
        the same sums in the same order, so the same seconds to the last bit, and the same lookups counted.
        The function has `steps(context, context_max, k)`: the seconds of k consecutive steps at once.
        Made once per number of decodes (each decode run asks for one)."""
        pricer = self._decode_pricers.get(num_decode)
        if pricer is None:
            pricer = self._decode_pricers[num_decode] = make_decode_pricer(self, num_decode)
        return pricer

    def head_seconds(self, num_reqs: int) -> float:
        s = min(max(num_reqs, 1), len(self.per_sequence) - 1)
        return self.per_sequence[s] * max(num_reqs, 1) / s * 1e-6

    def stage_transfer(self, num_tokens: int) -> float:
        """vLLM sends the hidden states and the residual of every token to the next stage."""
        if self.pp <= 1:
            return 0.0
        message = 2.0 * self.padded_tokens(num_tokens) * self.model.hidden_size * 2.0
        return self.collectives.seconds("send_recv", message, 2)

    def _rank_us(self, shape, per_token_us: float) -> float:
        s = min(max(shape.num_reqs, 1), len(self.per_sequence) - 1)
        if self._seq_flags[s]:
            self._count(self._seq_flags[s])
        return per_token_us + self.per_sequence[s] * max(shape.num_reqs, 1) / s + self.attention_us(shape)

    # -- breakdown ------------------------------------------------------------------------
    def _ridge_tokens(self, dtype: str) -> float:
        """Tokens per weight past which a GEMM of this dtype is compute-bound (2 FLOPs per weight per token)."""
        compute, weight_bytes, _ = PRECISIONS.get(dtype, PRECISIONS["bf16"])
        return self.device.peak_flops(compute) * weight_bytes / (2.0 * self.device.memory_bandwidth)

    def _bound(self, name: str, tokens: np.ndarray) -> np.ndarray:
        """0 compute-bound, 1 memory-bound, 2 communication, per token count."""
        if name in _COMMUNICATION:
            return np.full(tokens.shape, 2)
        if name == "moe":
            m = self.model
            per_expert = tokens * self.dp * m.num_experts_per_tok / m.num_experts
            return np.where(per_expert >= self._ridge[self.expert_dtype], 0, 1)
        if name in _GEMMS:
            dtype = "bf16" if name in ("router", "lm_head") else self.linear_dtype
            return np.where(tokens >= self._ridge[dtype], 0, 1)
        return np.ones(tokens.shape, int)

    def _split(self, ops: dict, size: int) -> np.ndarray:
        """(size + 1, 3) microseconds by bound, indexed by token (or sequence) count."""
        split = np.zeros((size + 1, 3))
        counts = np.arange(1, size + 1, dtype=np.float64)
        for name, (us, _) in ops.items():
            split[1 + np.arange(size), self._bound(name, counts)] += us
        return split

    def breakdown(self, shapes: Sequence[BatchShape | None]) -> StepBreakdown:
        """Prefill attention counts as compute-bound, decode attention as memory-bound."""
        live = [s if s is not None else IDLE_RANK for s in shapes]
        n = self.padded_tokens(max(s.num_tokens for s in live))
        if n <= self.max_tokens:
            local, group = self._token_split[n], self._group_split[n]
        else:
            ops = self._per_token_ops(np.array([float(n)]))
            local, group = np.zeros(3), np.zeros(3)
            for name, (us, _) in ops.items():
                (group if name in _GROUP_OPS else local)[self._bound(name, np.array([float(n)]))[0]] += us[0]
            local, group = local.tolist(), group.tolist()
        # (compute, memory, communication) microseconds, summed left to right as numpy would sum the rows
        best, best_us = None, -1.0
        for shape in live:
            s = min(max(shape.num_reqs, 1), len(self.per_sequence) - 1)
            seq, ratio = self._seq_split[s], max(shape.num_reqs, 1) / s
            prefill, decode = self._breakdown_attention(shape)
            parts = (local[0] + seq[0] * ratio + prefill, local[1] + seq[1] * ratio + decode,
                     local[2] + seq[2] * ratio)
            parts_us = parts[0] + parts[1] + parts[2]
            if parts_us > best_us:
                best, best_us = parts, parts_us
        compute, memory, communication = best
        compute = (compute + group[0]) * 1e-6
        memory = (memory + group[1]) * 1e-6
        communication = (communication + group[2]) * 1e-6
        wait = self.host_wait(compute + memory + communication, max(s.num_reqs for s in live))
        return StepBreakdown(compute, memory + wait, communication)

    # -- reporting --------------------------------------------------------------------
    def op_table(self, shape: BatchShape) -> list[dict]:
        """Per op of one step: µs, and which source and method priced it."""
        n = min(self.padded_tokens(shape.num_tokens), self.max_tokens)
        s = min(max(shape.num_reqs, 1), len(self.per_sequence) - 1)
        rows = []
        for ops, i in ((self._token_ops, n), (self._seq_ops, s)):
            for name, (us, extrapolated) in ops.items():
                source, method = self.methods[name]
                rows.append({"op": name, "us": float(us[i - 1]), "source": source,
                             "method": "extrapolated" if extrapolated[i - 1] and method == "interpolated" else method})
        for phase in ("context", "generation"):
            keys = [k for k in self.methods if k.startswith(f"{phase}_attention")]
            if not keys:
                continue
            if phase == "context":
                only = BatchShape(prefill_tokens=shape.prefill_tokens, prefill_work=shape.prefill_work)
            else:
                only = BatchShape(num_decode=shape.num_decode, decode_context=shape.decode_context)
            source, method = self.methods[keys[0]]
            rows.append({"op": f"{phase}_attention", "us": self.attention_us(only, count=False), "source": source,
                         "method": method})
        return rows

    def extrapolation_counts(self) -> dict[str, int]:
        return dict(self.extrapolations)

    def describe(self) -> str:
        methods = {}
        for op, (source, method) in self.methods.items():
            methods.setdefault(method, []).append(op)
        how = "; ".join(f"{method}: {', '.join(sorted(ops))}" for method, ops in sorted(methods.items()))
        return (f"{self.label}: {self.model.name} composed from operators "
                f"(linear {self.linear_dtype}, experts {self.expert_dtype}, KV {self.kv_dtype}, tp{self.tp}"
                f"{f' dp{self.dp}' if self.dp > 1 else ''}) [{how}]")
