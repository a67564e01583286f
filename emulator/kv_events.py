"""vLLM's KV cache events for one engine: what a KV-aware router learns of its prefix cache.

vLLM 0.33 reports its block pool's changes as events (`distributed/kv_events.py`, emitted by
`v1/core/block_pool.py`): `BlockStored` when full blocks enter the prefix cache (their hashes,
the hash of the block before them, their token ids), `BlockRemoved` when a cached block is
evicted (one event per evicted copy), `AllBlocksCleared` when the cache is reset. A router such
as llm-d's KV-cache indexer hashes a prompt's token ids the same way to find the pods holding
its prefix, so the hashes reported here are vLLM's own (`BlockHasher`: `hash_block_tokens` and
`init_none_hash` of `v1/core/kv_cache_utils.py`), not the pool's fast internal keys
(block_hash.py), which stay for the simulation. A request's extra keys are vLLM's too
(`generate_block_hash_extra_keys`): its LoRA adapter's ("lora", name, path) on every block, then its
("cache_salt", salt) on the first; its BlockStored carry the adapter's id and name, and the keys as
`to_event_extra_keys` publishes them (the adapter's name, the salt), and the request's session id as its
front end took it (Request.session_id: the body's `session_id`, the X-Session-ID header or `vllm_xargs`).
A request whose extra args say `kv_cache_report_mode: "full"` (Request.kv_cache_report_mode) also has
each prefix lookup that hits reported (vLLM's emit_cached_block_events): one BlockStored of its hit
blocks, from the first (no parent), though the cache holds no new copy of them.

Each BlockStored names its KV cache group (`group_idx`) and, as vLLM's KVCacheManager.take_events annotates
it, the group's attention kind and, for a sliding-window group only, its window (`kv_cache_spec_sliding_window`).
A model of one group publishes group 0 (full attention or MLA, no window). A model that mixes sliding-window
and full-attention layers (gpt-oss) runs vLLM's hybrid KV cache manager (emulator.sliding_window), whose groups
come in layer order (gpt-oss: 0 the sliding window of 128, 1 full attention), all in one block pool; its hook
tells the recorder the groups (`use_groups`) and reports each group's caching (`group_blocks_stored`), as
vLLM's coordinator caches group after group (block_pool.cache_full_blocks): one BlockStored per group that had
blocks to cache, the sliding group's first. A sliding group caches only the blocks a later hit could use, so
its event names only those blocks' hashes (and extra keys), possibly none, while its parent hash and token
ids still span every block the call covered, as vLLM's do. A block evicted from the shared pool is removed
under its own group's key: its BlockRemoved carries that group. A prefix hit reported in "full" mode gives
one BlockStored per group that hit (the sliding group's null blocks included, as vLLM names every hashed
block up to the hit). `lookahead_token_ids` stays unset (lookahead block hashing, only under EAGLE-style
speculative decoding, which the emulator does not run).

`KVEventRecorder` is the pool's `CacheEvents` hook for one engine. It keeps each request's token
ids until the request ends (the engine drops them on arrival), computes its vLLM hashes block by
block as they are cached, remembers which vLLM hash each internal key stands for (an eviction
names only the internal key), and queues the events until a driver takes them (vLLM publishes
what queued once per engine step). A request without token ids gets synthetic ids, unique to
it and stable (31-bit values drawn from its content seed, the same content the internal keys
hash), so its blocks are reported and evicted like any other but match no real prompt.

Events carry a storage medium; the pool's are "GPU". An engine's own offload tiers (vLLM's native
CPU offloading, and a CXL tier below it) report through `tiers_changed` (the tiers' `on_change`
hook, emulator.kv_tiers) as vLLM 0.33's OffloadingConnector reports its CPU tier, chunk by chunk (a
chunk is `blocks_per_chunk` GPU blocks, named by its last block's hash, vLLM's OffloadKey): a BlockRemoved
of the chunks a store pushed out, then one BlockStored per chunk stored. By default each is the
connector's placeholder payload (the chunk key's hash alone, medium "CPU"; no parent, tokens, block size
or attention kind). With kv_connector_extra_config's `self_describing_kv_events`
(offloading/events.py, OffloadingEventsTracker) a BlockStored carries the chunk's every block hash, the
hash of the block before it, its token ids, the GPU block size, the request's LoRA adapter (id and name)
and the group's attention kind (no extra keys: vLLM defers those; no session id: the connector's events
carry none), and a BlockRemoved names every block hash of the chunks it removes. They are queued apart
and taken after the pool's, as vLLM's scheduler appends its connector's events to the block pool's in each
batch.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from emulator.block_hash import synthetic_tokens
from emulator.lora import LoRAAdapter
from emulator.request import Request

_UNLOADED = object()
_xxhash: Any = _UNLOADED  # the xxhash module, None without it; imported on first use (sha256 runs never need it)


def _xxhash_module():
    """xxhash, optional as in vLLM: only the xxhash algorithms need it (the `xxhash` extra)."""
    global _xxhash
    if _xxhash is _UNLOADED:
        try:
            import xxhash
            _xxhash = xxhash if hasattr(xxhash, "xxh3_128_digest") else None  # XXH3 came with xxhash 2.0
        except ImportError:
            _xxhash = None
    return _xxhash


XXHASH_MISSING = ("xxhash is required for the 'xxhash' prefix caching hash algorithms. "
                  "Install it via `pip install xxhash`.")  # vLLM's words (utils/hashing.py)
# --prefix-caching-hash-algo's choices; vLLM's default is sha256.
HASH_ALGOS = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")
DEFAULT_HASH_ALGO = "sha256"
# The seed of the first block's parent hash when PYTHONHASHSEED is unset (sha256 algorithms).
DEFAULT_NONE_HASH_SEED = "vllm-none-hash"
MEDIUM_GPU = "GPU"
MEDIUM_CPU = "CPU"
FULL_ATTENTION, MLA_ATTENTION = "full_attention", "mla_attention"  # vLLM's KVCacheSpecKind values
SLIDING_WINDOW, SLIDING_WINDOW_MLA = "sliding_window", "sliding_window_mla"
_LOW_64 = (1 << 64) - 1

ExternalHash = int | bytes  # what events carry: vLLM's ExternalBlockHash


# -- vLLM's block hashes ------------------------------------------------------------------------
def _cbor(obj: Any) -> bytes:
    """Canonical CBOR (RFC 8949) of what a block hash covers: None, ints, bytes, str, tuples."""
    out = bytearray()
    _cbor_into(out, obj)
    return bytes(out)


def _cbor_head(out: bytearray, major: int, n: int) -> None:
    if n < 24:
        out.append(major << 5 | n)
    elif n < 1 << 8:
        out += bytes((major << 5 | 24, n))
    elif n < 1 << 16:
        out.append(major << 5 | 25)
        out += n.to_bytes(2, "big")
    elif n < 1 << 32:
        out.append(major << 5 | 26)
        out += n.to_bytes(4, "big")
    elif n < 1 << 64:
        out.append(major << 5 | 27)
        out += n.to_bytes(8, "big")
    else:
        raise ValueError(f"integer {n} does not fit CBOR's 64-bit heads")


def _cbor_into(out: bytearray, obj: Any) -> None:
    if obj is None:
        out.append(0xF6)
    elif obj is True or obj is False:
        out.append(0xF5 if obj else 0xF4)
    elif isinstance(obj, int):
        if obj >= 0:
            _cbor_head(out, 0, obj)
        else:
            _cbor_head(out, 1, -1 - obj)
    elif isinstance(obj, bytes):
        _cbor_head(out, 2, len(obj))
        out += obj
    elif isinstance(obj, str):
        data = obj.encode()
        _cbor_head(out, 3, len(data))
        out += data
    elif isinstance(obj, (tuple, list)):
        _cbor_head(out, 4, len(obj))
        for item in obj:
            _cbor_into(out, item)
    else:
        raise TypeError(f"cannot CBOR-encode a {type(obj).__name__} in a block hash")


class _CborUints(dict):
    """CBOR heads of token ids, kept for ids below 2**18 (vocabularies; not synthetic ids)."""

    def __missing__(self, n: int) -> bytes:
        out = bytearray()
        _cbor_into(out, n)
        if 0 <= n < 1 << 18:
            self[n] = bytes(out)
        return bytes(out)


_CBOR_UINTS = _CborUints()


def _cbor_block(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """_cbor((parent, tuple(token_ids), None)) without walking the tuple in Python."""
    out = bytearray(b"\x83")
    _cbor_head(out, 2, len(parent))
    out += parent
    _cbor_head(out, 4, len(token_ids))
    out += b"".join(map(_CBOR_UINTS.__getitem__, token_ids))
    out.append(0xF6)
    return bytes(out)


def _pickle(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xxh3_128(data: bytes) -> bytes:
    """xxHash's 128-bit XXH3 digest; vLLM's error where the optional package (or its XXH3) is missing."""
    module = _xxhash_module()
    if module is None:
        raise ModuleNotFoundError(XXHASH_MISSING)
    return module.xxh3_128_digest(data)


def hash_algo_available(algo: str) -> bool:
    """Whether this process can hash with `algo` (the xxhash ones need the optional xxhash package)."""
    return not algo.startswith("xxhash") or _xxhash_module() is not None


def none_hash_seed(algo: str, pythonhashseed: str | None) -> str:
    """The seed of NONE_HASH as vLLM resolves it: PYTHONHASHSEED when set; else a fixed seed for the
    sha256 algorithms (independent servers agree on every hash) and a fresh random one for xxhash,
    which is not collision resistant (a known seed would let colliding blocks be built offline)."""
    if pythonhashseed is not None:
        return pythonhashseed
    if algo.startswith("xxhash"):
        return os.urandom(32).hex()
    return DEFAULT_NONE_HASH_SEED


class BlockHasher:
    """vLLM's prefix-cache block hash for one `--prefix-caching-hash-algo`: block i hashes the tuple
    (hash of block i-1, or NONE_HASH for the first; its token ids; extra keys, None for plain text),
    serialized by pickle (sha256, xxhash) or canonical CBOR (the _cbor algorithms)."""

    def __init__(self, algo: str = DEFAULT_HASH_ALGO, seed: str = DEFAULT_NONE_HASH_SEED) -> None:
        if algo not in HASH_ALGOS:
            raise ValueError(f"Unsupported hash function: {algo}")
        self.algo = algo
        self.seed = seed
        self._cbor = algo.endswith("_cbor")
        self._serialize = _cbor if self._cbor else _pickle
        self._digest = _xxh3_128 if algo.startswith("xxhash") else _sha256

    @cached_property
    def none_hash(self) -> bytes:
        """The first block's parent: the seed's hash, taken when a block is first hashed (an engine caching no
        prefix never hashes, and needs no xxhash)."""
        return self.hash_object(self.seed)

    def hash_object(self, obj: Any) -> bytes:
        return self._digest(self._serialize(obj))

    def block_hash(self, parent: bytes | None, token_ids: Sequence[int], extra_keys: tuple | None = None) -> bytes:
        if self._cbor and extra_keys is None:
            return self._digest(_cbor_block(parent or self.none_hash, token_ids))
        return self._digest(self._serialize((parent or self.none_hash, tuple(token_ids), extra_keys)))

    def chain(self, token_ids: Sequence[int], block_size: int, parent: bytes | None = None,
              cache_salt: str | None = None, lora: LoRAAdapter | None = None) -> list[bytes]:
        """The hashes of every full block of `token_ids`, the first chained to `parent` (and salted), each
        with the adapter's key."""
        hashes = []
        for start in range(0, len(token_ids) - block_size + 1, block_size):
            parent = self.block_hash(parent, token_ids[start:start + block_size],
                                     block_extra_keys(lora, cache_salt if start == 0 else None))
            hashes.append(parent)
        return hashes


