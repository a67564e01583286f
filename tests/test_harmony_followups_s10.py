"""gpt-oss (Harmony) follow-ups, as vLLM 0.33 serves them. A Responses request with `previous_response_id` renders
the previous request's whole Harmony history (its preamble, input, and the messages the model wrote: analysis,
calls, answers; analysis before the last final answer dropped), then the new input; the new instructions are not
rendered; a tool output names the call it answers, and one that answers no call is refused. Virtual time."""
from __future__ import annotations

import json

import aiohttp
import pytest

from profiles.tokenizer import load_tokenizer
from server.harmony import harmony_tokens
from server.harmony_prompt import encode, render
from server.testing import running_server

GPT_OSS = ("--model", "openai/gpt-oss-120b", "--max-model-len", "8192", "--speed", "1000")
PARSERS = ("--reasoning-parser", "openai_gptoss", "--enable-auto-tool-choice", "--tool-call-parser", "openai")
PARAMS = {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}
TOOLS = [{"type": "function", "name": "get_time", "parameters": PARAMS}]
CHAT_TOOLS = [{"type": "function", "function": {"name": "get_time", "description": None, "parameters": PARAMS}}]


@pytest.fixture
def stored(monkeypatch):
    """The store on (read as the server starts) and a fixed date in Harmony's system message."""
    monkeypatch.setenv("VLLM_ENABLE_RESPONSES_API_STORE", "1")
    monkeypatch.setenv("VLLM_SYSTEM_START_DATE", "2026-01-02")


async def _post(http, server, body: dict):
    async with http.post(server.url + "/v1/responses", json=body) as r:
        if body.get("stream"):
            text = await r.text()
            events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
            return r.status, next(e["response"] for e in events if e["type"] == "response.completed")
        return r.status, await r.json()


def _chat_messages(output: list[dict]) -> list[dict]:
    """A response's output items as chat messages (rendered by the chat path's Harmony renderer)."""
    out = []
    for item in output:
        if item["type"] == "reasoning":
            out.append({"role": "assistant", "reasoning": item["content"][0]["text"]})
        elif item["type"] == "message":
            out.append({"role": "assistant", "content": item["content"][0]["text"]})
        elif item["type"] == "function_call":
            out.append({"role": "assistant", "tool_calls": [{"id": item["call_id"], "type": "function", "function": {
                "name": item["name"], "arguments": item["arguments"]}}]})
    return out


def _expected(messages: list[dict]) -> tuple[int, str]:
    ids, text = encode(harmony_tokens(load_tokenizer(None, "gpt_oss")), render(messages, CHAT_TOOLS, None))
    return len(ids), text


@pytest.mark.parametrize("stream", [False, True])
async def test_a_follow_up_renders_the_previous_calls_and_reasoning(stored, stream):
    async with running_server(*GPT_OSS, *PARSERS) as server, aiohttp.ClientSession() as http:
        first = {"input": "what time is it?", "instructions": "Be brief.", "tools": TOOLS, "tool_choice": "required",
                 "max_output_tokens": 1500, "seed": 4, "enable_response_messages": True, "stream": stream}
        status, one = await _post(http, server, first)
        assert status == 200, one
        assert [i["type"] for i in one["output"]] == ["reasoning", "function_call"]
        call = one["output"][1]
        history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "what time is it?"},
                   *_chat_messages(one["output"])]
        assert (one["usage"]["input_tokens"], one["input_messages"][0]["message"]) == _expected(history[:2])

        # the call's output: the previous call and its (still current) analysis stay; new instructions are not
        # rendered (the previous preamble stands)
        answer = {"type": "function_call_output", "call_id": call["call_id"], "output": "12:00"}
        status, two = await _post(http, server, {"input": [answer], "previous_response_id": one["id"],
                                                 "instructions": "Ignored.", "tools": TOOLS, "max_output_tokens": 1500,
                                                 "seed": 5, "enable_response_messages": True, "stream": stream})
        assert status == 200, two
        history.append({"role": "tool", "tool_call_id": call["call_id"], "content": "12:00"})
        tokens, text = _expected(history)
        assert two["input_messages"][0]["message"] == text and two["usage"]["input_tokens"] == tokens
        assert "to=functions.get_time<|channel|>commentary json<|message|>" in text and "Ignored." not in text
        assert one["output"][0]["content"][0]["text"] in text

        # a user's next turn after an answer: analysis before the last final answer is dropped, the calls stay
        status, three = await _post(http, server, {"input": "thanks", "previous_response_id": two["id"],
                                                   "tools": TOOLS, "max_output_tokens": 1500, "seed": 6,
                                                   "enable_response_messages": True})
        assert status == 200, three
        history += [*_chat_messages(two["output"]), {"role": "user", "content": "thanks"}]
        tokens, text = _expected(history)
        assert three["input_messages"][0]["message"] == text and three["usage"]["input_tokens"] == tokens
        assert [i["type"] for i in two["output"]] == ["reasoning", "message"] and "<|channel|>analysis" not in text
        assert f'<|message|>{call["arguments"]}<|call|>' in text


