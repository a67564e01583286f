"""The interface every cost model answers, and what all of them share.

A cost model prices one engine step of a deployment from the step's `BatchShape`:

- `group_step_time(shapes)`: seconds of one step of the data-parallel ranks that step
  together (one shape per rank, None for an idle rank, which runs a dummy batch as in
  vLLM); `step_time(shape)` is the one-rank case;
- `breakdown(shapes)`: the same seconds split by what bounds them (compute, memory,
  communication), for the power model and for reports;
- `describe()`: how steps are priced (the start-up line), and
  `extrapolation_counts()`: how many lookups fell outside the measured range, by table.

Token counts are padded to the CUDA-graph size vLLM would replay (`padded_tokens`).

Beyond the GPU's kernels, a step is bounded by its host work (`DeviceSpec.host`: scheduling, input
preparation and output processing, handing the step to each worker): with async scheduling the CPU
prepares step k+1 while the GPU runs step k, so a step lasts as long as the longer of the two; without,
they add up. With pipeline parallelism a step's time is that of its largest stage (`pipeline_stages` of
them, each a GPU of its own, the last also running the LM head and the sampler: `stage_seconds`), and a
batch hands its activations to the next stage in `stage_transfer` seconds; the engine loop lays the stages
out.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import NamedTuple

from emulator.batch import BatchShape
from emulator.config import EngineConfig
from emulator.hardware import DeviceSpec


class StepBreakdown(NamedTuple):
    """Seconds of one step by what bounds its kernels."""
    compute: float        # compute-bound kernels: GEMMs past the ridge point, prefill attention
    memory: float         # memory-bound kernels: small-batch GEMMs, decode attention, norms, the sampler;
    #                       and the GPU waiting for the host (the lowest draw of the three)
    communication: float  # collectives between GPUs: TP all-reduce, the DP/EP exchange

    @property
    def total(self) -> float:
        return self.compute + self.memory + self.communication


# Decode attention over requests of different lengths costs more than over as many requests of their mean
# length: FlashAttention's varlen kernel splits each sequence's keys over thread blocks and the longest
# sequences set its tail. LLMServingSim 2.0 measured it as t = t(mean) + alpha (t(longest) - t(mean)) over
# ~13,000 mixed batches per model (least squares: RTX 4090 0.022; RTX PRO 6000 0.054 to 0.075 by model
# and TP); a device without such a profile takes the middle of those.
DEFAULT_DECODE_SKEW = 0.06


def price_steps(price: Callable[[int, int], float], context: int, context_max: int, n: int,
                k: int) -> list[float]:
    """Seconds of k consecutive decode steps of n requests, one at a time: each step's (summed, longest)
    context is one token per request longer than the last's."""
    out = []
    for _ in range(k):
        out.append(price(context, context_max))
        context += n
        context_max += 1
    return out


def decode_skew(device: DeviceSpec, measured: float | None = None) -> float:
    """alpha of the mixed-length decode correction: the device's when its YAML sets one
    (`attention.decode_skew`: a calibrated overlay), else measured with the model's profile, else the
    default for GPUs (TPUs run no FlashAttention)."""
    if device.attention_skew is not None:
        return device.attention_skew
    if measured is not None:
        return measured
    return DEFAULT_DECODE_SKEW if device.kind == "gpu" else 0.0


def cudagraph_capture_sizes(max_num_seqs: int, max_num_batched_tokens: int, device: DeviceSpec,
                            performance_mode: str = "balanced") -> list[int]:
    """vLLM's default capture sizes (config/vllm.py _set_cudagraph_sizes): 1, 2, 4 (with
    --performance-mode interactivity every size from 1 to 32, so small batches pad less), multiples
    of 8 to 256, then of 16, up to min(2 * max_num_seqs, 512 or 1024 on data-centre Blackwell,
    max_num_batched_tokens); plus max_num_batched_tokens and a full decode batch (max_num_seqs) when they fit."""
    ceiling = 1024 if device.arch.startswith("sm10") else 512
    largest = min(max_num_seqs * 2, ceiling)
    decode_sizes = [max_num_seqs] if max_num_seqs <= largest else []
    largest = min(largest, max_num_batched_tokens)
    small = range(1, 33) if performance_mode == "interactivity" else (1, 2, 4)
    sizes = {s for s in [*small, *range(8, 256, 8), *range(256, largest + 1, 16)] if s <= largest}
    if max_num_batched_tokens <= largest:
        sizes.add(max_num_batched_tokens)
    sizes.update(s for s in decode_sizes if s <= max_num_batched_tokens)
    return sorted(sizes)


