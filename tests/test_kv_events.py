"""KV cache events from the emulated block pool (emulator/kv_events.py): what is stored, removed and
cleared, with vLLM's chained block hashes, under prefix hits, KV pressure and resets. The hashes
themselves are checked against vLLM's own functions in test_kv_events_vllm.py."""
from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pytest

from emulator import kv_events
from emulator.block_hash import ensure_block_hashes
from emulator.kv_cache import KVCacheManager
from emulator.kv_events import (AllBlocksCleared, BlockHasher, BlockRemoved, BlockStored, KVEventRecorder,
                                _cbor, external_hash, none_hash_seed)
from emulator.request import Request

BS = 16
HASHER = BlockHasher("sha256")


def tokens(n: int, start: int = 1) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.int64)


def cache_with_events(num_blocks: int = 32, **kw) -> tuple[KVCacheManager, KVEventRecorder]:
    kv = KVCacheManager(num_blocks, BS)
    recorder = KVEventRecorder(HASHER, BS, **kw)
    kv.attach_events(recorder)
    return kv, recorder


def add(recorder: KVEventRecorder, rid: str, prompt: np.ndarray | int, output_len: int = 4,
        output_ids: np.ndarray | None = None) -> Request:
    """A request reaching the engine (what Engine.add_request does)."""
    if isinstance(prompt, int):
        r = Request(rid, prompt, output_len)
    else:
        r = Request(rid, len(prompt), output_len, prompt_token_ids=prompt, output_token_ids=output_ids)
    ensure_block_hashes(r, BS)
    recorder.request_added(r)
    r.prompt_token_ids = r.output_token_ids = None
    return r


def admit(kv: KVCacheManager, r: Request) -> int:
    blocks, hit = kv.get_computed_blocks(r)
    assert kv.allocate_slots(r, r.num_tokens - hit, blocks, hit)
    r.num_computed_tokens = r.num_tokens
    return hit


def vllm_hashes(ids) -> list[int]:
    return [external_hash(h) for h in HASHER.chain([int(t) for t in ids], BS)]


# -- the hash -------------------------------------------------------------------------------------
def test_block_hash_is_sha256_of_the_pickled_parent_tokens_and_extra_keys():
    none_hash = hashlib.sha256(pickle.dumps("vllm-none-hash", protocol=pickle.HIGHEST_PROTOCOL)).digest()
    assert HASHER.none_hash == none_hash
    first = hashlib.sha256(pickle.dumps((none_hash, tuple(range(16)), None), protocol=5)).digest()
    assert HASHER.block_hash(None, range(16)) == first
    second = hashlib.sha256(pickle.dumps((first, tuple(range(16, 32)), None), protocol=5)).digest()
    assert HASHER.chain(list(range(40)), 16) == [first, second]


def test_cbor_encodes_each_type_in_its_shortest_head():
    assert _cbor(None) == b"\xf6"
    assert _cbor(23) == b"\x17" and _cbor(24) == b"\x18\x18" and _cbor(256) == b"\x19\x01\x00"
    assert _cbor(65536) == b"\x1a\x00\x01\x00\x00" and _cbor(1 << 32) == b"\x1b" + (1 << 32).to_bytes(8, "big")
    assert _cbor(-1) == b"\x20" and _cbor(b"ab") == b"\x42ab" and _cbor("é") == b"\x62\xc3\xa9"
    assert _cbor((1, [2], None)) == b"\x83\x01\x81\x02\xf6"


def test_cbor_block_hash_takes_the_fast_path_to_the_same_bytes():
    cbor = BlockHasher("sha256_cbor")
    ids = [0, 23, 24, 255, 256, 65535, 65536, 128255, 2 ** 31 - 1, 5, 6, 7, 8, 9, 10, 11]
    expected = hashlib.sha256(_cbor((cbor.none_hash, tuple(ids), None))).digest()
    assert cbor.block_hash(None, ids) == expected
    assert cbor.block_hash(None, ids, ("salt",)) == hashlib.sha256(_cbor((cbor.none_hash, tuple(ids),
                                                                           ("salt",)))).digest()


def test_none_hash_seed_is_pythonhashseed_else_fixed_for_sha256_and_random_for_xxhash():
    assert none_hash_seed("sha256", "42") == "42" and none_hash_seed("xxhash", "42") == "42"
    assert none_hash_seed("sha256", None) == none_hash_seed("sha256_cbor", None) == "vllm-none-hash"
    assert none_hash_seed("xxhash", None) != none_hash_seed("xxhash", None)
    assert BlockHasher("sha256", "42").none_hash != HASHER.none_hash


