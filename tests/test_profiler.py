"""`vllm-emulator profile` on the CPU: a small grid and a tiny model, then priced by the emulator."""
import argparse
import json

import pytest

from profiles import profiler

torch = pytest.importorskip("torch")

TINY_MOE = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
            "intermediate_size": 256, "moe_intermediate_size": 64, "num_experts": 4, "num_experts_per_tok": 2,
            "vocab_size": 512, "max_position_embeddings": 2048, "torch_dtype": "bfloat16"}


def run(tmp_path, monkeypatch, **overrides):
    monkeypatch.setenv("VLLM_EMULATOR_HOME", str(tmp_path / "home"))
    model_dir = tmp_path / "tiny"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(TINY_MOE))
    parser = argparse.ArgumentParser()
    profiler.add_arguments(parser)
    argv = ["--model", str(model_dir), "--device", "cpu", "--grid", "small", "--warmup", "1", "--iters", "2"]
    for key, value in overrides.items():
        argv += [f"--{key}", str(value)]
    return profiler.main(parser.parse_args(argv))


def test_profile_writes_operator_tables_the_emulator_prices_with(tmp_path, monkeypatch):
    assert run(tmp_path, monkeypatch) == 0
    from profiles.operator_tables import find_operator_tables
    tables = find_operator_tables("CPU")
    assert tables is not None and tables.meta["measured_with"].startswith("torch")
    assert {"gemm/bf16", "memory_bound"} <= set(tables.grids)
    assert any(name.startswith("moe/bf16/h128_i64_k2_e4/") for name in tables.grids)
    assert (tables.grids["gemm/bf16"].values > 0).all()
    draft = tmp_path / "home" / "hardware" / "CPU.yaml.draft"
    assert draft.exists()  # an unknown device gets a spec to complete

    # completing the spec puts the device in the catalogue, priced from the measured tables
    (tmp_path / "home" / "hardware" / "CPU.yaml").write_text(
        "name: CPU\nkind: cpu\nmemory_bytes: 34359738368\nmemory_bandwidth: 5.0e+10\nflops: {bf16: 1.0e+12}\n")
    from emulator.config import EngineArgs, resolve
    from profiles.cost_selection import select_cost_model
    from emulator.batch import BatchShape
    from emulator.hardware import load_device
    from emulator.models import load_model
    model, device = load_model(str(tmp_path / "tiny")), load_device("CPU")
    cm = select_cost_model(model, device, resolve(EngineArgs(max_model_len=1024), model, device))
    assert "operator tables CPU" in cm.describe()
    assert cm.step_time(BatchShape.from_chunks([(1, 100)] * 4)) > 0


def test_profile_rejects_a_tp_that_does_not_divide_the_heads(tmp_path, monkeypatch, capsys):
    assert run(tmp_path, monkeypatch, tp=3) == 2
    assert "must divide" in capsys.readouterr().err


def test_profile_cuda_without_a_gpu_is_a_clear_error(tmp_path, monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert run(tmp_path, monkeypatch, device="cuda") == 2
    assert "no CUDA device" in capsys.readouterr().err
