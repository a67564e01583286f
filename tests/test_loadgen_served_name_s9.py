"""loadgen against a server started with --served-model-name: the prompts are sized with the tokenizer of the
model behind the name (the `root` vLLM's /v1/models gives it), not one guessed from the name; and
summary.json's num_rejected counts the requests that got an error, not every record (loadgen writes
"error": null into each one that got none)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadgen.http_replay import served_model_type
from loadgen.trace_models import ModelResolver
from server.testing import server_process
from vllm_emulator.cli import main as cli


@pytest.fixture(scope="module")
def server():
    with server_process("Qwen/Qwen3-30B-A3B", "--served-model-name", "qwen", "--speed", "50",
                        "--max-model-len", "256") as url:
        yield url


def run(tmp_path: Path, url: str, *flags: str, input_len: int = 64) -> tuple[list[dict], dict]:
    out = tmp_path / "run"
    cli(["loadgen", "--base-url", url, "--input-len", str(input_len), "--output-len", "8", "--num-requests", "3",
         "--request-rate", "5", "--speedup", "50", "-o", str(out), *flags])
    records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    return records, json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_prompts_are_sized_with_the_served_models_tokenizer(tmp_path, server, endpoint):
    records, summary = run(tmp_path, server, "--endpoint", endpoint)
    # the server counts the prompt with Qwen3's tokenizer: loadgen built it with the same one
    assert [r["input_tokens"] for r in records] == [64, 64, 64]
    assert summary["model"] == "qwen" and summary["num_finished"] == 3
    assert summary["num_failed"] == 0 and summary["num_rejected"] == 0


def test_a_model_named_by_its_served_name_is_sized_with_its_roots_tokenizer(tmp_path, server):
    records, _ = run(tmp_path, server, "--model", "qwen", "--endpoint", "chat")
    assert [r["input_tokens"] for r in records] == [64, 64, 64]


def test_refused_requests_are_counted_as_rejected(tmp_path, server):
    records, summary = run(tmp_path, server, "--endpoint", "completions", input_len=300)  # over --max-model-len
    assert all(r["error"] and r["error"].startswith("HTTP 400") for r in records)
    assert summary["num_failed"] == summary["num_rejected"] == 3 and summary["num_finished"] == 0


def test_the_model_type_comes_from_the_root_else_the_name():
    served = ModelResolver({"qwen": "Qwen/Qwen3-30B-A3B", "llama": "/nowhere/a-local-path",
                            "meta-llama/Llama-3.1-8B": "/nowhere/else", "mystery": "mystery"}, "qwen")
    assert served_model_type("qwen", served) == "qwen3_moe"
    assert served_model_type("meta-llama/Llama-3.1-8B", served) == "llama"  # a root unknown here: the name's
    assert served_model_type("llama", served) is None  # neither known: the default tokenizer
    assert served_model_type("mystery", served) is None
    assert served_model_type("Qwen/Qwen3-32B", None) == "qwen3"  # a server with no model list: the name's
