"""GET /tokenizer_info (`vllm serve --enable-tokenizer-info-endpoint`), as vLLM 0.33 answers it.

vLLM (`entrypoints/serve/tokenize/serving.py`, `TokenizerInfo`) reports its tokenizer's `init_kwargs`: the
keyword arguments transformers built it with (its tokenizer_config.json, then what vLLM passed, among them
`truncation_side="left"` for a generating model), less the file paths `vocab_file` and `merges_file`, with
added tokens written as their text; `tokenizer_class` is the class vLLM wraps it in (`get_cached_tokenizer`
makes `Cached<class>`, then `maybe_make_thread_pool` makes `TokenizerPoolCached<class>` of a Rust-backed one);
`--chat-template`'s text, when given, replaces `chat_template`. Without the flag the route does not exist
(404); without a tokenizer (--skip-tokenizer-init) it is vLLM's 400.

What each tokenizer knows of its Hugging Face counterpart is `profiles.tokenizer`'s `hf_config()`: all of it
for `--tokenizer DIR`; for the shipped Llama 3 and Qwen tokenizers their class, special and added tokens and the
model_max_length of the tokenizer_config.json they stand for (Llama 3.1's and Qwen3's: 131072; that file is not
shipped, so the rest of it, the chat template's Jinja text among it, is left out); the built-in tokenizer
reports itself, unwrapped (it has no Hugging Face counterpart, hence no model_max_length).
"""
from __future__ import annotations

from typing import Any

from aiohttp import web

from server.errors import json_response
from server.serving import SERVING

_FILE_PATHS = ("vocab_file", "merges_file")


def tokenizer_info(config, chat_template: str | None) -> dict[str, Any]:
    """vLLM's TokenizerInfoResponse of a tokenizer (`config`: its `HFConfig`): `tokenizer_class` first."""
    kwargs = {k: _serializable(v) for k, v in config.init_kwargs.items() if k not in _FILE_PATHS}
    if config.hf:
        kwargs["truncation_side"] = "left"  # vLLM loads a generating model's tokenizer so (tokenizers/registry.py)
        cached = "Cached" + config.class_name
        kwargs["tokenizer_class"] = "TokenizerPool" + cached if config.rust_backed else cached
    else:
        kwargs["tokenizer_class"] = config.class_name
    if chat_template:
        kwargs["chat_template"] = chat_template
    return {"tokenizer_class": kwargs.pop("tokenizer_class"), **kwargs}


def _serializable(value: Any) -> Any:
    """vLLM's _make_json_serializable: an added token (anything with `content`) as its text, recursively."""
    if hasattr(value, "content"):
        return value.content
    if isinstance(value, dict):
        return {k: _serializable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_serializable(v) for v in value]
    return value


async def get_tokenizer_info(request: web.Request) -> web.Response:
    """Get comprehensive tokenizer information."""  # vLLM's docstring: its OpenAPI description
    serving = request.app[SERVING]
    tokenizer = serving.require_tokenizer(None)  # vLLM's renderer has the first served model's tokenizer
    return json_response(tokenizer_info(tokenizer.hf_config(), serving.options.chat_template))


def add_routes(app: web.Application) -> None:
    """The route, only with --enable-tokenizer-info-endpoint (vLLM registers it only then)."""
    if app[SERVING].options.tokenizer_info_endpoint:
        app.router.add_get("/tokenizer_info", get_tokenizer_info)
