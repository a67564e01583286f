"""A cluster behind the HTTP server: the front door and each instance's own port, routing by model,
faults seen by clients, cluster metrics, and P/D through vLLM's kv_transfer_params as a proxy sends
them. The server computes what an offline replay of the same arrivals computes, on a cluster too."""
from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from loadgen.replay import replay
from profiles.cluster_file import read_cluster_file
from pd_pair import pd_pair_text
from served_trace import differences, send_paced, write_served_trace
from server.testing import free_port, running_server


# Three devices, one model: the router's choices depend on each instance's own load and speed.
THREE_DEVICES = """
routing: {policy: least_loaded}
engine: {max-model-len: 1536, max-num-seqs: 8, max-num-batched-tokens: 512}
instances:
  - {name: rtx, model: meta-llama/Llama-3.1-8B, hardware: RTX4090, num-gpu-blocks-override: 120}
  - {name: a100, model: meta-llama/Llama-3.1-8B, hardware: A100, num-gpu-blocks-override: 200}
  - {name: h100, model: meta-llama/Llama-3.1-8B, hardware: H100, num-gpu-blocks-override: 200}
"""


def _two_models(port_8b: int, port_70b: int) -> str:
    return f"""
routing: {{policy: round_robin}}
engine: {{max-model-len: 4096}}
instances:
  - {{name: small, model: meta-llama/Llama-3.1-8B, served_model_name: llama-8b, hardware: H100, count: 2,
     port: {port_8b}}}
  - {{name: big, model: meta-llama/Llama-3.1-70B, served_model_name: llama-70b, hardware: H100,
     tensor-parallel-size: 4, port: {port_70b}, max-model-len: 2048}}
"""


def _cluster(tmp_path: Path, text: str):
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    return read_cluster_file(path)[0], path


def _finished(server) -> list:
    """The requests the core finishes from now on."""
    done = []
    server.engine.sim.add_finish_listener(done.append)
    return done



async def _complete(http, url: str, model: str | None = None, *, prompt=None, max_tokens: int = 4,
                    headers=None, **extra):
    payload = {"prompt": prompt if prompt is not None else list(range(100, 164)), "max_tokens": max_tokens,
               "ignore_eos": True, **extra}
    if model is not None:
        payload["model"] = model
    async with http.post(url + "/v1/completions", json=payload, headers=headers or {}) as r:
        return r.status, await r.json()


# -- the same answers as an offline replay --------------------------------------------------------
async def test_a_served_cluster_times_every_request_as_an_offline_replay_of_the_same_arrivals(tmp_path):
    spec, path = _cluster(tmp_path, THREE_DEVICES)
    rng = random.Random(5)
    shared = [rng.randrange(1000, 30000) for _ in range(256)]
    workload = []
    for i in range(45):
        own = [rng.randrange(1000, 30000) for _ in range(rng.randrange(20, 600))]
        workload.append({"id": f"r{i}", "prompt": shared + own if i % 3 == 0 else own,
                         "max_tokens": rng.randrange(1, 200), "gap": rng.expovariate(1 / 0.004)})
    log_path = tmp_path / "server.jsonl"
    async with running_server("--speed", "25", "--request-log", str(log_path), deployment=spec) as server:
        finished = _finished(server)
        outputs = await send_paced(server.url, workload, lambda item: {
            "prompt": item["prompt"], "max_tokens": item["max_tokens"], "ignore_eos": True, "return_token_ids": True})
        used = {server.engine.sim.instance_of[r.engine_index].name for r in finished}
    assert used == {"rtx", "a100", "h100"}, "the load should spread over every instance"
    served = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert len(served) == len(workload)

    trace = tmp_path / "trace.jsonl"
    write_served_trace(trace, served, workload, outputs)
    replay(str(trace), read_cluster_file(path)[0], tmp_path / "replay")
    replayed = [json.loads(line) for line in (tmp_path / "replay" / "requests.jsonl").read_text().splitlines()]

    assert not differences(served, replayed)  # a replay may add fields (energy), not change any


