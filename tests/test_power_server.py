"""Power on the server: vllm_emulator:power_watts and energy_joules_total on /metrics, energy_j in the request log."""
from __future__ import annotations

import asyncio
import json
import re

import aiohttp

from profiles.cluster_file import read_cluster_file
from server.testing import running_server

FLAGS = ("--hardware", "A6000", "--max-model-len", "2048")
CLUSTER = """
nodes:
  server:
    power: {idle_w: 400, psu_efficiency: 0.9, cpu: {idle_w: 10, active_w: 185, util: 0.2, busy_util: 0.3},
            links: {count: 1, idle_w: 5, pj_per_bit: 4}}
instances:
  - {name: a, model: meta-llama/Llama-3.1-8B, hardware: A6000, node: server, max-model-len: 2048}
  - {name: b, model: meta-llama/Llama-3.1-8B, hardware: A6000, node: server, max-model-len: 2048}
"""


def series(text: str, name: str) -> dict[tuple[str, str], float]:
    out = {}
    for m in re.finditer(rf'^{re.escape(name)}\{{cluster_instance="([\w-]+)",component="(\w+)"\}} (\S+)$', text, re.M):
        out[m.group(1), m.group(2)] = float(m.group(3))
    return out


async def scrape(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url + "/metrics") as r:
        return await r.text()


async def send(http: aiohttp.ClientSession, url: str, n: int, max_tokens: int) -> None:
    async def one(i: int) -> None:
        payload = {"prompt": "the quick brown fox " * (20 + 7 * i), "max_tokens": max_tokens, "ignore_eos": True}
        async with http.post(url + "/v1/completions", json=payload) as r:
            assert r.status == 200, await r.text()
            await r.read()
    await asyncio.gather(*(one(i) for i in range(n)))


async def test_metrics_show_power_while_serving_and_counters_that_only_grow(tmp_path):
    log = tmp_path / "requests.jsonl"
    async with running_server(*FLAGS, "--speed", "2", "--request-log", str(log)) as server, \
            aiohttp.ClientSession() as http:
        idle = series(await scrape(http, server.url), "vllm_emulator:power_watts")
        assert idle[("0", "gpu")] == 33.0 and set(c for _, c in idle) >= {"gpu", "cpu", "psu"}
        before = series(await scrape(http, server.url), "vllm_emulator:energy_joules_total")
        busy = asyncio.ensure_future(send(http, server.url, 8, 100))  # 100 decode steps: ~1.3 wall seconds
        during = []
        while not busy.done():  # the GPU's draw, scraped while it decodes
            during.append(series(await scrape(http, server.url), "vllm_emulator:power_watts")[("0", "gpu")])
            await asyncio.sleep(0.05)
        await busy
        after = series(await scrape(http, server.url), "vllm_emulator:energy_joules_total")
    assert 300.0 in during  # an A6000 decoding, at its board limit
    assert all(after[k] >= before[k] for k in before) and after[("0", "gpu")] > before[("0", "gpu")]
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == 8 and all(r["energy_j"] > 0 for r in rows)
    assert sum(r["energy_j"] for r in rows) < after[("0", "gpu")]  # requests' energy is part of the whole


async def test_a_cluster_node_power_section_shows_every_component_per_instance(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(CLUSTER)
    spec = read_cluster_file(path)[0]
    async with running_server("--speed", "20", deployment=spec) as server, aiohttp.ClientSession() as http:
        idle = series(await scrape(http, server.url), "vllm_emulator:power_watts")
    assert {i for i, _ in idle} == {"a", "b"}
    assert abs(sum(idle.values()) - 400.0) < 1e-9  # the node's measured idle at the wall
    assert idle[("a", "base")] > 0 and idle[("a", "psu")] > 0 and idle[("a", "link")] == idle[("b", "link")]


async def test_an_instance_port_shows_its_own_power_series(tmp_path):
    from server.testing import free_port
    path = tmp_path / "cluster.yaml"
    path.write_text(CLUSTER.replace("node: server, max-model-len: 2048}\n",
                                    f"node: server, max-model-len: 2048, port: {free_port()}}}\n", 1))
    spec = read_cluster_file(path)[0]
    async with running_server("--speed", "20", deployment=spec) as server, aiohttp.ClientSession() as http:
        front = series(await scrape(http, server.urls[0]), "vllm_emulator:power_watts")
        own = series(await scrape(http, server.urls[1]), "vllm_emulator:power_watts")
        energy = series(await scrape(http, server.urls[1]), "vllm_emulator:energy_joules_total")
    assert {i for i, _ in own} == {i for i, _ in energy} == {"a"}
    assert own == {k: v for k, v in front.items() if k[0] == "a"}
