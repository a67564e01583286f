"""--enable-log-requests for a prompt list whose later prompt the engine refuses at a queue bound: vLLM's
completion route logs every prompt's "Received request" line before its engine is given any (its per-prompt
loop calls _log_inputs and then engine_client.generate, an async generator that adds the request only once
merge_async_iterators runs it; AsyncLLM._add_request's check_admission refuses there), so all of them are
logged, the refused one and those after it too; and the prompts added before the refused one, aborted by the
front end, count on no vllm:request_success_total series (its abort_requests records no finished stats).
Streamed or not, on one server and through a cluster's own P/D proxy. Virtual time only."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import aiohttp
import pytest

from profiles.cluster_file import read_cluster_file
from server.testing import running_server

LOGGER = "vllm.entrypoints.serve.utils.request_logger"
BASE = "meta-llama/Llama-3.1-8B"
PROMPTS = [[11, 12], [13], [14], [15]]  # with --max-num-queued-reqs 2: the third is refused


def _received(caplog) -> list[str]:
    return [r.getMessage().split(":")[0] for r in caplog.records
            if r.name == LOGGER and r.getMessage().startswith("Received request")]


def _pd_cluster(tmp_path: Path):
    nixl = "kv-transfer-config: {kv_connector: NixlConnector, kv_role: kv_"
    path = tmp_path / "pd.yaml"
    path.write_text(f"engine: {{max-model-len: 4096, max-num-queued-reqs: 2}}\ninstances:\n"
                    f"  - {{name: p, model: {BASE}, hardware: H100, {nixl}producer}}}}\n"
                    f"  - {{name: d, model: {BASE}, hardware: H100, {nixl}consumer}}}}\n")
    return read_cluster_file(path)[0]


@pytest.mark.parametrize("pd", [False, True])
@pytest.mark.parametrize("stream", [False, True])
async def test_every_prompt_of_a_refused_prompt_list_is_logged_and_no_abort_is_counted(caplog, tmp_path, stream,
                                                                                         pd):
    caplog.set_level(logging.INFO, LOGGER)
    where = {"deployment": _pd_cluster(tmp_path)} if pd else {}
    args = () if pd else ("--max-model-len", "4096", "--max-num-queued-reqs", "2")
    async with running_server("--speed", "1000", "--enable-log-requests", *args, **where) as server, \
            aiohttp.ClientSession() as http:
        async with http.post(server.url + "/v1/completions", headers={"X-Request-Id": "refused"},
                             json={"prompt": PROMPTS, "max_tokens": 4, "stream": stream}) as r:
            status, text = r.status, await r.text()
        async with http.get(server.url + "/metrics") as r:
            metrics = await r.text()
    assert status == (200 if stream and not pd else 503) and "503" in text
    assert _received(caplog) == [f"Received request cmpl-refused-{p}" for p in range(len(PROMPTS))]
    assert not re.search(r'^vllm:request_success_total\{[^}]*\} [1-9]', metrics, re.M)