class CostModel(ABC):
    """Prices the steps of one deployment (one model on one device type, one parallel layout)."""

    def __init__(self, config: EngineConfig, device: DeviceSpec) -> None:
        self.capture_sizes = ([] if config.enforce_eager else
                              cudagraph_capture_sizes(config.max_num_seqs, config.max_num_batched_tokens, device,
                                                      config.performance_mode))
        self.max_capture = self.capture_sizes[-1] if self.capture_sizes else 0
        self.pipeline_stages = config.pipeline_parallel_size
        self._host = device.host
        self._host_hidden = config.async_scheduling
        self._workers = config.tensor_parallel_size * config.pipeline_parallel_size

    def host_seconds(self, num_reqs: int) -> float:
        """Seconds of the host's work for a step of `num_reqs` requests."""
        return self._host.seconds(num_reqs, self._workers)

    def with_host(self, gpu_seconds: float, num_reqs: int) -> float:
        """A step's seconds from its GPU time and the host work of its `num_reqs` requests (async
        scheduling hides the shorter of the two; without it they add up)."""
        host = self._host.seconds(num_reqs, self._workers)
        if self._host_hidden:
            return gpu_seconds if gpu_seconds >= host else host
        return gpu_seconds + host

    def host_wait(self, gpu_seconds: float, num_reqs: int) -> float:
        """Seconds of a step the GPU spends waiting for the host."""
        return self.with_host(gpu_seconds, num_reqs) - gpu_seconds

    def stage_transfer(self, num_tokens: int) -> float:
        """Seconds to hand a step's activations from one pipeline stage to the next (0 without PP)."""
        return 0.0

    def head_seconds(self, num_reqs: int) -> float:
        """Seconds of the ops that only the last pipeline stage runs (LM head, logits, sampler)."""
        return 0.0

    def stage_seconds(self, step_seconds: float, num_reqs: int) -> tuple[float, float, float]:
        """(first, middle, last) seconds a step priced at `step_seconds` holds each pipeline stage: the
        host's share holds the first (its inputs come from the host), the LM head runs in the last."""
        host = 0.0 if self._host_hidden else self._host.seconds(num_reqs, self._workers)
        head = self.head_seconds(num_reqs)
        return step_seconds - head, step_seconds - head - host, step_seconds - host

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

    def decode_pricer(self, num_decode: int) -> Callable[[int, int], float]:
        """`step_time` of a step of `num_decode` single-token decodes, as a function of their summed and
        longest context: what a run of decode steps asks once per step (a cost model may make it cheaper)."""
        return lambda context, context_max: self.step_time(BatchShape.decode(num_decode, context, context_max))

    @abstractmethod
    def group_step_time(self, shapes: Sequence[BatchShape | None]) -> float:
        """Seconds of one lockstep step of data-parallel ranks (None: an idle rank's dummy batch)."""

    @abstractmethod
    def breakdown(self, shapes: Sequence[BatchShape | None]) -> StepBreakdown:
        """`group_step_time(shapes)` split by what bounds it (the slowest rank, plus the group's work)."""

    @abstractmethod
    def describe(self) -> str:
        """How this model prices a step: sources and methods, for the start-up log."""

    @abstractmethod
    def extrapolation_counts(self) -> dict[str, int]:
        """Lookups priced beyond the measured range so far, by table."""
