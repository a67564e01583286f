"""gpt-oss P/D pods in separate processes, with vLLM's hybrid KV cache manager (NixlConnector supports it): the
prefill pod's kv_transfer_params name each KV cache group's blocks, the sliding-window group's those of its
window (nixl/pull_scheduler.py request_finished -> get_exchange_clipped_blocks), and the decode pod moves
the full group's blocks and that tail, each group's blocks with its own 18 layers."""
from __future__ import annotations

import random

import aiohttp

from server.testing import running_server
from test_kv_read_notice import CONSUMER, PRODUCER, _held_after, metric_value

GPT_OSS = ("openai/gpt-oss-120b", "--hardware", "H100", "--max-model-len", "8192")


async def test_a_hybrid_prefill_read_by_a_decode_pod_in_another_process():
    prompt = [random.Random(5).randrange(1000, 30000) for _ in range(2000)]
    async with running_server(*GPT_OSS, "--kv-transfer-config", PRODUCER) as prefill, \
            running_server(*GPT_OSS, "--kv-transfer-config", CONSUMER) as decode, aiohttp.ClientSession() as http:
        body = {"prompt": prompt, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}
        async with http.post(prefill.url + "/v1/completions", json=body) as r:
            params = (await r.json())["kv_transfer_params"]
        sliding, full = params["remote_block_ids"]
        # 2,000 tokens: 125 blocks; the sliding group kept those from the window of its 2,000 processed tokens on
        # when it finished (Scheduler._connector_finished), 8; the clip sends the table's last cdiv(128, 16) + 1 = 9
        # as they are, the null block (0) before the 8 included (vLLM's get_exchange_clipped_blocks)
        assert len(full) == 125 and len(sliding) == 9 and 125 - (2000 - 128 + 1) // 16 == 8
        assert sliding[0] == 0 and 0 not in sliding[1:] and 0 not in full
        async with http.post(decode.url + "/v1/completions",
                             json={"prompt": prompt, "max_tokens": 8, "kv_transfer_params": params}) as r:
            answer = await r.json()
        assert answer["usage"]["completion_tokens"] == 8
        assert await _held_after(prefill.engine.sim, 60.0) == 0
        async with http.get(decode.url + "/metrics") as r:
            text = await r.text()
        for server in (prefill, decode):
            engine = server.engine.sim.engines[0]
            assert engine.kv.num_free_blocks == engine.num_gpu_blocks - 1
    # the decode side's blocks: 125 in the full group; in the sliding one those from the window of the 2,000
    # loaded tokens on, 125 - (2000 - 128 + 1) // 16 = 8; 16 tokens of 18 layers' K and V (8 heads of 64, bf16)
    moved = (125 + 8) * 16 * 18 * 2 * 8 * 64 * 2
    assert moved == 78_446_592
    assert metric_value(text, "vllm_emulator:kv_transfer_bytes_total", direction="received") == moved