# -- models, ports, routing -------------------------------------------------------------------------
async def test_the_front_door_routes_by_model_and_each_instance_answers_alone_on_its_port(tmp_path):
    port_8b, port_70b = free_port(), free_port()
    spec, _ = _cluster(tmp_path, _two_models(port_8b, port_70b))
    async with running_server("--speed", "200", deployment=spec) as server:
        finished = _finished(server)
        front, small0, small1, big = server.urls
        assert server.running.ports[1:] == [port_8b, port_8b + 1, port_70b]
        async with aiohttp.ClientSession() as http:
            async with http.get(front + "/v1/models") as r:
                cards = {c["id"]: c for c in (await r.json())["data"]}
            assert set(cards) == {"llama-8b", "llama-70b"}
            assert cards["llama-8b"]["root"] == "meta-llama/Llama-3.1-8B"
            assert cards["llama-70b"]["root"] == "meta-llama/Llama-3.1-70B"
            assert cards["llama-70b"]["max_model_len"] == 2048 and cards["llama-8b"]["max_model_len"] == 4096
            async with http.get(big + "/v1/models") as r:
                assert [c["id"] for c in (await r.json())["data"]] == ["llama-70b"]

            for _ in range(4):
                status, body = await _complete(http, front, "llama-8b")
                assert status == 200 and body["model"] == "llama-8b"
            status, body = await _complete(http, front, "llama-70b")
            assert status == 200 and body["model"] == "llama-70b"
            async with http.post(front + "/v1/chat/completions", json={
                    "model": "llama-70b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                    "stream": True}) as r:
                assert '"model":"llama-70b"' in await r.text()
            status, body = await _complete(http, front, "llama-13b")
            assert status == 404 and body["error"]["type"] == "NotFoundError"
            status, _ = await _complete(http, small1, "llama-70b")  # not served on that port
            assert status == 404
            assert (await _complete(http, small1, "llama-8b"))[0] == 200
            # each port takes the context of what it serves: 3000 tokens fit the 8B, not the 70B
            assert (await _complete(http, small0, "llama-8b", prompt=list(range(3000))))[0] == 200
            status, body = await _complete(http, big, "llama-70b", prompt=list(range(3000)))
            assert status == 400 and "2048" in body["error"]["message"]
        by_instance = {}
        for request in finished:
            name = server.engine.sim.instance_of[request.engine_index].name
            by_instance[name] = by_instance.get(name, 0) + 1
        # round robin over the 8B pair (4 + the one on small-1's port + the long one on small-0's)
        assert by_instance == {"small-0": 3, "small-1": 3, "big": 2}


async def test_a_session_header_keeps_a_conversation_on_one_instance(tmp_path):
    text = _two_models(free_port(), free_port()).replace("round_robin", "session_affinity")
    spec, _ = _cluster(tmp_path, text)
    async with running_server("--speed", "200", deployment=spec) as server:
        finished = _finished(server)
        async with aiohttp.ClientSession() as http:
            for turn in range(3):
                for user in ("alice", "bob", "carol"):
                    assert (await _complete(http, server.url, "llama-8b", headers={"X-Session-Id": user}))[0] == 200
                assert (await _complete(http, server.url, "llama-8b", user="dave"))[0] == 200
        sim = server.engine.sim
        engines_of = {}
        for request in finished:
            engines_of.setdefault(request.session, set()).add(sim.instance_of[request.engine_index].name)
        assert set(engines_of) == {"alice", "bob", "carol", "dave"}
        assert all(len(names) == 1 for names in engines_of.values()), engines_of


# -- faults -------------------------------------------------------------------------------------------
async def test_a_failed_instance_is_down_on_its_port_and_the_front_door_routes_around_it(tmp_path, dev_mode):
    spec, _ = _cluster(tmp_path, _two_models(free_port(), free_port()))
    async with running_server("--speed", "200", deployment=spec) as server:
        front, small0, small1, big = server.urls
        async with aiohttp.ClientSession() as http:
            async with http.post(front + "/emulator/instances/small-1/fail") as r:
                assert r.status == 200 and (await r.json())["up"] is False
            async with http.get(small1 + "/health") as r:
                assert r.status == 503
            async with http.get(small1 + "/metrics") as r:  # a dead pod's scrape fails: no idle-looking pod
                assert r.status == 503
            async with http.get(front + "/health") as r:
                assert r.status == 200  # others are up
            status, body = await _complete(http, small1, "llama-8b")
            assert status == 503, body
            for _ in range(3):
                assert (await _complete(http, front, "llama-8b"))[0] == 200
            async with http.get(small0 + "/metrics") as r:  # small-0's pod saw what the front door passed on
                assert ('http_requests_total{handler="/v1/completions",method="POST",status="2xx"} 3.0'
                        in await r.text())
            async with http.get(front + "/metrics") as r:
                text = await r.text()
            assert ('vllm_emulator:instance_up{cluster_instance="small-1",model_name="llama-8b",role="mixed"} 0.0'
                    in text)
            assert ('vllm_emulator:instance_up{cluster_instance="small-0",model_name="llama-8b",role="mixed"} 1.0'
                    in text)

            # the whole model down: 503 at the front door, as a gateway with no backend answers
            async with http.post(front + "/emulator/instances/big/fail") as r:
                assert r.status == 200
            status, body = await _complete(http, front, "llama-70b")
            assert status == 503 and "not available" in body["error"]["message"], body
            async with http.post(front + "/emulator/instances/nope/fail") as r:
                assert r.status == 404

            for name in ("small-1", "big"):
                async with http.post(front + f"/emulator/instances/{name}/restore") as r:
                    assert r.status == 200
            async with http.get(small1 + "/health") as r:
                assert r.status == 200
            async with http.get(small1 + "/metrics") as r:
                assert r.status == 200
            assert (await _complete(http, small1, "llama-8b"))[0] == 200
            assert (await _complete(http, front, "llama-70b"))[0] == 200
        sim = server.engine.sim
        assert not sim.active
        assert all(e.kv.num_free_blocks == e.num_gpu_blocks - 1 for e in sim.engines)


async def test_requests_on_an_instance_that_fails_get_vllm_internal_error(tmp_path, dev_mode):
    """Running on an instance that goes down: a plain request gets vLLM's 500, a stream the error event
    then [DONE] (vLLM's GenerationError), and nothing is left behind (rerouting: tests/test_cluster.py)."""
    spec, _ = _cluster(tmp_path, _two_models(free_port(), free_port()))
    # --speed 1: the requests run ~20 s of wall time after their first token, the window the fail must land in
    async with running_server("--speed", "1", deployment=spec) as server:
        front, small0, small1, _ = server.urls
        sim = server.engine.sim
        async with aiohttp.ClientSession() as http:
            async def running_on(name: str, count: int) -> None:
                while sum(1 for r in sim.active.values() if sim.instance_of[r.engine_index].name == name
                          and r.num_output_tokens > 0) < count:
                    await asyncio.sleep(0.01)
            plain = asyncio.ensure_future(_complete(http, small1, "llama-8b", max_tokens=3000))
            async with http.post(small1 + "/v1/completions", json={
                    "model": "llama-8b", "prompt": list(range(100, 164)), "max_tokens": 3000, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}) as r:
                await running_on("small-1", 2)
                async with http.post(front + "/emulator/instances/small-1/fail") as f:
                    assert (await f.json())["failed_requests"] == 2
                events = [e for e in (await r.text()).split("\n\n") if e]
            status, body = await plain
            assert status == 500
            assert body == {"error": {"message": "Internal server error", "type": "InternalServerError",
                                      "param": None, "code": 500}}
            assert events[-2] == ('data: {"error": {"message": "Internal server error", "type": '
                                  '"InternalServerError", "param": null, "code": 500}}')
            assert events[-1] == "data: [DONE]"
            assert all('"usage"' not in e or '"choices":[{' in e for e in events)  # no usage chunk after it

        assert not sim.active
        assert all(e.kv.num_free_blocks == e.num_gpu_blocks - 1 for e in sim.engines)


async def test_fault_injection_needs_dev_mode(tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_SERVER_DEV_MODE", raising=False)
    spec, _ = _cluster(tmp_path, _two_models(free_port(), free_port()))
    async with running_server("--speed", "200", deployment=spec) as server:
        async with aiohttp.ClientSession() as http:
            async with http.post(server.url + "/emulator/instances/small-1/fail") as r:
                assert r.status == 404


# -- metrics ------------------------------------------------------------------------------------------
async def test_metrics_show_each_instance_engines_under_its_model_and_the_router_decisions(tmp_path):
    spec, _ = _cluster(tmp_path, _two_models(free_port(), free_port()))
    async with running_server("--speed", "200", deployment=spec) as server:
        front, _, _, big = server.urls
        async with aiohttp.ClientSession() as http:
            for _ in range(4):
                assert (await _complete(http, front, "llama-8b", max_tokens=3))[0] == 200
            assert (await _complete(http, big, "llama-70b", max_tokens=5))[0] == 200
            async with http.get(front + "/metrics") as r:
                text = await r.text()
            async with http.get(big + "/metrics") as r:
                pod = await r.text()

    def value(body: str, series: str) -> float:
        lines = [line for line in body.splitlines() if line.startswith(series + " ")]
        assert len(lines) == 1, (series, lines)
        return float(lines[0].rsplit(" ", 1)[1])
    # engines 0 and 1 are the 8B pair, engine 2 the 70B
    assert value(text, 'vllm:generation_tokens_total{engine="0",model_name="llama-8b"}') == 6
    assert value(text, 'vllm:generation_tokens_total{engine="1",model_name="llama-8b"}') == 6
    assert value(text, 'vllm:generation_tokens_total{engine="2",model_name="llama-70b"}') == 5
    assert value(text, 'vllm_emulator:routing_decisions_total{cluster_instance="small-0",model_name="llama-8b",'
                       'policy="round_robin",role="mixed"}') == 2
    assert 'cluster_instance="big"' in text
    # the instance's own port is a one-engine vLLM pod of its model
    assert value(pod, 'vllm:generation_tokens_total{engine="0",model_name="llama-70b"}') == 5
    assert "llama-8b" not in pod and "vllm_emulator:instance_up" not in pod


# -- P/D over HTTP, as vLLM's disaggregated proxy drives it ------------------------------------------
async def _proxied(http, prefill_url: str, decode_url: str, prompt: list[int], max_tokens: int):
    """vLLM's toy P/D proxy: the prefill side runs the prompt for one token and keeps its KV; the
    decode side gets the kv_transfer_params it answered and loads that KV before decoding."""
    status, first = await _complete(http, prefill_url, prompt=prompt, max_tokens=1,
                                    kv_transfer_params={"do_remote_decode": True, "do_remote_prefill": False,
                                                        "remote_engine_id": None, "remote_block_ids": None,
                                                        "remote_host": None, "remote_port": None})
    assert status == 200, first
    params = first["kv_transfer_params"]
    status, body = await _complete(http, decode_url, prompt=prompt, max_tokens=max_tokens,
                                   kv_transfer_params=params)
    assert status == 200, body
    return params, body


async def test_pd_through_kv_transfer_params_moves_the_prompt_kv_from_the_prefill_port_to_the_decode_port(tmp_path):
    port_p, port_d = free_port(), free_port()
    spec, _ = _cluster(tmp_path, pd_pair_text(port_p, port_d))
    log_path = tmp_path / "server.jsonl"
    prompt = [random.Random(1).randrange(1000, 30000) for _ in range(3000)]
    async with running_server("--speed", "100", "--request-log", str(log_path), deployment=spec) as server:
        _, prefill_url, decode_url = server.urls
        async with aiohttp.ClientSession() as http:
            params, body = await _proxied(http, prefill_url, decode_url, prompt, max_tokens=20)
            assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
            assert params["remote_port"] == server.running.ports[0] or params["remote_port"] >= 0
            assert params["remote_engine_id"] and params["remote_request_id"]
            assert len(params["remote_block_ids"][0]) == -(-3000 // 16)
            assert body["usage"]["completion_tokens"] == 20 and body["kv_transfer_params"] is None
            async with http.get(decode_url + "/metrics") as r:
                metrics = await r.text()
        sim = server.engine.sim
        assert not sim.active and not sim.transfers.held  # the prefill's blocks were freed once read
        assert all(e.kv.num_free_blocks == e.num_gpu_blocks - 1 for e in sim.engines)
    records = {r["engine"]: r for r in map(json.loads, log_path.read_text().splitlines())}
    prefill, decode = records[0], records[1]
    assert prefill["output_tokens"] == 1 and prefill["external_tokens"] == 0
    # vLLM counts the whole prompt as loaded (its last token is recomputed, uncounted)
    assert decode["external_tokens"] == 3000 and decode["cached_tokens"] == 0
    assert decode["ttft"] < prefill["ttft"]
    assert 'vllm:prompt_tokens_by_source_total{engine="0",model_name="meta-llama/Llama-3.1-8B",' \
           'source="external_kv_transfer"} 3000.0' in metrics
    assert 'vllm:external_prefix_cache_hits_total{engine="0",model_name="meta-llama/Llama-3.1-8B"} 3000.0' in metrics


HTTP = web.AppKey("http", aiohttp.ClientSession)


def _toy_proxy(prefill_url: str, decode_url: str) -> web.Application:
    """A P/D proxy written from vLLM's documented protocol (its NIXL integration tests' toy proxy):
    the prefill pod gets the request with max_tokens 1, no stream and do_remote_decode; the decode pod
    gets the original request plus the kv_transfer_params the prefill answered, streamed back as is."""
    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        prefill = dict(body, max_tokens=1, stream=False, kv_transfer_params={
            "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
            "remote_block_ids": None, "remote_host": None, "remote_port": None})
        prefill.pop("stream_options", None)
        http = request.app[HTTP]
        async with http.post(prefill_url + "/v1/completions", json=prefill) as r:
            answered = await r.json()
            if r.status != 200:
                return web.json_response(answered, status=r.status)
        decode = dict(body, kv_transfer_params=answered.get("kv_transfer_params"))
        async with http.post(decode_url + "/v1/completions", json=decode) as r:
            out = web.StreamResponse(status=r.status, headers={"Content-Type": r.headers["Content-Type"]})
            await out.prepare(request)
            async for chunk in r.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    async def session(app):
        app[HTTP] = aiohttp.ClientSession()
        yield
        await app[HTTP].close()
    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.cleanup_ctx.append(session)
    return app


async def test_a_pd_proxy_over_http_times_every_request_as_the_cluster_own_proxy(tmp_path):
    """vLLM's P/D protocol through a proxy in front of an emulated prefill pod and decode pod: every
    request completes, the decode pod counts the prompt as loaded, and the timings are those the
    same P/D pair gives inside the cluster file for the same arrivals: the prefill as the prefill,
    and from the decode's arrival (the proxy's hop: the prefill's response, then the decode's request)
    to its first token and last, the KV moving over the link then the decode steps."""
    port_p, port_d = free_port(), free_port()
    spec, path = _cluster(tmp_path, pd_pair_text(port_p, port_d))
    rng = random.Random(2)
    workload = [([rng.randrange(1000, 30000) for _ in range(rng.randrange(200, 4000))], rng.randrange(2, 60))
                for _ in range(6)]
    log_path = tmp_path / "server.jsonl"
    async with running_server("--speed", "50", "--request-log", str(log_path), deployment=spec) as server:
        _, prefill_url, decode_url = server.urls
        runner = web.AppRunner(_toy_proxy(prefill_url, decode_url))
        await runner.setup()
        proxy_port = free_port()
        await web.TCPSite(runner, "127.0.0.1", proxy_port).start()
        try:
            async with aiohttp.ClientSession() as http:
                for i, (prompt, max_tokens) in enumerate(workload):  # one at a time: each finds both pods idle
                    payload = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": i % 2 == 0}
                    async with http.post(f"http://127.0.0.1:{proxy_port}/v1/completions", json=payload) as r:
                        assert r.status == 200
                        text = await r.text()
                    assert (text.rstrip().endswith("data: [DONE]") if payload["stream"]
                            else json.loads(text)["usage"]["completion_tokens"] == max_tokens)
        finally:
            await runner.cleanup()
        sim = server.engine.sim
        assert not sim.active and not sim.transfers.held
        assert all(e.kv.num_free_blocks == e.num_gpu_blocks - 1 for e in sim.engines)
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    prefills = sorted((r for r in records if r["engine"] == 0), key=lambda r: r["arrival_time"])
    decodes = sorted((r for r in records if r["engine"] == 1), key=lambda r: r["arrival_time"])
    assert len(prefills) == len(decodes) == len(workload)
    for (prompt, max_tokens), p, d in zip(workload, prefills, decodes):
        assert p["output_tokens"] == 1 and p["input_tokens"] == len(prompt) and p["external_tokens"] == 0
        assert d["output_tokens"] == max_tokens and d["external_tokens"] == len(prompt)
        assert d["arrival_time"] > p["finish_time"]

    # the same arrivals inside the cluster file: its own proxy, no hop
    trace = tmp_path / "trace.jsonl"
    with trace.open("w") as f:
        for i, ((prompt, max_tokens), p) in enumerate(zip(workload, prefills)):
            f.write(json.dumps({"request_id": f"q{i}", "arrival_time_ns": round(p["arrival_time"] * 1e9),
                                "input_toks": len(prompt), "output_toks": max_tokens,
                                "input_tok_ids": prompt}) + "\n")
    replay(str(trace), read_cluster_file(path)[0], tmp_path / "replay")
    inside = sorted((json.loads(line) for line in (tmp_path / "replay" / "requests.jsonl").read_text().splitlines()),
                    key=lambda r: r["arrival_time"])
    shift = prefills[0]["arrival_time"] - inside[0]["arrival_time"]  # replay's clock starts at the trace's start
    for r, p, d in zip(inside, prefills, decodes):
        r = {k: v + shift if k.endswith("_time") and v is not None else v for k, v in r.items()}
        assert r["arrival_time"] == pytest.approx(p["arrival_time"], abs=1e-6)
        assert r["external_tokens"] == d["external_tokens"]
        hop = d["arrival_time"] - p["finish_time"]
        assert r["first_token_time"] == pytest.approx(d["first_token_time"] - hop, abs=1e-6)
        assert r["finish_time"] == pytest.approx(d["finish_time"] - hop, abs=1e-6)


async def test_a_decode_waiting_for_its_kv_is_deferred_in_metrics_and_the_log_line(tmp_path):
    """While its KV crosses a slow link, the decode request counts as vLLM's deferred waiting request
    (num_requests_waiting_by_reason, the log line's Deferred and KV fetch parts); once loaded, its prompt
    tokens count as cached from p2p (NIXL), the prefill's instance none."""
    from server.periodic_log import PeriodicLogger
    text = """
engine: {max-model-len: 8192}
nodes: {a: {}, b: {}}
links: [{between: [a, b], bandwidth: 50MB/s}]
instances:
  - {name: prefill, model: meta-llama/Llama-3.1-8B, hardware: H100, node: a,
     kv-transfer-config: {kv_connector: NixlConnector, kv_role: kv_producer}}
  - {name: decode, model: meta-llama/Llama-3.1-8B, hardware: H100, node: b,
     kv-transfer-config: {kv_connector: NixlConnector, kv_role: kv_consumer}}
"""
    spec, _ = _cluster(tmp_path, text)
    async with running_server("--speed", "1", "--disable-log-stats", deployment=spec) as server:
        sim = server.engine.sim
        log = PeriodicLogger(sim, server.engine.pacer)
        async with aiohttp.ClientSession() as http:
            # a first request: the decode engine works in this log interval (an idle one logs nothing)
            assert (await _complete(http, server.url, prompt=list(range(5000, 5100)), max_tokens=5))[0] == 200
            done = asyncio.ensure_future(_complete(http, server.url, prompt=list(range(1000, 4000)), max_tokens=2))
            decode = sim.engines[1]
            while not decode.scheduler.num_loading:  # 3000 tokens x 128 KiB over 50 MB/s: ~7.9 s to look
                await asyncio.sleep(0.005)
            async with http.get(server.url + "/metrics") as r:
                during = await r.text()
            lines = log.lines()
            assert (await done)[0] == 200
            async with http.get(server.url + "/metrics") as r:
                after = await r.text()
    model = 'model_name="meta-llama/Llama-3.1-8B"'
    assert f'vllm:num_requests_waiting_by_reason{{engine="1",{model},reason="deferred"}} 1.0' in during
    assert f'vllm:num_requests_waiting_by_reason{{engine="1",{model},reason="capacity"}} 0.0' in during
    assert any(line.startswith("Engine 001") and "Waiting: 1 reqs, Deferred: 1 reqs, KV fetch: 0 waiting to start, "
               "1 in progress, 0 completed waiting" in line for line in lines), lines
    assert f'vllm:prompt_tokens_cached_by_source_total{{engine="1",{model},source="p2p"}} 3100.0' in after
    assert f'vllm:prompt_tokens_cached_by_source_total{{engine="1",{model},source="host"}} 0.0' in after
    assert f'vllm:num_requests_waiting_by_reason{{engine="1",{model},reason="deferred"}} 0.0' in after


async def test_a_decode_whose_prefill_is_unknown_recomputes_nothing_lost(tmp_path):
    """kv_transfer_params naming a prefill this cluster does not hold (another server's): priced as a
    remote read at the default network, the request still completes and frees its blocks."""
    port_p, port_d = free_port(), free_port()
    spec, _ = _cluster(tmp_path, pd_pair_text(port_p, port_d))
    async with running_server("--speed", "200", deployment=spec) as server:
        async with aiohttp.ClientSession() as http:
            params = {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "elsewhere",
                      "remote_request_id": "x", "remote_block_ids": [[1, 2, 3]], "remote_host": "10.0.0.9",
                      "remote_port": 5600, "tp_size": 1}
            status, body = await _complete(http, server.urls[2], prompt=list(range(500)), max_tokens=5,
                                           kv_transfer_params=params)
            assert status == 200 and body["usage"]["completion_tokens"] == 5
        sim = server.engine.sim
        assert not sim.active and all(e.kv.num_free_blocks == e.num_gpu_blocks - 1 for e in sim.engines)
