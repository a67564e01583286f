"""Number suffixes read as vLLM 0.33 reads them (vllm/utils/argparse_utils.py human_readable_int): k/m/g/t are
powers of 1000, K/M/G/T powers of 1024, decimals only with the lower-case ones; on every flag vLLM types with it
(--max-model-len, --max-num-batched-tokens, --max-num-scheduled-tokens, --kv-cache-memory-bytes,
--max-num-queued-tokens, --safetensors-prefetch-block-size) and in dotted JSON keys."""
from __future__ import annotations

import argparse

import pytest

from emulator.engine_flags import human_readable_int, human_readable_int_or_auto
from server.serve import load_target, normalize_argv
from server.vllm_flags import UNSUPPORTED_PREFIX
from vllm_emulator.cli import build_parser


def parse(*argv: str):
    parser = build_parser("serve")
    return parser.parse_args(normalize_argv(list(argv), parser))


@pytest.mark.parametrize("text, value", [("1k", 1000), ("1K", 1024), ("25.6k", 25600), ("32K", 32768),
                                         ("2m", 2_000_000), ("2M", 2 * 2**20), ("20G", 20 * 2**30),
                                         ("1g", 10**9), ("1T", 2**40), ("1t", 10**12), (" 42 ", 42)])
def test_lower_case_is_decimal_and_upper_case_binary(text, value):
    assert human_readable_int(text) == value


def test_decimals_with_a_binary_suffix_are_refused_with_vllms_hint():
    with pytest.raises(argparse.ArgumentTypeError, match=r"^Decimals are not allowed with binary suffixes like K\. "
                                                         r"Did you mean to use 1\.5k instead\?$"):
        human_readable_int("1.5K")
    for text in ("1.5", "abc", "1kb", "k"):
        with pytest.raises(ValueError):
            human_readable_int(text)
    assert human_readable_int_or_auto("auto") == human_readable_int_or_auto("AUTO") == human_readable_int_or_auto("-1")
    assert human_readable_int_or_auto("-1") == -1


def test_the_serve_flags_read_suffixes_as_vllm():
    args = parse("--max-model-len", "32K", "--kv-cache-memory-bytes", "20G", "--max-num-queued-tokens", "1k",
                 "--max-num-batched-tokens", "8K", "--max-num-scheduled-tokens", "2K",
                 "--safetensors-prefetch-block-size", "16M")
    assert args.max_model_len == 32768
    assert args.kv_cache_memory_bytes == 20 * 2**30
    assert args.max_num_queued_tokens == 1000
    assert args.max_num_batched_tokens == 8192
    assert getattr(args, UNSUPPORTED_PREFIX + "max_num_scheduled_tokens") == 2048
    assert getattr(args, UNSUPPORTED_PREFIX + "safetensors_prefetch_block_size") == 16 * 2**20
    assert parse("--max-model-len", "auto").max_model_len == -1


def test_the_deployment_gets_the_binary_sizes():
    deployment, _ = load_target(parse("--max-model-len", "32K", "--kv-cache-memory-bytes", "20G"))
    assert deployment.config.max_model_len == 32768
    assert deployment.config.kv_cache_memory_bytes == 20 * 2**30


@pytest.mark.parametrize("flag", ["--max-model-len", "--max-num-batched-tokens", "--kv-cache-memory-bytes",
                                  "--max-num-queued-tokens", "--max-num-scheduled-tokens"])
def test_a_decimal_binary_size_stops_the_command_line_as_vllms_argparse_does(flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(flag, "1.5K")
    assert exit_.value.code == 2
    assert f"argument {flag}: Decimals are not allowed with binary suffixes like K. Did you mean to use 1.5k " \
           "instead?" in capsys.readouterr().err


def test_a_value_that_is_no_number_is_named_by_vllms_type_function(capsys):
    with pytest.raises(SystemExit):
        parse("--max-model-len", "lots")
    assert "argument --max-model-len: invalid human_readable_int_or_auto value: 'lots'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse("--max-num-queued-tokens", "1.5")
    assert "argument --max-num-queued-tokens: invalid human_readable_int value: '1.5'" in capsys.readouterr().err


def test_dotted_json_keys_take_the_same_suffixes():
    parser = build_parser("serve")
    argv = normalize_argv(["--kv-transfer-config.kv_connector", "NixlConnector",
                           "--kv-transfer-config.kv_buffer_size", "2K", "--kv-transfer-config.kv_ip", "1.5K"], parser)
    assert '"kv_buffer_size": 2048' in argv[-1] and '"kv_ip": "1.5K"' in argv[-1]  # vLLM keeps what it cannot read
