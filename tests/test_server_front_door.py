"""What a port answers for the model a request names, in a cluster as each instance's own `vllm serve`
would: a stream refused before it starts, each model's context, each instance's queue limits, dev-mode
sleep scoped to an instance's port, and kv_transfer_params on pods with and without a KV connector."""
from __future__ import annotations

import asyncio
import json
import logging
import re

import aiohttp
import pytest

import front_door
from server.testing import free_port, running_server

BUSY = {"error": {"message": "The engine is currently busy and cannot accept new requests. Please try again later "
                             "or on a different instance.", "type": "Service Unavailable", "param": None,
                  "code": 503}}


async def _post(http: aiohttp.ClientSession, url: str, path: str, body: dict) -> tuple[int, str, str]:
    """(status, content type, body text)."""
    async with http.post(url + path, json=body) as r:
        return r.status, r.headers.get("Content-Type", ""), await r.text()


def _rejections(metrics: str, model: str) -> float:
    match = re.search(rf'^vllm:admission_rejections_total{{model_name="{model}",reason="max_num_queued_reqs"}} '
                      r'(\S+)$', metrics, re.M)
    assert match, metrics
    return float(match.group(1))


# -- a stream the engine refuses gets a JSON error, not a cut stream -------------------------------------
def _two_instances(port_a: int, port_b: int) -> str:
    return f"""
engine: {{max-model-len: 4096}}
instances:
  - {{name: a, model: meta-llama/Llama-3.1-8B, served_model_name: m, hardware: H100, port: {port_a}}}
  - {{name: b, model: meta-llama/Llama-3.1-8B, served_model_name: other, hardware: H100, port: {port_b}}}
"""


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"model": "m", "prompt": "hello", "max_tokens": 4, "stream": True}),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                              "stream": True, "stream_options": {"include_usage": True}}),
])
async def test_a_stream_for_a_model_with_no_instance_up_gets_the_503_json_of_a_plain_request(
        tmp_path, dev_mode, path, body):
    cluster = front_door.cluster_file(tmp_path, _two_instances(free_port(), free_port()))
    async with running_server("--cluster", cluster, "--speed", "200") as server, aiohttp.ClientSession() as http:
        front, port_a, _ = server.urls
        async with http.post(front + "/emulator/instances/a/fail") as r:
            assert r.status == 200
        plain = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        answers = [await _post(http, url, path, payload) for url in (front, port_a) for payload in (body, plain)]
        other = await _post(http, front, path, dict(body, model="other"))  # the other model still serves
        sim = server.engine.sim
        left = dict(sim.active), server.engine.num_unfinished
    for status, content_type, text in answers:
        assert status == 503 and content_type.startswith("application/json"), (status, content_type, text)
        error = json.loads(text)["error"]
        assert error["code"] == 503 and "not available" in error["message"], error
    assert answers[0][2] == answers[1][2]  # streamed or not, the same body
    assert other[0] == 200 and other[2].rstrip().endswith("data: [DONE]")
    assert left == ({}, 0)


async def test_a_stream_the_core_fails_to_take_gets_a_json_error_and_leaves_nothing_behind(monkeypatch):
    """Any error while handing a request to the core (here the second prompt's) answers before the stream
    starts; the prompts the core had taken leave it again, uncounted."""
    async with running_server("--speed", "200") as server, aiohttp.ClientSession() as http:
        sim = server.engine.sim
        place = sim.place

        def second_fails(request, *args):
            if request.request_id.rsplit("-", 1)[0].endswith("-1"):  # the second prompt (+ vLLM's suffix)
                raise RuntimeError("refused")
            return place(request, *args)
        monkeypatch.setattr(sim, "place", second_fails)
        status, content_type, text = await _post(http, server.url, "/v1/completions", {
            "prompt": ["one prompt", "another"], "max_tokens": 4, "stream": True})
        monkeypatch.setattr(sim, "place", place)
        after = await _post(http, server.url, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "stream": True})
        engine = server.engine
        left = (dict(sim.active), engine.num_unfinished, engine.num_prefill_tokens,
                [(b.requests, b.prefill_tokens) for b in engine.backlogs.values()])
    assert status == 500 and content_type.startswith("application/json"), (status, text)
    assert json.loads(text)["error"] == {"message": "refused", "type": "InternalServerError", "param": None,
                                         "code": 500}
    assert after[0] == 200 and after[2].rstrip().endswith("data: [DONE]")
    assert left == ({}, 0, 0, [(0, 0)])


