"""Every vLLM 0.33 tool parser's adjust_request against the emulator's table of them (server/tool_parsers.py),
with vLLM's own code (the CPU venv, run as a subprocess; skipped without it): the parser classes' structural tag
models, supports_required_and_named and strict levels; and for chat and Responses bodies (forced calls, strict
"auto" calls, one call only, "auto" with the request's own structured output, no tools; batch chat and a chat
without tools on a server with a reasoning parser; each --tool-strict-level), the SamplingParams
vLLM builds after the parser (its repr, as --enable-log-requests writes it) and the Responses request's `text`
equal the emulator's. The structural tags the emulator does not write (TAGS_NOT_WRITTEN) are compared with it
cut out: there vLLM has a tag where the emulator has none."""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

from server.generation_config import SamplingDefaults

import pytest

from server.chat import chat_params
from server.chat_batch import BatchChatCompletionRequest
from server.errors import APIError
from server.protocol import ChatCompletionRequest
from server.request_log import sampling_params_repr
from server.responses_input import template_tools
from server.responses_protocol import ResponsesRequest
from server.responses_tools import forced_calls, responses_params
from server.sampling_params import from_chat
from server.tool_calls import forced_constraint, parser_adjustment
from server.tool_parsers import PARSERS, REASONING_KEEPS_SPECIAL_TOKENS, REASONING_NO_SPACES, WRITTEN_TAGS
from vllm_venv import run_vllm_side, vllm_python_or_skip

pytestmark = pytest.mark.vllm

VLLM_SIDE = Path(__file__).resolve().parent / "tool_parsers_vllm_side.py"
MODEL = "m"
TAGS_NOT_WRITTEN = {name for name, row in PARSERS.items() if row.tag is not None and row.tag not in WRITTEN_TAGS}
# "openai" is gpt-oss's: vLLM serves it with its Harmony parser (by the model's type), whose structural tag
# model vLLM's DelegatingParser cannot build ("Unknown format type: harmony")
SKIPPED = {"openai"}
# parsers vLLM cannot build in the CPU venv: response-template parsers (the tokenizer's `response_template`
# metadata), Cohere's (the cohere_melody package), Mistral's (mistral_common): only their cases vLLM answers
# without building them (tool_choice "none") are compared
UNBUILDABLE = {"beam", "hf", "cohere_command3", "cohere_command4", "mistral"}

_ADD = {"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                                      "b": {"type": "integer"}},
                                      "required": ["a", "b"]}}
_MUL = {"name": "mul", "strict": True, "parameters": {"type": "object", "properties": {"x": {"type": "number"}},
                                                      "required": ["x"], "additionalProperties": False}}
# argument types GLM's tag pins one by one (a string, a type list, an enum, any value); and a schema it cannot
_FIND = {"name": "find", "parameters": {"type": "object", "properties": {
    "q": {"type": "string"}, "n": {"type": ["integer", "string"]}, "mode": {"enum": ["a", 1]}, "x": {}}}}
_PICK = {"name": "pick", "parameters": {"type": "object", "anyOf": [{"required": ["a"]}], "properties": {"a": {}}}}
# a strict tool whose arguments Kimi K3's tag types one by one (raw strings: an enum, a bounded length; a union;
# JSON referring to the root's $defs)
_RICH = {"name": "rich", "strict": True, "parameters": {
    "type": "object", "$defs": {"P": {"type": "integer"}}, "required": ["s"], "properties": {
        "s": {"type": "string", "enum": ["x", "y"]}, "t": {"type": "string", "minLength": 2, "maxLength": 9},
        "c": {"type": "string", "const": "k"}, "u": {"type": ["integer", "null"]}, "o": {"$ref": "#/$defs/P"},
        "n": {"type": "integer"}, "w": {"type": "string"}}}}
CHAT_ADD, CHAT_MUL, CHAT_FIND, CHAT_PICK, CHAT_RICH = ({"type": "function", "function": f}
                                                       for f in (_ADD, _MUL, _FIND, _PICK, _RICH))
R_ADD, R_MUL = ({"type": "function", **f} for f in (_ADD, _MUL))
OWN_SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}}


def _chat(tools, choice=None, **extra) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": tools, **extra}
    return body if choice is None else {**body, "tool_choice": choice}


def _responses(tools, choice, **extra) -> dict:
    return {"model": MODEL, "input": "hi", "tools": tools or [], "tool_choice": choice, **extra}


