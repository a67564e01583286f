"""The LLMServingSim v0 and Vidur importers: converted values against the CSV rows they came
from, the shipped tables against other measurements of the same kernels, replays priced
with them, and how far they land from the same device's roofline."""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from emulator.batch import BatchShape
from emulator.config import EngineArgs, resolve
from emulator.cost.profiled import ProfiledCostModel
from emulator.cost.interpolate import GridTable
from emulator.hardware import load_device
from emulator.models import load_model
from emulator.cost.operators import OperatorCostModel
from emulator.cost.table_pricer import TablePricer
from emulator.cost.tables import ModelProfile, OperatorTables
from emulator.cost.collectives import Collectives
from profiles.collectives import link_grids
from profiles.importers import llmservingsim_v0, vidur
from profiles.model_profile import find_profile
from profiles.operator_tables import find_operator_tables
from profiles.roofline_fit import roofline_for
from vllm_emulator.cli import main

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
V0 = "profiles-src/llmservingsim/v0_perf_models"
VIDUR = "profiles-src/vidur/profiling"
# A spec for the A40 (it is not in the catalogue yet): enough for the importer to accept the device.
A40_SPEC = """name: A40
kind: gpu
arch: sm86
sm_count: 84
memory_bytes: 51527024640
memory_bandwidth: 6.96e+11
flops: {bf16: 1.497e+14, fp16: 1.497e+14, int8: 2.993e+14, fp32: 3.74e+13}
interconnect: {name: nvlink-bridge, bandwidth: 5.625e+10, latency: 5.0e-06}
"""


def rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def lookup(grid, *coords) -> tuple[float, bool]:
    table = GridTable(list(grid.axes.values()), grid.values, grid.measured)
    us, extrapolated = table(*coords)
    return float(us), bool(extrapolated)


def attention_time(profile: ModelProfile, pc, kp, nd, kd) -> float:
    a = profile.attention
    hit = a[(a[:, 0] == pc) & (a[:, 1] == kp) & (a[:, 2] == nd) & (a[:, 3] == kd)]
    assert len(hit) == 1, (pc, kp, nd, kd)
    return float(hit[0, 4])


@pytest.fixture(scope="module")
def v0(tmp_path_factory) -> tuple[Path, Path]:
    """(source, output) of one run of the v0 importer into a temporary directory."""
    source = SHARED_DATA / V0
    if not source.is_dir():
        pytest.skip(f"{source} is absent")
    out = tmp_path_factory.mktemp("v0")
    written = llmservingsim_v0.import_all(source, out)
    assert {p.relative_to(out).as_posix() for p in written} == {
        "A6000/meta-llama--Llama-3.1-8B/fp16/tp1", "A6000/meta-llama--Llama-3.1-8B/fp16/tp2",
        "A6000/microsoft--Phi-mini-MoE-instruct/fp16/tp1", "A6000/microsoft--Phi-mini-MoE-instruct/fp16/tp2",
        "H100/meta-llama--Llama-3.1-70B/fp16/tp4", "H100/mistralai--Mixtral-8x7B-v0.1/fp16/tp4",
        "TPUv6e/meta-llama--Llama-3.1-8B/bf16/tp1", "A6000/operators", "RTX3090/operators"}
    return source, out


@pytest.fixture(scope="module")
def vidur_out(tmp_path_factory) -> tuple[Path, Path]:
    """(source, output) of one run of the Vidur importer, with an A40 spec in a user catalogue."""
    source = SHARED_DATA / VIDUR
    if not source.is_dir():
        pytest.skip(f"{source} is absent")
    home = tmp_path_factory.mktemp("home")
    (home / "hardware").mkdir()
    (home / "hardware" / "A40.yaml").write_text(A40_SPEC)
    out = tmp_path_factory.mktemp("vidur")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_EMULATOR_HOME", str(home))
        written = vidur.import_all(source, out)
    assert {p.relative_to(out).as_posix() for p in written} == {
        "A40/operators", "collectives/a100_dgx", "collectives/h100_dgx"}
    return source, out


