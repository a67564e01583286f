"""One inference request and its life cycle in the simulated engine.

A request carries what the scheduler needs (token counts, the target output
length, priority) and the virtual timestamps vLLM records for it. Token ids are
optional: when a trace gives them, prefix caching matches on them; otherwise the
request's content is unique to it (it can still hit its own blocks after a
preemption, as in vLLM).
"""
from __future__ import annotations

import enum
import hashlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from emulator.lora import LoRAAdapter


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH_CAPPED = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


# vLLM's FINISH_REASON_STRINGS, keyed by the status that ends a request.
FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


class Request:
    """A request as the engine core sees it (vLLM `v1/request.py`)."""

    __slots__ = (
        "request_id", "arrival_time", "priority", "num_prompt_tokens", "prompt_token_ids",
        "output_token_ids", "content_seed", "max_tokens", "output_len", "stop_on_eos",
        "status", "num_computed_tokens", "num_output_tokens", "num_output_placeholders",
        "num_in_flight_tokens", "num_stale_output_tokens", "num_tokens",
        "num_cached_tokens", "num_preemptions", "block_hashes", "queued_time",
        "scheduled_time", "first_token_time", "last_token_time", "finish_time",
        "engine_index", "user_data", "kv_blocks", "kv_num_cached", "model", "session", "session_id", "hash_block_size",
        "external_kv", "kv_loading", "num_external_tokens", "hold_kv", "error", "direct",
        "next_decode_eligible_step", "remote_prefill_cached_tokens", "sent_time", "cache_salt",
        "lora", "kv_cache_report_mode", "skip_reading_prefix_cache",
    )

    def __init__(
        self,
        request_id: str,
        num_prompt_tokens: int,
        output_len: int,
        *,
        arrival_time: float = 0.0,
        max_tokens: int | None = None,
        prompt_token_ids: np.ndarray | None = None,
        output_token_ids: np.ndarray | None = None,
        content_seed: int | None = None,
        priority: int = 0,
        stop_on_eos: bool = False,
        user_data: object = None,
        model: str | None = None,
        session: str | None = None,
        cache_salt: str | None = None,
        lora: LoRAAdapter | None = None,
        session_id: str | None = None,
        kv_cache_report_mode: str = "incremental",
        skip_reading_prefix_cache: bool = False,
    ) -> None:
        if num_prompt_tokens < 1:
            raise ValueError(f"request {request_id!r}: the prompt must have at least 1 token")
        if output_len < 1:
            raise ValueError(f"request {request_id!r}: output length must be at least 1")
        self.request_id = request_id
        self.arrival_time = arrival_time  # when the engine's front end got it (a router's retry: the retry's)
        # when its client sent it, where that is not arrival_time (see client_arrival): a retried request, or
        # a P/D request once its decode pod gets it
        self.sent_time: float | None = None
        self.priority = priority
        self.num_prompt_tokens = num_prompt_tokens
        self.prompt_token_ids = prompt_token_ids
        self.output_token_ids = output_token_ids
        if content_seed is None:  # stable across processes, unlike hash(str)
            digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
            content_seed = int.from_bytes(digest, "little")
        self.content_seed = content_seed
        # vLLM's cache_salt: its blocks' hashes (the first block's, hence every one chained to it) differ
        # from an unsalted or otherwise salted request's, so they share no prefix cache with those
        self.cache_salt = cache_salt
        # the LoRA adapter it runs with (vLLM's lora_request): counts against max_loras, keys its blocks apart
        self.lora = lora
        # max_tokens is the user's cap; output_len is how many tokens this request
        # will really produce (== max_tokens with ignore_eos). When the request
        # stops before max_tokens, it stops with "stop" (an EOS), else "length".
        self.max_tokens = output_len if max_tokens is None else max_tokens
        self.output_len = min(output_len, self.max_tokens)
        self.stop_on_eos = stop_on_eos
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_output_tokens = 0
        self.num_tokens = num_prompt_tokens  # prompt plus the output tokens sampled so far (vLLM num_tokens)
        self.num_output_placeholders = 0
        self.num_in_flight_tokens = 0  # scheduled in steps whose output is not processed yet
        self.num_stale_output_tokens = 0  # of those, tokens scheduled before a preemption
        self.next_decode_eligible_step = 0  # pipeline parallel, async: the first step it may decode in again
        self.num_cached_tokens = -1
        self.num_preemptions = 0
        self.block_hashes: list[int] | None = None
        self.hash_block_size = 0  # the block size block_hashes were computed for
        self.queued_time: float | None = None
        self.scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.finish_time: float | None = None
        self.engine_index: int | None = None  # the engine that took it (None: none yet)
        # Kept by the KV cache manager (vLLM keeps them in dicts by request id; here they
        # ride on the request so the per-token path needs no lookups).
        self.kv_blocks: list[int] | None = None  # block ids held, in token order
        self.kv_num_cached = 0  # how many of them are hashed into the prefix cache
        self.user_data = user_data
        self.model = model  # the served name asked for (None: the cluster's first)
        self.session = session  # a session key for affinity routing (the `user` field, a header)
        self.session_id = session_id  # vLLM's session id (its KV events publish it: kv_events.BlockStored)
        # vLLM's extra_args["kv_cache_report_mode"]: "full" re-reports a prefix hit's blocks as a BlockStored
        self.kv_cache_report_mode = kv_cache_report_mode
        # vLLM's SamplingParams.skip_reading_prefix_cache (set for prompt logprobs, which a cached prefix would
        # leave uncomputed): no prefix-cache hit is looked up, and no KV connector's tokens are loaded
        self.skip_reading_prefix_cache = skip_reading_prefix_cache
        # KV from outside the engine (vLLM's KV connector): `external_kv` says where the prompt's KV can
        # be loaded from (a prefill instance, an offload tier) until admission takes it; while the load
        # is in flight the request holds its blocks and waits (vLLM's WAITING_FOR_REMOTE_KVS).
        self.external_kv = None
        self.kv_loading = False
        self.num_external_tokens = 0  # prompt tokens that came from outside
        # a P/D decode: the prompt tokens its prefill did not compute, which vLLM reports as the response's
        # cached tokens (kv_transfer_params' remote_prefill_cached_tokens; the cluster's own proxy sets it)
        self.remote_prefill_cached_tokens: int | None = None
        self.hold_kv = False  # a P/D prefill: keep the blocks when it finishes, for the decode side to read
        self.error: str | None = None  # why it was refused: a queue bound (vLLM's 503), no context fits (400)
        self.direct = False  # sent to one instance's own port: no router stands between it and that pod

    @property
    def is_finished(self) -> bool:
        return self.status >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASONS.get(self.status)

    @property
    def client_arrival(self) -> float:
        """When its client sent it, from which the client's latencies count: its arrival, unless a router
        retried it on another instance after a fault or a P/D proxy sent it on to its decode pod (then
        arrival_time is when that pod got it, as the pod sees it)."""
        return self.arrival_time if self.sent_time is None else self.sent_time

    def reach_pod(self, now: float) -> None:
        """It reaches another pod at `now` (a router's retry, a P/D proxy's decode): that pod's arrival is
        then; its client's stays when it was first sent."""
        if self.sent_time is None:
            self.sent_time = self.arrival_time
        self.arrival_time = max(self.arrival_time, now)

    @property
    def num_prompt_tokens_not_computed(self) -> int:
        """vLLM's PrefillStats.num_cached_tokens: the local prefix hit and the KV loaded from outside."""
        return max(self.num_cached_tokens, 0) + self.num_external_tokens

    @property
    def num_cached_tokens_reported(self) -> int:
        """vLLM's front-end num_cached_tokens (usage cached_tokens, the prefill-KV-computed histogram): the
        prompt tokens not computed here, or on a P/D decode side those its prefill did not compute."""
        remote = self.remote_prefill_cached_tokens
        return remote if remote is not None else self.num_prompt_tokens_not_computed

    @property
    def num_computed_prompt_tokens(self) -> int:
        """Prompt tokens prefilled here (vLLM's PrefillStats.num_computed_tokens): less the local prefix hit
        and the KV loaded from outside."""
        return self.num_prompt_tokens - self.num_prompt_tokens_not_computed

    def reset_for_retry(self) -> None:
        """Back to a fresh arrival (its instance failed before it produced a token; a router retries it)."""
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = self.num_output_placeholders = 0
        self.num_in_flight_tokens = self.num_stale_output_tokens = 0
        self.next_decode_eligible_step = 0
        self.num_tokens = self.num_prompt_tokens
        self.num_cached_tokens = -1
        self.kv_blocks = None
        self.kv_num_cached = 0
        self.kv_loading = False
        self.queued_time = self.scheduled_time = None

    def sort_key(self) -> tuple:
        """vLLM's `Request.__lt__` order for the priority policy."""
        return (self.priority, self.arrival_time, self.request_id)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, prompt={self.num_prompt_tokens}, "
                f"out={self.num_output_tokens}/{self.output_len}, {self.status.name})")
