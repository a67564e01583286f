"""`--kv-events-config` on the server (server/kv_events.py): the flag as vLLM parses it, one ZMQ
publisher per data-parallel rank on vLLM's port offsets, `/kv_event_sources`, batches with topic
and sequence numbers, the replay socket, and the events of KV pressure and /reset_prefix_cache.
Decoding with vLLM's own classes and hashes equal to vLLM's: test_kv_events_vllm.py."""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time

import aiohttp
import msgspec
import pytest
import zmq

from server.kv_events import offset_endpoint_port, parse_kv_events_config
from server.serve import load_target
from server.testing import free_port, running_server, serve_args

FAST = ("--speed", "1000")
END_SEQ = (-1).to_bytes(8, "big", signed=True)


def free_ports(n: int) -> int:
    """The first of `n` consecutive free ports (a rank r publisher binds port + r)."""
    while True:
        first = free_port()
        try:
            sockets = [socket.create_server(("0.0.0.0", first + i)) for i in range(n)]
        except OSError:
            continue
        for s in sockets:
            s.close()
        return first


def kv_events_flag(**fields) -> tuple[str, str]:
    return "--kv-events-config", json.dumps({"enable_kv_cache_events": True, **fields})


class Subscriber:
    """A SUB socket on the publisher and a DEALER on its replay socket, as a router's indexer has."""

    def __init__(self, endpoint: str, replay_endpoint: str | None = None, topic: bytes = b"") -> None:
        ctx = zmq.Context.instance()
        self.sub = ctx.socket(zmq.SUB)
        self.sub.connect(endpoint.replace("*", "127.0.0.1"))
        self.sub.setsockopt(zmq.SUBSCRIBE, topic)
        self.replay_endpoint = replay_endpoint and replay_endpoint.replace("*", "127.0.0.1")

    def live(self, timeout: float = 0.2) -> list[tuple[bytes, int, list]]:
        out = []
        while self.sub.poll(int(timeout * 1000)):
            topic, seq, payload = self.sub.recv_multipart()
            out.append((topic, int.from_bytes(seq, "big"), msgspec.msgpack.decode(payload)))
        return out

    def replay(self, start: int) -> list[tuple[bytes, int, list]]:
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.connect(self.replay_endpoint)
        try:
            dealer.send_multipart((b"", start.to_bytes(8, "big")))
            out = []
            while True:
                assert dealer.poll(5000), "no answer from the replay socket"
                _, topic, seq, payload = dealer.recv_multipart()
                if seq == END_SEQ:
                    assert topic == b"" and payload == b""
                    return out
                out.append((topic, int.from_bytes(seq, "big"), msgspec.msgpack.decode(payload)))
        finally:
            dealer.close(linger=0)

    def close(self) -> None:
        self.sub.close(linger=0)


async def complete(http: aiohttp.ClientSession, url: str, prompt: list[int], max_tokens: int = 8) -> dict:
    payload = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "return_token_ids": True}
    async with http.post(url + "/v1/completions", json=payload) as r:
        assert r.status == 200, await r.text()
        return await r.json()


def events_of(batches) -> list[dict]:
    return [event for _, _, (ts, events, rank) in batches for event in events]


# -- the flag -------------------------------------------------------------------------------------
def test_the_flag_takes_vllms_json_with_its_defaults():
    config = parse_kv_events_config('{"enable_kv_cache_events": true, "buffer_steps": 2k}')
    assert (config.publisher, config.endpoint, config.replay_endpoint, config.buffer_steps, config.hwm,
            config.max_queue_size, config.topic) == ("zmq", "tcp://*:5557", None, 2000, 100_000, 100_000, "")
    assert parse_kv_events_config("{}").publisher == "null"
    assert parse_kv_events_config('{"buffer_steps": 1K}').buffer_steps == 1024


