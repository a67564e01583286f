"""The time of one engine step, priced from measured per-layer tables.

    step = dense(N) + layers * [attention(batch) + moe(N) + 2 * all_reduce(N)] + per_sequence(S)

N is the number of tokens the step computes (padded to the CUDA-graph size vLLM
would replay), S the number of scheduled requests (every one gets logits, as in
vLLM v1). Dense ops sum the per-layer ops of the model family times the number
of layers, plus the once-per-step ops. The tables are GPU kernel times (eager),
so the sum is the GPU time of a step with no launch gaps: what CUDA graphs and
async scheduling deliver.
"""
from __future__ import annotations

from bisect import bisect_left

import numpy as np

from emulator.attention_table import AttentionTable
from emulator.batch import BatchShape
from emulator.config import EngineConfig
from emulator.hardware import DeviceSpec
from emulator.interpolate import Table1D, bracket
from emulator.models import ModelSpec


IDLE_RANK_BATCH = BatchShape(num_tokens=1, num_reqs=1, num_decode=1, decode_context=1, decode_context_max=1)


def cudagraph_capture_sizes(max_num_seqs: int, max_num_batched_tokens: int, device: DeviceSpec) -> list[int]:
    """vLLM's default capture sizes: 1, 2, 4, multiples of 8 to 256, then of 16, up to
    min(2 * max_num_seqs, 512 or 1024 on data-centre Blackwell, max_num_batched_tokens);
    plus max_num_batched_tokens and a full decode batch (max_num_seqs) when they fit."""
    ceiling = 1024 if device.arch.startswith("sm10") else 512
    largest = min(max_num_seqs * 2, ceiling)
    decode_sizes = [max_num_seqs] if max_num_seqs <= largest else []
    largest = min(largest, max_num_batched_tokens)
    sizes = {s for s in [1, 2, 4, *range(8, 256, 8), *range(256, largest + 1, 16)] if s <= largest}
    if max_num_batched_tokens <= largest:
        sizes.add(max_num_batched_tokens)
    sizes.update(s for s in decode_sizes if s <= max_num_batched_tokens)
    return sorted(sizes)


def ring_all_reduce_time(num_bytes: float, world: int, bandwidth: float, latency: float) -> float:
    """A ring all-reduce: 2(p-1) steps, each moving bytes/p over one link."""
    if world <= 1:
        return 0.0
    return 2 * (world - 1) * (latency + num_bytes / world / bandwidth)


def expected_active_experts(num_tokens: float, num_experts: int, top_k: int) -> float:
    """Distinct experts hit by num_tokens tokens routed uniformly to top_k of num_experts."""
    if num_tokens <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** num_tokens)


class MoETable:
    """Measured fused-MoE time by (tokens, activated experts), linear in both."""

    def __init__(self, points: np.ndarray) -> None:
        self.experts = sorted(set(points[:, 1].tolist()))
        self.rows = [Table1D(points[points[:, 1] == e][:, 0], points[points[:, 1] == e][:, 2]) for e in self.experts]

    def __call__(self, tokens: float, experts: float) -> float:
        lo, hi, w = bracket(self.experts, experts)
        t = self.rows[lo](tokens)
        return t if w == 0.0 else t + (self.rows[hi](tokens) - t) * w

    @property
    def extrapolations(self) -> int:
        return sum(r.extrapolations for r in self.rows)


