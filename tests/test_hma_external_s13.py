"""An external KV load's allocation on a hybrid KV cache (a sliding-window group, then a full-attention one),
ours (emulator.sliding_window, called as emulator.scheduler calls it for a load) against vLLM 0.33's own
KVCacheManager (tests/hma_external_vllm_side_s13.py, run with the CPU venv's python): whether it fits (vLLM's
full_sequence_must_fit gate and allocate_slots with num_external_computed_tokens), each group's null head and
blocks, the free blocks left, and what NIXL moves of each group (get_exchange_clipped_blocks)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from emulator.kv_transfer import ExternalKV
from emulator.memory import KVCacheGroups
from emulator.request import Request
from emulator.sliding_window import NULL, HybridKVCacheManager
from vllm_venv import run_vllm_side, vllm_python_or_skip

VLLM_SIDE = Path(__file__).resolve().parent / "hma_external_vllm_side_s13.py"
BS = 16


def ours(case: dict) -> dict:
    groups = KVCacheGroups(("sliding", "full"), case["window"], 1, case["max_in_flight"])
    kv = HybridKVCacheManager(case["num_blocks"], BS, groups, max_model_len=case["max_model_len"])
    prompt = np.array(case["prompt"])
    if case["prefix"]:
        first = Request("first", case["prefix"], 8, prompt_token_ids=prompt[:case["prefix"]].copy())
        hit, num_hit = kv.get_computed_blocks(first)
        assert kv.allocate_slots(first, first.num_tokens - num_hit, hit, num_hit, False)
        kv.free(first)
    load = Request("load", len(prompt), 8, prompt_token_ids=prompt)
    load.external_kv = ExternalKV(len(prompt), None)
    hit, num_hit = kv.get_computed_blocks(load)
    external = len(prompt) - num_hit
    ok = (kv.can_fit_full_sequence(load, hit, False)
          and kv.can_allocate_reserving(load, external, hit, num_hit, False, 0))
    if ok:
        assert kv.allocate_slots(load, external, hit, num_hit, False, cache=False)
    result = {"hit": num_hit, "ok": ok, "free": kv.num_free_blocks}
    if ok:
        tables = kv.tables[load]
        result["nulls"] = [t.count(NULL) for t in tables]
        result["blocks"] = [len(t) - t.count(NULL) for t in tables]
        result["moved"] = [len(b) for b in kv.loading_blocks(load)]
    return result


def _cases() -> list[dict]:
    rng = np.random.default_rng(13)
    cases = []
    for length, prefix, window in [(100, 0, 128), (130, 0, 128), (1000, 0, 128), (4000, 0, 128), (4000, 2050, 128),
                                   (4000, 2048, 128), (3000, 1000, 512), (700, 0, 4096)]:
        prompt = [int(t) for t in rng.integers(0, 30000, length)]
        first = 2 * -(-prefix // BS) + 1  # (the earlier request's blocks in both groups, and the null block)
        for num_blocks in [n for n in (40, 80, 200, 265, 300, 380, 420, 600) if n > first]:
            cases.append({"num_blocks": num_blocks, "window": window, "max_model_len": 8192, "max_in_flight": 16384,
                          "prompt": prompt, "prefix": prefix})
    return cases


@pytest.mark.vllm
def test_an_external_loads_allocation_equals_vllms():
    python = vllm_python_or_skip()
    cases = _cases()
    answers = run_vllm_side(python, VLLM_SIDE, {"cases": cases})["answers"]
    fitted = refused = hits = 0
    for case, vllm in zip(cases, answers):
        mine = ours(case)
        assert mine == vllm, (len(case["prompt"]), case["prefix"], case["num_blocks"], mine, vllm)
        fitted += vllm["ok"]
        refused += not vllm["ok"]
        hits += vllm["hit"] > 0
    assert fitted and refused and hits  # both sides of the gate, and loads behind a local hit