@pytest.mark.parametrize("text, message", [
    ('{"enable_kv_cache_events": true, "bogus": 1}', "Unexpected keyword argument"),
    ('{"publisher": "kafka"}', "Input should be 'null' or 'zmq'"),
    ('{"hwm": "lots"}', "Input should be a valid integer"),
    ("enable", "Invalid JSON"),
])
def test_a_bad_config_is_an_argument_error_in_pydantics_words(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message) as info:
        parse_kv_events_config(text)
    assert "validation error for KVEventsConfig" in str(info.value)


def test_ports_move_up_by_the_data_parallel_rank_as_vllm_moves_them():
    assert offset_endpoint_port("tcp://*:5557", 0) == "tcp://*:5557"
    assert offset_endpoint_port("tcp://*:5557", 3) == "tcp://*:5560"
    assert offset_endpoint_port("tcp://10.0.0.1:5557", 1) == "tcp://10.0.0.1:5558"
    assert offset_endpoint_port("tcp://*:0", 2) == "tcp://*:0"
    assert offset_endpoint_port("inproc://cache", 2) == "inproc://cache_dp2"
    assert offset_endpoint_port(None, 2) is None
    with pytest.raises(ValueError, match="must contain 'inproc' or 'tcp'"):
        offset_endpoint_port("ipc:///tmp/kv", 1)


def test_serve_accepts_the_flag_and_no_longer_lists_it_as_not_simulated():
    from server.vllm_flags import unsupported_flags_used
    args = serve_args(*kv_events_flag(), "--prefix-caching-hash-algo", "sha256_cbor")
    assert args.kv_events_config.enable_kv_cache_events and args.prefix_caching_hash_algo == "sha256_cbor"
    assert unsupported_flags_used(args) == []


# -- /kv_event_sources --------------------------------------------------------------------------------
async def test_kv_event_sources_is_empty_without_events_or_with_the_null_publisher():
    for argv in ((), ("--kv-events-config", '{"enable_kv_cache_events": true, "publisher": "null"}'),
                 ("--kv-events-config", '{"publisher": "zmq"}')):
        async with running_server(*FAST, *argv) as server:
            async with aiohttp.ClientSession() as http:
                async with http.get(server.url + "/kv_event_sources") as r:
                    assert await r.json() == {}
            assert server.running.kv_events is None
            assert server.engine.sim.engines[0].kv.pool.events is None


async def test_kv_event_sources_answers_each_ranks_config_on_its_offset_ports():
    pub, replay = free_ports(2), free_ports(2)
    flag = kv_events_flag(endpoint=f"tcp://*:{pub}", replay_endpoint=f"tcp://*:{replay}", topic="kv",
                          buffer_steps=100)
    async with running_server(*FAST, *flag, "--data-parallel-size", "2", "--port-per-engine") as server:
        async with aiohttp.ClientSession() as http:
            answers = []
            for url in server.urls:
                async with http.get(url + "/kv_event_sources") as r:
                    answers.append(await r.json())
    rank = {str(r): {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{pub + r}",
                     "replay_endpoint": f"tcp://*:{replay + r}", "buffer_steps": 100, "hwm": 100_000,
                     "max_queue_size": 100_000, "topic": "kv"} for r in (0, 1)}
    assert answers == [rank, {"0": rank["0"]}, {"1": rank["1"]}]


async def test_a_wildcard_port_zero_binds_the_node_ip_and_reports_the_port(monkeypatch):
    monkeypatch.setenv("VLLM_HOST_IP", "127.0.0.1")
    async with running_server(*FAST, *kv_events_flag(endpoint="tcp://*:0", replay_endpoint="tcp://*:0")) as server:
        config = server.running.kv_events.sources()["0"]
        assert config["endpoint"].startswith("tcp://127.0.0.1:") and not config["endpoint"].endswith(":0")
        subscriber = Subscriber(config["endpoint"], config["replay_endpoint"])
        try:
            async with aiohttp.ClientSession() as http:
                await complete(http, server.url, list(range(1, 40)))
            await asyncio.sleep(0.2)
            ((_, seq, (_, events, _)),) = subscriber.replay(0)  # the prompt's two blocks, at prefill
            assert seq == 0 and events[0]["token_ids"] == list(range(1, 33))
        finally:
            subscriber.close()


