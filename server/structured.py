"""Structured outputs: what the simulated model says when its output is constrained.

vLLM 0.33 constrains a request's tokens with a grammar when it asks for `response_format`
(`json_object`, `json_schema`) or `structured_outputs` (`json`, `regex`, `choice`, `grammar`,
`json_object`, `structural_tag`), and when a tool call is forced (`tool_choice` "required" or a
named tool). No model runs here, so the output is made to satisfy the constraint:

- a JSON schema: an instance of it (`schema_instance`: types, properties, required, enum,
  const, items / prefixItems, min/maxItems, anyOf / oneOf (one branch, not null), allOf, $ref into
  $defs / definitions, string formats; anything else falls back to a string), written as
  a model writes JSON (`", "` and `": "`, or compact with `disable_any_whitespace`);
  `json_object`: an object with one string member;
- `choice`: one of the choices; `regex`: a string the pattern matches in full, built from
  the parsed pattern (literals, classes, repeats at their minimum plus a few, the first
  branch of an alternation; lookarounds and backreferences are not followed);
- `grammar` and `structural_tag` are not interpreted: the output stays plain words.

The output keeps the length the engine drew for the request where the constraint allows: free
string values (no enum, format, pattern or length bound) are filled with the words of the
tokenizer's output pool until the text is as many tokens long; a constraint that cannot end
sooner (a long skeleton, a choice) makes the output longer, and one cut at `max_tokens` is cut
mid-text, finish_reason "length", as vLLM's would be.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

try:  # Python 3.11+
    import re._constants as sre_constants
    import re._parser as sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants  # type: ignore[no-redef]
    import sre_parse  # type: ignore[no-redef]

from server.errors import validation_error
from server.protocol import CONSTRAINT_FIELDS as CONSTRAINT_KINDS
from server.protocol import StructuredOutputsParams

_FORMATS = {"date": "2024-07-26", "date-time": "2024-07-26T12:00:00Z", "time": "12:00:00", "email": "user@example.com",
            "uri": "https://example.com", "url": "https://example.com", "uuid": "123e4567-e89b-12d3-a456-426614174000",
            "ipv4": "192.168.0.1", "ipv6": "::1", "hostname": "example.com"}
INTERPRETED = ("json", "json_object", "choice", "regex")  # the kinds whose text satisfies the constraint
_MAX_EXTRA_REPEATS = 3  # a regex repeat runs to its minimum plus up to this many
_FILL_ROUNDS = 8        # token-count adjustments before settling for the closest text
_CHARS_PER_TOKEN = 32   # more than any text's characters per token: max_tokens tokens fit in that many
_MAX_CHARS = 1 << 16    # a regex instance's bound, and a schema instance's by default (see schema_instance)


@dataclass(frozen=True)
class Constraint:
    """One structured-output constraint: `kind` (one of CONSTRAINT_KINDS) and its value."""
    kind: str
    spec: Any
    compact: bool = False  # disable_any_whitespace: JSON without optional spaces
    in_markup: bool = False  # a forced call its tool parser reads from its markup: nothing after the call reaches it


def constraint_of(structured_outputs, response_format) -> Constraint | None:
    """The constraint of a request's `structured_outputs` and `response_format` (protocol.py's models),
    merged as vLLM's extract_structured_outputs merges them (`response_format` wins), and checked as
    vLLM's StructuredOutputsParams and its grammar backend check them (400s)."""
    fields = structured_outputs.constraints() if structured_outputs is not None else dict.fromkeys(CONSTRAINT_KINDS)
    kind = getattr(response_format, "type", "text")
    if kind == "json_object":
        fields["json_object"] = True
    elif kind == "json_schema":
        fields["json"] = response_format.json_schema.json_schema
    elif kind == "structural_tag":
        fields["structural_tag"] = response_format.model_dump_json(by_alias=True)
    elif structured_outputs is None:
        return None
    given = [k for k in CONSTRAINT_KINDS if fields[k] is not None]
    if len(given) != 1:  # response_format added a second constraint, or json_schema had no schema
        params = structured_outputs if structured_outputs is not None else StructuredOutputsParams.model_construct()
        described = {**params.described(), **fields}
        state = "multiple are" if given else "none are"
        raise validation_error(f"You {'can only' if given else 'must'} use one kind of structured outputs "
                               f"constraint but {state} specified: {described}")
    kind = given[0]
    spec = fields[kind]
    if kind == "json" and isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError:
            raise validation_error("Invalid JSON grammar specification.") from None
    if kind == "regex":
        if "\x00" in spec:
            raise validation_error("structured_outputs.regex must not contain a NUL character ('\\x00')")
        try:
            re.compile(spec)
            regex_instance(spec, np.random.default_rng(0))
        except (re.error, ValueError, TypeError, RecursionError) as exc:
            raise validation_error(f"Failed to transform regex into a grammar: {exc}") from None
    if kind == "choice" and not spec:  # vLLM's backend check skips an empty list, and matches nothing else
        raise validation_error("XGrammar structured outputs backend does not support this structured outputs "
                               "specification")
    if kind == "json":
        try:  # a schema this generator cannot follow is one a grammar compiler would refuse too
            schema_instance(spec, np.random.default_rng(0), lambda: " x", budget=4096)
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
            raise validation_error(f"Failed to transform json schema into a grammar: {exc}") from None
    compact = structured_outputs is not None and structured_outputs.disable_any_whitespace
    return Constraint(kind, spec, compact)


