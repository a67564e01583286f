"""Chained block hashes: the keys of the prefix cache (vLLM `hash_block_tokens`)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from emulator.block_hash import request_block_hashes
from emulator.request import Request

BS = 16


def tokens(n: int, start: int = 1) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.int64)


def hashes(prompt: np.ndarray | None, output_len: int = 1, rid: str = "r", num_prompt: int | None = None,
           output_ids: np.ndarray | None = None) -> list[int]:
    n = len(prompt) if prompt is not None else num_prompt
    request = Request(rid, n, output_len, prompt_token_ids=prompt, output_token_ids=output_ids)
    return request_block_hashes(request, BS)


def test_one_hash_per_full_block_of_prompt_and_output():
    assert len(hashes(tokens(40), output_len=10)) == (40 + 10) // BS


def test_equal_prefixes_give_equal_hashes():
    a = hashes(tokens(64), rid="a")
    b = hashes(np.concatenate([tokens(48), tokens(16, start=1000)]), rid="b")
    assert a[:3] == b[:3]
    assert a[3] != b[3]


def test_hash_chains_over_the_whole_prefix():
    """The same block content after a different first block hashes differently."""
    a = hashes(np.concatenate([tokens(16, start=1), tokens(16, start=500)]), rid="a")
    b = hashes(np.concatenate([tokens(16, start=100), tokens(16, start=500)]), rid="b")
    assert a[0] != b[0]
    assert a[1] != b[1]


def test_requests_without_token_ids_never_share_blocks():
    a = hashes(None, num_prompt=64, rid="a")
    b = hashes(None, num_prompt=64, rid="b")
    assert not set(a) & set(b)


def test_same_request_id_gives_same_synthetic_hashes():
    """What lets a preempted request hit its own blocks again."""
    assert hashes(None, num_prompt=64, rid="a") == hashes(None, num_prompt=64, rid="a")


def test_synthetic_output_never_matches_a_real_prompt():
    """A request's unknown output must not collide with another prompt that continues the same text."""
    first = hashes(tokens(32), output_len=16, rid="a")
    follow_up = hashes(tokens(48), rid="b")
    assert first[:2] == follow_up[:2]
    assert first[2] != follow_up[2]


def test_known_output_ids_match_the_next_turn_prompt():
    """With output_tok_ids (LLMServingSim traces) a follow-up turn hits the previous answer too."""
    prompt, answer = tokens(32), tokens(16, start=7000)
    first = hashes(prompt, output_len=16, rid="a", output_ids=answer)
    follow_up = hashes(np.concatenate([prompt, answer, tokens(16, start=9000)]), rid="b")
    assert first == follow_up[:3]


def test_hashes_are_stable_across_processes():
    """Replays are byte-identical run to run, so hashes must not depend on PYTHONHASHSEED."""
    code = ("from emulator.block_hash import request_block_hashes; from emulator.request import Request; "
            "print(request_block_hashes(Request('stable', 40, 8), 16))")
    repo = Path(__file__).resolve().parents[1]
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(runs) == 1
    assert runs.pop().strip() == str(hashes(None, output_len=8, rid="stable", num_prompt=40))


def test_request_shorter_than_one_block_has_no_hashes():
    """Once a crash: a 5 + 3 token request without token ids has no full block to hash."""
    assert hashes(None, output_len=3, num_prompt=5) == []
