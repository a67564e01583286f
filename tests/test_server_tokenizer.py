"""Tokenizers: the built-in one is exact and reversible; --tokenizer DIR counts like the client's."""
from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from server.generation import OutputPlanner, StopRules
from server.testing import running_server
from profiles.tokenizer import BuiltinTokenizer, HFTokenizer, load_tokenizer

HF_DIR = Path("/work/venvs/vllm-cpu/tokenizer")


@pytest.fixture(scope="module")
def builtin() -> BuiltinTokenizer:
    return BuiltinTokenizer()


@pytest.mark.parametrize("text", ["Hello, world!", "  two  spaces\nand\ttabs", "numbers 12345 and 007",
                                  "unicode: déjà vu, 東京, emoji 🙂", "<|eot_id|> is special", ""])
def test_builtin_decodes_what_it_encodes(builtin, text):
    assert builtin.decode(builtin.encode(text, add_special_tokens=False), skip_special_tokens=False) == text


def test_builtin_counts_about_one_token_per_three_characters_of_english(builtin):
    text = "The quick brown fox jumps over the lazy dog while the cat watches from the window. " * 20
    ids = builtin.encode(text, add_special_tokens=False)
    assert 2.5 < len(text) / len(ids) < 4.0


def test_builtin_adds_bos_and_parses_special_tokens(builtin):
    assert builtin.encode("hi")[0] == builtin.bos_token_id
    assert builtin.encode("<|eot_id|>", add_special_tokens=False) == [5]


def test_output_words_re_encode_to_the_same_ids(builtin):
    """What the server streams, sent back in a follow-up turn, tokenizes to the ids the engine cached."""
    planner = OutputPlanner(builtin.output_pool, builtin.eos_token_id)
    plan = planner.plan(300, StopRules(ignore_eos=True), planner.rng_for(5, 0))
    text = "".join(plan.pieces)
    assert builtin.encode(text, add_special_tokens=False) == plan.token_ids.tolist()


def test_missing_tokenizer_directory_is_a_clear_error():
    with pytest.raises(ValueError, match="not a directory"):
        load_tokenizer("/nonexistent/tokenizer")


@pytest.fixture(scope="module")
def hf() -> HFTokenizer:
    if not HF_DIR.is_dir():
        pytest.skip(f"{HF_DIR} (the vLLM CPU venv's tokenizer) is absent")
    pytest.importorskip("transformers")
    return HFTokenizer(str(HF_DIR))


def test_hf_tokenizer_counts_like_transformers(hf):
    import transformers
    reference = transformers.AutoTokenizer.from_pretrained(str(HF_DIR), local_files_only=True)
    ours = hf
    text = "Prompt token counts must match the client's tokenizer exactly."
    assert ours.encode(text) == reference.encode(text)
    assert ours.eos_token_id == reference.eos_token_id
    planner = OutputPlanner(ours.output_pool, ours.eos_token_id)
    plan = planner.plan(50, StopRules(ignore_eos=True), planner.rng_for(1, 0))
    assert ours.decode(plan.token_ids) == "".join(plan.pieces).lstrip()


def test_server_with_hf_tokenizer_reports_the_clients_prompt_length(hf):
    tokenizer = hf
    prompt = "How many tokens does this prompt have, according to the real tokenizer?"

    async def go():
        async with running_server("--speed", "1000", tokenizer=tokenizer) as server:
            async with aiohttp.ClientSession() as http:
                payload = {"prompt": prompt, "max_tokens": 3, "ignore_eos": True}
                async with http.post(server.url + "/v1/completions", json=payload) as r:
                    return (await r.json())["usage"]["prompt_tokens"]
    assert asyncio.run(go()) == len(tokenizer.encode(prompt))
