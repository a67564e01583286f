"""The HTTP API's happy paths: every route answers with vLLM 0.33's shapes.

The expected key orders and values come from ../shared/reference/vllm-0.33.0-json-shapes.txt
(produced by vLLM's own pydantic classes) and vllm-surface.md §1.
"""
from __future__ import annotations

import asyncio
import json

import aiohttp

from server.testing import running_server

FAST = ("--speed", "1000")
MODEL = "meta-llama/Llama-3.1-8B"


async def sse_events(response: aiohttp.ClientResponse) -> list:
    """The `data:` payloads of a stream, decoded, with "[DONE]" kept as a string."""
    body = (await response.read()).decode()
    assert body.endswith("data: [DONE]\n\n")
    events = []
    for block in body.split("\n\n"):
        if block:
            assert block.startswith("data: "), block
            payload = block[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


async def test_models_card_has_root_and_max_model_len():
    async with running_server(*FAST, "--served-model-name", "m", "alias") as server:
        async with aiohttp.ClientSession() as http:
            async with http.get(server.url + "/v1/models") as r:
                assert r.status == 200
                body = await r.json()
    assert [c["id"] for c in body["data"]] == ["m", "alias"]
    card = body["data"][0]
    assert list(card) == ["id", "object", "created", "owned_by", "root", "parent", "max_model_len", "permission"]
    assert card["root"] == MODEL and card["max_model_len"] == 131072 and card["owned_by"] == "vllm"
    assert list(card["permission"][0]) == [
        "id", "object", "created", "allow_create_engine", "allow_sampling", "allow_logprobs",
        "allow_search_indices", "allow_view", "allow_fine_tuning", "organization", "group", "is_blocking"]


async def test_health_ping_version_load_and_kv_event_sources():
    async with running_server(*FAST) as server:
        async with aiohttp.ClientSession() as http:
            for method, path in (("GET", "/health"), ("GET", "/ping"), ("POST", "/ping")):
                async with http.request(method, server.url + path) as r:
                    assert r.status == 200 and await r.read() == b""
            async with http.get(server.url + "/version") as r:
                assert await r.json() == {"version": "0.33.0"}
            async with http.get(server.url + "/load") as r:
                assert await r.json() == {"server_load": 0}
            async with http.get(server.url + "/kv_event_sources") as r:
                assert await r.json() == {}


async def test_completion_non_streaming_has_every_key_of_vllms_response():
    async with running_server(*FAST) as server:
        async with aiohttp.ClientSession() as http:
            payload = {"model": MODEL, "prompt": "Hello there, how are you?", "max_tokens": 7,
                       "ignore_eos": True}
            async with http.post(server.url + "/v1/completions", json=payload) as r:
                assert r.status == 200
                body = await r.json()
    assert list(body) == ["id", "object", "created", "model", "choices", "service_tier", "system_fingerprint",
                          "usage", "kv_transfer_params", "ec_transfer_params", "metrics"]
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["system_fingerprint"].startswith("vllm-0.33.0-")
    choice = body["choices"][0]
    assert list(choice) == ["index", "text", "logprobs", "finish_reason", "stop_reason", "token_ids",
                            "prompt_logprobs", "prompt_token_ids", "routed_experts", "weight_versions"]
    assert choice["finish_reason"] == "length" and choice["text"]
    assert body["usage"] == {"prompt_tokens": body["usage"]["prompt_tokens"],
                             "total_tokens": body["usage"]["prompt_tokens"] + 7, "completion_tokens": 7,
                             "prompt_tokens_details": None, "completion_tokens_details": None}


async def test_completion_stream_chunks_and_usage_match_vllm_shapes():
    async with running_server(*FAST) as server:
        async with aiohttp.ClientSession() as http:
            payload = {"prompt": "Hello", "max_tokens": 4, "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}}
            async with http.post(server.url + "/v1/completions", json=payload,
                                 headers={"X-Request-Id": "abc"}) as r:
                assert r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
                events = await sse_events(r)
    tokens, usage, done = events[:4], events[4], events[5]
    assert done == "[DONE]"
    for i, chunk in enumerate(tokens):
        assert chunk["id"] == "cmpl-abc"
        assert list(chunk) == ["id", "object", "created", "model", "choices", "kv_transfer_params"]
        assert list(chunk["choices"][0]) == ["index", "text", "logprobs", "finish_reason", "stop_reason",
                                             "prompt_token_ids", "token_ids", "weight_versions"]
        assert chunk["choices"][0]["finish_reason"] == ("length" if i == 3 else None)
    assert list(usage) == ["id", "object", "created", "model", "choices", "usage", "system_fingerprint"]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4
    assert list(usage["usage"]) == ["prompt_tokens", "total_tokens", "completion_tokens"]


async def test_completion_stream_without_usage_stamps_fingerprint_on_the_terminal_chunk():
    async with running_server(*FAST) as server:
        async with aiohttp.ClientSession() as http:
            payload = {"prompt": "Hello", "max_tokens": 2, "ignore_eos": True, "stream": True}
            async with http.post(server.url + "/v1/completions", json=payload) as r:
                events = await sse_events(r)
    assert len(events) == 3
    assert "system_fingerprint" not in events[0]
    assert list(events[1]) == ["id", "object", "created", "model", "choices", "system_fingerprint",
                               "kv_transfer_params"]


async def test_continuous_usage_is_cumulative_per_chunk():
    async with running_server(*FAST) as server:
        async with aiohttp.ClientSession() as http:
            payload = {"prompt": "Hello", "max_tokens": 3, "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
            async with http.post(server.url + "/v1/completions", json=payload) as r:
                events = await sse_events(r)
    prompt = events[-2]["usage"]["prompt_tokens"]
    assert [e["usage"] for e in events[:3]] == [
        {"prompt_tokens": prompt, "total_tokens": prompt + k, "completion_tokens": k} for k in (1, 2, 3)]


async def test_chat_stream_starts_with_role_chunk_and_ends_with_usage():
    async with running_server(*FAST) as server:
        async with aiohttp.ClientSession() as http:
            payload = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                       "max_completion_tokens": 3, "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}}
            async with http.post(server.url + "/v1/chat/completions", json=payload,
                                 headers={"X-Request-Id": "xyz"}) as r:
                events = await sse_events(r)
    role, tokens, usage = events[0], events[1:4], events[4]
    assert role["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}]
    assert list(role) == ["id", "object", "created", "model", "choices", "prompt_token_ids", "prompt_text"]
    assert role["id"] == "chatcmpl-xyz" and role["object"] == "chat.completion.chunk"
    assert list(tokens[0]["choices"][0]) == ["index", "delta", "logprobs", "finish_reason", "token_ids"]
    assert list(tokens[2]["choices"][0]) == ["index", "delta", "logprobs", "finish_reason", "stop_reason",
                                             "token_ids", "weight_versions"]
    assert tokens[2]["choices"][0]["finish_reason"] == "length"
    assert list(usage) == ["id", "object", "created", "model", "choices", "usage", "system_fingerprint"]
    assert usage["usage"]["completion_tokens"] == 3


async def test_chat_non_streaming_has_every_key_of_vllms_response():
    async with running_server(*FAST) as server:
        async with aiohttp.ClientSession() as http:
            payload = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "ignore_eos": True}
            async with http.post(server.url + "/v1/chat/completions", json=payload) as r:
                body = await r.json()
    assert list(body) == ["id", "object", "created", "model", "choices", "service_tier", "system_fingerprint",
                          "usage", "prompt_logprobs", "prompt_token_ids", "prompt_text", "kv_transfer_params",
                          "ec_transfer_params", "metrics"]
    message = body["choices"][0]["message"]
    assert list(message) == ["role", "content", "refusal", "annotations", "audio", "function_call", "reasoning"]
    assert body["usage"]["completion_tokens"] == 5


async def test_n_choices_and_several_prompts_index_like_vllm():
    async with running_server(*FAST) as server:
        async with aiohttp.ClientSession() as http:
            payload = {"prompt": ["one two", "three four five"], "n": 2, "max_tokens": 3, "ignore_eos": True}
            async with http.post(server.url + "/v1/completions", json=payload) as r:
                body = await r.json()
            chat = {"messages": [{"role": "user", "content": "hi"}], "n": 3, "max_tokens": 2,
                    "ignore_eos": True, "stream": True}
            async with http.post(server.url + "/v1/chat/completions", json=chat) as r:
                events = await sse_events(r)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["completion_tokens"] == 12
    roles = [e["choices"][0]["index"] for e in events[:3]]
    assert roles == [0, 1, 2] and all(e["choices"][0]["delta"].get("role") for e in events[:3])
    assert sum(1 for e in events[3:-1] if e["choices"][0]["finish_reason"]) == 3


async def test_seed_makes_output_reproducible():
    async with running_server(*FAST) as server:
        async with aiohttp.ClientSession() as http:
            texts = []
            for _ in range(2):
                payload = {"prompt": "x", "max_tokens": 50, "seed": 7}
                async with http.post(server.url + "/v1/completions", json=payload) as r:
                    texts.append((await r.json())["choices"][0]["text"])
    assert texts[0] == texts[1]


async def test_output_ends_with_eos_before_max_tokens_as_stop():
    async with running_server(*FAST) as server:
        async with aiohttp.ClientSession() as http:
            reasons = []
            for seed in range(20):
                payload = {"prompt": "x", "max_tokens": 2000, "seed": seed, "return_token_ids": True}
                async with http.post(server.url + "/v1/completions", json=payload) as r:
                    choice = (await r.json())["choices"][0]
                reasons.append(choice["finish_reason"])
                if choice["finish_reason"] == "stop":
                    assert choice["token_ids"][-1] == 128001  # Llama 3's <|end_of_text|>, not shown as text
                    assert choice["stop_reason"] is None
    assert set(reasons) == {"stop"}  # the length distribution ends by 1000 tokens


async def test_stop_string_cuts_the_text_and_is_reported():
    async with running_server(*FAST) as server:
        async with aiohttp.ClientSession() as http:
            payload = {"prompt": "x", "max_tokens": 200, "ignore_eos": True, "seed": 1, "stop": [" the"]}
            async with http.post(server.url + "/v1/completions", json=payload) as r:
                choice = (await r.json())["choices"][0]
            payload["include_stop_str_in_output"] = True
            async with http.post(server.url + "/v1/completions", json=payload) as r:
                kept = (await r.json())["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == " the"
    assert " the" not in choice["text"]
    assert kept["text"] == choice["text"] + " the"


async def test_echo_prepends_the_prompt():
    async with running_server(*FAST) as server:
        async with aiohttp.ClientSession() as http:
            payload = {"prompt": "Say hi", "max_tokens": 2, "ignore_eos": True, "echo": True}
            async with http.post(server.url + "/v1/completions", json=payload) as r:
                text = (await r.json())["choices"][0]["text"]
            payload["max_tokens"] = 0
            async with http.post(server.url + "/v1/completions", json=payload) as r:
                only_prompt = (await r.json())["choices"][0]["text"]
    assert text.startswith("Say hi") and len(text) > len("Say hi")
    assert only_prompt == "Say hi"


async def test_logprobs_shapes_for_completion_and_chat():
    async with running_server(*FAST) as server:
        async with aiohttp.ClientSession() as http:
            payload = {"prompt": "x", "max_tokens": 3, "ignore_eos": True, "logprobs": 2}
            async with http.post(server.url + "/v1/completions", json=payload) as r:
                completion = (await r.json())["choices"][0]["logprobs"]
            chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "ignore_eos": True,
                    "logprobs": True, "top_logprobs": 3}
            async with http.post(server.url + "/v1/chat/completions", json=chat) as r:
                chat_lp = (await r.json())["choices"][0]["logprobs"]
    assert list(completion) == ["text_offset", "token_logprobs", "tokens", "top_logprobs"]
    assert len(completion["tokens"]) == 3 and all(len(t) == 2 for t in completion["top_logprobs"])
    assert completion["text_offset"][0] == 0 and all(lp <= 0 for lp in completion["token_logprobs"])
    entry = chat_lp["content"][0]
    assert list(entry) == ["token", "logprob", "bytes", "top_logprobs"]
    assert len(entry["top_logprobs"]) == 3 and entry["bytes"] == list(entry["token"].encode())


async def test_token_id_prompts_are_taken_as_given():
    async with running_server(*FAST) as server:
        async with aiohttp.ClientSession() as http:
            payload = {"prompt": [5000, 6000, 7000, 120000], "max_tokens": 1, "return_token_ids": True}
            async with http.post(server.url + "/v1/completions", json=payload) as r:
                body = await r.json()
    assert body["usage"]["prompt_tokens"] == 4
    assert body["choices"][0]["prompt_token_ids"] == [5000, 6000, 7000, 120000]


async def test_tokenize_and_detokenize_round_trip():
    async with running_server(*FAST) as server:
        async with aiohttp.ClientSession() as http:
            async with http.post(server.url + "/tokenize", json={"prompt": "Hello world!",
                                                                  "return_token_strs": True}) as r:
                tokenized = await r.json()
            async with http.post(server.url + "/detokenize",
                                 json={"tokens": tokenized["tokens"][1:]}) as r:
                detokenized = await r.json()
            chat = {"messages": [{"role": "user", "content": "hi"}]}
            async with http.post(server.url + "/tokenize", json=chat) as r:
                chat_tokens = await r.json()
    assert list(tokenized) == ["count", "max_model_len", "tokens", "token_strs"]
    assert tokenized["count"] == len(tokenized["tokens"]) and tokenized["max_model_len"] == 131072
    assert tokenized["token_strs"] == ["<|begin_of_text|>", "Hello", "Ġworld", "!"]  # byte-level, as vLLM's
    assert detokenized == {"prompt": "Hello world!"}
    assert chat_tokens["count"] > 3 and chat_tokens["token_strs"] is None


async def test_request_id_header_is_echoed_when_enabled():
    async with running_server(*FAST, "--enable-request-id-headers") as server:
        async with aiohttp.ClientSession() as http:
            async with http.get(server.url + "/health", headers={"X-Request-Id": "r-1"}) as r:
                assert r.headers["X-Request-Id"] == "r-1"
            async with http.post(server.url + "/v1/completions", json={"prompt": "a", "max_tokens": 1}) as r:
                assert len(r.headers["X-Request-Id"]) == 32


async def test_the_priority_header_overrides_the_body_where_vllm_reads_it():
    """X-Vllm-Priority beats the body's priority on chat, completions and Responses; vLLM's generate and
    batch chat routes do not read it."""
    async with running_server(*FAST, "--scheduling-policy", "priority", "--enable-scale-out") as server:
        finished = []
        server.engine.sim.add_finish_listener(finished.append)
        headers = {"X-Vllm-Priority": "7"}
        async with aiohttp.ClientSession() as http:
            for path, body in (("/v1/completions", {"prompt": "hi", "max_tokens": 1, "priority": 2}),
                               ("/inference/v1/generate", {"token_ids": [1, 2, 3], "priority": 2,
                                                           "sampling_params": {"max_tokens": 1}})):
                async with http.post(server.url + path, json=body, headers=headers) as r:
                    assert r.status == 200, await r.text()
    assert [r.priority for r in finished] == [7, 2]


async def test_a_cache_salt_keeps_a_prefix_cache_apart():
    """vLLM salts a request's first block hash with its cache_salt: only requests with the same salt
    share cached blocks."""
    async with running_server(*FAST, "--enable-prompt-tokens-details") as server:
        async with aiohttp.ClientSession() as http:
            prompt = "the same long prompt " * 40
            cached = []
            for salt in (None, "tenant-a", "tenant-b", "tenant-a", None):
                payload = {"prompt": prompt, "max_tokens": 1, **({"cache_salt": salt} if salt else {})}
                async with http.post(server.url + "/v1/completions", json=payload) as r:
                    cached.append((await r.json())["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert cached[:3] == [0, 0, 0] and cached[3] == cached[4] > 0


async def test_prompt_tokens_details_report_prefix_cache_hits():
    async with running_server(*FAST, "--enable-prompt-tokens-details") as server:
        async with aiohttp.ClientSession() as http:
            prompt = "the same long prompt " * 40
            usages = []
            for _ in range(2):
                payload = {"prompt": prompt, "max_tokens": 1}
                async with http.post(server.url + "/v1/completions", json=payload) as r:
                    usages.append((await r.json())["usage"])
    # the full body has every key of vLLM's PromptTokenUsageInfo
    assert usages[0]["prompt_tokens_details"] == {"cached_tokens": 0, "created_cache_tokens": None,
                                                  "multimodal_tokens": None}
    cached = usages[1]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0 and cached % 16 == 0 and cached < usages[1]["prompt_tokens"]


async def test_server_load_counts_in_flight_requests_when_tracked():
    # at --speed 0.1 the request runs ~3.5 s of wall time: /load is asked while it surely still runs
    async with running_server("--speed", "0.1", "--enable-server-load-tracking") as server:
        async with aiohttp.ClientSession() as http:
            payload = {"prompt": "x", "max_tokens": 50, "ignore_eos": True}
            task = asyncio.ensure_future(http.post(server.url + "/v1/completions", json=payload))
            while server.engine.num_unfinished == 0:  # until it is in (not a fixed wait: the machine may be busy)
                await asyncio.sleep(0.01)
            async with http.get(server.url + "/load") as r:
                during = await r.json()
            (await task).release()
            async with http.get(server.url + "/load") as r:
                after = await r.json()
    assert during == {"server_load": 1} and after == {"server_load": 0}


async def test_metrics_endpoint_serves_vllm_series():
    async with running_server(*FAST) as server:
        async with aiohttp.ClientSession() as http:
            async with http.post(server.url + "/v1/completions", json={"prompt": "a", "max_tokens": 3,
                                                                       "ignore_eos": True}) as r:
                await r.read()
            async with http.get(server.url + "/metrics") as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
                text = await r.text()
    assert f'vllm:generation_tokens_total{{engine="0",model_name="{MODEL}"}} 3.0' in text
    assert 'vllm:request_success_total{engine="0",finished_reason="length"' in text


async def test_dev_mode_routes_only_with_the_environment_switch(monkeypatch):
    async with running_server(*FAST) as server:
        async with aiohttp.ClientSession() as http:
            async with http.post(server.url + "/reset_prefix_cache") as r:
                assert r.status == 404
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")
    async with running_server(*FAST) as server:
        async with aiohttp.ClientSession() as http:
            async with http.post(server.url + "/reset_prefix_cache") as r:
                assert await r.json() == {"success": True}


async def test_per_request_metrics_report_virtual_timings():
    async with running_server(*FAST, "--enable-per-request-metrics") as server:
        async with aiohttp.ClientSession() as http:
            payload = {"prompt": "x", "max_tokens": 5, "ignore_eos": True}
            async with http.post(server.url + "/v1/completions", json=payload) as r:
                full = (await r.json())["metrics"]
            payload.update(stream=True, stream_options={"include_usage": True})
            async with http.post(server.url + "/v1/completions", json=payload) as r:
                events = await sse_events(r)
    usage_chunk = events[-2]
    assert list(full) == ["time_to_first_token_ms", "generation_time_ms", "queue_time_ms", "mean_itl_ms",
                          "tokens_per_second", "speculative_decoding"]
    assert full["time_to_first_token_ms"] > 0 and full["mean_itl_ms"] > 0 and full["queue_time_ms"] == 0
    assert list(usage_chunk) == ["id", "object", "created", "model", "choices", "usage", "system_fingerprint",
                                 "metrics"]
    assert abs(usage_chunk["metrics"]["generation_time_ms"] - 4 * usage_chunk["metrics"]["mean_itl_ms"]) < 1e-6


async def test_openapi_document_swagger_ui_and_redoc_as_fastapi_serves_them():
    async with running_server(*FAST) as server, aiohttp.ClientSession() as http:
        async with http.get(server.url + "/openapi.json") as r:
            assert r.status == 200 and r.headers["Content-Type"] == "application/json"
            document = await r.json()
        for path, title in (("/docs", "FastAPI - Swagger UI"), ("/redoc", "FastAPI - ReDoc")):
            async with http.get(server.url + path) as r:
                assert r.status == 200 and r.headers["Content-Type"] == "text/html; charset=utf-8"
                assert f"<title>{title}</title>" in await r.text()
    assert document["openapi"] == "3.1.0" and document["info"] == {"title": "FastAPI", "version": "0.1.0"}
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/metrics"} <= set(document["paths"])
    body = document["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/CompletionRequest"}
    schemas = document["components"]["schemas"]
    assert {"prompt", "max_tokens", "stream"} <= set(schemas["CompletionRequest"]["properties"])
    refs = {ref for ref in json.dumps(document).split('"$ref": "')[1:]}
    assert all(ref.split('"')[0].removeprefix("#/components/schemas/") in schemas for ref in refs)


async def test_fastapi_docs_can_be_disabled_as_in_vllm():
    async with running_server(*FAST, "--disable-fastapi-docs") as server, aiohttp.ClientSession() as http:
        for path in ("/openapi.json", "/docs", "/redoc"):
            async with http.get(server.url + path) as r:
                assert r.status == 404


async def test_offline_docs_serve_swagger_ui_from_local_assets_and_no_redoc():
    from server.openapi import swagger_assets
    assert swagger_assets() is not None, "the test extra installs swagger-ui-bundle"
    async with running_server(*FAST, "--enable-offline-docs") as server, aiohttp.ClientSession() as http:
        async with http.get(server.url + "/docs") as r:
            page = await r.text()
            assert r.status == 200 and "cdn." not in page
        assert '<script src="/static/swagger-ui-bundle.js">' in page and 'href="/static/swagger-ui.css"' in page
        for path, kind in (("/static/swagger-ui-bundle.js", "javascript"), ("/static/swagger-ui.css", "text/css"),
                           ("/docs/oauth2-redirect", "text/html")):
            async with http.get(server.url + path) as r:
                assert r.status == 200 and kind in r.headers["Content-Type"] and len(await r.read()) > 1000
        async with http.get(server.url + "/redoc") as r:
            assert r.status == 404
        async with http.get(server.url + "/openapi.json") as r:
            paths = (await r.json())["paths"]
        assert not any(p.startswith(("/static", "/docs")) for p in paths)


async def test_offline_docs_without_their_assets_warn_and_serve_no_docs(monkeypatch, caplog):
    monkeypatch.setattr("server.openapi.swagger_assets", lambda: None)
    async with running_server(*FAST, "--enable-offline-docs") as server, aiohttp.ClientSession() as http:
        for path in ("/docs", "/redoc", "/static/swagger-ui.css"):
            async with http.get(server.url + path) as r:
                assert r.status == 404
        async with http.get(server.url + "/openapi.json") as r:
            assert r.status == 200
    assert "Offline docs will not be available" in caplog.text
