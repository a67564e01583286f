"""loadgen's /metrics samples across counter resets, as Prometheus's rate()/increase() read them: a series
that drops (or whose `_created` changes) restarted from 0 and grew by its new value; a series missing while
its pod is down grows by nothing and picks up where it is back; one first seen after the first scrape counts
from 0. Driven with synthetic exposition text; the run's summary, timeseries and server-TTFT check read the
samples. No server, no wall clock."""
from __future__ import annotations

import argparse

import pytest

from loadgen.http_replay import keeping_up, timeseries, write_run
from loadgen.scrape import MetricsSampler, parse_metrics

TTFT = "vllm:time_to_first_token_seconds"
PREEMPTED = "vllm:num_preemptions_total"
QUERIES, HITS = "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"


def exposition(pods: dict[str, dict], created: bool = True) -> str:
    """A cluster front door's text in prometheus_client's format: per pod (`engine` label) its counters
    (`preempted`, `queries`, `hits`), its TTFT histogram (`ttft`: a list of observations, `le` buckets
    0.1 and +Inf), `running` and, with `created`, each series' `_created` (`born`)."""
    lines = ["# HELP vllm:num_requests_running Number of requests in model execution batches.",
             "# TYPE vllm:num_requests_running gauge"]
    lines += [f'vllm:num_requests_running{{engine="{e}",model_name="m"}} {p.get("running", 0)}'
              for e, p in pods.items()]
    for name, key in ((PREEMPTED, "preempted"), (QUERIES, "queries"), (HITS, "hits")):
        lines.append(f"# TYPE {name} counter")
        for e, p in pods.items():
            lines.append(f'{name}{{engine="{e}",model_name="m"}} {float(p.get(key, 0))}')
        lines.append(f"# TYPE {name.removesuffix('_total')}_created gauge")
        if created:
            lines += [f'{name.removesuffix("_total")}_created{{engine="{e}",model_name="m"}} {p.get("born", 1e9)}'
                      for e, p in pods.items()]
    lines.append(f"# TYPE {TTFT} histogram")
    for e, p in pods.items():
        seen = p.get("ttft", [])
        labels = f'engine="{e}",model_name="m"'
        lines += [f'{TTFT}_bucket{{{labels},le="0.1"}} {float(sum(x <= 0.1 for x in seen))}',
                  f'{TTFT}_bucket{{{labels},le="+Inf"}} {float(len(seen))}',
                  f"{TTFT}_count{{{labels}}} {float(len(seen))}", f"{TTFT}_sum{{{labels}}} {float(sum(seen))}"]
        if created:
            lines.append(f"{TTFT}_created{{{labels}}} {p.get('born', 1e9)}")
    return "\n".join(lines) + "\n"


def test_one_exposition_is_summed_over_its_label_sets_as_before():
    values = parse_metrics(exposition({"0": {"preempted": 3, "running": 2, "ttft": [0.05, 0.3]},
                                       "1": {"preempted": 4, "running": 1, "ttft": [0.2]}}))
    assert values[PREEMPTED] == 7 and values["vllm:num_requests_running"] == 3
    assert values[TTFT + "_count"] == 3 and values[TTFT + "_sum"] == pytest.approx(0.55)


def test_a_pod_that_restarts_counts_its_new_value_not_a_negative_growth():
    sampler = MetricsSampler()
    first = sampler.sample(exposition({"0": {"preempted": 10, "ttft": [0.1] * 5}, "1": {"preempted": 6}}))
    grown = sampler.sample(exposition({"0": {"preempted": 12, "ttft": [0.1] * 7}, "1": {"preempted": 8}}))
    # pod 0 restarted (a new process, its series from 0) and has counted 3 since; pod 1 counted on
    restarted = sampler.sample(exposition({"0": {"preempted": 3, "ttft": [0.2] * 2, "born": 2e9},
                                           "1": {"preempted": 9}}))
    assert [s[PREEMPTED] for s in (first, grown, restarted)] == [16, 20, 24]  # 20 + 3 (pod 0) + 1 (pod 1)
    assert [s[TTFT + "_count"] for s in (first, grown, restarted)] == [5, 7, 9]
    assert restarted[TTFT + "_sum"] == pytest.approx(0.7 + 0.4)
    later = sampler.sample(exposition({"0": {"preempted": 5, "ttft": [0.2] * 3, "born": 2e9},
                                       "1": {"preempted": 9}}))
    assert later[PREEMPTED] == 26 and later[TTFT + "_count"] == 10  # counts on from the restarted value


