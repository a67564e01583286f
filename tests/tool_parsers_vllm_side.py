"""vLLM's side of test_tool_parsers_vllm.py, run with the CPU venv's python (it imports vLLM 0.33).

Reads one JSON job on stdin and prints one JSON answer:

- "classes": for each --tool-call-parser vLLM registers, its class's structural_tag_model,
  supports_required_and_named and default_tool_strict_level (lower-case name);
- "reasoning": for each --reasoning-parser, the special-token switches its adjust_request leaves on a chat;
- "mistral": for each chat body, the JSON schema vLLM's Mistral parser sets on its forced call (HF tokenizer);
- "cases": for each [tool parser, kind ("chat", "responses" or "batch"), body, max_tokens, reasoning parser or
  none, --tool-strict-level or none], the repr of the SamplingParams vLLM builds after its parser's
  adjust_request (as its renderer runs it: tool_choice other than "none", or a reasoning parser; a batch chat's
  first conversation), with the request's `text` after it for a Responses body, or {"error": message} where
  vLLM refuses it.

The parser engines import ijson and mistral_common at module level, which this venv lacks; neither is used by
adjust_request, so they are stood in for by empty modules.
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.util
import json
import sys
import types

TOKENIZER = "/work/venvs/vllm-cpu/tokenizer"


class _Anything(type):
    def __getattr__(cls, name):
        return _Stand


class _Stand(metaclass=_Anything):
    """Whatever a missing module's import names."""

    def __init__(self, *args, **kwargs) -> None:
        pass


class _StandInModule(types.ModuleType):
    __path__: list = []

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Stand


class _StandIns(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Empty modules for `roots` that are not installed."""

    def __init__(self, roots: set[str]) -> None:
        self.roots = roots

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StandInModule(spec.name)

    def exec_module(self, module) -> None:
        pass


sys.meta_path.insert(0, _StandIns({m for m in ("ijson", "mistral_common") if importlib.util.find_spec(m) is None}))


class _AnyToken(dict):
    """A vocabulary that has every token a tool parser looks up at its start (its model's markup, which the
    venv's tokenizer lacks) at an id past the real ones."""

    def __missing__(self, token: str) -> int:
        self[token] = 1_000_000 + len(self)
        return self[token]

    def get(self, token, default=None):
        return self[token]

    def __contains__(self, token) -> bool:
        return True


class _Vocabulary:
    """The venv's tokenizer, with every tool parser's special tokens."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.vocab = _AnyToken(tokenizer.get_vocab())

    def get_vocab(self) -> dict[str, int]:
        return self.vocab

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)


@functools.cache
def _tokenizer() -> _Vocabulary:
    from transformers import AutoTokenizer

    return _Vocabulary(AutoTokenizer.from_pretrained(TOKENIZER))


def classes() -> dict:
    from vllm.tool_parsers import ToolParserManager

    out = {}
    for name in sorted(set(ToolParserManager.lazy_parsers) | set(ToolParserManager.tool_parsers)):
        cls = ToolParserManager.get_tool_parser(name)
        out[name] = {"tag": cls.structural_tag_model, "required_and_named": cls.supports_required_and_named,
                     "strict_level": cls.default_tool_strict_level.name.lower()}
    return out


def adjusted(parser_name: str, kind: str, body: dict, max_tokens: int, reasoning_parser: str | None = None,
             strict_level: str | None = None) -> dict:
    from vllm.entrypoints.openai.chat_completion.protocol import BatchChatCompletionRequest, ChatCompletionRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
    from vllm.parser.parser_manager import ParserManager

    try:
        if kind == "batch":  # its first conversation's request, as batch_serving.py renders each
            batch = BatchChatCompletionRequest.model_validate(body)
            request = batch.to_chat_completion_request(batch.messages[0])
        else:
            request = (ChatCompletionRequest if kind == "chat" else ResponsesRequest).model_validate(body)
        if request.tool_choice != "none" or reasoning_parser is not None:
            parser = ParserManager.get_parser(tool_parser_name=parser_name, reasoning_parser_name=reasoning_parser,
                                              enable_auto_tools=True, tool_strict_level=strict_level)
            request = parser(_tokenizer(), request.tools).adjust_request(request)
        answer = {"repr": repr(request.to_sampling_params(max_tokens, {}))}
    except Exception as exc:  # vLLM's refusal (a 400), or a parser this venv cannot build
        return {"error": f"{type(exc).__name__}: {exc}"}
    if kind == "responses":
        text = request.text
        answer["text"] = None if text is None else text.model_dump(mode="json", exclude_none=True, by_alias=True)
    return answer


def reasoning_parsers() -> dict:
    """For each --reasoning-parser vLLM registers, what its adjust_request (alone: no tool parser) leaves of a chat
    request's skip_special_tokens and spaces_between_special_tokens, or the error that stops it building here."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.parser.parser_manager import ParserManager
    from vllm.reasoning import ReasoningParserManager

    out = {}
    for name in sorted(ReasoningParserManager.lazy_parsers):
        request = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}]})
        try:
            parser = ParserManager.get_parser(reasoning_parser_name=name)
            request = parser(_tokenizer(), None).adjust_request(request)
        except Exception as exc:
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        out[name] = {"skip": request.skip_special_tokens, "spaces": request.spaces_between_special_tokens}
    return out


def mistral_schema(body: dict):
    """The JSON schema vLLM's Mistral parser sets on a chat's forced call with a tokenizer not Mistral's own (this
    venv cannot build the parser: its builder, called on its own)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.parser.mistral import MistralParser

    return MistralParser._build_guided_schema_pre_v11(None, ChatCompletionRequest.model_validate(body))


def main() -> None:
    job = json.load(sys.stdin)
    answer = {"classes": classes() if job.get("classes") else None,
              "cases": [adjusted(*case) for case in job.get("cases", [])],
              "mistral": [mistral_schema(body) for body in job.get("mistral", [])],
              "reasoning": reasoning_parsers() if job.get("reasoning") else None}
    print(json.dumps(answer))


if __name__ == "__main__":
    main()