async def test_a_tool_output_that_answers_no_call_is_refused(stored):
    async with running_server(*GPT_OSS, *PARSERS) as server, aiohttp.ClientSession() as http:
        status, one = await _post(http, server, {"input": "hi", "max_output_tokens": 200, "seed": 1})
        assert status == 200, one
        stray = {"type": "function_call_output", "call_id": "call_nope", "output": "x"}
        for body in ({"input": [stray]}, {"input": [stray], "previous_response_id": one["id"]}):
            status, error = await _post(http, server, {**body, "max_output_tokens": 50})
            assert status == 400, error
            assert error["error"]["message"] == "No call message found for call_nope (parameter=input)"
            assert error["error"]["type"] == "invalid_request_error" and error["error"]["param"] == "input"


QWEN = ("--model", "Qwen/Qwen3-32B", "--max-model-len", "8192", "--speed", "1000", "--reasoning-parser", "qwen3")
CONTINUED = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there"}]


async def _chat(http, server, body: dict):
    async with http.post(server.url + "/v1/chat/completions", json=body) as r:
        if body.get("stream"):
            return [json.loads(line[6:]) for line in (await r.text()).splitlines() if line.startswith("data: {")]
        return (await r.json())["choices"][0]["message"]


async def test_echo_of_a_gpt_oss_chat_is_nothing_but_content_is_no_longer_null():
    # vLLM's conversation of a gpt-oss chat is Harmony's messages, in which its echo finds no `content`: nothing is
    # echoed, and the content the parser left (None too) is prefixed with "" (chat_completion/serving.py)
    async with running_server(*GPT_OSS, *PARSERS) as server, aiohttp.ClientSession() as http:
        body = {"messages": CONTINUED, "add_generation_prompt": False, "max_tokens": 60, "seed": 2}
        plain, echoed = await _chat(http, server, body), await _chat(http, server, {**body, "echo": True})
        assert echoed["reasoning"] == plain["reasoning"] and echoed["content"] == plain["content"]
        assert not (plain["content"] or "").startswith("Hello there")
        cut = {**body, "max_tokens": 5}
        assert (await _chat(http, server, cut))["content"] is None
        assert (await _chat(http, server, {**cut, "echo": True}))["content"] == ""
        chunks = await _chat(http, server, {**body, "echo": True, "stream": True})
        deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
        assert "".join(d.get("content") or "" for d in deltas) == plain["content"]


