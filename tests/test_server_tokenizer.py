"""Tokenizers: Llama 3's is the default and counts as Meta's; the built-in one is exact and reversible;
--tokenizer DIR counts like the client's."""
from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from profiles.tokenizer import BuiltinTokenizer, HFTokenizer, Llama3Tokenizer, load_tokenizer
from server.generation import OutputPlanner, StopRules
from server.testing import running_server

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


async def test_server_with_hf_tokenizer_reports_the_clients_prompt_length(hf):
    prompt = "How many tokens does this prompt have, according to the real tokenizer?"
    async with running_server("--speed", "1000", tokenizer=hf) as server, aiohttp.ClientSession() as http:
        payload = {"prompt": prompt, "max_tokens": 3, "ignore_eos": True}
        async with http.post(server.url + "/v1/completions", json=payload) as r:
            assert (await r.json())["usage"]["prompt_tokens"] == len(hf.encode(prompt))


@pytest.fixture(scope="module")
def llama3() -> Llama3Tokenizer:
    return load_tokenizer()


def test_llama3_is_the_default_and_encodes_as_meta(llama3):
    # ids as Meta's tokenizer.json gives them through Hugging Face `tokenizers` (checked on 310 texts:
    # code, Unicode, emoji, runs of one character, special-token text)
    assert isinstance(llama3, Llama3Tokenizer) and len(llama3) == 128256
    assert llama3.encode("Hello world, this is a test.") == [128000, 9906, 1917, 11, 420, 374, 264, 1296, 13]
    assert llama3.encode("<|start_header_id|>user<|end_header_id|>", add_special_tokens=False) == [128006, 882, 128007]
    assert llama3.convert_ids_to_tokens([128000, 1917, 11]) == ["<|begin_of_text|>", "Ġworld", ","]
    assert llama3.decode([128000, 9906, 1917, 128009]) == "Hello world"
    assert llama3.eos_token_id == 128001


def test_llama3_renders_llama_3_1_instructs_chat_template(llama3):
    text = llama3.render_chat([{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi\n"}],
                              add_generation_prompt=True)
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
                    "December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|><|start_header_id|>user"
                    "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.mark.parametrize("reply", [False, True])
def test_llama3_output_re_encodes_to_the_same_ids(llama3, reply):
    planner = OutputPlanner(llama3.output_pool, llama3.eos_token_id, reply_start_pool=llama3.reply_start_pool)
    plan = planner.plan(300, StopRules(ignore_eos=True), planner.rng_for(5, 0), reply)
    text = "".join(plan.pieces)
    assert llama3.encode(text, add_special_tokens=False) == plan.token_ids.tolist()
    assert text[0] != " " if reply else text[0] == " "


async def test_server_tokenizes_with_llama3_by_default_and_replies_without_a_leading_space():
    async with running_server("--speed", "1000") as server, aiohttp.ClientSession() as http:
        async with http.post(server.url + "/tokenize", json={"prompt": "Hello world"}) as r:
            assert (await r.json())["tokens"] == [128000, 9906, 1917]
        chat = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5, "ignore_eos": True}
        async with http.post(server.url + "/v1/chat/completions", json=chat) as r:
            answer = await r.json()
        assert answer["usage"]["prompt_tokens"] == 36  # the Llama 3.1 template's system turn included
        content = answer["choices"][0]["message"]["content"]
        assert content[0].isupper() and not content.startswith(" ")
        async with http.post(server.url + "/v1/chat/completions", json={**chat, "stream": True}) as r:
            events = [e for e in (await r.read()).split(b"\n\n") if b'"content":"' in e and b'"role"' not in e]
        assert not events[0].split(b'"content":"')[1].startswith(b" ")


async def test_server_with_the_builtin_tokenizer():
    async with running_server("--speed", "1000", "--tokenizer", "builtin") as server, aiohttp.ClientSession() as http:
        async with http.post(server.url + "/tokenize", json={"prompt": "Hello world"}) as r:
            assert (await r.json())["tokens"] == BuiltinTokenizer().encode("Hello world")
