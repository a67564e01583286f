"""The event loop and the public API drivers use: submit, abort, advance, run, and faults.

A simulation runs a cluster: instances (emulator.instance), each one deployment's engines and
the loops that drive them, behind a routing policy (emulator.routing). Virtual time only moves
by popping the next event: a cluster event (an instance failing or coming back), an arrival,
or an engine loop that is due (a batch it waits on has finished); ties go in that order, then
loops by index, so every run is deterministic.

Engines interact only through the router, at arrivals. So offline (`run`) a loop plans a run
of decode steps as far as its own events allow and keeps it pending; an arrival settles only
the loop of the engine it is routed to (and, for policies that read KV usage, cached
prefixes or tokens streamed, those of the candidates), which applies the steps decided before
the arrival. Each engine's records stay in order; engines' records may interleave in any order.
Every finished step is reported to the listeners (statistics, step log, the server's token
delivery); a run of decode steps goes as one RunRecord to listeners that take runs.

KV moves between instances too (emulator.disaggregation): a decode engine that allocated a
request's blocks starts a transfer on a link; its end is a cluster event, which settles and
wakes the two engines it concerns. For a model with prefill and decode instances, arrivals go
through the cluster's own P/D proxy.

The engine requests of one client request (its prompts and its n choices) enter together
(`submit_group`): as a router in front of vLLM pods sends an HTTP request to one pod, the policy
picks one instance for all of them (one routing decision), whose own balancer then places each.
"""
from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Iterable
from itertools import count

from emulator.disaggregation import KVTransfers, ModelNotFound, PDGroup, PDProxy, PodPaused
from emulator.engine import Engine, RunRecord, StepRecord
from emulator.engine_loop import EngineLoop
from emulator.instance import QUEUE_BOUND_MESSAGES, GroupShape, Instance
from emulator.kv_transfer import Link
from emulator.lora import ServedAdapters
from emulator.request import Request, RequestStatus
from emulator.routing import LeastLoaded, RoutingPolicy

Listener = Callable[[StepRecord], None]
RunListener = Callable[[RunRecord], None]


class NoInstanceError(RuntimeError):
    """No instance that serves the request's model is up."""


class AdmissionRefused(RuntimeError):
    """Every instance the request could go to is at a queue bound (vLLM's 503 from check_admission);
    `bound` names the one `instance` (the first of them) is at ("max_num_queued_reqs" or
    "max_num_queued_tokens")."""

    def __init__(self, bound: str, instance: Instance) -> None:
        super().__init__(QUEUE_BOUND_MESSAGES[bound])
        self.bound = bound
        self.instance = instance


class ContextTooLong(NoInstanceError):
    """No instance the request could go to holds its prompt and one output token (vLLM's input processor
    refuses such a prompt with a 400); `max_model_len`: the longest context among them."""

    def __init__(self, prompt_len: int, max_model_len: int) -> None:
        super().__init__(context_too_long_message(prompt_len, max_model_len))
        self.prompt_len = prompt_len
        self.max_model_len = max_model_len


def context_too_long_message(prompt_len: int, max_model_len: int) -> str:
    """vLLM's InputProcessor message for a decoder prompt that leaves no room for one output token."""
    suggestion = "Make sure that `max_model_len` is no smaller than the number of text tokens"
    if prompt_len > max_model_len:
        return (f"The decoder prompt (length {prompt_len}) is longer than the maximum model length of "
                f"{max_model_len}. {suggestion}.")
    return (f"The decoder prompt (length {prompt_len}) plus the number of requested output tokens (at least 1) is "
            f"longer than the maximum model length of {max_model_len}. {suggestion} (prompt + requested output "
            f"tokens).")


def group_shape(requests: list[Request]) -> GroupShape:
    """(choices, prompt length) of each prompt of a client request's engine requests: the choices of one prompt
    come one after the other and share its token ids, as vLLM's child requests copy one EngineCoreRequest."""
    shape: list[list[int]] = []
    previous = None
    for request in requests:
        ids = request.prompt_token_ids
        if shape and ids is not None and ids is previous:
            shape[-1][0] += 1
        else:
            shape.append([1, request.num_prompt_tokens])
        previous = ids
    return tuple((n, prompt_len) for n, prompt_len in shape)


# Where a request the routing policy places enters the cluster (ClusterSpec.entry):
# - by_role: a model with prefill and decode instances is served through the P/D proxy, otherwise by its mixed
#   instances; a request naming no model is the first model's;
# - any_non_decode (LLMServingSim's router): any non-decode instance of its model, of any model when it names
#   none; one that enters at a prefill instance is handed to a decode instance after its prefill.
ENTRIES = ("by_role", "any_non_decode")


