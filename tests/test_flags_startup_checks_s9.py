"""`serve`'s start-up checks of vLLM 0.33's flags: --performance-mode's three modes, --kv-cache-dtype's values
(vllm/config/cache.py), --dtype's choices, the tool and reasoning parsers (entrypoints/common/cli_args.py
validate_api_server_args; parser/parser_manager.py for a gpt-oss model), VLLM_ALLOW_LONG_MAX_MODEL_LEN
(config/model.py), -O0, and the start-up lines naming the flags that are not simulated."""
from __future__ import annotations

import dataclasses
import logging

import pytest

from emulator.config import KV_CACHE_DTYPES, ConfigError
from emulator.engine_flags import engine_args_from
from profiles.deployment import build_deployment
from server.serve import RESULT_CHANGING_FLAGS, check_parsers, load_target, normalize_argv, not_simulated
from server.serving import SIMULATED_VLLM_FLAGS, frontend_switches
from server.testing import server_process
from server.tool_parsers import PARSERS
from vllm_emulator.cli import build_parser, main


def parse(*argv: str):
    parser = build_parser("serve")
    return parser.parse_args(normalize_argv(list(argv), parser))


def test_performance_mode_interactivity_is_accepted_and_simulated():
    args = parse("--performance-mode", "interactivity")
    deployment, _ = load_target(args)
    balanced, _ = load_target(parse())
    # vLLM's interactivity changes only its CUDA graph capture sizes (config/vllm.py): the batch limits stay
    assert (deployment.config.max_num_seqs, deployment.config.max_num_batched_tokens) == \
        (balanced.config.max_num_seqs, balanced.config.max_num_batched_tokens)
    assert not_simulated(args)[0] == []  # its CUDA graphs of every size to 32 are simulated
    with pytest.raises(SystemExit):
        parse("--performance-mode", "latency")


def test_every_kv_cache_dtype_of_vllm_is_accepted_by_the_command_line():
    assert len(KV_CACHE_DTYPES) == 22 and {"nvfp4", "fp8_inc", "float16", "int8_per_token_head"} <= set(KV_CACHE_DTYPES)
    for dtype in KV_CACHE_DTYPES:
        assert parse("--kv-cache-dtype", dtype).kv_cache_dtype == dtype


@pytest.mark.parametrize("dtype, per_token", [("auto", 2 * 32 * 8 * 128 * 2), ("fp8_inc", 2 * 32 * 8 * 128),
                                              ("fp8_e5m2", 2 * 32 * 8 * 128), ("bfloat16", 2 * 32 * 8 * 128 * 2)])
def test_the_kv_dtypes_vllm_stores_in_one_or_two_bytes_size_the_cache_so(dtype, per_token):
    deployment, _ = load_target(parse("--kv-cache-dtype", dtype))  # Llama-3.1-8B: 32 layers, 8 KV heads of 128
    assert deployment.memory.block_bytes == per_token * 16


def test_a_kv_cache_dtype_vllm_does_not_know_is_refused_with_its_list(capsys):
    with pytest.raises(SystemExit):
        parse("--kv-cache-dtype", "nosuch")
    assert "argument --kv-cache-dtype: Invalid kv_cache_dtype: 'nosuch'. Valid values are: ['auto', 'float16', " \
           "'bfloat16', 'fp8', " in capsys.readouterr().err
    engine_args = dataclasses.replace(engine_args_from(parse()), kv_cache_dtype="nosuch")  # (a cluster's, replay's)
    with pytest.raises(ConfigError, match=r"^Invalid kv_cache_dtype: 'nosuch'\. Valid values are: \['auto', "):
        build_deployment("meta-llama/Llama-3.1-8B", "H100", engine_args)


def test_an_explicit_float_kv_dtype_must_be_the_models_as_vllm_checks():
    with pytest.raises(ConfigError, match=r'^kv_cache_dtype="float16" is incompatible with dtype="bfloat16"\. '
                                          r"Please set `--kv-cache-dtype` to `auto` or `bfloat16`\.$"):
        load_target(parse("--kv-cache-dtype", "float16"))