def test_a_restart_that_overtook_its_old_value_is_told_by_its_created_timestamp():
    sampler = MetricsSampler()
    sampler.sample(exposition({"0": {"preempted": 2, "ttft": [0.1]}}))
    # back up and past its old count before the next scrape: only _created shows it is a new process
    after = sampler.sample(exposition({"0": {"preempted": 5, "ttft": [0.1] * 4, "born": 3e9}}))
    assert after[PREEMPTED] == 2 + 5 and after[TTFT + "_count"] == 1 + 4
    # without _created (a server that disables it) Prometheus's rule is all there is: a rise is growth
    plain = MetricsSampler()
    plain.sample(exposition({"0": {"preempted": 2}}, created=False))
    assert plain.sample(exposition({"0": {"preempted": 5}}, created=False))[PREEMPTED] == 5


def test_a_histograms_buckets_reset_with_it():
    sampler = MetricsSampler(series=(TTFT + "_bucket",))
    assert sampler.sample(exposition({"0": {"ttft": [0.05, 0.5, 0.05]}}))[TTFT + "_bucket"] == 2 + 3
    # restarted: one fast request since (bucket 0.1: 1, +Inf: 1), both below the old values
    assert sampler.sample(exposition({"0": {"ttft": [0.05], "born": 2e9}}))[TTFT + "_bucket"] == 5 + 2
    # each bucket is a series of its own, paired with its histogram's _created (the labels less `le`)
    assert sampler.sample(exposition({"0": {"ttft": [0.05, 0.5], "born": 2e9}}))[TTFT + "_bucket"] == 7 + 1


def test_series_missing_while_a_pod_is_down_grow_by_nothing_and_pick_up_when_back():
    sampler = MetricsSampler()
    up = sampler.sample(exposition({"0": {"preempted": 4, "running": 3}, "1": {"preempted": 1, "running": 2}}))
    down = sampler.sample(exposition({"1": {"preempted": 2, "running": 1}}))  # pod 0 is down: no series
    gone = sampler.sample("# TYPE vllm:num_requests_running gauge\n")  # every pod down
    back = sampler.sample(exposition({"0": {"preempted": 1, "born": 2e9}, "1": {"preempted": 2, "running": 4}}))
    assert [s[PREEMPTED] for s in (up, down, gone, back)] == [5, 6, 6, 7]
    assert [s.get("vllm:num_requests_running") for s in (up, down, gone, back)] == [5, 1, None, 4]


def test_a_series_first_seen_after_the_first_scrape_counts_from_zero():
    sampler = MetricsSampler()
    first = sampler.sample(exposition({"0": {"preempted": 7}}))
    joined = sampler.sample(exposition({"0": {"preempted": 7}, "1": {"preempted": 3, "ttft": [0.2, 0.2]}}))
    assert first[PREEMPTED] == 7 and joined[PREEMPTED] == 10
    assert first[TTFT + "_count"] == 0 and joined[TTFT + "_count"] == 2


def test_gauges_and_a_type_that_may_go_down_are_not_read_as_counters():
    text = ("# TYPE vllm_emulator:power_watts gauge\nvllm_emulator:power_watts 700\n"
            "# TYPE vllm_emulator:queued_total gauge\nvllm_emulator:queued_total 9\n"
            "vllm_emulator:energy_joules_total 100\n")  # no TYPE line: named as a counter, read as one
    sampler = MetricsSampler()
    sampler.sample(text)
    after = sampler.sample(text.replace(" 700", " 300").replace(" 9\n", " 4\n").replace(" 100", " 40"))
    assert after == {"vllm_emulator:power_watts": 300, "vllm_emulator:queued_total": 4,
                     "vllm_emulator:energy_joules_total": 140}


def test_openmetrics_names_a_counter_family_without_its_total():
    text = "# TYPE vllm:num_preemptions counter\nvllm:num_preemptions_total{engine=\"0\"} 8 1700000000\n"
    sampler = MetricsSampler()
    sampler.sample(text)
    assert sampler.sample(text.replace(" 8 ", " 2 "))[PREEMPTED] == 10  # a timestamp after the value is no value


def test_float_noise_in_a_recomputed_total_is_no_restart():
    sampler = MetricsSampler()
    sampler.sample("vllm_emulator:energy_joules_total 12345.678900000001\n")
    assert sampler.sample("vllm_emulator:energy_joules_total 12345.6789\n")[
        "vllm_emulator:energy_joules_total"] == pytest.approx(12345.6789)


# -- what the run folder reads from the samples ------------------------------------------------------------
def _samples(scrapes: list[tuple[float, str]]) -> list:
    sampler = MetricsSampler()
    return [(t, sampler.sample(text)) for t, text in scrapes]


