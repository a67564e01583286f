"""An abort scheduled inside an offline run (a decode run planned past it) takes the request off its engine at
that virtual time, as the server's abort does: the run is applied up to then first; nothing is left held."""
from __future__ import annotations

from emulator.cluster import ClusterSpec, build_cluster
from emulator.config import EngineArgs
from emulator.instance import InstanceSpec
from emulator.request import Request
from profiles.deployment import build_deployment


def test_an_abort_scheduled_during_a_decode_run_ends_the_request_then():
    d = build_deployment("meta-llama/Llama-3.1-8B", "H100", EngineArgs(max_model_len=4096))
    sim = build_cluster(ClusterSpec((InstanceSpec("a", d, ("m",)),)))
    requests = [Request(f"r{i}", 200, 400, arrival_time=0.001 * i, prompt_token_ids=list(range(i, i + 200)))
                for i in range(4)]
    sim.schedule(0.5, lambda: sim.abort("r1"))  # mid-decode: ~400 steps of ~7 ms take ~3 s
    sim.run(requests)
    r1 = requests[1]
    assert r1.finish_reason == "abort" and r1.finish_time == 0.5 and 0 < r1.num_output_tokens < 400
    assert all(r.finish_reason == "length" for r in requests if r is not r1)
    (engine,) = sim.engines
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks - 1
