"""Smaller shapes of vLLM 0.33's answers: tokens named by id in logprobs, prompt_logprobs (chat, and
with echo), echo with return_token_ids, /detokenize keeping special tokens, continue_final_message,
the developer role, the response role without a generation prompt, template options, and
prompt_tokens_details' keys."""
from __future__ import annotations

import json

import aiohttp

from profiles.tokenizer import load_tokenizer
from server.testing import running_server

FAST = ("--speed", "1000")
USER = [{"role": "user", "content": "Hello there"}]
LLAMA = load_tokenizer(None, "llama3")


async def post(http, url, body):
    async with http.post(url, json=body) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def test_return_tokens_as_token_ids_names_logprob_tokens_by_id():
    async with running_server(*FAST) as server:
        async with aiohttp.ClientSession() as http:
            chat = await post(http, server.url + "/v1/chat/completions", {
                "messages": USER, "max_tokens": 3, "ignore_eos": True, "logprobs": True, "top_logprobs": 2,
                "return_tokens_as_token_ids": True, "return_token_ids": True})
            choice = chat["choices"][0]
            for token_id, entry in zip(choice["token_ids"], choice["logprobs"]["content"]):
                assert entry["token"] == f"token_id:{token_id}"
                assert entry["bytes"] == list(LLAMA.decode([token_id]).encode())  # the text's bytes, as vLLM's
                assert all(t["token"].startswith("token_id:") and t["bytes"] == list(t["token"].encode())
                           for t in entry["top_logprobs"])
            completion = await post(http, server.url + "/v1/completions", {
                "prompt": "Hi", "max_tokens": 3, "ignore_eos": True, "logprobs": 1,
                "return_tokens_as_token_ids": True, "return_token_ids": True})
            choice = completion["choices"][0]
            names = [f"token_id:{i}" for i in choice["token_ids"]]
            assert choice["logprobs"]["tokens"] == names
            assert choice["logprobs"]["text_offset"] == [sum(map(len, names[:k])) for k in range(3)]
            assert all(set(top) <= {n for n in top if n.startswith("token_id:")}
                       for top in choice["logprobs"]["top_logprobs"])
    async with running_server(*FAST, "--return-tokens-as-token-ids") as server:
        async with aiohttp.ClientSession() as http:
            body = {"prompt": "Hi", "max_tokens": 2, "ignore_eos": True, "logprobs": 0}
            flagged = await post(http, server.url + "/v1/completions", body)
            assert all(t.startswith("token_id:") for t in flagged["choices"][0]["logprobs"]["tokens"])
            off = await post(http, server.url + "/v1/completions", {**body, "return_tokens_as_token_ids": False})
            assert not any(t.startswith("token_id:") for t in off["choices"][0]["logprobs"]["tokens"])


async def test_prompt_logprobs_in_chat_and_with_echo():
    async with running_server(*FAST) as server:
        async with aiohttp.ClientSession() as http:
            body = await post(http, server.url + "/v1/chat/completions",
                              {"messages": USER, "max_tokens": 1, "prompt_logprobs": 2})
            prompt_logprobs = body["prompt_logprobs"]
            assert len(prompt_logprobs) == body["usage"]["prompt_tokens"] and prompt_logprobs[0] is None
            assert all(len(entry) == 2 and sorted(v["rank"] for v in entry.values()) == [1, 2]
                       for entry in prompt_logprobs[1:])
            # chat echo asks for the prompt's logprobs with top_logprobs (0: the prompt token alone)
            echo = await post(http, server.url + "/v1/chat/completions", {
                "messages": [*USER, {"role": "assistant", "content": "Sure"}], "max_tokens": 1, "echo": True,
                "add_generation_prompt": False})
            assert all(len(entry) == 1 for entry in echo["prompt_logprobs"][1:])
            assert (await post(http, server.url + "/v1/chat/completions",
                               {"messages": USER, "max_tokens": 1}))["prompt_logprobs"] is None
            completion = await post(http, server.url + "/v1/completions", {
                "prompt": "Hello there", "max_tokens": 1, "echo": True, "logprobs": 2, "return_token_ids": True})
            choice = completion["choices"][0]
            assert len(choice["prompt_logprobs"]) == len(choice["prompt_token_ids"])
            first_id = str(choice["prompt_token_ids"][1])
            assert choice["prompt_logprobs"][1][first_id]["decoded_token"] == LLAMA.decode([int(first_id)])


