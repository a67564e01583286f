"""bench/accuracy.py replays measured serving points the way their client ran them."""
import csv
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest


BENCH = Path(__file__).resolve().parents[1] / "bench" / "accuracy.py"
_spec = importlib.util.spec_from_file_location("accuracy_bench", BENCH)
accuracy = importlib.util.module_from_spec(_spec)
sys.modules["accuracy_bench"] = accuracy  # dataclasses look their module up while the class is built
_spec.loader.exec_module(accuracy)

INFERENCEX = "db-dump/2026-04-27; config_id=606; silicon_concurrency=4; workflow_run_id=305; vllm/vllm-openai:v0.16.0"
GAP = "source_file=/x/aic-auto-gap-analysis/data/h200_sxm/vllm/0.12.0/nvidia_Llama-3.1-8B-Instruct-FP8.csv"


def row(**over):
    base = {"id": "r", "silicon_data_source": INFERENCEX, "backend_version": "0.18.0",
            "model_path": "meta-llama/Llama-3.1-8B", "system": "h200_sxm", "isl": "1024", "osl": "1024",
            "gemm_quant_mode": "bfloat16", "batch_size": "4", "tp_size": "1", "pp_size": "1", "moe_tp_size": "1",
            "moe_ep_size": "1", "silicon_ttft_ms": "50", "silicon_tpot_ms": "5"}
    return {**base, **over}


def test_the_source_names_the_protocol():
    assert accuracy.protocol_for(row()).name == "inferencex"
    assert accuracy.protocol_for(row(silicon_data_source=GAP)).name == "aic-gap"
    assert accuracy.protocol_for(row(silicon_data_source="")).name == "inferencex"


def test_inferencex_lengths_are_uniform_between_the_range_ratio_and_the_nominal_length():
    lengths = accuracy.request_lengths(row(isl="8192", osl="1024", batch_size="64"), accuracy.PROTOCOLS["inferencex"])
    assert len(lengths) == 640  # ten prompts per client
    inputs, outputs = np.array(lengths).T
    assert inputs.min() >= int(0.8 * 8192) and inputs.max() <= 8192
    assert outputs.min() >= int(0.8 * 1024) and outputs.max() <= 1024
    assert abs(inputs.mean() - 0.9 * 8192) < 0.02 * 8192  # [0.8 L, L], not [0.8 L, 1.2 L]
    fixed = accuracy.request_lengths(row(batch_size="3"), accuracy.PROTOCOLS["aic-gap"])
    assert fixed == [(1024, 1024)] * 30


def test_the_recipe_sets_the_engine_flags_of_the_measured_run():
    protocol = accuracy.PROTOCOLS["inferencex"]
    llama = accuracy.load_model("meta-llama/Llama-3.1-70B")
    args = accuracy.engine_args_for(row(batch_size="32", tp_size="4", moe_tp_size="4"), llama, protocol)
    assert (args.kv_cache_dtype, args.max_num_seqs, args.max_num_batched_tokens) == ("fp8", 32, 8192)
    assert not args.enable_prefix_caching and args.max_model_len == 1024 + 1024 + 20
    assert args.tensor_parallel_size == 4 and args.data_parallel_size == 1
    long = accuracy.engine_args_for(row(isl="8192"), llama, protocol)
    assert long.max_model_len == 8192 + 1024 + 200
    minimax = accuracy.load_model("MiniMaxAI/MiniMax-M2.5")
    args = accuracy.engine_args_for(row(tp_size="8", moe_tp_size="8"), minimax, protocol)
    assert args.gpu_memory_utilization == 0.95 and args.max_num_seqs is None  # vLLM's default


def test_moe_rows_derive_data_parallelism_from_the_moe_split():
    qwen = accuracy.load_model("Qwen/Qwen3-235B-A22B-FP8")
    gap = accuracy.PROTOCOLS["aic-gap"]
    args = accuracy.engine_args_for(row(tp_size="1", moe_tp_size="2", silicon_data_source=GAP), qwen, gap)
    assert (args.tensor_parallel_size, args.data_parallel_size, args.enable_expert_parallel) == (1, 2, False)
    assert args.max_model_len == 1024 + 1024 + 1500 and args.max_num_seqs == 4
    args = accuracy.engine_args_for(row(tp_size="2", moe_tp_size="1", moe_ep_size="2"), qwen, gap)
    assert (args.data_parallel_size, args.enable_expert_parallel) == (1, True)


def test_unsupported_rows_say_why():
    with pytest.raises(accuracy.Unsupported, match="INT4.*no config.json"):
        accuracy.deployment_for(row(model_path="moonshotai/Kimi-K2.5", gemm_quant_mode="int4_wo"))
    with pytest.raises(accuracy.Unsupported, match="weight precision 'w2'"):
        accuracy.deployment_for(row(gemm_quant_mode="w2"))


