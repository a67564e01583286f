"""`vllm serve` command lines as vLLM's parser reads them: --config FILE, snake_case names, -O3, dotted JSON keys."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import urllib.request

import pytest

from server.serve import normalize_argv
from server.testing import server_process
from server.vllm_argv import human_readable_int, normalize_argv as rewrite
from vllm_emulator.cli import build_parser


def parse(*argv: str):
    parser = build_parser("serve")
    return parser.parse_args(normalize_argv(list(argv), parser))


def test_snake_case_names_and_optimization_levels_are_vllms_spellings():
    args = parse("--max_num_seqs", "8", "--max_model_len=4096", "--enable_prefix_caching")
    assert (args.max_num_seqs, args.max_model_len, args.enable_prefix_caching) == (8, 4096, True)
    parser = build_parser("serve")
    for spelled in (["-O3"], ["-O=3"], ["-O", "3"]):
        assert rewrite(spelled, set()) == ["--optimization-level", "3"]
        parser.parse_args(normalize_argv(spelled, parser))  # accepted


def test_dotted_keys_build_one_json_value_per_flag(caplog):
    args = parse("--kv-transfer-config.kv_connector", "NixlConnector", "--kv-transfer-config.kv_role=kv_both",
                 "--kv-transfer-config.kv_connector_extra_config.backends+", "UCX,LIBFABRIC",
                 "--kv-transfer-config.kv_buffer_size", "1K")
    assert json.loads(args.kv_transfer_config) == {
        "kv_connector": "NixlConnector", "kv_role": "kv_both",
        "kv_connector_extra_config": {"backends": ["UCX", "LIBFABRIC"]}, "kv_buffer_size": 1024}
    rewrite(["--kv-transfer-config.kv_role", "kv_both", "--kv-transfer-config.kv_role", "kv_producer"], set())
    assert "Found duplicate keys --kv-transfer-config.kv_role" in caplog.text
    # values that merely hold a dot, and negative numbers, are not dotted flags
    assert rewrite(["--served-model-name", "my.model", "--temperature=-0.5"], set()) == \
        ["--served-model-name", "my.model", "--temperature=-0.5"]


def test_a_config_file_gives_flags_the_command_line_overrides(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("max-num-seqs: 16\nmax_model_len: 8192\nasync-scheduling: false\nenable-prefix-caching: false\n"
                      "served-model-name: [a, b]\n"
                      "kv-transfer-config: {kv_connector: NixlConnector, kv_role: kv_both}\n")
    args = parse("meta-llama/Llama-3.1-8B", "--config", str(config), "--max-num-seqs", "4")
    assert args.model_tag == "meta-llama/Llama-3.1-8B" and args.max_num_seqs == 4 and args.max_model_len == 8192
    assert args.async_scheduling is False and args.served_model_name == ["a", "b"]
    assert args.enable_prefix_caching is False  # false: vLLM's hidden --no-enable-prefix-caching
    assert json.loads(args.kv_transfer_config) == {"kv_connector": "NixlConnector", "kv_role": "kv_both"}


@pytest.mark.parametrize("argv, message", [
    (["--config", "x.json"], "Config file must be of a yaml/yml type. json supplied"),
    (["--config"], "No config file specified!"),
    (["--config", "a.yaml", "--config", "b.yaml"], "More than one config file specified!"),
    (["--config", "/nonexistent/c.yaml"], "Unable to read the config file at /nonexistent/c.yaml"),
])
def test_bad_config_files_are_refused_with_vllms_words(argv, message):
    done = subprocess.run([sys.executable, "-m", "vllm_emulator", "serve", *argv], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and message in done.stderr


def test_human_readable_integers():
    assert [human_readable_int(v) for v in ("1k", "1K", "25.6k", "42", "2M")] == [1000, 1024, 25600, 42, 2 << 20]
    with pytest.raises(argparse.ArgumentTypeError, match="Decimals are not allowed"):
        human_readable_int("1.5K")


def test_the_server_starts_from_a_vllm_config_file(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("served_model_name: from-config\nmax-model-len: 4096\n")
    with server_process("--config", str(config), "--max_num_seqs", "4") as url:
        with urllib.request.urlopen(url + "/v1/models") as resp:
            model = json.loads(resp.read())["data"][0]
    assert model["id"] == "from-config" and model["max_model_len"] == 4096
