"""Which instance of a cluster gets a new request: the front door's routing policies.

A policy is one class with `pick(request, candidates) -> Instance`, registered by name in
`POLICIES`; `make_policy(name, **params)` builds one. The candidates are the instances that
are up and serve the request's model; inside the chosen instance, vLLM's own balancer picks
the data-parallel engine (emulator.dp_balancer). Every policy breaks ties by instance order,
so a run is deterministic.

- `round_robin`: in turn (the entering requests and the hand-overs to decode instances each in their own).
- `least_loaded`: the lowest waiting * 4 + running (vLLM 0.19's DP balancer score, on exact counts;
  0.33's, inside an instance, is emulator.dp_balancer's).
- `least_outstanding_tokens`: the fewest tokens owed (prompt + max_tokens of the requests in
  flight, less the tokens already streamed back) — what a gateway can count.
- `least_kv_usage`: the emptiest KV cache.
- `prefix_aware`: llm-d's precise prefix-cache scoring: each instance scores
  w_prefix * (cached prefix blocks / prompt blocks) + w_queue * (1 - load / max load)
  + w_kv * (1 - KV usage), the highest wins (defaults 3, 2, 2 as llm-d's scheduler profile).
- `session_affinity`: a session key (the `user` field, or a header) sticks to the instance it
  first went to while that instance is up; requests without one, or whose instance is gone, go
  to the least loaded.
- `capacity_weighted`: the lowest load per unit of capacity, (waiting * 4 + running + 1) /
  capacity, where capacity is the instance's decode tokens per second (from its cost model, or
  set in the cluster file): a faster device takes proportionally more.
- `llmservingsim_rr`, `llmservingsim_load`: LLMServingSim's RR and LOAD routers, which its cluster
  configs select (profiles.llmservingsim_cluster): each keeps one turn for the requests it sends in
  and another for the prefills it hands to decode instances, and counts each member of a
  data-parallel group as an instance of its own, picking the member too (`rank_for`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from emulator.block_hash import ensure_block_hashes
from emulator.request import Request

if TYPE_CHECKING:
    from emulator.instance import Instance


class RoutingPolicy(Protocol):
    """`reads_progress` (optional, default False): the policy reads state that changes during a run of
    decode steps (KV usage, cached blocks, tokens streamed), so the candidates are brought up to date
    before it picks; waiting counts do not change during a run, and `Instance.load` counts the requests
    a run not applied yet has finished by the time of the arrival."""
    name: str

    def pick(self, request: Request, candidates: list[Instance]) -> Instance: ...


class PicksEngine(Protocol):
    """A policy that also picks the data-parallel engine of the instance it picks (LLMServingSim's router,
    to which every DP member is an instance): the simulation asks it for the rank as it places each request
    (one pinned to a rank, X-data-parallel-rank, too: the pin wins, and the asking forgets the pick), and
    always picks (even among one candidate)."""

    def rank_for(self, request: Request, instance: Instance) -> int | None:
        """The rank its pick for `request` chose in `instance` (None: it picked for another request or instance,
        or not at all); asking forgets the pick, so none outlives the placement it was made for."""


def load(instance: Instance) -> int:
    """waiting * 4 + running over the instance's engines (Instance.load)."""
    return instance.load


class RoundRobin:
    """In turn, with one turn for the requests sent in and another for the prefills handed to decode
    instances, as vLLM's disaggregated-serving proxy cycles its prefill and its decode instances apart
    (one shared turn would send a P/D pair's hand-over to every other decode instance only). The side
    is read off the candidates: decode instances are the handing-on side."""
    name = "round_robin"

    def __init__(self) -> None:
        self.turns = {"entry": 0, "decode": 0}

    def pick(self, request: Request, candidates: list[Instance]) -> Instance:
        side = "decode" if candidates[0].role == "decode" else "entry"
        index = self.turns[side] % len(candidates)
        self.turns[side] = index + 1
        return candidates[index]


class LeastLoaded:
    name = "least_loaded"

    def pick(self, request: Request, candidates: list[Instance]) -> Instance:
        return min(candidates, key=lambda i: (i.load, i.index))


class LeastOutstandingTokens:
    name = "least_outstanding_tokens"
    reads_progress = True  # tokens stream back during a run of decode steps

    def pick(self, request: Request, candidates: list[Instance]) -> Instance:
        return min(candidates, key=lambda i: (i.outstanding_tokens, i.index))


