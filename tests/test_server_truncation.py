"""truncate_prompt_tokens and over-long prompts, as vLLM 0.33's renderer handles them: the last N tokens
are kept (after the BOS the tokenizer adds, or sliced with an explicit truncation_side), -1 is the
context less one token, more than the context is a 400; an over-long text prompt "contains at least"
max_model_len + 1 tokens (vLLM's tokenizer stops there)."""
from __future__ import annotations

import aiohttp
import pytest

from profiles.tokenizer import load_tokenizer
from server.testing import running_server

ARGS = ("--speed", "1000", "--max-model-len", "64")
TEXT = " ".join(f"w{i}" for i in range(40))  # well over 64 tokens
LLAMA = load_tokenizer(None, "llama3")


async def completion(http, url, body):
    async with http.post(url + "/v1/completions", json={"max_tokens": 1, "return_token_ids": True, **body}) as r:
        return r.status, await r.json()


async def test_completion_keeps_the_last_tokens():
    full = LLAMA.encode(TEXT, True)
    assert len(full) > 64
    async with running_server(*ARGS) as server:
        async with aiohttp.ClientSession() as http:
            _, body = await completion(http, server.url, {"prompt": TEXT, "truncate_prompt_tokens": 5})
            assert body["choices"][0]["prompt_token_ids"] == full[:1] + full[-4:]  # the BOS stays
            assert body["usage"]["prompt_tokens"] == 5
            _, body = await completion(http, server.url, {"prompt": TEXT, "truncate_prompt_tokens": 5,
                                                          "truncation_side": "left"})
            assert body["choices"][0]["prompt_token_ids"] == full[-5:]
            _, body = await completion(http, server.url, {"prompt": TEXT, "truncate_prompt_tokens": 5,
                                                          "truncation_side": "right"})
            assert body["choices"][0]["prompt_token_ids"] == full[:5]
            _, body = await completion(http, server.url, {"prompt": list(range(1, 31)), "truncate_prompt_tokens": 3})
            assert body["choices"][0]["prompt_token_ids"] == [28, 29, 30]
            _, body = await completion(http, server.url, {"prompt": TEXT, "truncate_prompt_tokens": -1})
            assert body["usage"]["prompt_tokens"] == 63  # the context less one token for the output
            _, body = await completion(http, server.url, {"prompt": "short", "truncate_prompt_tokens": 50})
            assert body["choices"][0]["prompt_token_ids"] == LLAMA.encode("short", True)


async def test_chat_keeps_the_last_tokens_of_the_rendered_prompt():
    async with running_server(*ARGS) as server:
        async with aiohttp.ClientSession() as http:
            payload = {"messages": [{"role": "user", "content": TEXT}], "truncate_prompt_tokens": 10,
                       "max_tokens": 1, "return_token_ids": True}
            async with http.post(server.url + "/v1/chat/completions", json=payload) as r:
                body = await r.json()
    rendered = LLAMA.encode(LLAMA.render_chat([{"role": "user", "content": TEXT}], True), False)
    assert body["prompt_token_ids"] == rendered[-10:] and body["usage"]["prompt_tokens"] == 10


@pytest.mark.parametrize("body, message", [
    ({"prompt": "hi", "truncate_prompt_tokens": 65},
     "truncate_prompt_tokens=65 cannot be greater than max_model_len = 64. Please request a smaller truncation "
     "size. (parameter=truncate_prompt_tokens, value=65)"),
    ({"prompt": TEXT},
     "This model's maximum context length is 64 tokens. However, your prompt contains at least 65 input tokens, "
     "which exceeds this limit even without any output tokens. Please reduce the length of the input prompt. "
     "(parameter=input_tokens, value=65)"),
    ({"prompt": list(range(1, 67))},  # token ids: counted in full
     "This model's maximum context length is 64 tokens. However, your prompt contains 66 input tokens, "
     "which exceeds this limit even without any output tokens. Please reduce the length of the input prompt. "
     "(parameter=input_tokens, value=66)"),
])
async def test_truncation_and_length_errors_are_vllms(body, message):
    async with running_server(*ARGS) as server:
        async with aiohttp.ClientSession() as http:
            status, answer = await completion(http, server.url, body)
    assert status == 400 and answer["error"]["message"] == message


async def test_truncation_side_must_be_left_or_right():
    async with running_server(*ARGS) as server:
        async with aiohttp.ClientSession() as http:
            status, answer = await completion(http, server.url, {"prompt": "hi", "truncation_side": "middle"})
    assert status == 400 and answer["error"]["param"] == "body.truncation_side"
    assert "Input should be 'left' or 'right'" in answer["error"]["message"]
