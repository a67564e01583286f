"""`replay` takes --disable-hybrid-kv-cache-manager / --enable-hybrid-kv-cache-manager as `serve` does (the shared
engine flags, emulator.engine_flags): a gpt-oss deployment keeps one KV cache group or vLLM's hybrid groups, and a
cluster's instances start from the flag."""
from __future__ import annotations

from loadgen.replay import load_target, normalize_argv
from vllm_emulator.cli import build_parser


def replay_target(*argv: str):
    parser = build_parser("replay")
    args = parser.parse_args(normalize_argv(["trace.jsonl", "-o", "out", "--model", "openai/gpt-oss-120b",
                                             "--hardware", "H100", *argv], parser))
    return args, load_target(args)[0]


def test_replay_takes_the_hybrid_kv_cache_manager_flags():
    args, deployment = replay_target()
    assert args.disable_hybrid_kv_cache_manager is None and deployment.memory.groups.kinds == ("sliding", "full")
    args, deployment = replay_target("--disable-hybrid-kv-cache-manager")
    assert deployment.config.disable_hybrid_kv_cache_manager is True and deployment.memory.groups is None
    args, deployment = replay_target("--enable-hybrid-kv-cache-manager")
    assert deployment.config.disable_hybrid_kv_cache_manager is False
    assert deployment.memory.groups.kinds == ("sliding", "full")
