"""What the vLLM series count, after workloads whose answers we know (vLLM 0.33 semantics)."""
from __future__ import annotations

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from emulator.config import EngineArgs
from emulator.cluster import build_simulation
from profiles.deployment import build_deployment
from emulator.request import Request
from emulator.stats import request_record
from server.metrics import (INTER_TOKEN_LATENCY_BUCKETS, TIME_TO_FIRST_TOKEN_BUCKETS, EngineMetrics,
                            request_tokens_buckets)

MODEL = "meta-llama/Llama-3.1-8B"
NAME = "llama"


class Scrape:
    """One parsed /metrics body: sample values by name and labels."""

    def __init__(self, metrics: EngineMetrics) -> None:
        body, _ = metrics.render()
        self.samples = {}
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def __call__(self, name: str, engine: str | None = "0", **labels: str) -> float:
        labels = {"model_name": NAME, **labels}
        if engine is not None:
            labels["engine"] = engine
        return self.samples[(name, frozenset(labels.items()))]

    def buckets(self, name: str, engine: str = "0") -> dict[float, float]:
        out = {}
        for (sample, labels), value in self.samples.items():
            labels = dict(labels)
            if sample == name + "_bucket" and labels["engine"] == engine:
                out[float(labels["le"])] = value
        return out


def engine_setup(args: EngineArgs | None = None, hardware: str = "RTX4090"):
    deployment = build_deployment(MODEL, hardware, args or EngineArgs(max_model_len=4096))
    simulation = build_simulation(deployment)
    metrics = EngineMetrics(NAME, deployment, deployment.config.data_parallel_size)
    metrics.attach(simulation)
    return deployment, simulation, metrics


def step_to(simulation, condition, limit: int = 100_000) -> None:
    """Process engine events one time at a time until `condition()` holds."""
    for _ in range(limit):
        if condition():
            return
        t = simulation.next_event_time()
        assert t is not None, "the simulation went idle before the condition held"
        simulation.advance(t)
    raise AssertionError("condition never held")


def known_workload() -> list[Request]:
    """Three requests that stop on EOS before max_tokens, three that hit max_tokens."""
    requests = []
    for i in range(6):
        output_len = 5 + 7 * i
        max_tokens = output_len if i % 2 else output_len + 50
        requests.append(Request(f"r{i}", 40 + 113 * i, output_len, max_tokens=max_tokens, arrival_time=0.02 * i))
    return requests


@pytest.fixture(scope="module")
def finished_run():
    _, simulation, metrics = engine_setup()
    steps_with_tokens = []
    simulation.add_listener(lambda record: steps_with_tokens.append(record) if record.got_token else None)
    requests = known_workload()
    simulation.run(requests)
    return requests, steps_with_tokens, Scrape(metrics)


def test_token_counters_and_finish_reasons_after_a_known_workload(finished_run):
    requests, steps, m = finished_run
    prompt = sum(r.num_prompt_tokens for r in requests)
    generated = sum(r.num_output_tokens for r in requests)
    assert generated == sum(r.output_len for r in requests)
    assert m("vllm:prompt_tokens_total") == prompt
    assert m("vllm:prompt_tokens_by_source_total", source="local_compute") == prompt
    assert m("vllm:prompt_tokens_by_source_total", source="local_cache_hit") == 0
    assert m("vllm:prompt_tokens_by_source_total", source="external_kv_transfer") == 0
    assert m("vllm:prompt_tokens_cached_total") == 0
    assert m("vllm:generation_tokens_total") == generated
    assert m("vllm:request_success_total", finished_reason="stop") == 3
    assert m("vllm:request_success_total", finished_reason="length") == 3
    for reason in ("abort", "error", "repetition"):
        assert m("vllm:request_success_total", finished_reason=reason) == 0
    assert m("vllm:prefix_cache_queries_total") == prompt  # each request looked up once, at admission
    assert m("vllm:prefix_cache_hits_total") == 0
    # per-request histograms, one observation per finished request
    assert m("vllm:request_prompt_tokens_count") == 6
    assert m("vllm:request_prompt_tokens_sum") == prompt
    assert m("vllm:request_generation_tokens_sum") == generated
    assert m("vllm:request_prefill_kv_computed_tokens_sum") == prompt
    assert m("vllm:request_params_max_tokens_sum") == sum(r.max_tokens for r in requests)
    assert (m("vllm:request_params_n_count"), m("vllm:request_params_n_sum")) == (6, 6)
    assert m("vllm:request_max_num_generation_tokens_sum") == generated
    assert m("vllm:request_num_preemptions_sum") == 0
    # one iteration per engine step with outputs: computed prompt tokens + generated tokens
    assert m("vllm:iteration_tokens_total_count") == len(steps)
    assert m("vllm:iteration_tokens_total_sum") == prompt + generated
    assert m("vllm_emulator:engine_steps_total") >= len(steps)