def block_extra_keys(lora: LoRAAdapter | None, cache_salt: str | None) -> tuple | None:
    """A block's extra keys, in vLLM's order: the adapter's, then the salt (the first block's only); None
    for neither."""
    keys = ((lora.hash_key,) if lora is not None else ()) + ((("cache_salt", cache_salt),) if cache_salt else ())
    return keys or None


def external_hash(block_hash: bytes, as_int: bool = True) -> ExternalHash:
    """A hash as events carry it (vLLM's maybe_convert_block_hash): the low 64 bits of the big-endian
    digest with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1 (the default), else the digest's bytes."""
    return int.from_bytes(block_hash, "big") & _LOW_64 if as_int else block_hash


def synthetic_token_ids(seed: int, start: int, count: int) -> np.ndarray:
    """Token ids for content a request was given none for: the top 31 bits of the content the
    internal keys hash (block_hash.synthetic_tokens), so equal internal keys mean equal ids."""
    return (synthetic_tokens(seed, start, count) >> np.uint64(33)).astype(np.int64)


# -- events --------------------------------------------------------------------------------------
@dataclass(slots=True)
class BlockStored:
    block_hashes: list[ExternalHash]
    parent_block_hash: ExternalHash | None
    token_ids: list[int]
    block_size: int
    medium: str = MEDIUM_GPU
    extra_keys: list[tuple | None] | None = None  # one entry per block (None: plain text)
    group_idx: int = 0  # the KV cache group (0: a model's only group)
    kv_cache_spec_kind: str | None = FULL_ATTENTION  # the group's attention ("mla_attention" for MLA models)
    kv_cache_spec_sliding_window: int | None = None  # a sliding-window group's window (none for the others)
    locality: str | None = None
    ownership: str | None = None
    lora_id: int | None = None  # the request's adapter (vLLM's lora_int_id and name)
    lora_name: str | None = None
    session_id: str | None = None  # the session id of the request that stored them (the pool's events only)


