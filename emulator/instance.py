"""One serving instance: what one `vllm serve` runs — a deployment's data-parallel engines behind vLLM's
own balancer — as a member of a simulated cluster.

An instance serves its model under one or more names, has a role (`mixed`; `prefill` and
`decode` for disaggregated serving), can be failed and restored, and keeps the load signals
a router in front of it can see: waiting and running requests, KV-cache usage, the tokens it
still owes (a gateway's count: prompt plus max_tokens of each request in flight, less the
tokens streamed back) and its capacity (decode tokens per second at a reference batch).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from emulator.batch import BatchShape
from emulator.deployment import Deployment
from emulator.dp_balancer import DPBalancer
from emulator.engine import Engine
from emulator.engine_loop import EngineLoop
from emulator.request import Request

ROLES = ("mixed", "prefill", "decode")
# vLLM's answers when a front end's queue bound refuses a request (AsyncLLM.check_admission), by bound
QUEUE_BOUND_MESSAGES = {
    "max_num_queued_reqs": "The engine is currently busy and cannot accept new requests. "
                           "Please try again later or on a different instance.",
    "max_num_queued_tokens": "The engine has reached its prefill token backlog limit. "
                             "Please try again later or on a different instance.",
}
# a client request's engine requests as its front end admits them: (choices, prompt length) of each prompt
GroupShape = tuple[tuple[int, int], ...]
CAPACITY_BATCH = 64        # the reference decode batch of `capacity` (or max_num_seqs when smaller) ...
CAPACITY_CONTEXT = 1024    # ... each request with this many tokens of context


@dataclass(frozen=True)
class InstanceSpec:
    """What a cluster file says of one instance (replicas are expanded into one spec each)."""
    name: str
    deployment: Deployment
    served_model_names: tuple[str, ...]
    role: str = "mixed"
    node: str | None = None
    port: int | None = None
    capacity: float | None = None  # for capacity-weighted routing; None: from the cost model
    dp_routing: str = "least_loaded"  # the instance's own balancer over its data-parallel engines
    extra: dict = field(default_factory=dict)  # settings later features read (P/D, KV tiers, power)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"instance {self.name!r}: role must be one of {', '.join(ROLES)}; got {self.role!r}")
        if not self.served_model_names:
            raise ValueError(f"instance {self.name!r} serves no model name")


def queue_bound_refusal(config, unfinished: int, prefill_tokens: int, n: int) -> str | None:
    """The front-end queue bound admitting n more requests would pass, as vLLM's AsyncLLM.check_admission
    decides: "max_num_queued_reqs" (the unfinished requests plus n above it), "max_num_queued_tokens" (the
    prompt tokens of those without a first token at or above it), or None. `config`: an EngineConfig."""
    if config.max_num_queued_reqs is not None and unfinished + n > config.max_num_queued_reqs:
        return "max_num_queued_reqs"
    if config.max_num_queued_tokens is not None and prefill_tokens >= config.max_num_queued_tokens:
        return "max_num_queued_tokens"
    return None


def decode_capacity(deployment: Deployment) -> float:
    """Decode tokens per second of the whole deployment at a reference batch, priced by its cost model."""
    config = deployment.config
    batch = min(CAPACITY_BATCH, config.max_num_seqs)
    step = deployment.cost_model.step_time(BatchShape.decode(batch, batch * CAPACITY_CONTEXT, CAPACITY_CONTEXT))
    return batch / step * config.data_parallel_size


class Instance:
    def __init__(self, index: int, spec: InstanceSpec, engines: list[Engine], loops: list[EngineLoop]) -> None:
        self.index = index
        self.spec = spec
        self.name = spec.name
        self.engines = engines
        self.loops = loops
        self.balancer = DPBalancer(engines, spec.dp_routing)
        self.capacity = spec.capacity if spec.capacity is not None else decode_capacity(spec.deployment)
        self.up = True
        self.outstanding_tokens = 0
        self.num_routed = 0
        self.now = 0.0  # the cluster's time when a router last read its load (set by the simulation)

    @property
    def deployment(self) -> Deployment:
        return self.spec.deployment

    @property
    def role(self) -> str:
        return self.spec.role

    @property
    def served_model_names(self) -> tuple[str, ...]:
        return self.spec.served_model_names

    # -- load signals ---------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return sum(e.num_waiting for e in self.engines)

    @property
    def num_running(self) -> int:
        return sum(e.num_running for e in self.engines)

    @property
    def load(self) -> int:
        """waiting * 4 + running over its engines (vLLM 0.19's data-parallel balancer score), at `now` (a router
        reads it for every instance at every arrival, hence the plain loop): a decode run not applied yet
        counts the requests it has finished by then."""
        score = 0
        for e in self.engines:
            score += (len(e.scheduler.waiting) + len(e.inbox)) * 4 + len(e.scheduler.running)
        for loop in self.loops:
            if loop.pending is not None:
                score -= loop.pending.finished_before(self.now)
        return score

    @property
    def kv_usage(self) -> float:
        return sum(e.kv.usage for e in self.engines) / len(self.engines)

    @property
    def block_size(self) -> int:
        return self.deployment.config.block_size

    def cached_prefix_blocks(self, block_hashes: list[int]) -> int:
        """The longest prefix of these block hashes cached on one of the instance's engines."""
        return max(e.kv.cached_prefix_length(block_hashes) for e in self.engines)

    @property
    def is_idle(self) -> bool:
        return all(e.is_idle for e in self.engines) and all(loop.is_idle for loop in self.loops)

    # -- admission (vLLM's front-end queue bounds) ---------------------------------------
    @property
    def bounded(self) -> bool:
        """Whether its front end refuses requests past a queue bound (--max-num-queued-reqs/-tokens)."""
        config = self.deployment.config
        return config.max_num_queued_reqs is not None or config.max_num_queued_tokens is not None

    def admission_refusal(self, prompts: GroupShape = ((1, 0),)) -> str | None:
        """The queue bound the front end refuses a client request at, or None: `queue_bound_refusal` checked
        for each of its `prompts` in turn, as vLLM's AsyncLLM.add_request checks each prompt's n choices
        against the requests it holds, those of the prompts added before included (offline replay: the
        engines must be settled to now; a server counts its own, as vLLM's API server does)."""
        if not self.up or not self.bounded:
            return None
        unfinished = [r for e in self.engines for queue in (e.inbox, e.scheduler.waiting, e.scheduler.running)
                      for r in queue]
        count = len(unfinished)
        tokens = sum(r.num_prompt_tokens for r in unfinished if r.first_token_time is None)
        for n, prompt_len in prompts:
            bound = queue_bound_refusal(self.deployment.config, count, tokens, n)
            if bound is not None:
                return bound
            count += n
            tokens += n * prompt_len  # each child is a request in its prefill, with the whole prompt
        return None

    # -- requests -------------------------------------------------------------------
    def pick_engine(self, request: Request, now: float, pinned: int | None = None) -> Engine:
        """vLLM's own choice among the instance's data-parallel engines at `now` (`pinned`: a rank of this
        instance)."""
        return self.balancer.pick(request, now, pinned)

    def fits(self, prompt_len: int) -> bool:
        """Whether a prompt of `prompt_len` tokens leaves room for an output token in this instance's context
        (what vLLM's front end asks of a request before its engine takes it)."""
        return prompt_len < self.deployment.config.max_model_len

    def fail(self, now: float) -> list[Request]:
        """The instance goes down: every request on it is dropped, its KV cache is lost. Returns the
        requests taken off it, for the cluster to fail or re-route."""
        self.up = False
        dropped = []
        for engine in self.engines:
            dropped.extend(engine.drain())
        for loop in self.loops:
            loop.reset(now)
        self.outstanding_tokens = 0
        return dropped

    def restore(self, now: float) -> None:
        """Back up, empty: a restarted pod has nothing cached, its front end knows no load yet, and it is
        awake (a pod put to sleep before it failed is a new process now)."""
        self.up = True
        self.balancer.reset()
        for loop in self.loops:
            if loop.paused:
                loop.resume(now)
