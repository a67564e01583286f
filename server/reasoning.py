"""`--reasoning-parser`: what the simulated model thinks, and how vLLM 0.33's parser presents it.

With a reasoning parser whose markup is simulated (REASONING_FORMATS), a chat reply is planned as the model
writes one (generation.py, from the ThinkingPlan): `<think>`, a newline, the reasoning, a newline, `</think>`,
a blank line, then the answer, then EOS. The tokens are the engine's, so the length drawn and the timing are
unchanged: of the tokens before EOS, the markup takes its own, the answer a quarter of the rest (at least one
word) and the reasoning the rest; an output cut by `max_tokens` is that layout, over the length drawn, cut
there (a short `max_tokens` ends inside the reasoning). A `thinking_token_budget` ends the reasoning after
that many tokens (vLLM's sampler forces `</think>` then), the answer taking the tokens it leaves.
Qwen3's parser honours the template's `enable_thinking` (false: the model answers without thinking, and
the parser reads everything as content); DeepSeek-R1's thinks whatever the template says.

The output is split as vLLM's parsers split it (`vllm/reasoning/basic_parsers.py`,
`deepseek_r1_reasoning_parser.py`, `vllm/parser/qwen3.py`; tests/test_reasoning_vllm.py compares): the
message's `reasoning` is the text between the markers, its `content` what follows `</think>` (null when
nothing does: an output cut inside the reasoning); streamed, `delta.reasoning` chunks come before
`delta.content`, a chunk of a marker alone is not sent. `usage.completion_tokens_details.reasoning_tokens`
counts the tokens between the markers (the markers are completion tokens, not reasoning ones). A structured
output or a forced tool call thinks first too (ThinkingFirst): vLLM's engine applies their grammar only once the
reasoning has ended (resolve_reasoning_ended), so the constrained text follows the end marker; with
`include_reasoning: false` the grammar holds from the first token and there is no reasoning. A reply that
continues the last message (echo) or has thinking off is all content.

gpt-oss models are read with Harmony whatever the parser (server/harmony.py: `ChatReasoning.harmony`).

Other parser names vLLM registers keep their request adjustments (tool_parsers.py) but their markup is not
simulated: a warning at start-up says so, and their replies are all content; a name vLLM does not register
stops the start-up with vLLM's error. The Messages API (a thinking block) and the Responses API (a reasoning
item) present the same split.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from server.harmony import HarmonyChat, uses_harmony, word_planner

if TYPE_CHECKING:
    from profiles.tokenizer import Tokenizer
    from server.generation import PlannedOutput
    from server.serving import Serving
    from server.structured import StructuredText

log = logging.getLogger("vllm_emulator.server")


@dataclass(frozen=True)
class ReasoningFormat:
    """A vLLM reasoning parser's markup, as far as the emulator simulates it."""
    start: str
    end: str
    honours_enable_thinking: bool  # Qwen3's: chat_template_kwargs.enable_thinking false means no reasoning
    base_thinking: bool            # vLLM's BaseThinkingReasoningParser family (DeepSeek-R1's streaming rules)


_THINK = ReasoningFormat("<think>", "</think>", honours_enable_thinking=False, base_thinking=True)
# vLLM 0.33's registered names (vllm/reasoning/__init__.py) whose markup is simulated
REASONING_FORMATS: dict[str, ReasoningFormat] = {
    "deepseek_r1": _THINK,   # DeepSeekR1ReasoningParser
    "step5": _THINK,         # registered with DeepSeekR1ReasoningParser too
    "qwen3": ReasoningFormat("<think>", "</think>", honours_enable_thinking=True, base_thinking=False),
}


# every --reasoning-parser name vLLM 0.33 registers (vllm/reasoning/__init__.py); a plugin's cannot be loaded here
REGISTERED = frozenset({
    "beam", "cohere_command3", "cohere_command4", "deepseek_r1", "deepseek_v3", "deepseek_v4", "deepseek_v41",
    "ernie45", "gemma4", "glm45", "glm47", "granite", "granite_thinking_parser", "hf", "holo2", "hunyuan_a13b",
    "hy_v3", "hy_v4", "inkling", "k2_horizon", "kimi_k2", "kimi_k3", "ling3", "mimo", "minicpmv", "minimax_m2",
    "minimax_m2_append_think", "minimax_m3", "mistral", "muse", "muse_glimmer", "musespark1x", "nemotron_v3",
    "olmo3", "openai_gptoss", "plamo3", "poolside_v1", "qwen3", "seed_oss", "step3", "step3p5", "step5"})