async def test_echo_with_a_reasoning_parser_prefixes_the_content_in_a_chunk_of_its_own():
    async with running_server(*QWEN) as server, aiohttp.ClientSession() as http:
        # a reply that only reasons (cut): no content, but "" with echo (an echo of nothing: the last role is not
        # the reply's)
        thinking = {"messages": CONTINUED[:1], "max_tokens": 10, "seed": 2}
        plain, echoed = await _chat(http, server, thinking), await _chat(http, server, {**thinking, "echo": True})
        assert plain["content"] is None and echoed["content"] == "" and echoed["reasoning"] == plain["reasoning"]
        # a continued assistant message: its content first, then the output's
        body = {"messages": CONTINUED, "add_generation_prompt": False, "max_tokens": 20, "seed": 2, "echo": True}
        message = await _chat(http, server, body)
        assert message["content"].startswith("Hello there") and len(message["content"]) > len("Hello there")
        chunks = await _chat(http, server, {**body, "stream": True,
                                            "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
        role, echo, first = chunks[:3]
        assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        prompt = role["usage"]["prompt_tokens"]
        assert echo["choices"] == [{"index": 0, "delta": {"content": "Hello there"}, "logprobs": None,
                                    "finish_reason": None}]
        assert echo["usage"] == {"prompt_tokens": prompt, "total_tokens": prompt, "completion_tokens": 0,
                                 "completion_tokens_details": {"reasoning_tokens": 0}}
        assert "prompt_token_ids" not in echo and first["usage"]["completion_tokens"] == 1
        assert "Hello there" + "".join(c["choices"][0]["delta"].get("content") or ""
                                       for c in chunks[2:] if c["choices"]) == message["content"]


async def test_ignore_eos_on_gpt_oss_runs_to_max_tokens_with_the_constrained_answer_whole():
    # vLLM's ignore_eos stops on neither the EOS nor the generation config's <|call|>: the grammar still ends the
    # final answer or the call (with its stop token), and the output runs on to max_tokens ("length")
    weather = [{"type": "function", "function": {"name": "get_weather", "parameters": PARAMS}}]
    async with running_server(*GPT_OSS, *PARSERS) as server, aiohttp.ClientSession() as http:
        base = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 120, "seed": 1, "ignore_eos": True,
                "return_token_ids": True}
        for extra, check in (({"structured_outputs": {"choice": ["yes", "no"]}},
                              lambda m: m["content"] in ("yes", "no")),
                             ({"response_format": {"type": "json_object"}},
                              lambda m: isinstance(json.loads(m["content"]), dict)),
                             ({"tools": weather, "tool_choice": "required"},
                              lambda m: set(json.loads(m["tool_calls"][0]["function"]["arguments"])) == {"zone"})):
            async with http.post(server.url + "/v1/chat/completions", json={**base, **extra}) as r:
                choice = (await r.json())["choices"][0]
            assert choice["finish_reason"] == "length" and choice["stop_reason"] is None, choice
            assert len(choice["token_ids"]) == 120 and check(choice["message"]), choice["message"]
            assert choice["message"]["reasoning"]
        status, body = await _post(http, server, {"input": "hi", "max_output_tokens": 120, "seed": 1,
                                                  "ignore_eos": True, "tools": TOOLS, "tool_choice": "required"})
        assert body["status"] == "incomplete" and body["usage"]["output_tokens"] == 120
        call = body["output"][-1]
        assert call["type"] == "function_call" and set(json.loads(call["arguments"])) == {"zone"}


async def test_a_gpt_oss_prompt_decodes_with_its_markers():
    # vLLM's /detokenize decodes with the tokenizer's default (renderers/base.py _detokenize_prompt: special tokens
    # kept): a gpt-oss prompt's ids give back its text, markers included, whichever tokenizer has the words
    tokens = harmony_tokens(load_tokenizer(None, "gpt_oss"))
    messages = [{"role": "user", "content": "hi é"}, {"role": "assistant", "content": "ok", "reasoning": "think"},
                {"role": "user", "content": "more"}]
    ids, text = encode(tokens, render(messages, CHAT_TOOLS, "low"))
    assert tokens.decode(ids) == text and text.startswith("<|start|>system<|message|>")
    assert tokens.decode(ids, skip_special_tokens=True) == text.replace("<|start|>", "").replace(
        "<|message|>", "").replace("<|end|>", "").replace("<|channel|>", "").replace("<|call|>", "")


async def test_detokenize_gives_back_a_gpt_oss_chats_harmony_text():
    # /tokenize of a chat renders it with Harmony (markers as o200k_harmony's ids); /detokenize of those ids gives
    # the prompt's text back, markers kept, as vLLM's tokenizer.decode does
    async with running_server(*GPT_OSS) as server, aiohttp.ClientSession() as http:
        messages = [{"role": "user", "content": "what is the weather"}]
        async with http.post(server.url + "/tokenize", json={"messages": messages}) as r:
            ids = (await r.json())["tokens"]
        async with http.post(server.url + "/detokenize", json={"tokens": ids}) as r:
            body = await r.json()
            assert r.status == 200, body
    assert body["prompt"].startswith("<|start|>system<|message|>")
    assert "<|start|>user<|message|>what is the weather<|end|>" in body["prompt"]
    assert body["prompt"].endswith("<|start|>assistant")


async def test_a_gpt_oss_batch_with_echo_echoes_nothing():
    # vLLM's batch route echoes the last message's "content", which a gpt-oss conversation's Harmony messages lack
    # (batch_serving.py): its replies are the model's alone
    # (the last message has the reply's role, as echo needs: without a generation prompt, the assistant's own)
    conversations = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "say hi"}],
                     [{"role": "user", "content": "bye"}, {"role": "assistant", "content": "say bye"}]]
    async with running_server(*GPT_OSS) as server, aiohttp.ClientSession() as http:
        replies = []
        for echo in (False, True):
            body = {"messages": conversations, "max_tokens": 40, "seed": 3, "echo": echo,
                    "add_generation_prompt": False}
            async with http.post(server.url + "/v1/chat/completions/batch", json=body) as r:
                answer = await r.json()
                assert r.status == 200, answer
                replies.append([c["message"]["content"] for c in answer["choices"]])
    assert replies[0] == replies[1]
    assert not any(reply and reply.startswith("say") for reply in replies[1])