async def test_a_taken_port_fails_the_start_with_a_clear_error():
    port = free_port()
    blocker = zmq.Context.instance().socket(zmq.PUB)
    blocker.bind(f"tcp://*:{port}")
    try:
        with pytest.raises(OSError, match=f"KV events of engine 0: Address already in use .*:{port}"):
            async with running_server(*FAST, *kv_events_flag(endpoint=f"tcp://*:{port}")):
                pass
    finally:
        blocker.close(linger=0)


# -- what is published ------------------------------------------------------------------------------
async def test_batches_carry_topic_sequence_ts_rank_and_the_replay_socket_returns_missed_ones():
    pub, replay = free_port(), free_port()
    flag = kv_events_flag(endpoint=f"tcp://*:{pub}", replay_endpoint=f"tcp://*:{replay}", topic="kv")
    before = time.time()  # the batches' ts is vLLM's wall-clock time.time(): between this and `wall` below
    async with running_server(*FAST, *flag) as server:
        subscriber = Subscriber(f"tcp://*:{pub}", f"tcp://*:{replay}", topic=b"kv")
        try:
            async with aiohttp.ClientSession() as http:
                # the subscription reaches the publisher some time after connect: send until one arrives live
                live, started = [], time.monotonic()
                prompts = []
                while not live:
                    assert time.monotonic() - started < 60, "no batch arrived on the PUB socket"
                    prompts.append([7, len(prompts) + 1] + list(range(100, 130)))
                    body = await complete(http, server.url, prompts[-1])
                    assert body["usage"]["prompt_tokens"] == 32
                    await asyncio.sleep(0.1)
                    live = subscriber.live()
            wall = time.time()
            everything = subscriber.replay(0)
            assert [seq for _, seq, _ in everything] == list(range(len(everything)))
            assert all(topic == b"kv" for topic, _, _ in everything + live)
            by_seq = {seq: batch for _, seq, batch in everything}
            assert all(by_seq[seq] == batch for _, seq, batch in live)  # live and replayed are the same bytes
            assert subscriber.replay(len(everything) - 1) == everything[-1:]
            assert subscriber.replay(len(everything) + 5) == []
            for _, _, batch in everything:
                ts, events, rank = batch
                assert rank == 0 and before - 1 < ts <= wall + 1  # (1 s: the clock's own adjustments)
                assert all(e["type"] == "BlockStored" for e in events)
            # every prompt's two blocks were stored, chained, with their token ids
            stored = [e for e in events_of(everything) if e["parent_block_hash"] is None]
            assert [e["token_ids"] for e in stored] == [p for p in prompts]
            assert all(len(e["block_hashes"]) == 2 and e["extra_keys"] == [None, None] and e["medium"] == "GPU"
                       and e["group_idx"] == 0 and e["kv_cache_spec_kind"] == "full_attention" for e in stored)
        finally:
            subscriber.close()