class Simulation:
    def __init__(self, instances: list[Instance], routing: RoutingPolicy | None = None, links: tuple = (),
                 entry: str = "by_role") -> None:
        """`links`: the cluster's links between nodes (ClusterSpec.links), for KV transfers; `entry`: one of
        ENTRIES."""
        if not instances:
            raise ValueError("a simulation needs at least one instance")
        if entry not in ENTRIES:
            raise ValueError(f"entry must be one of {', '.join(ENTRIES)}; got {entry!r}")
        self.entry = entry
        self.instances = instances
        self.engines: list[Engine] = [e for instance in instances for e in instance.engines]
        if [e.index for e in self.engines] != list(range(len(self.engines))):
            raise ValueError("engines must be numbered 0..n-1 across the instances, in order")
        self.loops: list[EngineLoop] = [loop for instance in instances for loop in instance.loops]
        self.instance_of: list[Instance] = [i for i in instances for _ in i.engines]  # by engine index
        # the loops whose steps can hand a request to another engine (a P/D prefill's end: PDProxy), and those
        # that can be handed one (a decode instance's)
        self._handing_over = [loop for instance in instances if instance.role == "prefill" for loop in instance.loops]
        self._taking_over = {id(loop) for instance in instances if instance.role == "decode" for loop in instance.loops}
        self._loop_of = {engine.index: loop for loop in self.loops for engine in loop.engines}
        self.routing = routing or LeastLoaded()
        self.by_model: dict[str, list[Instance]] = {}
        for instance in instances:
            for name in instance.served_model_names:
                self.by_model.setdefault(name, []).append(instance)
        self.default_model = instances[0].served_model_names[0]
        # (model name, role) -> the instances serving it in that role, up or not, in order (both never change)
        self._of_role: dict[tuple[str, str], list[Instance]] = {}
        for name, group in self.by_model.items():
            for instance in group:
                self._of_role.setdefault((name, instance.role), []).append(instance)
        self.adapters = ServedAdapters.of(i.spec for i in instances)  # LoRA adapters, by instance
        self.now = 0.0
        self.offline = False  # inside `run` (loops plan lazily, idle ones skip some wakes)
        self.active: dict[str, Request] = {}
        self.routing_decisions: Counter[str] = Counter()  # instance name -> requests routed there
        self.groups: dict[str, tuple[Request, ...]] = {}  # request id -> its client request's requests (if several)
        # request id -> its client request's shape (if several), as submit_group found it: an engine drops a request's
        # token ids, which a retry could no longer tell one prompt's choices by
        self.group_shapes: dict[str, GroupShape] = {}
        self.instance_events: list[tuple[float, str, str]] = []  # (time, instance, "down" | "up")
        self.rejecting: set[int] = set()  # engines paused so that they reject new requests (pause's generation)
        self._events: list[tuple[float, int, Callable[[], None]]] = []  # cluster events (faults), a heap
        self._event_order = count()
        self._step_listeners: list[Listener] = []  # in the order added
        self._run_listeners: list[RunListener] = []  # the same listeners' runs (a step listener's: its steps)
        self._finish_listeners: list[Callable[[Request], None]] = []
        self._prefill_listeners: list[Callable[[Request], None]] = []
        self._reroute_listeners: list[Callable[[Request], None]] = []
        self._down_listeners: list[Callable[[int, float], None]] = []
        self._restore_listeners: list[Callable[[Instance], None]] = []
        self.transfers = KVTransfers(self, links)
        self.pd = PDProxy(self, self.transfers)

    def add_listener(self, listener: Listener, on_run: RunListener | None = None) -> None:
        """`listener` gets every finished step; give `on_run` to take a run of decode steps at once
        (else the run comes step by step)."""
        if on_run is None:  # it hears a run's steps one at a time
            def on_run(run: RunRecord) -> None:
                for step in run.steps():
                    listener(step)
        self._step_listeners.append(listener)
        self._run_listeners.append(on_run)

    def add_finish_listener(self, listener: Callable[[Request], None], *, prefills: bool = False) -> None:
        """Called for every request that ends (finished, stopped, aborted or failed); with `prefills`,
        also for the prefills the cluster's own P/D proxy runs for them (the requests a prefill pod
        serves, not its clients')."""
        self._finish_listeners.append(listener)
        if prefills:
            self._prefill_listeners.append(listener)

    def add_reroute_listener(self, listener: Callable[[Request], None]) -> None:
        """Called for every request a fault re-routes, once it is on its new instance (a P/D client's
        request: once its new prefill is placed)."""
        self._reroute_listeners.append(listener)

    def add_engine_down_listener(self, listener: Callable[[int, float], None]) -> None:
        """Called with (engine index, virtual time) for each engine of an instance that fails, once its
        requests are gone: it runs nothing and holds nothing until it is restored and takes new work."""
        self._down_listeners.append(listener)

    def add_restore_listener(self, listener: Callable[[Instance], None]) -> None:
        """Called with each instance that comes back up (empty: a new vLLM process on it), at `now`."""
        self._restore_listeners.append(listener)

    def instance(self, name: str) -> Instance:
        for instance in self.instances:
            if instance.name == name:
                return instance
        raise KeyError(f"no instance named {name!r}; instances: {', '.join(i.name for i in self.instances)}")

    def candidates(self, model: str | None, role: str | None = None) -> list[Instance]:
        """The instances a request for `model` may go to: up, serving it, of `role` (None: mixed ones,
        or any when none is mixed; every non-decode one with the any_non_decode entry, which also takes a
        request naming no model to any model's)."""
        if model is None and self.entry == "any_non_decode":
            instances = self.instances
        else:
            instances = self.by_model.get(model or self.default_model)
        if instances is None:
            raise ValueError(f"no instance serves model {model!r}; served: {', '.join(self.by_model)}")
        if role is not None and instances is not self.instances:  # (asked at every arrival: the role's own list)
            return [i for i in self.of_role(model, role) if i.up]
        up = [i for i in instances if i.up]
        if role is not None:
            return [i for i in up if i.role == role]
        if self.entry == "any_non_decode":
            return [i for i in up if i.role != "decode"]
        mixed = [i for i in up if i.role == "mixed"]
        return mixed or up

    def of_role(self, model: str | None, role: str) -> list[Instance]:
        """The instances serving `model` (None: the default one) in `role`, up or not."""
        return self._of_role.get((model or self.default_model, role), [])

    # -- driving the simulation ------------------------------------------------------
    def submit(self, request: Request, pinned_engine: int | None = None, instance: Instance | None = None) -> Engine:
        """Hand a request to an engine at its arrival time (which must not be in the past): `submit_group` of
        one request."""
        return self.submit_group([request], pinned_engine, instance)[0]

    def submit_group(self, requests: list[Request], pinned_engine: int | None = None,
                     instance: Instance | None = None) -> list[Engine]:
        """Hand the engine requests of one client request (its prompts and choices, vLLM's child requests)
        to the cluster at once, each at its arrival time (which must not be in the past); returns their
        engines, in order.

        A router or gateway in front of vLLM pods sends one HTTP request to one pod: the routing policy
        picks an instance for the first request (one routing decision, with everything it reads as for a
        single request) and the others follow it. Inside the instance vLLM's own balancer places each one
        on a data-parallel engine, as AsyncLLM adds each child request to its engine client. The
        instance's front end takes all of them or none: vLLM's checks its queue bounds again as it adds each
        prompt's choices (counting the prompts added before), and when one prompt is refused the request
        fails with that 503 and the prompts added before it are aborted before their engine runs them,
        which leaves no trace; so an instance that would refuse any of the prompts refuses the whole
        request (group_shape says which requests are one prompt's choices). For a model with prefill and
        decode instances, the cluster's P/D proxy sends them all to one prefill instance and then, once all
        their prefills are done, to one decode instance.

        `instance`: the instance whose own port they came in on (else the routing policy picks one);
        `pinned_engine`: a data-parallel rank within that instance (vLLM's X-data-parallel-rank; the cluster's
        own P/D proxy passes it to neither pod, as vLLM's toy proxy sends them Authorization and X-Request-Id alone).
        The policy only considers the instances whose context holds every one of their prompts with an output
        token (so a request naming no model on a cluster of models with different contexts goes where it fits).
        Raises NoInstanceError when no instance for their model is up, ContextTooLong (one) when none of those up
        holds their longest prompt (vLLM's 400), AdmissionRefused when every one they could go to is at a queue
        bound (a router passes over an instance that refuses); whatever it raises, none of them is left in the
        cluster."""
        ids = set()
        for request in requests:
            if request.request_id in self.active or request.request_id in ids \
                    or request.request_id in self.transfers.loads:  # (an aborted request's read still runs)
                raise ValueError(f"request id {request.request_id!r} is already in use")
            ids.add(request.request_id)
            if request.arrival_time < self.now:
                request.arrival_time = self.now
        if not requests:
            return []
        first, shape = requests[0], group_shape(requests)
        longest = max(r.num_prompt_tokens for r in requests)
        if instance is None and self.entry == "any_non_decode":
            target = self.route(first, admit=shape, prompt_len=longest)
            if target.role == "prefill":
                return self._remember(requests, shape, self._prefill_first(requests, PDGroup(target), pinned_engine))
        elif instance is None and self.pd.serves(first.model):  # the prefill pod's front end admits them
            return self._remember(requests, shape,
                                  self._prefill_first(requests, PDGroup(shape=shape, longest=longest)))
        elif instance is not None:
            if not instance.up:
                raise NoInstanceError(f"instance {instance.name!r} is down")
            if not instance.fits(longest):
                raise ContextTooLong(longest, instance.deployment.config.max_model_len)
            self._admissible([instance], shape)
            for request in requests:
                request.direct = True
            target = instance
        else:
            target = self.route(first, admit=shape, prompt_len=longest)
        return self._remember(requests, shape, self._placed_all(
            requests, lambda request: self.place(request, target, pinned_engine)))

    def _remember(self, requests: list[Request], shape: GroupShape, engines: list[Engine]) -> list[Engine]:
        """The requests are in the cluster: those of a client request of several are one group (a fault
        re-routes them together, with its `shape`)."""
        if len(requests) > 1:
            group = tuple(requests)
            for request in requests:
                self.groups[request.request_id] = group
                self.group_shapes[request.request_id] = shape
        return engines

    def _prefill_first(self, requests: list[Request], group: PDGroup, pinned_engine: int | None = None,
                       undo: Callable[[Request], None] | None = None) -> list[Engine]:
        """Prefills first (on the group's prefill instance, else the one the policy picks for the first; at
        `pinned_engine`, a rank of the group's prefill instance, if given); the requests reach a decode instance
        after, together (PDProxy). `undo`: as for `_placed_all`."""
        return self._placed_all(requests, lambda request: self._start_prefill(request, group, pinned_engine), undo)

    def _start_prefill(self, request: Request, group: PDGroup, pinned_engine: int | None = None) -> Engine:
        """A client's request goes to its prefill pod first (PDProxy.start): it is in the cluster from now on;
        returns its prefill's engine."""
        engine = self.pd.start(request, group=group, pinned_engine=pinned_engine)
        self.active[request.request_id] = request
        return engine

    def _placed_all(self, requests: list[Request], put: Callable[[Request], Engine],
                    undo: Callable[[Request], None] | None = None) -> list[Engine]:
        """`put` each request in the cluster; if one fails, those put before leave again (aborted, before any
        step; or taken back by `undo`, which leaves their end to the caller) and the error goes on."""
        engines = []
        try:
            for request in requests:
                engines.append(put(request))
        except BaseException:
            for request in requests[:len(engines)]:
                if undo is None:
                    self.abort(request.request_id)
                else:
                    undo(request)
            raise
        return engines

    def _withdraw(self, request: Request) -> None:
        """Take a request just put in the cluster back out before any step, without ending it (a retry that
        could not place its whole group: the caller fails them all, once each); a P/D prefill run for it ends as
        aborted (the prefill pod's account of it)."""
        self.active.pop(request.request_id, None)
        if self.pd.in_prefill(request):
            prefill, _ = self.pd.drop(request)
            if prefill is not None:
                self._abort_prefill(prefill)
            return
        self._abort_on_engine(request)  # (fail_instance's _ended gives back what its instance counted for it)

    def _admissible(self, instances: list[Instance], shape: GroupShape = ((1, 0),)) -> list[Instance]:
        """Those of `instances` whose front end takes a client request of `shape` now (Instance.admission_refusal);
        AdmissionRefused if none does."""
        if not any(i.bounded for i in instances):
            return instances
        refusals = []
        for i in instances:
            self._settle(i, self.now)  # its queues as they are now
            refusals.append(i.admission_refusal(shape))
        taking = [i for i, refusal in zip(instances, refusals) if refusal is None]
        if instances and not taking:
            raise AdmissionRefused(refusals[0], instances[0])
        return taking

    def route(self, request: Request, role: str | None = None, exclude: tuple[Instance, ...] = (),
              admit: GroupShape = (), prompt_len: int | None = None) -> Instance:
        """The instance the routing policy picks for a request among the candidates of its model (and role)
        that hold its prompt, counted as one routing decision; `admit`: the number of engine requests a
        client's request brings, (choices, prompt length) of each of its prompts (its first is `request`),
        which instances at a queue bound refuse (see `submit_group`); `prompt_len`: the longest of their prompts
        (default: the request's own)."""
        candidates = [i for i in self.candidates(request.model, role) if i not in exclude]
        if request.lora is not None:
            candidates = [i for i in candidates if self.adapters.admits(i.name, request.lora)]
        if not candidates:
            raise NoInstanceError(f"no {role + ' ' if role else ''}instance serving "
                                  f"{request.model or self.default_model!r} is up")
        prompt_len = request.num_prompt_tokens if prompt_len is None else prompt_len
        roomy = [i for i in candidates if i.fits(prompt_len)]
        if not roomy:
            raise ContextTooLong(prompt_len, max(i.deployment.config.max_model_len for i in candidates))
        candidates = roomy
        if admit:
            candidates = self._admissible(candidates, admit)
        if len(candidates) == 1 and not hasattr(self.routing, "rank_for"):  # (emulator.routing.PicksEngine)
            chosen = candidates[0]
        else:
            if getattr(self.routing, "reads_progress", False):
                for candidate in candidates:
                    self._settle(candidate, self.now)
            for candidate in candidates:
                candidate.now = self.now  # the time its load is read at (a pending run may finish requests)
            chosen = self.routing.pick(request, candidates)
        self.routing_decisions[chosen.name] += 1
        return chosen

    def _settle(self, instance: Instance, until: float) -> None:
        """Bring the instance's engines to their state at `until` (apply pending decode runs, do the idle wakes
        left out before it: EngineLoop.catch_up)."""
        for loop in instance.loops:
            self._settle_loop(loop, until)

    def settle_engine(self, engine: Engine) -> None:
        """Bring one engine to its state now (something from outside is about to change it)."""
        self._settle_loop(self._loop_of[engine.index], self.now)

    def _settle_loop(self, loop: EngineLoop, until: float) -> None:
        if loop.pending is not None:
            loop.settle(until, self._report)
        if loop.stores_due is not None:
            loop.catch_up(until)

    def wake_engine(self, engine: Engine) -> None:
        """Something came in for an engine: its loop runs now if it was waiting for input."""
        self._loop_of[engine.index].wake(self.now)

    def blocks_freed(self, engine: Engine) -> None:
        """An engine's blocks came free outside a step (a P/D prefill's KV was read): its loop runs now, unless,
        offline, it is idle and only its own next schedule reads what the free left (EngineLoop.defer_wake)."""
        loop = self._loop_of[engine.index]
        if not (self.offline and loop.defer_wake(self.now)):
            loop.wake(self.now)

    def place(self, request: Request, instance: Instance, pinned_engine: int | None = None) -> Engine:
        """Put a request on an engine of `instance` now (vLLM's own balancer, or the pinned rank); ContextTooLong
        if its prompt leaves no room for an output token there (it would never finish)."""
        if not instance.fits(request.num_prompt_tokens):
            raise ContextTooLong(request.num_prompt_tokens, instance.deployment.config.max_model_len)
        self._settle(instance, self.now)
        if request.lora is not None:
            self.adapters.bind(request, instance.name)  # it runs with that pod's adapter (its id, its path)
        if hasattr(self.routing, "rank_for"):  # the policy picked the engine too (a pinned rank wins; asking forgets)
            picked = self.routing.rank_for(request, instance)
            pinned_engine = picked if pinned_engine is None else pinned_engine
        engine = instance.pick_engine(request, self.now, pinned_engine)
        self.active[request.request_id] = request
        instance.outstanding_tokens += request.num_prompt_tokens + request.max_tokens
        instance.num_routed += 1
        engine.add_request(request)
        self._loop_of[engine.index].wake(max(request.arrival_time, self.now))
        return engine

    def abort(self, request_id: str) -> bool:
        """Abort a request wherever it is; its blocks are freed at once (unless a P/D read into them runs: when it
        ends, KVTransfers.abort). False if unknown or done."""
        request = self.active.pop(request_id, None)
        if request is None:
            return False
        if self.pd.in_prefill(request):  # with its prefill pod (its prefill running, or waiting for its group's)
            prefill, group = self.pd.drop(request)
            if prefill is not None:
                self._abort_prefill(prefill)
            request.status = RequestStatus.FINISHED_ABORTED
            request.finish_time = self.now
            self._finished(request)
            if group is not None:
                self.pd.go_on(group)  # it may have been the last prefill the others waited for
            return True
        reading = request.external_kv is not None and self.transfers.abort(request)
        self._abort_on_engine(request, keep_blocks=reading)
        self._ended(request)
        return True

    def _abort_prefill(self, prefill: Request) -> None:
        """Abort a P/D prefill the proxy has let go of (its client's request left it): off its engine, no longer
        owed by its instance, reported as the prefill pod's own account of it."""
        self.active.pop(prefill.request_id, None)
        self._abort_on_engine(prefill)
        instance = self.instance_of[prefill.engine_index]
        if instance.up:  # (as _ended: a failed instance owes nothing)
            instance.outstanding_tokens -= prefill.num_prompt_tokens + prefill.max_tokens - prefill.num_output_tokens
        for listener in self._prefill_listeners:
            listener(prefill)

    def _abort_on_engine(self, request: Request, keep_blocks: bool = False) -> None:
        """Take a request off its engine now (its blocks freed, or `keep_blocks`: held); the engine's counts
        changed outside a step, which vLLM's engines report to the DP coordinator too."""
        engine = self.engines[request.engine_index]
        self.settle_engine(engine)  # a decode run planned past now is applied up to now first
        engine.abort(request, self.now, keep_blocks)
        self.instance_of[engine.index].balancer.engine_changed(engine, self.now)

    def fail_placed(self, request: Request) -> None:
        """End a request an engine holds with finish reason "error" (its blocks freed), as a request on a
        failed instance ends (a failed KV load under kv_load_failure_policy "fail")."""
        self.active.pop(request.request_id, None)
        self._abort_on_engine(request)
        request.status = RequestStatus.FINISHED_ERROR
        self._ended(request)

    def fail_request(self, request: Request) -> None:
        """End a request with finish reason "error" (vLLM's answer when its engine is gone)."""
        self.active.pop(request.request_id, None)
        request.status = RequestStatus.FINISHED_ERROR
        request.finish_time = self.now
        self._finished(request)

    def abort_all(self) -> int:
        """Abort every client's request (a P/D prefill with its client: alone, its client would go on to a decode
        pod); returns how many."""
        ids = [request_id for request_id in self.active if not self.pd.is_prefill(self.active[request_id])]
        for request_id in ids:
            self.abort(request_id)
        return len(ids)

    def pause(self, mode: str = "abort", instance: Instance | None = None, generation: bool = False) -> None:
        """vLLM's pause_scheduler, on every engine or on `instance`'s alone (its own `vllm serve`): "abort"
        aborts their requests and stops; "keep" stops with the requests kept; "wait" lets running requests
        finish but admits nothing. Arrivals queue. With `generation` it is vLLM's pause_generation (its /pause):
        in "abort" and "wait" modes the engines then reject new requests until they resume (rejects_new), in
        "keep" mode they queue them (a pause_scheduler alone, a /sleep, leaves that as it was)."""
        if mode not in ("abort", "keep", "wait"):
            raise ValueError(f"Invalid pause mode: {mode}")
        if generation:
            engines = {engine.index for engine in (self.engines if instance is None else instance.engines)}
            self.rejecting = self.rejecting - engines if mode == "keep" else self.rejecting | engines
        if mode == "abort":
            if instance is None:
                self.abort_all()
            else:
                for request_id in self._request_ids_on(instance):
                    self.abort(request_id)
        for loop in self.loops if instance is None else instance.loops:
            loop.pause("new" if mode == "wait" else "all")

    def resume(self, instance: Instance | None = None) -> None:
        self.rejecting -= {engine.index for engine in (self.engines if instance is None else instance.engines)}
        for loop in self.loops if instance is None else instance.loops:
            loop.resume(self.now)

    def rejects_new(self, instance: Instance | None = None) -> bool:
        """Do `instance`'s engines (None: every engine) reject new requests (paused with `reject_new`)?"""
        engines = self.engines if instance is None else instance.engines
        return bool(self.rejecting) and all(engine.index in self.rejecting for engine in engines)

    def is_paused(self, instance: Instance | None = None) -> bool:
        return any(loop.paused for loop in (self.loops if instance is None else instance.loops))

    def is_stepping(self, engine: Engine) -> bool:
        """Does the engine's loop run steps now: not paused, or paused for new requests only while some run (as
        vLLM's engine core steps only while its scheduler counts unfinished requests: none in PAUSED_ALL, only
        those running or holding KV in PAUSED_NEW)?"""
        loop = self._loop_of[engine.index]
        return loop.paused is None or (loop.paused == "new" and any(e.scheduler.running or e.scheduler.waiting.holding
                                                                     for e in loop.engines))

    def _request_ids_on(self, instance: Instance) -> list[str]:
        """The requests on `instance`'s engines, as its own vLLM knows them: a P/D prefill the cluster runs for a
        client's request is the prefill pod's request (aborting it ends that pod's answer, with which the proxy goes
        on to a decode pod: PDProxy.prefill_finished), not its client's."""
        engines = {engine.index for engine in instance.engines}
        in_prefill = self.pd.prefill_of  # (a client's request still with its prefill pod is on no engine)
        return [request_id for request_id, request in self.active.items()
                if request_id not in in_prefill and request.engine_index in engines]

    # -- faults -------------------------------------------------------------------------
    def fail_instance(self, name: str, reroute: bool = False) -> list[Request]:
        """The instance goes down now. Its requests fail with finish reason "error", or, with `reroute`, go
        to another instance as a router retries an HTTP request: all the requests of one client request
        together (as submit_group sends them), when none of them has produced a token yet and they did not
        come in on the instance's own port (no router stands in front of that). A P/D prefill instance's
        clients are sent to another prefill instance, those whose prefills had finished there too (their KV is
        lost with it). Returns the requests that failed."""
        instance = self.instance(name)
        if not instance.up:
            return []
        self._settle(instance, self.now)
        dropped = instance.fail(self.now)
        self.transfers.source_lost(instance)
        units: list[tuple[list[Request], bool]] = []  # the clients' requests it held, by client request: in prefill?
        pd_groups: dict[int, list[Request]] = {}  # id(PDGroup) -> its unit, filled once every prefill is counted
        by_group: dict[int, list[Request]] = {}
        lost = []
        for request in dropped:
            self.active.pop(request.request_id, None)
            if request.external_kv is not None:
                self.transfers.cancel(request, release=not reroute)
            if self.pd.is_prefill(request):  # a P/D prefill: its client's request has no token yet
                request.status = RequestStatus.FINISHED_ERROR
                request.finish_time = self.now
                for listener in self._prefill_listeners:  # the prefill pod's own account of it
                    listener(request)
                pd_group = self.pd.group_of[self.pd.client_of[request.request_id].request_id]
                if id(pd_group) not in pd_groups:
                    pd_groups[id(pd_group)] = []
                    units.append((pd_groups[id(pd_group)], True))
                    lost.append(pd_group)
                continue
            group = self.groups.get(request.request_id)
            unit = by_group.get(id(group)) if group is not None else None
            if unit is None:
                unit = []
                units.append((unit, False))
                if group is not None:
                    by_group[id(group)] = unit
            unit.append(request)
        for pd_group in lost:
            pd_groups[id(pd_group)].extend(self.pd.lose(pd_group))
        failed = []
        for unit, in_prefill in units:
            if reroute and self._retry(unit, instance, in_prefill):
                for request in unit:
                    self._rerouted(request)
                continue
            for request in unit:
                request.status = RequestStatus.FINISHED_ERROR
                request.finish_time = self.now
                self.active.pop(request.request_id, None)
                failed.append(request)
                self._ended(request)
        self.instance_events.append((self.now, name, "down"))
        for engine in instance.engines:
            for listener in self._down_listeners:
                listener(engine.index, self.now)
        return failed

    def _rerouted(self, request: Request) -> None:
        for listener in self._reroute_listeners:
            listener(request)

    def _retry(self, unit: list[Request], failed: Instance, in_prefill: bool) -> bool:
        """A router's retry of the requests of one client request that `failed` held (`in_prefill`: with it as
        their P/D prefill pod) on another instance, picked once for all of them; False where it cannot (a
        token was streamed, it came in on the pod's own port, no other instance takes it)."""
        members = self.groups.get(unit[0].request_id, unit)
        if any(request.direct for request in unit) or any(request.num_output_tokens for request in members):
            return False
        first, shape = unit[0], self.group_shapes.get(unit[0].request_id) or group_shape(unit)
        longest = max(request.num_prompt_tokens for request in unit)
        if in_prefill:  # the proxy sends them to another prefill pod
            try:
                self._prefill_first(unit, PDGroup(shape=shape, longest=longest), undo=self._withdraw)
            except (NoInstanceError, AdmissionRefused, ModelNotFound, PodPaused):  # (no other prefill pod takes it)
                return False
            return True
        role = failed.role if failed.role != "mixed" else None
        try:  # (a decode pod's front end admits what the proxy hands over, as at a prefill's end)
            target = self.route(first, role, (failed,), admit=shape if role != "decode" else (), prompt_len=longest)
        except (NoInstanceError, AdmissionRefused):
            return False
        group = PDGroup(target)

        def put(request: Request) -> Engine:
            request.reset_for_retry()
            request.reach_pod(self.now)  # a new request to its new pod
            if target.role != "prefill":
                return self.place(request, target)
            return self._start_prefill(request, group)  # it entered at a prefill instance (any_non_decode)
        try:
            self._placed_all(unit, put, self._withdraw)
        except (NoInstanceError, AdmissionRefused, PodPaused):
            return False
        return True

    def restore_instance(self, name: str) -> None:
        """The instance comes back up, empty."""
        instance = self.instance(name)
        if not instance.up:
            instance.restore(self.now)
            self.instance_events.append((self.now, name, "up"))
            for listener in self._restore_listeners:
                listener(instance)

    def schedule(self, time: float, action: Callable[[], None], order: int | None = None) -> None:
        """Run `action` at virtual time `time` (a cluster event: a fault, a restore); events at one time run in the
        order they were scheduled, or at `order` (drawn earlier by `event_order`, for an event pushed later)."""
        heapq.heappush(self._events, (time, next(self._event_order) if order is None else order, action))

    def event_order(self) -> int:
        """A place among the cluster events, as `schedule` gives one now."""
        return next(self._event_order)

    # -- time -------------------------------------------------------------------------------
    def next_event_time(self) -> float | None:
        times = [loop.wake_at for loop in self.loops if loop.wake_at is not None]
        if self._events:
            times.append(self._events[0][0])
        return min(times) if times else None

    def _next_cluster_event(self) -> float:
        return self._events[0][0] if self._events else float("inf")

    def _next_hand_over(self, loop: EngineLoop) -> float:
        """The earliest time another loop may hand `loop` a request: none for a loop of an instance that is not a
        decode one; else the next wake of a P/D prefill loop (a wake that only waits on an offload store counts too:
        the step it may start then ends later, unknown yet)."""
        if id(loop) not in self._taking_over:
            return float("inf")
        return min((other.wake_at for other in self._handing_over if other.wake_at is not None), default=float("inf"))

    def advance(self, until: float) -> None:
        """Process every event due at or before `until`, then set the clock to it.

        Nothing is known about what comes after `until` (a server's present), so it is
        the horizon of bulk decode runs."""
        while True:
            t = self.next_event_time()
            if t is None or t > until:
                break
            self._process(t, until, lazy=False)
        self.now = max(self.now, until)

    def run(self, arrivals: Iterable[Request]) -> None:
        """Offline replay: feed arrivals (sorted by arrival_time) and run until all finish.
        An arrival no instance can take (all down) fails at once."""
        self.offline = True
        try:
            self._replay(arrivals)
        finally:
            self.offline = False

    def _replay(self, arrivals: Iterable[Request]) -> None:
        pending = iter(arrivals)
        upcoming = next(pending, None)
        self._expect(upcoming)
        while True:
            t = self.next_event_time()
            if upcoming is not None and (t is None or upcoming.arrival_time < self._next_cluster_event()
                                         and upcoming.arrival_time <= t):
                self.now = max(self.now, upcoming.arrival_time)
                self._arrive(upcoming)
                nxt = next(pending, None)
                if nxt is not None and nxt.arrival_time < upcoming.arrival_time:
                    raise ValueError(f"arrivals are not sorted: {nxt.request_id!r} arrives before "
                                     f"{upcoming.request_id!r}")
                upcoming = nxt
                self._expect(upcoming)
            elif t is not None:
                self._process(t, float("inf"), lazy=True)
            else:
                break
        for loop in self.loops:  # the idle wakes left out (EngineLoop._wait_for_stores, defer_wake)
            if loop.stores_due is not None:
                self.now = max(self.now, loop.catch_up())

    def _expect(self, request: Request | None) -> None:
        """Offline: the next arrival settles every engine of a one-instance cluster (`place`), so a decode
        run planned until then need not be planned past it (Engine.settle_at)."""
        if request is not None and len(self.instances) == 1:
            for engine in self.engines:
                engine.settle_at = request.arrival_time

    def _arrive(self, request: Request) -> None:
        try:
            self.submit(request)
        except (NoInstanceError, AdmissionRefused, PodPaused) as exc:
            if isinstance(exc, (AdmissionRefused, ContextTooLong, PodPaused)):
                request.error = str(exc)  # a client would have had vLLM's 503 (400) with this message
            request.status = RequestStatus.FINISHED_ERROR
            request.finish_time = self.now
            for listener in self._finish_listeners:
                listener(request)

    def _process(self, t: float, horizon: float, lazy: bool) -> None:
        """The cluster events due at t, else the loops due at t. Eager loops (a server's) may not
        decide past `horizon`, the next cluster event or the next step end of a loop that may hand
        them a request (an applied step is final; the hand-over joins the batch after the steps
        decided before it, as offline); lazy ones (offline) plan as far as they can, since every
        cluster event and hand-over settles the engines it touches."""
        self.now = t
        if self._events and self._events[0][0] <= t:
            heapq.heappop(self._events)[2]()
            return
        horizon = float("inf") if lazy else min(horizon, self._next_cluster_event())
        for loop in self.loops:
            if loop.wake_at is not None and loop.wake_at <= t:
                loop.run(t, horizon if lazy else min(horizon, self._next_hand_over(loop)), self._report, lazy)
                for engine in loop.engines:
                    if engine.started_loads:
                        for request, _, tokens, when in engine.take_started_loads():
                            self.transfers.start(request, engine, tokens, when)
                    if engine.unread_sources:
                        for source in engine.take_unread():
                            self.transfers.unread(source)

    def watch_link(self, link: Link) -> None:
        """Schedule the link's next transfer completion (a later change of its sharing makes it stale)."""
        nxt = link.next_completion()
        if nxt is not None:
            version = link.version
            self.schedule(nxt[0], lambda: self._link_event(link, version))

    def _link_event(self, link: Link, version: int) -> None:
        if link.version != version:
            return  # its transfers changed since: a newer event stands for it
        _, transfer = link.next_completion()
        link.complete(transfer, self.now)
        self.watch_link(link)
        transfer.on_done(self.now)

    # -- reporting ----------------------------------------------------------------------
    def _report(self, record: StepRecord | RunRecord) -> None:
        instance = self.instance_of[record.engine]
        if instance.balancer.coordinated:  # the engine's counts, for vLLM's DP coordinator
            instance.balancer.observe(record)
        if isinstance(record, RunRecord):
            for on_run in self._run_listeners:
                on_run(record)
            instance.outstanding_tokens -= len(record.requests) * record.num_steps
            return
        for listener in self._step_listeners:
            listener(record)
        instance.outstanding_tokens -= len(record.got_token)
        for request in record.finished:
            del self.active[request.request_id]
            self._ended(request)

    def _ended(self, request: Request) -> None:
        instance = self.instance_of[request.engine_index] if request.engine_index is not None else None
        if instance is not None and instance.up:  # what it still owed is no longer owed (a failed one owes nothing)
            instance.outstanding_tokens -= (request.num_prompt_tokens + request.max_tokens
                                            - request.num_output_tokens)
        if self.pd.is_prefill(request):  # the cluster's own P/D prefill: its client's request goes on
            for listener in self._prefill_listeners:
                listener(request)
            self.pd.prefill_finished(request)
            return
        self._finished(request)

    def _finished(self, request: Request) -> None:
        """A client's request has ended: tell the listeners."""
        self.groups.pop(request.request_id, None)
        self.group_shapes.pop(request.request_id, None)
        for listener in self._finish_listeners:
            listener(request)
