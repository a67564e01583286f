"""Structured outputs (`response_format`, `structured_outputs`): the synthetic text satisfies the
constraint, keeps the engine's token count, streams the same text, and the invalid forms get vLLM
0.33's 400s."""
from __future__ import annotations

import json
import re

import aiohttp
import numpy as np
import pytest

from profiles.tokenizer import load_tokenizer
from server.structured import Constraint, StructuredText, regex_instance, schema_instance
from server.testing import running_server

FAST = ("--speed", "1000")
USER = [{"role": "user", "content": "hi"}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "tags": {"type": "array", "items": {"$ref": "#/$defs/Tag"}, "minItems": 2},
        "kind": {"enum": ["cat", "dog"]},
        "ok": {"type": "boolean"},
        "score": {"anyOf": [{"type": "number"}, {"type": "null"}]},
        "id": {"const": 7},
        "born": {"type": "string", "format": "date"},
    },
    "required": ["name", "age"],
    "$defs": {"Tag": {"type": "string", "maxLength": 5}},
}


def check_person(value: dict) -> None:
    assert set(value) == set(PERSON["properties"])
    assert isinstance(value["name"], str) and value["name"]
    assert isinstance(value["age"], int) and 18 <= value["age"] <= 99
    assert len(value["tags"]) >= 2 and all(isinstance(t, str) and len(t) <= 5 for t in value["tags"])
    assert value["kind"] in ("cat", "dog") and isinstance(value["ok"], bool) and value["id"] == 7
    assert isinstance(value["score"], float)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", value["born"])


async def post(http, url, body):
    async with http.post(url, json=body) as r:
        return r.status, await r.json()


async def stream_text(http, url, body, key) -> tuple[str, str]:
    async with http.post(url, json={**body, "stream": True}) as r:
        raw = (await r.read()).decode()
    text, finish = "", None
    for block in raw.split("\n\n"):
        if block.startswith("data: {"):
            for choice in json.loads(block[6:])["choices"]:
                text += key(choice) or ""
                finish = choice.get("finish_reason") or finish
    return text, finish


def test_schema_instance_follows_the_schema():
    words = iter(" w" for _ in range(1000))
    for seed in range(20):
        value = schema_instance(PERSON, np.random.default_rng(seed), lambda: next(words))
        check_person(json.loads(json.dumps(value, default=lambda v: v.text())))


@pytest.mark.parametrize("pattern", [r"\d{3}-[A-Z]{2}(foo|bar)\w+", r"(yes|no)", r"[a-f0-9]{8}", r"a+b*c?\.x{2,4}",
                                     r"[^xyz]+@example\.com"])
def test_regex_instance_matches_in_full(pattern):
    for seed in range(10):
        assert re.fullmatch(pattern, regex_instance(pattern, np.random.default_rng(seed)))


@pytest.mark.parametrize("tokenizer", ["llama3", "qwen3", "builtin"])
def test_json_text_has_the_planned_token_count(tokenizer):
    tok = load_tokenizer("builtin") if tokenizer == "builtin" else load_tokenizer(None, tokenizer)
    text = StructuredText(Constraint("json", PERSON), tok, [w for _, w in tok.output_pool])
    for target in (80, 117, 150, 400):
        out = text.text(target, np.random.default_rng(target), 2000)
        ids, pieces = text.tokens(out)
        assert len(ids) == target and "".join(pieces) == out
        check_person(json.loads(out))


async def test_json_object_and_json_schema_chat_outputs_are_valid_json_of_the_drawn_length():
    async with running_server(*FAST) as server:
        url = server.url + "/v1/chat/completions"
        async with aiohttp.ClientSession() as http:
            for seed in range(4):
                status, body = await post(http, url, {"messages": USER, "seed": seed, "return_token_ids": True,
                                                      "response_format": {"type": "json_object"}})
                assert status == 200, body
                choice = body["choices"][0]
                assert choice["finish_reason"] == "stop"
                assert isinstance(json.loads(choice["message"]["content"]), dict)
                # the text, then EOS: every token the engine produced
                assert body["usage"]["completion_tokens"] == len(choice["token_ids"])
                schema = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
                status, body = await post(http, url, {"messages": USER, "seed": seed, "response_format": schema})
                assert status == 200, body
                check_person(json.loads(body["choices"][0]["message"]["content"]))
                assert body["usage"]["completion_tokens"] > 30  # the drawn length, not the bare skeleton


async def test_stream_sends_the_same_text_and_max_tokens_cuts_the_json():
    async with running_server(*FAST) as server:
        async with aiohttp.ClientSession() as http:
            body = {"messages": USER, "seed": 5, "structured_outputs": {"json": PERSON}, "max_tokens": 2000}
            url = server.url + "/v1/chat/completions"
            _, full = await post(http, url, body)
            text, finish = await stream_text(http, url, body, lambda c: c["delta"].get("content"))
            assert text == full["choices"][0]["message"]["content"] and finish == full["choices"][0]["finish_reason"]
            check_person(json.loads(text))
            _, cut = await post(http, url, {**body, "max_tokens": 12})
            assert cut["choices"][0]["finish_reason"] == "length" and cut["usage"]["completion_tokens"] == 12
            assert cut["choices"][0]["message"]["content"].startswith('{"name": "')
            with pytest.raises(json.JSONDecodeError):
                json.loads(cut["choices"][0]["message"]["content"])
            # ignore_eos: max_tokens tokens of one JSON text, cut
            _, long = await post(http, url, {**body, "ignore_eos": True, "max_tokens": 300})
            assert long["usage"]["completion_tokens"] == 300 and long["choices"][0]["finish_reason"] == "length"
            assert long["choices"][0]["message"]["content"].startswith('{"name": "')


