"""vLLM v1's scheduler: who runs in the next step, with how many tokens.

There are no prefill and decode phases: each request has `num_computed_tokens`
and a target (its known tokens plus output placeholders under async
scheduling), and every step assigns tokens so computed catches up with the
target, within one token budget (vLLM 0.33 `v1/core/sched/scheduler.py`):

1. RUNNING requests, in admission order, each get min(remaining, budget) tokens.
   If their blocks do not fit, the newest running request is preempted (FCFS) or
   the worst (priority, arrival) one (priority policy), and freed: recompute.
2. WAITING requests, only if nothing was preempted this step, in policy order,
   while budget, sequence slots and KV blocks allow. A request is admitted only
   if the blocks for its whole known sequence fit; otherwise admission stops
   (head-of-line). Without chunked prefill a prompt must fit the budget whole.
3. KV from outside (vLLM's KV connector, v1/core/sched/scheduler.py and the
   connectors' get_num_new_matched_tokens): a waiting request whose prompt KV can
   be loaded (from a prefill instance, an offload tier) beyond its local prefix hit
   gets its blocks allocated at admission and waits, skipped, while the load is in
   flight (WAITING_FOR_REMOTE_KVS); once loaded it is admitted with those tokens
   computed (all but the last when the whole prompt came: it is recomputed to sample).
   A load starts only if its blocks fit beside those the prefills in flight still need to finish (the
   loads in flight among them): it holds its blocks unpreemptible, so it must not starve them. Waiting
   requests holding blocks (their load in flight or done) are tried before all others.
   A P/D prefill keeps its blocks after it finishes until the decode side has read them.
4. LoRA (with --enable-lora): the adapters of the running requests count against max_loras; a waiting
   request of another adapter is skipped while they fill it (it keeps its place, and the requests
   behind it may still be admitted), and stays "deferred" until it runs.
"""
from __future__ import annotations

import heapq
from collections import deque
from itertools import chain
from dataclasses import dataclass, field

from emulator.batch import BatchShape
from emulator.config import EngineConfig
from emulator.kv_cache import KVCacheManager
from emulator.kv_tiers import TierSource
from emulator.kv_transfer import ExternalKV
from emulator.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    """One engine step's batch."""
    # request -> tokens scheduled, running requests first, then new admissions
    num_scheduled_tokens: dict[Request, int] = field(default_factory=dict)
    # request -> prefix-cache hit taken at admission in this step
    cached_tokens: dict[Request, int] = field(default_factory=dict)
    preempted: list[Request] = field(default_factory=list)
    # requests whose step completes their known tokens, so a token is sampled
    sampling: set[Request] = field(default_factory=set)
    # requests whose external KV load starts now: (request, local prefix-hit tokens, tokens to load)
    kv_loads: list[tuple[Request, int, int]] = field(default_factory=list)
    # where the KV of requests admitted without reading it was (a P/D prefill's): that side is told of an
    # empty read, which frees its blocks (vLLM's NIXL queues a read of no blocks, whose notification does)
    kv_unread: list[object] = field(default_factory=list)
    total_num_scheduled_tokens: int = 0
    shape: BatchShape | None = None  # what the step's cost depends on

    def __bool__(self) -> bool:
        return self.total_num_scheduled_tokens > 0


class PolicyQueue:
    """FCFS deque or (priority, arrival, id) heap, with vLLM's prepend semantics."""

    def __init__(self, policy: str) -> None:
        self.priority = policy == "priority"
        self._items: deque[Request] | list = [] if self.priority else deque()
        self._count = 0

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def __iter__(self):
        if self.priority:
            return (entry[-1] for entry in sorted(self._items))
        return iter(self._items)

    def __contains__(self, request: Request) -> bool:
        return any(r is request for r in self)

    def add(self, request: Request) -> None:
        if self.priority:
            self._count += 1
            heapq.heappush(self._items, (*request.sort_key(), self._count, request))
        else:
            self._items.append(request)

    def prepend(self, request: Request) -> None:
        if self.priority:
            self.add(request)
        else:
            self._items.appendleft(request)

    def peek(self) -> Request:
        return self._items[0][-1] if self.priority else self._items[0]

    def pop(self) -> Request:
        return heapq.heappop(self._items)[-1] if self.priority else self._items.popleft()

    def remove(self, request: Request) -> None:
        if self.priority:
            self._items = [e for e in self._items if e[-1] is not request]
            heapq.heapify(self._items)
        else:
            self._items.remove(request)