# -- each model's context ---------------------------------------------------------------------------------
def _contexts(port_long: int, port_short: int) -> str:
    return f"""
engine: {{max-model-len: 4096}}
instances:
  - {{name: long, model: meta-llama/Llama-3.1-8B, served_model_name: long, hardware: H100, port: {port_long}}}
  - {{name: short-a, model: meta-llama/Llama-3.1-8B, served_model_name: short, hardware: H100, max-model-len: 2048,
     port: {port_short}}}
  - {{name: short-b, model: meta-llama/Llama-3.1-8B, served_model_name: short, hardware: A100, max-model-len: 1024}}
"""


async def test_lengths_are_checked_against_the_context_of_the_model_the_request_names(tmp_path):
    cluster = front_door.cluster_file(tmp_path, _contexts(free_port(), free_port()))
    async with running_server("--cluster", cluster, "--speed", "2000") as server, aiohttp.ClientSession() as http:
        front, _, short_a = server.urls

        async def complete(url: str, model: str, **body) -> tuple[int, dict]:
            status, _, text = await _post(http, url, "/v1/completions", {"model": model, "ignore_eos": True, **body})
            return status, json.loads(text)
        # "long" has 4096 tokens; "short" the shortest of its instances' (1024) on the front door, 2048 on
        # short-a's port
        long_max_tokens = await complete(front, "long", prompt="hi", max_tokens=3000)
        long_prompt = await complete(front, "long", prompt=list(range(100, 3100)), max_tokens=1)
        short_max_tokens = await complete(front, "short", prompt="hi", max_tokens=1500)
        short_prompt = await complete(front, "short", prompt=list(range(100, 1200)), max_tokens=1)
        limit_chars = 1024 * server.running.servings[0].tokenizer_for("short").max_chars_per_token
        short_text = await complete(front, "short", prompt="x" * (limit_chars + 1), max_tokens=1)
        own_port = await complete(short_a, "short", prompt="hi", max_tokens=1500)
        status, _, text = await _post(http, front, "/v1/chat/completions", {
            "model": "long", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 3000})
        _, _, room = await _post(http, front, "/v1/chat/completions", {  # no max_tokens: what fits
            "model": "long", "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True})
        tokenized = {}
        for model in ("long", "short"):
            status_t, _, text_t = await _post(http, front, "/tokenize", {"model": model, "prompt": "hi"})
            tokenized[model] = json.loads(text_t)["max_model_len"]
        async with http.get(front + "/v1/models") as r:
            cards = {card["id"]: card["max_model_len"] for card in (await r.json())["data"]}
    assert long_max_tokens[0] == 200 and long_max_tokens[1]["usage"]["completion_tokens"] == 3000
    assert long_prompt[0] == 200
    assert short_max_tokens[0] == 400
    assert short_max_tokens[1]["error"]["message"].startswith(
        "max_tokens=1500 cannot be greater than max_model_len=1024.")
    assert short_prompt[0] == 400
    assert short_prompt[1]["error"]["message"].startswith("This model's maximum context length is 1024 tokens. "
                                                          "However, your prompt contains 1100 input tokens")
    assert short_text[0] == 400 and f"(more than {limit_chars} characters, which is the upper bound for 1024 " \
                                    "input tokens)" in short_text[1]["error"]["message"]
    assert own_port[0] == 200 and own_port[1]["usage"]["completion_tokens"] == 1500
    assert status == 200, text
    usage = json.loads(room)["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 4096
    assert tokenized == {"long": 4096, "short": 1024}
    assert cards == {"long": 4096, "short": 1024}


# -- each instance's queue limits ----------------------------------------------------------------------------
def _limits(port_a: int, port_b: int) -> str:
    return f"""
engine: {{max-model-len: 4096}}
instances:
  - {{name: a, model: meta-llama/Llama-3.1-8B, served_model_name: m, hardware: H100, port: {port_a},
     max-num-queued-reqs: 1}}
  - {{name: b, model: meta-llama/Llama-3.1-8B, served_model_name: m, hardware: H100, port: {port_b},
     max-num-queued-reqs: 2}}
  - {{name: free, model: meta-llama/Llama-3.1-8B, served_model_name: other, hardware: H100}}
"""


async def test_queue_limits_are_each_instance_own_and_the_front_door_refuses_only_when_all_are_full(tmp_path):
    cluster = front_door.cluster_file(tmp_path, _limits(free_port(), free_port()))
    # at --speed 0.01 nothing ends during the test: what is admitted stays unfinished
    async with running_server("--cluster", cluster, "--speed", "0.01") as server, aiohttp.ClientSession() as http:
        front, port_a, port_b = server.urls
        engine = server.engine
        a, b, free = engine.sim.instances
        held = []

        async def hold(url: str, model: str) -> None:
            held.append(await front_door.hold(engine, http, url, {"model": model, "prompt": "hello", "max_tokens": 500,
                                                        "ignore_eos": True}))

        async def refused(url: str, model: str = "m") -> bool:
            status, _, text = await _post(http, url, "/v1/completions", {"model": model, "prompt": "hi",
                                                                         "max_tokens": 1})
            assert status == 503 and json.loads(text) == BUSY, (status, text)
            return True

        await hold(port_a, "m")                         # a is full (1 of 1)
        assert await refused(port_a)                    # a's own port refuses ...
        await hold(front, "m")                          # ... the front door still admits: b has room
        assert engine.backlogs[b].requests == 1         # (and routed it there)
        await hold(port_b, "m")                         # b's own port counts b's alone: 2 of 2
        assert await refused(front)                     # every instance serving m is full
        assert await refused(port_b)
        await hold(front, "other")                      # an instance with no limit never refuses
        counts = {i.name: engine.backlogs[i].requests for i in engine.sim.instances}
        metrics = {}
        for name, url in (("front", front), ("a", port_a), ("b", port_b)):
            async with http.get(url + "/metrics") as r:
                metrics[name] = _rejections(await r.text(), "m")
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)
    assert counts == {"a": 1, "b": 2, "free": 1}
    assert metrics == {"front": 1, "a": 1, "b": 1}  # each refusal on the port that refused


async def test_an_instance_token_backlog_limit_counts_its_own_prompt_tokens(tmp_path):
    port_a, port_b = free_port(), free_port()
    cluster = front_door.cluster_file(tmp_path, f"""
engine: {{max-model-len: 4096}}
instances:
  - {{name: a, model: meta-llama/Llama-3.1-8B, hardware: H100, port: {port_a}, max-num-queued-tokens: 10}}
  - {{name: b, model: meta-llama/Llama-3.1-8B, hardware: H100, port: {port_b}}}
""")
    async with running_server("--cluster", cluster, "--speed", "0.01") as server, aiohttp.ClientSession() as http:
        front, on_a, on_b = server.urls
        engine = server.engine
        payload = {"prompt": list(range(100, 120)), "max_tokens": 5}
        held = []

        async def hold(url: str) -> None:
            held.append(await front_door.hold(engine, http, url, payload))
        await hold(on_b)     # 20 prompt tokens on b ...
        await hold(on_a)     # ... are not a's: admitted
        refused = await _post(http, on_a, "/v1/completions", payload)
        await hold(front)    # b has no limit
        tokens = {i.name: engine.backlogs[i].prefill_tokens for i in engine.sim.instances}
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)
    assert refused[0] == 503 and "prefill token backlog" in json.loads(refused[2])["error"]["message"]
    assert tokens == {"a": 20, "b": 40}


# -- dev mode on an instance's port acts on that instance ---------------------------------------------------
async def test_sleep_wake_up_and_reset_prefix_cache_on_an_instance_port_act_on_that_instance(tmp_path, dev_mode):
    cluster = front_door.cluster_file(tmp_path, f"""
engine: {{max-model-len: 4096}}
instances:
  - {{name: a, model: meta-llama/Llama-3.1-8B, served_model_name: m, hardware: H100, port: {free_port()}}}
  - {{name: b, model: meta-llama/Llama-3.1-8B, served_model_name: m, hardware: H100, port: {free_port()}}}
""")
    async with running_server("--cluster", cluster, "--speed", "8", "--enable-prompt-tokens-details") as server, \
            aiohttp.ClientSession() as http:
        front, port_a, port_b = server.urls
        sim = server.engine.sim
        a, b = sim.instances
        prompt = list(range(1000, 1400))

        async def complete(url: str, max_tokens: int = 4) -> dict:
            async with http.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens,
                                                                "ignore_eos": True}) as r:
                return await r.json()

        async def sleeping(url: str) -> bool:
            async with http.get(url + "/is_sleeping") as r:
                return (await r.json())["is_sleeping"]

        # keep: a stops, b serves on
        async with http.post(port_a + "/sleep?level=0&mode=keep") as r:
            assert r.status == 200
        states = [await sleeping(url) for url in (front, port_a, port_b)]
        assert states == [True, True, False]  # (b asleep too would hold the next request forever)
        pending = asyncio.ensure_future(complete(port_a))
        on_b = await complete(port_b)
        while not any(r.engine_index in (e.index for e in a.engines) for r in sim.active.values()):
            await asyncio.sleep(0.01)
        waited = [(r.num_output_tokens, r.num_computed_tokens) for r in sim.active.values()]
        async with http.post(port_a + "/wake_up") as r:
            assert r.status == 200
        woke = await pending

        # reset_prefix_cache on a's port: a forgets the prompt, b keeps it
        async with http.post(port_a + "/reset_prefix_cache") as r:
            reset = await r.json()
        cached = [(await complete(url))["usage"]["prompt_tokens_details"]["cached_tokens"]
                  for url in (port_a, port_b)]

        # abort: a's request ends, b's runs to its end (at --speed 8, a's 3,000 tokens last ~2.5 wall seconds:
        # the abort reaches it before its end even on a busy machine)
        on_a_running = asyncio.ensure_future(complete(port_a, 3000))
        on_b_running = asyncio.ensure_future(complete(port_b, 1500))
        while a.num_running == 0 or b.num_running == 0:
            await asyncio.sleep(0.01)
        async with http.post(port_a + "/sleep?level=1&mode=abort") as r:
            assert r.status == 200
        aborted, finished = await on_a_running, await on_b_running
        after = [await sleeping(url) for url in (front, port_a, port_b)]
        a_usage = max(e.kv.usage for e in a.engines)
        async with http.post(front + "/wake_up") as r:
            assert r.status == 200
        final = [await sleeping(url) for url in (front, port_a, port_b)]
    assert on_b["choices"][0]["finish_reason"] == "length"
    assert waited == [(0, 0)]  # a paused: its request had not started
    assert woke["choices"][0]["finish_reason"] == "length" and woke["usage"]["completion_tokens"] == 4
    assert reset == {"success": True}
    assert cached[0] == 0 and cached[1] > 0
    assert aborted["choices"][0]["finish_reason"] == "abort"
    assert finished["choices"][0]["finish_reason"] == "length" and finished["usage"]["completion_tokens"] == 1500
    assert after == [True, True, False] and a_usage == 0.0
    assert final == [False, False, False]