def test_xxhash_algorithms_are_xxh3_128_of_the_pickled_or_cbor_block():
    xxhash = pytest.importorskip("xxhash")
    ids = list(range(16))
    plain, cbor = BlockHasher("xxhash", "7"), BlockHasher("xxhash_cbor", "7")
    assert plain.none_hash == xxhash.xxh3_128_digest(pickle.dumps("7", protocol=pickle.HIGHEST_PROTOCOL))
    assert plain.block_hash(None, ids) == xxhash.xxh3_128_digest(
        pickle.dumps((plain.none_hash, tuple(ids), None), protocol=pickle.HIGHEST_PROTOCOL))
    assert cbor.none_hash == xxhash.xxh3_128_digest(_cbor("7"))
    assert cbor.block_hash(None, ids, ("salt",)) == xxhash.xxh3_128_digest(_cbor((cbor.none_hash, tuple(ids),
                                                                                 ("salt",))))


def test_without_the_xxhash_package_its_algorithms_fail_as_vllms_where_a_block_is_hashed(monkeypatch):
    monkeypatch.setattr(kv_events, "_xxhash", None)
    assert not kv_events.hash_algo_available("xxhash_cbor") and kv_events.hash_algo_available("sha256_cbor")
    hasher = BlockHasher("xxhash")  # nothing hashed yet: an engine caching no prefix starts
    with pytest.raises(ModuleNotFoundError, match=r"xxhash is required for the 'xxhash' prefix caching hash "
                                                  r"algorithms. Install it via `pip install xxhash`."):
        hasher.chain(list(range(32)), BS)


@pytest.mark.parametrize("extra", [{}, {"kv_offloading_size": 1}])
def test_an_engine_caching_prefixes_refuses_an_xxhash_algorithm_without_the_package(monkeypatch, extra):
    """vLLM's engine hashes every request's blocks with prefix caching on or a KV connector, so it fails to
    start without xxhash; without either it never hashes, and starts."""
    from emulator.config import ConfigError, EngineArgs
    from profiles.deployment import build_deployment
    monkeypatch.setattr(kv_events, "_xxhash", None)
    with pytest.raises(ConfigError, match="xxhash is required"):
        build_deployment("meta-llama/Llama-3.1-8B", "H100", EngineArgs(prefix_caching_hash_algo="xxhash", **extra))
    args = EngineArgs(prefix_caching_hash_algo="xxhash_cbor", enable_prefix_caching=False, **extra)
    if extra:
        with pytest.raises(ConfigError, match="xxhash is required"):
            build_deployment("meta-llama/Llama-3.1-8B", "H100", args)
    else:
        assert build_deployment("meta-llama/Llama-3.1-8B", "H100", args).config.prefix_caching_hash_algo == \
            "xxhash_cbor"


def test_unknown_hash_algorithm_is_refused_as_vllm_refuses_it():
    with pytest.raises(ValueError, match="Unsupported hash function: md5"):
        BlockHasher("md5")


def test_external_hash_is_the_low_64_bits_or_the_digest():
    digest = bytes(range(32))
    assert external_hash(digest) == int.from_bytes(digest[-8:], "big")
    assert external_hash(digest, as_int=False) == digest


# -- stored ---------------------------------------------------------------------------------------
def test_stored_blocks_carry_vllm_hashes_their_parent_and_token_ids():
    kv, rec = cache_with_events()
    ids = tokens(40)
    r = add(rec, "a", ids)
    admit(kv, r)
    (event,) = rec.take_events()
    assert event == BlockStored(vllm_hashes(ids[:32]), None, ids[:32].tolist(), BS, "GPU", [None, None], 0)
    assert rec.take_events() == []


def test_a_salted_request_stores_its_first_block_with_the_salt_and_shares_nothing_unsalted():
    kv, rec = cache_with_events()
    ids = tokens(40)
    plain = add(rec, "plain", ids)
    admit(kv, plain)
    rec.take_events()
    salted = Request("salted", len(ids), 4, prompt_token_ids=ids, cache_salt="tenant")
    ensure_block_hashes(salted, BS)
    rec.request_added(salted)
    assert admit(kv, salted) == 0  # the same tokens, another salt: no prefix hit
    (event,) = rec.take_events()
    salted_hashes = [external_hash(h) for h in HASHER.chain(ids.tolist(), BS, cache_salt="tenant")]
    assert event == BlockStored(salted_hashes[:2], None, ids[:32].tolist(), BS, "GPU", [("tenant",), None], 0)
    assert not set(salted_hashes) & set(vllm_hashes(ids))