# -- LLMServingSim v0: per-model profiles ----------------------------------------------------------------
def test_v0_layer_rows_become_per_token_tables_in_microseconds(v0):
    source, out = v0
    csv_rows = rows(source / "A6000/meta-llama/Llama-3.1-8B/tp1/layers.csv")
    ns = {(r["layer_name"], int(r["input"])): float(r["latency(ns)"]) for r in csv_rows}
    profile = ModelProfile.load(out / "A6000/meta-llama--Llama-3.1-8B/fp16/tp1")
    for op in ("input_layernorm", "q_proj", "k_proj", "rope", "gate_proj", "down_proj"):
        tokens, us = profile.dense[op]
        i = list(tokens).index(64)
        assert us[i] == pytest.approx(ns[(op, 64)] / 1000, rel=1e-6)
    sequences, us = profile.per_sequence["lm_head"]  # read at the number of sequences, as LLMServingSim does
    assert us[list(sequences).index(8)] == pytest.approx(ns[("lm_head", 8)] / 1000, rel=1e-6)
    assert "attn" not in profile.dense  # attention comes from attention.csv
    assert profile.meta["dtype"] == "fp16" and profile.meta["layer_ops"]["up_proj"] == 1


def test_v0_gpu_prefill_keys_include_the_chunk_and_decode_keys_are_split_over_the_batch(v0):
    source, out = v0
    profile = ModelProfile.load(out / "A6000/meta-llama--Llama-3.1-8B/fp16/tp1")
    att = rows(source / "A6000/meta-llama/Llama-3.1-8B/tp1/attention.csv")

    def ms(prefill, chunk, kv, batch):
        column = "time_stats.attn_prefill.median" if prefill else "time_stats.attn_decode.median"
        return statistics.median(float(r[column]) for r in att if (r["is_prefill"] == str(prefill))
                                 and (int(r["prefill_chunk_size"]), int(r["kv_cache_size"]), int(r["batch_size"]))
                                 == (chunk, kv, batch))
    assert attention_time(profile, 64, 0, 0, 0) == pytest.approx(ms(True, 64, 64, 1) * 1000, rel=1e-5)
    assert attention_time(profile, 64, 64, 0, 0) == pytest.approx(ms(True, 64, 128, 1) * 1000, rel=1e-5)
    # 4 sequences over 4096 keys: 1024 each
    assert attention_time(profile, 0, 0, 4, 1024) == pytest.approx(ms(False, 0, 4096, 4) * 1000, rel=1e-5)
    mixed = attention_time(profile, 64, 64, 4, 1024)
    assert mixed == pytest.approx(attention_time(profile, 64, 64, 0, 0) + attention_time(profile, 0, 0, 4, 1024))
    filled = {tuple(c) for c in profile.meta["attention_grid"]["decode_filled"]["cells"]}
    assert (256, 1024) in filled and (4, 1024) not in filled  # 256 x 1024 keys were never run


def test_v0_tpu_sums_the_mlp_rows_xla_fused_and_keeps_decode_context_per_sequence(v0):
    source, out = v0
    layers = llmservingsim_v0.read_layers(source / "TPU-v6e-1/meta-llama/Llama-3.1-8B/tp1/layers.csv")
    assert "k_proj" not in layers and 256 not in layers["up_proj"] and 512 in layers["up_proj"]
    profile = ModelProfile.load(out / "TPUv6e/meta-llama--Llama-3.1-8B/bf16/tp1")
    tokens, mlp = profile.dense["mlp"]
    at = dict(zip(tokens, mlp))
    assert at[256] == pytest.approx(layers["gate_proj"][256] + layers["down_proj"][256])
    assert at[512] == pytest.approx(layers["gate_proj"][512] + layers["up_proj"][512] + layers["down_proj"][512])
    assert "rope" not in profile.meta["layer_ops"]  # inside the TPU's attention
    att = rows(source / "TPU-v6e-1/meta-llama/Llama-3.1-8B/tp1/attention.csv")
    p50 = statistics.median(float(r["p50_ns"]) for r in att if r["is_prefill"] == "False"
                            and (int(r["batch_size"]), int(r["kv_cache_size"])) == (2, 1024))
    assert attention_time(profile, 0, 0, 2, 1024) == pytest.approx(p50 / 1000, rel=1e-5)
    assert profile.meta["dtype"] == "bf16"


