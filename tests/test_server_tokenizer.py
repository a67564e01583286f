"""Tokenizers: each model family's shipped one is the default (Llama 3's counts as Meta's, Qwen's as
Alibaba's); the built-in one is exact and reversible; --tokenizer DIR counts like the client's."""
from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from profiles.tokenizer import BuiltinTokenizer, HFTokenizer, Llama3Tokenizer, QwenTokenizer, load_tokenizer
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
@pytest.mark.parametrize("family", ["llama3", "qwen"])
def test_shipped_tokenizers_output_re_encodes_to_the_same_ids(family, reply, request):
    tokenizer = request.getfixturevalue(family)
    planner = OutputPlanner(tokenizer.output_pool, tokenizer.eos_token_id, reply_start_pool=tokenizer.reply_start_pool)
    plan = planner.plan(300, StopRules(ignore_eos=True), planner.rng_for(5, 0), reply)
    text = "".join(plan.pieces)
    assert tokenizer.encode(text, add_special_tokens=False) == plan.token_ids.tolist()
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


@pytest.fixture(scope="module")
def qwen() -> QwenTokenizer:
    return load_tokenizer(None, "qwen3_moe")


@pytest.mark.parametrize("model_type, kind", [("qwen3_moe", QwenTokenizer), ("qwen3", QwenTokenizer),
                                              ("qwen2", QwenTokenizer), ("llama", Llama3Tokenizer),
                                              ("mixtral", Llama3Tokenizer), (None, Llama3Tokenizer)])
def test_the_default_tokenizer_is_the_model_familys(model_type, kind):
    assert isinstance(load_tokenizer(None, model_type), kind)


def test_qwen_encodes_as_alibabas_reference(qwen):
    # ids as dashscope 2.0.2's QwenTokenizer (Alibaba's tiktoken reference) gives them (checked on 307 texts:
    # code, Unicode, combining marks, emoji); Qwen2 and Qwen3 share its ranks
    assert len(qwen) == 151669 and qwen.bos_token_id is None and qwen.eos_token_id == 151645
    assert qwen.encode("Hello, world! The year 2024 has 366 days.") == [
        9707, 11, 1879, 0, 576, 1042, 220, 17, 15, 17, 19, 702, 220, 18, 21, 21, 2849, 13]
    assert qwen.encode("  def f(x):\n\treturn x ** 2\n") == [220, 707, 282, 2075, 982, 853, 856, 3070, 220, 17, 198]
    assert qwen.encode("你好，世界") == [108386, 3837, 99489]
    assert qwen.encode("nai\u0308ve cafe\u0301") == qwen.encode("naïve café") == [3376, 37572, 586, 51950]  # NFC
    assert qwen.encode("<|im_start|>user\nhi<|im_end|>\n") == [151644, 872, 198, 6023, 151645, 198]
    assert qwen.encode("<think></think>") == [151667, 151668]
    assert qwen.decode([151644, 872, 198, 6023, 151645, 151667]) == "user\nhi<think>"  # <think> is not special
    assert qwen.convert_ids_to_tokens([9707, 1879, 151645]) == ["Hello", "Ġworld", "<|im_end|>"]


def test_qwen_renders_qwen3s_chat_template(qwen):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nHello!"},
                {"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "<think>look</think>Let me."},
                {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "20C"}]
    assert qwen.render_chat(messages, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"  # reasoning before the last query is dropped
        "<|im_start|>user\nWeather?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nlook\n</think>\n\nLet me.<|im_end|>\n"  # after it, kept
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\n20C\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n")


async def test_a_qwen_model_is_served_with_qwens_tokenizer():
    async with running_server("Qwen/Qwen3-30B-A3B", "--speed", "1000") as server, aiohttp.ClientSession() as http:
        async with http.post(server.url + "/tokenize", json={"prompt": "Hello, world"}) as r:
            assert (await r.json())["tokens"] == [9707, 11, 1879]
        chat = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5, "ignore_eos": True}
        async with http.post(server.url + "/v1/chat/completions", json=chat) as r:
            answer = await r.json()
        assert answer["usage"]["prompt_tokens"] == len(
            [151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198])  # ChatML, no system turn
        assert answer["choices"][0]["message"]["content"]


async def test_a_cluster_tokenizes_each_request_with_its_models_tokenizer(tmp_path):
    cluster = tmp_path / "two-families.yaml"
    cluster.write_text("instances:\n"
                       "  - {name: llama, model: meta-llama/Llama-3.1-8B, hardware: H100}\n"
                       "  - {name: qwen, model: Qwen/Qwen3-30B-A3B, hardware: H100}\n")
    async with running_server("--cluster", str(cluster), "--speed", "1000") as server, \
            aiohttp.ClientSession() as http:
        for model, ids in [("meta-llama/Llama-3.1-8B", [128000, 9906, 1917]), ("Qwen/Qwen3-30B-A3B", [9707, 1879]),
                           (None, [128000, 9906, 1917])]:  # no model: the front door's first
            body = {"prompt": "Hello world", **({"model": model} if model else {})}
            async with http.post(server.url + "/tokenize", json=body) as r:
                assert (await r.json())["tokens"] == ids, model
            async with http.post(server.url + "/v1/completions", json={**body, "max_tokens": 3}) as r:
                answer = await r.json()
            assert answer["usage"]["prompt_tokens"] == len(ids), model
