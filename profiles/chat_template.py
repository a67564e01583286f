"""Chat templates given as Jinja text: a request's `chat_template` (with --trust-request-chat-template) or
`vllm serve --chat-template`, rendered as vLLM 0.33 renders them through transformers.

- `load_chat_template`: vLLM's reading of `--chat-template` (`renderers/chat_utils/chat_template.py`): a
  file's text, else the value itself when it looks like Jinja (it has `{`, `}` or a newline), else one of
  vLLM's built-in templates by name (`template_chatml.jinja`, `template_basic.jinja`, ...: shipped unchanged
  in `profiles/data/chat_templates/`, as vLLM ships them in `transformers_utils/chat_templates/`); a value
  that looks like a path but opens neither is a start-up error.
- `render_template`: transformers' `apply_chat_template` with the template given (`utils/chat_template_utils.py`):
  an immutable sandboxed Jinja environment with `trim_blocks`, `lstrip_blocks`, loop controls and the
  `{% generation %}` tag; its `tojson` filter (no HTML escaping, no ASCII escaping), the globals
  `raise_exception` and `strftime_now`; the variables `messages`, `tools`, `documents`,
  `add_generation_prompt`, the tokenizer's special tokens (`bos_token`, `eos_token`, ...) and the
  template options (vLLM's `chat_template_kwargs`), options winning over special tokens.
  `continue_final_message` ends the text right after the final message, found by the marker transformers
  appends to it. Any error is a `ChatTemplateError` carrying the reason vLLM's 400 carries.
- `content_format` and `supports_developer_role`: vLLM's `renderers/hf.py` detection of a template that
  loops over a message's content parts (it then gets them as `[{"type": "text", "text": ...}]`), and of
  one that knows the "developer" role.
"""
from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any

_JINJA_CHARS = "{}\n"
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker after the continued message
# vLLM's built-in templates (its CHAT_TEMPLATES_DIR), found by name
BUILTIN_TEMPLATES_DIR = Path(__file__).resolve().parent / "data" / "chat_templates"


class ChatTemplateError(ValueError):
    """The chat template refused the conversation (its raise_exception, or any error of its own): vLLM
    answers 400 with the reason."""


def load_chat_template(value: str) -> str:
    """The template `--chat-template VALUE` names: a file's text, else VALUE itself when it looks like Jinja,
    else the built-in template of that name (ValueError, with vLLM's wording, for a path-like value that opens
    neither)."""
    try:
        return Path(value).read_text()
    except OSError as exc:
        if any(c in value for c in _JINJA_CHARS):
            return value
        builtin = BUILTIN_TEMPLATES_DIR / value
        try:
            return builtin.read_text()
        except OSError:  # vLLM's VLLMValidationError names the parameter after its message
            raise ValueError(f"The supplied chat template ({value}) looks like a file path, but it failed to be "
                             f"opened. Tried: {value} and {builtin}. Reason: {exc} (parameter=chat_template)"
                             ) from None


def supports_developer_role(template: str) -> bool:
    """vLLM's test: the template quotes the word "developer"."""
    return '"developer"' in template or "'developer'" in template


def render_template(template: str, messages: list[dict], *, add_generation_prompt: bool,
                    tools: list[dict] | None = None, continue_final_message: bool = False,
                    special_tokens: dict[str, str] | None = None, options: dict[str, Any] | None = None) -> str:
    """The prompt text `template` makes of a conversation, as transformers renders it (see the module
    docstring). ChatTemplateError: the template failed or refused."""
    import jinja2

    try:
        compiled = _compile(template)
        if continue_final_message:
            messages = _tag_final_message(template, messages)
        variables = {**(special_tokens or {}), **(options or {})}
        for name in ("messages", "tools", "documents", "add_generation_prompt"):
            variables.pop(name, None)
        text = compiled.render(messages=messages, tools=tools, documents=None,
                               add_generation_prompt=add_generation_prompt, **variables)
        return _cut_at_tag(text, messages[-1]) if continue_final_message else text
    except ChatTemplateError:
        raise
    except Exception as exc:  # vLLM's 400 names the Jinja error behind whatever was raised, else the error itself
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, jinja2.TemplateError):
            cause = cause.__cause__ or cause.__context__
        raise ChatTemplateError(str(cause if cause is not None else exc)) from exc


