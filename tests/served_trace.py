"""The requests a server logged, as a trace an offline replay reads (LLMServingSim's JSONL with token ids):
the same arrivals, prompts and outputs, so serve and replay can be compared request by request."""
from __future__ import annotations

import json
from pathlib import Path


def write_served_trace(path: Path, served: list[dict], workload: list[dict], outputs: dict[str, list[int]]) -> Path:
    """`served`: the server's request log; `workload`: what was sent ({"id", "prompt", "max_tokens"});
    `outputs`: each sent id's output token ids."""
    by_id = {f"cmpl-{w['id']}-0": w for w in workload}
    with path.open("w") as f:
        for r in sorted(served, key=lambda r: r["arrival_time"]):
            item = by_id[r["request_id"]]
            f.write(json.dumps({"request_id": r["request_id"], "arrival_time_ns": round(r["arrival_time"] * 1e9),
                                "input_toks": len(item["prompt"]), "output_toks": item["max_tokens"],
                                "input_tok_ids": item["prompt"], "output_tok_ids": outputs[item["id"]]}) + "\n")
    return path