def test_a_block_filled_later_names_the_block_before_it_as_parent():
    kv, rec = cache_with_events()
    ids, out = tokens(40), tokens(20, start=1000)
    r = add(rec, "a", ids, output_len=20, output_ids=out)
    admit(kv, r)
    rec.take_events()
    r.num_tokens += 8  # 8 output tokens sampled: the third block is full once they are computed
    assert kv.allocate_slots(r, 8)
    (event,) = rec.take_events()
    all_ids = np.concatenate([ids, out])
    assert event.block_hashes == vllm_hashes(all_ids[:48])[2:]
    assert event.parent_block_hash == vllm_hashes(ids[:32])[1]
    assert event.token_ids == all_ids[32:48].tolist()


def test_a_prefix_hit_stores_only_the_new_blocks_chained_to_the_hit():
    kv, rec = cache_with_events()
    shared = tokens(32)
    admit(kv, add(rec, "a", np.concatenate([shared, tokens(10, 500)])))
    rec.take_events()
    second = np.concatenate([shared, tokens(20, 900)])
    assert admit(kv, add(rec, "b", second)) == 32
    (event,) = rec.take_events()
    assert event.block_hashes == vllm_hashes(second[:48])[2:]
    assert event.parent_block_hash == vllm_hashes(shared)[1]


def test_synthetic_content_is_stable_per_request_and_matches_no_other():
    kv, rec = cache_with_events()
    admit(kv, add(rec, "a", 40))
    admit(kv, add(rec, "b", 40))
    a, b = rec.take_events()
    assert all(0 <= t < 2 ** 31 for t in a.token_ids + b.token_ids)
    assert a.token_ids != b.token_ids and not set(a.block_hashes) & set(b.block_hashes)
    assert a.block_hashes == vllm_hashes(a.token_ids)
    kv2, rec2 = cache_with_events()
    admit(kv2, add(rec2, "a", 40))  # the same request id elsewhere: the same content
    assert rec2.take_events()[0].token_ids == a.token_ids


def test_output_without_ids_continues_a_known_prompt_with_synthetic_tokens():
    kv, rec = cache_with_events()
    ids = tokens(20)
    r = add(rec, "a", ids, output_len=30)
    admit(kv, r)
    r.num_tokens += 12
    assert kv.allocate_slots(r, 12)
    stored = [t for e in rec.take_events() for t in e.token_ids]
    assert stored[:20] == ids.tolist() and len(stored) == 32


# -- removed and cleared ---------------------------------------------------------------------------
def test_eviction_under_kv_pressure_removes_the_evicted_blocks_vllm_hashes_in_lru_order():
    kv, rec = cache_with_events(num_blocks=5)  # 4 usable blocks
    a_ids = tokens(48)
    a = add(rec, "a", a_ids)
    admit(kv, a)
    kv.free(a)
    rec.take_events()
    b = add(rec, "b", tokens(40, 700))
    admit(kv, b)  # needs 3 blocks: the free one, then a's cached blocks tail first (LRU)
    events = rec.take_events()
    removed = [e.block_hashes[0] for e in events if isinstance(e, BlockRemoved)]
    assert removed == [vllm_hashes(a_ids)[2], vllm_hashes(a_ids)[1]]
    assert all(e.medium == "GPU" for e in events)
    assert isinstance(events[-1], BlockStored)


def test_each_copy_of_a_duplicated_block_is_stored_and_removed():
    kv, rec = cache_with_events(num_blocks=9)
    ids = tokens(33)
    a, b = add(rec, "a", ids), add(rec, "b", ids)
    blocks_a, _ = kv.get_computed_blocks(a)
    blocks_b, _ = kv.get_computed_blocks(b)  # neither is cached yet: both compute the same blocks
    for r, blocks in ((a, blocks_a), (b, blocks_b)):
        assert kv.allocate_slots(r, r.num_tokens, blocks, 0)
    stored = rec.take_events()
    assert [e.block_hashes for e in stored] == [vllm_hashes(ids)] * 2
    kv.free(a)
    kv.free(b)
    admit(kv, add(rec, "c", tokens(120, 5000)))  # takes every free block: all four copies go
    removed = [e.block_hashes[0] for e in rec.take_events() if isinstance(e, BlockRemoved)]
    assert sorted(removed) == sorted(vllm_hashes(ids) * 2)


def test_reset_prefix_cache_clears_all_and_later_reuse_removes_nothing():
    kv, rec = cache_with_events(num_blocks=5)
    a = add(rec, "a", tokens(48))
    admit(kv, a)
    kv.free(a)
    rec.take_events()
    assert kv.reset_prefix_cache()
    assert rec.take_events() == [AllBlocksCleared()]
    admit(kv, add(rec, "b", tokens(48, 300)))
    assert [type(e) for e in rec.take_events()] == [BlockStored]


