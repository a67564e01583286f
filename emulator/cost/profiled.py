"""The time of one engine step, priced from measured per-layer tables.

    step = dense(N) + layers * [attention(batch) + moe(N) + 2 * all_reduce(N)] + per_sequence(S)

N is the number of tokens the step computes (padded to the CUDA-graph size vLLM
would replay), S the number of scheduled requests (every one gets logits, as in
vLLM v1). Dense ops sum the per-layer ops of the model family times the number
of layers, plus the once-per-step ops. The tables are GPU kernel times (eager),
so the sum is the GPU time of a step with no launch gaps: what CUDA graphs and
async scheduling deliver. The MoE table was measured with balanced expert loads;
a real router's skew is priced from AIConfigurator's paired measurements
(`routing`). Decodes of mixed lengths are priced at their mean
context plus the measured share of the gap to the longest (`decode_skew`);
collectives come from the link's measured tables or its model
(emulator.cost.collectives); the host's share is the base class's.
"""
from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Sequence

import numpy as np

from emulator.batch import IDLE_RANK, BatchShape
from emulator.config import EngineConfig
from emulator.cost.base import CostModel, StepBreakdown, decode_skew
from emulator.cost.collectives import Collectives
from emulator.cost.interpolate import Table1D, bracket
from emulator.cost.profiled_decode import make_decode_pricer
from emulator.cost.tables import ModelProfile, RoutingImbalance
from emulator.cost.work import expected_active_experts
from emulator.hardware import DeviceSpec
from emulator.models import ModelSpec


_VALUES_KEPT = 1 << 16  # attention lookups remembered


class MoETable:
    """Measured fused-MoE time by (tokens, activated experts), linear in both."""

    def __init__(self, points: np.ndarray) -> None:
        self.experts = sorted(set(points[:, 1].tolist()))
        self.rows = [Table1D(points[points[:, 1] == e][:, 0], points[points[:, 1] == e][:, 2]) for e in self.experts]

    def __call__(self, tokens: float, experts: float) -> float:
        lo, hi, w = bracket(self.experts, experts)
        t = self.rows[lo](tokens)
        return t if w == 0.0 else t + (self.rows[hi](tokens) - t) * w

    def value(self, tokens: float, experts: float) -> float:
        """The same, not counted as a lookup."""
        lo, hi, w = bracket(self.experts, experts)
        t = self.rows[lo].value(tokens)
        return t if w == 0.0 else t + (self.rows[hi].value(tokens) - t) * w

    @property
    def extrapolations(self) -> int:
        return sum(r.extrapolations for r in self.rows)


def _runs(points: np.ndarray, columns: list[int]) -> list[np.ndarray]:
    """Sorted rows cut where the given columns change value."""
    cuts = np.flatnonzero(np.any(np.diff(points[:, columns], axis=0) != 0, axis=1)) + 1
    return np.split(points, cuts)


class _Row:
    """kv_decode -> time at one kv_prefill of a slice: Table1D's lookup, the same float operations, without
    its cache (the step loop's contexts are mostly new: it would miss and grow) and without sorting points
    that come sorted (a slice is built inside the step loop, when first read)."""
    __slots__ = ("xs", "ys", "last")

    def __init__(self, xs: list[float], ys: list[float]) -> None:
        if any(b <= a for a, b in zip(xs, xs[1:])):  # unsorted or repeated: in the order Table1D puts them
            table = Table1D(xs, ys)
            xs, ys = table.xs, table.ys
        self.xs, self.ys, self.last = xs, ys, len(xs) - 1

    def value(self, x: float) -> float:
        xs = self.xs
        if self.last == 0 or x <= xs[0]:
            return self.ys[0]
        i = bisect_right(xs, x)
        if i > self.last:
            i = self.last
        x0 = xs[i - 1]
        y0 = self.ys[i - 1]
        return y0 + (self.ys[i] - y0) * (x - x0) / (xs[i] - x0)