# -- values ------------------------------------------------------------------------------
class FreeText:
    """A string value the filler may lengthen: its words."""
    __slots__ = ("words",)

    def __init__(self, words: list[str]) -> None:
        self.words = words

    def text(self) -> str:
        return "".join(self.words).strip()


def schema_instance(schema: Any, rng: np.random.Generator, word: Callable[[], str], budget: int = _MAX_CHARS) -> Any:
    """A value valid for a JSON schema. Strings without bounds are FreeText (see `render_json`). `budget`:
    about how many characters the value may take; past it arrays and strings stop growing (an output
    that long is cut at max_tokens anyway), so no schema can make a huge value."""
    return _Instance(rng, word, schema, budget).value(schema, 0)


class _Instance:
    """Builds one schema instance (see schema_instance)."""

    def __init__(self, rng: np.random.Generator, word: Callable[[], str], root: Any, budget: int) -> None:
        self.rng, self.root, self.left = rng, root, budget
        self._word = word

    def word(self) -> str:
        text = self._word()
        self.left -= len(text)
        return text

    def value(self, schema: Any, depth: int) -> Any:
        rng = self.rng
        if schema is True or not isinstance(schema, dict) or depth > 32:
            return FreeText([self.word()])
        if "$ref" in schema:
            target = _resolve(self.root, schema["$ref"])
            return self.value(target, depth + 1) if target is not None else FreeText([self.word()])
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return schema["enum"][int(rng.integers(len(schema["enum"])))]
        for key in ("anyOf", "oneOf"):  # one branch, as a model picks one (not null where another is allowed)
            if isinstance(schema.get(key), list) and schema[key]:
                branches = [b for b in schema[key] if not (isinstance(b, dict) and b.get("type") == "null")]
                branches = branches or schema[key]
                branch = branches[int(rng.integers(len(branches)))]
                if schema.get("type") == "object" and isinstance(branch, dict) and "type" not in branch:
                    branch = {**branch, "type": "object"}
                return self.value(branch, depth + 1)
        if isinstance(schema.get("allOf"), list):
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            for part in schema["allOf"]:
                part = _resolve(self.root, part["$ref"]) if isinstance(part, dict) and "$ref" in part else part
                if isinstance(part, dict):
                    merged["properties"] = {**merged.get("properties", {}), **part.get("properties", {})}
                    merged["required"] = [*merged.get("required", []), *part.get("required", [])]
                    merged.update({k: v for k, v in part.items() if k not in ("properties", "required")})
            return self.value(merged, depth + 1)
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), kind[0] if kind else None)
        if kind is None:
            kind = ("object" if "properties" in schema else "array" if "items" in schema or "prefixItems" in schema
                    else "string")
        if kind == "object":
            properties = schema.get("properties") or {}
            if not properties:
                return {"answer": FreeText([self.word()])}
            return {name: self.value(sub, depth + 1) for name, sub in properties.items()}
        if kind == "array":
            prefix = schema.get("prefixItems") or []
            low = max(int(schema.get("minItems", 1)), len(prefix))
            high = schema.get("maxItems")
            count = low if high is None else min(low, int(high))
            items: list = []
            for k in range(count):
                if self.left <= 0:
                    break
                items.append(self.value(prefix[k] if k < len(prefix) else schema.get("items", {}), depth + 1))
                self.left -= 2  # its separator
            return items
        if kind == "integer":
            low = int(schema.get("minimum", schema.get("exclusiveMinimum", -1) + 1))
            high = int(schema.get("maximum", schema.get("exclusiveMaximum", low + 101) - 1))
            return int(rng.integers(low, max(low, high) + 1))
        if kind == "number":
            low = float(schema.get("minimum", 0.0))
            high = float(schema.get("maximum", low + 100.0))
            return round(low + float(rng.random()) * (high - low), 2)
        if kind == "boolean":
            return bool(rng.integers(2))
        if kind == "null":
            return None
        return self.string(schema)

    def string(self, schema: dict) -> Any:
        if schema.get("format") in _FORMATS:
            return _FORMATS[schema["format"]]
        if isinstance(schema.get("pattern"), str):
            try:
                text = regex_instance(schema["pattern"].removeprefix("^").removesuffix("$"), self.rng)
                self.left -= len(text)
                return text
            except (re.error, ValueError):
                pass
        low, high = int(schema.get("minLength", 0)), schema.get("maxLength")
        words = [self.word()]
        while len("".join(words).strip()) < low and self.left > 0:
            words.append(self.word())
        if high is None:
            return FreeText(words)
        return "".join(words).strip()[:int(high)].ljust(min(low, int(high)), "x")


