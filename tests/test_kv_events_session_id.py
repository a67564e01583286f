"""BlockStored.session_id: vLLM 0.33 publishes the session id its front end took for the request (the body's
`session_id`, else the X-Session-ID header, else a string `vllm_xargs["session_id"]`; server/session_id.py),
apart from the `user` field the cluster's router keeps sessions on; the offload connector's events carry
none. Events are taken as the server hands them to its publishers (no socket, no wall-clock wait); the
same against vLLM's own classes and front end: test_kv_events_vllm.py."""
from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import msgspec
import numpy as np
import pytest

from emulator.kv_events import BlockHasher, BlockStored, KVEventRecorder
from emulator.request import Request
from server.kv_event_wire import BatchEncoder
from server.session_id import vllm_session_id
from server.testing import free_port, running_server

FAST = ("--speed", "1000")
BASE = "meta-llama/Llama-3.1-8B"


class Body:
    def __init__(self, **fields) -> None:
        self.__dict__.update(fields)


@pytest.mark.parametrize("fields, headers, expected", [
    ({"session_id": "body", "vllm_xargs": {"session_id": "xargs"}}, {"X-Session-ID": "header"}, "body"),
    ({"session_id": "", "vllm_xargs": {"session_id": "xargs"}}, {"X-Session-ID": "header"}, "header"),
    ({"session_id": None, "vllm_xargs": {"session_id": "xargs"}}, {"X-Session-ID": ""}, "xargs"),
    ({"vllm_xargs": {"session_id": 7}}, None, None),  # not a string: no session id
    ({"vllm_xargs": {"session_id": ""}}, {}, None),
    ({"user": "alice"}, {}, None),  # the router's session key is not vLLM's session id
])
def test_the_session_id_is_the_bodys_else_the_headers_else_vllm_xargs(fields, headers, expected):
    assert vllm_session_id(Body(**fields), headers) == expected


class Captured:
    """Every event the server's publishers are handed, as the wire writes them (maps, by msgspec)."""

    def __init__(self, server) -> None:
        self.events: list[dict] = []
        self.engines: list[int] = []  # the engine that published each
        encoder = BatchEncoder()
        for engine, publisher in enumerate(server.running.kv_events.publishers):
            publish = publisher.publish

            def capture(ts, events, publish=publish, engine=engine):
                _, wire, _ = msgspec.msgpack.decode(encoder.encode(ts, events, 0))
                self.events += wire
                self.engines += [engine] * len(wire)
                publish(ts, events)
            publisher.publish = capture

    def stored_since(self, start: int) -> list[dict]:
        return [e for e in self.events[start:] if e["type"] == "BlockStored"]


def kv_events_flag() -> tuple[str, str]:
    return "--kv-events-config", json.dumps({"enable_kv_cache_events": True, "endpoint": f"tcp://*:{free_port()}"})


async def _session_ids_of(http, captured: Captured, url: str, route: str, body: dict,
                          headers: dict | None = None) -> list:
    """The session_id of each BlockStored the request's blocks gave (missing: vLLM's default, left out)."""
    start = len(captured.events)
    async with http.post(url + route, json=body, headers=headers or {}) as r:
        assert r.status == 200, await r.text()
    stored = captured.stored_since(start)
    assert stored
    return sorted({e.get("session_id", "<none>") for e in stored})