def content_format(template: str) -> str:
    """"openai" when the template loops over a message's content (it then gets a list of parts),
    else "string" (vLLM's detection; a template that does not parse is "string")."""
    return _content_format(template)


@functools.lru_cache(maxsize=32)
def _content_format(template: str) -> str:
    from jinja2 import nodes

    try:
        root = _environment().parse(template)
    except Exception:  # vLLM falls back to "string"; rendering will report the error
        return "string"
    message_vars = {loop.target.name for loop in root.find_all(nodes.For)
                    if isinstance(loop.target, nodes.Name)
                    and any(_reads(loop.iter, name) for name in _aliases(root, "messages"))}
    macro_loops = {id(loop) for macro in root.find_all(nodes.Macro) for loop in macro.find_all(nodes.For)}
    for loop in root.find_all(nodes.For):
        if any(_reads(loop.iter, name, "content") for name in message_vars):
            return "openai"
        if id(loop) not in macro_loops and isinstance(loop.iter, nodes.Name) and loop.iter.name == "content":
            return "openai"
    return "string"


def _aliases(root, name: str) -> set[str]:
    """`name` and every variable assigned from it (or a slice or filter of it), transitively."""
    from jinja2 import nodes

    found, frontier = {name}, [name]
    while frontier:
        current = frontier.pop()
        for assign in root.find_all(nodes.Assign):
            target = assign.target
            if isinstance(target, nodes.Name) and target.name not in found and _reads(assign.node, current):
                found.add(target.name)
                frontier.append(target.name)
    return found


def _reads(node, name: str, key: str | None = None) -> bool:
    """Whether `node` is variable `name` (or `name[key]` / `name.key`), through filters, tests and slices."""
    from jinja2 import nodes

    if isinstance(node, (nodes.Filter, nodes.Test)):
        return node.node is not None and _reads(node.node, name, key)
    if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice):
        return _reads(node.node, name, key)
    if key is None:
        return isinstance(node, nodes.Name) and node.ctx == "load" and node.name == name
    if isinstance(node, nodes.Getitem):
        return _reads(node.node, name) and isinstance(node.arg, nodes.Const) and node.arg.value == key
    if isinstance(node, nodes.Getattr):
        return _reads(node.node, name) and node.attr == key
    return False


def _tag_final_message(template: str, messages: list[dict]) -> list[dict]:
    """The conversation with transformers' marker after the final message's text."""
    final = messages[-1].get("content") if messages else None
    if final is None:
        raise ChatTemplateError('continue_final_message is set but the final message has no "content" to continue!')
    if "content" not in template:
        raise ChatTemplateError('continue_final_message is set to "content" but this is not an accepted field in '
                                "the chat_template")
    if isinstance(final, list):
        parts = [dict(p) for p in final]
        texts = [p for p in parts if isinstance(p, dict) and "text" in p]
        if not texts:
            raise ChatTemplateError("continue_final_message is set but we could not find any text to continue in "
                                    "the final message!")
        texts[-1]["text"] += _CONTINUE_TAG
        tagged = parts
    else:
        tagged = final + _CONTINUE_TAG
    return [*messages[:-1], {**messages[-1], "content": tagged}]


def _cut_at_tag(text: str, final_message: dict) -> str:
    """The rendered text up to the marker (trimmed where the template trimmed the marker's space)."""
    final = final_message["content"]
    if isinstance(final, list):
        final = [p["text"] for p in final if isinstance(p, dict) and "text" in p][-1]
    final = final.removesuffix(_CONTINUE_TAG)
    marker = _CONTINUE_TAG.strip()
    if final.strip() not in text or marker not in text:
        raise ChatTemplateError("continue_final_message is set but the final message does not appear in the chat "
                                "after applying the chat template! This can happen if the chat template deletes "
                                "portions of the final message. Please verify the chat template and final message "
                                "in your chat to ensure they are compatible."
                                f"Final message to continue: {final.strip()}\nRendered chat:\n{text}")
    at = text.rindex(marker)
    return text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()


@functools.lru_cache(maxsize=32)
def _compile(template: str):
    return _environment().from_string(template)


@functools.lru_cache(maxsize=1)
def _environment():
    """transformers' chat-template environment."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`: marks assistant text; renders its body unchanged."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
