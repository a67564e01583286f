"""Routing policies on Mooncake's conversation trace: prefix-cache hits and latency over 4 H100s.

    python bench/cluster_routing.py [--requests N] [--policies round_robin,prefix_aware,...]

Every request of ../shared/data/traces/mooncake/conversation_trace.jsonl (prompts over the
32k context skipped, as vLLM would refuse them) is replayed on four H100 instances of
Llama-3.1-8B behind each routing policy. Mooncake's `hash_ids` become token ids that share
exactly those 512-token prefixes, so a follow-up turn hits the cache only on the instance that
served the turn before it. Printed: the share of prompt tokens served from the prefix cache,
and TTFT/E2E means and p90s.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from emulator.cluster import ClusterSpec  # noqa: E402
from emulator.config import EngineArgs  # noqa: E402
from emulator.instance import InstanceSpec  # noqa: E402
from loadgen.replay import replay  # noqa: E402
from profiles.deployment import build_deployment  # noqa: E402

TRACE = ROOT.parent / "shared" / "data" / "traces" / "mooncake" / "conversation_trace.jsonl"
POLICIES = ("round_robin", "least_loaded", "session_affinity", "prefix_aware")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=0, help="only the first N lines (default: all)")
    parser.add_argument("--policies", default=",".join(POLICIES))
    args = parser.parse_args()
    deployment = build_deployment("meta-llama/Llama-3.1-8B", "H100", EngineArgs(max_model_len=32768))
    with tempfile.TemporaryDirectory() as tmp:
        trace = TRACE
        if args.requests:
            trace = Path(tmp) / "trace.jsonl"
            with TRACE.open() as f:
                trace.write_text("".join(line for _, line in zip(range(args.requests), f)))
        print("| policy | requests | prompt tokens from the cache | TTFT mean | TTFT p90 | E2E mean | wall |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for policy in args.policies.split(","):
            spec = ClusterSpec(tuple(InstanceSpec(f"h100-{i}", deployment, ("llama",)) for i in range(4)), policy)
            out = Path(tmp) / policy
            summary = replay(str(trace), spec, out, skip_invalid=True)
            prompt = sum(json.loads(line)["input_tokens"] for line in (out / "requests.jsonl").open())
            print(f"| {policy} | {summary['num_finished']} | {100 * summary['cached_tokens'] / prompt:.1f} % | "
                  f"{1000 * summary['ttft']['mean']:.0f} ms | {1000 * summary['ttft']['p90']:.0f} ms | "
                  f"{summary['e2e']['mean']:.2f} s | {summary['wall_seconds']:.0f} s |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