def test_latency_histograms_follow_vllms_definitions(finished_run):
    requests, _, m = finished_run
    first = np.array([r.first_token_time for r in requests])
    last = np.array([r.last_token_time for r in requests])
    scheduled = np.array([r.scheduled_time for r in requests])
    queued = np.array([r.queued_time for r in requests])
    arrival = np.array([r.arrival_time for r in requests])
    finish = np.array([r.finish_time for r in requests])
    generated = np.array([r.num_output_tokens for r in requests])
    expected = {
        "vllm:time_to_first_token_seconds": first - arrival,
        "vllm:e2e_request_latency_seconds": finish - arrival,
        "vllm:request_queue_time_seconds": scheduled - queued,
        "vllm:request_prefill_time_seconds": first - scheduled,
        "vllm:request_decode_time_seconds": last - first,
        "vllm:request_inference_time_seconds": last - scheduled,
        "vllm:request_time_per_output_token_seconds": (last - first) / (generated - 1),
    }
    for name, values in expected.items():
        assert m(name + "_count") == len(requests), name
        assert m(name + "_sum") == pytest.approx(values.sum(), rel=1e-9, abs=1e-12), name
    # TPOT agrees with replay's per-request records
    assert m("vllm:request_time_per_output_token_seconds_sum") == pytest.approx(
        sum(request_record(r)["tpot"] for r in requests))
    # ITL: one observation per output after the first; they add up to the decode times
    assert m("vllm:inter_token_latency_seconds_count") == (generated - 1).sum()
    assert m("vllm:inter_token_latency_seconds_sum") == pytest.approx((last - first).sum())
    # bucket counts are cumulative counts of the very values
    ttft = first - arrival
    buckets = m.buckets("vllm:time_to_first_token_seconds")
    for bound in TIME_TO_FIRST_TOKEN_BUCKETS:
        assert buckets[bound] == (ttft <= bound).sum(), bound
    assert buckets[float("inf")] == len(requests)
    assert set(m.buckets("vllm:inter_token_latency_seconds")) == {*INTER_TOKEN_LATENCY_BUCKETS, float("inf")}


def test_inter_token_latency_is_observed_per_output_step():
    _, simulation, metrics = engine_setup()
    request = Request("solo", 300, 12, arrival_time=0.0)
    token_times = []
    simulation.add_listener(lambda rec: token_times.append(rec.end) if request in rec.got_token else None)
    simulation.run([request])
    gaps = np.diff(token_times)
    m = Scrape(metrics)
    buckets = m.buckets("vllm:inter_token_latency_seconds")
    assert m("vllm:inter_token_latency_seconds_count") == 11
    for bound in INTER_TOKEN_LATENCY_BUCKETS:
        assert buckets[bound] == (gaps <= bound).sum()
    assert m("vllm:time_to_first_token_seconds_sum") == pytest.approx(token_times[0] - request.arrival_time)