async def test_ignore_eos_under_a_choice_runs_on_past_the_eos_to_max_tokens():
    # with ignore_eos the EOS after a complete choice stops nothing, and the ended grammar leaves the rest of the
    # output unconstrained (vLLM's structured output manager): max_tokens tokens, finish_reason "length"
    async with running_server("--speed", "1000") as server, aiohttp.ClientSession() as http:
        answers = []
        for ignore_eos in (False, True):
            body = {"prompt": "x", "max_tokens": 20, "seed": 1, "ignore_eos": ignore_eos,
                    "structured_outputs": {"choice": ["alpha", "beta"]}}
            async with http.post(server.url + "/v1/completions", json=body) as r:
                answers.append(await r.json())
    stopped, ran_on = answers
    assert stopped["choices"][0]["finish_reason"] == "stop" and stopped["usage"]["completion_tokens"] < 20
    assert ran_on["choices"][0]["finish_reason"] == "length" and ran_on["usage"]["completion_tokens"] == 20
    choice = stopped["choices"][0]["text"]
    assert choice in ("alpha", "beta") and ran_on["choices"][0]["text"].startswith(choice)
    assert len(ran_on["choices"][0]["text"]) > len(choice)


async def test_an_ignored_eos_shows_where_special_tokens_do_and_an_echoed_id_prompt_keeps_them():
    # the EOS after a complete choice stops nothing under ignore_eos: vLLM's detokenizer decodes it as any token,
    # so it shows with skip_special_tokens false (include_stop_str_in_output is for an EOS that stops); an echoed
    # prompt of token ids is decoded with the tokenizer's default, special tokens kept (renderers/base.py)
    async with running_server("--speed", "1000") as server, aiohttp.ClientSession() as http:
        texts = []
        for skip in (True, False):
            body = {"prompt": "x", "max_tokens": 20, "seed": 1, "ignore_eos": True, "skip_special_tokens": skip,
                    "structured_outputs": {"choice": ["alpha", "beta"]}}
            async with http.post(server.url + "/v1/completions", json=body) as r:
                texts.append((await r.json())["choices"][0]["text"])
        body = {"prompt": [128000, 15339, 1917], "max_tokens": 1, "echo": True}
        async with http.post(server.url + "/v1/completions", json=body) as r:
            echoed = (await r.json())["choices"][0]["text"]
    shown, hidden = texts[1], texts[0]
    choice = next(c for c in ("alpha", "beta") if hidden.startswith(c))
    assert shown.startswith(choice + "<|end_of_text|>") and not hidden.startswith(choice + "<|")
    assert echoed.startswith("<|begin_of_text|>")


async def test_a_gpt_oss_responses_input_is_rendered_item_by_item_in_order(stored):
    # vLLM converts each input item to a Harmony message in order (responses/harmony.py response_input_to_harmony):
    # a reasoning item after an answer stays after it (it is analysis after the last final answer, so it is kept),
    # a reasoning item with only a summary renders nothing, and an output answers only a call before it
    answer = {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ANSWER"}]}
    thinking = {"type": "reasoning", "id": "rs_1", "summary": [],
                "content": [{"type": "reasoning_text", "text": "THINKING"}]}
    summary_only = {"type": "reasoning", "id": "rs_2", "summary": [{"type": "summary_text", "text": "SUMMARY"}]}
    call = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}
    result = {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}
    user = {"role": "user", "content": "hi"}
    async with running_server(*GPT_OSS, *PARSERS) as server, aiohttp.ClientSession() as http:
        base = {"model": "openai/gpt-oss-120b", "max_output_tokens": 20, "enable_response_messages": True}
        status, body = await _post(http, server, {**base, "input": [user, answer, thinking, summary_only, user]})
        assert status == 200, body
        text = body["input_messages"][0]["message"]
        assert ("<|start|>assistant<|channel|>final<|message|>ANSWER<|end|><|start|>assistant<|channel|>analysis"
                "<|message|>THINKING<|end|><|start|>user<|message|>hi<|end|>") in text and "SUMMARY" not in text
        status, body = await _post(http, server, {**base, "input": [user, result, call]})
        assert status == 400 and body["error"]["message"] == "No call message found for call_1 (parameter=input)"
        status, body = await _post(http, server, {**base, "input": [user, call, result]})
        assert status == 200 and "<|start|>functions.get_weather to=assistant" in body["input_messages"][0]["message"]


