"""gpt-oss's Harmony replies (server/harmony.py): the planned layout over the engine's tokens, and how vLLM's
HarmonyParser reads it back (whole, streamed, cut), with no server."""
from __future__ import annotations

import json

import numpy as np

from profiles.tokenizer import load_tokenizer
from server.generation import OutputPlanner, StopRules
from server.harmony import (O200K_HARMONY, HarmonyReply, HarmonyStream, check_effort, harmony_tokens, parse,
                            parser_error, planned)
from server.errors import APIError
from server.structured import Constraint, StructuredText

TOKENIZER = load_tokenizer(None, "gpt_oss")  # (gpt-oss is counted with Llama 3's tokenizer by default)
TOKENS = harmony_tokens(TOKENIZER)
MESSAGE, END = O200K_HARMONY["<|message|>"], O200K_HARMONY["<|end|>"]
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def _planner() -> OutputPlanner:
    """The words of Llama 3's tokenizer, the EOS gpt-oss's own (<|return|>), as the server plans a gpt-oss reply."""
    return OutputPlanner(TOKENIZER.output_pool, TOKENS.eos, 0, TOKENIZER.reply_start_pool)


def _arguments() -> StructuredText:
    return StructuredText(Constraint("json", SCHEMA), TOKENIZER, [t for _, t in TOKENIZER.output_pool])


def _plan(reply: HarmonyReply, max_tokens: int, seed: int, **rules):
    return _planner().plan(max_tokens, StopRules(structure=planned(reply), **rules), np.random.default_rng(seed),
                           reply=True)


def test_the_markers_are_o200k_harmony_ids_where_the_tokenizer_has_none():
    assert TOKENS.ids == O200K_HARMONY
    assert TOKENS.ids["<|channel|>"] == 200005 and TOKENS.ids["<|message|>"] == 200008


def test_a_reply_keeps_the_drawn_length_and_lays_out_analysis_then_final():
    for seed in range(10):
        plain = _planner().plan(500, StopRules(), np.random.default_rng(seed), reply=True)
        plan = _plan(HarmonyReply(TOKENS), 500, seed)
        assert plan.length == plain.length and plan.ends_with_stop == plain.ends_with_stop
        ids = plan.token_ids.tolist()
        assert ids[0] == O200K_HARMONY["<|channel|>"] and O200K_HARMONY["<|end|>"] in ids
        parsed = parse(TOKENS, ids, plan.pieces, reasoning=True, tools=True)
        assert [m.channel for m in parsed.messages] == ["analysis", "final"]
        assert parsed.reasoning and parsed.content and not parsed.calls and not parsed.flushed
        first, end = ids.index(MESSAGE), ids.index(END)
        assert parsed.reasoning_tokens == end - first - 1  # the analysis message's content tokens
        assert parsed.reasoning == "".join(plan.pieces[first + 1:end])
        assert parsed.content == "".join(plan.pieces[ids.index(MESSAGE, end) + 1:])  # (the EOS adds no text)


def test_a_forced_call_is_one_call_on_commentary_its_arguments_counted_as_reasoning():
    plan = _plan(HarmonyReply(TOKENS, calls=(("get_weather", _arguments()),)), 2000, 3, ignore_eos=False)
    parsed = parse(TOKENS, plan.token_ids.tolist(), plan.pieces, reasoning=True, tools=True)
    assert [(m.channel, m.recipient, m.content_type) for m in parsed.messages] == [
        ("analysis", None, None), ("commentary", "functions.get_weather", "json")]
    (name, arguments), = parsed.calls
    assert name == "get_weather" and arguments == json.dumps(json.loads(parsed.messages[1].text))
    assert parsed.content is None
    ids = plan.token_ids.tolist()
    first, end = ids.index(MESSAGE), ids.index(END)
    call = ids.index(MESSAGE, end)
    assert plan.ends_with_stop  # the arguments' tokens, up to the EOS, count as reasoning too (vLLM's count)
    assert parsed.reasoning_tokens == (end - first - 1) + (len(ids) - 1 - call - 1)
    no_tools = parse(TOKENS, plan.token_ids.tolist(), plan.pieces, reasoning=True, tools=False)
    assert no_tools.calls == [] and no_tools.content is None  # without the tool parser the call is dropped


def test_without_a_reasoning_parser_the_analysis_is_dropped():
    plan = _plan(HarmonyReply(TOKENS), 500, 4)
    parsed = parse(TOKENS, plan.token_ids.tolist(), plan.pieces, reasoning=False, tools=True)
    assert parsed.reasoning is None and parsed.content


def test_an_output_cut_in_a_header_is_recovered_as_final_content_with_its_markup():
    plan = _plan(HarmonyReply(TOKENS), 500, 5, ignore_eos=True)
    ids = plan.token_ids.tolist()
    start = ids.index(O200K_HARMONY["<|start|>"])
    cut = parse(TOKENS, ids[:start + 3], plan.pieces[:start + 3], reasoning=True, tools=True)
    assert cut.content == "<|start|>assistant<|channel|>" and cut.flushed
    inside = parse(TOKENS, ids[:start - 3], plan.pieces[:start - 3], reasoning=True, tools=True)
    assert inside.content is None and inside.reasoning and inside.flushed


def test_streamed_deltas_add_up_to_the_whole_reading():
    plan = _plan(HarmonyReply(TOKENS, calls=(("get_weather", _arguments()),)), 2000, 6)
    ids, pieces = plan.token_ids.tolist(), plan.pieces
    whole = parse(TOKENS, ids, pieces, reasoning=True, tools=True)
    stream = HarmonyStream(TOKENS, True, True, True, lambda: "chatcmpl-tool-0")
    deltas = [stream.delta(ids[k:k + 3], pieces[k:k + 3], k + 3 >= len(ids)) for k in range(0, len(ids), 3)]
    said = [d for d in deltas if d is not None]
    assert "".join(d.get("reasoning", "") for d in said) == whole.reasoning
    calls = [c for d in said for c in d.get("tool_calls", ())]
    assert calls[0]["id"] == "chatcmpl-tool-0" and calls[0]["function"]["name"] == "get_weather"
    assert all("id" not in c and c["index"] == 0 for c in calls[1:])
    assert json.loads("".join(c["function"]["arguments"] for c in calls)) == json.loads(whole.calls[0][1])
    assert stream.reasoning_tokens == whole.reasoning_tokens
    hidden = HarmonyStream(TOKENS, True, True, False, lambda: "x")
    assert all(d is None or (d["reasoning"] is None and d.get("tool_calls"))
               for d in (hidden.delta(ids[k:k + 3], pieces[k:k + 3], False) for k in range(0, len(ids), 3)))


def test_vllms_refusals():
    try:
        check_effort("none", chat=True)
    except APIError as error:
        assert error.message.startswith("Harmony does not support reasoning_effort='none'")
    for effort in ("none", "minimal", "xhigh"):
        try:
            check_effort(effort, chat=False)
            raise AssertionError(effort)
        except APIError as error:
            assert f"reasoning_effort={effort!r} is not supported by Harmony. Supported values are: high, medium, " \
                   "low." in error.message and error.param == "reasoning_effort"
    check_effort("low", chat=True)
    assert parser_error("openai_gptoss", "openai", "openai/gpt-oss-120b") is None
    assert parser_error("qwen3", None, "openai/gpt-oss-120b") == (
        "--reasoning-parser qwen3 cannot be used with the tokenizer of 'openai/gpt-oss-120b': Harmony requires "
        "GptOssReasoningParser, got Qwen3ParserReasoningAdapter.")