def test_v0_moe_runs_the_active_experts_one_after_another(v0):
    source, out = v0
    layers = llmservingsim_v0.read_layers(source / "A6000/microsoft/Phi-mini-MoE-instruct/tp1/layers.csv")
    profile = ModelProfile.load(out / "A6000/microsoft--Phi-mini-MoE-instruct/fp16/tp1")
    moe = profile.moe
    row = moe[(moe[:, 0] == 64) & (moe[:, 1] == 16)][0]
    per_expert = sum(layers[op][8] for op in ("expert.w1", "expert.w3", "act_fn", "expert.w2"))  # 64 x 2 / 16
    assert row[2] == pytest.approx(16 * per_expert)
    assert profile.meta["layer_ops"]["gate"] == 1 and "gate_proj" not in profile.dense


# -- LLMServingSim v0: operator tables --------------------------------------------------------------------
def test_v0_gemm_cells_are_the_rows_of_their_shape(v0):
    source, out = v0
    tables = OperatorTables.load(out / "A6000/operators")
    gemm = tables.grids["gemm/fp16"]
    ns = {(r["layer_name"], int(r["input"])): float(r["latency(ns)"])
          for r in rows(source / "A6000/meta-llama/Llama-3.1-8B/tp1/layers.csv")}
    us, extrapolated = lookup(gemm, 512, 128256, 4096)  # the LM head, only Llama-3.1-8B tp1 has it
    assert us == pytest.approx(ns[("lm_head", 512)] / 1000, rel=1e-6) and not extrapolated
    assert lookup(gemm, 512, 14336, 14336)[1]  # no model ran this shape: filled, reported as extrapolated
    assert "generation_attention/fp16/hd128/w0" not in tables.grids  # decode is left to the roofline
    context = tables.grids["context_attention/fp16/hd128/w0"]
    att = rows(source / "A6000/meta-llama/Llama-3.1-8B/tp1/attention.csv")
    ms = statistics.median(float(r["time_stats.attn_prefill.median"]) for r in att if r["is_prefill"] == "True"
                           and (int(r["prefill_chunk_size"]), int(r["kv_cache_size"])) == (256, 256))
    assert lookup(context, 1, 256, 32, 8) == (pytest.approx(ms * 1000, rel=1e-5), False)


def test_v0_rtx3090_has_gemms_and_the_models_own_prefill_attention(v0):
    source, out = v0
    tables = OperatorTables.load(out / "RTX3090/operators")
    assert set(tables.grids) == {"gemm/fp16", "context_attention/fp16/hd128/w0",
                                 "moe/fp16/h4096_i960_k2_e16/tp1_ep1"}
    ns = {(r["layer_name"], int(r["input"])): float(r["latency(ns)"])
          for r in rows(source / "RTX3090/meta-llama/Llama-3.1-8B/tp2/layers.csv")}
    assert lookup(tables.grids["context_attention/fp16/hd128/w0"], 1, 1024, 16, 4)[0] == pytest.approx(
        ns[("attn", 1024)] / 1000, rel=1e-6)


def test_v0_gemms_agree_with_aiconfigurator_on_the_h100(shared_data):
    """The same GEMM shapes on the same GPU, measured by LLMServingSim (HF nn.Linear) and by
    AIConfigurator under vLLM: the v0 rows are trustworthy as operator tables."""
    gemm = find_operator_tables("H100").grids["gemm/bf16"]
    table = GridTable(list(gemm.axes.values()), gemm.values, gemm.measured)
    ratios = []
    for tp_dir in sorted((shared_data / V0 / "H100").glob("*/*/tp*")):
        shape = llmservingsim_v0.MODELS[f"{tp_dir.parents[0].parent.name}/{tp_dir.parent.name}"]
        layers = llmservingsim_v0.read_layers(tp_dir / "layers.csv")
        for op, (n, k) in llmservingsim_v0.gemm_shapes(shape, int(tp_dir.name[2:])).items():
            for m in (1, 16, 128, 512, 2048):
                ratios.append(layers[op][m] / float(table(m, n, k)[0]))
    assert len(ratios) > 200
    assert 0.95 < np.median(ratios) < 1.05
    assert np.percentile(ratios, 10) > 0.85 and np.percentile(ratios, 90) < 1.2