async def test_previous_input_messages_render_as_harmony_history():
    # vLLM's construct_harmony_previous_input_messages: chat-format and Harmony-format messages, system and
    # developer ones left out; an empty string input then adds no user message
    history = [{"role": "system", "content": "IGNORED"}, {"role": "user", "content": "what time is it?"},
               {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                     "function": {"name": "get_time", "arguments": "{}"}}]},
               {"role": "tool", "name": "get_time", "content": "noon"},
               {"author": {"role": "assistant"}, "channel": "final", "content": [{"type": "text", "text": "Noon."}]}]
    async with running_server(*GPT_OSS, *PARSERS) as server, aiohttp.ClientSession() as http:
        base = {"model": "openai/gpt-oss-120b", "max_output_tokens": 20, "enable_response_messages": True,
                "previous_input_messages": history}
        status, body = await _post(http, server, {**base, "input": ""})
        assert status == 200, body
        text = body["input_messages"][0]["message"]
        status, bad = await _post(http, server, {**base, "input": "x", "previous_input_messages": [{"content": "?"}]})
    assert "IGNORED" not in text
    assert text.endswith("<|start|>user<|message|>what time is it?<|end|>"
                         "<|start|>assistant to=functions.get_time<|channel|>commentary json<|message|>{}<|call|>"
                         "<|start|>functions.get_time to=assistant<|channel|>commentary<|message|>noon<|end|>"
                         "<|start|>assistant<|channel|>final<|message|>Noon.<|end|><|start|>assistant")
    assert status == 400 and bad["error"]["message"].startswith("Message has no 'role' key")


async def test_a_gpt_oss_answer_ends_in_its_own_eos():
    # gpt-oss's config names <|return|> (200002) its EOS: an answer ends there, stop_reason None as for any EOS
    # (the words may come from another family's tokenizer; the EOS is the model's)
    async with running_server(*GPT_OSS, *PARSERS) as server, aiohttp.ClientSession() as http:
        body = {"messages": [{"role": "user", "content": "yes?"}], "structured_outputs": {"choice": ["yes", "no"]},
                "return_token_ids": True, "max_tokens": 500}
        async with http.post(server.url + "/v1/chat/completions", json=body) as r:
            choice = (await r.json())["choices"][0]
        async with http.post(server.url + "/detokenize", json={"tokens": [199999, 200018, 200002]}) as r:
            markers = (await r.json())["prompt"]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] is None
    assert choice["token_ids"][-1] == 200002 and choice["message"]["content"] in ("yes", "no")
    assert markers == "<|endoftext|><|endofprompt|><|return|>"


async def test_logprob_tokens_keep_special_tokens_as_vllms_decoded_token():
    # vLLM names every logprob token by decoding it alone with special tokens kept (convert_ids_list_to_tokens):
    # an echoed BOS, a prompt's header tokens, an EOS that stops nothing; text offsets count them
    async with running_server("--speed", "1000") as server, aiohttp.ClientSession() as http:
        async with http.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1, "echo": True,
                                                                   "logprobs": 0}) as r:
            echoed = (await r.json())["choices"][0]["logprobs"]
        body = {"prompt": [128000, 128006, 9125, 128007, 9906], "max_tokens": 1, "echo": True, "prompt_logprobs": 0}
        async with http.post(server.url + "/v1/completions", json=body) as r:
            prompt_logprobs = (await r.json())["choices"][0]["prompt_logprobs"]
        body = {"prompt": "x", "max_tokens": 20, "seed": 1, "ignore_eos": True, "logprobs": 0,
                "structured_outputs": {"choice": ["alpha", "beta"]}}
        async with http.post(server.url + "/v1/completions", json=body) as r:
            ran_on = (await r.json())["choices"][0]["logprobs"]["tokens"]
    assert echoed["tokens"][:2] == ["<|begin_of_text|>", "Hi"] and echoed["text_offset"][:3] == [0, 17, 19]
    assert prompt_logprobs[1]["128006"]["decoded_token"] == "<|start_header_id|>"
    assert ran_on[1] == "<|end_of_text|>"