class LeastKVUsage:
    name = "least_kv_usage"
    reads_progress = True  # a run of decode steps takes blocks

    def pick(self, request: Request, candidates: list[Instance]) -> Instance:
        return min(candidates, key=lambda i: (i.kv_usage, load(i), i.index))


class PrefixAware:
    name = "prefix_aware"
    reads_progress = True  # KV usage and the blocks decode steps cache

    def __init__(self, prefix_weight: float = 3.0, queue_weight: float = 2.0, kv_weight: float = 2.0) -> None:
        self.weights = (prefix_weight, queue_weight, kv_weight)

    def pick(self, request: Request, candidates: list[Instance]) -> Instance:
        w_prefix, w_queue, w_kv = self.weights
        loads = [load(i) for i in candidates]
        max_load = max(loads)
        best, best_score = candidates[0], float("-inf")
        for instance, instance_load in zip(candidates, loads):
            hashes = ensure_block_hashes(request, instance.block_size)
            matched = instance.cached_prefix_blocks(hashes) / len(hashes) if hashes else 0.0
            queue = 1.0 - instance_load / max_load if max_load else 1.0
            score = w_prefix * matched + w_queue * queue + w_kv * (1.0 - instance.kv_usage)
            if score > best_score:
                best, best_score = instance, score
        return best


class SessionAffinity:
    name = "session_affinity"

    def __init__(self) -> None:
        self.sessions: dict[str, Instance] = {}
        self.fallback = LeastLoaded()

    def pick(self, request: Request, candidates: list[Instance]) -> Instance:
        if request.session is None:
            return self.fallback.pick(request, candidates)
        chosen = self.sessions.get(request.session)
        if chosen is None or chosen not in candidates:
            chosen = self.sessions[request.session] = self.fallback.pick(request, candidates)
        return chosen


class CapacityWeighted:
    name = "capacity_weighted"

    def pick(self, request: Request, candidates: list[Instance]) -> Instance:
        return min(candidates, key=lambda i: ((load(i) + 1) / i.capacity, i.index))


def engine_load(instance: Instance, rank: int, waiting_weight: int = 4) -> int:
    """waiting * `waiting_weight` (vLLM's 4) + running of one engine of the instance at its `now`, as
    Instance.load counts the whole instance (a decode run not applied yet, which only a one-engine loop plans,
    counts the requests it has finished by then)."""
    engine = instance.engines[rank]
    score = (len(engine.scheduler.waiting) + len(engine.inbox)) * waiting_weight + len(engine.scheduler.running)
    for loop in instance.loops:
        if loop.pending is not None and loop.engines[0] is engine:
            score -= loop.pending.finished_before(instance.now)
    return score


class _LLMServingSimRouter:
    """LLMServingSim 2.x's Router (llmservingsim/serving/core/router.py): the instances it chooses among are
    its schedulers, one per instance of the config, so every member of a `dp_group` (one emulator instance of
    data_parallel_size engines) is one of them, in the config's order; its turns (prefill_rr_counter,
    decode_rr_counter) count over them. A request arriving at t is routed at the main loop's first pass at
    or after t (`route_arrived_requests(current)`, first thing in each pass of llmservingsim/serving/__main__.py
    `main`): at t when an NPU is idle (an idle NPU answers "pass" with the next arrival as its deadline, so
    ASTRA-Sim asks again then), else at the next iteration end of any instance, before that batch's
    completions are applied (`add_done` comes after). Its schedulers change only in those passes, so the
    waiting and running counts it reads then are those at t: the load read at the arrival, with a step ending
    at t not applied yet (DecodeRun.finished_before), is the same figure.

    `members`: the config's instances in its order, an instance that is a DP group named once per member (its
    k-th mention is its rank k), as its scheduler list orders them; without it, each instance's engines in
    turn."""

    def __init__(self, members: list[str] | tuple[str, ...] = ()) -> None:
        self.order = tuple(members)
        self.turns = {"entry": 0, "decode": 0}
        self.picked: tuple[Request, Instance, int] | None = None  # the last pick, until its request is placed

    def members(self, candidates: list[Instance]) -> list[tuple[Instance, int]]:
        everyone = [(instance, rank) for instance in candidates for rank in range(len(instance.engines))]
        if not self.order:
            return everyone
        by_name = {instance.name: instance for instance in candidates}
        ranks: dict[str, int] = {}
        ordered = []
        for name in self.order:
            rank = ranks[name] = ranks.get(name, -1) + 1
            if name in by_name and rank < len(by_name[name].engines):
                ordered.append((by_name[name], rank))
        listed = set(ordered)
        return ordered + [m for m in everyone if m not in listed]

    def pick(self, request: Request, candidates: list[Instance]) -> Instance:
        side = "decode" if candidates[0].role == "decode" else "entry"
        members = self.members(candidates)
        index = self.select(members, self.turns[side] % len(members))
        self.turns[side] = self.turn_after(index, len(members))
        instance, rank = members[index]
        self.picked = (request, instance, rank)
        return instance

    def select(self, members: list[tuple[Instance, int]], start: int) -> int:
        """The index of the member chosen, the scan starting at `start` (the side's turn)."""
        raise NotImplementedError

    def turn_after(self, index: int, n: int) -> int:
        """The side's turn once the member at `index` of `n` is chosen (RR keeps it unreduced)."""
        return index + 1

    def rank_for(self, request: Request, instance: Instance) -> int | None:
        picked, self.picked = self.picked, None
        return picked[2] if picked is not None and picked[0] is request and picked[1] is instance else None


