"""`vllm-emulator serve`'s command line read as vLLM 0.33's: hidden switch spellings, the positional model,
start-up checks, logging levels, help, and the top-level command's errors."""
from __future__ import annotations

import json
import logging
import urllib.request

import pytest

from emulator.config import ConfigError
from profiles.tokenizer import load_tokenizer
from server.serve import configure_logging, load_target, normalize_argv, resolve_defaults
from server.serving import SIMULATED_VLLM_FLAGS, frontend_switches
from server.testing import server_process
from vllm_emulator.cli import build_parser, main, version


def parse(*argv: str):
    parser = build_parser("serve")
    return parser.parse_args(normalize_argv(list(argv), parser))


def test_vllms_hidden_no_enable_spellings_turn_a_switch_off():
    assert parse("--no-enable-prefix-caching").enable_prefix_caching is False
    assert parse("--no-enable-chunked-prefill").enable_chunked_prefill is False
    assert parse("--enforce-eager", "--no-enforce-eager").enforce_eager is False
    assert parse("--no-disable-fastapi-docs").fastapi_docs is True  # vLLM's field is disable_fastapi_docs
    assert parse("--enable-offline-docs", "--no-enable-offline-docs").offline_docs is False
    # a switch read from the flags accepted as vLLM's: the hidden spelling means its --disable- twin
    args = parse("--enable-auto-tool-choice", "--no-enable-auto-tool-choice", "--tool-call-parser", "hermes")
    assert frontend_switches(args)["enable_auto_tools"] is False


def test_vllm_has_no_no_disable_spelling_for_an_enable_field():
    with pytest.raises(SystemExit):  # vLLM: "unrecognized arguments: --no-disable-prefix-caching"
        parse("--no-disable-prefix-caching")


def test_a_config_files_false_turns_a_switch_off(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("enable-prefix-caching: false\nenable-chunked-prefill: false\nmax-num-batched-tokens: 2048\n")
    args = parse("--config", str(config))
    assert (args.enable_prefix_caching, args.enable_chunked_prefill) == (False, False)
    with pytest.raises(ConfigError, match=r"max_num_batched_tokens \(2048\) is smaller than max_model_len \(131072\)"):
        load_target(args)


def test_the_positional_model_wins_over_a_config_files_model(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: Qwen/Qwen3-8B\n")
    assert resolve_defaults(parse("meta-llama/Llama-3.1-8B", "--config", str(config))) == "meta-llama/Llama-3.1-8B"
    assert resolve_defaults(parse("--config", str(config))) == "Qwen/Qwen3-8B"


def test_model_option_becomes_the_positional_model_as_vllm_moves_it(caplog):
    args = parse("--port", "0", "--model=Qwen/Qwen3-8B")
    assert args.model_tag == "Qwen/Qwen3-8B" and resolve_defaults(args) == "Qwen/Qwen3-8B"
    assert "you should provide the model as a positional argument" in caplog.text
    with pytest.raises(SystemExit):  # vLLM 0.33: "unrecognized arguments: A"
        parse("A", "--model", "B")


def test_long_prefill_threshold_above_max_model_len_is_vllms_error():
    with pytest.raises(ConfigError, match=r"^long_prefill_token_threshold \(200000\) cannot be greater than the "
                                          r"max_model_len \(131072\)\.$"):
        load_target(parse("--long-prefill-token-threshold", "200000"))
    load_target(parse("--long-prefill-token-threshold", "4096"))


@pytest.fixture
def logging_restored():
    names = ("vllm", "vllm_emulator", "uvicorn.access")
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_log_levels_are_vllms_and_uvicorns(monkeypatch, logging_restored):
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "debug")
    undo = configure_logging(parse())  # (each set-up undone after its checks: no handlers left for later tests)
    assert logging.getLogger("vllm.entrypoints.serve.utils.request_logger").isEnabledFor(logging.DEBUG)
    undo()
    # the flag wins over the env
    undo = configure_logging(parse("--log-level", "WARNING", "--uvicorn-log-level", "info"))
    assert not logging.getLogger("vllm_emulator.serve").isEnabledFor(logging.INFO)
    assert logging.getLogger("uvicorn.access").isEnabledFor(logging.INFO)  # uvicorn's, not vLLM's level
    undo()
    undo = configure_logging(parse("--uvicorn-log-level", "warning"))
    assert not logging.getLogger("uvicorn.access").isEnabledFor(logging.INFO)
    undo()
    with pytest.raises(SystemExit):
        parse("--log-level", "debug")  # vLLM's choices are upper case
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "LOUD")
    with pytest.raises(ValueError, match="VLLM_LOGGING_LEVEL: unknown level 'LOUD'"):
        configure_logging(parse())