async def test_echo_with_return_token_ids_leaves_the_prompt_text_out():
    async with running_server(*FAST) as server:
        async with aiohttp.ClientSession() as http:
            body = {"prompt": "Hello there", "max_tokens": 3, "ignore_eos": True, "echo": True,
                    "return_token_ids": True, "seed": 1}
            full = await post(http, server.url + "/v1/completions", body)
            choice = full["choices"][0]
            assert len(choice["token_ids"]) == 3 and choice["prompt_token_ids"] == LLAMA.encode("Hello there")
            assert choice["text"] == LLAMA.decode(choice["token_ids"])
            async with http.post(server.url + "/v1/completions", json={**body, "stream": True}) as r:
                raw = (await r.read()).decode()
            chunks = [json.loads(b[6:])["choices"][0] for b in raw.split("\n\n") if b.startswith("data: {")]
            assert "".join(c["text"] for c in chunks) == choice["text"]
            assert sum((c["token_ids"] for c in chunks), []) == choice["token_ids"]
            assert chunks[0]["prompt_token_ids"] == choice["prompt_token_ids"]


async def test_detokenize_keeps_special_tokens():
    async with running_server(*FAST) as server:
        async with aiohttp.ClientSession() as http:
            body = await post(http, server.url + "/detokenize", {"tokens": [128000, 9906, 128009]})
    assert body["prompt"] == "<|begin_of_text|>Hello<|eot_id|>"


async def test_chat_rendering_options_reach_the_prompt():
    async with running_server(*FAST) as server:
        async with aiohttp.ClientSession() as http:
            async def count(body):
                return (await post(http, server.url + "/tokenize", body))["count"]

            def llama(messages, **kw):
                return len(LLAMA.encode(LLAMA.render_chat(messages, **kw), False))
            # continue_final_message: the final message is left open (no <|eot_id|> after it)
            partial = [*USER, {"role": "assistant", "content": "The answer is"}]
            got = await count({"messages": partial, "add_generation_prompt": False, "continue_final_message": True})
            closed = await count({"messages": partial, "add_generation_prompt": False})
            assert got == closed - 1 == llama(partial, add_generation_prompt=False) - 1
            # developer messages become system ones, merged into one at the start
            developer = [{"role": "system", "content": "A"}, *USER, {"role": "developer", "content": "B"}]
            merged = [{"role": "system", "content": "A\n\nB"}, *USER]
            assert await count({"messages": developer}) == llama(merged, add_generation_prompt=True)
            # a template option (Llama 3.1's date_string)
            dated = await count({"messages": USER, "chat_template_kwargs": {"date_string": "1 Jan 2025 and more"}})
            assert dated == llama(USER, add_generation_prompt=True, options={"date_string": "1 Jan 2025 and more"})
            assert dated > await count({"messages": USER})
            # without a generation prompt the reply takes the last message's role
            body = await post(http, server.url + "/v1/chat/completions",
                              {"messages": USER, "add_generation_prompt": False, "max_tokens": 1})
            assert body["choices"][0]["message"]["role"] == "user"


async def test_qwen_enable_thinking_false_closes_an_empty_think_block():
    async with running_server("Qwen/Qwen3-30B-A3B", *FAST) as server:
        async with aiohttp.ClientSession() as http:
            on = await post(http, server.url + "/tokenize", {"messages": USER})
            off = await post(http, server.url + "/tokenize",
                             {"messages": USER, "chat_template_kwargs": {"enable_thinking": False}})
            effort = await post(http, server.url + "/v1/chat/completions",
                                {"messages": USER, "reasoning_effort": "none", "max_tokens": 1})
    qwen = load_tokenizer(None, "qwen3")
    assert off["tokens"][len(on["tokens"]):] == qwen.encode("<think>\n\n</think>\n\n", False)
    assert effort["usage"]["prompt_tokens"] == off["count"]


async def test_prompt_tokens_details_have_vllms_keys():
    """Chat's details add the prompt tokens its prefill wrote to the prefix cache (vLLM's
    num_cache_creation_tokens: its full blocks less what it found cached)."""
    async with running_server(*FAST, "--enable-prompt-tokens-details") as server:
        async with aiohttp.ClientSession() as http:
            body = await post(http, server.url + "/v1/chat/completions", {"messages": USER, "max_tokens": 1})
            prompt = body["usage"]["prompt_tokens"]
            assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 0,
                                                              "created_cache_tokens": prompt // 16 * 16,
                                                              "multimodal_tokens": None}
            async with http.post(server.url + "/v1/chat/completions", json={
                    "messages": USER, "max_tokens": 1, "stream": True,
                    "stream_options": {"include_usage": True}}) as r:
                raw = (await r.read()).decode()
            usage = [json.loads(b[6:]) for b in raw.split("\n\n") if b.startswith("data: {")][-1]["usage"]
            # the stream's usage drops nulls; the same prompt again finds its full blocks cached: nothing new
            assert usage["prompt_tokens_details"] == {"cached_tokens": prompt // 16 * 16, "created_cache_tokens": 0}