class ProfiledCostModel:
    """Step time from a ModelProfile (profiles.model_profile) for one instance."""

    def __init__(self, profile, model: ModelSpec, device: DeviceSpec, config: EngineConfig) -> None:
        self.profile = profile
        self.model = model
        self.device = device
        self.num_layers = model.num_layers // config.pipeline_parallel_size
        self.tp = config.tensor_parallel_size
        self.ep = self.tp * config.data_parallel_size if model.is_moe else 1  # experts' work over TP x DP ranks
        self.capture_sizes = ([] if config.enforce_eager else
                              cudagraph_capture_sizes(config.max_num_seqs, config.max_num_batched_tokens, device))
        self.max_capture = self.capture_sizes[-1] if self.capture_sizes else 0
        self.dense = self._sum_tables(profile.dense,
                                      {op: n * self.num_layers for op, n in profile.meta["layer_ops"].items()}
                                      | {op: 1 for op in profile.meta["step_ops"]})
        self.per_sequence = self._sum_tables(profile.per_sequence, {op: 1 for op in profile.per_sequence})
        self.attention = AttentionTable(profile.attention)
        self.moe = MoETable(profile.moe) if model.is_moe and profile.moe is not None else None
        if model.is_moe and self.moe is None:
            raise ValueError(f"profile {profile.hardware}/{profile.model} has no MoE table for MoE model {model.name}")

    @staticmethod
    def _sum_tables(tables: dict[str, np.ndarray], weights: dict[str, int]) -> Table1D:
        """One table of the weighted sum; a dip below a smaller shape (measurement noise,
        at most a fraction of a percent) is levelled, since more tokens are never cheaper."""
        grid = sorted(set().union(*(tables[op][0].tolist() for op in weights)))
        ops = {op: Table1D(tables[op][0], tables[op][1]) for op in weights}
        total = [sum(w * ops[op](x) for op, w in weights.items()) for x in grid]
        return Table1D(grid, np.maximum.accumulate(total))

    def padded_tokens(self, n: int) -> int:
        """Tokens a CUDA graph really computes for an n-token step (vLLM pads up to a capture size)."""
        if n > self.max_capture:
            return n
        return self.capture_sizes[bisect_left(self.capture_sizes, n)]

    def step_time(self, shape: BatchShape) -> float:
        """Seconds of one step of one engine."""
        if shape.num_tokens == 0:
            return 0.0
        return self.group_step_time([shape])

    def group_step_time(self, shapes: list[BatchShape | None]) -> float:
        """Seconds of one lockstep step of data-parallel ranks (None: an idle rank's dummy batch).

        vLLM pads every rank to the largest token count; each MoE layer gathers all
        ranks' tokens, runs the local experts on them and scatters the results back.
        """
        live = [s if s is not None else IDLE_RANK_BATCH for s in shapes]
        n = self.padded_tokens(max(s.num_tokens for s in live))
        us = max(self._rank_time(s, n) for s in live)
        if self.moe is not None:
            us += self._moe_time(n, len(live))
        return us * 1e-6

    def _rank_time(self, shape: BatchShape, n: int) -> float:
        """Microseconds of one rank's dense, attention and head work, TP all-reduces included."""
        us = self.dense(n) + self.per_sequence(shape.num_reqs)
        us += self.num_layers * self.attention(shape.prefill_tokens, shape.prefill_history,
                                               shape.num_decode, shape.mean_decode_context)
        if self.tp > 1:
            link = self.device.interconnect
            message = n * self.model.hidden_size * self.model.activation_bytes
            us += self.num_layers * 2 * 1e6 * ring_all_reduce_time(message, self.tp, link.bandwidth, link.latency)
        return us

    def _moe_time(self, n: int, ranks: int) -> float:
        """Microseconds of the MoE layers: local experts over all ranks' tokens, plus their exchange."""
        m = self.model
        tokens = n * ranks
        experts = expected_active_experts(tokens, m.num_experts, m.num_experts_per_tok) / self.ep
        us = self.num_layers * self.moe(tokens / self.ep, max(experts, m.num_experts_per_tok / self.ep))
        if ranks > 1:  # ring all-gather before the experts and reduce-scatter after: 2 (p-1) hops
            link = self.device.interconnect
            chunk = n * m.hidden_size * m.activation_bytes
            us += self.num_layers * 2 * (ranks - 1) * 1e6 * (link.latency + chunk / link.bandwidth)
        return us

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
                f"{limits.get('max_num_seqs', '?')} sequences; linear interpolation)")