def parser_name(value: str | None, plugin: str | None = None) -> str | None:
    """--reasoning-parser as vLLM reads it: "none" (any case) or empty is unset; a name it does not register
    stops the start-up with its error (vLLM's validate_api_server_args KeyError, raised here as ValueError),
    unless --reasoning-parser-plugin may register it."""
    if not value or value.lower() == "none":
        return None
    if value not in REGISTERED and not plugin:
        raise ValueError(f"invalid reasoning parser: {value} (chose from {{ {','.join(sorted(REGISTERED))} }})")
    return value


@dataclass(frozen=True)
class ThinkingPlan:
    """The tokens a thinking reply is built of (ids with the text each adds), and its thinking budget."""
    start: tuple[int, str]
    end: tuple[int, str]
    newline: tuple[tuple[int, str], ...]
    blank: tuple[tuple[int, str], ...]
    budget: int | None = None  # thinking_token_budget: tokens between the markers at most


def _single_token(tokenizer: Tokenizer, text: str) -> int | None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def _pieces(tokenizer: Tokenizer, text: str) -> tuple[tuple[int, str], ...]:
    return tuple((i, tokenizer.decode([i], skip_special_tokens=False))
                 for i in tokenizer.encode(text, add_special_tokens=False))


@dataclass(frozen=True)
class ReasoningMarkup:
    """A simulated parser's markup in one tokenizer: the marker token ids and the plan's markup tokens."""
    parser: str
    format: ReasoningFormat
    start_id: int
    end_id: int
    plan: ThinkingPlan


def reasoning_markup(parser: str | None, tokenizer: Tokenizer) -> ReasoningMarkup | None:
    """The markup of `parser` in `tokenizer` (None: no parser, one not simulated, or a tokenizer without its
    markers as single tokens, where vLLM's parser could not locate them)."""
    fmt = REASONING_FORMATS.get(parser) if parser else None
    if fmt is None:
        return None
    start, end = _single_token(tokenizer, fmt.start), _single_token(tokenizer, fmt.end)
    if start is None or end is None:
        return None
    plan = ThinkingPlan((start, fmt.start), (end, fmt.end), _pieces(tokenizer, "\n"), _pieces(tokenizer, "\n\n"))
    return ReasoningMarkup(parser, fmt, start, end, plan)


def warn_unsimulated(parser: str | None, tokenizers: dict[str, Tokenizer]) -> None:
    """Say at start-up where `--reasoning-parser` changes no reply: a parser whose markup is not simulated,
    or a served model whose tokenizer lacks the markers (vLLM's parser would fail to build there)."""
    if not parser:
        return
    fmt = REASONING_FORMATS.get(parser)
    if parser == "openai_gptoss":  # gpt-oss's: its reading is Harmony's, chosen by the model's type (harmony.py)
        return
    if fmt is None:
        log.warning("--reasoning-parser %s: its output markup is not simulated (simulated: %s); replies carry "
                    "no reasoning, only its request adjustments apply", parser, ", ".join(sorted(REASONING_FORMATS)))
        return
    for name, tokenizer in tokenizers.items():
        if reasoning_markup(parser, tokenizer) is None:
            log.warning("--reasoning-parser %s: the tokenizer of %s (%s) has no %s/%s tokens (vLLM's parser "
                        "could not locate them); its replies carry no reasoning", parser, name,
                        getattr(tokenizer, "name", type(tokenizer).__name__), fmt.start, fmt.end)


def thinks(markup: ReasoningMarkup | None, template_kwargs: dict) -> bool:
    """Whether the model thinks before answering: Qwen3's parser (and template) follow enable_thinking."""
    if markup is None:
        return False
    return not markup.format.honours_enable_thinking or template_kwargs.get("enable_thinking", True) is not False


def split(text: str, fmt: ReasoningFormat = _THINK) -> tuple[str | None, str | None]:
    """A whole output as vLLM's parsers split it: (reasoning, content); content None when nothing follows
    the end marker, reasoning the whole text (start marker removed) when there is no end marker."""
    before, marker, after = text.partition(fmt.start)
    text = after if marker else before
    if fmt.end not in text:
        return text, None
    reasoning, _, content = text.partition(fmt.end)
    return reasoning, content or None


