"""The sampling and request checks vLLM 0.33 answers with a 400 (sampling_params.py, the input
processor, the renderer), with its messages."""
from __future__ import annotations

import aiohttp
import pytest

from server.testing import running_server

FAST = ("--speed", "1000")
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]
VOCAB = 128256  # Llama 3.1's config


CASES = [
    (CHAT, {"logprobs": True, "top_logprobs": -1},
     f"Requested sample logprobs of {VOCAB}, which is greater than max allowed: 20 (parameter=logprobs, "
     f"value={VOCAB})"),
    (COMPLETIONS, {"logprobs": -1},
     f"Requested sample logprobs of {VOCAB}, which is greater than max allowed: 20 (parameter=logprobs, "
     f"value={VOCAB})"),
    (COMPLETIONS, {"prompt_logprobs": -1},
     f"Requested prompt logprobs of {VOCAB}, which is greater than max allowed: 20 (parameter=prompt_logprobs, "
     f"value={VOCAB})"),
    (CHAT, {"n": 2, "temperature": 0}, "n must be 1 when using greedy sampling, got 2."),
    (COMPLETIONS, {"logit_bias": {"abc": 1, "5": 2}},
     "logit_bias contains key(s) that cannot be converted to integer token IDs: ['abc'] (parameter=logit_bias, "
     "value=['abc'])"),
    (CHAT, {"logit_bias": {"999999": 1}},
     f"token_id(s) [999999] in logit_bias contain out-of-vocab token ids. Vocabulary size: {VOCAB} "
     "(parameter=logit_bias, value=[999999])"),
    (COMPLETIONS, {"stop_token_ids": [5, 200000]},
     f"token_id(s) [200000] in stop_token_ids contain out-of-vocab token ids. Vocabulary size: {VOCAB} "
     "(parameter=stop_token_ids, value=[200000])"),
    (CHAT, {"allowed_token_ids": [1, 300000]},
     "allowed_token_ids contains out-of-vocab token id! (parameter=allowed_token_ids, value=[300000])"),
    (CHAT, {"allowed_token_ids": []},
     "allowed_token_ids is not None and empty! (parameter=allowed_token_ids, value=[])"),
    (COMPLETIONS, {"bad_words": ["x", ""]}, "bad_words cannot contain an empty string. Got bad_words=['x', '']"),
    (CHAT, {"thinking_token_budget": 100},
     "thinking_token_budget is set but reasoning_config is not configured. Please set --reasoning-parser and/or "
     "--reasoning-config to use thinking_token_budget."),
    (CHAT, {"thinking_token_budget": -2},
     "`thinking_token_budget` must be a non-negative integer or -1 for unlimited. "
     "(parameter=thinking_token_budget, value=-2)"),
    (COMPLETIONS, {"suffix": "end"}, "suffix is only supported for models with FIM completion rendering"),
    (COMPLETIONS, {"suffix": "end", "echo": True}, "Echo is unsupported with suffix."),
    (CHAT, {"cache_salt": "tenant/a"}, "Parameter 'cache_salt' must be at most 128 characters and must not contain "
     "'@', '/', '\\\\', or NUL. (parameter=cache_salt)"),
    (COMPLETIONS, {"cache_salt": "s" * 129}, "Parameter 'cache_salt' must be at most 128 characters and must not "
     "contain '@', '/', '\\\\', or NUL. (parameter=cache_salt)"),
    (COMPLETIONS, {"cache_salt": ""}, "Parameter 'cache_salt' must be a non-empty string if provided. "
     "(parameter=cache_salt)"),
    (CHAT, {"chat_template": "{{ messages }}"},
     "Chat template is passed with request, but --trust-request-chat-template is not set. Refused request with "
     "untrusted chat template."),
    (CHAT, {"chat_template_kwargs": {"chat_template": "{{ messages }}"}},
     "Chat template is passed with request, but --trust-request-chat-template is not set. Refused request with "
     "untrusted chat template."),
]


@pytest.mark.parametrize("path, fields, message", CASES, ids=[str(c[1])[:40] for c in CASES])
async def test_vllms_400s(path, fields, message):
    base = {"messages": USER} if path == CHAT else {"prompt": "hi"}
    async with running_server(*FAST) as server:
        async with aiohttp.ClientSession() as http:
            async with http.post(server.url + path, json={**base, "max_tokens": 2, **fields}) as r:
                status, body = r.status, await r.json()
    assert status == 400 and body["error"]["message"] == message


@pytest.mark.parametrize("fields, param", [({"reasoning_effort": "huge"}, "body.reasoning_effort"),
                                           ({"truncation_side": "up"}, "body.truncation_side")])
async def test_invalid_literals_are_schema_errors(fields, param):
    async with running_server(*FAST) as server:
        async with aiohttp.ClientSession() as http:
            async with http.post(server.url + CHAT, json={"messages": USER, **fields}) as r:
                status, body = r.status, await r.json()
    assert status == 400 and body["error"]["type"] == "Bad Request" and body["error"]["param"] == param


async def test_accepted_with_the_flags_that_allow_them():
    async with running_server(*FAST, "--reasoning-parser", "qwen3", "--trust-request-chat-template") as server:
        async with aiohttp.ClientSession() as http:
            for fields in ({"thinking_token_budget": 10}, {"chat_template": "{{ messages }}"},
                           {"logit_bias": {"5": 1}, "allowed_token_ids": [5, 6], "stop_token_ids": [7],
                            "bad_words": ["x"], "reasoning_effort": "low", "thinking_token_budget": -1}):
                async with http.post(server.url + CHAT, json={"messages": USER, "max_tokens": 2, **fields}) as r:
                    assert r.status == 200, await r.text()
