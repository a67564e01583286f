"""BlockStored's cache-spec and lookahead fields as vLLM 0.33 fills them for the emulated models: vLLM's
KVCacheManager.take_events annotates each event with its group's kind and sliding window
(get_kv_cache_spec_kind, get_kv_cache_spec_sliding_window: a window only for a SlidingWindowSpec group), and the
block pool fills lookahead_token_ids only when blocks are hashed with lookahead tokens (EAGLE-style speculative
decoding with prefix caching and no KV connector, VllmConfig.num_hash_lookahead_tokens), else None. The emulated
cache is one full-attention (or MLA) group without speculative decoding: "full_attention" (or "mla_attention"),
no window, no lookahead, the last two left out of the wire as vLLM leaves them (omit_defaults). Checked against
vLLM's own KVCacheManager by the vllm-marked test."""
from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np
import pytest

from emulator.block_hash import ensure_block_hashes
from emulator.kv_cache import KVCacheManager
from emulator.kv_events import FULL_ATTENTION, MLA_ATTENTION, BlockHasher, KVEventRecorder
from emulator.request import Request
from server.kv_event_wire import wire_event
from vllm_venv import run_vllm_side, vllm_python_or_skip

BS = 16
VLLM_SIDE = Path(__file__).resolve().parent / "kv_event_spec_vllm_side.py"


def stored_payload(spec_kind: str, prompt: list[int]) -> bytes:
    """Our wire bytes of the BlockStored that caching `prompt` publishes, on a cache of `spec_kind`."""
    kv = KVCacheManager(64, BS)
    recorder = KVEventRecorder(BlockHasher("sha256"), BS, spec_kind=spec_kind)
    kv.attach_events(recorder)
    request = Request("r", len(prompt), 1, prompt_token_ids=np.asarray(prompt, dtype=np.int64))
    ensure_block_hashes(request, BS)
    recorder.request_added(request)
    assert kv.allocate_slots(request, request.num_tokens, [], 0)
    kv.cache_blocks(request, request.num_tokens)
    (event,) = recorder.take_events()
    return msgspec.msgpack.Encoder().encode(wire_event(event))


@pytest.mark.parametrize("kind", [FULL_ATTENTION, MLA_ATTENTION])
def test_a_full_attention_or_mla_group_sends_no_window_and_no_lookahead(kind):
    event = msgspec.msgpack.decode(stored_payload(kind, list(range(1, 41))))
    assert event["kv_cache_spec_kind"] == kind and event["group_idx"] == 0
    assert "kv_cache_spec_sliding_window" not in event and "lookahead_token_ids" not in event


@pytest.mark.vllm
def test_the_fields_are_the_ones_vllms_kv_cache_manager_publishes():
    python = vllm_python_or_skip("msgspec", "torch")
    prompt = list(range(100, 150))  # 3 full blocks
    cases = [{"spec": spec, "block_size": BS, "prompt": prompt,
              "ours": stored_payload(kind, prompt).hex()} for spec, kind in (("full", FULL_ATTENTION),
                                                                              ("mla", MLA_ATTENTION))]
    sliding = {"spec": "sliding", "block_size": BS, "prompt": prompt, "ours": cases[0]["ours"]}
    full, mla, window = run_vllm_side(python, VLLM_SIDE, {"job": "fields", "cases": [*cases, sliding]})["answers"]
    for answer, kind in ((full, FULL_ATTENTION), (mla, MLA_ATTENTION)):
        assert answer["same_bytes"], (answer["vllm"], answer["ours"])
        assert answer["vllm"]["kv_cache_spec_kind"] == kind
        assert answer["vllm"]["kv_cache_spec_sliding_window"] is None and answer["vllm"]["lookahead_token_ids"] is None
    # what a sliding-window group would send instead (no emulated model's cache is one)
    assert (window["vllm"]["kv_cache_spec_kind"], window["vllm"]["kv_cache_spec_sliding_window"]) == \
        ("sliding_window", 128)
    assert not window["same_bytes"]