def test_vllm_logging_level_debug_shows_the_request_details(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    log = tmp_path / "serve.log"
    with log.open("w") as f, server_process("--enable-log-requests", "--enable-uvicorn-access-log",
                                            "--uvicorn-log-level", "warning", log=f) as url:
        body = json.dumps({"model": "meta-llama/Llama-3.1-8B", "prompt": "hi", "max_tokens": 1}).encode()
        request = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request) as resp:
            assert resp.status == 200
    text = log.read_text()
    assert "DEBUG" in text and "details: prompt: 'hi', prompt_token_ids: [128000, 6151]" in text
    assert '"POST /v1/completions' not in text  # --uvicorn-log-level warning: no access lines


def help_text(*argv: str, capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main(["serve", *argv])
    assert done.value.code == 0
    return capsys.readouterr().out


def test_help_shows_the_vllm_flags_the_front_end_reads_and_hides_only_the_others(capsys):
    text = help_text("--help", capsys=capsys)
    assert "vLLM flags the front end reads" in text and "they change nothing in the simulation" in text
    for flag in SIMULATED_VLLM_FLAGS:
        assert f"  {flag}" in text
    assert "--trust-remote-code" not in text and "--no-enable-prefix-caching" not in text  # vLLM hides it too


@pytest.mark.parametrize("keyword, present, absent", [
    ("all", ["--trust-remote-code", "--lora-modules", "--hardware", "--max-model-len"], ["--no-enable-auto"]),
    ("ModelConfig", ["ModelConfig:", "--max-model-len", "--trust-remote-code"], ["--lora-modules", "--hardware"]),
    ("emulator", ["--hardware", "--speed"], ["--max-model-len"]),
    ("prefix_caching", ["Arguments matching 'prefix-caching'", "--enable-prefix-caching",
                        "--prefix-caching-hash-algo"], ["--block-size"]),
    ("nothing-like-it", ["No group or arguments matching 'nothing-like-it'.", "'--help=all'"], ["--port"]),
])
def test_help_searches_as_vllms_does(keyword, present, absent, capsys):
    text = help_text(f"--help={keyword}", capsys=capsys)
    assert all(p in text for p in present) and not any(a in text for a in absent)


def test_top_level_command_errors_and_version(capsys):
    assert main(["serv"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: vllm-emulator") and "error: unknown command 'serv'" in err
    assert "did you mean 'serve'?" in err
    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == version() != ""


def test_a_tokenizer_named_by_repo_id_is_the_shipped_one_of_its_family(caplog):
    caplog.set_level(logging.INFO, "vllm_emulator.tokenizer")
    assert load_tokenizer("meta-llama/Llama-3.1-8B-Instruct") is load_tokenizer(None, "llama")
    assert "using the shipped Llama 3 tokenizer" in caplog.text
    assert load_tokenizer("Qwen/Qwen2.5-7B-Instruct") is load_tokenizer(None, "qwen3")
    for spec in ("mistralai/Mixtral-8x7B-v0.1", "/no/such/dir"):
        with pytest.raises(ValueError, match=r"a model id of a family whose tokenizer ships here: Llama 3 \("):
            load_tokenizer(spec)


def test_hardware_show_needs_a_name_and_list_takes_one(capsys):
    assert main(["hardware", "show"]) == 2 and "hardware show needs a device" in capsys.readouterr().err
    assert main(["hardware", "list", "a100-80gb"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 2 and rows[0].startswith("DEVICE") and rows[1].startswith("A100 ")


def test_a_device_file_that_is_not_there_is_no_such_file(capsys):
    assert main(["hardware", "show", "/no/such/device.yaml"]) == 2
    assert "error: no such file: '/no/such/device.yaml'" in capsys.readouterr().err
