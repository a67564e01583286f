"""Wall time of offline replays, whole process (interpreter start-up included), as medians against floors.

    python bench/replay_speed.py [--repeat 5] [--only CASE ...] [--baseline DIR]

Cases: the 300-request ShareGPT workload of the RTX 4090 calibration run; the Azure 2023 conversation
trace (19,366 requests, one hour) on one H100 (the serving default) and on an RTX PRO 6000; the Azure 2023
code trace on Llama-3.1-70B over 4 A100s (-tp 4), overloaded: queues hours long. `--baseline DIR` runs a
checkout of another commit interleaved with this one (bench/replay_timing.py says how runs are timed).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from replay_timing import ROOT, core, load_average, measure, report

TRACES = ROOT.parent / "shared" / "data" / "traces"
AZURE_CONV = str(TRACES / "azure2023/AzureLLMInferenceTrace_conv.csv")
# name: (replay arguments, floor in seconds or None)
CASES = {
    "sharegpt": ([str(TRACES / "sharegpt/sharegpt-llama-3.1-8b-300-sps10.jsonl"), "--model", "meta-llama/Llama-3.1-8B",
                  "--hardware", "RTX4090", "--max-num-seqs", "256", "--max-num-batched-tokens", "2048",
                  "--max-model-len", "32768", "--gpu-memory-utilization", "0.9"], 0.3),
    "azure_h100": ([AZURE_CONV, "--model", "meta-llama/Llama-3.1-8B", "--hardware", "H100"], 5.0),
    "azure": ([AZURE_CONV, "--model", "meta-llama/Llama-3.1-8B", "--hardware", "RTXPRO6000"], None),
    "code_70b_tp4": ([str(TRACES / "azure2023/AzureLLMInferenceTrace_code.csv"), "--model", "meta-llama/Llama-3.1-70B",
                      "--hardware", "A100", "-tp", "4"], 6.0),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", choices=sorted(CASES), action="append")
    parser.add_argument("--baseline", type=Path, default=None, help="a checkout of another commit, run interleaved")
    args = parser.parse_args()
    trees = [ROOT] + ([args.baseline.resolve()] if args.baseline else [])
    print(f"start: {load_average()}")
    for tree in trees:
        print(f"{tree}: {core(tree)}")
    for name, (replay_args, floor) in CASES.items():
        if args.only and name not in args.only:
            continue
        print(report(name, measure(replay_args, args.repeat, trees), floor), flush=True)
    print(f"end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
