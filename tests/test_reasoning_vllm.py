"""The emulator's reading of a thinking reply (server/reasoning.py) against vLLM 0.33's own reasoning parsers
(the CPU venv, run as a subprocess; skipped without it): for replies the emulator plans with Qwen3's tokenizer
(stopped on EOS, cut inside the reasoning by max_tokens, a thinking_token_budget), each simulated parser's
message fields (with include_reasoning on and off, enable_thinking off for Qwen3), reasoning token count and
stream deltas, chunk by chunk for several chunk sizes, equal vLLM's; and the names vLLM registers are those
the emulator accepts."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from profiles.tokenizer import load_tokenizer
from server.generation import OutputPlanner, StopRules
from server.protocol import ChatCompletionRequest
from server.reasoning import REASONING_FORMATS, REGISTERED, ChatReasoning
from vllm_venv import run_vllm_side, vllm_python_or_skip

pytestmark = pytest.mark.vllm

VLLM_SIDE = Path(__file__).resolve().parent / "reasoning_vllm_side.py"
CHUNKINGS = (1, 2, 3, 4, 7, 1000)


def _serving(parser: str, tokenizer):
    options = SimpleNamespace(reasoning_parser=parser, default_chat_template_kwargs={})
    return SimpleNamespace(options=options, tokenizer_for=lambda model: tokenizer)


def _case(parser: str, tokenizer, body: dict, max_tokens: int, seed: int, ignore_eos: bool = False):
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                **body})
    reasoning = ChatReasoning(_serving(parser, tokenizer), req)
    planner = OutputPlanner(tokenizer.output_pool, tokenizer.eos_token_id, 0, tokenizer.reply_start_pool)
    plan = planner.plan(max_tokens, StopRules(ignore_eos=ignore_eos, thinking=reasoning.thinking),
                        np.random.default_rng(seed), reply=True)
    return req, reasoning, plan


def _emulated(reasoning: ChatReasoning, plan, sizes: list[int]) -> list:
    """The deltas chat.py's ChatFormat writes for these chunks ({} for a last chunk with nothing to say)."""
    stream = reasoning.stream(plan)
    out, at = [], 0
    for size in sizes:
        ids, pieces = plan.token_ids[at:at + size].tolist(), plan.pieces[at:at + size]
        out.append(stream.delta(ids, pieces) if stream is not None else {"content": "".join(pieces)})
        at += size
    return out


def _sizes(length: int, size: int) -> list[int]:
    return [min(size, length - at) for at in range(0, length, size)]


def test_the_simulated_parsers_split_replies_as_vllms_own():
    python = vllm_python_or_skip()
    tokenizer = load_tokenizer("Qwen/Qwen3-32B")
    variants = [({}, 200, 1, False), ({}, 200, 2, False), ({}, 9, 3, False), ({}, 40, 4, True),
                ({"thinking_token_budget": 5}, 60, 5, True), ({"include_reasoning": False}, 200, 6, False),
                ({"include_reasoning": False}, 7, 7, False)]
    cases, ours = [], []
    for parser in sorted(REASONING_FORMATS):
        parser_variants = variants + ([({"chat_template_kwargs": {"enable_thinking": False}}, 50, 8, False)]
                                      if parser == "qwen3" else [])
        for body, max_tokens, seed, ignore_eos in parser_variants:
            req, reasoning, plan = _case(parser, tokenizer, body, max_tokens, seed, ignore_eos)
            assert plan.thinks == (reasoning.thinking is not None)
            ids = plan.token_ids.tolist()
            chunkings = [_sizes(len(ids), size) for size in CHUNKINGS]
            cases.append({"parser": parser, "chat_template_kwargs": req.chat_template_kwargs or {},
                          "include_reasoning": req.include_reasoning, "token_ids": ids, "pieces": plan.pieces,
                          "chunkings": chunkings})
            fields = reasoning.fields(plan, "".join(plan.pieces))
            ours.append({"reasoning": fields[0], "content": fields[1],
                         "reasoning_tokens": reasoning.tokens(plan, len(ids)),
                         "streams": [_emulated(reasoning, plan, sizes) for sizes in chunkings]})
    answer = run_vllm_side(python, VLLM_SIDE, {"cases": cases})
    assert sorted(REGISTERED) == answer["registered"]
    theirs = answer["cases"]
    for case, mine, vllm in zip(cases, ours, theirs):
        label = (case["parser"], case["chat_template_kwargs"], case["include_reasoning"], len(case["token_ids"]))
        assert mine["reasoning"] == vllm["reasoning"], label
        assert mine["content"] == vllm["content"], label
        assert mine["reasoning_tokens"] == vllm["reasoning_tokens"], label
        for sizes, my_stream, their_stream in zip(case["chunkings"], mine["streams"], vllm["streams"]):
            assert my_stream == their_stream, (label, sizes[0])