def test_preemptions_on_a_kv_starved_engine():
    # 40 blocks of 16 tokens: six 100-token prompts are admitted, their decodes outgrow the cache
    _, simulation, metrics = engine_setup(EngineArgs(max_model_len=512, num_gpu_blocks_override=40))
    resumed_hits = []
    simulation.add_listener(lambda rec: resumed_hits.extend(
        n for r, n in rec.cached_tokens.items() if r.num_preemptions > 0))
    requests = [Request(f"p{i}", 100, 200, arrival_time=0.0) for i in range(6)]
    simulation.run(requests)
    m = Scrape(metrics)
    total = sum(r.num_preemptions for r in requests)
    assert total > 0
    assert m("vllm:num_preemptions_total") == total == simulation.engines[0].scheduler.num_preemptions
    assert m("vllm:request_num_preemptions_sum") == total
    assert m("vllm:request_num_preemptions_count") == 6
    assert m("vllm:request_success_total", finished_reason="length") == 6
    assert m("vllm:generation_tokens_total") == 6 * 200
    # resumed requests find their own freed blocks in the cache; vLLM leaves those lookups out
    assert sum(resumed_hits) > 0
    assert m("vllm:prefix_cache_hits_total") == 0
    assert m("vllm:prompt_tokens_total") == 6 * 100  # counted once, at the first token