async def test_a_served_request_publishes_its_session_id_in_its_block_stored_events():
    async with running_server(*FAST, *kv_events_flag()) as server, aiohttp.ClientSession() as http:
        captured = Captured(server)
        prompts = iter([[i] + list(range(100, 139)) for i in range(1, 20)])  # 2 full blocks each, no prefix hit

        async def completion(headers: dict | None = None, **fields) -> list:
            body = {"prompt": next(prompts), "max_tokens": 2, "ignore_eos": True, **fields}
            return await _session_ids_of(http, captured, server.url, "/v1/completions", body, headers)

        both = {"session_id": "conv-1", "vllm_xargs": {"session_id": "from-xargs"}}
        assert await completion({"X-Session-ID": "from-header"}, **both) == ["conv-1"]
        assert await completion({"x-session-id": "from-header"}, vllm_xargs={"session_id": "x"}) == ["from-header"]
        assert await completion(vllm_xargs={"session_id": "from-xargs"}) == ["from-xargs"]
        assert await completion(user="alice") == ["<none>"]  # `user` steers routing only
        assert await completion() == ["<none>"]

        chat = {"messages": [{"role": "user", "content": "hello " * 40}], "max_tokens": 2, "session_id": "chat-7"}
        assert await _session_ids_of(http, captured, server.url, "/v1/chat/completions", chat) == ["chat-7"]
        responses = {"input": "tell me " * 40, "max_output_tokens": 2, "vllm_xargs": {"session_id": "from-xargs"}}
        assert await _session_ids_of(http, captured, server.url, "/v1/responses", responses,
                                     {"X-Session-ID": "resp-3"}) == ["resp-3"]

        async with http.post(server.url + "/v1/completions", json={"prompt": [1, 2], "session_id": 5}) as r:
            assert r.status == 400  # vLLM's field is a string


def pd_pair(tmp_path) -> Path:
    """A cluster file of one NIXL prefill pod `p` and one decode pod `d`."""
    nixl = "kv-transfer-config: {kv_connector: NixlConnector, kv_role: kv_"
    path = tmp_path / "pd.yaml"
    path.write_text(f"engine: {{max-model-len: 4096}}\ninstances:\n"
                    f"  - {{name: p, model: {BASE}, hardware: H100, {nixl}producer}}}}\n"
                    f"  - {{name: d, model: {BASE}, hardware: H100, {nixl}consumer}}}}\n")
    return path


async def test_the_pd_proxy_carries_the_session_id_to_the_prefill_and_the_decode_pod(tmp_path):
    async with running_server(*FAST, "--cluster", str(pd_pair(tmp_path)), *kv_events_flag()) as server, \
            aiohttp.ClientSession() as http:
        captured, sim = Captured(server), server.engine.sim
        body = {"prompt": list(range(10, 60)), "max_tokens": 40, "ignore_eos": True}
        assert await _session_ids_of(http, captured, server.url, "/v1/completions", body,
                                     {"X-Session-ID": "pd-1"}) == ["pd-1"]
    by_pod = {}
    for engine, event in zip(captured.engines, captured.events):
        if event["type"] == "BlockStored":
            by_pod.setdefault(sim.instance_of[engine].name, set()).add(event.get("session_id"))
    assert by_pod == {"p": {"pd-1"}, "d": {"pd-1"}}  # the prefill's prompt blocks; the decode's, loaded and new


def test_offload_tier_events_carry_no_session_id():
    """vLLM's OffloadingConnector builds its BlockStored without the request's session (offloading/events.py)."""
    recorder = KVEventRecorder(BlockHasher("sha256", 0), 16, blocks_per_chunk=1, self_describing=True)
    request = Request("r", 32, 1, prompt_token_ids=np.arange(32, dtype=np.int64), session_id="s-1")
    request.block_hashes = [11, 12]
    recorder.request_added(request)
    recorder.blocks_stored(request, 0, 2)

    class Tier:
        class spec:
            medium = "CPU"
    recorder.tiers_changed([(Tier, [11, 12], [])])
    gpu, *cpu = recorder.take_events()
    assert isinstance(gpu, BlockStored) and gpu.session_id == "s-1"
    assert len(cpu) == 2 and all(e.medium == "CPU" and e.session_id is None for e in cpu)


async def test_the_token_in_token_out_generate_route_takes_the_header_alone():
    """vLLM's /inference/v1/generate reads X-Session-ID only (its request has no session_id field)."""
    async with running_server(*FAST, "--enable-scale-out", *kv_events_flag()) as server, \
            aiohttp.ClientSession() as http:
        captured = Captured(server)
        body = {"token_ids": [5] + list(range(300, 339)), "sampling_params": {"max_tokens": 2}}
        assert await _session_ids_of(http, captured, server.url, "/inference/v1/generate", body,
                                     {"X-Session-ID": "gen-1"}) == ["gen-1"]