def test_a_packed_kv_layout_that_is_not_priced_stops_the_start_up_saying_so():
    for dtype in ("octave_k3v4", "octave_k3v3", "octave_k3v3_compact"):  # ROCm's; turboquant/ultraquant are priced
        with pytest.raises(ConfigError, match=f"kv_cache_dtype '{dtype}' is not simulated"):
            load_target(parse("--kv-cache-dtype", dtype))


def test_dtype_takes_vllms_choices_only(capsys):
    assert parse("--dtype", "half")
    with pytest.raises(SystemExit):
        parse("--dtype", "nosuch")
    assert "argument --dtype: invalid choice: 'nosuch' (choose from" in capsys.readouterr().err


def test_an_auto_tool_choice_parser_vllm_does_not_register_is_refused_with_its_list(capsys):
    args = parse("--enable-auto-tool-choice", "--tool-call-parser", "nosuch")
    expected = f"invalid tool call parser: nosuch (chose from {{ {','.join(sorted(PARSERS))} }})"
    with pytest.raises(ValueError) as error:
        frontend_switches(args)
    assert str(error.value) == expected and expected.startswith("invalid tool call parser: nosuch (chose from "
                                                                "{ apertus,beam,")
    assert main(["serve", "--port", "0", "--enable-auto-tool-choice", "--tool-call-parser", "nosuch"]) == 2
    assert expected in capsys.readouterr().err
    # without --enable-auto-tool-choice vLLM does not check it; a plugin may register the name
    frontend_switches(parse("--tool-call-parser", "nosuch"))
    frontend_switches(parse("--enable-auto-tool-choice", "--tool-call-parser", "mine", "--tool-parser-plugin",
                            "mine.py"))


def test_the_reasoning_parser_flags_act_and_serve_help_shows_them(capsys):
    assert {"--reasoning-parser", "--reasoning-parser-plugin"} <= SIMULATED_VLLM_FLAGS
    args = parse("--reasoning-parser", "qwen3")
    assert not_simulated(args) == ([], [])
    with pytest.raises(SystemExit):
        parse("--help")
    out = capsys.readouterr().out
    assert "--reasoning-parser REASONING_PARSER" in out and "--reasoning-parser-plugin" in out


GPT_OSS = ("openai/gpt-oss-120b", "--hardware", "H200", "--max-model-len", "8192")


@pytest.mark.parametrize("flags, text", [
    (("--reasoning-parser", "qwen3"), "--reasoning-parser qwen3 cannot be used with the tokenizer of "
                                      "'openai/gpt-oss-120b': Harmony requires GptOssReasoningParser, got "
                                      "Qwen3ParserReasoningAdapter."),
    (("--enable-auto-tool-choice", "--tool-call-parser", "hermes"),
     "--tool-call-parser hermes cannot be used with the tokenizer of 'openai/gpt-oss-120b': Harmony requires "
     "GptOssToolParser, got hermes."),
])
def test_a_gpt_oss_model_refuses_other_parsers_at_start_up(flags, text, capsys):
    args = parse(*GPT_OSS, *flags)
    with pytest.raises(ValueError) as error:
        check_parsers(args, load_target(args)[0], frontend_switches(args))
    assert str(error.value) == text
    assert main(["serve", *GPT_OSS, "--port", "0", *flags]) == 2
    assert text in capsys.readouterr().err


def test_a_gpt_oss_model_takes_its_own_parsers_and_other_models_any():
    args = parse(*GPT_OSS, "--reasoning-parser", "openai_gptoss", "--enable-auto-tool-choice", "--tool-call-parser",
                 "openai")
    check_parsers(args, load_target(args)[0], frontend_switches(args))
    args = parse(*GPT_OSS, "--tool-call-parser", "hermes")  # not loaded without --enable-auto-tool-choice
    check_parsers(args, load_target(args)[0], frontend_switches(args))
    args = parse("--reasoning-parser", "qwen3")
    check_parsers(args, load_target(args)[0], frontend_switches(args))