@dataclass(slots=True)
class BlockRemoved:
    block_hashes: list[ExternalHash]
    medium: str = MEDIUM_GPU
    group_idx: int = 0
    locality: str | None = None
    ownership: str | None = None


@dataclass(slots=True)
class AllBlocksCleared:
    pass


KVCacheEvent = BlockStored | BlockRemoved | AllBlocksCleared


# -- the recorder ------------------------------------------------------------------------------
class _RequestTokens:
    """A request's token ids (every full block it can fill), its vLLM hashes computed so far and its
    adapter (what a self-describing offload event tells of a chunk of it)."""
    __slots__ = ("token_ids", "hashes", "lora")

    def __init__(self, token_ids: np.ndarray, lora: LoRAAdapter | None = None) -> None:
        self.token_ids = token_ids
        self.hashes: list[bytes] = []
        self.lora = lora


def request_token_ids(request: Request, block_size: int) -> np.ndarray:
    """The ids of every token of the request's full blocks (prompt, then planned output): the ones it
    was given, synthetic ones past them (the content the internal keys hash, block_hash.py)."""
    total = (request.num_prompt_tokens + request.output_len) // block_size * block_size
    known = request.prompt_token_ids
    if known is not None and request.output_token_ids is not None:
        known = np.concatenate([np.asarray(known, dtype=np.int64), np.asarray(request.output_token_ids,
                                                                              dtype=np.int64)])
    n_known = 0 if known is None else min(len(known), total)
    ids = np.empty(total, dtype=np.int64)
    if n_known:
        ids[:n_known] = known[:n_known]
    ids[n_known:] = synthetic_token_ids(request.content_seed, n_known, total - n_known)
    return ids


