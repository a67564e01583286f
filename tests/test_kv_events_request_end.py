"""What a KV-event recorder keeps of a request ends with it. vLLM publishes nothing when a request ends (its
blocks are freed but stay cached until evicted; the event stream's parity with vLLM's block pool, finishes
included, is test_kv_events_vllm.py's): the recorder keeps a request's token ids only while its engine holds
it, for every way a request leaves an engine: it finishes, a cluster's own P/D prefill ends on its prefill
pod, its instance fails and a router retries it elsewhere. Virtual time only."""
from __future__ import annotations

import json

import numpy as np

from emulator.cluster import ClusterSpec, build_cluster
from emulator.config import EngineArgs
from emulator.instance import InstanceSpec
from emulator.kv_events import BlockStored
from emulator.request import Request
from profiles.deployment import build_deployment
from server.kv_events import KVEventPublishers, KVEventsConfig

MODEL = "meta-llama/Llama-3.1-8B"


def capture(sim) -> tuple[KVEventPublishers, list[list]]:
    """Publishers on every engine of `sim`, their batches kept in a list per engine (nothing sent)."""
    publishers = KVEventPublishers(KVEventsConfig(enable_kv_cache_events=True, endpoint="inproc://request-end"),
                                   sim, epoch_of=lambda t: t)
    batches: list[list] = [[] for _ in publishers.publishers]
    for publisher, kept in zip(publishers.publishers, batches):
        publisher.close()
        publisher.publish = lambda ts, events, kept=kept: kept.append(events)
    return publishers, batches


def requests(n: int, prompt: int = 600, gap: float = 0.02) -> list[Request]:
    rng = np.random.default_rng(1)
    return [Request(f"r{i}", prompt, 6, arrival_time=i * gap, prompt_token_ids=rng.integers(0, 128_000, prompt),
                    model="m") for i in range(n)]


def test_a_pd_prefill_pod_forgets_each_prefill_it_served():
    specs = []
    for name, role, kv_role in (("p", "prefill", "kv_producer"), ("d", "decode", "kv_consumer")):
        config = json.dumps({"kv_connector": "NixlConnector", "kv_role": kv_role})
        deployment = build_deployment(MODEL, "H100", EngineArgs(max_model_len=4096, kv_transfer_config=config))
        specs.append(InstanceSpec(name, deployment, ("m",), role))
    sim = build_cluster(ClusterSpec(tuple(specs)))
    publishers, batches = capture(sim)
    work = requests(12)
    sim.run(work)
    publishers.close()
    assert all(r.num_output_tokens == 6 for r in work)
    prefill = sim.instance("p").engines[0].index
    assert any(isinstance(e, BlockStored) for batch in batches[prefill] for e in batch)  # it cached the prompts
    assert [recorder.num_requests for recorder in publishers.recorders] == [0, 0]


def test_a_failed_instance_forgets_the_requests_a_router_retried_elsewhere():
    deployment = build_deployment(MODEL, "H100", EngineArgs(max_model_len=4096))
    sim = build_cluster(ClusterSpec((InstanceSpec("a", deployment, ("m",)), InstanceSpec("b", deployment, ("m",))),
                                    "round_robin"))
    publishers, _ = capture(sim)
    work = requests(8, prompt=3000, gap=0.0)
    for request in work:
        sim.submit(request)
    sim.advance(0.001)  # every prompt still prefilling: none has a token yet
    a = sim.instance("a").engines[0].index
    assert publishers.recorders[a].num_requests == 4
    assert sim.fail_instance("a", reroute=True) == []
    assert publishers.recorders[a].num_requests == 0
    assert publishers.recorders[1 - a].num_requests == 8  # all of them on b now
    sim.advance(60.0)
    publishers.close()
    assert all(r.num_output_tokens == 6 for r in work)
    assert [recorder.num_requests for recorder in publishers.recorders] == [0, 0]
