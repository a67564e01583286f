"""--reasoning-parser (server/reasoning.py): a thinking reply's layout over the engine's tokens (generation.py)
and how chat and the Messages API present it; vLLM's own parsers are compared in test_reasoning_vllm.py."""
from __future__ import annotations

import json
import logging

import aiohttp
import numpy as np
import pytest

from profiles.tokenizer import load_tokenizer
from server.generation import OutputPlanner, StopRules
from server.reasoning import reasoning_markup
from server.testing import running_server

QWEN = ("--model", "Qwen/Qwen3-32B", "--max-model-len", "8192", "--speed", "1000")
HI = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1100, "seed": 5}


def _planner(tokenizer) -> OutputPlanner:
    return OutputPlanner(tokenizer.output_pool, tokenizer.eos_token_id, 0, tokenizer.reply_start_pool)


def test_a_thinking_reply_keeps_the_drawn_length_and_lays_out_markup_reasoning_then_answer():
    tokenizer = load_tokenizer("Qwen/Qwen3-32B")
    plan = reasoning_markup("qwen3", tokenizer).plan
    planner = _planner(tokenizer)
    for seed in range(20):
        plain = planner.plan(500, StopRules(), np.random.default_rng(seed), reply=True)
        thought = planner.plan(500, StopRules(thinking=plan), np.random.default_rng(seed), reply=True)
        assert thought.thinks and not plain.thinks
        assert thought.length == plain.length and thought.ends_with_stop == plain.ends_with_stop
        text = "".join(thought.pieces)
        assert text.startswith("<think>\n") and "\n</think>\n\n" in text
        end = thought.pieces.index("</think>")
        words = thought.length - 1 - 5  # before EOS, less <think>, two newlines, </think> and a blank line
        answer = thought.length - 1 - (end + 2)
        assert answer == max(1, words // 4) and end - 3 == words - answer  # a quarter of the words answer
        assert thought.token_ids[-1] == tokenizer.eos_token_id


def test_a_reply_cut_by_max_tokens_ends_inside_its_reasoning_and_a_budget_ends_the_thinking():
    tokenizer = load_tokenizer("Qwen/Qwen3-32B")
    plan = reasoning_markup("deepseek_r1", tokenizer).plan
    planner = _planner(tokenizer)
    cut = planner.plan(6, StopRules(thinking=plan), np.random.default_rng(1), reply=True)
    assert cut.length == 6 and not cut.ends_with_stop and "</think>" not in cut.pieces
    budgeted = planner.plan(200, StopRules(ignore_eos=True, thinking=plan.__class__(**{**plan.__dict__, "budget": 4})),
                            np.random.default_rng(1), reply=True)
    assert budgeted.length == 200
    assert budgeted.pieces.index("</think>") == 1 + 4  # <think> and 4 thinking tokens


def test_the_markers_must_be_tokens_of_the_tokenizer():
    assert reasoning_markup("qwen3", load_tokenizer("meta-llama/Llama-3.1-8B")) is None  # no <think> token
    assert reasoning_markup("glm45", load_tokenizer("Qwen/Qwen3-32B")) is None  # markup not simulated
    assert reasoning_markup("step5", load_tokenizer("Qwen/Qwen3-32B")) is not None


async def _post(http, server, path: str, body: dict):
    async with http.post(server.url + path, json=body) as r:
        return r.status, (await r.json() if not body.get("stream") else await r.text())


def _chunks(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


async def test_chat_answers_with_reasoning_then_content_streamed_and_not():
    async with running_server(*QWEN) as plain_server, running_server(*QWEN, "--reasoning-parser", "qwen3") as server:
        async with aiohttp.ClientSession() as http:
            _, plain = await _post(http, plain_server, "/v1/chat/completions", HI)
            status, full = await _post(http, server, "/v1/chat/completions", HI)
            assert status == 200, full
            message, usage = full["choices"][0]["message"], full["usage"]
            assert plain["choices"][0]["message"]["reasoning"] is None
            assert plain["usage"]["completion_tokens_details"] is None
            # the same tokens (the timing is the same), read as reasoning then answer
            assert usage["completion_tokens"] == plain["usage"]["completion_tokens"]
            assert message["reasoning"].startswith("\n") and message["content"].startswith("\n\n")
            assert "<think>" not in message["reasoning"] + message["content"]
            assert 0 < usage["completion_tokens_details"]["reasoning_tokens"] < usage["completion_tokens"]
            _, text = await _post(http, server, "/v1/chat/completions",
                                  {**HI, "stream": True, "stream_options": {"include_usage": True}})
            chunks = _chunks(text)
            deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
            kinds = [k for d in deltas[1:] for k in d if d[k]]
            assert kinds == sorted(kinds, key=lambda k: k != "reasoning")  # all reasoning first, then content
            assert "".join(d.get("reasoning") or "" for d in deltas) == message["reasoning"]
            assert "".join(d.get("content") or "" for d in deltas) == message["content"]
            assert chunks[-1]["usage"]["completion_tokens_details"] == usage["completion_tokens_details"]


async def test_include_reasoning_false_and_thinking_off_and_a_thinking_budget():
    async with running_server(*QWEN, "--reasoning-parser", "qwen3") as server:
        async with aiohttp.ClientSession() as http:
            _, full = await _post(http, server, "/v1/chat/completions", HI)
            _, hidden = await _post(http, server, "/v1/chat/completions",
                                    {**HI, "include_reasoning": False, "return_token_ids": True, "logprobs": True})
            choice = hidden["choices"][0]
            assert choice["message"]["reasoning"] is None
            assert choice["message"]["content"] == full["choices"][0]["message"]["content"]
            assert choice["token_ids"] is None and choice["logprobs"] is None  # they would show the reasoning
            _, text = await _post(http, server, "/v1/chat/completions",
                                  {**HI, "include_reasoning": False, "stream": True, "return_token_ids": True})
            deltas = [c["choices"][0] for c in _chunks(text)]
            assert not any(d["delta"].get("reasoning") for d in deltas)
            assert all(d.get("token_ids") is None for d in deltas)
            _, off = await _post(http, server, "/v1/chat/completions",
                                 {**HI, "chat_template_kwargs": {"enable_thinking": False}})
            assert off["choices"][0]["message"]["reasoning"] is None
            assert "think>" not in off["choices"][0]["message"]["content"]
            assert off["usage"]["completion_tokens_details"] == {"reasoning_tokens": 0}
            _, budget = await _post(http, server, "/v1/chat/completions", {**HI, "thinking_token_budget": 6})
            assert budget["usage"]["completion_tokens_details"] == {"reasoning_tokens": 6}
            _, short = await _post(http, server, "/v1/chat/completions", {**HI, "max_tokens": 5})
            assert short["choices"][0]["finish_reason"] == "length"
            assert short["choices"][0]["message"]["content"] is None and short["choices"][0]["message"]["reasoning"]


async def test_messages_get_a_thinking_block_before_the_text():
    async with running_server(*QWEN, "--reasoning-parser", "deepseek_r1") as server:
        async with aiohttp.ClientSession() as http:
            body = {**HI, "model": "Qwen/Qwen3-32B"}
            status, message = await _post(http, server, "/v1/messages", body)
            assert status == 200, message
            thinking, text = message["content"]
            assert thinking["type"] == "thinking" and thinking["thinking"].startswith("\n")
            assert len(thinking["signature"]) == 32 and text["type"] == "text" and text["text"].startswith("\n\n")
            _, stream = await _post(http, server, "/v1/messages", {**body, "stream": True})
            events = [json.loads(line[6:]) for line in stream.splitlines() if line.startswith("data: ")]
            starts = [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"]
            assert starts == ["thinking", "text"]
            deltas = [e["delta"] for e in events if e["type"] == "content_block_delta"]
            streamed = "".join(d.get("thinking", "") for d in deltas)  # (no seed in Messages: another reply)
            assert streamed.startswith("\n") and streamed.endswith("\n")
            assert "".join(d.get("text", "") for d in deltas).startswith("\n\n")
            signature = [i for i, d in enumerate(deltas) if d["type"] == "signature_delta"]
            assert len(signature) == 1 and deltas[signature[0] + 1]["type"] == "text_delta"
            _, disabled = await _post(http, server, "/v1/messages", {**body, "thinking": {"type": "disabled"}})
            assert disabled["content"][0]["type"] == "thinking"  # DeepSeek-R1's parser thinks whatever the template


async def test_a_parser_whose_markup_is_not_simulated_is_named_at_start_up(caplog):
    caplog.set_level(logging.WARNING, "vllm_emulator.server")
    async with running_server("--speed", "1000", "--reasoning-parser", "glm45") as server:
        async with aiohttp.ClientSession() as http:
            _, full = await _post(http, server, "/v1/chat/completions", {**HI, "max_tokens": 5})
    assert full["choices"][0]["message"]["reasoning"] is None
    assert full["usage"]["completion_tokens_details"] == {"reasoning_tokens": 0}
    assert any("--reasoning-parser glm45: its output markup is not simulated" in r.getMessage() for r in caplog.records)
    caplog.clear()
    async with running_server("--speed", "1000", "--reasoning-parser", "qwen3"):
        pass
    assert any("has no <think>/</think> tokens" in r.getMessage() for r in caplog.records)


async def test_responses_get_a_reasoning_item_before_the_message():
    async with running_server(*QWEN, "--reasoning-parser", "qwen3") as server:
        async with aiohttp.ClientSession() as http:
            body = {"input": "hi", "max_output_tokens": 1100, "model": "Qwen/Qwen3-32B"}
            status, full = await _post(http, server, "/v1/responses", body)
            assert status == 200, full
            reasoning, message = full["output"]
            assert reasoning["type"] == "reasoning" and reasoning["id"].startswith("rs_")
            assert reasoning["content"][0]["type"] == "reasoning_text" and reasoning["status"] is None
            assert message["type"] == "message" and message["content"][0]["text"].startswith("\n\n")
            assert 0 < full["usage"]["output_tokens_details"]["reasoning_tokens"] < full["usage"]["output_tokens"]
            _, text = await _post(http, server, "/v1/responses", {**body, "stream": True})
            events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
            assert [e["sequence_number"] for e in events] == list(range(len(events)))
            kinds = [e["type"] for e in events]
            first_text = kinds.index("response.output_text.delta")
            assert "response.reasoning_text.delta" not in kinds[first_text:]
            added = [(e["item"]["type"], e["output_index"]) for e in events
                     if e["type"] == "response.output_item.added"]
            assert added == [("reasoning", 0), ("message", 1)]
            done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
            assert events[-1]["response"]["output"] == done
            streamed = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
            assert done[0]["content"][0]["text"] == streamed and done[0]["status"] == "completed"
            _, hidden = await _post(http, server, "/v1/responses", {**body, "include_reasoning": False})
            assert [item["type"] for item in hidden["output"]] == ["message"]
            _, cut = await _post(http, server, "/v1/responses", {**body, "max_output_tokens": 5})
            assert [item["type"] for item in cut["output"]] == ["reasoning"] and cut["status"] == "incomplete"


async def test_an_assistant_turn_sent_back_with_the_deprecated_reasoning_content_renders_its_reasoning():
    async with running_server(*QWEN) as server:
        async with aiohttp.ClientSession() as http:
            counts = []
            for field in ("reasoning", "reasoning_content", None):
                turn = {"role": "assistant", "content": "Yes."} | ({field: "Let me see."} if field else {})
                status, body = await _post(http, server, "/tokenize", {
                    "model": "Qwen/Qwen3-32B", "messages": [{"role": "user", "content": "hi"}, turn],
                    "add_generation_prompt": False})
                assert status == 200, body
                counts.append(body["count"])
    assert counts[0] == counts[1] > counts[2]


def test_the_parser_name_is_read_as_vllm_reads_it():
    from server.serving import frontend_switches
    from server.testing import serve_args
    assert frontend_switches(serve_args("--reasoning-parser", "None"))["reasoning_parser"] is None
    assert frontend_switches(serve_args("--reasoning-parser", "None"))["reasoning"] is False
    assert frontend_switches(serve_args("--reasoning-parser", "step5"))["reasoning_parser"] == "step5"
    with pytest.raises(ValueError) as refused:  # vLLM's validate_api_server_args, its registered names sorted
        frontend_switches(serve_args("--reasoning-parser", "bogus"))
    assert str(refused.value).startswith("invalid reasoning parser: bogus (chose from { beam,cohere_command3,")
    assert str(refused.value).endswith(",qwen3,seed_oss,step3,step3p5,step5 })")
    plugin = serve_args("--reasoning-parser", "mine", "--reasoning-parser-plugin", "mine.py")
    assert frontend_switches(plugin)["reasoning_parser"] == "mine"  # (a plugin may register it)
