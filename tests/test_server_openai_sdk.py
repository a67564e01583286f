"""The OpenAI Python SDK, unchanged, against the emulator: completions, chat, streaming with usage."""
from __future__ import annotations

import asyncio

import pytest

from server.testing import running_server

openai = pytest.importorskip("openai")
MODEL = "meta-llama/Llama-3.1-8B"


def with_client(scenario, *server_args):
    async def go():
        async with running_server("--speed", "1000", *server_args) as server:
            client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
            try:
                return await scenario(client)
            finally:
                await client.close()
    return asyncio.run(go())


def test_sdk_lists_the_model():
    async def scenario(client):
        return [m async for m in client.models.list()]
    models = with_client(scenario)
    assert [m.id for m in models] == [MODEL] and models[0].owned_by == "vllm"


def test_sdk_completion():
    async def scenario(client):
        return await client.completions.create(model=MODEL, prompt="Say something", max_tokens=8,
                                               extra_body={"ignore_eos": True})
    result = with_client(scenario)
    assert result.object == "text_completion" and result.choices[0].finish_reason == "length"
    assert result.usage.completion_tokens == 8 and result.choices[0].text


def test_sdk_chat():
    async def scenario(client):
        return await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi!"}],
                                                    max_completion_tokens=6, n=2)
    result = with_client(scenario)
    assert [c.index for c in result.choices] == [0, 1]
    assert all(c.message.role == "assistant" and c.message.content for c in result.choices)
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


def test_sdk_streaming_completion_with_usage():
    async def scenario(client):
        stream = await client.completions.create(model=MODEL, prompt="Count", max_tokens=5, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        return [chunk async for chunk in stream]
    chunks = with_client(scenario)
    assert len(chunks) == 6 and chunks[-1].usage.completion_tokens == 5 and chunks[-1].choices == []
    assert chunks[4].choices[0].finish_reason == "length"


def test_sdk_streaming_chat_with_usage():
    async def scenario(client):
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi!"}], max_completion_tokens=4, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        return [chunk async for chunk in stream]
    chunks = with_client(scenario)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage.completion_tokens == 4


def test_sdk_raises_its_own_errors_from_vllms_bodies():
    async def scenario(client):
        errors = []
        for call in (
            lambda: client.completions.create(model="nope", prompt="x", max_tokens=1),
            lambda: client.completions.create(model=MODEL, prompt="x", max_tokens=10**6),
        ):
            try:
                await call()
            except openai.APIStatusError as exc:
                errors.append((type(exc).__name__, exc.status_code, exc.body["message"][:30]))
        return errors
    errors = with_client(scenario)
    assert errors == [("NotFoundError", 404, "The model `nope` does not exis"),
                      ("BadRequestError", 400, "max_tokens=1000000 cannot be g")]


def test_sdk_with_api_key():
    async def scenario(client):
        try:
            await client.models.list()
        except openai.AuthenticationError as exc:
            return exc.status_code
    assert with_client(scenario, "--api-key", "right") == 401