# -- kv_transfer_params ---------------------------------------------------------------------------------------
DECODE_SIDE = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
               "remote_block_ids": None, "remote_host": None, "remote_port": None}
FROM_A_PREFILL = {"do_remote_decode": False, "do_remote_prefill": True, "remote_engine_id": "elsewhere-dp0",
                  "remote_block_ids": [[1, 2, 3]], "remote_host": "10.0.0.1", "remote_port": 5600, "tp_size": 1,
                  "remote_request_id": "cmpl-x-0"}


async def test_a_pod_without_a_kv_connector_ignores_kv_transfer_params_as_vllm_does(caplog):
    finished = []
    with caplog.at_level(logging.WARNING, logger="vllm_emulator.server"):
        async with running_server("--speed", "200") as server, aiohttp.ClientSession() as http:
            server.engine.sim.add_finish_listener(finished.append)
            answers = []
            for params in (DECODE_SIDE, FROM_A_PREFILL):
                status, _, text = await _post(http, server.url, "/v1/completions", {
                    "prompt": list(range(100, 400)), "max_tokens": 3, "ignore_eos": True,
                    "kv_transfer_params": params})
                answers.append((status, json.loads(text)["kv_transfer_params"]))
            sim = server.engine.sim
            held, free = dict(sim.transfers.held), [e.kv.num_free_blocks == e.num_gpu_blocks - 1 for e in sim.engines]
    assert answers == [(200, None), (200, None)]
    assert not held and all(free)  # the "prefill" kept no blocks for a decode side
    assert [r.num_external_tokens for r in finished] == [0, 0]  # nothing was loaded from elsewhere
    warnings = [r.getMessage() for r in caplog.records if "KVConnector" in r.getMessage()]
    assert warnings == ["Got kv_transfer_params, but no KVConnector found. Disabling KVTransfer for this request."] * 2


