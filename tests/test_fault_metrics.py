"""What a cluster's /metrics shows around an instance fault and its restore, as real vLLM pods scraped by
Prometheus would show it.

A failed pod is a dead vLLM process: its scrape fails, so its vLLM series leave the front door until it
is back, and the requests it held never finish in its metrics (vLLM's front end propagates the engine's
death to them and records nothing: AsyncLLM.output_handler -> OutputProcessor.propagate_error). The pod
that comes back is a new process: its series start from zero, its info series are set again. Other
instances' series and the emulator's cluster series (`vllm_emulator:`) count on across the fault.
All on virtual time."""
from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from emulator.cluster import ClusterSpec, build_cluster
from emulator.config import EngineArgs
from emulator.instance import InstanceSpec
from emulator.request import Request
from profiles.deployment import build_deployment
from server.metrics import EngineMetrics

MODEL = "meta-llama/Llama-3.1-8B"
NAME = "llama"


@pytest.fixture(scope="module")
def h100_8b():
    return build_deployment(MODEL, "H100", EngineArgs(max_model_len=8192))


class Cluster:
    """Instances a (engine 0) and b (engine 1) behind a round-robin front door, with the front door's
    /metrics and each instance's own port's, wired as `serve --cluster` wires them."""

    def __init__(self, deployment) -> None:
        self.sim = build_cluster(ClusterSpec((InstanceSpec("a", deployment, (NAME,)),
                                              InstanceSpec("b", deployment, (NAME,))), "round_robin"))
        self.front = EngineMetrics(NAME, deployment, 2, served=[(NAME, deployment)] * 2)
        self.pods = {i.name: EngineMetrics(NAME, deployment, 1, engines=[i.engines[0].index])
                     for i in self.sim.instances}
        for metrics in (self.front, *self.pods.values()):
            metrics.attach(self.sim)
        self.a, self.b = self.sim.instances

    def submit(self, *requests: Request) -> None:
        for request in requests:
            self.sim.submit(request)

    def until(self, condition, limit: int = 100_000) -> None:
        """Process events one time at a time until `condition()` holds."""
        for _ in range(limit):
            if condition():
                return
            t = self.sim.next_event_time()
            assert t is not None, "the simulation went idle before the condition held"
            self.sim.advance(t)
        raise AssertionError("condition never held")


def scrape(metrics: EngineMetrics) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) -> value, of one /metrics body."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(metrics.render()[0].decode()) for s in family.samples}


