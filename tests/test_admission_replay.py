"""vLLM's front-end queue bounds (--max-num-queued-reqs, --max-num-queued-tokens) offline: a request that
arrives while its instance is at a bound is refused as vLLM's API server refuses it (a 503 with its
message), recorded as failed with that error; a cluster's router passes over an instance that refuses."""
from __future__ import annotations

import json
from pathlib import Path

from vllm_emulator.cli import main

BURST = "arrived_at,num_prefill_tokens,num_decode_tokens\n" + "".join(
    f"{0.01 * i:.2f},{500 + 10 * i},{100}\n" for i in range(40))  # 40 requests in 0.4 s, each ~1 s long
BUSY = "The engine is currently busy and cannot accept new requests. Please try again later or on a different instance."
BACKLOG = "The engine has reached its prefill token backlog limit. Please try again later or on a different instance."


def _replay(tmp_path: Path, *argv: str) -> tuple[list[dict], dict]:
    trace = tmp_path / "burst.csv"
    trace.write_text(BURST)
    out = tmp_path / "out"
    assert main(["replay", str(trace), "--model", "meta-llama/Llama-3.1-8B", *argv, "-o", str(out)]) == 0
    records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    return records, json.loads((out / "summary.json").read_text())


def _unfinished_at(records: list[dict], t: float) -> list[dict]:
    return [r for r in records if "error" not in r and r["arrival_time"] < t < r["finish_time"]]


def test_a_request_past_max_num_queued_reqs_is_refused_with_vllms_503(tmp_path):
    records, summary = _replay(tmp_path, "--hardware", "H100", "--max-num-queued-reqs", "6")
    refused = [r for r in records if "error" in r]
    assert refused and summary["num_rejected"] == len(refused) == summary["num_failed"]
    assert summary["num_finished"] == 40 - len(refused)
    for r in refused:
        assert r["error"] == BUSY and r["finish_reason"] == "error" and r["output_tokens"] == 0
        assert len(_unfinished_at(records, r["arrival_time"])) == 6  # refused exactly when 6 were in
    for r in records:
        if "error" not in r:
            assert len(_unfinished_at(records, r["arrival_time"])) < 6


def test_max_num_queued_tokens_bounds_the_prompt_tokens_awaiting_their_first_token(tmp_path):
    records, summary = _replay(tmp_path, "--hardware", "A100", "--max-num-queued-tokens", "1500")
    refused = [r for r in records if "error" in r]
    assert refused and all(r["error"] == BACKLOG for r in refused) and summary["num_rejected"] == len(refused)

    def backlog(t: float) -> int:
        return sum(r["input_tokens"] for r in _unfinished_at(records, t) if r["first_token_time"] > t)

    assert all(backlog(r["arrival_time"]) >= 1500 for r in refused)
    assert all(backlog(r["arrival_time"]) < 1500 for r in records if "error" not in r)


def test_without_a_bound_nothing_is_refused(tmp_path):
    records, summary = _replay(tmp_path, "--hardware", "H100")
    assert summary["num_rejected"] == 0 and summary["num_finished"] == 40
    assert not any("error" in r for r in records)


def test_a_cluster_router_passes_over_an_instance_at_its_bound(tmp_path):
    cluster = tmp_path / "bounded.yaml"
    cluster.write_text("routing: round_robin\ninstances:\n"
                       "  - {name: small, model: meta-llama/Llama-3.1-8B, hardware: H100, max-num-queued-reqs: 2}\n"
                       "  - {name: large, model: meta-llama/Llama-3.1-8B, hardware: H100, max-num-queued-reqs: 6}\n")
    trace = tmp_path / "burst.csv"
    trace.write_text(BURST)
    out = tmp_path / "out"
    assert main(["replay", str(trace), "--cluster", str(cluster), "-o", str(out)]) == 0
    records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    refused = [r for r in records if "error" in r]
    assert refused and all(r["error"] == BUSY for r in refused)
    on = {0: [r for r in records if "error" not in r and r["engine"] == 0],
          1: [r for r in records if "error" not in r and r["engine"] == 1]}
    # round robin alone would split them evenly; the bounds cap each instance, and a request is refused
    # only when both are full
    for r in refused:
        assert len(_unfinished_at(on[0], r["arrival_time"])) == 2
        assert len(_unfinished_at(on[1], r["arrival_time"])) == 6
    for engine, bound in ((0, 2), (1, 6)):
        assert all(len(_unfinished_at(on[engine], r["arrival_time"])) < bound for r in on[engine])