class _Slice:
    """Ragged (kv_prefill -> kv_decode -> time) grid for one (prefill_chunk, n_decode)."""
    __slots__ = ("kps", "rows")

    def __init__(self, points: np.ndarray) -> None:
        """points: (kv_prefill, kv_decode, time) rows sorted by kv_prefill."""
        # cut in Python, not by np.split: a slice is built inside the step loop, when first read
        kp, kd, t = points.T.tolist()
        starts = [0, *(i for i in range(1, len(kp)) if kp[i] != kp[i - 1])]
        ends = [*starts[1:], len(kp)]
        self.kps = [kp[a] for a in starts]
        self.rows = [_Row(kd[a:b], t[a:b]) for a, b in zip(starts, ends)]

    def __call__(self, kp: float, kd: float) -> float:
        kps, rows = self.kps, self.rows
        if len(kps) == 1 or kp <= kps[0]:
            return rows[0].value(kd)
        # bracket(kps, kp), inlined: a mixed step reads up to four slices
        hi = bisect_right(kps, kp)
        if hi >= len(kps):
            hi = len(kps) - 1
        w = (kp - kps[hi - 1]) / (kps[hi] - kps[hi - 1])
        t_lo = rows[hi - 1].value(kd)
        return t_lo if w == 0.0 else t_lo + (rows[hi].value(kd) - t_lo) * w


class AttentionTable:
    """Measured attention time of a mixed batch: one prefill chunk plus uniform decodes.

    Points (prefill_chunk, kv_prefill, n_decode, kv_decode) -> time, measured as one varlen
    attention call. Linear along each axis: the (prefill_chunk, n_decode) pairs form slices,
    each a ragged 2-D grid of (kv_prefill, kv_decode); a missing corner slice is replaced by
    the nearest existing one. Several prefills in one batch are folded into one equivalent
    chunk by the caller (see BatchShape)."""

    def __init__(self, points: np.ndarray) -> None:
        """points: (n, 5) array of prefill_chunk, kv_prefill, n_decode, kv_decode, time."""
        self.pcs = sorted(set(points[:, 0].tolist()))
        self.nds = sorted(set(points[:, 2].tolist()))
        ordered = points[np.lexsort((points[:, 3], points[:, 1], points[:, 2], points[:, 0]), axis=0)]
        # each slice's points; its _Slice is built when first read (a replay reads a few of thousands)
        self._points: dict[tuple[float, float], np.ndarray] = {
            (float(run[0, 0]), float(run[0, 2])): run for run in _runs(ordered, [0, 2])}
        self.max_point = tuple(points[:, :4].max(axis=0).tolist())  # Python floats: compared on every lookup
        self.extrapolations = 0
        self._slices: dict[tuple[float, float], _Slice] = {}  # by (pc, nd) asked, nearest ones included
        # by (pc, kp, nd, kd) (equal ints and floats share a key: they interpolate to the same time)
        self._values: dict[tuple[float, float, float, float], float] = {}

    def _slice(self, pc: float, nd: float) -> _Slice:
        s = self._slices.get((pc, nd))
        if s is None:
            key = (pc, nd)
            if key not in self._points:  # a missing corner: the nearest measured slice stands for it
                key = min(self._points, key=lambda k: (k[0] - pc) ** 2 + (k[1] - nd) ** 2)
            s = self._slices.get(key)
            if s is None:
                s = self._slices[key] = _Slice(self._points[key][:, [1, 3, 4]])
            self._slices[(pc, nd)] = s
        return s

    def __call__(self, pc: float, kp: float, nd: float, kd: float) -> float:
        """Time of the batch, counting a lookup beyond the measured points."""
        if pc > self.max_point[0] or kp > self.max_point[1] or nd > self.max_point[2] or kd > self.max_point[3]:
            self.extrapolations += 1
        return self.value(pc, kp, nd, kd)

    def value(self, pc: float, kp: float, nd: float, kd: float) -> float:
        """Time of the batch, not counted (kept: a step's lookups are asked again by its breakdown)."""
        key = (pc, kp, nd, kd)
        t = self._values.get(key)
        if t is None:
            if len(self._values) >= _VALUES_KEPT:  # a server runs for days: start afresh now and then
                self._values.clear()
            t = self._values[key] = self._value(pc, kp, nd, kd)
        return t

    def _value(self, pc: float, kp: float, nd: float, kd: float) -> float:
        p_lo, p_hi, wp = bracket(self.pcs, pc)
        n_lo, n_hi, wn = bracket(self.nds, nd)
        pcs, nds = self.pcs, self.nds
        t_ll = self._slice(pcs[p_lo], nds[n_lo])(kp, kd)
        t_lh = t_ll if wn == 0.0 else self._slice(pcs[p_lo], nds[n_hi])(kp, kd)
        t_l = t_ll + (t_lh - t_ll) * wn
        if wp == 0.0:
            return t_l
        t_hl = self._slice(pcs[p_hi], nds[n_lo])(kp, kd)
        t_hh = t_hl if wn == 0.0 else self._slice(pcs[p_hi], nds[n_hi])(kp, kd)
        return t_l + (t_hl + (t_hh - t_hl) * wn - t_l) * wp