async def test_several_prompts_answer_the_first_prompt_kv_transfer_params(tmp_path):
    """vLLM's completion response carries prompt 0's kv_transfer_params (final_res_batch[0]); a stream
    carries each prompt's on that prompt's final chunk."""
    cluster = front_door.cluster_file(tmp_path, f"""
engine: {{max-model-len: 4096}}
instances:
  - {{name: prefill, model: meta-llama/Llama-3.1-8B, hardware: H100, port: {free_port()},
     kv-transfer-config: {{kv_connector: NixlConnector, kv_role: kv_producer}}}}
""")
    async with running_server("--cluster", cluster, "--speed", "200") as server, aiohttp.ClientSession() as http:
        pod = server.urls[1]
        body = {"prompt": [list(range(100, 400)), list(range(500, 700))], "max_tokens": 1,
                "kv_transfer_params": DECODE_SIDE}
        async with http.post(pod + "/v1/completions", json=body, headers={"X-Request-Id": "plain"}) as r:
            plain = await r.json()
        async with http.post(pod + "/v1/completions", json=dict(body, stream=True),
                             headers={"X-Request-Id": "streamed"}) as r:
            events = [json.loads(e[len("data: "):]) for e in (await r.text()).split("\n\n")
                      if e.startswith("data: {")]
    # the engine's request id, as vLLM's: the client's with 8 random hex characters
    assert re.fullmatch(r"cmpl-plain-0-[0-9a-f]{8}", plain["kv_transfer_params"]["remote_request_id"])
    assert plain["kv_transfer_params"]["remote_num_tokens"] == 300
    finals = {e["choices"][0]["index"]: e["kv_transfer_params"] for e in events if e["choices"][0]["finish_reason"]}
    assert {i: p["remote_request_id"][:-9] for i, p in finals.items()} == {0: "cmpl-streamed-0", 1: "cmpl-streamed-1"}