def _resolve(root: Any, ref: str) -> Any:
    """A local reference ("#/$defs/Name", "#/definitions/Name", "#"); None if it points nowhere."""
    if not isinstance(ref, str) or not ref.startswith("#"):
        return None
    node = root
    for part in filter(None, ref[1:].split("/")):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return node


def render_json(value: Any, compact: bool) -> str:
    """A value as a model writes JSON: with a space after ',' and ':' unless compact."""
    separators = (",", ":") if compact else (", ", ": ")
    return json.dumps(value, separators=separators, ensure_ascii=False,
                      default=lambda v: v.text() if isinstance(v, FreeText) else str(v))


def free_texts(value: Any) -> list[FreeText]:
    if isinstance(value, FreeText):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in free_texts(v)]
    if isinstance(value, list):
        return [t for v in value for t in free_texts(v)]
    return []


# -- regular expressions -------------------------------------------------------------------
def regex_instance(pattern: str, rng: np.random.Generator) -> str:
    """A string `pattern` matches in full (lookarounds and backreferences are not followed)."""
    return _emit(sre_parse.parse(pattern), rng)


def _emit(items, rng: np.random.Generator) -> str:
    out = []
    c = sre_constants
    for op, arg in items:
        if op is c.LITERAL:
            out.append(chr(arg))
        elif op is c.NOT_LITERAL:
            out.append("a" if arg != ord("a") else "b")
        elif op is c.ANY:
            out.append("a")
        elif op is c.IN:
            out.append(_class_member(arg))
        elif op in (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", None)):
            low, high, sub = arg
            high = low + _MAX_EXTRA_REPEATS if high is c.MAXREPEAT else high
            count = int(rng.integers(low, max(low, min(high, low + _MAX_EXTRA_REPEATS)) + 1))
            size = 0
            for _ in range(count):  # bounded: a huge repeat is cut at max_tokens anyway
                out.append(_emit(sub, rng))
                size += len(out[-1])
                if size > _MAX_CHARS:
                    break
        elif op is c.SUBPATTERN:
            out.append(_emit(arg[-1], rng))
        elif op is c.BRANCH:
            out.append(_emit(arg[1][0], rng))
        elif op is getattr(c, "ATOMIC_GROUP", None):
            out.append(_emit(arg, rng))
        elif op is c.CATEGORY:
            out.append(_category(arg))
        # AT (anchors), ASSERT / ASSERT_NOT (lookarounds), GROUPREF: nothing to emit
    return "".join(out)


def _category(category) -> str:
    c = sre_constants
    return {c.CATEGORY_DIGIT: "7", c.CATEGORY_NOT_DIGIT: "a", c.CATEGORY_SPACE: " ", c.CATEGORY_NOT_SPACE: "a",
            c.CATEGORY_WORD: "a", c.CATEGORY_NOT_WORD: " "}.get(category, "a")


def _class_member(items) -> str:
    """A character of a [...] class."""
    c = sre_constants
    if items and items[0][0] is c.NEGATE:
        excluded = {chr(a) for op, a in items[1:] if op is c.LITERAL}
        return next((ch for ch in "abcdefghijklmnopqrstuvwxyz0123456789 " if ch not in excluded), "~")
    op, arg = items[0]
    if op is c.LITERAL:
        return chr(arg)
    if op is c.RANGE:
        return chr(arg[0])
    if op is c.CATEGORY:
        return _category(arg)
    return "a"


# -- token-exact text ------------------------------------------------------------------------
class StructuredText:
    """Texts satisfying one constraint, as a tokenizer's tokens (see the module docstring): json,
    json_object, choice or regex (INTERPRETED)."""

    def __init__(self, constraint: Constraint, tokenizer, words: list[str]) -> None:
        self.constraint = constraint
        self.tokenizer = tokenizer
        self.words = [w for w in words if w[:1].isspace()] or [" the"]

    def text(self, target: int, rng: np.random.Generator, max_tokens: int) -> str:
        """A text of the constraint about `target` tokens long (longer if it cannot end sooner; no longer
        than `max_tokens` tokens need, since it is cut there)."""
        kind, spec = self.constraint.kind, self.constraint.spec
        if kind == "choice":
            return str(spec[int(rng.integers(len(spec)))])
        if kind == "regex":
            return regex_instance(spec, rng)

        def word() -> str:
            return self.words[int(rng.integers(len(self.words)))]
        if kind == "json":
            value = schema_instance(spec, rng, word, budget=_CHARS_PER_TOKEN * max_tokens + 1024)
        else:
            value = {"answer": FreeText([word()])}
        return self._fill(value, target, word)

    def _fill(self, value: Any, target: int, word: Callable[[], str]) -> str:
        """`value` written as JSON, its free strings lengthened (or shortened) to `target` tokens."""
        slots = free_texts(value)
        best = render_json(value, self.constraint.compact)
        for round_ in range(_FILL_ROUNDS):
            text = render_json(value, self.constraint.compact)
            count = len(self.tokenizer.encode(text, add_special_tokens=False))
            if count <= target:
                best = text
            if count == target or not slots:
                break
            if count < target:
                for k in range(target - count):
                    slots[(k + round_) % len(slots)].words.append(word())
            else:
                excess = count - target
                for slot in sorted(slots, key=lambda s: -len(s.words)):
                    cut = min(excess, len(slot.words) - 1)
                    if cut > 0:
                        del slot.words[-cut:]
                        excess -= cut
                if excess == count - target:  # nothing left to shorten
                    break
        return best if slots else render_json(value, self.constraint.compact)

    def tokens(self, text: str) -> tuple[list[int], list[str]]:
        """The token ids of `text` and the text each adds to a stream."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        decode = self.tokenizer.decode
        pieces = [decode([i]) for i in ids]
        if "".join(pieces) != text:  # a tokenizer whose tokens do not decode alone: prefix by prefix
            pieces, done = [], ""
            for k in range(len(ids)):
                upto = decode(ids[:k + 1])
                pieces.append(upto[len(done):])
                done = upto
        return ids, pieces
