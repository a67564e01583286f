"""Behaviour fingerprints of the simulation: run a fixed set of replays and hash what they write, so a
change meant to be behaviour-neutral (a speed-up, a re-layout) can be shown byte-identical.

    python bench/replay_digests.py [--baseline DIR] [--only NAME ...]

Cases: the RTX 4090 calibration replay, the Azure conversation trace on an H100, Qwen3-30B-A3B DP 2 + EP
on an RTX PRO 6000, 70B TP 4 on A100s (the Azure code trace), the first 3,000 Azure conversation requests
on five clusters (8 H100s, 4P+4D with CPU and CXL offloading, 8 instances of 4 device types, the two
shipped examples) and on two instances short of KV blocks, and 3,000 Mooncake conversations with CPU
offloading. Hashed: requests.jsonl, the step log, timeseries.csv and summary.json without its wall-clock
fields. With `--baseline DIR` (a checkout of another commit: `git worktree add /tmp/base COMMIT`) the same
cases run there too and every digest is compared; the exit status is 1 if any differs. `--ignore-field KEY`
leaves a summary.json key out of both trees' digests (one a change adds on purpose, such as a new engine setting).

An output that differs is also compared up to what the simulation leaves free: the order in which
engines' records interleave (requests sorted by id, steps by engine and number) and the last bits of float
sums taken in another order (per-request energy sums a step's share either step by step or with its decode
run): "equivalent" there means the same records with every number within a relative 1e-9 of the other, or
within one unit of the last decimal printed (a value rounded for output, such as a power in W to 3 decimals).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT.parent / "shared" / "data" / "traces"
AZURE_CONV = TRACES / "azure2023" / "AzureLLMInferenceTrace_conv.csv"
CLUSTERS = ROOT / "bench" / "clusters"
H100_8B = ["--model", "meta-llama/Llama-3.1-8B", "--hardware", "H100"]


def cases(head: Path) -> dict[str, list[str]]:
    """name: replay arguments (`head`: a folder holding the first lines of the long traces)."""
    azure3k, mooncake3k = str(head / "azure3k.csv"), str(head / "mooncake3k.jsonl")
    return {
        "rtx4090": [str(TRACES / "sharegpt" / "sharegpt-llama-3.1-8b-300-sps10.jsonl"), "--model",
                    "meta-llama/Llama-3.1-8B", "--hardware", "RTX4090", "--max-num-seqs", "256",
                    "--max-num-batched-tokens", "2048", "--max-model-len", "32768", "--gpu-memory-utilization", "0.9"],
        "azure_h100": [str(AZURE_CONV), *H100_8B],
        "moe_dp2_ep": [str(TRACES / "sharegpt" / "sharegpt-qwen3-30b-a3b-300-sps10.jsonl"), "--model",
                       "Qwen/Qwen3-30B-A3B-Instruct-2507", "--hardware", "RTXPRO6000", "-dp", "2",
                       "--enable-expert-parallel", "--max-model-len", "32768"],
        "70b_tp4": [str(TRACES / "azure2023" / "AzureLLMInferenceTrace_code.csv"), "--model",
                    "meta-llama/Llama-3.1-70B", "--hardware", "A100", "-tp", "4"],
        **{f"cluster_{path.stem}": [azure3k, "--cluster", str(path)] for path in (
            CLUSTERS / "azure-8-h100.yaml", CLUSTERS / "azure-4p4d-h100.yaml", CLUSTERS / "azure-8-heterogeneous.yaml",
            ROOT / "deploy" / "clusters" / "heterogeneous.yaml", ROOT / "deploy" / "clusters" / "pd.yaml")},
        "tight_kv": [azure3k, "--cluster", str(CLUSTERS / "azure-2-tight-kv.yaml"), "--skip-invalid"],
        "mooncake_offload": [mooncake3k, *H100_8B, "--kv-offloading-size", "64"],
    }


def _stripped(summary: dict, ignored: frozenset[str] = frozenset()) -> object:
    """The summary without its wall-clock fields and the `ignored` ones (at any depth)."""
    if isinstance(summary, dict):
        return {k: _stripped(v, ignored) for k, v in summary.items() if "wall" not in k and k not in ignored}
    if isinstance(summary, list):
        return [_stripped(v, ignored) for v in summary]
    return summary


_NUMBER = re.compile(r"-?\d+(?:\.(\d+))?(?:e-?\d+)?")


def _in_order(name: str, data: bytes) -> str:
    """The output with records in a fixed order (requests by id, steps by engine and number)."""
    text = data.decode()
    if name.endswith(".jsonl"):
        records = [json.loads(line) for line in text.splitlines()]
        key = (lambda r: r["request_id"]) if name == "requests.jsonl" else (lambda r: (r.get("engine", 0), r["step"]))
        text = "\n".join(json.dumps(r, sort_keys=True) for r in sorted(records, key=key))
    return text


def equivalent(a: str, b: str) -> bool:
    """The same text but for numbers within a relative 1e-9, or one unit of the last decimal printed."""
    if _NUMBER.sub("#", a) != _NUMBER.sub("#", b):
        return False
    for x, y in zip(_NUMBER.finditer(a), _NUMBER.finditer(b)):
        u, v = float(x.group()), float(y.group())
        unit = 10.0 ** -max(len(x.group(1) or ""), len(y.group(1) or ""))
        if u != v and abs(u - v) > max(1e-9 * max(abs(u), abs(v)), unit * 1.000001):
            return False
    return True


def digests(tree: Path, name: str, args: list[str],
            ignored: frozenset[str] = frozenset()) -> dict[str, tuple[str, str]]:
    """sha256 of each output of one replay run from `tree`, and the output in a fixed record order."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    with tempfile.TemporaryDirectory() as out:
        out_dir = Path(out)
        subprocess.run([sys.executable, "-m", "vllm_emulator", "replay", *args, "-o", out,
                        "--step-log", str(out_dir / "steps.jsonl")], cwd=tree, env=env, check=True,
                       capture_output=True)
        files = {f: (out_dir / f).read_bytes() for f in ("requests.jsonl", "steps.jsonl", "timeseries.csv")}
        summary = json.loads((out_dir / "summary.json").read_text())
        files["summary.json"] = json.dumps(_stripped(summary, ignored), sort_keys=True).encode()
        return {f"{name}/{f}": (_sha(data), _in_order(f, data)) for f, data in files.items()}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, default=None, help="a checkout of another commit to compare with")
    parser.add_argument("--only", action="append", default=None, help="run only these cases")
    parser.add_argument("--ignore-field", action="append", default=[], metavar="KEY",
                        help="leave this summary.json key out of both trees' digests (a field a change adds)")
    args = parser.parse_args()
    ignored = frozenset(args.ignore_field)
    with tempfile.TemporaryDirectory() as head:
        head = Path(head)
        with AZURE_CONV.open() as f:
            (head / "azure3k.csv").write_text("".join(next(f) for _ in range(3001)))
        with (TRACES / "mooncake" / "conversation_trace.jsonl").open() as f:
            (head / "mooncake3k.jsonl").write_text("".join(next(f) for _ in range(3000)))
        differ = inequivalent = 0
        for name, replay_args in cases(head).items():
            if args.only and name not in args.only:
                continue
            mine = digests(ROOT, name, replay_args, ignored)
            base = digests(args.baseline.resolve(), name, replay_args, ignored) if args.baseline else {}
            for key, (digest, ordered) in mine.items():
                verdict = ""
                if base:
                    if base[key][0] == digest:
                        verdict = "  same"
                    elif equivalent(base[key][1], ordered):
                        verdict = f"  equivalent (base {base[key][0]})"
                    else:
                        verdict = f"  DIFFERS (base {base[key][0]})"
                        inequivalent += 1
                    differ += base[key][0] != digest
                print(f"{digest}  {key}{verdict}", flush=True)
    if args.baseline:
        print("identical" if not differ else f"{differ} outputs differ, {inequivalent} of them beyond equivalence")
    return 1 if inequivalent else 0


if __name__ == "__main__":
    sys.exit(main())
