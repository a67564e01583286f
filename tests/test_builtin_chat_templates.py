"""vLLM 0.33's built-in chat templates by name: `--chat-template template_chatml.jinja` (and the others vLLM
ships in transformers_utils/chat_templates/) reads the shipped copy when no such file exists, as vLLM's
load_chat_template does; a name that is neither is vLLM's start-up error naming both places tried."""
from __future__ import annotations

import hashlib

import aiohttp
import pytest

from profiles.chat_template import BUILTIN_TEMPLATES_DIR, load_chat_template
from profiles.tokenizer import load_tokenizer
from server.serving import frontend_switches
from server.testing import running_server, serve_args

NAMES = ("template_basic.jinja", "template_blip2.jinja", "template_chatml.jinja", "template_deepseek_ocr.jinja",
         "template_deepseek_vl2.jinja", "template_kimi_audio.jinja", "template_minicpmv45.jinja")


def test_every_vllm_template_ships_unchanged():
    notice = (BUILTIN_TEMPLATES_DIR / "NOTICE").read_text()
    for name in NAMES:
        digest = hashlib.sha256((BUILTIN_TEMPLATES_DIR / name).read_bytes()).hexdigest()
        assert f"{digest}  {name}" in notice
    assert (BUILTIN_TEMPLATES_DIR / "LICENSE").read_text().lstrip().startswith("Apache License")


def test_a_name_reads_the_builtin_template_and_a_file_still_wins(tmp_path, monkeypatch):
    assert load_chat_template("template_chatml.jinja") == (BUILTIN_TEMPLATES_DIR / "template_chatml.jinja").read_text()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "template_chatml.jinja").write_text("{{ 'mine' }}")
    assert load_chat_template("template_chatml.jinja") == "{{ 'mine' }}"


def test_an_unknown_name_is_vllms_error():
    with pytest.raises(ValueError) as error:
        frontend_switches(serve_args("--chat-template", "template_nowhere.jinja"))
    assert str(error.value) == (
        "The supplied chat template (template_nowhere.jinja) looks like a file path, but it failed to be opened. "
        f"Tried: template_nowhere.jinja and {BUILTIN_TEMPLATES_DIR / 'template_nowhere.jinja'}. Reason: [Errno 2] "
        "No such file or directory: 'template_nowhere.jinja' (parameter=chat_template)")


async def test_chatml_by_name_renders_the_prompt():
    tokenizer = load_tokenizer()
    async with running_server("--speed", "1000", "--chat-template", "template_chatml.jinja") as server:
        async with aiohttp.ClientSession() as http, http.post(server.url + "/tokenize", json={
                "messages": [{"role": "user", "content": "Hi"}]}) as r:
            body = await r.json()
    assert tokenizer.decode(body["tokens"]) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
