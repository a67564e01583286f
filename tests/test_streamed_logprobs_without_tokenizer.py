"""A streamed completion that asks for logprobs named by a tokenizer the server skipped (--skip-tokenizer-init):
vLLM fails it at its first chunk (its stream's error event, then [DONE]) and its requests are aborted as the
stream's generators close, not run to their end."""
from __future__ import annotations

import json

import aiohttp

from server.testing import running_server

PROMPT = [128000, 9906, 1917, 374, 264]
UNNAMED = {"error": {"message": "Unable to get tokenizer because `skip_tokenizer_init=True`",
                     "type": "BadRequestError", "param": None, "code": 400}}


async def test_the_stream_fails_at_its_first_chunk_and_its_requests_are_aborted(tmp_path):
    log_path = tmp_path / "requests.jsonl"
    # real-time pace: run to its end, the 4000 tokens would take tens of seconds; aborted, it stops at once
    async with running_server("--speed", "1", "--skip-tokenizer-init", "--request-log", str(log_path)) as server, \
            aiohttp.ClientSession() as http:
        async with http.post(server.url + "/v1/completions", json={
                "prompt": [PROMPT, PROMPT[:3]], "n": 2, "max_tokens": 4000, "ignore_eos": True, "logprobs": 1,
                "stream": True}) as r:
            assert r.status == 200
            raw = (await r.read()).decode()
        assert not server.engine.sim.active  # nothing left running once the stream has ended
    events = [e[len("data: "):] for e in raw.split("\n\n") if e]
    assert [json.loads(events[0]), events[1]] == [UNNAMED, "[DONE]"] and len(events) == 2
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert len(records) == 4 and {r["finish_reason"] for r in records} == {"abort"}
    assert all(r["output_tokens"] < 4000 for r in records)
