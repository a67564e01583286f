"""Replays under OffloadingConnector's eviction_policy (lru, arc) and store_threshold: what each keeps, what it costs.

    python bench/kv_offload_policies.py [--repeat 3] [--markdown]

Llama-3.1-8B on an H100 whose CPU tier (cpu_bytes_to_use) is small beside the prompts, each trace replayed
with the tier's eviction_policy lru, arc, and lru with store_threshold 2:

- scan+hot (written here, Mooncake format): four hot 2,048-token prefixes asked twice early (the second time
  from the CPU tier, the GPU having lost them) and then once a round, each round a scan of ten one-off
  4,096-token prompts that outgrows the CPU tier; one request every 2 s. 1,000 GPU blocks, a 5 GiB tier.
- mooncake3k: the first 3,000 Mooncake conversation requests (../shared/data/traces/mooncake) on the H100's
  own KV blocks (the trace asks more than one H100 serves: TTFT is mostly queueing), skipping prompts over
  131,072 tokens; a 16 GiB tier.

Per run: the prompt tokens loaded from the CPU tier (of every request, and of the hot requests after the
first two rounds), the blocks stored to it, mean TTFT, and the replay's wall seconds (median of
--repeat, the other numbers being the same every time).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MOONCAKE = ROOT.parent / "shared" / "data" / "traces" / "mooncake" / "conversation_trace.jsonl"
GIB = 2 ** 30
POLICIES = {"lru": {}, "arc": {"eviction_policy": "arc"}, "lru, store_threshold 2": {"store_threshold": 2}}


def scan_and_hot(path: Path) -> None:
    """The scan+hot trace, Mooncake format (hash_ids of 512-token blocks)."""
    hot = [[4 * h + i for i in range(4)] for h in range(4)]
    kinds = ["hot"] * 4 + ["scan"] * 6 + ["hot"] * 4
    for _ in range(20):
        kinds += ["scan"] * 10 + ["hot"] * 4
    fresh, lines, n_hot = 1000, [], 0
    for n, kind in enumerate(kinds):
        if kind == "hot":
            ids, n_hot = hot[n_hot % 4] + [fresh], n_hot + 1
        else:
            ids = list(range(fresh, fresh + 8))
        fresh += len(ids)
        lines.append(json.dumps({"timestamp": 2000 * n, "input_length": 512 * len(ids), "output_length": 4,
                                 "hash_ids": ids, "kind": kind}))
    path.write_text("\n".join(lines) + "\n")


def replay(trace: Path, args: list[str], extra: dict, out: Path) -> float:
    config = {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
              "kv_connector_extra_config": extra}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vllm_emulator", "replay", str(trace), "--model", "meta-llama/Llama-3.1-8B",
                    "--hardware", "H100", *args, "--kv-transfer-config", json.dumps(config), "-o", str(out)],
                   cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start


def measure(trace: Path, args: list[str], cpu_bytes: int, extra: dict, repeat: int, hot: set[str] | None) -> dict:
    walls = []
    with tempfile.TemporaryDirectory() as out:
        for _ in range(repeat):
            walls.append(replay(trace, args, {"cpu_bytes_to_use": cpu_bytes, **extra}, Path(out)))
        requests = [json.loads(line) for line in (Path(out) / "requests.jsonl").open()]
        summary = json.loads((Path(out) / "summary.json").read_text())
    cpu = summary["kv_tiers"]["by_tier"]["cpu"]
    late_hot = [r for r in requests if hot is not None and r["request_id"] in hot]
    return {"loaded": sum(r["external_tokens"] for r in requests),
            "hot_loaded": sum(r["external_tokens"] for r in late_hot) if hot is not None else None,
            "hot_ttft": statistics.mean(r["ttft"] for r in late_hot) if late_hot else None,
            "stored": cpu["stored_blocks"], "ttft": statistics.mean(r["ttft"] for r in requests),
            "wall": statistics.median(walls)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        scan = Path(tmp) / "scan_hot.jsonl"
        scan_and_hot(scan)
        kinds = [json.loads(line)["kind"] for line in scan.open()]
        hot = {f"req-{n}" for n, kind in enumerate(kinds) if kind == "hot" and n >= 14}
        head = Path(tmp) / "mooncake3k.jsonl"
        with MOONCAKE.open() as f:
            head.write_text("".join(next(f) for _ in range(3000)))
        traces = [("scan+hot", scan, ["--num-gpu-blocks-override", "1000", "--max-model-len", "8192"], 5 * GIB, hot),
                  ("mooncake3k", head, ["--max-model-len", "131072", "--skip-invalid"], 16 * GIB, None)]
        for name, trace, replay_args, cpu_bytes, hot_ids in traces:
            for policy, extra in POLICIES.items():
                row = {"trace": name, "policy": policy,
                       **measure(trace, replay_args, cpu_bytes, extra, args.repeat, hot_ids)}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    header = ["trace", "CPU tier", "tokens loaded", "late hot tokens loaded", "late hot TTFT ms",
              "blocks stored", "mean TTFT ms", "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] if args.markdown else []
    for r in rows:
        cells = [r["trace"], r["policy"], f"{r['loaded']:,}",
                 "-" if r["hot_loaded"] is None else f"{r['hot_loaded']:,}",
                 "-" if r["hot_ttft"] is None else f"{r['hot_ttft'] * 1e3:.1f}", f"{r['stored']:,}",
                 f"{r['ttft'] * 1e3:.1f}", f"{r['wall']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |" if args.markdown else "  ".join(f"{c:>14}" for c in cells))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
