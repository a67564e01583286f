"""The OpenAI Python SDK, unchanged, against the emulator: completions, chat, streaming with usage."""
from __future__ import annotations

import pytest
import pytest_asyncio

from server.testing import running_server

openai = pytest.importorskip("openai")
MODEL = "meta-llama/Llama-3.1-8B"
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client():
    async with running_server("--speed", "1000") as server:
        sdk = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        try:
            yield sdk
        finally:
            await sdk.close()


async def test_sdk_lists_the_model(client):
    models = [m async for m in client.models.list()]
    assert [m.id for m in models] == [MODEL] and models[0].owned_by == "vllm"


async def test_sdk_completion(client):
    result = await client.completions.create(model=MODEL, prompt="Say something", max_tokens=8,
                                             extra_body={"ignore_eos": True})
    assert result.object == "text_completion" and result.choices[0].finish_reason == "length"
    assert result.usage.completion_tokens == 8 and result.choices[0].text


async def test_sdk_chat(client):
    result = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi!"}],
                                                  max_completion_tokens=6, n=2)
    assert [c.index for c in result.choices] == [0, 1]
    assert all(c.message.role == "assistant" and c.message.content for c in result.choices)
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


async def test_sdk_streaming_completion_with_usage(client):
    stream = await client.completions.create(model=MODEL, prompt="Count", max_tokens=5, stream=True,
                                             stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = [chunk async for chunk in stream]
    assert len(chunks) == 6 and chunks[-1].usage.completion_tokens == 5 and chunks[-1].choices == []
    assert chunks[4].choices[0].finish_reason == "length"


async def test_sdk_streaming_chat_with_usage(client):
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi!"}], max_completion_tokens=4, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage.completion_tokens == 4


async def test_sdk_raises_its_own_errors_from_vllms_bodies(client):
    errors = []
    for call in (
        lambda: client.completions.create(model="nope", prompt="x", max_tokens=1),
        lambda: client.completions.create(model=MODEL, prompt="x", max_tokens=10**6),
    ):
        with pytest.raises(openai.APIStatusError) as caught:
            await call()
        errors.append((type(caught.value).__name__, caught.value.status_code, caught.value.body["message"][:30]))
    assert errors == [("NotFoundError", 404, "The model `nope` does not exis"),
                      ("BadRequestError", 400, "max_tokens=1000000 cannot be g")]


async def test_sdk_with_api_key():
    async with running_server("--speed", "1000", "--api-key", "right") as server:
        sdk = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        try:
            with pytest.raises(openai.AuthenticationError) as caught:
                await sdk.models.list()
        finally:
            await sdk.close()
    assert caught.value.status_code == 401
