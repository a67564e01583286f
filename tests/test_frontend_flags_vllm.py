"""/tokenizer_info, --chat-template names and --default-chat-template-kwargs against vLLM 0.33's own code
(the CPU venv, run as a subprocess; skipped without it): the body of vLLM's TokenizerInfo for Hugging Face
tokenizer directories, its load_chat_template for built-in names and unknown ones, its ChatParams.with_defaults."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from profiles.chat_template import BUILTIN_TEMPLATES_DIR, load_chat_template
from profiles.tokenizer import HFTokenizer
from server.chat import with_default_kwargs
from server.tokenizer_info import tokenizer_info
from vllm_venv import run_vllm_side, vllm_python_or_skip

VLLM_SIDE = Path(__file__).resolve().parent / "frontend_flags_vllm_side.py"
HF_DIR = Path("/work/venvs/vllm-cpu/tokenizer")

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def vllm_python() -> str:
    return vllm_python_or_skip()


def test_tokenizer_info_equals_vllms(vllm_python, tmp_path):
    if not HF_DIR.is_dir():
        pytest.skip(f"{HF_DIR} is absent")
    pytest.importorskip("transformers")
    richer = tmp_path / "richer"  # a chat template, added tokens and a model config in the directory
    shutil.copytree(HF_DIR, richer)
    config = json.loads((richer / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    config["added_tokens_decoder"] = {"0": {"content": "<unk>", "lstrip": False, "normalized": False,
                                            "rstrip": False, "single_word": False, "special": True}}
    (richer / "tokenizer_config.json").write_text(json.dumps(config))
    (richer / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 32000}))
    cases = [(str(HF_DIR), None), (str(richer), None), (str(richer), "{{ 'server' }}")]
    theirs = run_vllm_side(vllm_python, VLLM_SIDE, {"tokenizer_info": cases})["tokenizer_info"]
    for (directory, template), expected in zip(cases, theirs):
        ours = json.loads(json.dumps(tokenizer_info(HFTokenizer(directory).hf_config(), template)))
        assert ours == expected


def test_chat_template_names_resolve_as_vllms(vllm_python):
    names = sorted(p.name for p in BUILTIN_TEMPLATES_DIR.glob("*.jinja"))
    theirs = run_vllm_side(vllm_python, VLLM_SIDE, {"templates": [*names, "nowhere.jinja"]})["templates"]
    for name, expected in zip(names, theirs):
        assert load_chat_template(name) == expected["text"]
    with pytest.raises(ValueError) as error:
        load_chat_template("nowhere.jinja")
    # the same text but the second place tried: vLLM's package directory, ours here
    vllm_dir = theirs[-1]["error"].split(" and ", 1)[1].split("nowhere.jinja. Reason")[0]
    assert vllm_dir.endswith("vllm/transformers_utils/chat_templates/")
    assert str(error.value) == theirs[-1]["error"].replace(vllm_dir, str(BUILTIN_TEMPLATES_DIR) + "/")


def test_default_kwargs_merge_as_vllms(vllm_python):
    cases = [({}, {"a": None}), ({"a": 1, "b": {"x": 1}}, {"a": 2, "b": {"y": 2}}),
             ({"a": 1}, {"a": None, "c": "auto", "d": False}), ({"enable_thinking": False}, {})]
    theirs = run_vllm_side(vllm_python, VLLM_SIDE, {"merges": cases})["merges"]
    assert [with_default_kwargs(d, r) for d, r in cases] == theirs
