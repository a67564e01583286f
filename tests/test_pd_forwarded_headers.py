"""What the cluster's own P/D proxy passes on of a client's X-data-parallel-rank: nothing, as vLLM's toy proxy
(tests/v1/kv_connector/nixl_integration/toy_proxy_server.py) sends its prefill and decode pods only Authorization
and X-Request-Id: each pod's own balancer places the prefill and the decode, and no value is refused. A mixed
model's requests on the same front door keep the rank check of the pod they go to."""
from __future__ import annotations

from pathlib import Path

import aiohttp
import numpy as np

from emulator.cluster import build_cluster
from emulator.request import Request
from profiles.cluster_file import read_cluster_file
from server.testing import running_server

BASE = "meta-llama/Llama-3.1-8B"
OTHER = "Qwen/Qwen3-32B"
NIXL = "kv-transfer-config: {kv_connector: NixlConnector, kv_role: kv_"


def _spec(tmp_path: Path):
    """BASE on a prefill pod p of 2 data-parallel ranks and a decode pod d of 2; OTHER on a mixed pod m."""
    path = tmp_path / "pd-dp.yaml"
    path.write_text(f"engine: {{max-model-len: 4096}}\ninstances:\n"
                    f"  - {{name: p, model: {BASE}, hardware: H100, data-parallel-size: 2, {NIXL}producer}}}}\n"
                    f"  - {{name: d, model: {BASE}, hardware: H100, data-parallel-size: 2, {NIXL}consumer}}}}\n"
                    f"  - {{name: m, model: {OTHER}, hardware: H100}}\n")
    return read_cluster_file(path)[0]


async def test_the_pd_proxy_forwards_no_data_parallel_rank_to_either_pod(tmp_path):
    async with running_server("--speed", "500", deployment=_spec(tmp_path)) as server, \
            aiohttp.ClientSession() as http:
        sim = server.engine.sim
        placed: list[Request] = []
        sim.add_finish_listener(placed.append, prefills=True)

        async def complete(model: str, rank: str) -> tuple[int, dict]:
            async with http.post(server.url + "/v1/completions", headers={"X-data-parallel-rank": rank},
                                 json={"model": model, "prompt": list(range(10, 300)), "max_tokens": 3}) as r:
                return r.status, await r.json()

        def ranks() -> list[tuple[str, int]]:
            """(pod, rank) of what ran since the last call: the prefill's, then the decode's."""
            out = sorted(placed, key=lambda r: not r.request_id.endswith("@prefill"))
            placed.clear()
            return [(sim.instance_of[r.engine_index].name,
                     r.engine_index - sim.instance_of[r.engine_index].engines[0].index) for r in out]

        sides = []
        for rank in ("0", "0", "0", "7", "-1"):  # vLLM's toy proxy looks at no value of it
            status, body = await complete(BASE, rank)
            assert status == 200 and body["choices"][0]["finish_reason"] == "length"
            sides.append(ranks())
        # each pod's balancer places its side as for a request with no header: idle ranks in turn, not rank 0
        assert sides == [[("p", 0), ("d", 0)], [("p", 1), ("d", 1)]] * 2 + [[("p", 0), ("d", 0)]]

        status, body = await complete(OTHER, "1")  # a mixed pod's front end checks it (a pod of one rank here)
        assert (status, body["error"]["message"]) == (400, "data_parallel_rank 1 is out of range [0, 1).")
        assert (await complete(OTHER, "0"))[0] == 200
        assert (server.engine.num_unfinished, len(sim.active), len(sim.transfers.held)) == (0, 0, 0)


def test_in_the_core_a_pin_through_the_pd_proxy_reaches_neither_pod(tmp_path):
    sim = build_cluster(_spec(tmp_path))
    prefills: list[Request] = []
    sim.add_finish_listener(lambda r: prefills.append(r) if r.request_id.endswith("@prefill") else None,
                            prefills=True)
    r = Request("r", 290, 3, max_tokens=3, prompt_token_ids=np.arange(10, 300), model=BASE)
    sim.submit(r, pinned_engine=1)
    sim.run([])
    p, d = sim.instance("p"), sim.instance("d")
    assert [x.engine_index for x in prefills] == [p.engines[0].index] and r.engine_index == d.engines[0].index
