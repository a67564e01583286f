"""--enable-log-requests, --enable-log-outputs and --max-log-len, as vLLM 0.33's RequestLogger writes them: a
"Received request" line per engine request (its SamplingParams repr, its LoRA request) as each route hands it
to the engine, and "Generated response" lines as responses end, under vLLM's ids and logger name."""
from __future__ import annotations

import logging
import re

import aiohttp
import pytest

from emulator.lora import LoRAAdapter
from server.protocol import StructuredOutputsParams
from server.request_log import RequestLogger, lora_request_repr, sampling_params_repr
from server.sampling_params import SamplingParams
from server.serving import frontend_switches
from server.testing import running_server, serve_args

LOGGER = "vllm.entrypoints.serve.utils.request_logger"
LOGS = ("--speed", "1000", "--enable-log-requests", "--enable-log-outputs")
PROMPT = list(range(1000, 1010))


def lines(caplog, prefix: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.getMessage().startswith(prefix)]


def test_sampling_params_repr_is_vllms_field_order():
    params = SamplingParams(n=2, temperature=0.5, stop="x", max_tokens=7, seed=3,
                            structured_outputs=StructuredOutputsParams(choice=["a", "b"]), extra_args={"k": 1})
    assert sampling_params_repr(params) == (
        "SamplingParams(n=2, presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0, "
        "temperature=0.5, watermarking=None, top_p=1.0, top_k=0, min_p=0.0, seed=3, stop=['x'], stop_token_ids=[], "
        "bad_words=[], thinking_token_budget=None, include_stop_str_in_output=False, ignore_eos=False, "
        "max_tokens=7, min_tokens=0, logprobs=None, prompt_logprobs=None, skip_special_tokens=True, "
        "spaces_between_special_tokens=True, structured_outputs=StructuredOutputsParams(json=None, regex=None, "
        "choice=['a', 'b'], grammar=None, json_object=None, disable_any_whitespace=False, "
        "disable_additional_properties=False, whitespace_pattern=None, structural_tag=None, _backend=None, "
        "_backend_was_auto=False), extra_args={'k': 1})")
    assert lora_request_repr(None) == "None"
    assert lora_request_repr(LoRAAdapter("sql", 1, "org/sql")) == (
        "LoRARequest(lora_name='sql', lora_int_id=1, lora_path='org/sql', base_model_name=None, "
        "load_inplace=False, is_3d_lora_weight=False)")


def test_flags_build_the_logger_and_check_max_log_len():
    assert frontend_switches(serve_args())["request_logger"] is None
    logger = frontend_switches(serve_args("--enable-log-requests", "--max-log-len", "5"))["request_logger"]
    assert (logger.max_log_len, logger.log_outputs, logger.log_deltas) == (5, False, True)
    assert frontend_switches(serve_args(*LOGS[2:]))["request_logger"].log_outputs
    with pytest.raises(ValueError, match="argument --max-log-len: invalid int value: 'x'"):
        frontend_switches(serve_args("--enable-log-requests", "--max-log-len", "x"))


def test_max_log_len_cuts_prompt_ids_and_outputs(caplog):
    caplog.set_level(logging.DEBUG, LOGGER)
    logger = RequestLogger(3, True)
    logger.inputs("cmpl-a-0", None, list(range(10)), SamplingParams, None)
    logger.inputs("cmpl-c-0", "abcdef", [1], None, None)
    logger.outputs("completion", "cmpl-a", "abcdef", [5, 6, 7, 8], "length", False)
    logger.outputs("chat", "chatcmpl-b", "abcdef", [5, 6, 7, 8], "stop", True)
    assert lines(caplog, "Request ") == ["Request cmpl-a-0 details: prompt: None, prompt_token_ids: [0, 1, 2], "
                                         "prompt_embeds shape: None.",
                                         "Request cmpl-c-0 details: prompt: 'abc', prompt_token_ids: [1], "
                                         "prompt_embeds shape: None."]
    assert lines(caplog, "Received request cmpl-c-0") == [
        "Received request cmpl-c-0: params: None, lora_request: None."]
    assert lines(caplog, "Generated response") == [
        "Generated response cmpl-a details: output_token_ids: [5, 6, 7]",
        "Generated response cmpl-a: output: 'abc', finish_reason: length",
        "Generated response chatcmpl-b (streaming complete) details: output_token_ids: None",
        "Generated response chatcmpl-b (streaming complete): output: 'abc', finish_reason: streaming_complete"]


async def test_completions_log_each_prompt_in_and_each_choice_out(caplog):
    caplog.set_level(logging.INFO, LOGGER)
    async with running_server(*LOGS) as server, aiohttp.ClientSession() as http:
        async with http.post(server.url + "/v1/completions", json={
                "prompt": [PROMPT, PROMPT[:5]], "max_tokens": 4, "ignore_eos": True, "temperature": 0.5,
                "n": 2}) as r:
            body = await r.json()
    received = lines(caplog, "Received request")
    assert len(received) == 2
    for p, line in enumerate(received):
        assert line.startswith(f"Received request {body['id']}-{p}: params: SamplingParams(n=2, ")
        assert "temperature=0.5, " in line and "max_tokens=4, " in line and line.endswith(", lora_request: None.")
    generated = lines(caplog, "Generated response")
    texts = [c["text"] for c in body["choices"]]
    assert generated == [f"Generated response {body['id']}: output: {t!r}, finish_reason: length" for t in texts]


