"""Multi-LoRA traces: a trace line names its adapter (a JSONL `lora` key, or a `model` that is an adapter's
name), and replay runs it under that adapter: vLLM's max_loras keeps adapters apart in a batch, and their
prefix caches apart. Records and the summary name the adapter. Virtual time only."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from emulator.config import EngineArgs
from emulator.lora import LoRAModulePath, parse_lora_modules
from loadgen.replay import ReplayError, replay
from loadgen.traces import TraceError, read_trace
from profiles.cluster_file import read_cluster_file
from profiles.deployment import build_deployment

BASE = "meta-llama/Llama-3.1-8B"
ADAPTERS = tuple(parse_lora_modules(["sql=/adapters/sql", "chat=/adapters/chat"]))


def _deployment(max_loras: int = 1, enable_lora: bool = True):
    return build_deployment(BASE, "H100", EngineArgs(enable_lora=enable_lora, max_loras=max_loras,
                                                      max_model_len=4096), "cold")


def _trace(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _interleaved(key: str | None, n: int = 8, prompt: int = 300, output: int = 40) -> list[dict]:
    """n requests at t=0, alternating sql and chat (under `key`; None: no adapter)."""
    lines = []
    for i in range(n):
        line = {"request_id": f"r{i}", "input_toks": prompt, "output_toks": output, "arrival_time_ns": 0}
        if key is not None:
            line[key] = ("sql", "chat")[i % 2]
        lines.append(line)
    return lines


def _records(out: Path) -> dict[str, dict]:
    return {r["request_id"]: r for r in map(json.loads, (out / "requests.jsonl").read_text().splitlines())}


# -- reading ---------------------------------------------------------------------------------------------
def test_jsonl_traces_carry_an_adapter_apart_from_the_model(tmp_path):
    trace = _trace(tmp_path / "t.jsonl", [{"input_toks": 5, "output_toks": 2, "arrival_time_ns": 0, "lora": "sql"},
                                          {"input_toks": 5, "output_toks": 2, "arrival_time_ns": 1, "model": "x"}])
    assert [(r.lora, r.model) for r in read_trace(trace)] == [("sql", None), (None, "x")]
    mooncake = _trace(tmp_path / "m.jsonl", [{"timestamp": 0, "input_length": 5, "output_length": 2, "lora": "chat"}])
    assert [r.lora for r in read_trace(mooncake)] == ["chat"]
    bad = _trace(tmp_path / "b.jsonl", [{"input_toks": 5, "output_toks": 2, "arrival_time_ns": 0, "lora": 7}])
    with pytest.raises(TraceError, match="b.jsonl:1: 'lora' must be a non-empty string, got 7"):
        list(read_trace(bad))


# -- scheduling under max_loras --------------------------------------------------------------------------
def test_with_max_loras_1_two_interleaved_adapters_take_turns_and_finish_later_than_the_base_model(tmp_path):
    base = replay(str(_trace(tmp_path / "base.jsonl", _interleaved(None))), _deployment(), tmp_path / "base",
                  lora_modules=ADAPTERS)
    lora = replay(str(_trace(tmp_path / "lora.jsonl", _interleaved("lora"))), _deployment(), tmp_path / "lora",
                  lora_modules=ADAPTERS)
    plain, turns = _records(tmp_path / "base"), _records(tmp_path / "lora")
    sql = [turns[f"r{i}"] for i in range(0, 8, 2)]
    chat = [turns[f"r{i}"] for i in range(1, 8, 2)]
    # without adapters the eight run in one batch; with one adapter slot, sql's four first, then chat's
    assert len({r["scheduled_time"] for r in plain.values()}) == 1
    assert all(r["scheduled_time"] == 0.0 for r in sql)
    assert min(r["scheduled_time"] for r in chat) >= max(r["finish_time"] for r in sql)
    # a batch of four steps no slower than one of eight: sql ends no later, chat (which waited) later
    assert max(r["finish_time"] for r in sql) <= min(r["finish_time"] for r in plain.values())
    assert min(r["finish_time"] for r in chat) > max(r["finish_time"] for r in plain.values())
    assert lora["duration"] > base["duration"] and lora["e2e"]["mean"] > base["e2e"]["mean"]
    assert {r["lora"] for r in plain.values()} == {None} and [r["lora"] for r in sql] == ["sql"] * 4
    assert lora["lora_adapters"]["sql"]["num_finished"] == lora["lora_adapters"]["chat"]["num_finished"] == 4
    assert lora["lora_adapters"]["chat"]["ttft"]["mean"] > lora["lora_adapters"]["sql"]["ttft"]["mean"]


def test_with_a_slot_for_each_adapter_they_batch_together_as_the_base_model_does(tmp_path):
    replay(str(_trace(tmp_path / "base.jsonl", _interleaved(None))), _deployment(2), tmp_path / "base")
    replay(str(_trace(tmp_path / "lora.jsonl", _interleaved("model"))), _deployment(2), tmp_path / "lora",
           lora_modules=ADAPTERS)  # a `model` that names an adapter runs under it
    plain, together = _records(tmp_path / "base"), _records(tmp_path / "lora")
    assert [r["lora"] for r in together.values()] == ["sql", "chat"] * 4
    for request_id, r in together.items():
        assert (r["scheduled_time"], r["finish_time"]) == (plain[request_id]["scheduled_time"],
                                                          plain[request_id]["finish_time"])


def test_adapters_keep_their_prefix_caches_apart(tmp_path):
    prompt = list(range(1000, 1320))
    lines = [{"request_id": f"r{i}", "input_toks": len(prompt), "output_toks": 2, "arrival_time_ns": i * 10 ** 9,
              "input_tok_ids": prompt, "lora": lora} for i, lora in enumerate(["sql", "chat", "sql"])]
    lines.append({"request_id": "r3", "input_toks": len(prompt), "output_toks": 2, "arrival_time_ns": 3 * 10 ** 9,
                  "input_tok_ids": prompt})
    replay(str(_trace(tmp_path / "t.jsonl", lines)), _deployment(), tmp_path / "out", lora_modules=ADAPTERS)
    cached = {k: r["cached_tokens"] for k, r in _records(tmp_path / "out").items()}
    assert cached == {"r0": 0, "r1": 0, "r2": 304, "r3": 0}  # only sql's second request hits sql's blocks


# -- errors ----------------------------------------------------------------------------------------------
def test_a_line_naming_an_adapter_nobody_serves_is_vllms_404_or_skipped(tmp_path):
    lines = _interleaved("lora", n=2)
    lines[1]["lora"] = "math"
    trace = _trace(tmp_path / "t.jsonl", lines)
    with pytest.raises(ReplayError, match=r"t.jsonl:2: The model `math` does not exist\..*--skip-invalid"):
        replay(str(trace), _deployment(), tmp_path / "a", lora_modules=ADAPTERS)
    summary = replay(str(trace), _deployment(), tmp_path / "b", lora_modules=ADAPTERS, skip_invalid=True)
    assert summary["num_requests"] == 1 and "math" in summary["skipped_lines"][0]


@pytest.mark.parametrize("modules, deployment, message", [
    (ADAPTERS, dict(enable_lora=False), "LoRA is not enabled. Use --enable-lora to enable LoRA."),
    (ADAPTERS + (LoRAModulePath("sql", "/x"),), {}, "The lora adapter 'sql' has already been loaded."),
    ((LoRAModulePath(BASE, "/x"),), {}, f"The lora adapter '{BASE}' conflicts with a served base model."),
])
def test_bad_lora_modules_stop_a_replay_with_vllms_message(tmp_path, modules, deployment, message):
    trace = _trace(tmp_path / "t.jsonl", _interleaved(None, n=1))
    with pytest.raises(ReplayError, match=None) as caught:
        replay(str(trace), _deployment(**deployment), tmp_path / "o", lora_modules=modules)
    assert message in str(caught.value)


def test_the_replay_command_takes_lora_modules(tmp_path, capsys):
    from vllm_emulator.cli import main
    trace = _trace(tmp_path / "t.jsonl", _interleaved("lora", n=4))
    assert main(["replay", str(trace), "--enable-lora", "--lora-modules", "sql=/adapters/sql",
                 "chat=/adapters/chat", "-o", str(tmp_path / "out")]) == 0
    assert [r["lora"] for r in _records(tmp_path / "out").values()] == ["sql", "chat"] * 2
    assert main(["replay", str(trace), "--lora-modules", "sql=/a", "-o", str(tmp_path / "x")]) == 2
    assert "LoRA is not enabled" in capsys.readouterr().err


# -- a cluster -------------------------------------------------------------------------------------------
def test_a_cluster_replay_sends_each_adapter_to_its_instances_and_names_it_everywhere(tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(f"""
engine: {{enable-lora: true, max-model-len: 4096}}
instances:
  - {{name: sql-pod, model: {BASE}, hardware: H100, lora-modules: [sql=/adapters/sql]}}
  - {{name: chat-pod, model: {BASE}, hardware: H100, lora-modules: [chat=/adapters/chat]}}