def count_reasoning_tokens(markup: ReasoningMarkup, token_ids) -> int:
    """The tokens between the markers (vLLM's count_reasoning_tokens: the markers themselves are not counted)."""
    count = depth = 0
    for token in token_ids:
        if token == markup.start_id:
            depth += 1
        elif token == markup.end_id:
            depth = max(0, depth - 1)
        elif depth:
            count += 1
    return count


class ReasoningStream:
    """One choice's stream deltas as vLLM's parser streams them: each chunk's text (its tokens' pieces) as a
    delta dict of `reasoning` and/or `content`, or None where vLLM sends no chunk."""

    def __init__(self, markup: ReasoningMarkup, include_reasoning: bool = True) -> None:
        self.markup = markup
        self.include_reasoning = include_reasoning
        self.seen_start = False
        self.seen_end = False

    def delta(self, token_ids: list[int], pieces: list[str]) -> dict | None:
        m = self.markup
        if m.format.base_thinking:
            out = self._base_thinking(token_ids, "".join(pieces))
        else:
            out = self._engine(token_ids, pieces)
        self.seen_start |= m.start_id in token_ids
        self.seen_end |= m.end_id in token_ids
        if out is None or self.include_reasoning:
            return out
        # vLLM's parse_delta without include_reasoning: reasoning set to None; nothing left to say, no chunk
        if not out.get("content"):
            return None
        return {"content": out["content"], "reasoning": None}

    def _base_thinking(self, ids: list[int], text: str) -> dict | None:
        """BaseThinkingReasoningParser.extract_reasoning_streaming with DeepSeek-R1's override."""
        m, fmt = self.markup, self.markup.format
        if len(ids) == 1 and ids[0] in (m.start_id, m.end_id):
            return None
        start_in, end_in = m.start_id in ids, m.end_id in ids
        if self.seen_start or start_in:
            if self.seen_start and not end_in:
                return {"content": text} if self.seen_end else {"reasoning": text}
            if end_in:
                at = text.find(fmt.end)
                first = text.find(fmt.start) + len(fmt.start) if not self.seen_start else 0
                return {"content": text[at + len(fmt.end):] or None, "reasoning": text[first:at]}
            return {"reasoning": text}  # start marker in this chunk: its text is kept, as vLLM's
        if end_in:  # (DeepSeek-R1: no start marker at all, the reasoning began in the prompt)
            at = text.find(fmt.end)
            return {"content": text[at + len(fmt.end):] or None, "reasoning": text[:at]}
        return {"content": text} if self.seen_end else {"reasoning": text}

    def _engine(self, ids: list[int], pieces: list[str]) -> dict | None:
        """vLLM's parser engine (Qwen3's): the markers dropped, text before the end marker reasoning, after it
        content; a chunk with nothing to say sends nothing."""
        m = self.markup
        reasoning, content = [], []
        ended = self.seen_end
        for token, piece in zip(ids, pieces):
            if token == m.end_id:
                ended = True
            elif token != m.start_id:
                (content if ended else reasoning).append(piece)
        out = {}
        if "".join(content) or (ended and content):
            out["content"] = "".join(content)
        if "".join(reasoning):
            out["reasoning"] = "".join(reasoning)
        return out or None