class KVEventRecorder:
    """One engine's KV cache events, with vLLM's hashes (see the module docstring)."""

    def __init__(self, hasher: BlockHasher, block_size: int, *, medium: str = MEDIUM_GPU,
                 spec_kind: str = FULL_ATTENTION, int_hashes: bool = True, blocks_per_chunk: int = 1,
                 self_describing: bool = False) -> None:
        self.hasher = hasher
        self.block_size = block_size
        self.medium = medium  # the pool's medium
        self.spec_kind = spec_kind
        self.int_hashes = int_hashes
        self.blocks_per_chunk = blocks_per_chunk  # the offload tiers' chunks, in GPU blocks
        self.self_describing = self_describing    # OffloadingConnector's self_describing_kv_events
        # per KV cache group (vLLM's kv_cache_event_metadata): its attention kind and sliding window; and the
        # group whose cached blocks are the internal keys' plain hashes (the others' keys are (hash, group))
        self.groups: list[tuple[str, int | None]] = [(spec_kind, None)]
        self.main_group = 0
        self.events: list[KVCacheEvent] = []
        self.connector_events: list[KVCacheEvent] = []  # the offload tiers' (published after the pool's)
        self._requests: dict[Request, _RequestTokens] = {}
        # medium -> internal key -> [vLLM hash, copies held there, the tokens of a request holding it, its index]
        self._cached: dict[str, dict[int, list]] = {medium: {}}
        # offload tier -> chunk key (internal) -> (the tokens of a request holding the chunk, the chunk's end block)
        self._tiers: dict[Any, dict[int, tuple[_RequestTokens, int]]] = {}

    def use_groups(self, sliding: Sequence[bool], window: int, main: int) -> None:
        """A hybrid KV cache's groups, in vLLM's order: each a sliding window of `window` tokens (sliding_window,
        or sliding_window_mla beside MLA) or of this recorder's own kind; `main` the full group whose keys
        are the plain hashes."""
        sliding_kind = SLIDING_WINDOW_MLA if self.spec_kind == MLA_ATTENTION else SLIDING_WINDOW
        self.groups = [(sliding_kind, window) if s else (self.spec_kind, None) for s in sliding]
        self.main_group = main

    # -- the pool's hook (emulator.kv_cache.CacheEvents) --------------------------------------
    def request_added(self, request: Request) -> None:
        self._requests[request] = _RequestTokens(request_token_ids(request, self.block_size), request.lora)

    def blocks_stored(self, request: Request, start: int, end: int) -> None:
        self.store(request, start, end, self.medium)

    def blocks_reused(self, request: Request, num_blocks: int, group: int | None = None) -> None:
        """kv_cache_report_mode "full": a prefix hit's blocks [0, num_blocks) in `group` (default the main one)
        reported as one BlockStored, as vLLM's emit_cached_block_events does (no parent; the cache holds no new
        copy)."""
        state = self._state(request)
        self.events.append(self._stored_event(request, state, self._hashes(request, state, num_blocks), 0,
                                              num_blocks, self.medium, group=group))

    def group_blocks_stored(self, request: Request, group: int, start: int, end: int, cached: Sequence[int],
                            keys: Sequence[Any]) -> None:
        """A hybrid KV cache cached the request's blocks `cached` (indices in [start, end), under the pool's
        `keys`) in `group`: one BlockStored, as vLLM's cache_full_blocks emits it for a group whose mask or
        null blocks skip some of [start, end): only the cached blocks' hashes and extra keys, the parent and
        token ids of the whole range."""
        state = self._state(request)
        hashes = self._hashes(request, state, end)
        table = self._cached[self.medium]
        for i, key in zip(cached, keys):
            entry = table.get(key)
            if entry is None:
                table[key] = [hashes[i], 1, state, i]
            else:
                entry[1] += 1
        event = self._stored_event(request, state, hashes, start, end, self.medium, group=group)
        if len(cached) != end - start:
            event.block_hashes = [external_hash(hashes[i], self.int_hashes) for i in cached]
            event.extra_keys = [event.extra_keys[i - start] for i in cached] or None
        self.events.append(event)

    def block_removed(self, block_hash: int, copies_left: int) -> None:
        self.remove(block_hash, self.medium)

    def all_cleared(self) -> None:
        self._cached[self.medium] = {}
        self.events.append(AllBlocksCleared())

    # -- for drivers and tiers -------------------------------------------------------------------
    def request_finished(self, request: Request) -> None:
        """The request ended (vLLM publishes nothing then: its blocks stay cached until evicted): forget its
        token ids (its cached blocks stay known by their keys)."""
        self._requests.pop(request, None)

    def engine_failed(self) -> None:
        """The engine failed and holds no request: forget every request's token ids (one re-routed to another
        engine is that engine's recorder's now)."""
        self._requests.clear()

    @property
    def num_requests(self) -> int:
        """How many requests' token ids it keeps (those on the engine, until they end)."""
        return len(self._requests)

    @property
    def has_events(self) -> bool:
        return bool(self.events or self.connector_events)

    def take_events(self) -> list[KVCacheEvent]:
        """The events queued since the last call: the block pool's, then the offload connector's (as
        vLLM's scheduler collects them for one batch)."""
        events, self.events = self.events, []
        if self.connector_events:
            events += self.connector_events
            self.connector_events = []
        return events

    def tiers_changed(self, changes: list[tuple[Any, list[int], list[int]]]) -> None:
        """An offload store changed these tiers: (tier, internal keys it stored, keys it pushed out), as
        the OffloadingConnector reports its tier, chunk by chunk (see the module docstring): a stored block
        that ends a chunk stores the chunk, a chunk whose last block is pushed out is removed. What a chunk
        holds is known from the GPU (its blocks just cached there) or the tier above (pushed down)."""
        gpu = self._cached[self.medium]
        tables = [self._tiers.setdefault(tier, {}) for tier, _, _ in changes]
        k = self.blocks_per_chunk
        found_by_tier = []
        for _, stored, _ in changes:  # looked up before any table changes: a chunk may move tier to tier
            found = []
            for key in stored:
                entry = gpu.get(key)
                if entry is not None:
                    chunk = (entry[2], entry[3] + 1) if (entry[3] + 1) % k == 0 else None
                else:
                    chunk = next((t[key] for t in tables if key in t), None)
                if chunk is not None:  # else not a chunk's end, or cached before the recorder was attached
                    found.append((key, chunk))
            found_by_tier.append(found)
        ext, queue = self.int_hashes, self.connector_events
        for (tier, _, removed), found, table in zip(changes, found_by_tier, tables):
            medium = tier.spec.medium
            gone = [table.pop(key) for key in removed if key in table]
            if gone:
                hashes = [h for chunk in gone for h in self._chunk_hashes(*chunk)]
                queue.append(BlockRemoved([external_hash(h, ext) for h in hashes], medium))
            for key, chunk in found:
                table[key] = chunk
                queue.append(self._chunk_stored(*chunk, medium))

    def _chunk_hashes(self, state: _RequestTokens, end: int) -> list[bytes]:
        """The vLLM hashes an event names for the chunk of blocks ending at `end`: every block's when
        self-describing, else the chunk key's alone."""
        return state.hashes[end - self.blocks_per_chunk:end] if self.self_describing else [state.hashes[end - 1]]

    def _chunk_stored(self, state: _RequestTokens, end: int, medium: str) -> BlockStored:
        """The BlockStored of a chunk (vLLM's OffloadingEventsTracker: its payload, or the placeholder)."""
        ext = self.int_hashes
        if not self.self_describing:
            return BlockStored(block_hashes=[external_hash(state.hashes[end - 1], ext)], parent_block_hash=None,
                               token_ids=[], block_size=0, medium=medium, kv_cache_spec_kind=None)
        start, bs = end - self.blocks_per_chunk, self.block_size
        return BlockStored(
            block_hashes=[external_hash(h, ext) for h in state.hashes[start:end]],
            parent_block_hash=external_hash(state.hashes[start - 1], ext) if start else None,
            token_ids=state.token_ids[start * bs:end * bs].tolist(), block_size=bs, medium=medium,
            kv_cache_spec_kind=self.spec_kind, **_lora_fields(state.lora))

    def store(self, request: Request, start: int, end: int, medium: str, *, locality: str | None = None,
              ownership: str | None = None) -> None:
        """The request's blocks [start, end) now have a copy in `medium`: one BlockStored."""
        if end <= start:
            return
        state = self._state(request)
        hashes = self._hashes(request, state, end)
        keys = request.block_hashes
        table = self._cached.setdefault(medium, {})
        for i in range(start, end):
            entry = table.get(keys[i])
            if entry is None:
                table[keys[i]] = [hashes[i], 1, state, i]
            else:
                entry[1] += 1
        self.events.append(self._stored_event(request, state, hashes, start, end, medium, locality, ownership))

    def _state(self, request: Request) -> _RequestTokens:
        state = self._requests.get(request)
        if state is None:  # reached the engine before the recorder was attached
            state = self._requests[request] = _RequestTokens(request_token_ids(request, self.block_size),
                                                             request.lora)
        return state

    def _stored_event(self, request: Request, state: _RequestTokens, hashes: list[bytes], start: int, end: int,
                      medium: str, locality: str | None = None, ownership: str | None = None,
                      group: int | None = None) -> BlockStored:
        """The BlockStored of the request's blocks [start, end) in `medium` and `group` (default the main one):
        vLLM's _build_block_stored_event, with the group's kind and window as its take_events adds them."""
        ext, bs = self.int_hashes, self.block_size
        if group is None:
            group = self.main_group
        kind, window = self.groups[group]
        return BlockStored(
            block_hashes=[external_hash(h, ext) for h in hashes[start:end]],
            parent_block_hash=external_hash(hashes[start - 1], ext) if start else None,
            token_ids=state.token_ids[start * bs:end * bs].tolist(), block_size=bs, medium=medium,
            extra_keys=_event_extra_keys(request, start, end), group_idx=group, kv_cache_spec_kind=kind,
            kv_cache_spec_sliding_window=window, locality=locality, ownership=ownership,
            session_id=request.session_id, **_lora_fields(request.lora))

    def remove(self, block_hash: int | tuple[int, int], medium: str, *, locality: str | None = None,
               ownership: str | None = None) -> None:
        """One copy of the block with internal key `block_hash` left `medium`: one BlockRemoved, of the group
        the key names (a hybrid pool's (hash, group), else the main group), as vLLM's is of its key's group."""
        table = self._cached.get(medium)
        entry = table.get(block_hash) if table else None
        if entry is None:  # stored before the recorder was attached: its vLLM hash is unknown
            return
        entry[1] -= 1
        if entry[1] == 0:
            del table[block_hash]
        group = block_hash[1] if block_hash.__class__ is tuple else self.main_group
        self.events.append(BlockRemoved([external_hash(entry[0], self.int_hashes)], medium, group, locality,
                                        ownership))

    def _hashes(self, request: Request, state: _RequestTokens, end: int) -> list[bytes]:
        """The request's vLLM hashes up to block `end`, computed once; a block whose internal key the
        pool has cached has the same content, hence the same hash, as the copy there."""
        hashes = state.hashes
        keys, ids, bs = request.block_hashes, state.token_ids, self.block_size
        cached = self._cached[self.medium]
        block_hash = self.hasher.block_hash
        lora = request.lora
        later = block_extra_keys(lora, None)  # every block's but the first
        for i in range(len(hashes), end):
            entry = cached.get(keys[i])
            hashes.append(entry[0] if entry is not None else
                          block_hash(hashes[-1] if i else None, ids[i * bs:(i + 1) * bs].tolist(),
                                     later if i else block_extra_keys(lora, request.cache_salt)))
        return hashes


def _lora_fields(lora: LoRAAdapter | None) -> dict:
    """A BlockStored's adapter fields, the GPU's and the offload tiers' alike: the front end's lora_int_id and
    the adapter's name (none without an adapter)."""
    return {} if lora is None else {"lora_id": lora.lora_id, "lora_name": lora.name}


def _event_extra_keys(request: Request, start: int, end: int) -> list[tuple | None]:
    """A BlockStored's extra keys, one per block, as vLLM publishes them (to_event_extra_keys): each block of
    a LoRA request carries the adapter's name, the first block of a salted request its cache_salt."""
    lora = (request.lora.name,) if request.lora is not None else ()
    keys: list[tuple | None] = [lora or None] * (end - start)
    if start == 0 and request.cache_salt:
        keys[0] = (*lora, request.cache_salt)
    return keys
