"""P/D pods in separate processes: the decode pod tells the prefill pod when it has read a request's KV
(vLLM's NIXL notification), so the prefill frees it at once instead of at its lease's end."""
from __future__ import annotations

import asyncio
import json
import random

import aiohttp

from prometheus_client.parser import text_string_to_metric_families

from server.testing import running_server

# a lease far past the test: a prefill freed at all was freed by the notice, however busy the machine
LEASE = {"kv_connector_extra_config": {"kv_lease_duration": 1_000_000}}
PRODUCER = json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_producer", **LEASE})
CONSUMER = json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_consumer"})
FAST = ("--max-model-len", "8192")


def metric_value(text: str, name: str, **labels) -> float:
    """The one sample of `name` whose labels include `labels`."""
    found = [s.value for family in text_string_to_metric_families(text) for s in family.samples
             if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) == 1, (name, labels, found)
    return found[0]


async def _held_after(sim, seconds: float) -> int:
    """How many prefills the pod still holds once `seconds` have passed or none is left."""
    for _ in range(int(seconds / 0.05)):
        if not sim.transfers.held:
            break
        await asyncio.sleep(0.05)
    return len(sim.transfers.held)


async def test_a_decode_pod_in_another_process_frees_the_prefill_it_read():
    prompt = [random.Random(3).randrange(1000, 30000) for _ in range(2000)]
    async with running_server(*FAST, "--kv-transfer-config", PRODUCER) as prefill, \
            running_server(*FAST, "--kv-transfer-config", CONSUMER) as decode, aiohttp.ClientSession() as http:
        body = {"prompt": prompt, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}
        async with http.post(prefill.url + "/v1/completions", json=body) as r:
            params = (await r.json())["kv_transfer_params"]
        assert params["remote_port"] == prefill.running.ports[0]  # where it listens, not --port 0
        assert len(prefill.engine.sim.transfers.held) == 1  # held for the decode side
        async with http.post(decode.url + "/v1/completions",
                             json={"prompt": prompt, "max_tokens": 8, "kv_transfer_params": params}) as r:
            answer = await r.json()
        assert answer["usage"]["completion_tokens"] == 8
        assert decode.engine.sim.transfers.num_failed == 0
        assert await _held_after(prefill.engine.sim, 60.0) == 0  # (the lease is far away: it was the notice)
        engine = prefill.engine.sim.engines[0]
        assert engine.kv.num_free_blocks == engine.num_gpu_blocks - 1
        assert prefill.engine.sim.transfers.stats[0].pd_expired == 0


async def test_a_read_notice_naming_nothing_held_or_malformed_is_answered():
    async with running_server(*FAST, "--kv-transfer-config", PRODUCER) as prefill, aiohttp.ClientSession() as http:
        url = prefill.url + "/emulator/kv_transfer/read"
        async with http.post(url, json={"remote_engine_id": "x", "remote_request_id": "y"}) as r:
            assert r.status == 200 and await r.json() == {"released": False}
        async with http.post(url, json={"remote_engine_id": "x"}) as r:
            assert r.status == 400
        async with http.post(url, data=b"not json") as r:
            assert r.status == 400


async def test_a_mooncake_prefill_pod_records_the_push_a_decode_pod_in_another_process_read():
    """Mooncake's prefill side pushes and records each transfer (vLLM's _send_blocks); between processes
    it learns of it from the decode pod's read notice, with what was moved."""
    producer = json.dumps({"kv_connector": "MooncakeConnector", "kv_role": "kv_producer", **LEASE})
    consumer = json.dumps({"kv_connector": "MooncakeConnector", "kv_role": "kv_consumer"})
    prompt = [random.Random(4).randrange(1000, 30000) for _ in range(2000)]
    async with running_server(*FAST, "--kv-transfer-config", producer) as prefill, \
            running_server(*FAST, "--kv-transfer-config", consumer) as decode, aiohttp.ClientSession() as http:
        body = {"prompt": prompt, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}
        async with http.post(prefill.url + "/v1/completions", json=body) as r:
            params = (await r.json())["kv_transfer_params"]
        async with http.post(decode.url + "/v1/completions",
                             json={"prompt": prompt, "max_tokens": 4, "kv_transfer_params": params}) as r:
            assert r.status == 200
        assert await _held_after(prefill.engine.sim, 60.0) == 0
        async with http.get(prefill.url + "/metrics") as r:
            text = await r.text()
    whole_blocks = 125 * 16 * 131072  # 2,000 tokens: 125 blocks of Llama-8B's 128 KiB per token
    assert metric_value(text, "vllm:mooncake_xfer_time_seconds_count") == 1
    assert metric_value(text, "vllm:mooncake_bytes_transferred_sum") == whole_blocks
    assert metric_value(text, "vllm_emulator:kv_transfer_bytes_total", direction="sent") == whole_blocks