""")
    lines = _interleaved("lora", n=10)
    lines.append({"request_id": "plain", "input_toks": 100, "output_toks": 3, "arrival_time_ns": 0})
    summary = replay(str(_trace(tmp_path / "t.jsonl", lines)), read_cluster_file(cluster)[0], tmp_path / "out",
                     model_map={"ChatGPT": "chat"})
    records = _records(tmp_path / "out")
    assert {(r["lora"], r["instance"]) for k, r in records.items() if k != "plain"} == {("sql", "sql-pod"),
                                                                                         ("chat", "chat-pod")}
    assert records["plain"]["lora"] is None
    assert [(i["name"], i["lora_adapters"]) for i in summary["instances"]] == [("sql-pod", ["sql"]),
                                                                                ("chat-pod", ["chat"])]
    assert summary["lora_adapters"]["chat"] == {**summary["lora_adapters"]["chat"], "base_model": BASE,
                                                "path": "/adapters/chat", "instances": ["chat-pod"],
                                                "lora_int_ids": {"chat-pod": 1}, "num_requests": 5}
    # --model-map may send a trace's model name to an adapter
    mapped = [{"request_id": "m", "input_toks": 100, "output_toks": 3, "arrival_time_ns": 0, "model": "ChatGPT"}]
    replay(str(_trace(tmp_path / "m.jsonl", mapped)), read_cluster_file(cluster)[0], tmp_path / "m",
           model_map={"ChatGPT": "chat"})
    assert (_records(tmp_path / "m")["m"]["lora"], _records(tmp_path / "m")["m"]["instance"]) == ("chat", "chat-pod")


def test_the_summary_gives_each_pods_own_lora_int_id_of_an_adapter(tmp_path):
    """Each pod numbers its adapters in its own lora-modules order, as each vLLM front end does."""
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(f"""
engine: {{enable-lora: true, max-model-len: 4096}}
instances:
  - {{name: a, model: {BASE}, hardware: H100, lora-modules: [sql=/adapters/sql, chat=/adapters/chat]}}
  - {{name: b, model: {BASE}, hardware: H100, lora-modules: [chat=/adapters/chat]}}
""")
    summary = replay(str(_trace(tmp_path / "t.jsonl", _interleaved("lora", n=6))), read_cluster_file(cluster)[0],
                     tmp_path / "out")
    chat, sql = summary["lora_adapters"]["chat"], summary["lora_adapters"]["sql"]
    assert (chat["instances"], chat["lora_int_ids"], chat["path"]) == (["a", "b"], {"a": 2, "b": 1}, "/adapters/chat")
    assert (sql["instances"], sql["lora_int_ids"]) == (["a"], {"a": 1})
    assert "lora_int_id" not in chat and chat["num_finished"] == 3


def test_the_report_shows_each_adapters_requests(tmp_path):
    from loadgen.report import load_run, summary_rows
    replay(str(_trace(tmp_path / "t.jsonl", _interleaved("lora", n=4))), _deployment(), tmp_path / "out",
           lora_modules=ADAPTERS)
    rows = dict(summary_rows([load_run(tmp_path / "out")], {}))
    assert rows["LoRA adapters: finished, TTFT mean (ms)"][0].startswith("sql: 2, ")
    assert "; chat: 2, " in rows["LoRA adapters: finished, TTFT mean (ms)"][0]