@pytest.mark.parametrize("deltas", [(), ("--disable-log-deltas",)])
async def test_streamed_chat_logs_each_chunk_then_its_whole_text(caplog, deltas):
    caplog.set_level(logging.INFO, LOGGER)
    async with running_server(*LOGS, *deltas) as server, aiohttp.ClientSession() as http:
        async with http.post(server.url + "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True,
                "ignore_eos": True}) as r:
            stream = await r.text()
    chat_id = re.search(r'"id":"(chatcmpl-[^"]+)"', stream).group(1)
    pieces = [p for p in re.findall(r'"content":"([^"]*)"', stream) if p]
    [received] = lines(caplog, "Received request")
    assert received.startswith(f"Received request {chat_id}: params: SamplingParams(n=1, ")
    chunks = [] if deltas else [f"Generated response {chat_id} (streaming delta): output: {piece!r}, "
                                f"finish_reason: {'length' if i == len(pieces) - 1 else None}"
                                for i, piece in enumerate(pieces)]
    assert lines(caplog, "Generated response") == [*chunks, (
        f"Generated response {chat_id} (streaming complete): output: {''.join(pieces)!r}, "
        f"finish_reason: streaming_complete")]


async def test_without_log_outputs_only_requests_are_logged(caplog):
    caplog.set_level(logging.INFO, LOGGER)
    async with running_server("--speed", "1000", "--enable-log-requests") as server, \
            aiohttp.ClientSession() as http:
        async with http.post(server.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}) as r:
            assert r.status == 200
    assert len(lines(caplog, "Received request")) == 1
    assert lines(caplog, "Generated response") == []


async def test_no_flag_no_lines(caplog):
    caplog.set_level(logging.DEBUG, LOGGER)
    async with running_server("--speed", "1000") as server, aiohttp.ClientSession() as http:
        async with http.post(server.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}) as r:
            assert r.status == 200
    assert [r for r in caplog.records if r.name == LOGGER] == []


async def test_generate_responses_and_batch_chat_log_as_their_vllm_routes(caplog):
    caplog.set_level(logging.INFO, LOGGER)
    async with running_server(*LOGS, "--enable-scale-out") as server, aiohttp.ClientSession() as http:
        async with http.post(server.url + "/inference/v1/generate", json={
                "token_ids": PROMPT, "request_id": "g1",
                "sampling_params": {"ignore_eos": True, "n": 2}}) as r:
            generated = await r.json()
        async with http.post(server.url + "/v1/responses", json={"input": "hi", "max_output_tokens": 3}) as r:
            response = await r.json()
        async with http.post(server.url + "/v1/chat/completions/batch", headers={"X-Request-Id": "b"}, json={
                "messages": [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]],
                "max_tokens": 2, "temperature": 0.2}) as r:
            assert r.status == 200
    received = lines(caplog, "Received request")
    assert [line.split(":")[0] for line in received] == [
        "Received request generate-tokens-g1", f"Received request {response['id']}_0",
        "Received request chatcmpl-b_0", "Received request chatcmpl-b_1"]
    assert "n=2, " in received[0] and "max_tokens=16, " not in received[0]  # the server's max_tokens, not 16
    assert "max_tokens=3, " in received[1] and received[1].endswith("extra_args={}), lora_request: None.")
    assert all("temperature=0.2, " in line and "max_tokens=2, " in line for line in received[2:])
    outputs = lines(caplog, "Generated response")
    assert outputs[:2] == ["Generated response generate-tokens-g1: output: '', finish_reason: length"] * 2
    [answer] = outputs[2:]  # batch chat logs no outputs
    assert answer.startswith(f"Generated response {response['id']}: output: ")
    assert answer.endswith(", finish_reason: length") and generated["choices"]


async def test_a_responses_forced_call_logs_the_tool_parsers_params(caplog):
    # vLLM's tool parser adjusts a Responses request as a chat's: hermes' structural tag, special tokens kept
    caplog.set_level(logging.INFO, LOGGER)
    tool = {"type": "function", "name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer"}}, "required": ["a"]}}
    async with running_server(*LOGS, "--enable-auto-tool-choice", "--tool-call-parser", "hermes") as server, \
            aiohttp.ClientSession() as http:
        async with http.post(server.url + "/v1/responses", json={
                "input": "hi", "tools": [tool], "tool_choice": "required", "max_output_tokens": 200,
                "text": {"format": {"type": "json_object"}}}) as r:
            response = await r.json()
        async with http.post(server.url + "/v1/responses", json={  # a strict tool: "auto" is constrained too
                "input": "hi", "tools": [{**tool, "strict": True}], "max_output_tokens": 5,
                "text": {"format": {"type": "text"}}}) as r:
            auto = await r.json()
    received, auto_received = lines(caplog, "Received request")
    assert '"type": "triggered_tags", "triggers": ["<tool_call>"]' in auto_received
    assert auto["text"] is None and auto["output"][0]["type"] == "message"
    assert "skip_special_tokens=False, " in received
    tag = re.search(r"structural_tag='(.*?)', _backend=", received).group(1)
    assert tag.startswith('{"type": "structural_tag", "format": {"type": "tags_with_separator", ')
    assert "json=None, " in received and "json_object=None, " in received  # the tag replaced text.format
    assert response["text"] is None and [item["type"] for item in response["output"]] == ["function_call"]
