"""bench/accuracy.py reads every row of AIConfigurator's silicon CSV schema: what it cannot replay is reported
with the reason, never a crash."""
import csv
import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "accuracy.py"
_spec = importlib.util.spec_from_file_location("accuracy_rows_bench", BENCH)
accuracy = importlib.util.module_from_spec(_spec)
sys.modules["accuracy_rows_bench"] = accuracy
_spec.loader.exec_module(accuracy)

COLUMNS = ("id,silicon_data_source,backend,backend_version,model_path,system,precision,mode,isl,osl,gemm_quant_mode,"
           "moe_quant_mode,batch_size,tp_size,pp_size,attention_dp_size,moe_tp_size,moe_ep_size,prefill_batch_size,"
           "prefill_num_workers,prefill_tp_size,prefill_pp_size,prefill_attention_dp_size,prefill_moe_tp_size,"
           "prefill_moe_ep_size,decode_batch_size,decode_num_workers,decode_tp_size,decode_pp_size,"
           "decode_attention_dp_size,decode_moe_tp_size,decode_moe_ep_size,silicon_ttft_ms,silicon_tpot_ms").split(",")


def row(**over) -> dict:
    base = dict.fromkeys(COLUMNS, "")
    base.update({"id": "r", "backend": "vllm", "backend_version": "0.18.0", "model_path": "meta-llama/Llama-3.1-8B",
                 "system": "h200_sxm", "mode": "agg", "isl": "256", "osl": "16", "gemm_quant_mode": "bfloat16",
                 "batch_size": "2", "tp_size": "1", "pp_size": "1", "silicon_ttft_ms": "30", "silicon_tpot_ms": "5"})
    return {**base, **over}


@pytest.mark.parametrize("over, reason", [
    ({"mode": "disagg", "prefill_tp_size": "2", "decode_tp_size": "4"}, "mode=disagg"),
    ({"tp_size": ""}, "empty field(s) tp_size"),
    ({"batch_size": ""}, "empty field(s) batch_size"),
    ({"silicon_tpot_ms": "n/a"}, "silicon_tpot_ms='n/a' is not a number"),
    ({"pp_size": "two"}, "pp_size='two' is not a positive whole number"),
    ({"backend": "sglang"}, "only vLLM points"),
    ({"system": "tpu_v9"}, "no device 'tpu_v9'"),
    ({"model_path": "acme/unknown-model"}, "no config.json shipped"),
    ({"gemm_quant_mode": "int3"}, "weight precision 'int3' is not modelled"),
    ({"attention_dp_size": "4"}, "data-parallel attention"),
])
def test_a_row_that_cannot_be_replayed_says_why(over, reason):
    [result] = accuracy.evaluate([row(**over)], progress=False)
    assert not result["supported"] and reason in result["reason"]


def test_an_empty_quantisation_field_means_the_models_own_dtype():
    deployment = accuracy.deployment_for(row(gemm_quant_mode=""))
    assert deployment.model.weight_dtype == "bfloat16"
    [result] = accuracy.evaluate([row(gemm_quant_mode="")], progress=False)
    assert result["supported"] and result["tpot_ms_pred"] > 0


def test_a_whole_csv_with_every_kind_of_row_runs_to_its_summary(tmp_path, capsys):
    path = tmp_path / "silicon.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for over in ({}, {"mode": "disagg"}, {"tp_size": ""}, {"gemm_quant_mode": ""}):
            writer.writerow(row(**over))
        f.write("truncated,row\n")
    assert accuracy.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "unsupported: mode=disagg" in out and "unsupported: empty field(s)" in out
