"""A gpt-oss prompt rendered with Harmony as vLLM renders it (server/harmony_prompt.py), not with a template."""
from __future__ import annotations

import aiohttp

from profiles.tokenizer import load_tokenizer
from server.harmony import O200K_HARMONY, harmony_tokens
from server.harmony_prompt import encode, render
from server.testing import running_server

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "description": "The city"},
                                     "unit": {"type": "string", "enum": ["c", "f"], "default": "c"},
                                     "days": {"type": "array", "items": {"type": "integer"}}},
    "required": ["city"]}}}]


def test_system_developer_and_conversation_messages(monkeypatch):
    monkeypatch.setenv("VLLM_SYSTEM_START_DATE", "2026-01-02")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "Hello.", "reasoning": "old thoughts"},
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "", "reasoning": "call it",
                 "tool_calls": [{"id": "c1", "type": "function",
                                 "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    _, text = encode(harmony_tokens(load_tokenizer(None, "gpt_oss")), render(messages, TOOLS, "low"))
    assert text == (
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
        "Knowledge cutoff: 2024-06\nCurrent date: 2026-01-02\n\nReasoning: low\n\n"
        "# Valid channels: analysis, commentary, final. Channel must be included for every message.\n"
        "Calls to these tools must go to the commentary channel: 'functions'.<|end|>"
        "<|start|>developer<|message|># Instructions\n\nBe brief.\n\n# Tools\n\n## functions\n\n"
        "namespace functions {\n\n// Weather now.\ntype get_weather = (_: {\n// The city\ncity: string,\n"
        'unit?: "c" | "f", // default: c\ndays?: number[],\n}) => any;\n\n} // namespace functions<|end|>'
        "<|start|>user<|message|>hi<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Hello.<|end|>"  # (its analysis dropped: a final follows)
        "<|start|>user<|message|>weather?<|end|>"
        "<|start|>assistant<|channel|>analysis<|message|>call it<|end|>"
        '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city":"Paris"}<|call|>'
        "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>sunny<|end|>"
        "<|start|>assistant")


def test_no_developer_message_without_instructions_or_tools():
    ids, text = encode(harmony_tokens(load_tokenizer(None, "gpt_oss")), render([{"role": "user", "content": "hi"}],
                                                                              None, None))
    assert "developer" not in text and "Reasoning: medium" in text and "Calls to these tools" not in text
    assert ids[0] == O200K_HARMONY["<|start|>"] and ids.count(O200K_HARMONY["<|start|>"]) == 3


async def test_a_chat_prompt_is_harmonys():
    async with running_server("--model", "openai/gpt-oss-120b", "--max-model-len", "8192", "--speed", "1000",
                              "--reasoning-parser", "openai_gptoss") as server:
        async with aiohttp.ClientSession() as http:
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "return_token_ids": True}
            async with http.post(server.url + "/v1/chat/completions", json=body) as r:
                medium = await r.json()
            async with http.post(server.url + "/v1/chat/completions", json={**body, "reasoning_effort": "high"}) as r:
                high = await r.json()
            prompt = medium["prompt_token_ids"]
            assert prompt[0] == O200K_HARMONY["<|start|>"] and prompt[-2] == O200K_HARMONY["<|start|>"]
            assert len(prompt) == medium["usage"]["prompt_tokens"] == len(high["prompt_token_ids"])
            assert prompt != high["prompt_token_ids"]  # "Reasoning: high"
            async with http.post(server.url + "/v1/responses", json={"input": "hi", "max_output_tokens": 5}) as r:
                response = await r.json()
            assert response["usage"]["input_tokens"] == len(prompt)  # the same Harmony conversation
