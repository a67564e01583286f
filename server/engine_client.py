"""The front end's view of the simulated engines (vLLM's AsyncLLM): admission, submit, abort.

It turns an API request's prompts into engine requests (one per prompt and choice,
named like vLLM's child requests), with their planned outputs, and routes what the
core reports back to the jobs: tokens from the step listener, endings from the finish
listener. It also applies vLLM's admission limits (`--max-num-queued-reqs`,
`--max-num-queued-tokens` → 503) per instance, as each pod's own front end does, writes
`--request-log`, and shuts down as vLLM's engine does: in-flight requests drained for a
while or aborted, new ones aborted as they arrive.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from collections.abc import Callable, Sequence
from itertools import chain
from dataclasses import dataclass
from http import HTTPStatus
from typing import IO, Protocol

import numpy as np

from emulator.engine import StepRecord
from emulator.instance import QUEUE_BOUND_MESSAGES, Instance, queue_bound_refusal
from emulator.request import Request
from emulator.simulation import AdmissionRefused, ContextTooLong, NoInstanceError, Simulation
from emulator.stats import request_record
from emulator.disaggregation import DEFAULT_CONNECTOR, PAUSED_MESSAGE, ModelNotFound, PodPaused
from emulator.kv_transfer import ExternalKV
from emulator.lora import LoRAAdapter
from server.errors import APIError, service_unavailable
from server.generation import OutputPlanner, Sampling, StopRules
from server.jobs import Choice, Job
from server.lora import pod_not_found
from server.pacer import Pacer


log = logging.getLogger("vllm_emulator.server")


class PromptRefused(APIError):
    """vLLM's 503 (QueueOverflowError, MaxQueuedTokensError) from AsyncLLM.add_request: the engine refused a
    prompt of the request at a queue bound after the serving layer's own check had let the request in. By
    then vLLM's response to a streamed request has begun: Serving.generate answers it inside the stream."""

    def __init__(self, message: str, prompt: int = 0) -> None:
        super().__init__(message, status=503, err_type=HTTPStatus.SERVICE_UNAVAILABLE.phrase)
        self.prompt = prompt  # the index of the prompt refused (vLLM added those before it, then aborted them)


class GenerationPaused(APIError):
    """vLLM's RetryableRequestError from an engine whose generation is paused (its RequestError "engine_paused"):
    a 503 ServiceUnavailableError. By then vLLM's response to a streamed request has begun: Serving.generate
    answers it inside the stream."""

    def __init__(self) -> None:
        super().__init__(PAUSED_MESSAGE, status=503, err_type="ServiceUnavailableError")


# A delivery this late (wall seconds after its first step was due) merges each stream's tokens into
# one chunk: a server that fell behind catches up with one write per stream, not one per token.
MERGE_AFTER = 0.02
ENGINE_ID_SUFFIX = 9  # "-" and 8 hex characters: what vLLM adds to a client's request id (see _engine_request_id)
DRAIN_POLL_S = 0.005  # how often a "wait" pause looks whether its engines have drained (wall seconds)


def request_id_randomization() -> bool:
    """Whether engine request ids get vLLM's random suffix: unless VLLM_DISABLE_REQUEST_ID_RANDOMIZATION is
    a non-zero integer (vLLM reads it with int(); another value is an error at start-up here)."""
    value = os.environ.get("VLLM_DISABLE_REQUEST_ID_RANDOMIZATION", "0")
    try:
        return not int(value)
    except ValueError:
        raise ValueError(f"VLLM_DISABLE_REQUEST_ID_RANDOMIZATION={value!r}: vLLM reads it as an integer "
                         f"(1 disables the random suffix of request ids, 0 keeps it)") from None


class FrontendObserver(Protocol):
    """What the front end reports beside the engine's steps (server.metrics.EngineMetrics is one)."""
    def observe_admission_rejection(self, reason: str, model_name: str | None = None) -> None: ...
    def add_parent_request(self, children: Sequence[Request]) -> None: ...


