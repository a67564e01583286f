"""kv_cache_report_mode through the cluster's P/D proxy: vLLM's toy proxy sends the prefill pod the client's body
(its `vllm_xargs` included), so a "full" request's prefix hit on the prefill pod is published again there, as on
one server (test_kv_events_report_mode.py). Events are taken as the server hands them to its publishers."""
from __future__ import annotations

import aiohttp

from server.testing import running_server
from test_kv_events_session_id import FAST, Captured, kv_events_flag, pd_pair


async def test_the_pd_proxy_carries_the_report_mode_to_the_prefill_pod(tmp_path):
    shared = list(range(100, 164))  # 4 blocks of 16
    async with running_server(*FAST, "--cluster", str(pd_pair(tmp_path)), *kv_events_flag()) as server, \
            aiohttp.ClientSession() as http:
        captured, sim = Captured(server), server.engine.sim

        async def prefill_pod_stored(prompt: list[int], **fields) -> list[dict]:
            start = len(captured.events)
            body = {"prompt": prompt, "max_tokens": 2, "ignore_eos": True, **fields}
            async with http.post(server.url + "/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
            return [e for engine, e in zip(captured.engines[start:], captured.events[start:])
                    if e["type"] == "BlockStored" and sim.instance_of[engine].name == "p"]

        (first,) = await prefill_pod_stored(shared + [1, 2, 3])
        assert len(first["block_hashes"]) == 4
        reported, own = await prefill_pod_stored(shared + list(range(4, 20)),
                                                 vllm_xargs={"kv_cache_report_mode": "full"})
        assert reported["block_hashes"] == first["block_hashes"] and reported["parent_block_hash"] is None
        assert own["parent_block_hash"] == first["block_hashes"][-1]
        assert [e["parent_block_hash"] for e in await prefill_pod_stored(shared + list(range(20, 36)))] == \
            [first["block_hashes"][-1]]  # without the mode: its own block alone
