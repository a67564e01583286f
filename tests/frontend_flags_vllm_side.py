"""vLLM's side of test_frontend_flags_vllm.py, run with the CPU venv's python (it imports vLLM 0.33).

Reads one JSON job on stdin and prints one JSON answer:

- "tokenizer_info": [[directory, chat_template | null], ...]: vLLM's /tokenizer_info body for a server whose
  tokenizer is that directory (loaded as vLLM's renderer loads it: get_tokenizer for a generating model, then
  its thread pool) with that --chat-template text.
- "templates": [value, ...]: vLLM's load_chat_template of each --chat-template value, or its error text.
- "merges": [[defaults, request], ...]: vLLM's ChatParams.with_defaults of the request's chat_template_kwargs.
"""
from __future__ import annotations

import copy
import json
import sys


def tokenizer_info(directory: str, chat_template: str | None) -> dict:
    from vllm.entrypoints.serve.tokenize.protocol import TokenizerInfoResponse
    from vllm.entrypoints.serve.tokenize.serving import TokenizerInfo
    from vllm.tokenizers.hf import maybe_make_thread_pool
    from vllm.tokenizers.registry import get_tokenizer

    tokenizer = copy.copy(get_tokenizer(directory, runner_type="generate", tokenizer_mode="auto", revision=None,
                                        trust_remote_code=False))
    maybe_make_thread_pool(tokenizer, 2)  # as HfRenderer does (renderer_num_workers + 1)
    return TokenizerInfoResponse(**TokenizerInfo(tokenizer, chat_template).to_dict()).model_dump()


def template(value: str) -> dict:
    from vllm.renderers.chat_utils.chat_template import _load_chat_template

    try:
        return {"text": _load_chat_template(value)}
    except Exception as exc:
        return {"error": str(exc)}


def merge(defaults: dict, request: dict) -> dict:
    from vllm.renderers.params import ChatParams

    return ChatParams(chat_template_kwargs=request).with_defaults(defaults).chat_template_kwargs


def main() -> None:
    job = json.load(sys.stdin)
    print(json.dumps({"tokenizer_info": [tokenizer_info(d, t) for d, t in job.get("tokenizer_info", [])],
                      "templates": [template(v) for v in job.get("templates", [])],
                      "merges": [merge(d, r) for d, r in job.get("merges", [])]}))


if __name__ == "__main__":
    main()
