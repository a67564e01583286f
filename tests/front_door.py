"""Helpers of the front-door tests: a cluster file written out, a request held in an engine."""
from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest


def cluster_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    return str(path)


async def hold(engine, http: aiohttp.ClientSession, url: str, body: dict) -> asyncio.Future:
    """Send a request that stays in the engine (nothing ends at the tests' speed); return once the
    front end counts it. Fails if it was answered instead (refused)."""
    before = engine.num_unfinished
    task = asyncio.ensure_future(http.post(url + "/v1/completions", json=body))
    while engine.num_unfinished == before:
        if task.done():
            response = task.result()
            pytest.fail(f"{url} answered {response.status}: {await response.text()}")
        await asyncio.sleep(0.01)
    return task


def leftovers(engine) -> tuple[int, int, int, list[bool]]:
    """What a served engine still holds: unfinished requests, prefill tokens counted, active requests, and per
    simulated engine whether every KV block (the null block aside) is free."""
    return (engine.num_unfinished, engine.num_prefill_tokens, len(engine.sim.active),
            [e.kv.num_free_blocks == e.num_gpu_blocks - 1 for e in engine.sim.engines])
