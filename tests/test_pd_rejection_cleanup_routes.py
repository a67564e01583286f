"""vLLM's kv-transfer rejection cleanup runs on the Responses and Messages routes too: create_responses wraps
_create_responses in _with_kv_transfer_rejection_cleanup (entrypoints/openai/responses/serving.py), and the
Messages route answers through the wrapped create_chat_completion (entrypoints/anthropic/serving.py), so a decode
pod that turns away a request whose kv_transfer_params name a prefill frees that prefill unread (before, only
chat and completions did: test_pd_rejection_cleanup; the prefill waited for its lease). Two emulated pods."""
from __future__ import annotations

import aiohttp

from server.testing import running_server
from test_kv_read_notice import FAST, PRODUCER
from test_pd_abort_notice import prefill_params
from test_pd_rejection_cleanup import CONSUMER, _held_once

HI = [{"role": "user", "content": "hi"}]
MODEL = "meta-llama/Llama-3.1-8B"  # (the Messages API needs a model)


async def test_a_decode_pods_responses_and_messages_routes_free_the_prefills_they_turn_away():
    async with running_server(*FAST, "--kv-transfer-config", PRODUCER) as prefill, \
            running_server(*FAST, "--kv-transfer-config", CONSUMER) as decode, aiohttp.ClientSession() as http:
        turned_away = [  # (route, body, status): each turned away before the decode pod's engine
            ("/v1/responses", {"model": "nope", "input": "hi"}, 404),
            ("/v1/responses", {"model": "nope", "input": "hi", "stream": True}, 404),  # before its stream opened
            ("/v1/responses", {"input": "hi", "max_output_tokens": 10 ** 6}, 400),  # past max_model_len
            ("/v1/messages", {"model": "nope", "max_tokens": 5, "messages": HI}, 404),
            ("/v1/messages", {"model": MODEL, "max_tokens": 10 ** 6, "messages": HI}, 400),  # past max_model_len
        ]
        prompts = [list(range(1000 + 3000 * i, 3000 + 3000 * i)) for i in range(len(turned_away) + 1)]
        params = [await prefill_params(http, prefill.url, prompt) for prompt in prompts]
        held = prefill.engine.sim.transfers.held
        assert len(held) == len(prompts)
        for (route, body, status), p in zip(turned_away, params):
            async with http.post(decode.url + route, json={**body, "kv_transfer_params": p}) as r:
                assert r.status == status, (route, body, await r.text())
        assert await _held_once(prefill.engine.sim, 1) == 1  # (the lease is far away: it was the notices)
        assert [key[1] for key in held] == [params[-1]["remote_request_id"]]
        stats = prefill.engine.sim.transfers.stats[0]
        assert (stats.pd_sent, stats.pd_expired, stats.pd_late_reads) == (0, 0, 0)  # freed unread
        # one the Messages route takes reads its prefill: nothing freed unread
        async with http.post(decode.url + "/v1/messages", json={
                "model": MODEL, "max_tokens": 5, "messages": HI, "kv_transfer_params": params[-1]}) as r:
            assert r.status == 200, await r.text()
        assert await _held_once(prefill.engine.sim, 0) == 0
        assert prefill.engine.sim.transfers.stats[0].pd_sent == 1