def test_prefix_cache_hits_on_shared_prefixes():
    _, simulation, metrics = engine_setup()
    rng = np.random.default_rng(7)
    system_prompt = rng.integers(0, 32000, 520)
    requests = []
    for i in range(4):
        ids = np.concatenate([system_prompt, rng.integers(0, 32000, 60 + 10 * i)]).astype(np.int64)
        requests.append(Request(f"s{i}", len(ids), 4, prompt_token_ids=ids, arrival_time=1.0 * i))
    prompts = [r.num_prompt_tokens for r in requests]
    simulation.run(requests)
    m = Scrape(metrics)
    hits = 3 * (520 // 16 * 16)  # the first request computes the prefix; the others reuse its full blocks
    assert [r.num_cached_tokens for r in requests] == [0, 512, 512, 512]
    assert m("vllm:prefix_cache_queries_total") == sum(prompts)
    assert m("vllm:prefix_cache_hits_total") == hits
    assert m("vllm:prompt_tokens_cached_by_source_total", source="device") == hits
    assert m("vllm:prompt_tokens_by_source_total", source="local_cache_hit") == hits
    assert m("vllm:prompt_tokens_by_source_total", source="local_compute") == sum(prompts) - hits
    assert m("vllm:prompt_tokens_cached_total") == hits
    assert m("vllm:prompt_tokens_total") == sum(prompts)
    assert m("vllm:request_prefill_kv_computed_tokens_sum") == sum(prompts) - hits
    assert m("vllm:iteration_tokens_total_sum") == sum(prompts) - hits + 4 * 4


def test_front_end_aborts_are_not_counted_as_finished():
    _, simulation, metrics = engine_setup()
    streaming = Request("streaming", 200, 100, arrival_time=0.0)
    finishing = Request("finishing", 150, 20, arrival_time=0.0)
    simulation.submit(streaming)
    simulation.submit(finishing)
    step_to(simulation, lambda: streaming.num_output_tokens >= 5)
    queued = Request("queued", 100, 10, arrival_time=simulation.now)
    simulation.submit(queued)
    assert simulation.abort("queued")  # before it ever ran
    tokens_before_abort = streaming.num_output_tokens
    assert simulation.abort("streaming")  # a client that disconnects mid-stream
    simulation.run([])
    m = Scrape(metrics)
    assert m("vllm:request_success_total", finished_reason="abort") == 0
    assert m("vllm:request_success_total", finished_reason="length") == 1
    assert m("vllm:e2e_request_latency_seconds_count") == 1
    assert m("vllm:request_params_n_count") == 1
    # what the aborted stream produced before the abort was counted as it happened
    assert m("vllm:generation_tokens_total") == tokens_before_abort + 20
    assert m("vllm:prompt_tokens_total") == 200 + 150
    assert m("vllm:time_to_first_token_seconds_count") == 2
    assert m("vllm:num_requests_running") == 0
    assert m("vllm:num_requests_waiting") == 0
    assert m("vllm:kv_cache_usage_perc") == 0


def test_gauges_read_the_engine_as_of_its_latest_step():
    _, simulation, metrics = engine_setup()
    for i in range(300):  # more than max_num_seqs (256): some must wait
        simulation.submit(Request(f"g{i}", 64, 50, arrival_time=0.0))
    instance = simulation.engines[0]
    step_to(simulation, lambda: instance.num_running == 256)
    m = Scrape(metrics)
    assert m("vllm:num_requests_running") == instance.num_running == 256
    assert m("vllm:num_requests_waiting") == instance.num_waiting == 44
    assert m("vllm:num_requests_waiting_by_reason", reason="capacity") == 44
    assert m("vllm:num_requests_waiting_by_reason", reason="deferred") == 0
    assert m("vllm:kv_cache_usage_perc") == pytest.approx(instance.kv.usage) and instance.kv.usage > 0
    simulation.run([])
    m = Scrape(metrics)
    assert (m("vllm:num_requests_running"), m("vllm:num_requests_waiting")) == (0, 0)
    assert m("vllm:kv_cache_usage_perc") == 0  # finished requests' blocks stay cached, but are free
    assert m("vllm:request_success_total", finished_reason="length") == 300


def test_n_is_observed_once_per_parent_request():
    _, simulation, metrics = engine_setup()
    children = [Request(f"p-{i}", 80, out, arrival_time=0.0) for i, out in enumerate((5, 9, 7))]
    alone = Request("alone", 80, 3, arrival_time=0.0)
    metrics.add_parent_request(children)
    abandoned = [Request(f"q-{i}", 80, 50, arrival_time=0.0) for i in range(2)]
    metrics.add_parent_request(abandoned)
    for r in [*children, alone, *abandoned]:
        simulation.submit(r)
    step_to(simulation, lambda: abandoned[0].num_output_tokens > 2)
    for r in abandoned:  # the client went away: vLLM aborts all n together
        simulation.abort(r.request_id)
    simulation.run([])
    m = Scrape(metrics)
    assert (m("vllm:request_params_n_count"), m("vllm:request_params_n_sum")) == (2, 3 + 1)
    assert m("vllm:request_max_num_generation_tokens_sum") == 9 + 3
    assert m("vllm:request_params_max_tokens_count") == 4  # every finished child
    assert m("vllm:request_success_total", finished_reason="length") == 4


def test_two_engines_label_their_own_series():
    deployment, simulation, metrics = engine_setup(EngineArgs(max_model_len=4096, data_parallel_size=2))
    requests = [Request(f"d{i}", 100 + i, 10 + i, arrival_time=0.0) for i in range(8)]
    simulation.run(requests)
    m = Scrape(metrics)
    for engine in ("0", "1"):
        mine = [r for r in requests if r.engine_index == int(engine)]
        assert mine, "the load balancer used both engines"
        assert m("vllm:generation_tokens_total", engine) == sum(r.num_output_tokens for r in mine)
        assert m("vllm:prompt_tokens_total", engine) == sum(r.num_prompt_tokens for r in mine)
        assert m("vllm:request_success_total", engine, finished_reason="length") == len(mine)
        assert m("vllm:engine_sleep_state", engine, sleep_state="awake") == 1
    info = [dict(labels) for (name, labels) in m.samples if name == "vllm:cache_config_info"]
    assert sorted(i["engine"] for i in info) == ["0", "1"]
    # the API server sums its engines' blocks (core_client._apply_ready_response)
    assert {i["num_gpu_blocks"] for i in info} == {str(2 * deployment.num_gpu_blocks)}
    assert m("vllm:admission_rejections_total", None, reason="max_num_queued_reqs") == 0


def test_admission_rejections_by_reason():
    _, _, metrics = engine_setup()
    metrics.observe_admission_rejection("max_num_queued_reqs")
    metrics.observe_admission_rejection("max_num_queued_reqs")
    metrics.observe_admission_rejection("max_num_queued_tokens")
    m = Scrape(metrics)
    assert m("vllm:admission_rejections_total", None, reason="max_num_queued_reqs") == 2
    assert m("vllm:admission_rejections_total", None, reason="max_num_queued_tokens") == 1
    with pytest.raises(ValueError, match="unknown admission rejection reason"):
        metrics.observe_admission_rejection("queue_full")


def test_clock_and_sleep_state():
    _, _, metrics = engine_setup()
    metrics.set_clock(123.5, 60.0)
    metrics.set_sleep_level(1)
    m = Scrape(metrics)
    assert m("vllm_emulator:simulated_time_seconds", None) == 123.5
    assert m("vllm_emulator:speed", None) == 60.0
    assert [m("vllm:engine_sleep_state", sleep_state=s) for s in ("awake", "weights_offloaded", "discard_all")] \
        == [0, 1, 0]
    metrics.set_sleep_level(0)
    assert Scrape(metrics)("vllm:engine_sleep_state", sleep_state="awake") == 1
    with pytest.raises(ValueError):
        metrics.set_sleep_level(3)


def test_http_series_like_the_instrumentator():
    _, _, metrics = engine_setup()
    metrics.observe_http("/v1/completions", "POST", 200, 100, 900, 0.2)
    metrics.observe_http("/v1/completions", "POST", 400, 10, 50, 0.01)
    metrics.observe_http("/health", "GET", 200, 0, 0, 0.001)  # excluded, as in vLLM
    metrics.observe_http(None, "GET", 404, 0, 30, 0.001)  # no route matched
    m = Scrape(metrics)
    count = m.samples.get
    assert count(("http_requests_total", frozenset({"method": "POST", "status": "2xx",
                                                    "handler": "/v1/completions"}.items()))) == 1
    assert count(("http_requests_total", frozenset({"method": "POST", "status": "4xx",
                                                    "handler": "/v1/completions"}.items()))) == 1
    assert count(("http_requests_total", frozenset({"method": "GET", "status": "4xx",
                                                    "handler": "none"}.items()))) == 1
    assert not any(dict(labels).get("handler") == "/health" for _, labels in m.samples)
    assert count(("http_request_size_bytes_sum", frozenset({"handler": "/v1/completions"}.items()))) == 110
    assert count(("http_request_duration_highr_seconds_count", frozenset())) == 3


def test_request_token_buckets_are_vllms_1_2_5_series_capped_by_max_model_len():
    assert request_tokens_buckets(4096) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]
    assert request_tokens_buckets(131072)[-1] == 100_000
    assert request_tokens_buckets(2000)[-1] == 2000
    assert request_tokens_buckets(1) == [1]


