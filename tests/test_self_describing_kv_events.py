"""OffloadingConnector's `self_describing_kv_events` (kv_connector_extra_config): with KV events on, the CPU
tier's BlockStored carries each chunk's block hashes, parent hash, token ids, block size, LoRA and attention
kind, and its BlockRemoved every block hash of the chunks removed (vLLM 0.33's OffloadingEventsTracker,
distributed/kv_transfer/kv_connector/v1/offloading/events.py); without it, the placeholder payload, one per
chunk. The emulator's events here, and byte for byte against vLLM's own tracker where its CPU venv is."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from emulator.cluster import ClusterSpec, build_cluster
from emulator.config import EngineArgs
from emulator.instance import InstanceSpec
from emulator.kv_events import BlockHasher, BlockRemoved, BlockStored, external_hash
from emulator.request import Request
from profiles.deployment import build_deployment
from server.kv_event_wire import BatchEncoder
from server.kv_events import KVEventPublishers, KVEventsConfig, self_describing_kv_events
from vllm_venv import run_vllm_side, vllm_python_or_skip

MODEL = "meta-llama/Llama-3.1-8B"
VLLM_SIDE = Path(__file__).resolve().parent / "self_describing_vllm_side.py"


def offloading_run(self_describing, chunk_tokens: int = 32, n: int = 24):
    """An engine offloading to a small CPU tier in chunks of `chunk_tokens`, KV events captured: (the
    prompts, the CPU tier's events in order)."""
    extra = {"cpu_bytes_to_use": 48 * 2 ** 21, "block_size": chunk_tokens}
    if self_describing is not None:
        extra["self_describing_kv_events"] = self_describing
    config = json.dumps({"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
                         "kv_connector_extra_config": extra})
    d = build_deployment(MODEL, "H100", EngineArgs(max_model_len=4096, num_gpu_blocks_override=400,
                                                   kv_transfer_config=config))
    sim = build_cluster(ClusterSpec((InstanceSpec("i", d, ("m",)),)))
    events = []
    publishers = KVEventPublishers(KVEventsConfig(enable_kv_cache_events=True, endpoint="inproc://self-describing"),
                                   sim, epoch_of=lambda t: t)
    for publisher in publishers.publishers:
        publisher.close()
        publisher.publish = lambda ts, batch: events.extend(e for e in batch if e.medium == "CPU")
    rng = np.random.default_rng(11)
    shared = rng.integers(0, 128_000, 200).tolist()
    prompts = [shared + rng.integers(0, 128_000, int(rng.integers(100, 500))).tolist() for _ in range(n)]
    sim.run([Request(f"r{i}", len(p), 10, arrival_time=i * 0.05, prompt_token_ids=np.array(p), model="m")
             for i, p in enumerate(prompts)])
    publishers.close()
    return prompts, events


def chunks_of(prompts: list[list[int]], k: int) -> dict:
    """vLLM's hash (as events carry it) of each chunk's first block -> (prompt, chunk index, its hashes)."""
    hasher, out = BlockHasher("sha256"), {}
    for p, prompt in enumerate(prompts):
        hashes = [external_hash(h) for h in hasher.chain(prompt, 16)]
        for c in range(len(hashes) // k):
            out[hashes[c * k]] = (p, c, hashes[max(c * k - 1, 0):c * k + k] if c else [None, *hashes[:k]])
    return out


def test_the_key_is_read_as_vllm_reads_it():
    chunked = {"kv_connector": "OffloadingConnector", "kv_connector_extra_config": {"self_describing_kv_events": 1}}
    assert self_describing_kv_events(chunked)
    assert not self_describing_kv_events({**chunked, "kv_connector_extra_config": {"self_describing_kv_events": ""}})
    assert not self_describing_kv_events({"kv_connector": "OffloadingConnector"})
    assert not self_describing_kv_events(None)
    multi = {"kv_connector": "MultiConnector", "kv_connector_extra_config": {"connectors": [
        {"kv_connector": "NixlConnector", "kv_connector_extra_config": {"self_describing_kv_events": True}}, chunked]}}
    assert self_describing_kv_events(multi)


def test_self_describing_chunks_carry_their_blocks_parent_tokens_and_block_size():
    prompts, events = offloading_run(True)
    chunks = chunks_of(prompts, 2)
    stored = [e for e in events if isinstance(e, BlockStored)]
    removed = [e for e in events if isinstance(e, BlockRemoved)]
    assert stored and removed
    held: dict = {}
    for event in events:
        if isinstance(event, BlockStored):
            p, c, with_parent = chunks[event.block_hashes[0]]
            assert event.block_hashes == with_parent[1:] and event.parent_block_hash == with_parent[0]
            assert event.token_ids == prompts[p][c * 32:c * 32 + 32] and event.block_size == 16
            assert (event.kv_cache_spec_kind, event.extra_keys, event.lora_id, event.group_idx) == \
                ("full_attention", None, None, 0)
            assert event.block_hashes[0] not in held
            held[event.block_hashes[0]] = event.block_hashes
        else:  # every block hash of each chunk it removes, chunk after chunk
            hashes = event.block_hashes
            assert len(hashes) % 2 == 0
            for i in range(0, len(hashes), 2):
                assert held.pop(hashes[i]) == hashes[i:i + 2]


def test_without_the_key_each_chunk_is_the_placeholder_of_its_key():
    prompts, events = offloading_run(None)
    last_blocks = {hashes[-1]: first for first, (_, _, hashes) in chunks_of(prompts, 2).items()}
    stored = [e for e in events if isinstance(e, BlockStored)]
    assert stored and any(isinstance(e, BlockRemoved) for e in events)
    for event in stored:  # one per chunk, named by its last block's hash
        assert event.block_hashes[0] in last_blocks and len(event.block_hashes) == 1
        assert (event.parent_block_hash, event.token_ids, event.block_size, event.kv_cache_spec_kind) == \
            (None, [], 0, None)
    assert all(h in last_blocks for e in events if isinstance(e, BlockRemoved) for h in e.block_hashes)


@pytest.mark.vllm
def test_each_offload_event_encodes_to_the_bytes_of_vllms_tracker():
    """Our CPU events, each in a batch, against vLLM's OffloadingEventsTracker fed the same requests and
    chunks (record_store, then the manager's stored and removed OffloadingEvents), encoded by msgspec; chunks
    of one block and of two."""
    python = vllm_python_or_skip("msgspec")
    runs, encoder = [], BatchEncoder()
    for k in (1, 2):
        prompts, events = offloading_run(True, 16 * k)
        chunks = chunks_of(prompts, k)
        jobs = [{"removed": isinstance(event, BlockRemoved), "ours": encoder.encode(0.0, [event], 0).hex(),
                 "chunks": [chunks[h][:2] for h in event.block_hashes[::k]]}  # the chunks it names, by first block
                for event in events]
        runs.append({"prompts": prompts, "k": k, "events": jobs})
    answers = run_vllm_side(python, VLLM_SIDE, {"runs": runs})["runs"]
    for run, answer in zip(runs, answers):
        assert answer["compared"] == len(run["events"]) > 10
        assert answer["mismatches"] == [], run["k"]