BODIES = [
    ("chat", _chat([CHAT_ADD, CHAT_MUL], "required")),
    ("chat", _chat([CHAT_ADD, CHAT_MUL], {"type": "function", "function": {"name": "mul"}})),
    ("chat", _chat([CHAT_ADD, CHAT_MUL], "required", parallel_tool_calls=False)),
    ("chat", _chat([CHAT_ADD, CHAT_MUL])),  # "auto" with a strict tool
    ("chat", _chat([CHAT_ADD])),  # "auto", no strict tool: no tag
    ("chat", _chat([CHAT_ADD], "auto", parallel_tool_calls=False)),  # one call: a tag
    ("chat", _chat([CHAT_ADD, CHAT_MUL], "auto",  # the tag or the request's own output
                   response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": OWN_SCHEMA}})),
    ("chat", _chat([CHAT_ADD, CHAT_MUL], "auto", structured_outputs={"regex": "[a-z]+"}, parallel_tool_calls=False)),
    ("chat", _chat([CHAT_ADD, CHAT_MUL], "auto", structured_outputs={"choice": ["yes", "no"]})),
    ("chat", _chat([CHAT_ADD], "auto", structured_outputs={"choice": ["yes", "no"]}, parallel_tool_calls=False)),
    ("chat", _chat([CHAT_ADD], "required", response_format={"type": "json_object"})),
    ("chat", _chat([CHAT_ADD], "none")),
    ("chat", _chat([CHAT_FIND, CHAT_PICK, CHAT_MUL], "required")),
    ("chat", _chat([CHAT_FIND, CHAT_PICK], "auto", parallel_tool_calls=False)),
    ("chat", _chat([CHAT_MUL], "auto")),  # every tool strict
    ("chat", _chat([CHAT_RICH, CHAT_ADD], "required")),
    ("chat", _chat(None)),
    ("responses", _responses([R_ADD, R_MUL], "required")),
    ("responses", _responses([R_ADD, R_MUL], {"type": "function", "name": "add"})),
    ("responses", _responses([R_ADD, R_MUL], "auto")),
    ("responses", _responses([R_ADD, R_MUL], "auto", text={"format": {"type": "json_schema", "name": "a",
                                                                       "schema": OWN_SCHEMA}})),
    ("responses", _responses([R_ADD], "required", text={"format": {"type": "json_object"}})),
    ("responses", _responses(None, "auto")),
]
CASES = [(parser, kind, body, 50, None, None) for parser in sorted(PARSERS) if parser not in SKIPPED
         for kind, body in BODIES]
# with a reasoning parser vLLM's renderer runs adjust_request whatever the tool choice: on a batch chat's
# conversations (tool_choice "none", no tools) and a chat without tools
BATCH = {"model": MODEL, "messages": [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]],
         "max_tokens": 5}
CASES += [(parser, kind, body, 5, reasoning, None) for reasoning in ("qwen3", "deepseek_r1", "kimi_k3")
          for parser in ("hermes", "qwen3_coder", "muse", "kimi_k3", "minimax_m3", "deepseek_v3", "pythonic")
          for kind, body in (("batch", BATCH), ("chat", _chat(None)),
                             ("responses", _responses([R_ADD], "auto")))]
# --tool-strict-level: "function" gives "auto" a tag without a strict tool; "parameter" makes every tool strict
CASES += [(parser, kind, body, 50, None, level) for level in ("auto", "function", "parameter")
          for parser in ("hermes", "llama3_json", "glm47", "deepseek_v31", "qwen3_coder", "kimi_k2", "pythonic")
          for kind, body in (("chat", _chat([CHAT_ADD])), ("chat", _chat([CHAT_ADD, CHAT_FIND], "required")),
                             ("chat", _chat([CHAT_ADD], "auto", structured_outputs={"regex": "a+"})),
                             ("responses", _responses([R_ADD], {"type": "function", "name": "add"})))]

_STRUCTURED = re.compile(r"structured_outputs=(None|StructuredOutputsParams\(.*?_backend_was_auto=(True|False)\))")


def _ours(parser: str, kind: str, body: dict, max_tokens: int, reasoning_parser: str | None,
          strict_level: str | None) -> dict:
    options = SimpleNamespace(tool_call_parser=parser, enable_auto_tools=True, reasoning_parser=reasoning_parser,
                              tool_strict_level=strict_level)
    serving = SimpleNamespace(options=options, sampling_defaults=lambda model: SamplingDefaults())  # vLLM's: none
    try:
        if kind == "batch":  # as server/chat_batch.py builds its conversations' params
            batch = BatchChatCompletionRequest.model_validate(body)
            single = batch.to_chat_request(batch.messages[0])
            return {"repr": sampling_params_repr(chat_params(serving, single, max_tokens, None))}
        if kind == "chat":
            req = ChatCompletionRequest.model_validate(body)
            return {"repr": sampling_params_repr(chat_params(serving, req, max_tokens, forced_constraint(req)))}
        req = ResponsesRequest.model_validate(body)
        forced_calls(req, template_tools(req.tools, req.tool_choice, False), parser, strict_level)
        text = None if req.text is None else req.text.model_dump(mode="json", exclude_none=True, by_alias=True)
        return {"repr": sampling_params_repr(responses_params(req, max_tokens, parser, reasoning_parser)),
                "text": text}
    except APIError as exc:
        return {"error": exc.message}


def _without_tag(answer: dict) -> dict:
    """An answer with its structured output cut out (vLLM's unwritten tag; the emulator's None)."""
    return {**answer, "repr": _STRUCTURED.sub("", answer["repr"])} if "repr" in answer else answer


MISTRAL = [body for kind, body in BODIES if kind == "chat" and body.get("tool_choice") not in (None, "auto", "none")]


@pytest.fixture(scope="module")
def theirs() -> dict:
    python = vllm_python_or_skip("transformers")
    return run_vllm_side(python, VLLM_SIDE, {"classes": True, "cases": CASES, "mistral": MISTRAL, "reasoning": True})


def test_the_reasoning_parsers_that_keep_special_tokens_are_vllms(theirs):
    built = {name: r for name, r in theirs["reasoning"].items() if "error" not in r}
    assert len(built) >= 35, theirs["reasoning"]  # (those this venv cannot build: response templates, ...)
    assert {name for name, r in built.items() if r["skip"] is False} == REASONING_KEEPS_SPECIAL_TOKENS & set(built)
    assert {name for name, r in built.items() if r["spaces"] is False} == REASONING_NO_SPACES


def test_mistrals_forced_call_schema_equals_vllms(theirs):
    """vLLM cannot build the Mistral parser here (mistral_common): its schema builder is compared on its own, and
    the emulator logs that schema for a chat's forced call that has no structured_outputs of its own."""
    for body, expected in zip(MISTRAL, theirs["mistral"]):
        req = ChatCompletionRequest.model_validate(body)
        update = parser_adjustment(req, "mistral", forced_constraint(req), from_chat(req, 5).structured_outputs)
        if req.structured_outputs is None:
            assert update["structured_outputs"].json_ == expected, body
        assert update["skip_special_tokens"] is False


def test_the_table_has_every_parser_as_vllms_classes_define_it(theirs):
    classes = theirs["classes"]
    assert set(classes) == set(PARSERS)
    for name, cls in classes.items():
        row = PARSERS[name]
        assert row.tag == cls["tag"], name
        # vLLM's supports_required_and_named: False where the class says so, or (strict tool calling on) a tag
        assert (not (row.native or row.tag is not None)) == cls["required_and_named"], name
        assert row.strict_level == cls["strict_level"], name


def test_every_parsers_adjusted_params_equal_vllms(theirs):
    mismatches = []
    for case, expected in zip(CASES, theirs["cases"]):
        parser, kind = case[:2]
        if (parser in UNBUILDABLE or (parser, kind) == ("hy_v4", "responses")) and "error" in expected:
            # (vLLM's hy_v4 tag reads a chat tool's `function` from a Responses FunctionTool: an AttributeError)
            continue
        ours = _ours(*case)
        if "error" in expected or "error" in ours:  # both refuse it (vLLM's message after its prefix)
            if not ("error" in expected and "error" in ours and ours["error"] in expected["error"]):
                mismatches.append((case, ours, expected))
            continue
        if parser in TAGS_NOT_WRITTEN:
            ours, expected = _without_tag(ours), _without_tag(expected)
        if ours != expected:
            mismatches.append((case, ours, expected))
    assert not mismatches, (len(mismatches), mismatches[:3])
