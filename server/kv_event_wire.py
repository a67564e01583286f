"""vLLM 0.33's KV-event wire format: msgpack, by msgspec, of the structs `vllm.distributed.kv_events` defines.

A batch is an array `[ts, events, data_parallel_rank]`; each event a map tagged with its class
name (`"type": "BlockStored"`) whose fields come in vLLM's order, those still at their default
left out. The structs below declare the same fields, defaults and options as vLLM's, so msgspec
writes the same bytes and vLLM's own classes (or llm-d's decoder) read them back.
"""
from __future__ import annotations

from typing import Any

import msgspec

from emulator import kv_events as core


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(KVCacheEvent):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None
    lookahead_token_ids: list[list[int]] | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int | bytes]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


def wire_event(event: core.KVCacheEvent) -> KVCacheEvent:
    """The struct vLLM would send for a core event: a sliding window only for a sliding-window group's
    BlockStored, no lookahead token ids (vLLM sends none without lookahead hashing; see emulator.kv_events)."""
    if isinstance(event, core.BlockStored):
        return BlockStored(event.block_hashes, event.parent_block_hash, event.token_ids, event.block_size,
                           lora_id=event.lora_id, medium=event.medium, lora_name=event.lora_name,
                           extra_keys=event.extra_keys,
                           group_idx=event.group_idx, kv_cache_spec_kind=event.kv_cache_spec_kind,
                           kv_cache_spec_sliding_window=event.kv_cache_spec_sliding_window, locality=event.locality,
                           ownership=event.ownership, session_id=event.session_id)
    if isinstance(event, core.BlockRemoved):
        return BlockRemoved(event.block_hashes, event.medium, group_idx=event.group_idx, locality=event.locality,
                            ownership=event.ownership)
    return AllBlocksCleared()


class BatchEncoder:
    """Encodes batches of core events into the payload of one ZMQ message."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()

    def encode(self, ts: float, events: list[core.KVCacheEvent], data_parallel_rank: int) -> bytes:
        return self._encoder.encode(KVEventBatch(ts, [wire_event(e) for e in events], data_parallel_rank))
