"""What a simulated request will say, decided when it arrives.

No model runs, so each choice's output is fixed up front, reproducibly as vLLM's sampler is (see `rng_for`):

- its length: `max_tokens` with `ignore_eos` (or when `min_tokens == max_tokens`);
  otherwise a draw from a real length distribution, kept within
  [min_tokens, max_tokens]. A draw shorter than `max_tokens` ends in EOS
  (finish_reason "stop"), one that reaches it ends with "length";
- its token ids: words drawn from the tokenizer's output pool, then the EOS id
  when it stops on EOS; a chat reply begins with a word of its own pool, with no
  space before it. Knowing them up front lets the engine hash the blocks a
  follow-up chat turn would send back (prefix caching);
- stop strings and stop token ids: if the text would contain one (at or after
  `min_tokens`), the output ends there with finish_reason "stop" and that
  `stop_reason`, and the text is cut as vLLM's detokenizer cuts it (with no
  tokenizer, `detokenize` off, the tokens add no text and stop strings never match);
- a structured output (`StopRules.structure`, see structured.py): a text that satisfies the
  constraint, about the drawn length, then EOS (or the stop token its `end_token` names: a gpt-oss
  call's `<|call|>`, reported as the stop_reason); or cut at `max_tokens`;
- a chat reply of a model that thinks (`StopRules.thinking`, see reasoning.py): its reasoning between
  the think markers, then the answer, laid out over the drawn length (cut at `max_tokens`).

The default length distribution is the completion lengths of the Azure LLM
inference trace 2023, conversation service (19,366 requests; Splitwise, ISCA 2024;
CC-BY-4.0): its 2 % quantiles, sampled with linear interpolation.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from server.reasoning import ThinkingPlan
    from server.structured import StructuredText

GREEDY_EPS = 1e-5  # vLLM's _SAMPLING_EPS: a lower temperature samples greedily
MIN_TEMPERATURE = 0.01  # vLLM raises a lower positive temperature to this
ANSWER_SHARE = 4  # of a thinking reply's words, the answer takes a quarter (reasoning.py)

AZURE_CONV_2023_QUANTILES = np.array([
    7, 24, 38, 44, 49, 54, 59, 64, 69, 73, 77, 81, 84, 86, 89, 91, 93, 95, 97, 100, 103, 107, 110, 116, 122,
    129, 137, 145, 156, 163, 177, 190, 216, 237, 375, 384, 390, 394, 396, 397, 400, 404, 410, 414, 417, 424,
    429, 442, 468, 540, 1000], dtype=float)


@dataclass(frozen=True)
class StopRules:
    ignore_eos: bool = False
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    structure: StructuredText | None = None  # what the output must be (structured outputs, forced tool calls)
    detokenize: bool = True  # False: vLLM's no-op detokenizer (no tokenizer): no text, stop strings never match
    eos_text: str = ""  # what a final EOS adds to the text (vLLM's detokenizer: kept stop token, special tokens kept)
    special_eos_text: str = ""  # what an EOS that stops nothing (ignore_eos) adds: its text where special tokens show
    thinking: ThinkingPlan | None = None  # a reply's reasoning markup (a reasoning parser, thinking on)


@dataclass(frozen=True)
class Sampling:
    """The sampling parameters that decide which tokens a model picks (where it stops is the StopRules'), as
    vLLM's engine applies them: greedy below GREEDY_EPS, where top-p, top-k and min-p play no part."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    allowed_token_ids: tuple[int, ...] = ()
    bad_words: tuple[str, ...] = ()

    @classmethod
    def of(cls, req, defaults: dict | None = None) -> Sampling:
        """Those of a request (chat, completion, Responses, or an engine view of SamplingParams): a field it
        leaves unset is the server's default (`defaults`: its model's generation config's, as vLLM's
        to_sampling_params takes it), else vLLM's own (temperature 1.0, ...)."""
        if req is None or isinstance(req, Sampling):
            return req or cls.of(SimpleNamespace(), defaults)
        defaults = defaults or {}

        def value(name: str, default):
            got = getattr(req, name, None)
            return defaults.get(name, default) if got is None else got
        temperature = float(value("temperature", 1.0))
        if 0 < temperature < MIN_TEMPERATURE:
            temperature = MIN_TEMPERATURE
        top_k = int(value("top_k", 0))
        return cls(temperature, float(value("top_p", 1.0)), top_k if top_k > 0 else 0, float(value("min_p", 0.0)),
                   float(value("presence_penalty", 0.0)), float(value("frequency_penalty", 0.0)),
                   float(value("repetition_penalty", 1.0)),
                   tuple(sorted((int(k), float(v)) for k, v in value("logit_bias", {}).items())),
                   tuple(sorted(set(value("allowed_token_ids", ())))), tuple(sorted(set(value("bad_words", ())))))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    def identity(self) -> bytes:
        """What of these parameters changes the output (a greedy sampler's: not temperature, top-p/k, min-p)."""
        fields = (self.presence_penalty, self.frequency_penalty, self.repetition_penalty, self.logit_bias,
                  self.allowed_token_ids, self.bad_words)
        if not self.greedy:
            fields = (self.temperature, self.top_p, self.top_k, self.min_p, *fields)
        return repr(fields).encode()


@dataclass
class PlannedOutput:
    """One choice's whole output, known before the engine runs it."""
    token_ids: np.ndarray  # every token the engine will produce (EOS included)
    pieces: list[str]      # the text each token adds to the stream ("" for EOS)
    stop_reason: str | int | None  # the stop string or token id that ends it, if any
    ends_with_stop: bool   # finish_reason "stop" when the engine emits the last token
    thinks: bool = False   # laid out as reasoning then answer (reasoning.py)

    @property
    def length(self) -> int:
        return len(self.token_ids)


class OutputPlanner:
    """Draws outputs from a tokenizer's word pool and the length distribution."""

    def __init__(self, output_pool: list[tuple[int, str]], eos_token_id: int | None, seed: int = 0,
                 reply_start_pool: list[tuple[int, str]] | None = None) -> None:
        self.pool_ids = np.array([i for i, _ in output_pool], dtype=np.int64)
        self.pool_text = [t for _, t in output_pool]
        # Two marks in a row (".,") would be one token to a BPE tokenizer: a mark never follows a mark.
        self.is_mark = np.array([not t[:1].isspace() for t in self.pool_text])
        self.words = np.flatnonzero(~self.is_mark)
        self.reply_start = reply_start_pool or output_pool
        self.eos_token_id = eos_token_id
        self._rng = np.random.default_rng(seed)

    def rng_for(self, seed: int | None, choice: int, prompt: Sequence[int] | np.ndarray = (),
                sampling: Sampling | None = None, model: str = "") -> np.random.Generator:
        """The random stream choice `choice` of a request is drawn from, as vLLM's sampler decides its tokens:
        greedy sampling (`sampling.greedy`) is a function of the prompt, the model and the parameters that
        change the output, so every such request (and each of its n choices) says the same; a `seed` fixes the
        sampler's random stream, which still picks from what the prompt makes likely: the same (prompt, seed,
        parameters) says the same, another prompt something else. vLLM gives child c of n > 1 the seed
        `seed + c` (ParentRequest), so child 1 of seed 42 says what seed 43 says alone. Otherwise the server's
        own stream: random."""
        greedy = sampling is not None and sampling.greedy
        if seed is None and not greedy:
            return self._rng
        key = hashlib.blake2b(digest_size=16)
        key.update(b"greedy" if greedy else b"seed %d" % ((seed + choice) & (2**64 - 1)))
        key.update((sampling or Sampling()).identity())
        key.update(model.encode())
        key.update(np.asarray(prompt, dtype=np.int64).tobytes())
        digest = key.digest()
        return np.random.default_rng([int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")])

    def draw_length(self, rng: np.random.Generator) -> int:
        q = rng.random() * (len(AZURE_CONV_2023_QUANTILES) - 1)
        low = int(q)
        high = min(low + 1, len(AZURE_CONV_2023_QUANTILES) - 1)
        table = AZURE_CONV_2023_QUANTILES
        value = table[low] + (q - low) * (table[high] - table[low])
        return max(1, int(round(value)))

    def plan(self, max_tokens: int, rules: StopRules, rng: np.random.Generator, reply: bool = False) -> PlannedOutput:
        """The output of one choice that may produce up to `max_tokens` tokens (a chat `reply`
        begins with a word of the reply pool)."""
        if rules.ignore_eos or rules.min_tokens >= max_tokens or self.eos_token_id is None:
            length, eos = max_tokens, False
            body = length  # what the reply would say before an EOS
        else:
            drawn = max(self.draw_length(rng), rules.min_tokens)
            length, eos = (drawn, True) if drawn < max_tokens else (max_tokens, False)
            body = drawn - 1
        if rules.structure is not None:
            output = self._structured(rules.structure, max_tokens, length - 1 if eos else length + 1, rng,
                                      rules.special_eos_text if rules.ignore_eos else None)
        elif rules.thinking is not None and reply:
            output = self._thinking(rules.thinking, body, length - eos, eos, rng)
        else:
            output = self._words(length, eos, rng, reply)
        if rules.eos_text and output.ends_with_stop and not (rules.structure and rules.structure.constraint.in_markup):
            output.pieces[-1] = rules.eos_text
        if rules.stop_token_ids:
            output = _cut_at_stop_token(output, rules)
        if not rules.detokenize:
            return PlannedOutput(output.token_ids, [""] * output.length, output.stop_reason, output.ends_with_stop)
        if rules.stop:
            output = _cut_at_stop_string(output, rules)
        return output

    def _words(self, length: int, eos: bool, rng: np.random.Generator, reply: bool) -> PlannedOutput:
        """`length` tokens of words (the last EOS if `eos`). The reply's first word is drawn before the others,
        which numpy draws in order: a shorter output from the same stream says the first words of a longer one
        (greedy vLLM cut by a lower max_tokens says a prefix of what it says with a higher one)."""
        start = self.reply_start[int(rng.integers(0, len(self.reply_start)))] if reply else None
        picks = rng.integers(0, len(self.pool_ids), size=length)
        repeated = np.flatnonzero(self.is_mark[picks[1:]] & self.is_mark[picks[:-1]]) + 1
        picks[repeated] = self.words[picks[repeated] % len(self.words)]
        ids = self.pool_ids[picks]
        pieces = [self.pool_text[p] for p in picks.tolist()]
        if start is not None and length:
            ids[0], pieces[0] = start
        if eos:
            ids[-1] = self.eos_token_id
            pieces[-1] = ""
        return PlannedOutput(ids, pieces, None, eos)

    def _thinking(self, plan: ThinkingPlan, body: int, keep: int, eos: bool, rng: np.random.Generator) -> PlannedOutput:
        """A reply that thinks (reasoning.py): `body` tokens laid out as markup, reasoning words and answer words
        (at least one), of which the first `keep` are said, then EOS if it stops."""
        markup = 2 + 2 * len(plan.newline) + len(plan.blank)
        words = max(max(body, keep) - markup, 1)
        answer = max(1, words // ANSWER_SHARE)
        inner = [*plan.newline, *self._reply_words(words - answer, rng), *plan.newline]
        if plan.budget is not None and len(inner) > plan.budget:  # vLLM's sampler ends the thinking there
            answer += len(inner) - plan.budget
            inner = inner[:plan.budget]
        said = self._reply_words(answer, rng)
        tokens = [plan.start, *inner, plan.end, *plan.blank, *said][:keep]
        if eos:
            tokens.append((self.eos_token_id, ""))
        return PlannedOutput(np.array([i for i, _ in tokens], dtype=np.int64), [t for _, t in tokens], None, eos,
                             thinks=True)

    def _reply_words(self, count: int, rng: np.random.Generator) -> list[tuple[int, str]]:
        """`count` words as a reply's (the first without a space), with the text each adds."""
        if count <= 0:
            return []
        words = self._words(count, False, rng, True)
        return list(zip(words.token_ids.tolist(), words.pieces))

    def _structured(self, structure: StructuredText, max_tokens: int, target: int, rng: np.random.Generator,
                    ignored_eos: str | None = None) -> PlannedOutput:
        """A text of the constraint about `target` tokens long, then EOS; cut at `max_tokens` when longer
        (a model under a grammar cannot stop before the text is complete). `ignored_eos` (ignore_eos: the EOS's
        text as shown): a text that ends before `max_tokens` is followed by the EOS, which stops nothing, and the
        grammar, ended, leaves the rest unconstrained words (vLLM's structured output manager opens the whole
        vocabulary to a terminated grammar, v1/structured_output/__init__.py)."""
        ids, pieces = structure.tokens(structure.text(max(target, 0), rng, max_tokens))
        # a text that ends on a stop token of the model's generation config other than its EOS (a gpt-oss
        # call's <|call|>): vLLM's check_stop reports that token as the stop_reason
        end = getattr(structure, "end_token", None)
        if len(ids) >= max_tokens or (end is None and self.eos_token_id is None):
            return PlannedOutput(np.array(ids[:max_tokens], dtype=np.int64), pieces[:max_tokens], None, False)
        last = self.eos_token_id if end is None else end
        if ignored_eos is not None and end is None:
            rest = self._words(max_tokens - len(ids) - 1, False, rng, False)
            return PlannedOutput(np.array([*ids, last, *rest.token_ids.tolist()], dtype=np.int64),
                                 [*pieces, ignored_eos, *rest.pieces], None, False)
        return PlannedOutput(np.array([*ids, last], dtype=np.int64), [*pieces, ""], end, True)


def _cut_at_stop_token(output: PlannedOutput, rules: StopRules) -> PlannedOutput:
    stops = set(rules.stop_token_ids)
    for k in range(rules.min_tokens, output.length):
        token = int(output.token_ids[k])
        if token in stops:  # the stop token counts as output, its text is not shown
            pieces = output.pieces[:k + 1]
            pieces[k] = ""
            return PlannedOutput(output.token_ids[:k + 1], pieces, token, True)
    return output


def _cut_at_stop_string(output: PlannedOutput, rules: StopRules) -> PlannedOutput:
    """End at the first token whose text completes a stop string, as vLLM's detokenizer does."""
    text = ""
    for k, piece in enumerate(output.pieces):
        before = len(text)
        text += piece
        if k + 1 <= rules.min_tokens:
            continue
        # only matches that end inside the newly added text are new
        window = max(0, before - max(len(s) for s in rules.stop) + 1)
        hits = [(text.find(s, window), s) for s in rules.stop]
        hits = [(at, s) for at, s in hits if at >= 0 and at + len(s) > before]
        if not hits:
            continue
        at, stop = min(hits)
        keep_to = at + len(stop) if rules.include_stop_str_in_output else at
        pieces = output.pieces[:k + 1]
        # the last token's text is what remains of the kept text after the earlier tokens
        pieces[k] = text[before:keep_to] if keep_to > before else ""
        if keep_to < before:  # the stop string began in earlier tokens: vLLM truncates the text
            return _truncate_text(PlannedOutput(output.token_ids[:k + 1], pieces, stop, True), keep_to)
        return PlannedOutput(output.token_ids[:k + 1], pieces, stop, True)
    return output


def _truncate_text(output: PlannedOutput, keep: int) -> PlannedOutput:
    """Cut the pieces so their joined text is `keep` characters long."""
    pieces, total = [], 0
    for piece in output.pieces:
        room = max(0, keep - total)
        pieces.append(piece[:room])
        total += len(piece)
    return PlannedOutput(output.token_ids, pieces, output.stop_reason, output.ends_with_stop)