def test_a_failed_reset_emits_nothing():
    kv, rec = cache_with_events()
    admit(kv, add(rec, "a", tokens(40)))
    rec.take_events()
    assert not kv.reset_prefix_cache()
    assert rec.take_events() == []


def test_a_finished_request_is_forgotten_but_its_blocks_stay_removable():
    kv, rec = cache_with_events(num_blocks=4)
    ids = tokens(48)
    a = add(rec, "a", ids)
    admit(kv, a)
    kv.free(a)
    rec.request_finished(a)
    assert not rec._requests
    rec.take_events()
    admit(kv, add(rec, "b", tokens(40, 900)))
    removed = [e.block_hashes[0] for e in rec.take_events() if isinstance(e, BlockRemoved)]
    assert set(removed) <= set(vllm_hashes(ids)) and removed


def test_bytes_hashes_when_int_hashes_are_off():
    kv, rec = cache_with_events(int_hashes=False)
    ids = tokens(16)
    admit(kv, add(rec, "a", np.concatenate([ids, [7]])))
    (event,) = rec.take_events()
    assert event.block_hashes == HASHER.chain(ids.tolist(), BS)


def test_a_tier_reports_its_own_copies_with_its_medium():
    kv, rec = cache_with_events()
    ids = tokens(40)
    r = add(rec, "a", ids)
    admit(kv, r)
    rec.take_events()
    rec.store(r, 0, 2, "CPU", locality="LOCAL")
    rec.remove(r.block_hashes[0], "CPU")
    stored, removed = rec.take_events()
    assert stored.medium == "CPU" and stored.locality == "LOCAL" and stored.block_hashes == vllm_hashes(ids[:32])
    assert removed == BlockRemoved([vllm_hashes(ids[:16])[0]], "CPU")
    kv.reset_prefix_cache()  # a GPU reset leaves the CPU copy known
    rec.take_events()
    rec.remove(r.block_hashes[1], "CPU")
    assert rec.take_events() == [BlockRemoved([vllm_hashes(ids[:32])[1]], "CPU")]


# -- a whole engine --------------------------------------------------------------------------------
def test_replaying_the_events_rebuilds_the_pools_cached_content(make_simulation):
    """Under KV pressure, preemption and prefix hits, a subscriber that applies every event holds
    exactly the vLLM hashes of the blocks the pool has cached, with the right number of copies."""
    sim = make_simulation(num_blocks=40, async_scheduling=True)
    engine = sim.engines[0]
    rec = KVEventRecorder(HASHER, BS)
    engine.kv.attach_events(rec)
    sim.add_finish_listener(rec.request_finished)
    rng = np.random.default_rng(7)
    prefixes = [rng.integers(0, 128000, 64) for _ in range(3)]
    requests = []
    for i in range(40):
        prompt = np.concatenate([prefixes[i % 3], rng.integers(0, 128000, int(rng.integers(5, 120)))])
        requests.append(Request(f"r{i}", len(prompt), int(rng.integers(1, 60)), arrival_time=i * 0.5,
                                prompt_token_ids=prompt, output_token_ids=rng.integers(0, 128000, 80)))
    index: dict[int, int] = {}
    tokens_of: dict[int, list[int]] = {}

    def apply(events):
        for e in events:
            if isinstance(e, BlockStored):
                chain = HASHER.chain(e.token_ids, BS) if e.parent_block_hash is None else None
                for k, h in enumerate(e.block_hashes):
                    index[h] = index.get(h, 0) + 1
                    tokens_of[h] = e.token_ids[k * BS:(k + 1) * BS]
                if chain is not None:
                    assert [external_hash(c) for c in chain] == e.block_hashes
            elif isinstance(e, BlockRemoved):
                index[e.block_hashes[0]] -= 1
                if not index[e.block_hashes[0]]:
                    del index[e.block_hashes[0]]
            else:
                index.clear()

    sim.add_listener(lambda record: apply(rec.take_events()))
    sim.run(requests)
    apply(rec.take_events())
    pool = engine.kv.pool
    assert pool.num_evictions > 0
    expected: dict[int, int] = {}
    for key, entry in pool.cached.items():
        h = rec._cached["GPU"][key][0]
        expected[external_hash(h)] = 1 if isinstance(entry, int) else len(entry)
    assert index == expected
    assert not rec._requests  # every request ended and was forgotten
