"""--enable-log-requests' details as vLLM 0.33 writes them: the DEBUG "Request ... details" line's prompt text
(what vLLM's engine input keeps: a completion's text, a chat's rendered template, none for token ids), the
input lines of /tokenize and /detokenize ("tokenize-<id>", no params), a chat tool call's output line, and
SamplingParams built only where INFO logs them."""
from __future__ import annotations

import json
import logging
import re

import aiohttp
import numpy as np
import pytest

import server.serving
from server.request_log import RequestLogger
from server.testing import running_server

LOGGER = "vllm.entrypoints.serve.utils.request_logger"
LOGS = ("--speed", "1000", "--enable-log-requests", "--enable-log-outputs")
CHAT = [{"role": "user", "content": "Add 2 and 3"}]
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}


def lines(caplog, prefix: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.getMessage().startswith(prefix)]


def logged_prompt(line: str) -> str | None:
    """The prompt a DEBUG "Request ... details" line prints (its repr read back)."""
    text = re.match(r"Request \S+ details: prompt: (.*), prompt_token_ids: \[", line, re.S).group(1)
    return None if text == "None" else eval(text)  # noqa: S307 (a str repr the logger wrote)


async def test_debug_lines_print_the_prompt_text_vllm_keeps(caplog):
    caplog.set_level(logging.DEBUG, LOGGER)
    async with running_server(*LOGS) as server, aiohttp.ClientSession() as http:
        for body in ({"prompt": "hello there", "max_tokens": 1}, {"prompt": [1000, 1001], "max_tokens": 1},
                     {"prompt": [1000, 1001], "max_tokens": 1, "echo": True}):
            async with http.post(server.url + "/v1/completions", json=body) as r:
                assert r.status == 200
        async with http.post(server.url + "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 1}) as r:
            assert r.status == 200
        async with http.post(server.url + "/tokenize", json={"messages": CHAT}) as r:
            tokenized = await r.json()
        async with http.post(server.url + "/detokenize", json={"tokens": [1000, 1001]}) as r:
            decoded = (await r.json())["prompt"]
    details = lines(caplog, "Request ")
    prompts = [logged_prompt(line) for line in details]
    assert prompts[:3] == ["hello there", None, decoded]  # token ids: none, but decoded to be echoed
    chat_text, tokenize_text = prompts[3:5]
    assert chat_text and chat_text == tokenize_text and "Add 2 and 3" in chat_text  # the rendered template
    assert details[4].endswith(f"prompt_token_ids: {tokenized['tokens']}, prompt_embeds shape: None.")
    assert prompts[5] is None and details[5].endswith("prompt_token_ids: [1000, 1001], prompt_embeds shape: None.")


async def test_tokenizer_routes_log_their_input_without_params(caplog):
    caplog.set_level(logging.INFO, LOGGER)
    async with running_server(*LOGS) as server, aiohttp.ClientSession() as http:
        async with http.post(server.url + "/tokenize", headers={"X-Request-Id": "t1"}, json={"prompt": "hi"}) as r:
            assert r.status == 200
        async with http.post(server.url + "/detokenize", json={"tokens": [1000]}) as r:
            assert r.status == 200
        async with http.post(server.url + "/tokenize", json={"prompt": "hi", "model": "nope"}) as r:
            assert r.status == 404  # vLLM checks the model before it logs
    received = lines(caplog, "Received request")
    assert received[0] == "Received request tokenize-t1: params: None, lora_request: None."
    assert re.fullmatch(r"Received request tokenize-[0-9a-f]{16}: params: None, lora_request: None\.", received[1])
    assert len(received) == 2 and lines(caplog, "Generated response") == []


async def test_a_chat_tool_call_is_logged_as_vllm_describes_it(caplog):
    caplog.set_level(logging.INFO, LOGGER)
    async with running_server(*LOGS, "--enable-auto-tool-choice", "--tool-call-parser", "pythonic") as server, \
            aiohttp.ClientSession() as http:
        async with http.post(server.url + "/v1/chat/completions", json={
                "messages": CHAT, "tools": [ADD], "max_tokens": 200,
                "tool_choice": {"type": "function", "function": {"name": "add"}}}) as r:
            body = await r.json()
    [call] = body["choices"][0]["message"]["tool_calls"]
    assert set(json.loads(call["function"]["arguments"])) == {"a", "b"}
    assert lines(caplog, "Generated response") == [
        f"Generated response {body['id']}: output: '[tool_calls: add({call['function']['arguments']})]', "
        f"finish_reason: {body['choices'][0]['finish_reason']}"]


async def test_params_are_built_only_when_info_logs_them(caplog, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("SamplingParams built for a line that is not logged")

    monkeypatch.setattr(server.serving, "logged_params", refuse)
    caplog.set_level(logging.WARNING, LOGGER)
    async with running_server(*LOGS) as server_, aiohttp.ClientSession() as http:
        async with http.post(server_.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}) as r:
            assert r.status == 200
        async with http.post(server_.url + "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2}) as r:
            assert r.status == 200


def test_a_stream_chunks_token_ids_print_as_a_list_of_ints(caplog):
    caplog.set_level(logging.DEBUG, LOGGER)
    ids = np.array([5, 6, 7, 8], dtype=np.int64)
    RequestLogger(None, True).delta("chatcmpl-a", "abc", ids[1:3], None)
    RequestLogger(1, True).delta("chatcmpl-b", "abc", ids[1:3], "stop")
    assert lines(caplog, "Generated response") == [
        "Generated response chatcmpl-a (streaming delta) details: output_token_ids: [6, 7]",
        "Generated response chatcmpl-a (streaming delta): output: 'abc', finish_reason: None",
        "Generated response chatcmpl-b (streaming delta) details: output_token_ids: [6]",
        "Generated response chatcmpl-b (streaming delta): output: 'a', finish_reason: stop"]


@pytest.mark.parametrize("level", [logging.INFO, logging.WARNING])
def test_the_token_id_list_is_only_made_for_the_debug_line(caplog, level):
    class NoList(np.ndarray):
        def tolist(self):
            raise AssertionError("token ids listed for a line that is not logged")

    caplog.set_level(level, LOGGER)
    RequestLogger(None, True).delta("chatcmpl-a", "abc", np.arange(3).view(NoList), None)


async def test_a_streamed_tool_calls_chunks_are_logged_by_their_arguments(caplog):
    caplog.set_level(logging.INFO, LOGGER)
    async with running_server(*LOGS, "--enable-auto-tool-choice", "--tool-call-parser", "pythonic") as server, \
            aiohttp.ClientSession() as http:
        async with http.post(server.url + "/v1/chat/completions", json={
                "messages": CHAT, "tools": [ADD], "max_tokens": 200, "stream": True,
                "tool_choice": {"type": "function", "function": {"name": "add"}}}) as r:
            stream = await r.text()
    chunks = [json.loads(line[len("data: "):]) for line in stream.splitlines()
              if line.startswith("data: {") and '"choices":[{' in line]
    chat_id = chunks[0]["id"]
    sent = [c["function"].get("arguments") or "" for chunk in chunks
            for c in chunk["choices"][0]["delta"].get("tool_calls") or ()]
    deltas = lines(caplog, f"Generated response {chat_id} (streaming delta): ")
    logged = [re.match(r".*: output: '\[tool_calls: (.*)\]', finish_reason: .*", d, re.S).group(1) for d in deltas]
    assert logged == [a for a in sent if a] and "".join(logged) == "".join(sent)
    assert json.loads("".join(sent)).keys() == {"a", "b"}