RESTART = [  # trace seconds, exposition: pod 0 restarts between the second and the third scrape
    (0.0, exposition({"0": {"preempted": 50, "queries": 1000, "hits": 500, "ttft": [1.0] * 40},
                      "1": {"queries": 100, "hits": 10}})),
    (1.5, exposition({"0": {"preempted": 52, "queries": 1100, "hits": 550, "ttft": [1.0] * 40 + [0.1, 0.1]},
                      "1": {"queries": 200, "hits": 60}})),
    (2.5, exposition({"0": {"preempted": 1, "queries": 40, "hits": 30, "ttft": [0.2], "born": 2e9},
                      "1": {"queries": 260, "hits": 90}})),
]


def test_ticks_count_the_growth_across_a_restart_and_not_what_came_before_the_run():
    rows = timeseries([], _samples(RESTART), 1.0, 3.0)
    assert [r["preemptions"] for r in rows] == [0, 2, 1]  # the 50 before the run are no tick's
    # tick 2: 100 + 100 queries, 50 + 50 hits; tick 3: 40 (restarted pod) + 60 queries, 30 + 30 hits
    assert [r["prefix_hit_pct"] for r in rows] == ["", 50.0, 60.0]


def test_the_summary_and_the_server_ttft_count_the_run_across_a_restart(tmp_path):
    samples = _samples(RESTART)
    record = {"request_id": "r", "model": "m", "arrival_time": 0.0, "queued_time": 0.0, "scheduled_time": None,
              "first_token_time": 0.2, "finish_time": 2.5, "input_tokens": 10, "output_tokens": 4,
              "cached_tokens": None, "external_tokens": None, "num_preemptions": None, "ttft": 0.2, "tpot": 0.1,
              "e2e": 2.5, "finish_reason": "length", "engine": None, "itl": [0.1, 0.1, 2.1], "trace_arrival": 0.0,
              "send_lag": 0.0, "trace_line": 1, "error": None}
    args = argparse.Namespace(speedup=1.0, base_url="http://x", endpoint="completions", trace=None)
    summary = write_run(tmp_path, [record], samples, args, "m", 2.5, {}, {}, 1)
    assert summary["preemptions"]["total"] == 3
    assert summary["prefix_cache_hit_rate"] == pytest.approx((50 + 50 + 30 + 30) / (200 + 100))
    assert summary["server_ttft_mean"] == pytest.approx((0.1 + 0.1 + 0.2) / 3)
    assert keeping_up([record], summary["ttft"], samples, 1.0)["server_ttft_mean"] == pytest.approx(0.4 / 3)
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    column = rows[0].split(",").index("num_preemptions_total")
    assert [float(r.split(",")[column]) for r in rows[1:]] == [50, 52, 53]  # never down


# -- the emulator's own front door across a fault and its restore -------------------------------------------
def test_the_emulators_front_door_read_across_an_instance_fault_and_restore():
    """The exposition `serve --cluster` renders while instance a dies and a new process takes its place:
    the samples' generation tokens never go down, and grow by b's growth plus all a's new process counted."""
    from prometheus_client.parser import text_string_to_metric_families

    from emulator.cluster import ClusterSpec, build_cluster
    from emulator.config import EngineArgs
    from emulator.instance import InstanceSpec
    from emulator.request import Request
    from profiles.deployment import build_deployment
    from server.metrics import EngineMetrics

    deployment = build_deployment("meta-llama/Llama-3.1-8B", "H100", EngineArgs(max_model_len=8192))
    sim = build_cluster(ClusterSpec((InstanceSpec("a", deployment, ("m",)), InstanceSpec("b", deployment, ("m",))),
                                    "round_robin"))
    front = EngineMetrics("m", deployment, 2, served=[("m", deployment)] * 2)
    front.attach(sim)

    def run_until_idle() -> None:
        while (t := sim.next_event_time()) is not None:
            sim.advance(t)

    def generated(text: str) -> dict[str, float]:  # per engine label
        return {s.labels["engine"]: s.value for family in text_string_to_metric_families(text)
                for s in family.samples if s.name == "vllm:generation_tokens_total"}

    sampler = MetricsSampler()
    texts = []

    def scrape() -> float:
        texts.append(front.render()[0].decode())
        return sampler.sample(texts[-1])["vllm:generation_tokens_total"]

    for i in range(4):  # round robin: r0, r2 on a; r1, r3 on b
        sim.submit(Request(f"r{i}", 200, 300))
    run_until_idle()
    totals = [scrape()]
    sim.fail_instance("a")
    totals.append(scrape())
    sim.advance(sim.now + 1.0)
    sim.restore_instance("a")
    for i in range(4, 8):
        sim.submit(Request(f"r{i}", 100, 20))
    run_until_idle()
    totals.append(scrape())
    before, down, after = map(generated, texts)
    assert "0" not in down and after["0"] < before["0"]  # a's new process counted from 0, fewer than its old
    assert totals == sorted(totals)
    assert totals[-1] - totals[0] == after["1"] - before["1"] + after["0"] == 4 * 20  # the four new requests