async def test_completions_take_structured_outputs_and_response_format():
    async with running_server(*FAST) as server:
        url = server.url + "/v1/completions"
        async with aiohttp.ClientSession() as http:
            _, body = await post(http, url, {"prompt": "x", "structured_outputs": {"choice": ["alpha", "beta"]}})
            assert body["choices"][0]["text"] in ("alpha", "beta") and body["choices"][0]["finish_reason"] == "stop"
            _, body = await post(http, url, {"prompt": "x", "max_tokens": 50,
                                             "structured_outputs": {"regex": r"[A-Z]{3}-\d{4}"}})
            assert re.fullmatch(r"[A-Z]{3}-\d{4}", body["choices"][0]["text"])
            _, body = await post(http, url, {"prompt": "x", "max_tokens": 500, "seed": 1,
                                             "structured_outputs": {"json": json.dumps(PERSON),
                                                                    "disable_any_whitespace": True}})
            check_person(json.loads(body["choices"][0]["text"]))
            assert ", " not in body["choices"][0]["text"].split('"tags"')[1]  # compact separators
            text, _ = await stream_text(http, url, {"prompt": "x", "max_tokens": 500, "seed": 2,
                                                    "response_format": {"type": "json_object"}},
                                        lambda c: c["text"])
            assert isinstance(json.loads(text), dict)
            _, body = await post(http, url, {"prompt": "x", "max_tokens": 3, "response_format": {"type": "text"}})
            assert body["choices"][0]["text"]


@pytest.mark.parametrize("fields, message", [
    ({"response_format": {"type": "json_schema"}},
     "When response_format type is 'json_schema', the 'json_schema' field must be provided. "
     "(parameter=response_format)"),
    ({"structured_outputs": {"json": {}, "regex": "a"}},
     "You can only use one kind of constraints for structured outputs ('json', 'regex' or 'choice')."),
    ({"structured_outputs": {"json": {}, "grammar": "a"}},
     "You can only use one kind of structured outputs constraint but multiple are specified: {'json': {}, "
     "'regex': None, 'choice': None, 'grammar': 'a', 'json_object': None, 'disable_any_whitespace': False, "
     "'disable_additional_properties': False, 'whitespace_pattern': None, 'structural_tag': None, "
     "'_backend': None, '_backend_was_auto': False}"),
    ({"structured_outputs": {}},
     "You must use one kind of structured outputs constraint but none are specified: {'json': None, "
     "'regex': None, 'choice': None, 'grammar': None, 'json_object': None, 'disable_any_whitespace': False, "
     "'disable_additional_properties': False, 'whitespace_pattern': None, 'structural_tag': None, "
     "'_backend': None, '_backend_was_auto': False}"),
    ({"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}},
     "You can only use one kind of structured outputs constraint but multiple are specified: {'json': None, "
     "'regex': None, 'choice': ['a'], 'grammar': None, 'json_object': True, 'disable_any_whitespace': False, "
     "'disable_additional_properties': False, 'whitespace_pattern': None, 'structural_tag': None, "
     "'_backend': None, '_backend_was_auto': False}"),
    ({"structured_outputs": {"json": "{not json"}}, "Invalid JSON grammar specification."),
    ({"structured_outputs": {"regex": "(a"}}, "Failed to transform regex into a grammar: "),
    ({"structured_outputs": {"choice": []}},
     "XGrammar structured outputs backend does not support this structured outputs specification"),
    ({"structured_outputs": {"json": {"type": "array", "minItems": "many"}}},
     "Failed to transform json schema into a grammar: "),
])
async def test_invalid_structured_outputs_get_vllms_400(fields, message):
    async with running_server(*FAST) as server:
        async with aiohttp.ClientSession() as http:
            for path, base in (("/v1/chat/completions", {"messages": USER}), ("/v1/completions", {"prompt": "x"})):
                status, body = await post(http, server.url + path, {**base, **fields})
                assert status == 400 and body["error"]["message"].startswith(message), body


async def test_huge_constraints_are_bounded_by_max_tokens():
    async with running_server(*FAST) as server:
        async with aiohttp.ClientSession() as http:
            for constraint in ({"json": {"type": "array", "items": {"type": "string", "minLength": 10**9},
                                         "minItems": 10**9}},
                               {"regex": "((a{60000}){60000}){60000}"}):
                status, body = await post(http, server.url + "/v1/completions",
                                          {"prompt": "x", "max_tokens": 20, "structured_outputs": constraint})
                assert status == 200 and body["usage"]["completion_tokens"] == 20
                assert body["choices"][0]["finish_reason"] == "length"


async def test_response_format_of_an_unknown_type_is_a_schema_error():
    async with running_server(*FAST) as server:
        async with aiohttp.ClientSession() as http:
            status, body = await post(http, server.url + "/v1/chat/completions",
                                      {"messages": USER, "response_format": {"type": "xml"}})
    assert status == 400 and body["error"]["type"] == "Bad Request"
    assert "Input should be 'text', 'json_object' or 'json_schema'" in body["error"]["message"]