def test_closed_loop_keeps_concurrency_and_matches_exact_stepping():
    r = row(isl="256", osl="64", batch_size="4")
    deployment = accuracy.deployment_for(r)
    runs = accuracy.closed_loop(r, deployment, accuracy.protocol_for(r), bulk=False)
    assert len(runs) == 40
    sent = sorted(s for s, _ in runs)
    assert sent[:4] == [0.0] * 4 and sent[4] > 0.0  # the first wave is sent together
    finishes = sorted(q.finish_time for _, q in runs)[:36]
    assert sent[4:] == pytest.approx([f + accuracy.CLIENT_TURNAROUND for f in finishes], abs=1e-9)
    # the API server hands a request to the engine after its micro-batch window and its tokenization
    assert all(q.arrival_time >= s + 0.002 for s, q in runs)
    events = sorted([(s, 1) for s, _ in runs] + [(q.finish_time, -1) for _, q in runs])
    in_flight = np.cumsum([d for _, d in events])
    assert in_flight.max() == 4  # a finish lets its client send the next request, never more than c at once
    ttft = 1000 * np.mean([q.first_token_time - s for s, q in runs])  # from the client's send
    tpot = 1000 * np.mean([(q.last_token_time - q.first_token_time) / (q.num_output_tokens - 1) for _, q in runs])
    assert accuracy.simulate(r, deployment) == pytest.approx((ttft, tpot), rel=1e-12)


def test_the_api_server_micro_batches_and_tokenizes_before_the_engine_sees_a_request():
    front = accuracy.FrontEnd(window=0.002)
    encode = accuracy.FrontEnd.encode_seconds
    front.send(1.0, 1024, "a")  # alone: waits out the window, then is encoded
    assert front.next_time() == pytest.approx(1.002)
    assert front.advance(1.002) == []
    assert front.next_time() == pytest.approx(1.002 + encode(1024))
    front.send(1.003, 8192, "b")  # arrives while "a" is encoded: its batch starts when that ends
    assert front.advance(1.002 + encode(1024)) == ["a"]
    front.advance(1.004 + encode(1024))
    assert front.next_time() == pytest.approx(1.004 + encode(1024) + encode(8192))
    burst = accuracy.FrontEnd(window=0.002)
    for i in range(40):  # 32 per batch, a batch as long as its longest prompt (the tokenizer spreads it over cores)
        burst.send(0.0, 1024, i)
    assert burst.advance(encode(1024)) == list(range(32))
    assert burst.advance(1.0) == list(range(32, 40))
    assert burst.deliveries == [] and encode(8192) > 8 * encode(1024)  # measured: the cost per token grows


def test_the_micro_batch_window_belongs_to_the_vllm_versions_that_had_it():
    assert accuracy.front_end_for(row(backend_version="0.18.0")).window == 0.002
    assert accuracy.front_end_for(row(backend_version="")).window == 0.002  # the 0.1x campaigns
    assert accuracy.front_end_for(row(backend_version="0.9.2")).window == 0.0
    assert accuracy.front_end_for(row(backend_version="0.33.0")).window == 0.0


def test_experts_vllm_cannot_split_over_tensor_parallelism_ran_with_expert_parallelism():
    minimax = accuracy.load_model("MiniMaxAI/MiniMax-M2.5")  # 1536-wide FP8 experts in 128-blocks
    assert accuracy.expert_split(row(tp_size="8", moe_tp_size="8"), minimax) == (1, 8)  # 192 per rank: refused
    assert accuracy.expert_split(row(tp_size="4", moe_tp_size="4"), minimax) == (4, 1)  # 384 = 3 blocks
    args = accuracy.engine_args_for(row(tp_size="8", moe_tp_size="8"), minimax, accuracy.PROTOCOLS["inferencex"])
    assert args.enable_expert_parallel and args.data_parallel_size == 1
    gpt_oss = accuracy.load_model("openai/gpt-oss-120b")  # not block-quantised
    assert accuracy.expert_split(row(tp_size="8", moe_tp_size="8"), gpt_oss) == (8, 1)


def test_report_writes_one_object_per_row(tmp_path):
    path = tmp_path / "points.csv"
    rows = [row(id="a", isl="128", osl="16"), row(id="b", model_path="moonshotai/Kimi-K2.5",
                                                  gemm_quant_mode="int4_wo")]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "out.json"
    assert accuracy.main([str(path), "--json", str(out)]) == 0
    objects = json.loads(out.read_text())
    assert [o["id"] for o in objects] == ["a", "b"]
    assert set(objects[0]) == {"id", "model", "system", "supported", "reason", "ttft_ms_real", "ttft_ms_pred",
                               "tpot_ms_real", "tpot_ms_pred"}
    assert objects[0]["supported"] and objects[0]["ttft_ms_pred"] > 0 and objects[0]["tpot_ms_pred"] > 0
    assert not objects[1]["supported"] and "INT4" in objects[1]["reason"] and objects[1]["ttft_ms_pred"] is None
