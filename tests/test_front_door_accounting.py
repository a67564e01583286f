"""What a cluster's front door counts, and where: a refusal under the refusing pods' model name, a
request a fault re-routes on its new instance at once, and the fault route's `reroute` flag read as
FastAPI reads a boolean."""
from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import pytest

import front_door
from server.testing import free_port, running_server

LLAMA = "meta-llama/Llama-3.1-8B"
HOLD = {"prompt": "hello", "max_tokens": 500, "ignore_eos": True}


async def _release(held: list[asyncio.Future]) -> None:
    for task in held:
        task.cancel()
    await asyncio.gather(*held, return_exceptions=True)


def _rejections(metrics: str) -> dict[str, float]:
    """model_name -> requests refused at max_num_queued_reqs."""
    return {m: float(v) for m, v in re.findall(
        r'^vllm:admission_rejections_total\{model_name="([^"]+)",reason="max_num_queued_reqs"} (\S+)$', metrics, re.M)}


async def test_a_front_door_refusal_is_counted_under_the_model_of_the_pods_that_refused(tmp_path):
    cluster = front_door.cluster_file(tmp_path, f"""
engine: {{max-model-len: 4096, max-num-queued-reqs: 1}}
instances:
  - {{name: a, model: {LLAMA}, served_model_name: first, hardware: H100}}
  - {{name: b, model: {LLAMA}, served_model_name: [second, alias], hardware: H100}}
""")
    async with running_server("--cluster", cluster, "--speed", "0.01") as server, aiohttp.ClientSession() as http:
        held = [await front_door.hold(server.engine, http, server.url, dict(HOLD, model="alias"))]
        async with http.post(server.url + "/v1/completions", json={"model": "alias", "prompt": "hi",
                                                                   "max_tokens": 1}) as r:
            refused = r.status
        async with http.get(server.url + "/metrics") as r:
            counted = _rejections(await r.text())
        await _release(held)
    assert refused == 503
    # b's own vLLM pod would count it under its served_model_name, the first of its names
    assert counted == {"first": 0.0, "second": 1.0}


async def test_a_request_a_fault_reroutes_is_counted_on_its_new_instance_at_once(tmp_path, dev_mode):
    port_a = free_port()
    cluster = front_door.cluster_file(tmp_path, f"""
engine: {{max-model-len: 4096}}
routing: round_robin
instances:
  - {{name: a, model: {LLAMA}, hardware: H100, port: {port_a}, max-num-queued-reqs: 1}}
  - {{name: b, model: {LLAMA}, hardware: H100}}
""")
    async with running_server("--cluster", cluster, "--speed", "0.01") as server, aiohttp.ClientSession() as http:
        engine = server.engine
        a, b = engine.sim.instances
        held = [await front_door.hold(engine, http, server.url, HOLD)]  # round robin: on a
        before = (engine.backlogs[a].requests, engine.backlogs[b].requests)
        async with http.post(server.url + "/emulator/instances/a/fail?reroute=true") as r:
            assert r.status == 200 and (await r.json())["failed_requests"] == 0
        (request,) = engine.sim.active.values()
        moved = {i.name: (engine.backlogs[i].requests, engine.backlogs[i].prefill_tokens) for i in (a, b)}
        still_waiting = request.num_output_tokens == 0
        async with http.post(server.url + "/emulator/instances/a/restore") as r:
            assert r.status == 200
        # a, back and empty, takes its one request
        held.append(await front_door.hold(engine, http, server.urls[1], HOLD))
        await _release(held)
    assert before == (1, 0)
    assert still_waiting  # no first token on b yet: the count moved with the re-route itself
    assert moved == {"a": (0, 0), "b": (1, request.num_prompt_tokens)}


@pytest.mark.parametrize("flag, rerouted", [("true", True), ("YES", True), ("On", True), ("1", True),
                                            ("false", False), ("no", False), ("OFF", False), ("0", False)])
async def test_the_reroute_flag_takes_the_booleans_fastapi_takes(tmp_path, dev_mode, flag, rerouted):
    cluster = front_door.cluster_file(tmp_path, f"""
engine: {{max-model-len: 4096}}
routing: round_robin
instances:
  - {{name: a, model: {LLAMA}, hardware: H100}}
  - {{name: b, model: {LLAMA}, hardware: H100}}
""")
    async with running_server("--cluster", cluster, "--speed", "0.01") as server, aiohttp.ClientSession() as http:
        held = [await front_door.hold(server.engine, http, server.url, HOLD)]  # on a
        async with http.post(server.url + f"/emulator/instances/a/fail?reroute={flag}") as r:
            failed = (await r.json())["failed_requests"]
        await _release(held)
    assert failed == (0 if rerouted else 1)


@pytest.mark.parametrize("flag", ["maybe", "2", "", "tru e"])
async def test_a_reroute_flag_that_is_no_boolean_is_a_400_and_fails_nothing(tmp_path, dev_mode, flag):
    cluster = front_door.cluster_file(tmp_path, f"""
instances:
  - {{name: a, model: {LLAMA}, hardware: H100, max-model-len: 4096}}
  - {{name: b, model: {LLAMA}, hardware: H100, max-model-len: 4096}}
""")
    async with running_server("--cluster", cluster, "--speed", "1") as server, aiohttp.ClientSession() as http:
        async with http.post(server.url + "/emulator/instances/a/fail", params={"reroute": flag}) as r:
            status, body = r.status, json.loads(await r.text())
        up = [i.up for i in server.engine.sim.instances]
    assert status == 400 and up == [True, True]
    assert body["error"]["message"] == (f"reroute must be a boolean: true or false (or 1/0, yes/no, on/off) "
                                        f"(parameter=reroute, value={flag})")