def test_a_context_past_the_models_is_refused_with_vllms_whole_message(monkeypatch):
    monkeypatch.delenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", raising=False)
    with pytest.raises(ConfigError) as error:
        load_target(parse("--max-model-len", "256K"))
    assert str(error.value) == (
        "User-specified max_model_len (262144) is greater than the derived max_model_len (max_position_embeddings="
        "131072 or model_max_length=None in model's config.json). To allow overriding this maximum, set the env var "
        "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1. VLLM_ALLOW_LONG_MAX_MODEL_LEN must be used with extreme caution. If the "
        "model uses relative position encoding (RoPE), positions exceeding derived_max_model_len lead to nan. If the "
        "model uses absolute position encoding, positions exceeding derived_max_model_len will cause a CUDA array "
        "out-of-bounds error.")
    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "0")
    with pytest.raises(ConfigError):
        load_target(parse("--max-model-len", "256K"))


@pytest.mark.parametrize("value", ["1", "true", "TRUE"])
def test_vllm_allow_long_max_model_len_turns_the_refusal_into_a_warning(value, monkeypatch, caplog):
    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", value)
    with caplog.at_level(logging.WARNING, logger="vllm_emulator.config"):
        deployment, _ = load_target(parse("--max-model-len", "256K"))
    assert deployment.config.max_model_len == 262144
    assert "User-specified max_model_len (262144) is greater than the derived max_model_len" in caplog.text
    assert "VLLM_ALLOW_LONG_MAX_MODEL_LEN must be used with extreme caution." in caplog.text
    assert "To allow overriding" not in caplog.text


def test_o0_compiles_nothing_as_enforce_eager_does():
    eager, _ = load_target(parse("--enforce-eager"))
    o0, _ = load_target(parse("-O0"))
    default, _ = load_target(parse())
    assert o0.config.enforce_eager and o0.memory.compile_bytes == eager.memory.compile_bytes == 0
    assert default.memory.compile_bytes > 0 and load_target(parse("-O3"))[0].memory.compile_bytes > 0
    assert not_simulated(parse("-O0")) == ([], []) and not_simulated(parse("-O1"))[0] == ["-O1"]
    with pytest.raises(SystemExit):
        parse("-O4")


def test_flags_that_change_results_or_the_transport_are_warned_of_apart():
    args = parse("--quantization", "fp8", "--speculative-config", '{"method": "ngram"}', "--ssl-certfile", "c.pem",
                 "--ssl-keyfile", "k.pem", "--uds", "/tmp/v.sock", "--trust-remote-code", "-cc", "{}")
    differing, others = not_simulated(args)
    assert differing == ["--compilation-config", "--quantization", "--speculative-config", "--ssl-certfile",
                         "--ssl-keyfile", "--uds"]
    assert others == ["--trust-remote-code"]
    assert not RESULT_CHANGING_FLAGS & SIMULATED_VLLM_FLAGS


def test_start_up_has_a_warning_line_and_an_info_line(tmp_path):
    log = tmp_path / "serve.log"
    with log.open("w") as f, server_process("--quantization", "fp8", "--trust-remote-code", "--speed", "100", log=f):
        pass
    lines = log.read_text().splitlines()
    warning = [line for line in lines if "Not simulated, so throughput" in line]
    info = [line for line in lines if "Accepted but not simulated (no effect here)" in line]
    assert len(warning) == 1 and " WARNING " in warning[0] and warning[0].endswith(
        "Not simulated, so throughput, memory or the transport differ from vLLM's with them: --quantization")
    assert len(info) == 1 and info[0].endswith("Accepted but not simulated (no effect here): --trust-remote-code")
