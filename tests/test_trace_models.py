"""Traces that name each request's model: replay routes them to the instances serving it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from emulator.cluster import ClusterSpec
from emulator.config import EngineArgs
from emulator.instance import InstanceSpec
from loadgen.replay import ReplayError, main, replay
from loadgen.trace_models import ModelResolver, parse_model_map
from loadgen.traces import Trace, TraceError
from profiles.deployment import build_deployment
from vllm_emulator.cli import build_parser


@pytest.fixture(scope="module")
def two_models() -> ClusterSpec:
    small = build_deployment("meta-llama/Llama-3.1-8B", "H100", EngineArgs(max_model_len=8192))
    big = build_deployment("meta-llama/Llama-3.1-70B", "H100", EngineArgs(max_model_len=4096, tensor_parallel_size=4))
    return ClusterSpec((InstanceSpec("small-0", small, ("llama-8b", "llama")),
                        InstanceSpec("small-1", small, ("llama-8b", "llama")),
                        InstanceSpec("big", big, ("llama-70b",))))


def write_trace(path: Path, models: list[str | None], input_len: int = 200) -> Path:
    with path.open("w") as f:
        for i, model in enumerate(models):
            line = {"input_toks": input_len, "output_toks": 20, "arrival_time_ns": i * 50_000_000}
            if model is not None:
                line["model"] = model
            f.write(json.dumps(line) + "\n")
    return path


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "requests.jsonl").open()]


def test_a_cluster_of_two_models_gets_each_request_under_the_model_its_line_names(tmp_path, two_models):
    trace = write_trace(tmp_path / "t.jsonl", ["llama-70b", "llama-8b", None, "llama", "llama-70b", "llama-8b"])
    replay(str(trace), two_models, tmp_path / "out")
    got = [(r["model"], r["instance"]) for r in records(tmp_path / "out")]
    assert [m for m, _ in got] == ["llama-70b", "llama-8b", "llama-8b", "llama", "llama-70b", "llama-8b"]
    for model, instance in got:  # a line without a model goes to the first; an alias to its instances
        assert (instance == "big") == (model == "llama-70b")


def test_trace_names_are_mapped_and_a_name_nobody_serves_names_its_line(tmp_path, two_models):
    trace = write_trace(tmp_path / "t.jsonl", ["GPT-4", "ChatGPT", "GPT-4"])
    replay(str(trace), two_models, tmp_path / "out", model_map={"GPT-4": "llama-70b", "ChatGPT": "llama-8b"})
    assert [r["instance"] for r in records(tmp_path / "out")] == ["big", "small-0", "big"]
    with pytest.raises(ReplayError, match=r"t\.jsonl:1: model 'GPT-4' is not served .*--model-map GPT-4="):
        replay(str(trace), two_models, tmp_path / "out2")
    summary = replay(str(trace), two_models, tmp_path / "out3", skip_invalid=True,
                     model_map={"ChatGPT": "llama-8b"})
    assert summary["num_requests"] == 1 and len(summary["skipped_lines"]) == 2
    with pytest.raises(ReplayError, match="--model-map GPT-4=gpt-5: 'gpt-5' is not served"):
        replay(str(trace), two_models, tmp_path / "out4", model_map={"GPT-4": "gpt-5"})


def test_each_model_checks_prompts_against_its_own_context(tmp_path, two_models):
    trace = write_trace(tmp_path / "t.jsonl", ["llama-8b", "llama-70b"], input_len=5000)
    summary = replay(str(trace), two_models, tmp_path / "out", skip_invalid=True)
    assert summary["num_requests"] == 1
    skipped = summary["skipped_lines"]
    assert "t.jsonl:2: prompt of 5000 tokens does not fit max_model_len=4096 of llama-70b" in skipped[0]


def test_a_one_model_target_takes_every_line_whatever_it_names(tmp_path):
    trace = write_trace(tmp_path / "t.jsonl", ["GPT-4", None, "ChatGPT"])
    out = tmp_path / "out"
    args = build_parser("replay").parse_args([str(trace), "--hardware", "H100", "-o", str(out)])
    assert main(args) == 0
    assert [r.get("model") for r in records(out)] == [None, None, None]  # as before: no model column


def test_bad_model_fields_and_maps_are_errors_with_their_place(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_toks": 5, "output_toks": 5, "arrival_time_ns": 0, "model": 7}\n')
    with pytest.raises(TraceError, match=r"bad\.jsonl:1: 'model' must be a non-empty string"):
        list(Trace(bad))
    with pytest.raises(ValueError, match="expected TRACE_NAME=SERVED_NAME"):
        parse_model_map(["GPT-4"])
    args = build_parser("replay").parse_args([str(bad), "--model-map", "x", "-o", str(tmp_path / "o")])
    assert main(args) == 2 and "--model-map 'x': expected" in capsys.readouterr().err


def test_burstgpt_model_column_is_read(tmp_path):
    path = tmp_path / "burst.csv"
    path.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                    "5,ChatGPT,472,18,490,Conversation log\n45,GPT-4,1087,0,1087,Conversation log\n"
                    "118,GPT-4,417,276,693,API log\n")
    assert [r.model for r in Trace(path)] == ["ChatGPT", "GPT-4"]


def test_resolver_treats_aliases_of_one_model_as_one_model():
    aliases = ModelResolver({"a": 1, "b": 1}, "a")
    assert aliases.one_model and aliases.resolve("anything") == "a" and aliases.resolve("b") == "b"
    two = ModelResolver({"a": 1, "b": 2}, "a", {"x": "b"})
    assert not two.one_model and two.resolve(None) == "a" and two.resolve("x") == "b"
    with pytest.raises(ValueError, match="model 'y' is not served"):
        two.resolve("y")