@dataclass(frozen=True)
class ThinkingFirst:
    """A structured reply that thinks first, as the planner reads a structure (generation.py `_structured`: `text`
    lays it out over about `target` tokens, `tokens` hands them over): the thinking layout (markers, reasoning
    words, a thinking budget) then the structured text right after the end marker (the grammar, on from there,
    allows no blank first), the answer taking a quarter of the words as other replies."""
    plan: ThinkingPlan
    answer: StructuredText

    @property
    def constraint(self):
        return self.answer.constraint

    def text(self, target: int, rng, max_tokens: int) -> list[tuple[int, str]]:
        from server.generation import ANSWER_SHARE, StopRules

        plan, tokenizer = self.plan, self.answer.tokenizer
        markup = 2 + 2 * len(plan.newline)
        words = max(target - markup, 2)
        ids, pieces = self.answer.tokens(self.answer.text(max(1, words // ANSWER_SHARE), rng, max_tokens))
        thinking = word_planner(tokenizer).plan(max(words - len(ids), 1), StopRules(ignore_eos=True), rng, reply=True)
        inner = [*plan.newline, *zip(thinking.token_ids.tolist(), thinking.pieces), *plan.newline]
        if plan.budget is not None:  # vLLM's sampler ends the thinking there
            inner = inner[:plan.budget]
        return [plan.start, *inner, plan.end, *zip(ids, pieces)]

    @staticmethod
    def tokens(layout: list[tuple[int, str]]) -> tuple[list[int], list[str]]:
        return [i for i, _ in layout], [p for _, p in layout]


@functools.lru_cache(maxsize=None)
def _markup_of(parser: str | None, tokenizer: Tokenizer) -> ReasoningMarkup | None:
    return reasoning_markup(parser, tokenizer)


class ChatReasoning:
    """What a server's reasoning parser does to one chat request's reply: its plan (`thinking`, for
    generation.py), the message's fields, its stream deltas and its usage's reasoning tokens."""

    def __init__(self, serving: Serving, req) -> None:
        from server.render_api import effective_template_kwargs  # (render_api imports chat, which imports this)

        parser = serving.options.reasoning_parser
        self.active = parser is not None  # vLLM reports reasoning tokens, hides metadata, with any parser
        self.include_reasoning = getattr(req, "include_reasoning", True)
        # a gpt-oss model is read with Harmony whatever the parser (server/harmony.py): no think markup
        self.harmony = HarmonyChat(serving, req) if uses_harmony(serving, req.model) else None
        markup = _markup_of(parser, serving.tokenizer_for(req.model)) if parser and self.harmony is None else None
        if markup is not None and markup.format.honours_enable_thinking:
            markup = markup if thinks(markup, effective_template_kwargs(serving, req)) else None
        self.markup = markup
        budget = getattr(req, "thinking_token_budget", None)
        self.thinking = None if self.markup is None else dataclasses.replace(self.markup.plan, budget=budget)

    @property
    def hides_metadata(self) -> bool:
        """vLLM drops logprobs and token ids where they would show hidden reasoning (include_reasoning false)."""
        if self.harmony is not None:  # (its HarmonyParser: with a tool parser alone too)
            return self.harmony.parsing and not self.include_reasoning
        return self.active and not self.include_reasoning

    def thinks(self, plan: PlannedOutput) -> bool:
        """Whether a choice's reply thinks: planned so, or a structured reply that reasons first (it opens with the
        start marker, which no other reply writes)."""
        if self.markup is None:
            return False
        return plan.thinks or (plan.length > 0 and int(plan.token_ids[0]) == self.markup.start_id)

    def thinks_first(self) -> bool:
        """Whether a structured reply (a structured output, a forced call) thinks first: with thinking on and
        reasoning included, vLLM's engine applies the grammar only once the reasoning has ended (the request's
        resolve_reasoning_ended: the parser finds no end marker in the prompt)."""
        return self.thinking is not None and self.include_reasoning

    def structured(self, structure: StructuredText | None):
        """What a structured reply's planner is handed (serving.generate's `structure`): its reasoning first
        where it thinks first."""
        if structure is None or not self.thinks_first():
            return structure
        return ThinkingFirst(self.thinking, structure)

    @property
    def end_marker(self) -> str | None:
        """The text that ends a structured reply's reasoning (None: it has none)."""
        return self.markup.format.end if self.thinks_first() else None

    def stream(self, plan: PlannedOutput) -> ReasoningStream | None:
        """A choice's stream parser (None: its reply is all content)."""
        return ReasoningStream(self.markup, self.include_reasoning) if self.thinks(plan) else None

    def fields(self, plan: PlannedOutput, text: str) -> tuple[str | None, str | None]:
        """A whole reply's (reasoning, content)."""
        if not self.thinks(plan):
            return None, text
        reasoning, content = split(text, self.markup.format)
        return (reasoning if self.include_reasoning else None), content

    def tokens(self, plan: PlannedOutput, n: int) -> int:
        """The reasoning tokens among a choice's first `n` output tokens."""
        if self.harmony is not None:
            return self.harmony.reasoning_tokens(plan.token_ids[:n].tolist())
        return count_reasoning_tokens(self.markup, plan.token_ids[:n].tolist()) if self.thinks(plan) else 0

    def details(self, reasoning_tokens: int) -> dict | None:
        """usage.completion_tokens_details (vLLM's, with any reasoning parser)."""
        return {"reasoning_tokens": reasoning_tokens} if self.active else None