class ProfiledCostModel(CostModel):
    """Step time from a ModelProfile (measured per-layer tables of this model on this device)."""

    def __init__(self, profile: ModelProfile, model: ModelSpec, device: DeviceSpec, config: EngineConfig,
                 collectives: Collectives | None = None, routing: RoutingImbalance | None = None) -> None:
        """`routing`: what a real router's skewed expert loads cost the fused-MoE kernel over the balanced
        routing the profile's MoE table was measured with (None: as measured)."""
        super().__init__(config, device)
        self.profile = profile
        self.model = model
        self.device = device
        self.collectives = collectives or Collectives(device.interconnect, device.arch)
        self.skew = decode_skew(device, profile.meta.get("decode_skew"))
        self.routing = routing
        self._collective_us: dict[tuple[str, int], float] = {}
        self.num_layers = -(-model.num_layers // config.pipeline_parallel_size)  # the largest stage
        self.tp = config.tensor_parallel_size
        self.ep = self.tp * config.data_parallel_size if model.is_moe else 1  # experts' work over TP x DP ranks
        layer_ops = {op: n * self.num_layers for op, n in profile.meta["layer_ops"].items()}
        step_ops = {op: 1 for op in profile.meta["step_ops"]}
        self.dense = self._sum_tables(profile.dense, layer_ops | step_ops)
        self.per_sequence = self._sum_tables(profile.per_sequence, {op: 1 for op in profile.per_sequence})
        self.attention = AttentionTable(profile.attention)
        self.moe = MoETable(profile.moe) if model.is_moe and profile.moe is not None else None
        if model.is_moe and self.moe is None:
            raise ValueError(f"profile {profile.hardware}/{profile.model} has no MoE table for MoE model {model.name}")
        # For the breakdown: the GEMMs among the dense ops (the others are norms, rope, activations:
        # memory-bound), and the token count past which a GEMM's weights are reused enough to be
        # compute-bound (the ridge point: FLOPs per weight byte = peak FLOP/s per byte/s of memory).
        gemms = {op: n for op, n in (layer_ops | step_ops).items() if op.endswith(("_proj", "gate"))}
        self._dense_gemms = self._sum_tables(profile.dense, gemms) if gemms else None
        weight_bytes = 1.0 if model.weight_dtype == "fp8" else 2.0
        self._ridge_tokens = device.peak_flops("bf16") * weight_bytes / (2.0 * device.memory_bandwidth)
        self._decode_pricers: dict[int, Callable[[int, int], float]] = {}  # by number of decodes
        self._row_arrays: dict[_Row, tuple[np.ndarray, np.ndarray]] = {}  # attention rows, for decode runs

    @staticmethod
    def _sum_tables(tables: dict[str, np.ndarray], weights: dict[str, int]) -> Table1D:
        """One table of the weighted sum; a dip below a smaller shape (measurement noise,
        at most a fraction of a percent) is levelled, since more tokens are never cheaper."""
        grid = sorted(set().union(*(tables[op][0].tolist() for op in weights)))
        ops = {op: Table1D(tables[op][0], tables[op][1]) for op in weights}
        total = [sum(w * ops[op](x) for op, w in weights.items()) for x in grid]
        return Table1D(grid, np.maximum.accumulate(total))

    def group_step_time(self, shapes: Sequence[BatchShape | None]) -> float:
        """vLLM pads every rank to the largest token count; each MoE layer gathers all
        ranks' tokens, runs the local experts on them and scatters the results back."""
        live = [s if s is not None else IDLE_RANK for s in shapes]
        n = self.padded_tokens(max(s.num_tokens for s in live))
        us = max(self._rank_time(s, n) for s in live)
        if self.moe is not None:
            us += self._moe_time(n, len(live))
        return self.with_host(us * 1e-6, max(s.num_reqs for s in live))

    def decode_pricer(self, num_decode: int) -> Callable[[int, int], float]:
        """`step_time` of a step of `num_decode` decodes, everything but the context done once, with
        `steps(context, context_max, k)` (emulator.cost.profiled_decode: the same seconds to the last bit,
        the same lookups counted). Made once per number of decodes (each decode run asks for one)."""
        pricer = self._decode_pricers.get(num_decode)
        if pricer is None:
            pricer = make_decode_pricer(self, num_decode, self._row_arrays) or super().decode_pricer(num_decode)
            self._decode_pricers[num_decode] = pricer
        return pricer

    def step_time(self, shape: BatchShape) -> float:
        """`group_step_time([shape])`, without its lists (this prices every step of a replay)."""
        if shape.num_tokens == 0:
            return 0.0
        n = self.padded_tokens(shape.num_tokens)
        us = self._rank_time(shape, n)
        if self.moe is not None:
            us += self._moe_time(n, 1)
        return self.with_host(us * 1e-6, shape.num_reqs)

    def _rank_time(self, shape: BatchShape, n: int) -> float:
        """Microseconds of one rank's dense, attention and head work, TP all-reduces included."""
        us = self.dense(n) + self.per_sequence(shape.num_reqs) + self._attention_us(shape, self.attention)
        if self.tp > 1:
            us += self._all_reduce_us(n)
        return us

    def _attention_us(self, shape: BatchShape, lookup) -> float:
        """Microseconds of the step's attention over all layers: at the decodes' mean context, plus the
        measured share of the gap to a batch of the longest (`lookup`: the table, counted or not)."""
        pc, kp, nd = shape.prefill_tokens, shape.prefill_history, shape.num_decode
        t = lookup(pc, kp, nd, shape.mean_decode_context)
        if self.skew and nd > 1 and shape.decode_context_max > shape.mean_decode_context:
            longest = lookup(pc, kp, nd, shape.decode_context_max)
            if longest > t:
                t += self.skew * (longest - t)
        return self.num_layers * t

    def _collective(self, kind: str, num_bytes: float, gpus: int) -> float:
        """Microseconds of one collective (cached by size: a step asks the same few)."""
        key = (kind, int(num_bytes))
        us = self._collective_us.get(key)
        if us is None:
            us = self._collective_us[key] = self.collectives.seconds(kind, num_bytes, gpus) * 1e6
        return us

    def _all_reduce_us(self, n: int) -> float:
        message = n * self.model.hidden_size * self.model.activation_bytes
        return self.num_layers * 2 * self._collective("all_reduce", message, self.tp)

    def head_seconds(self, num_reqs: int) -> float:
        return self.per_sequence.value(num_reqs) * 1e-6

    def stage_transfer(self, num_tokens: int) -> float:
        """vLLM sends the hidden states and the residual of every token to the next stage."""
        if self.pipeline_stages <= 1:
            return 0.0
        message = 2 * self.padded_tokens(num_tokens) * self.model.hidden_size * self.model.activation_bytes
        return self._collective("send_recv", message, 2) * 1e-6

    def _moe_time(self, n: int, ranks: int) -> float:
        """Microseconds of the MoE layers: local experts over all ranks' tokens, plus their exchange."""
        us = self._experts_us(n, ranks, count=True)
        if ranks > 1:
            us += self._exchange_us(n, ranks)
        return us

    def _experts_us(self, n: int, ranks: int, count: bool) -> float:
        m = self.model
        tokens = n * ranks
        experts = expected_active_experts(tokens, m.num_experts, m.num_experts_per_tok) / self.ep
        lookup = self.moe if count else self.moe.value
        us = self.num_layers * lookup(tokens / self.ep, max(experts, m.num_experts_per_tok / self.ep))
        if self.routing is not None:
            # Where a skewed router slows the kernel (the hottest expert's extra tiles, once every expert gets
            # tokens); below, its skew shows as fewer distinct experts, which the table's own axis prices.
            us *= max(1.0, self.routing(tokens * m.num_experts_per_tok / m.num_experts))
        return us

    def _exchange_us(self, n: int, ranks: int) -> float:
        """vLLM's all-gather of every rank's tokens and router logits before the experts, and the
        reduce-scatter of their outputs after (padded to the largest rank's count)."""
        m = self.model
        tokens = n * ranks
        gather = self._collective("all_gather", tokens * (m.hidden_size + m.num_experts) * m.activation_bytes, ranks)
        scatter = self._collective("reduce_scatter", tokens * m.hidden_size * m.activation_bytes, ranks)
        return self.num_layers * (gather + scatter)

    # -- breakdown ------------------------------------------------------------------------
    def breakdown(self, shapes: Sequence[BatchShape | None]) -> StepBreakdown:
        """GEMMs are compute-bound past the ridge point, memory-bound below it; prefill attention
        is compute-bound, decode attention memory-bound (a mixed batch's attention is split in
        proportion to the two parts' measured times); other dense ops are memory-bound."""
        live = [s if s is not None else IDLE_RANK for s in shapes]
        n = self.padded_tokens(max(s.num_tokens for s in live))
        parts = [self._rank_parts(s, n) for s in live]
        compute, memory, communication = parts[0] if len(parts) == 1 else max(parts, key=lambda p: p.total)
        if self.moe is not None:
            experts = self._experts_us(n, len(live), count=False)
            tokens_per_expert = n * len(live) * self.model.num_experts_per_tok / self.model.num_experts
            if tokens_per_expert >= self._ridge_tokens:
                compute += experts
            else:
                memory += experts
            if len(live) > 1:
                communication += self._exchange_us(n, len(live))
        gpu = (compute + memory + communication) * 1e-6
        wait = self.host_wait(gpu, max(s.num_reqs for s in live))
        return StepBreakdown(compute * 1e-6, memory * 1e-6 + wait, communication * 1e-6)

    def _rank_parts(self, shape: BatchShape, n: int) -> StepBreakdown:
        """Microseconds of one rank's work by bound (not counted as lookups)."""
        dense = self.dense.value(n)
        gemms = min(self._dense_gemms.value(n), dense) if self._dense_gemms is not None else 0.0
        head = self.per_sequence.value(shape.num_reqs)
        gemm_bound_compute = n >= self._ridge_tokens
        compute = gemms if gemm_bound_compute else 0.0
        memory = dense - compute
        if shape.num_reqs >= self._ridge_tokens:
            compute += head
        else:
            memory += head
        attention = self._attention_us(shape, self.attention.value)
        if shape.prefill_tokens and shape.num_decode:
            prefill = self.attention.value(shape.prefill_tokens, shape.prefill_history, 0, 0)
            decode = self.attention.value(0, 0, shape.num_decode, shape.mean_decode_context)
            share = prefill / (prefill + decode) if prefill + decode > 0 else 1.0
            compute += attention * share
            memory += attention * (1.0 - share)
        elif shape.prefill_tokens:
            compute += attention
        else:
            memory += attention
        communication = self._all_reduce_us(n) if self.tp > 1 else 0.0
        return StepBreakdown(compute, memory, communication)

    # -- reporting ------------------------------------------------------------------------
    def extrapolation_counts(self) -> dict[str, int]:
        counts = {"dense": self.dense.extrapolations, "per_sequence": self.per_sequence.extrapolations,
                  "attention": self.attention.extrapolations}
        if self.moe is not None:
            counts["moe"] = self.moe.extrapolations
        return counts

    def describe(self) -> str:
        limits = self.profile.meta.get("profiled_limits", {})
        return (f"profiled tables {self.profile.hardware}/{self.profile.model}/"
                f"{self.profile.meta['dtype']}/tp{self.tp} "
                f"from {self.profile.meta['source']['repo']}@{self.profile.meta['source']['commit']} "
                f"(grid up to {limits.get('max_num_batched_tokens', '?')} tokens, "
                f"{limits.get('max_num_seqs', '?')} sequences; linear interpolation; "
                f"mixed decode lengths +{self.skew:g} of the gap to the longest; "
                f"collectives: {self.collectives.describe()})")