@dataclass
class Backlog:
    """What one instance's own front end counts for its queue limits (vLLM's AsyncLLM): engine
    requests not ended, and the prompt tokens of those without a first token yet."""
    requests: int = 0
    prefill_tokens: int = 0


def _count_on(choice: Choice, here: Backlog, prefill_tokens: int) -> None:
    """Count a choice's request, with `prefill_tokens` of prompt still to compute, in `here` from now on."""
    if here is choice.backlog:
        return
    choice.backlog.requests -= 1
    choice.backlog.prefill_tokens -= prefill_tokens
    here.requests += 1
    here.prefill_tokens += prefill_tokens
    choice.backlog = here


def _under(engine_id: str, request_id: str) -> bool:
    """Is `engine_id` an engine request of a client's request named `request_id`: that id, or one of its n > 1
    children ("<c>_<id>")?"""
    if engine_id == request_id:
        return True
    index, sep, parent = engine_id.partition("_")
    return bool(sep) and parent == request_id and index.isdigit()


class EngineClient:
    """The front end of one simulation: one deployment, or a cluster (each instance with the queue
    limits of its own engine arguments)."""

    def __init__(self, sim: Simulation, planners: dict[str, OutputPlanner], speed: float, *,
                 request_log: IO[str] | None = None, observers: Sequence[FrontendObserver] = (),
                 address: tuple[str, int] = ("localhost", 8000),
                 energy_of: Callable[[Request], float] | None = None, randomize_request_ids: bool = True) -> None:
        """`planners`: the output planner of each served model name (its tokenizer's words);
        `address`: where this server answers, for the kv_transfer_params of its P/D prefills;
        `energy_of`: a request's joules (the power model's), for the request log;
        `randomize_request_ids`: False as with VLLM_DISABLE_REQUEST_ID_RANDOMIZATION=1."""
        self.address = address
        self.randomize_request_ids = randomize_request_ids
        self.deployment = sim.instances[0].deployment
        self.planners = planners
        self.planner = next(iter(planners.values()))  # a name the router resolves otherwise: the first model's
        self.sim = sim
        self.pacer = Pacer(self.sim, speed)
        self.request_log = request_log
        self.energy_of = energy_of
        # per instance: engine requests submitted and not ended (vLLM's request_states), and the prompt
        # tokens of those without a first token yet
        self.backlogs = {instance: Backlog() for instance in sim.instances}
        self._backlog_of_engine = [self.backlogs[i] for i in sim.instance_of]  # by engine index
        self.observers = list(observers)
        self.shutting_down = False
        self._idle = asyncio.Event()  # set whenever no request is unfinished
        self._idle.set()
        self._to_deliver: list[Job] = []  # streaming jobs with tokens or endings to write
        self._first_due: float | None = None  # virtual end of the first step they wait on
        self.sim.add_listener(self._on_step)
        self.sim.add_finish_listener(self._on_finish)
        self.sim.add_reroute_listener(self._on_reroute)
        self.sim.pd.answered_listeners.append(self._on_prefill_answer)
        self.pacer.on_delivery(self._deliver)

    @property
    def num_unfinished(self) -> int:
        """Engine requests submitted and not ended, on every instance."""
        return sum(backlog.requests for backlog in self.backlogs.values())

    @property
    def num_prefill_tokens(self) -> int:
        """The prompt tokens of those without a first token yet."""
        return sum(backlog.prefill_tokens for backlog in self.backlogs.values())

    @property
    def num_engines(self) -> int:
        return len(self.sim.engines)

    # -- admission -----------------------------------------------------------------------
    def check_admission(self, n: int, model: str | None = None, instance: Instance | None = None,
                        observers: Sequence[FrontendObserver] | None = None) -> None:
        """vLLM's AsyncLLM.check_admission, as each pod applies its own limits to its own requests: 503
        on `instance`'s own port when it is at a limit; on the front door (`instance` None) only when
        every instance up that serves `model` is (one with no limit never is; `model` None on a cluster whose
        entry is any_non_decode: every non-decode instance up, of any model, as the core routes such a
        request). An instance that is down
        refuses nothing here: the request gets the 503 of a model with no instance up. `observers` hear
        of a refusal, under the model name of the pods that refused (their first served name, as vLLM labels
        it; default observers: the server's)."""
        if instance is not None:
            gates = [instance] if instance.up else []
        elif model is None and self.sim.entry == "any_non_decode":
            gates = self.sim.candidates(None)
        else:
            gates = [i for i in self.sim.by_model.get(model or self.sim.default_model, ()) if i.up]
        first = None
        for gate in gates:
            refusal = self._refusal(gate, n)
            if refusal is None:
                return
            first = first or refusal
        if first is not None:
            reason, message = first
            for observer in self.observers if observers is None else observers:
                observer.observe_admission_rejection(reason, gates[0].served_model_names[0])
            raise service_unavailable(message)

    def _refusal(self, instance: Instance, n: int) -> tuple[str, str] | None:
        """(reason, message) if `instance` would refuse `n` more engine requests, else None (the core's rule
        over the requests this server counts as the instance's, as vLLM's API server counts its own)."""
        backlog = self.backlogs[instance]
        bound = queue_bound_refusal(instance.deployment.config, backlog.requests, backlog.prefill_tokens, n)
        return None if bound is None else (bound, QUEUE_BOUND_MESSAGES[bound])

    # -- requests ------------------------------------------------------------------------
    def start(self, job: Job, prompt_request_ids: list[str], n: int, max_tokens: list[int], rules: StopRules, *,
              seed: int | None, priority: int, arrival: float, pinned_engine: int | None, reply: bool = False,
              model: str | None = None, instance: Instance | None = None, session: str | None = None,
              session_id: str | None = None, kv_cache_report_mode: str = "incremental",
              kv_transfer_params: dict | None = None, cache_salt: str | None = None,
              lora: LoRAAdapter | None = None, observers: Sequence[FrontendObserver] | None = None,
              sampling: object = None, skip_reading_prefix_cache: bool = False) -> None:
        """Plan every choice of `job` and hand the engine requests to the core, arriving at `arrival`, all
        to one instance (Simulation.submit_group: a router sends one HTTP request to one pod).

        `prompt_request_ids` names each prompt's engine request; with n > 1 choice c is "c_<name>".
        A chat `reply` begins as a model begins one (see generation.py). `model` (a served name; None: any
        model's instance, on a cluster whose entry is any_non_decode) and `session` steer the cluster's
        router; `session_id` and `kv_cache_report_mode`: vLLM's (its KV events follow them); `instance`: the
        instance whose own port the request came in on. `kv_transfer_params`: vLLM's
        P/D fields (a prefill that keeps its KV for a decode side, or a decode that loads it from the prefill
        named there), ignored with vLLM's warning where no instance it may go to has a KV connector.
        `cache_salt`: vLLM's, keeping its prefix cache apart. `lora`: the adapter the requests run with
        (`model` is then its base model's name). `sampling`: the request whose sampling fields (temperature,
        top_p, penalties, ...: generation.Sampling.of) decide its tokens, with `seed` (OutputPlanner.rng_for:
        greedy and seeded outputs follow the prompt and those fields; None: vLLM's defaults, random sampling).
        `skip_reading_prefix_cache`: vLLM's SamplingParams field (a request for prompt logprobs sets it): its
        prefix is not looked up in the cache, nor loaded through a KV connector.
        Raises the 503 of a model with no instance up, vLLM's 400 when no instance up that it may go to holds
        a prompt and an output token (the core routes it only to those that do), and vLLM's 503 when the
        instance's front end refuses them at a queue bound (`check_admission` let the request in, as vLLM's
        serving layer checks its n choices once, but the engine requests of all its prompts do not fit:
        vLLM's AsyncLLM checks again as it adds each prompt's; `observers` hear of it as in check_admission).
        Whatever it raises, no request is left in the core.
        """
        requests, parents = [], []
        planner = self.planners.get(model, self.planner)
        sampling = Sampling.of(sampling)
        identity = f"{model or ''}:{lora.name if lora is not None else ''}"  # (another model says other things)
        connector, unconnected = self._kv_connector(model, instance) if kv_transfer_params else (None, False)
        for p, prompt in enumerate(job.prompts):
            prompt_ids = np.asarray(prompt, dtype=np.int64)
            client_id = prompt_request_ids[p]
            engine_id = self._engine_request_id(client_id, n)
            first = len(requests)
            for c in range(n):
                rng = planner.rng_for(seed, c, prompt_ids, sampling, identity)
                plan = planner.plan(max_tokens[p], rules, rng, reply)
                choice = Choice(p * n + c, p, plan, job)
                choice.client_request_id = client_id if n == 1 else f"{c}_{client_id}"
                request_id = engine_id if n == 1 else f"{c}_{engine_id}"  # vLLM's child requests
                choice.request = Request(request_id, len(prompt), plan.length, max_tokens=max_tokens[p],
                                         prompt_token_ids=prompt_ids, output_token_ids=plan.token_ids,
                                         priority=priority, user_data=choice, model=model, session=session,
                                         cache_salt=cache_salt, lora=lora, session_id=session_id,
                                         kv_cache_report_mode=kv_cache_report_mode,
                                         skip_reading_prefix_cache=skip_reading_prefix_cache)
                if kv_transfer_params and kv_transfer_params.get("do_remote_prefill"):  # (vLLM's front end)
                    cached = kv_transfer_params.get("remote_prefill_cached_tokens")
                    if isinstance(cached, int):
                        choice.request.remote_prefill_cached_tokens = cached
                if connector is not None:
                    self._apply_kv_transfer(choice.request, kv_transfer_params, connector)
                elif unconnected:  # vLLM's engine core, for each request it is given
                    log.warning("Got kv_transfer_params, but no KVConnector found. "
                                "Disabling KVTransfer for this request.")
                job.add_choice(choice)
                requests.append(choice.request)
            if n > 1:  # the n choices of one prompt
                parents.append(requests[first:])
        self._reject_if_paused(job, instance, kv_transfer_params, model)
        try:  # if the core takes none of them, those it placed have left again, uncounted (_on_finish)
            self.pacer.submit(requests, arrival, pinned_engine, instance)
        except ContextTooLong as exc:  # vLLM's input processor refuses the prompt on the pod
            raise APIError(str(exc)) from None
        except ModelNotFound as exc:  # the pod the cluster's P/D proxy sent it to does not serve its adapter
            raise pod_not_found(self.sim, exc) from None
        except PodPaused:  # the prefill pod the cluster's P/D proxy sent it to is paused: its 503, relayed
            raise GenerationPaused() from None
        except NoInstanceError as exc:  # every instance that serves the model is down
            raise service_unavailable(f"{exc}: the model is not available now") from None
        except AdmissionRefused as exc:
            for observer in self.observers if observers is None else observers:
                observer.observe_admission_rejection(exc.bound, exc.instance.served_model_names[0])
            raise PromptRefused(str(exc), self._refused_prompt(exc.instance, job, n)) from None
        for children in parents:  # (a refused request is no parent: vLLM registers one once admitted)
            for observer in self.observers:
                observer.add_parent_request(children)
        pd_prefill = self.sim.pd.prefill_of
        for request in requests:
            # counted where it is now: on its P/D prefill's instance until its first token (see _on_step)
            placed = pd_prefill.get(request.request_id, request)
            backlog = request.user_data.backlog = self._backlog_of_engine[placed.engine_index]
            backlog.requests += 1
            backlog.prefill_tokens += request.num_prompt_tokens
        if requests:
            self._idle.clear()
        if self.shutting_down:  # vLLM's engine answers a request that arrives during shutdown with an abort
            self.pacer.abort([r.request_id for r in requests])

    def _reject_if_paused(self, job: Job, instance: Instance | None, kv_transfer_params: dict | None,
                          model: str | None) -> None:
        """vLLM's EngineCore._reject_add_while_paused: an engine whose generation is paused (/pause in abort or wait
        mode) answers a new request at once with its retryable error (GenerationPaused), after the front end's
        checks (a prompt too long for every engine it may go to is the input processor's 400 first: the core
        raises it). One whose kv_transfer_params load a prefill's KV is still added, aborted at once, so that its
        KV connector frees the prefill's blocks unread (kv_transfer_rejected: NIXL's empty read)."""
        if not self.sim.rejects_new(instance):
            return
        pods = [instance] if instance is not None else self.sim.instances
        if not any(pod.fits(max(map(len, job.prompts), default=0)) for pod in pods):
            return
        if kv_transfer_params and kv_transfer_params.get("do_remote_prefill"):
            self.kv_transfer_rejected(kv_transfer_params, model, instance)
        raise GenerationPaused()

    def pause_generation(self, mode: str, instance: Instance | None = None, clear_cache: bool = True) -> None:
        """vLLM's pause_generation (its dev-mode /pause) on a port's engines: pause_scheduler (`mode` as
        Simulation.pause takes it; "abort" and "wait" also reject new requests until resume_generation) and, with
        `clear_cache` in "abort" mode, the prefix cache reset once paused ("wait" resets it once its running
        requests have drained: `drain`; "keep" ignores it)."""
        self.pacer.catch_up()
        self.sim.pause(mode, instance, generation=True)
        if clear_cache and mode == "abort":
            self.reset_prefix_cache(instance)
        self.pacer.catch_up()

    async def drain(self, instance: Instance | None = None, clear_cache: bool = True) -> None:
        """Wait until the port's engines, paused for new requests, run nothing more (vLLM's engine core completes
        a "wait" pause from its idle callback), then reset the prefix cache with `clear_cache` (_finish_pause)."""
        engines = self.sim.engines if instance is None else instance.engines
        while any(self.sim.is_stepping(engine) for engine in engines):
            await asyncio.sleep(DRAIN_POLL_S)
        if clear_cache:
            self.pacer.catch_up()
            self.reset_prefix_cache(instance)

    def resume_generation(self, instance: Instance | None = None) -> None:
        """vLLM's resume_generation (/resume): the engines schedule again and take new requests."""
        self.pacer.catch_up()
        self.sim.resume(instance)
        self.pacer.catch_up()

    def _refused_prompt(self, instance: Instance, job: Job, n: int) -> int:
        """The prompt of `job` whose `n` choices `instance`'s front end refuses as AsyncLLM adds the prompts
        one by one, counting those added before it (the last, if the count says none)."""
        backlog, config = self.backlogs[instance], instance.deployment.config
        requests, tokens = backlog.requests, backlog.prefill_tokens
        for p, prompt in enumerate(job.prompts):
            if queue_bound_refusal(config, requests, tokens, n) is not None:
                return p
            requests += n
            tokens += n * len(prompt)
        return len(job.prompts) - 1

    def _kv_connector(self, model: str | None, instance: Instance | None) -> tuple[str | None, bool]:
        """The P/D connector a request's kv_transfer_params go through: its instance's (on the front door,
        the first of its model's instances with one), or None where none was started with
        --kv-transfer-config: the params are ignored, as vLLM ignores them. And whether there is no KV
        connector at all, which vLLM warns of (KV offloading makes one, with no use for P/D fields)."""
        instances = [instance] if instance is not None else self.sim.by_model.get(model or self.sim.default_model, [])
        for candidate in instances:
            kv_transfer = candidate.deployment.config.kv_transfer
            if kv_transfer:
                return kv_transfer.get("kv_connector", DEFAULT_CONNECTOR), False
        return None, all(not i.deployment.config.kv_connectors.transfer for i in instances)

    def _apply_kv_transfer(self, request: Request, params: dict, connector: str) -> None:
        """vLLM's NixlConnector semantics: do_remote_decode makes a prefill whose blocks wait for a decode
        side; do_remote_prefill loads the prompt's KV from the prefill the params name."""
        if params.get("do_remote_decode"):
            request.hold_kv = True
        elif params.get("do_remote_prefill"):
            request.external_kv = ExternalKV(request.num_prompt_tokens, self.sim.transfers.remote_source(params,
                                                                                                        connector))

    def kv_transfer_rejected(self, params: dict, model: str | None, instance: Instance | None) -> None:
        """vLLM's notify_kv_transfer_request_rejected: a route turned away a request whose params load a
        prefill's KV before its engine had it; where a KV connector is configured (and the pod is up: the
        notice goes through its engine), the prefill's blocks are freed unread (KVTransfers.rejected)."""
        known = model if model in self.sim.by_model else None  # (a 404's model: the port's own)
        connector, _ = self._kv_connector(known, instance)
        if connector is None or (instance is not None and not instance.up):
            return
        self.pacer.catch_up()  # a prefill held here is freed at the present
        self.sim.transfers.rejected(params, connector)
        self.pacer.catch_up()  # (and the engine it woke runs)

    def kv_transfer_params(self, request: Request, host: str, port: int) -> dict | None:
        """The kv_transfer_params of a finished request's response (vLLM's request_finished): those a
        decode pod needs, for a prefill that kept its blocks; None otherwise."""
        if not request.hold_kv or request.finish_reason not in ("stop", "length"):
            return None
        connector = self.sim.instance_of[request.engine_index].deployment.config.kv_transfer.get(
            "kv_connector", DEFAULT_CONNECTOR)
        self.sim.transfers.hold(request, connector)
        return self.sim.transfers.held_params(request, host, port)

    def _engine_request_id(self, request_id: str, n: int = 1) -> str:
        """vLLM's InputProcessor.assign_request_id: the engine's id of a request is the client's with 8
        random hex characters (so a repeated X-Request-Id is no clash); a P/D prefill's kv_transfer_params
        name it as remote_request_id. With the suffix disabled, the client's own id, unless a request under
        it is still running (or, aborted, still reads its KV from a prefill), any of its n > 1 children
        ("<c>_<id>", vLLM's ParentRequest.get_child_info) too: vLLM then mixes the two up ("subtle correctness
        errors", its warning says); here the second gets the suffix after all, with a warning. The `n` engine
        requests an id makes must not be in use either."""
        active, reading = self.sim.active, self.sim.transfers.loads  # (an aborted request's read runs to its end)

        def unused(engine_id: str) -> bool:
            ids = (engine_id,) if n == 1 else (f"{c}_{engine_id}" for c in range(n))
            return all(i not in active and i not in reading for i in ids)
        if not self.randomize_request_ids:
            held = (key[1] for key in self.sim.transfers.held)  # (P/D holds)
            if unused(request_id) and not any(_under(i, request_id) for i in chain(active, reading, held)):
                return request_id
            log.warning("request id %r is already running: VLLM_DISABLE_REQUEST_ID_RANDOMIZATION is set, so vLLM "
                        "would mix the two up; this one gets the random suffix", request_id)
        while True:
            engine_id = f"{request_id}-{uuid.uuid4().hex[:ENGINE_ID_SUFFIX - 1]}"
            if unused(engine_id):
                return engine_id

    def abort(self, job: Job) -> None:
        """The client went away: abort the choices still running."""
        ids = [c.request.request_id for c in job.choices if c.request is not None and not c.request.is_finished]
        if ids:
            self.pacer.abort(ids)

    # -- dev mode: /sleep, /wake_up, /is_sleeping, /reset_prefix_cache ------------------------
    def reset_prefix_cache(self, instance: Instance | None = None) -> bool:
        """Drop the prefix cache of a port's engines (blocks in use stay); True if every engine could."""
        results = [engine.kv.reset_prefix_cache() for engine in (self.sim.engines if instance is None
                                                                 else instance.engines)]
        return all(results)

    # -- shutdown ------------------------------------------------------------------------
    async def shutdown(self, timeout: float) -> None:
        """vLLM's engine shutdown: with `timeout` 0 abort every request at once; otherwise let them
        finish for up to `timeout` wall seconds, then abort what is left. Requests that arrive
        meanwhile are aborted as they come."""
        self.shutting_down = True
        if timeout > 0:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        pd = self.sim.pd  # (a P/D prefill ends with its client's request: alone, that would go on to a decode pod)
        self.pacer.abort([i for i, request in self.sim.active.items() if not pd.is_prefill(request)])

    # -- from the core -------------------------------------------------------------------
    def _on_step(self, record: StepRecord) -> None:
        # A step's tokens are all due at its end and written one client at a time: first tokens
        # go first, as a client's time to first token is the latency it watches most closely.
        if self._first_due is None and record.got_token:
            self._first_due = record.end
        later = []
        to_deliver = self._to_deliver
        for request in record.got_token:
            choice = request.user_data
            if choice is None:
                continue  # the cluster's own P/D prefill of a client's request: no client of its own
            choice.num_produced += 1
            if choice.num_produced == 1:
                choice.backlog.prefill_tokens -= request.num_prompt_tokens
                # its P/D decode side: counted there now
                _count_on(choice, self._backlog_of_engine[request.engine_index], 0)
                if choice.job.note(choice):
                    to_deliver.append(choice.job)
            elif not choice.noted:
                later.append(choice)
        for choice in later:
            if choice.job.note(choice):
                to_deliver.append(choice.job)

    def _on_reroute(self, request: Request) -> None:
        """A fault sent a request with no token yet to another instance: it is that instance's to count
        now (its failed one, restored, must not count it against its queue limits)."""
        choice = request.user_data
        if choice is None or choice.backlog is None:
            return
        placed = self.sim.pd.prefill_of.get(request.request_id, request)  # a P/D client: its new prefill's
        _count_on(choice, self._backlog_of_engine[placed.engine_index], request.num_prompt_tokens)

    def _on_prefill_answer(self, request: Request) -> None:
        choice = request.user_data
        if choice is not None and choice.job is not None:
            choice.job.prefill_answered(True)

    def _deliver(self) -> None:
        """Write what the steps since the last delivery produced (see jobs.py): merged per choice
        when the first of them is overdue by more than MERGE_AFTER (the server fell behind)."""
        to_deliver, self._to_deliver = self._to_deliver, []
        first_due, self._first_due = self._first_due, None
        late = first_due is not None and self.pacer.virtual_now() - first_due > MERGE_AFTER * self.pacer.speed
        for job in to_deliver:
            job.deliver(late)

    def _on_finish(self, request: Request) -> None:
        choice = request.user_data
        backlog = choice.backlog
        if backlog is None:  # taken back as the core refused its request (see start): never counted
            request.user_data = choice.job = None
            return
        backlog.requests -= 1
        if request.num_output_tokens == 0:
            backlog.prefill_tokens -= request.num_prompt_tokens
        if self.request_log is not None:  # under the client's id, as its response and a replay of it name it
            energy = self.energy_of(request) if self.energy_of is not None else None
            record = request_record(request, energy)
            record["request_id"] = choice.client_request_id
            self.request_log.write(json.dumps(record) + "\n")
        # The request's last report: unlink it from its choice and job, so that reference counting
        # frees them with the response (no cycle waiting for a full garbage collection).
        params = self.kv_transfer_params(request, *self.address) if request.hold_kv else None
        request.user_data = None
        job, choice.job = choice.job, None
        choice.kv_transfer_params = params
        refusal = self.sim.pd.refused.get(request.request_id)
        if refusal is not None and job.error is None:  # the decode pod's 404 (503), once for the HTTP request it got
            job.error = GenerationPaused() if isinstance(refusal, PodPaused) else pod_not_found(self.sim, refusal)
        if choice.prompt_index == 0:  # vLLM's response has its first prompt's (the last of its choices to end)
            job.kv_transfer_params = params
        if job.on_finish(choice, request):
            self._to_deliver.append(job)
        if self.num_unfinished == 0:
            self._idle.set()