def test_v0_decode_rows_are_much_slower_than_vllms_decode_kernel(shared_data):
    """Why decode attention is not an operator table: FA2 varlen without split-KV against
    AIConfigurator's vLLM decode kernel, same heads per GPU, on the H100."""
    att = llmservingsim_v0.read_attention(shared_data / V0 / "H100/meta-llama/Llama-3.1-70B/tp4/attention.csv")
    gen = find_operator_tables("H100").grids["generation_attention/bf16/hd128/w0"]
    table = GridTable(list(gen.axes.values()), gen.values, gen.measured)
    ratios = [us / float(table(b, c, 16, 2)[0]) for (b, c), us in att.decode.items() if b <= 8 and c >= 2048]
    assert np.median(ratios) > 3


def test_v0_model_shapes_match_the_shipped_configs():
    for name, shape in llmservingsim_v0.MODELS.items():
        try:
            model = load_model(name)
        except ValueError:
            continue  # Phi-mini-MoE has no shipped config
        assert (shape.hidden, shape.heads, shape.kv_heads, shape.vocab) == (
            model.hidden_size, model.num_heads, model.num_kv_heads, model.vocab_size)
        assert shape.intermediate == (model.moe_intermediate_size if model.is_moe else model.intermediate_size)
        assert (shape.experts, shape.top_k) == (model.num_experts, model.num_experts_per_tok)


def test_v0_importer_output_is_what_ships(v0):
    """The shipped tables are regenerated bit for bit by the command in profiles/SOURCES.md."""
    _, out = v0
    shipped = Path(llmservingsim_v0.DATA_DIR)
    for npz in sorted(out.rglob("tables.npz")):
        with np.load(npz) as fresh, np.load(shipped / npz.relative_to(out)) as kept:
            assert fresh.files == kept.files
            assert all(np.array_equal(fresh[k], kept[k]) for k in fresh.files), npz


