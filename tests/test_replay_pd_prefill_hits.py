"""P/D in replay: the prefix-cache hits of each request's prefill, on its prefill pod, are recorded
(`prefill_cached_tokens` in requests.jsonl, summed in the summary's `kv_transfers`), beside the decode side's
own hits (`cached_tokens`) and the KV it loaded (`external_tokens`). Virtual time only."""
from __future__ import annotations

import json
from pathlib import Path

from loadgen.replay import replay
from profiles.cluster_file import read_cluster_file

BASE = "meta-llama/Llama-3.1-8B"
NIXL = "kv-transfer-config: {kv_connector: NixlConnector, kv_role: kv_"
PD = f"""
engine: {{max-model-len: 8192}}
instances:
  - {{name: prefill, model: {BASE}, hardware: H100, {NIXL}producer}}}}
  - {{name: decode, model: {BASE}, hardware: H100, {NIXL}consumer}}}}
"""


def _replay(tmp_path: Path, cluster_text: str, lines: list[dict]) -> tuple[dict[str, dict], dict]:
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(cluster_text)
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = replay(str(trace), read_cluster_file(cluster)[0], tmp_path / "out")
    records = [json.loads(line) for line in (tmp_path / "out" / "requests.jsonl").read_text().splitlines()]
    return {r["request_id"]: r for r in records}, summary


def _shared_prefix_lines(prefix: int = 512, own: int = 100) -> list[dict]:
    shared = list(range(5000, 5000 + prefix))
    return [{"request_id": f"q{i}", "input_toks": prefix + own, "output_toks": 4, "arrival_time_ns": i * 10 ** 9,
             "input_tok_ids": shared + list(range(10000 * (i + 1), 10000 * (i + 1) + own))} for i in range(3)]


def test_a_pd_requests_prefill_hits_are_recorded_apart_from_its_decode_sides(tmp_path):
    records, summary = _replay(tmp_path, PD, _shared_prefix_lines())
    # the first prefill computes the shared 512 tokens; the next two find them cached on the prefill pod
    assert [records[f"q{i}"]["prefill_cached_tokens"] for i in range(3)] == [0, 512, 512]
    # the decode side loads every prompt token it did not find in its own cache (it caches what it loaded)
    assert all(r["external_tokens"] + r["cached_tokens"] == 612 for r in records.values())
    assert summary["kv_transfers"]["prefill_cached_tokens"] == 1024
    prefill = next(i for i in summary["instances"] if i["name"] == "prefill")
    assert prefill["prefills"] == 3 and prefill["cached_tokens"] == 1024  # its own count, as its vLLM's


def test_without_a_pd_proxy_the_records_have_no_prefill_field(tmp_path):
    records, summary = _replay(tmp_path, f"instances:\n  - {{name: a, model: {BASE}, hardware: H100, count: 2}}\n",
                               _shared_prefix_lines())
    assert all("prefill_cached_tokens" not in r for r in records.values())
    assert "kv_transfers" not in summary
