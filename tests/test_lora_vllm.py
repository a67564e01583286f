"""LoRA against vLLM 0.33's own code (the CPU venv, run as a subprocess; skipped without it): block hashes
equal to vLLM's request block hasher for LoRA requests; the KV event stream of the scheduler-diff LoRA
workloads equal to vLLM's block pool's, byte for byte (lora_id, lora_name, extra keys); the adapter
registry answering loads, unloads and /v1/models as vLLM's OpenAIServingModels; vllm:lora_requests_info's
label sets as vLLM's LoRARequestStates and PrometheusStatLogger make them. The scheduler's max_loras rule is
checked step by step in test_vllm_scheduler_parity.py (the lora_* workloads of bench/scheduler_diff.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from emulator.lora import LoRAAdapter
from emulator.request import Request
from server.errors import APIError
from server.lora import LoRAAdapters
from server.metrics import LoRARequestStates
from vllm_venv import kv_events_diff, run_vllm_side, vllm_python_or_skip

REPO = Path(__file__).resolve().parents[1]
VLLM_SIDE = Path(__file__).resolve().parent / "lora_vllm_side.py"

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def vllm_python() -> str:
    return vllm_python_or_skip()


def vllm_side(python: str, job: dict) -> dict:
    return run_vllm_side(python, VLLM_SIDE, job)


def test_block_hashes_of_lora_requests_equal_vllms(vllm_python):
    rng = np.random.default_rng(9)
    cases = []
    for algo in ("sha256", "sha256_cbor"):
        for block_size in (1, 16):
            prompt = rng.integers(0, 128_000, int(rng.integers(40, 200))).tolist()
            for lora in (None, ["sql", 1, "/adapters/sql"], ["sql", 1, "/adapters/sql-v2"], ["chat", 7, "org/chat"]):
                for salt in (None, "tenant"):
                    cases.append({"algo": algo, "block_size": block_size, "prompt": prompt, "lora": lora,
                                  "cache_salt": salt})
    answers = vllm_side(vllm_python, {"job": "hashes", "cases": cases})["answers"]
    for case, answer in zip(cases, answers):
        assert answer["vllm"] and answer["ours"] == answer["vllm"], (case["algo"], case["lora"], case["cache_salt"])
    firsts = {answer["vllm"][0] for answer in answers[:8]}
    assert len(firsts) == 8  # every adapter (path included) and salt keys its own cache


def test_kv_event_stream_of_lora_workloads_equals_vllms_block_pool(vllm_python):
    results = kv_events_diff(vllm_python, ["lora_prefix_sharing", "lora_kv_pressure_priority",
                                           "lora_prefix_pressure_aborts"])
    assert sum(r["stored"] for r in results) > 1000 and sum(r["removed"] for r in results) > 1000


OPS = [["models"], ["load", "sql", "org/sql", False, None], ["load", "sql", "org/sql", False, None],
       ["load", "sql", "org/sql-v2", True, None], ["load", "m", "org/x", False, None],
       ["load", "", "org/x", False, None], ["load", "chat", "org/chat", False, "m"],
       ["load", "math", "org/math", False, "not-served"], ["models"], ["unload", "chat"], ["unload", "chat"],
       ["unload", ""], ["load", "chat", "org/chat", False, None], ["models"]]


def test_loads_unloads_and_model_cards_answer_as_vllms_serving_models(vllm_python):
    theirs = vllm_side(vllm_python, {"job": "models", "base": ["m", "alias"], "ops": OPS})
    adapters = LoRAAdapters(16, ["m", "alias"])
    base_cards = [{"id": name, "object": "model", "owned_by": "vllm", "root": "/models/base", "parent": None,
                   "max_model_len": 4096} for name in ("m", "alias")]  # the base cards are app.py's
    ours = []
    for op, *args in OPS:
        try:
            if op == "load":
                name, path, inplace, base = args
                ours.append(adapters.load(name, path, inplace, base))
            elif op == "unload":
                ours.append(adapters.unload(args[0]))
            else:
                ours.append(base_cards + [{k: v for k, v in card.items() if k not in ("created", "permission")}
                                          for card in adapters.cards(0)])
        except APIError as exc:
            ours.append(exc.body())
    for op, mine, vllm in zip(OPS, ours, theirs["answers"]):
        assert mine == vllm, op
    assert {name: a.lora_id for name, a in adapters.adapters.items()} == theirs["ids"]


STEPS = [  # (op, request, adapter) as vLLM's output processor applies the engine's events and endings
    [["waiting", "a", "sql"], ["running", "a", "sql"]],
    [["waiting", "b", "chat"], ["running", "b", "chat"], ["waiting", "c", "sql"], ["running", "c", "sql"]],
    [["waiting", "a", "sql"]],  # a preempted request's stale output
    [],
    [["finished", "a", "sql"], ["finished", "c", "sql"]],
    [["waiting", "d", "sql"], ["running", "d", "sql"]],
    [["finished", "b", "chat"], ["finished", "d", "sql"]],
    [],
]


def test_lora_requests_info_label_sets_are_vllms(vllm_python):
    from prometheus_client import CollectorRegistry
    theirs = vllm_side(vllm_python, {"job": "gauge", "max_loras": 2, "steps": STEPS})["answers"]
    states = LoRARequestStates(CollectorRegistry(), 2)
    requests: dict[str, Request] = {}
    ours = []
    for number, step in enumerate(STEPS, 1):
        for op, rid, adapter in step:
            request = requests.setdefault(rid, Request(rid, 1, 1, lora=LoRAAdapter(adapter, 1, adapter)))
            states.update(request, waiting=op == "waiting", running=op == "running")
        states.record(number)
        latest_first = sorted(states.set_at.items(), key=lambda item: -item[1])
        ours.append([dict(zip(("max_lora", "waiting_lora_adapters", "running_lora_adapters"), labels))
                     for labels, _ in latest_first])
    assert ours == theirs
