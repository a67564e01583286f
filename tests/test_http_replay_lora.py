"""loadgen over HTTP with a multi-LoRA trace: a line that names an adapter (its `lora`, or a `model` the server
lists as an adapter, --model-map included) asks for the adapter by name, as vLLM's clients select one; other
lines keep the base model. Records name the adapter (`lora`) as offline replay's do, summary.json gives each
adapter's statistics, and an adapter the server does not list is vLLM's 404 text for its line. Against a served
emulator; requests one at a time (--max-concurrency 1), so the assertions are on counts, never on wall time."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.testing import server_process
from vllm_emulator.cli import main as cli

BASE = "meta-llama/Llama-3.1-8B"
PROMPT = list(range(1000, 1100))


@pytest.fixture(scope="module")
def server():
    with server_process("--speed", "1000", "--enable-lora", "--max-loras", "2", "--enable-prompt-tokens-details",
                        "--lora-modules", "sql=org/sql-lora", "chat=org/chat-lora") as url:
        yield url


def trace(path: Path, keys: list[dict]) -> Path:
    """One line per entry of `keys` (its `lora`/`model`), 0.1 s apart, each with the same 100-token prompt."""
    path.write_text("".join(json.dumps({"request_id": f"r{i}", "input_toks": len(PROMPT), "output_toks": 3,
                                        "arrival_time_ns": i * 10 ** 8, "input_tok_ids": PROMPT, **key}) + "\n"
                            for i, key in enumerate(keys)))
    return path


def records(folder: Path) -> list[dict]:
    return sorted(map(json.loads, (folder / "requests.jsonl").read_text().splitlines()),
                  key=lambda r: r["request_id"])


def test_lines_naming_an_adapter_ask_for_it_and_run_under_it(tmp_path, server, capsys):
    lines = [{"lora": "sql"}, {"model": "chat"}, {"lora": "sql", "model": BASE}, {}, {"model": "GPT-4"}]
    out = tmp_path / "run"
    code = cli(["loadgen", str(trace(tmp_path / "t.jsonl", lines)), "--base-url", server, "--speedup", "1000",
                "--max-concurrency", "1", "--model-map", "GPT-4=chat", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    got = records(out)
    assert [r["lora"] for r in got] == ["sql", "chat", "sql", None, "chat"]
    assert [r["model"] for r in got] == ["sql", "chat", "sql", BASE, "chat"]
    assert [r["finish_reason"] for r in got] == ["length"] * 5
    # the server ran each under its adapter: the same prompt hits the cache only under the same adapter
    assert [r["cached_tokens"] for r in got] == [0, 0, 96, 0, 96]
    summary = json.loads((out / "summary.json").read_text())
    adapters = summary["lora_adapters"]
    assert list(adapters) == ["sql", "chat"]
    assert (adapters["sql"]["base_model"], adapters["sql"]["path"]) == (BASE, "org/sql-lora")
    assert [adapters[name]["num_finished"] for name in adapters] == [2, 2]
    assert adapters["chat"]["cached_tokens"] == 96 and adapters["sql"]["preemptions"]["total"] is None


def test_a_trace_without_adapters_against_a_server_with_them_names_none(tmp_path, server, capsys):
    out = tmp_path / "run"
    assert cli(["loadgen", str(trace(tmp_path / "t.jsonl", [{}, {"model": "unknown"}])), "--base-url", server,
                "--speedup", "1000", "--max-concurrency", "1", "-o", str(out)]) == 0, capsys.readouterr().err
    assert [(r["model"], r["lora"]) for r in records(out)] == [(BASE, None), (BASE, None)]  # one model: the base
    assert json.loads((out / "summary.json").read_text())["lora_adapters"]["sql"]["num_requests"] == 0


def test_an_adapter_the_server_does_not_list_stops_the_run_before_anything_is_sent(tmp_path, server, capsys):
    path = trace(tmp_path / "t.jsonl", [{"lora": "sql"}, {"lora": "math"}])
    assert cli(["loadgen", str(path), "--base-url", server, "-o", str(tmp_path / "run")]) == 2
    assert "t.jsonl:2: The model `math` does not exist. (vLLM answers 404" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_with_model_every_line_keeps_it_but_a_lines_lora_still_asks_for_its_adapter(tmp_path, server, capsys):
    out = tmp_path / "run"
    path = trace(tmp_path / "t.jsonl", [{"lora": "chat"}, {"model": "sql"}, {"lora": "math"}])
    # --model asks nothing of /v1/models: an adapter it does not serve is the server's own 404, for its line
    assert cli(["loadgen", str(path), "--base-url", server, "--model", BASE, "--speedup", "1000",
                "--max-concurrency", "1", "-o", str(out)]) == 1
    got = records(out)
    assert [(r["model"], r["lora"], r["finish_reason"]) for r in got] == [
        ("chat", "chat", "length"), (BASE, None, "length"), ("math", "math", "error")]
    assert got[2]["error"].startswith("HTTP 404") and "The model `math` does not exist." in got[2]["error"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lora_adapters"]["chat"]["base_model"] is None  # not asked of the server
    assert summary["lora_adapters"]["math"]["num_failed"] == 1