def holds_kv_blocks(request: Request) -> bool:
    """A waiting request that holds KV blocks: its external KV load is in flight or came in (vLLM's
    Scheduler._holds_kv_blocks: computed tokens, or WAITING_FOR_REMOTE_KVS)."""
    return request.kv_loading or request.num_computed_tokens > 0


class WaitingQueue:
    """vLLM's two waiting queues, one policy: the requests that hold KV blocks (kv_holding_waiting) are
    tried before the rest (waiting), so a loaded request is never stuck behind one that cannot get blocks
    while it holds them. Iteration, peek and pop follow that order; a request prepended (skipped this step,
    or preempted) goes back to the queue its blocks say, new requests to the plain one."""

    def __init__(self, policy: str) -> None:
        self.priority = policy == "priority"
        self.holding = PolicyQueue(policy)
        self.plain = PolicyQueue(policy)

    def __len__(self) -> int:
        return len(self.holding) + len(self.plain)

    def __bool__(self) -> bool:
        return bool(self.holding) or bool(self.plain)

    def __iter__(self):
        if self.holding:
            return chain(iter(self.holding), iter(self.plain))
        return iter(self.plain)

    def add(self, request: Request) -> None:
        (self.holding if holds_kv_blocks(request) else self.plain).add(request)

    def prepend(self, request: Request) -> None:
        (self.holding if holds_kv_blocks(request) else self.plain).prepend(request)

    def peek(self) -> Request:
        return (self.holding or self.plain).peek()

    def pop(self) -> Request:
        return (self.holding or self.plain).pop()

    def remove(self, request: Request) -> None:
        (self.holding if request in self.holding else self.plain).remove(request)


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting = WaitingQueue(config.scheduling_policy)
        self.running: list[Request] = []
        # finished P/D prefills whose blocks the decode side will read; aborted requests whose KV load still runs
        self.held: dict[str, Request] = {}
        self.num_loading = 0  # waiting requests whose external KV load is in flight
        # vLLM's _inflight_prefills: requests admitted mid-prompt or loading external KV, until a step completes
        # their known tokens; an async load must leave the blocks they still need free (_start_external_load)
        self.inflight_prefills: set[Request] = set()
        self._stale: list[Request] = []  # preempted with a step still in flight (see has_stale_waiting)
        self.async_scheduling = config.async_scheduling
        self.num_preemptions = 0
        # vLLM's V2 model runner with pipeline parallelism and async scheduling: a request decodes at most
        # once every PP schedule() calls (its sampled token goes round the stages' broadcast ring), so
        # the calls are counted, and each sampling request is held back until PP calls later.
        self.decode_stagger = config.pipeline_parallel_size if config.async_scheduling else 1
        self.current_step = 0
        self.max_loras = config.lora.max_loras if config.lora is not None else 0  # 0: LoRA off
        self.lora_deferred: set[Request] = set()  # waiting requests max_loras kept out, until they run

    # -- public API ---------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.add(request)

    def clear(self) -> None:
        """Forget every request (their blocks are the caller's to free)."""
        self.waiting = WaitingQueue(self.config.scheduling_policy)
        self.running = []
        self.held = {}
        self.num_loading = 0
        self.inflight_prefills = set()
        self._stale = []
        self.lora_deferred = set()

    def has_unfinished_requests(self) -> bool:
        return bool(self.running) or bool(self.waiting)

    def has_stale_waiting(self) -> bool:
        """Whether a waiting request still has output in flight from before its preemption (only a
        preempted request can: it waits, PREEMPTED, until that output is back)."""
        if self._stale:
            preempted = RequestStatus.PREEMPTED
            self._stale = [r for r in self._stale if r.num_stale_output_tokens > 0 and r.status == preempted]
        return bool(self._stale)

    def schedule(self, now: float, admit: bool = True) -> SchedulerOutput:
        """One step's batch. `admit=False` (a paused engine, vLLM's PAUSED_NEW) schedules only
        the running requests."""
        out = SchedulerOutput()
        self.current_step += 1
        step, staggered = self.current_step, self.decode_stagger > 1
        budget = self.config.max_num_batched_tokens
        # A lone request has nobody to starve, so the long-prefill cap does not apply to it.
        threshold = self.config.long_prefill_token_threshold if len(self.running) + len(self.waiting) > 1 else 0
        max_model_len = self.config.max_model_len
        kv = self.kv
        scheduled = out.num_scheduled_tokens
        if kv.offload is not None:  # store jobs that ended by now become readable
            kv.offload.advance(now)

        # 1. running requests, in admission order
        running = self.running
        allocate = kv.allocate_slots
        bs, tracked, shortcut = kv.block_size, kv.tracks_full_blocks, not kv.recycles_blocks
        i = 0
        while i < len(running) and budget > 0:
            request = running[i]
            computed = request.num_computed_tokens
            placeholders = request.num_output_placeholders
            if placeholders and computed + 2 - placeholders >= request.num_prompt_tokens + request.max_tokens:
                i += 1  # async: the step in flight already reaches max_tokens
                continue
            if staggered and step < request.next_decode_eligible_step:
                i += 1  # it decoded less than PP calls ago
                continue
            n = request.num_tokens + placeholders - computed
            if 0 < threshold < n:
                n = threshold
            if n > budget:
                n = budget
            if n > max_model_len - 1 - computed:
                n = max_model_len - 1 - computed
            if n <= 0:
                i += 1
                continue
            # allocate_slots' answer without the call, for the common step: it fits the blocks the request
            # holds and fills no new block to cache
            blocks = request.kv_blocks
            end = computed + n
            if (shortcut and blocks is not None and end <= len(blocks) * bs
                    and (not tracked or min(end, request.num_tokens) // bs <= request.kv_num_cached)):
                scheduled[request] = n
                budget -= n
                i += 1
                continue
            while not allocate(request, n):
                victim = self._pick_victim()
                index = running.index(victim)
                del running[index]
                if index < i:
                    i -= 1
                if victim in scheduled:
                    budget += scheduled.pop(victim)
                self._preempt(victim, now)
                out.preempted.append(victim)
                if victim is request:
                    break
            else:
                scheduled[request] = n
                budget -= n
                i += 1
                continue
            if self.waiting.priority:
                continue  # it was the worst running request; better ones after it may still fit
            break  # FCFS: it was the newest; nothing after it runs either

        # 2. waiting requests, unless this step preempted; paused (PAUSED_NEW), only those holding KV blocks
        if not out.preempted:
            budget = self._admit(out, budget, threshold, now, admit)

        if kv.offload is not None and kv.offload.step_work:  # failed stores again, finished requests' ends
            kv.retry_stores(scheduled)
        out.total_num_scheduled_tokens = self.config.max_num_batched_tokens - budget
        self._update_after_schedule(out)
        return out

    def _pick_victim(self) -> Request:
        """The newest running request (FCFS), or the worst (priority, arrival) one."""
        if self.waiting.priority:
            return max(self.running, key=lambda r: (r.priority, r.arrival_time))
        return self.running[-1]

    def admission_plan(self, request: Request, budget: int, threshold: int) -> tuple[list[int], int, int] | None:
        """What admitting `request` now would take: (prefix-hit blocks, hit tokens, tokens to
        schedule), or None when a rule stops it. Pure: changes nothing."""
        config, kv = self.config, self.kv
        if len(self.running) >= config.max_num_seqs:
            return None
        if request.kv_blocks is not None:  # its external KV came in: its blocks are allocated already
            computed_blocks, num_hit = [], request.num_computed_tokens
        else:
            computed_blocks, num_hit = kv.get_computed_blocks(request)
        n = request.num_tokens - num_hit
        if 0 < threshold < n:
            n = threshold
        if not config.enable_chunked_prefill and n > budget:
            return None
        n = min(n, budget)
        has_scheduled = bool(self.running)
        if config.scheduler_reserve_full_isl and not kv.can_fit_full_sequence(request, computed_blocks, has_scheduled):
            return None  # vLLM reserves the whole prompt at admission, a loaded request's too (less what it holds)
        if not kv.can_allocate(request, n, computed_blocks, num_hit - request.num_computed_tokens, has_scheduled):
            return None
        return computed_blocks, num_hit, n

    def _running_loras(self) -> set[int]:
        """The adapters of the running requests (vLLM's scheduled_loras), those scheduled now or not."""
        return {r.lora.lora_id for r in self.running if r.lora is not None}

    def _lora_blocked(self, request: Request, loras: set[int]) -> bool:
        """Admitting `request` would bring a batch already at max_loras adapters one more."""
        return request.lora is not None and len(loras) >= self.max_loras and request.lora.lora_id not in loras

    def admission_head(self) -> Request | None:
        """The first waiting request admission would try now: those whose external KV load is in flight, and
        those max_loras keeps out, are passed over (None: every waiting request is)."""
        if not self.num_loading and not self.max_loras:
            return self.waiting.peek() if self.waiting else None
        loras = self._running_loras() if self.max_loras else None
        return next((r for r in self.waiting
                     if not r.kv_loading and not (loras is not None and self._lora_blocked(r, loras))), None)

    def _admit(self, out: SchedulerOutput, budget: int, threshold: int, now: float, admit: bool = True) -> int:
        kv = self.kv
        skipped = []  # preempted requests whose last step's output is still in flight; loads in flight
        loras = self._running_loras() if self.max_loras and self.waiting else None
        while self.waiting and budget > 0:
            if not admit and not self.waiting.holding:
                break
            request = self.waiting.peek()
            if request.num_stale_output_tokens or request.kv_loading:
                skipped.append(self.waiting.pop())  # resuming now could resample that position
                continue
            if loras is not None and self._lora_blocked(request, loras):
                if len(self.running) >= self.config.max_num_seqs:
                    break  # vLLM stops at a full batch before it looks at adapters
                self.lora_deferred.add(request)
                skipped.append(self.waiting.pop())  # its place kept; those behind it may run
                continue
            if request.kv_cache_report_mode == "full" and request.kv_blocks is None \
                    and len(self.running) < self.config.max_num_seqs:
                kv.report_prefix_hit(request)  # vLLM looks its prefix up here, once an attempt
            if kv.offload is not None and request.kv_blocks is None and (
                    request.external_kv is None or isinstance(request.external_kv.source, TierSource)):
                request.external_kv = None  # looked up afresh: the tiers and the GPU cache change
                found = self._find_offloaded(request)
                if found is None:  # a chunk it would load is still being stored: vLLM skips it this step
                    skipped.append(self.waiting.pop())
                    continue
                if not found:
                    break  # no room for it now, loaded or not: head-of-line
            unread = None  # KV the request will not read (a P/D prefill's), its side told once this admits it
            if request.external_kv is not None:
                external = request.external_kv
                if self._start_external_load(request, out):
                    skipped.append(self.waiting.pop())  # it waits, holding its blocks, for the load
                    continue
                if request.external_kv is not None:
                    break  # no room for its blocks yet: head-of-line, as any admission
                if not isinstance(external.source, TierSource):
                    unread = external
            plan = self.admission_plan(request, budget, threshold)
            if plan is None:
                if unread is not None:
                    request.external_kv = unread  # (its next attempt asks the connector again)
                break  # head-of-line: nothing behind it is admitted either
            computed_blocks, num_hit, n = plan
            loaded = request.kv_blocks is not None
            kv.allocate_slots(request, n, computed_blocks, num_hit - request.num_computed_tokens, bool(self.running))
            if unread is not None:  # vLLM's NIXL queues its read of no blocks once the blocks are allocated
                out.kv_unread.append(unread.source)
            if num_hit + n < request.num_tokens:
                self.inflight_prefills.add(request)  # (a loaded one is in already)
            if not loaded:  # a loaded request was counted when its load started
                kv.record_prefix_cache_stats(request, num_hit)
                if kv.offload is not None or self.config.kv_connectors.connector:
                    kv.record_connector_lookup(request, num_hit, 0)  # the connector was asked, and had nothing
            self.waiting.pop()
            self.running.append(request)
            if loras is not None and request.lora is not None:
                loras.add(request.lora.lora_id)
                self.lora_deferred.discard(request)
            if request.scheduled_time is None:
                request.scheduled_time = now
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_hit
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit
            if num_hit:
                out.cached_tokens[request] = num_hit
            out.num_scheduled_tokens[request] = n
            budget -= n
        for request in reversed(skipped):
            self.waiting.prepend(request)
        return budget

    def _start_external_load(self, request: Request, out: SchedulerOutput) -> bool:
        """Allocate the blocks of a request whose prompt KV can be loaded from outside and start the
        load; False if there is nothing to load beyond the local prefix hit, or the request skips reading
        cached KV (external_kv is dropped: admit it as any), or no room yet (external_kv is kept)."""
        kv = self.kv
        computed_blocks, num_hit = kv.get_computed_blocks(request)
        # (a prefill's KV is its fresh request's prompt; the offload tiers may hold a resumed request's output too)
        external = min(request.external_kv.tokens, request.num_tokens) - num_hit
        if external <= 0 or request.skip_reading_prefix_cache:  # (vLLM's scheduler then takes 0 external tokens)
            request.external_kv = None
            return False
        has_scheduled = bool(self.running)
        if len(self.running) >= self.config.max_num_seqs:
            return False
        if self.config.scheduler_reserve_full_isl and not kv.can_fit_full_sequence(request, computed_blocks,
                                                                                   has_scheduled):
            return False
        # the load holds its blocks, unpreemptible, until it ends: it may take only what the in-flight prefills
        # do not still need to finish, or they and it could all wait for blocks forever (vLLM's reserved_blocks;
        # no spec decode here, so no step blocks on top)
        reserved = sum(kv.remaining_blocks(r) for r in self.inflight_prefills) if self.inflight_prefills else 0
        if not kv.can_allocate_reserving(request, external, computed_blocks, num_hit, has_scheduled, reserved):
            return False
        kv.allocate_slots(request, external, computed_blocks, num_hit, has_scheduled, cache=False)
        self.inflight_prefills.add(request)
        kv.record_prefix_cache_stats(request, num_hit)
        request.external_kv.queried = kv.record_connector_lookup(request, num_hit, external)
        request.num_computed_tokens = num_hit + external
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = num_hit
        request.num_external_tokens = external
        request.kv_loading = True
        self.num_loading += 1
        source = request.external_kv.source
        if isinstance(source, TierSource):  # the tiers' blocks are read (and most recent) from this step on
            source.offload.take(kv.block_hashes(request), source.start, source.parts)
        out.kv_loads.append((request, num_hit, external))
        return True

    def _find_offloaded(self, request: Request) -> bool | None:
        """The blocks after the request's GPU prefix hit that an offload tier holds become its external
        KV (vLLM's OffloadingConnector lookup), up to the request's last full block: a prompt that ends on a
        chunk's end may load whole, its last token then recomputed (`external_kv_loaded`). False (and no
        lookup) when there is no sequence slot: vLLM stops admitting before it asks the connector. A
        request that then finds no room for its blocks was looked up all the same (vLLM asks before it
        allocates, on every attempt), and keeps what it found until the next attempt. None: the lookup was
        deferred (emulator.kv_tiers.Offload.lookup), the request is asked about again next step."""
        kv = self.kv
        if len(self.running) >= self.config.max_num_seqs:
            return False
        if request.skip_reading_prefix_cache:  # the connector loads it nothing, nor looks it up (nor defers it)
            return True
        computed_blocks, _ = kv.get_computed_blocks(request)
        hit_blocks = len(computed_blocks)
        limit = request.num_tokens // kv.block_size - hit_blocks  # (vLLM's max_hit_size_tokens: num_tokens)
        parts = kv.offload.lookup(kv.block_hashes(request), hit_blocks, limit, request)
        if parts is None:
            return None
        if parts:
            source = TierSource(kv.offload, hit_blocks, parts)
            request.external_kv = ExternalKV(source.end * kv.block_size, source)
        return True

    def blocked_lookups(self, steps: int) -> None:
        """`steps` scheduling steps were taken in bulk (a decode run) with the waiting head unable to run:
        each asked the offload connector about the head once, as vLLM's scheduler does on every attempt
        (v1/core/sched/scheduler.py: get_num_new_matched_tokens before allocate_slots). A head that its own
        store jobs hold back is not looked up (vLLM returns before its lookup)."""
        offload = self.kv.offload
        if offload is None or len(self.running) >= self.config.max_num_seqs:
            return
        head = self.admission_head()
        # each decode step spends one token per running request: the head is tried while budget is left
        if (head is not None and head.kv_blocks is None and len(self.running) < self.config.max_num_batched_tokens
                and not head.skip_reading_prefix_cache and not offload.held_by_own_stores(head)):
            offload.lookups += steps

    def external_kv_loaded(self, request: Request, ok: bool) -> None:
        """The load of a waiting request's external KV ended: cache what came in, or (failed) recompute
        it locally; either way it can now be admitted. A failed load that leaves no valid token (no local hit
        before it) gives its blocks back: vLLM frees them (_update_waiting_for_remote_kv), and the request's
        next admission looks its prefix up afresh."""
        request.kv_loading = False
        request.external_kv = None
        self.num_loading -= 1
        if ok:
            self.kv.cache_blocks(request, request.num_computed_tokens)
            if request.num_computed_tokens == request.num_tokens:
                request.num_computed_tokens -= 1  # recomputed, so the next token can be sampled
        else:
            request.num_computed_tokens -= request.num_external_tokens
            request.num_external_tokens = 0
            if request.num_computed_tokens == 0:
                self.kv.free(request)

    def release_held(self, request: Request) -> bool:
        """The decode side has read a finished P/D prefill's KV (or gave up), or the load of an aborted request
        ended: free its blocks."""
        if self.held.pop(request.request_id, None) is None:
            return False
        self.kv.free(request)
        request.block_hashes = None
        return True

    def _update_after_schedule(self, out: SchedulerOutput) -> None:
        """Advance computed tokens, mark which requests sample, and fold the step's shape."""
        sampling, async_, inflight = out.sampling, self.async_scheduling, self.inflight_prefills
        eligible = self.current_step + self.decode_stagger
        # BatchShape.add, inlined (this runs for every request of every step)
        num_tokens = prefill_tokens = num_decode = decode_context = decode_context_max = 0
        prefill_work = 0.0
        for request, n in out.num_scheduled_tokens.items():
            computed = request.num_computed_tokens
            num_tokens += n
            if n == 1:
                num_decode += 1
                decode_context += computed
                if computed > decode_context_max:
                    decode_context_max = computed
            else:
                prefill_tokens += n
                prefill_work += n * (computed + n / 2)
            computed += n
            request.num_computed_tokens = computed
            request.num_in_flight_tokens += n
            if computed >= request.num_tokens + request.num_output_placeholders:
                sampling.add(request)
                if inflight:
                    inflight.discard(request)  # its prefill is done
                if async_:
                    request.num_output_placeholders += 1
                    request.next_decode_eligible_step = eligible
        out.shape = BatchShape(num_tokens, len(out.num_scheduled_tokens), prefill_tokens, prefill_work, num_decode,
                               decode_context, decode_context_max)

    def _preempt(self, request: Request, now: float) -> None:
        self.kv.free(request)
        self.inflight_prefills.discard(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_output_placeholders = 0
        # async: tokens of steps still in flight are delivered when they return (vLLM 0.33)
        request.num_stale_output_tokens = request.num_in_flight_tokens
        if request.num_stale_output_tokens:
            self._stale.append(request)
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.prepend(request)

    # -- after the step ---------------------------------------------------------------
    def update_from_output(self, out: SchedulerOutput, now: float) -> tuple[list[Request], list[Request], int]:
        """Apply a finished step: append sampled tokens, stop requests.

        Returns (requests that got a token, requests that finished, prompt tokens computed
        for the requests that got their first token: vLLM's prompt throughput). A request preempted
        while this step was in flight still gets the token it sampled (its output is
        "stale": it moves no counter of the reset request), as in vLLM 0.33.
        """
        got_token, finished = [], []
        prefilled = 0
        if self.kv.offload is not None:  # the step's store jobs start; those ended by now are reported
            self.kv.offload.step_ended(now)
        max_model_len = self.config.max_model_len
        async_ = self.async_scheduling
        sampling = out.sampling
        block_size = self.kv.block_size
        ended = RequestStatus.FINISHED_STOPPED
        for request, n in out.num_scheduled_tokens.items():
            if request.status >= ended:
                continue  # finished or aborted while its step was in flight
            request.num_in_flight_tokens -= n
            stale = request.num_stale_output_tokens > 0
            if stale:
                request.num_stale_output_tokens -= n
            if request not in sampling:
                continue  # a prefill chunk: nothing sampled
            num_output = request.num_output_tokens = request.num_output_tokens + 1
            num_tokens = request.num_tokens = request.num_tokens + 1
            if request.first_token_time is None:
                request.first_token_time = now
                prefilled += request.num_computed_prompt_tokens
            request.last_token_time = now
            got_token.append(request)
            if async_ and not stale:
                request.num_output_placeholders -= 1
                kv_done = request.num_computed_tokens - request.num_in_flight_tokens
                if kv_done // block_size > request.kv_num_cached:  # blocks filled by former placeholders
                    self.kv.cache_blocks(request, kv_done)
            if num_tokens >= max_model_len or num_output >= request.max_tokens:
                self._finish(request, RequestStatus.FINISHED_LENGTH_CAPPED, now)
                finished.append(request)
            elif num_output >= request.output_len:
                self._finish(request, RequestStatus.FINISHED_STOPPED, now)
                finished.append(request)
        return got_token, finished, prefilled

    def _finish(self, request: Request, status: RequestStatus, now: float) -> None:
        if request.status == RequestStatus.PREEMPTED:
            self.waiting.remove(request)  # its stale token was its last
            self.lora_deferred.discard(request)
        else:
            self.running.remove(request)
        request.status = status
        request.finish_time = now
        self.inflight_prefills.discard(request)
        if request.hold_kv and status != RequestStatus.FINISHED_ABORTED:
            self.held[request.request_id] = request  # the decode side reads its blocks, then releases them
            self.kv.free_out_of_window(request)  # (a hybrid KV cache's sliding blocks before the window)
            return
        self.kv.free(request)
        request.block_hashes = None

    def abort(self, request: Request, now: float, keep_blocks: bool = False) -> bool:
        """Abort a waiting or running request; frees its blocks (`keep_blocks`: held until release_held, as
        vLLM's finish_requests delays freeing a request whose KV is still being received). False if already
        finished."""
        if request.is_finished:
            return False
        if request in self.running:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
            self.lora_deferred.discard(request)
        if request.kv_loading:  # the load is dropped or (`keep_blocks`) left to end (the simulation's)
            request.kv_loading = False
            self.num_loading -= 1
        self.inflight_prefills.discard(request)
        request.status = RequestStatus.FINISHED_ABORTED  # first: freeing a finished request ends its offload
        request.finish_time = now                        # state (vLLM's _free_request tells the connector too)
        if keep_blocks:
            self.held[request.request_id] = request
            return True
        self.kv.free(request)
        request.block_hashes = None
        return True


def decode_batch(running: list[Request], context: int, context_max: int) -> SchedulerOutput:
    """The scheduler output of a step in which every request of `running` decodes one token, their
    contexts summing to `context`, the longest `context_max` (a step of a decode run)."""
    n = len(running)
    out = SchedulerOutput(num_scheduled_tokens=dict.fromkeys(running, 1), sampling=set(running),
                          total_num_scheduled_tokens=n)
    out.shape = BatchShape.decode(n, context, context_max)
    return out