async def test_kv_pressure_removes_blocks_and_reset_prefix_cache_clears_them(monkeypatch):
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")
    pub, replay = free_port(), free_port()
    flag = kv_events_flag(endpoint=f"tcp://*:{pub}", replay_endpoint=f"tcp://*:{replay}")
    async with running_server(*FAST, *flag, "--num-gpu-blocks-override", "12", "--max-model-len", "160") as server:
        subscriber = Subscriber(f"tcp://*:{pub}", f"tcp://*:{replay}")
        try:
            async with aiohttp.ClientSession() as http:
                for i in range(6):  # 6 x 5 blocks through an 11-block cache: the oldest are evicted
                    await complete(http, server.url, [1000 + i] * 64, max_tokens=17)
                await asyncio.sleep(0.2)
                events = events_of(subscriber.replay(0))
                stored = {h for e in events if e["type"] == "BlockStored" for h in e["block_hashes"]}
                removed = [e["block_hashes"][0] for e in events if e["type"] == "BlockRemoved"]
                assert removed and set(removed) <= stored and len(removed) == len(set(removed))
                pool = server.engine.sim.engines[0].kv.pool
                assert len(stored) - len(removed) == len(pool.cached)
                async with http.post(server.url + "/reset_prefix_cache") as r:
                    assert (await r.json()) == {"success": True}
                await asyncio.sleep(0.2)
                assert events_of(subscriber.replay(0))[-1]["type"] != "AllBlocksCleared"  # waits for a step
                await complete(http, server.url, [5] * 20, max_tokens=2)
                await asyncio.sleep(0.2)
                after = events_of(subscriber.replay(0))[len(events):]
                assert [e["type"] for e in after] == ["AllBlocksCleared", "BlockStored"]
        finally:
            subscriber.close()


async def test_events_stop_with_the_server_and_the_ports_are_free_again():
    pub = free_port()
    flag = kv_events_flag(endpoint=f"tcp://*:{pub}")
    for _ in range(2):
        async with running_server(*FAST, *flag) as server:
            publisher = server.running.kv_events.publishers[0]
        assert not publisher._thread.is_alive()
        assert server.engine.sim.engines[0].kv.pool.events is None


async def test_a_served_cluster_publishes_each_instances_ranks_hashed_as_its_own_flags(tmp_path):
    """Every instance is its own `vllm serve`: its engines publish as its DP ranks, hash with its own
    --prefix-caching-hash-algo, and its port lists them; the ports move up by engine index."""
    pub, port_a, port_b = free_ports(3), free_port(), free_port()
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(f"""
engine: {{max-model-len: 4096}}
instances:
  - {{name: a, model: meta-llama/Llama-3.1-8B, hardware: H100, data-parallel-size: 2, port: {port_a}}}
  - {{name: b, model: meta-llama/Llama-3.1-8B, hardware: H100, port: {port_b},
      engine: {{prefix-caching-hash-algo: sha256_cbor}}}}
""")
    argv = (*FAST, "--cluster", str(cluster), *kv_events_flag(endpoint=f"tcp://*:{pub}"))
    async with running_server(*argv, deployment=load_target(serve_args(*argv))[0]) as server:
        async with aiohttp.ClientSession() as http:
            answers = {}
            for url in (server.url, f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"):
                async with http.get(url + "/kv_event_sources") as r:
                    answers[url] = {k: v["endpoint"] for k, v in (await r.json()).items()}
            subscriber = Subscriber(f"tcp://*:{pub + 2}")
            try:
                batches, attempt = [], 0
                while not batches:  # until the subscription is through; a new prompt each time (no prefix hit)
                    attempt += 1
                    prompt = [attempt] + list(range(2, 33))
                    await complete(http, f"http://127.0.0.1:{port_b}", prompt, max_tokens=2)
                    batches = subscriber.live()
            finally:
                subscriber.close()
        recorders = server.running.kv_events.recorders
    assert list(answers.values()) == [{str(i): f"tcp://*:{pub + i}" for i in range(3)},
                                      {"0": f"tcp://*:{pub}", "1": f"tcp://*:{pub + 1}"},
                                      {"0": f"tcp://*:{pub + 2}"}]
    assert [r.hasher.algo for r in recorders] == ["sha256", "sha256", "sha256_cbor"]
    (_, _, (_, events, rank)) = batches[-1]
    assert rank == 0 and events[0]["block_hashes"] == [
        h & (1 << 64) - 1 for h in (int.from_bytes(x, "big") for x in recorders[2].hasher.chain(prompt, 16))]