def of_engine(samples: dict, engine: str, prefix: str = "vllm:") -> dict[tuple[str, frozenset], float]:
    """The samples of one engine label whose name starts with `prefix`, less the `_created` stamps."""
    return {key: value for key, value in samples.items()
            if key[0].startswith(prefix) and ("engine", engine) in key[1] and not key[0].endswith("_created")}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def total(samples: dict, name: str, **labels: str) -> float:
    """The sum over every sample called `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, got), v in samples.items() if n == name and want <= got)


def fresh_pod_values(samples: dict, engine: str) -> dict[str, float]:
    """What one engine's vLLM series of a vLLM process that has served nothing yet hold, by sample name:
    0, but its info series and the `awake` sleep state, which are 1."""
    out = {}
    for (name, labels), v in of_engine(samples, engine).items():
        labels = dict(labels)
        one = (name == "vllm:cache_config_info"
               or (name == "vllm:engine_sleep_state" and labels["sleep_state"] == "awake"))
        assert v == (1.0 if one else 0.0), (name, labels, v)
        out[name] = v
    return out


# -- a fault: the pod's series leave, its requests are never counted ----------------------------
def test_a_failed_instances_vllm_series_leave_the_front_door_until_it_is_restored(h100_8b):
    c = Cluster(h100_8b)
    c.submit(*(Request(f"r{i}", 200, 400) for i in range(4)))  # round robin: r0, r2 on a; r1, r3 on b
    c.until(lambda: c.sim.now > 0.5)
    before = scrape(c.front)
    assert value(before, "vllm:generation_tokens_total", engine="0", model_name=NAME) > 0
    steps = value(before, "vllm_emulator:engine_steps_total", engine="0", model_name=NAME)

    c.sim.fail_instance("a")
    down = scrape(c.front)
    assert of_engine(down, "0") == {}  # no vLLM series of the dead pod
    # b's series are all there, as they were
    assert {key[0] for key in of_engine(down, "1")} == {key[0] for key in of_engine(before, "1")}
    # the emulator's series of it stay: down, its engine's map and work so far
    assert value(down, "vllm_emulator:instance_up", cluster_instance="a", model_name=NAME, role="mixed") == 0
    assert value(down, "vllm_emulator:engine_info", engine="0", cluster_instance="a", model_name=NAME,
                 hardware="H100") == 1
    assert value(down, "vllm_emulator:engine_steps_total", engine="0", model_name=NAME) == steps

    c.sim.advance(c.sim.now + 1.0)
    assert of_engine(scrape(c.front), "0") == {}  # still down
    c.sim.restore_instance("a")
    up = scrape(c.front)
    assert {key[0] for key in of_engine(up, "0")} == {key[0] for key in of_engine(up, "1")}
    assert value(up, "vllm_emulator:instance_up", cluster_instance="a", model_name=NAME, role="mixed") == 1


def test_requests_lost_with_their_pod_are_not_counted_as_finished_anywhere(h100_8b):
    c = Cluster(h100_8b)
    lost = [Request("r0", 300, 2000), Request("r2", 300, 2000)]
    kept = [Request("r1", 300, 50), Request("r3", 300, 50)]
    c.submit(lost[0], kept[0], lost[1], kept[1])
    c.until(lambda: all(r.num_output_tokens > 0 for r in lost))
    assert c.sim.fail_instance("a") == lost
    assert all(r.finish_reason == "error" for r in lost)  # what their clients get, as before
    c.until(lambda: all(r.is_finished for r in kept))
    c.sim.restore_instance("a")
    for metrics, engine in ((c.front, None), (c.pods["a"], "0"), (c.pods["b"], "0")):
        samples = scrape(metrics)
        by_engine = {} if engine is None else {"engine": engine}
        assert total(samples, "vllm:request_success_total", finished_reason="error", **by_engine) == 0
    front = scrape(c.front)
    # b counted its own two, a (a new process) nothing
    assert total(front, "vllm:request_success_total", engine="1") == 2
    assert total(front, "vllm:e2e_request_latency_seconds_count") == 2
    fresh_pod_values(front, "0")


# -- a restore: a new vLLM process ------------------------------------------------------------
def test_a_restored_instance_starts_its_series_from_zero_on_the_front_door_and_its_port(h100_8b):
    c = Cluster(h100_8b)
    shared_prefix = list(range(1000, 1512))
    c.submit(*(Request(f"r{i}", 600, 20, prompt_token_ids=shared_prefix + list(range(i * 100, i * 100 + 88)))
               for i in range(4)))
    c.until(lambda: not c.sim.active)
    c.pods["a"].observe_http("/v1/completions", "POST", 200, 100, 200, 0.5)
    before, before_a = scrape(c.front), scrape(c.pods["a"])
    for samples, engine in ((before, "0"), (before_a, "0")):
        assert value(samples, "vllm:request_success_total", engine=engine, model_name=NAME,
                     finished_reason="length") == 2
        assert value(samples, "vllm:prefix_cache_hits_total", engine=engine, model_name=NAME) > 0
    assert total(before_a, "http_requests_total") == 1
    routed_a = value(before, "vllm_emulator:routing_decisions_total", cluster_instance="a", model_name=NAME,
                     role="mixed", policy="round_robin")
    b_generated = value(before, "vllm:generation_tokens_total", engine="1", model_name=NAME)

    c.sim.fail_instance("a")
    c.sim.advance(c.sim.now + 5.0)
    c.sim.restore_instance("a")
    after, after_a = scrape(c.front), scrape(c.pods["a"])
    fresh = fresh_pod_values(after, "0")
    assert fresh_pod_values(after_a, "0") == fresh
    assert "vllm:cache_config_info" in fresh and "vllm:request_success_total" in fresh
    assert total(after_a, "http_requests_total") == 0  # its front end restarted too
    # another pod's series and the cluster's go on
    assert value(after, "vllm:generation_tokens_total", engine="1", model_name=NAME) == b_generated
    assert value(after, "vllm_emulator:routing_decisions_total", cluster_instance="a", model_name=NAME,
                 role="mixed", policy="round_robin") == routed_a

    # what it serves next is all it counts: no prefix cache, no earlier lookups, its own tokens
    again = Request("again", 600, 20, prompt_token_ids=shared_prefix + list(range(9000, 9088)))
    c.sim.submit(again, instance=c.a)
    c.until(lambda: again.is_finished)
    for samples in (scrape(c.front), scrape(c.pods["a"])):
        assert value(samples, "vllm:request_success_total", engine="0", model_name=NAME,
                     finished_reason="length") == 1
        assert value(samples, "vllm:generation_tokens_total", engine="0", model_name=NAME) == 20
        assert value(samples, "vllm:prefix_cache_queries_total", engine="0", model_name=NAME) == 600
        assert value(samples, "vllm:prefix_cache_hits_total", engine="0", model_name=NAME) == 0
        assert value(samples, "vllm:prompt_tokens_total", engine="0", model_name=NAME) == 600


def test_a_rerouted_request_counts_on_its_new_instance_as_a_new_request_there(h100_8b):
    c = Cluster(h100_8b)
    moved, stays = Request("moved", 8000, 30), Request("stays", 8000, 30)
    c.submit(moved, stays)  # round robin: moved on a, stays on b
    c.sim.advance(0.01)  # 8,000-token prompts: no token yet
    moved.num_preemptions = 2  # as if preempted on a before its first token
    assert c.sim.fail_instance("a", reroute=True) == []
    retried_at = c.sim.now
    c.until(lambda: moved.is_finished and stays.is_finished)
    front = scrape(c.front)
    assert value(front, "vllm:request_success_total", engine="1", model_name=NAME, finished_reason="length") == 2
    assert value(front, "vllm:prompt_tokens_total", engine="1", model_name=NAME) == 16000
    # its new pod got it at the re-route: its latencies there count from then
    assert value(front, "vllm:time_to_first_token_seconds_sum", engine="1", model_name=NAME) == pytest.approx(
        moved.first_token_time - retried_at + stays.first_token_time - stays.arrival_time)
    # the preemptions it had on a are a's, gone with it
    assert value(front, "vllm:num_preemptions_total", engine="1", model_name=NAME) == 0
    assert value(front, "vllm:request_num_preemptions_sum", engine="1", model_name=NAME) == 0
    assert of_engine(front, "0") == {}


def test_a_pod_asleep_when_it_failed_comes_back_awake(h100_8b):
    c = Cluster(h100_8b)
    c.sim.pause("keep", c.a)  # /sleep on a's own port
    c.pods["a"].set_sleep_level(1)
    c.sim.fail_instance("a")
    c.sim.restore_instance("a")
    assert not c.sim.is_paused(c.a)
    samples = scrape(c.pods["a"])
    assert value(samples, "vllm:engine_sleep_state", engine="0", model_name=NAME, sleep_state="awake") == 1
    assert value(samples, "vllm:engine_sleep_state", engine="0", model_name=NAME,
                 sleep_state="weights_offloaded") == 0
    request = Request("served", 100, 5)
    c.sim.submit(request, instance=c.a)
    c.until(lambda: request.is_finished)
    assert request.finish_reason == "length"