class LLMServingSimRoundRobin(_LLMServingSimRouter):
    """LLMServingSim's RR (`Router._rr_select`; inference_serving/router.py `_rr_routing` in 2.0): in turn
    over every member, one turn for the requests it sends in (among every non-decode instance) and another
    for the prefills it hands to decode instances, as `round_robin` turns over instances."""
    name = "llmservingsim_rr"

    def select(self, members: list[tuple[Instance, int]], start: int) -> int:
        return start


class LLMServingSimLoad(_LLMServingSimRouter):
    """LLMServingSim 2.x's LOAD (`Router._least_load_select`): the member with the lowest
    (waiting * 4 + running) / max_num_seqs (its config's: `max_num_seqs` names those above the deployment's),
    where an instance without a sequence limit (its max_num_seqs 0, named in `unlimited`) scores its raw load;
    the scan starts at the side's turn and a tie goes to the first found, and the turn moves past the member
    chosen, so equal loads rotate. A DP group's members each score their own engine's load over their own
    max_num_seqs (vLLM's is per engine, as its is per scheduler)."""
    name = "llmservingsim_load"

    def __init__(self, unlimited: list[str] | tuple[str, ...] = (), members: list[str] | tuple[str, ...] = (),
                 max_num_seqs: dict[str, int] | None = None) -> None:
        super().__init__(members)
        self.unlimited = frozenset(unlimited)
        # its scheduler's limit where the deployment's is lower (a config's above its token budget, which vLLM
        # refuses: profiles.llmservingsim_cluster caps the deployment's)
        self.max_num_seqs = dict(max_num_seqs or {})

    def score(self, instance: Instance, rank: int) -> float:
        # a prefill handed to a decode instance is running there at once (Scheduler.add_decode: its KV transfer
        # is charged to the prefill's iteration), so on a decode instance a request waiting for its KV, or
        # for its first step, counts 1 as the running ones do
        load = engine_load(instance, rank, 1 if instance.role == "decode" else 4)
        if instance.name in self.unlimited:
            return load
        return load / self.max_num_seqs.get(instance.name, instance.deployment.config.max_num_seqs)

    def select(self, members: list[tuple[Instance, int]], start: int) -> int:
        n = len(members)
        best, best_score = start, float("inf")
        for offset in range(n):
            index = (start + offset) % n
            score = self.score(*members[index])
            if score < best_score:
                best, best_score = index, score
        return best

    def turn_after(self, index: int, n: int) -> int:
        return (index + 1) % n


POLICIES: dict[str, type] = {cls.name: cls for cls in (RoundRobin, LeastLoaded, LeastOutstandingTokens, LeastKVUsage,
                                                         PrefixAware, SessionAffinity, CapacityWeighted,
                                                         LLMServingSimRoundRobin, LLMServingSimLoad)}


def make_policy(name: str, **params) -> RoutingPolicy:
    """A policy by its registered name, with its parameters (e.g. PrefixAware's weights)."""
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(POLICIES)}")
    try:
        return cls(**params)
    except TypeError as exc:
        raise ValueError(f"routing policy {name!r}: {exc}") from None
