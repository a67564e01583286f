"""GET /tokenizer_info behind --enable-tokenizer-info-endpoint, as vLLM 0.33 answers it
(entrypoints/serve/tokenize/serving.py TokenizerInfo): the tokenizer's init_kwargs, its class as vLLM wraps it,
--chat-template's text; 404 without the flag, vLLM's 400 without a tokenizer. Byte-for-byte against vLLM's own
class on a Hugging Face directory: test_frontend_flags_vllm.py."""
from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from profiles.tokenizer import HFConfig, Llama3Tokenizer, QwenTokenizer
from server.testing import running_server
from server.tokenizer_info import tokenizer_info

FAST = ("--speed", "1000")
ON = (*FAST, "--enable-tokenizer-info-endpoint")
HF_DIR = Path("/work/venvs/vllm-cpu/tokenizer")


async def _get(server, path: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.get(server.url + path) as r:
        return r.status, await r.json()


async def test_route_exists_only_with_the_flag():
    async with running_server(*FAST) as server:
        assert await _get(server, "/tokenizer_info") == (404, {"detail": "Not Found"})
    async with running_server(*FAST, "--enable-tokenizer-info-endpoint", "--disable-tokenizer-info-endpoint") as server:
        assert (await _get(server, "/tokenizer_info"))[0] == 404  # the last spelling wins, as in argparse


async def test_llama3_reports_its_special_and_added_tokens_and_no_unknown_fields():
    async with running_server(*ON) as server:
        status, body = await _get(server, "/tokenizer_info")
    assert status == 200
    # Llama 3.1's tokenizer_config.json names PreTrainedTokenizerFast: transformers 5 builds a TokenizersBackend,
    # vLLM wraps it in its cache, then its thread pool
    assert body["tokenizer_class"] == "TokenizerPoolCachedTokenizersBackend"
    assert body["bos_token"] == "<|begin_of_text|>" and body["eos_token"] == "<|eot_id|>"
    decoder = body["added_tokens_decoder"]
    assert len(decoder) == 256 and decoder["128000"] == "<|begin_of_text|>" and decoder["128009"] == "<|eot_id|>"
    assert decoder["128255"] == "<|reserved_special_token_247|>"
    assert body["truncation_side"] == "left" and body["backend"] == "tokenizers"
    # Llama 3.1's tokenizer_config.json says 131072; its Jinja chat template is not shipped, so not answered
    assert body["model_max_length"] == 131072 and "chat_template" not in body
    assert list(body)[0] == "tokenizer_class"


async def test_qwen_model_reports_qwens_tokenizer():
    async with running_server("Qwen/Qwen3-30B-A3B", *ON) as server:
        status, body = await _get(server, "/tokenizer_info")
    assert status == 200 and body["tokenizer_class"] == "TokenizerPoolCachedQwen2Tokenizer"
    assert body["eos_token"] == "<|im_end|>" and body["pad_token"] == "<|endoftext|>" and "bos_token" not in body
    assert body["added_tokens_decoder"]["151645"] == "<|im_end|>" and len(body["added_tokens_decoder"]) == 26
    assert body["model_max_length"] == 131072  # Qwen3's tokenizer_config.json


async def test_chat_template_flag_text_is_reported(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    async with running_server(*ON, "--chat-template", str(path)) as server:
        _, body = await _get(server, "/tokenizer_info")
    assert body["chat_template"] == path.read_text()


async def test_builtin_tokenizer_reports_itself():
    async with running_server(*ON, "--tokenizer", "builtin") as server:
        _, body = await _get(server, "/tokenizer_info")
    assert body == {"tokenizer_class": "BuiltinTokenizer", "bos_token": "<|begin_of_text|>",
                    "eos_token": "<|end_of_text|>", "unk_token": "<unk>",
                    "added_tokens_decoder": {"0": "<unk>", "1": "<|begin_of_text|>", "2": "<|end_of_text|>",
                                             "3": "<|start_header_id|>", "4": "<|end_header_id|>", "5": "<|eot_id|>"}}


async def test_without_a_tokenizer_it_is_vllms_400():
    async with running_server(*ON, "--skip-tokenizer-init") as server:
        status, body = await _get(server, "/tokenizer_info")
    assert status == 400
    assert body["error"]["message"] == "Tokenizer not available when `skip_tokenizer_init=True`"


async def test_hf_directory_reports_its_init_kwargs():
    if not HF_DIR.is_dir():
        pytest.skip(f"{HF_DIR} (the vLLM CPU venv's tokenizer) is absent")
    pytest.importorskip("transformers")
    async with running_server(*ON, "--tokenizer", str(HF_DIR)) as server:
        status, body = await _get(server, "/tokenizer_info")
    assert status == 200
    assert body["tokenizer_class"] == "TokenizerPoolCachedLlamaTokenizer"
    assert body["model_max_length"] == 32768 and body["bos_token"] == "<s>" and body["add_bos_token"] is True
    assert "vocab_file" not in body  # file paths are left out
    assert body["truncation_side"] == "left" and body["name_or_path"] == str(HF_DIR)
    assert body["extra_special_tokens"] == ["<s>", "</s>"]  # AddedToken objects as their text


def test_added_tokens_are_written_as_text_and_file_paths_dropped():
    class Added:
        content = "<x>"

    config = HFConfig("PythonBackend", False, {"vocab_file": "/v", "merges_file": "/m", "pad_token": Added(),
                                              "nested": {"a": [Added(), 1]}, "truncation_side": "right"})
    assert tokenizer_info(config, None) == {"tokenizer_class": "CachedPythonBackend", "pad_token": "<x>",
                                            "nested": {"a": ["<x>", 1]}, "truncation_side": "left"}


def test_shipped_tokenizers_name_their_hugging_face_classes():
    assert Llama3Tokenizer().hf_config().class_name == "TokenizersBackend"
    assert QwenTokenizer().hf_config().class_name == "Qwen2Tokenizer"