def test_attach_checks_the_simulation():
    deployment, simulation, metrics = engine_setup()
    with pytest.raises(RuntimeError, match="already attached"):
        metrics.attach(simulation)
    two = EngineMetrics(NAME, deployment, num_engines=2)
    with pytest.raises(ValueError, match="1 engines"):
        two.attach(simulation)
    with pytest.raises(ValueError):
        EngineMetrics(NAME, deployment, num_engines=0)


def test_observing_a_steps_values_at_once_equals_observing_them_one_by_one():
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from server.metrics import INTER_TOKEN_LATENCY_BUCKETS, observe_all
    values = [0.0, 0.01, 0.0100001, 0.3, 0.05, 80.0, 81.0, 1e-9, 0.075, 0.075]  # bounds, between, beyond
    one_by_one, at_once = CollectorRegistry(), CollectorRegistry()
    a = Histogram("h", "doc", buckets=INTER_TOKEN_LATENCY_BUCKETS, registry=one_by_one)
    b = Histogram("h", "doc", buckets=INTER_TOKEN_LATENCY_BUCKETS, registry=at_once)
    for v in values:
        a.observe(v)
    observe_all(b, values)
    observe_all(b, [])
    strip = lambda text: [line for line in text.decode().splitlines() if "_created" not in line]  # noqa: E731
    assert strip(generate_latest(one_by_one)) == strip(generate_latest(at_once))