# -- Vidur ------------------------------------------------------------------------------------------------
def test_vidur_gemm_and_norm_cells_are_the_rows_of_their_shape(vidur_out):
    source, out = vidur_out
    tables = OperatorTables.load(out / "A40/operators")
    expected = []
    for path in sorted((source / "compute/a40").glob("*/*/mlp.csv")):
        for r in rows(path):
            if int(r["num_tokens"]) == 1024 and vidur.gemm_shapes(r)["attn_pre_proj"] == (12288, 4096):
                expected.append(float(r["time_stats.attn_pre_proj.median"]) * 1000)  # Llama-2-7B, TP1
    assert expected
    assert lookup(tables.grids["gemm/fp16"], 1024, 12288, 4096) == (pytest.approx(statistics.median(expected)),
                                                                      False)
    grid = tables.grids["memory_bound"]
    moved = grid.axes["bytes"][len(grid.axes["bytes"]) // 2]
    norms = []  # every norm kernel that moved exactly these bytes, over models, TP sizes and both norms
    for path in sorted((source / "compute/a40").glob("*/*/mlp.csv")):
        for r in rows(path):
            if 2 * int(r["num_tokens"]) * int(r["n_embd"]) * 2 == moved:
                norms += [float(r[f"time_stats.{op}.median"]) * 1000 for op in vidur.NORMS
                          if r.get(f"time_stats.{op}.median")]
    assert norms and lookup(grid, moved) == (pytest.approx(statistics.median(norms)), False)
    assert np.all(np.diff(grid.axes["bytes"]) > 0)


def test_vidur_collectives_keep_the_workers_inside_one_node(vidur_out):
    source, out = vidur_out
    tables = OperatorTables.load(out / "collectives/h100_dgx")
    assert tables.meta["devices"] == ["H100"]
    all_reduce = tables.grids["all_reduce"]
    assert list(all_reduce.axes["gpus"]) == [2, 4, 8]
    ms = statistics.median(float(r["time_stats.all_reduce.median"])
                           for r in rows(source / "network/h100_dgx/all_reduce.csv")
                           if (int(r["num_workers"]), int(r["devices_per_node"]), int(r["size"])) == (8, 8, 2048))
    assert lookup(all_reduce, 8, 2048)[0] == pytest.approx(ms * 1000)
    a100 = OperatorTables.load(out / "collectives/a100_dgx").grids["all_reduce"]
    assert 16 not in a100.axes["gpus"]  # 16 workers span two DGX nodes


def test_vidur_gemms_agree_with_aiconfigurator(shared_data):
    for device, name in (("h100", "H100"), ("a100", "A100")):
        gemm = find_operator_tables(name).grids["gemm/bf16"]
        table = GridTable(list(gemm.axes.values()), gemm.values, gemm.measured)
        ratios = []
        for path in sorted((shared_data / VIDUR / "compute" / device).glob("*/*/mlp.csv")):
            for r in rows(path):
                m = int(r["num_tokens"])
                if m in (1, 16, 128, 512, 2048):
                    for op, (n, k) in vidur.gemm_shapes(r).items():
                        ratios.append(float(r[f"time_stats.{op}.median"]) * 1000 / float(table(m, n, k)[0]))
        assert 0.9 < np.median(ratios) < 1.15, device


def test_vidur_importer_output_is_what_ships(vidur_out):
    _, out = vidur_out
    for npz in sorted((out / "collectives").rglob("tables.npz")):
        with np.load(npz) as fresh, np.load(Path(vidur.DATA_DIR) / npz.relative_to(out)) as kept:
            assert all(np.array_equal(fresh[k], kept[k]) for k in fresh.files), npz


# -- the accessor -----------------------------------------------------------------------------------------
def test_the_measured_link_of_a_device_prices_its_collectives():
    grid = link_grids("H100")["all_reduce"]
    collectives = Collectives(load_device("H100").interconnect, "sm90", {"all_reduce": grid})
    priced = collectives.collective("all_reduce", grid.axes["bytes"][5], 4)
    assert float(priced.us) == pytest.approx(grid.values[1, 5]) and not priced.extrapolated
    big = collectives.collective("all_reduce", 4 * grid.axes["bytes"][-1], 4)  # past the largest size: by bytes
    assert float(big.us) == pytest.approx(4 * grid.values[1, -1]) and big.extrapolated
    assert "send_recv" in link_grids("A100-40GB")
    assert link_grids("RTX4090") == {}


# -- pricing with the shipped tables ----------------------------------------------------------------------
@pytest.mark.parametrize("hardware, source", [
    ("A6000", "profiled tables A6000/meta-llama/Llama-3.1-8B/fp16/tp1 from casys-kaist/LLMServingSim@5daddb21"),
    ("RTX3090", "operator tables RTX3090 from casys-kaist/LLMServingSim@5daddb21"),
    ("TPUv6e", "profiled tables TPUv6e/meta-llama/Llama-3.1-8B/bf16/tp1 from casys-kaist/LLMServingSim@5daddb21"),
])
def test_replay_prices_steps_with_the_imported_tables(capsys, tmp_path, shared_data, hardware, source):
    trace = shared_data / "traces/sharegpt/sharegpt_req100_rate10_llama.jsonl"
    code = main(["replay", str(trace), "--hardware", hardware, "--max-model-len", "8192", "-o", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 0
    assert f"Step cost: {source}" in err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_finished"] == 100 and summary["tpot"]["mean"] > 0


SHAPES = {
    "decode 1 x 512": [(1, 512)],
    "decode 16 x 1024": [(1, 1024)] * 16,
    "decode 64 x 1024": [(1, 1024)] * 64,
    "prefill 512": [(512, 0)],
    "prefill 2048": [(2048, 0)],
    "chunk 512 + 32 decodes": [(512, 0)] + [(1, 600)] * 32,
}


def step_ratios(hardware: str) -> dict[str, float]:
    """Step time with the imported tables / with the roofline of the same device, Llama-3.1-8B tp1."""
    model, device = load_model("meta-llama/Llama-3.1-8B"), load_device(hardware)
    config = resolve(EngineArgs(max_model_len=8192), model, device)
    roofline = OperatorCostModel(model, device, config, roofline_for(device), "roofline")
    tables = find_operator_tables(hardware)
    if tables is not None:
        priced = OperatorCostModel(model, device, config, TablePricer(tables.grids, roofline_for(device), hardware), "")
    else:
        priced = ProfiledCostModel(find_profile(hardware, model.name, "bf16", 1), model, device, config)
    return {name: priced.step_time(BatchShape.from_chunks(c)) / roofline.step_time(BatchShape.from_chunks(c))
            for name, c in SHAPES.items()}


@pytest.mark.parametrize("hardware", ["A6000", "RTX3090", "TPUv6e"])
def test_imported_tables_land_near_the_devices_roofline(hardware):
    ratios = step_ratios(hardware)
    print(f"{hardware}: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    assert 0.7 < np.median(list(ratios.values())) < 1.4
    assert all(0.4 < r < 3.0 for r in ratios.values()), ratios
