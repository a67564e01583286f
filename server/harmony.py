"""gpt-oss's Harmony format, as vLLM 0.33 serves a gpt-oss model (`vllm/parser/harmony.py`,
`entrypoints/openai/parser/harmony_utils.py`).

vLLM picks Harmony by the model's type (`hf_config.model_type == "gpt_oss"`), not by a flag: such a model
writes messages on channels, each `<|channel|>NAME<|message|>TEXT<|end|>`, the next opened with
`<|start|>assistant`. The simulated gpt-oss does as the real one: it reasons on the `analysis` channel, then
answers on `final`, or (a forced call) calls a tool on `commentary to=functions.NAME <|constrain|>json`; the
tokenizer's EOS `<|return|>` ends an answer, `<|call|>` a call (a stop token of the model's generation config,
so vLLM reports it as the stop_reason, 200012). A structured output is written on `final` after
the analysis, as vLLM's HarmonyParser.adjust_request lets it (an optional analysis, then the constrained final).
Of the words, the answer takes a quarter, as other thinking replies (server/reasoning.py).

What the client sees depends on the server's parsers. With `--reasoning-parser openai_gptoss` and/or
`--enable-auto-tool-choice --tool-call-parser openai` vLLM reads the output with its HarmonyParser (by token
ids): the analysis is `reasoning` (only with a reasoning parser: without one it is dropped), `final` (and
commentary to nobody) is `content`, a call to `functions.X` is a tool call (only with the tool parser; its
JSON arguments re-serialized by json.dumps); `usage.completion_tokens_details.reasoning_tokens` (with a
reasoning parser) counts the non-special tokens of analysis messages and of calls' arguments. Without a parser
the reply is the raw text, special tokens skipped ("analysis...assistantfinal..."). An output cut inside a
message header (max_tokens) cannot be parsed: vLLM hands back that header's tokens decoded as final content.

Token ids: a tokenizer that has Harmony's markers as tokens (gpt-oss's own, `--tokenizer DIR`) uses them;
another (the default, Llama 3's) uses o200k_harmony's ids for the markers and its own tokens for the words.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from server.errors import validation_error
from server.generation import OutputPlanner, StopRules

if TYPE_CHECKING:
    from profiles.tokenizer import Tokenizer
    from server.serving import Serving
    from server.structured import StructuredText

# o200k_harmony's ids of Harmony's markers (openai_harmony's HARMONY_GPT_OSS encoding)
O200K_HARMONY = {"<|endoftext|>": 199999, "<|return|>": 200002, "<|constrain|>": 200003, "<|channel|>": 200005,
                 "<|start|>": 200006, "<|end|>": 200007, "<|message|>": 200008, "<|call|>": 200012,
                 "<|endofprompt|>": 200018}
REASONING_EFFORTS = ("high", "medium", "low")  # harmony_utils.REASONING_EFFORT
ANSWER_SHARE = 4  # of a reply's words, the answer (or a call's arguments) takes a quarter


def model_type(serving: Serving, model: str | None) -> str | None:
    """The `model_type` of the model a request runs on (an adapter's: its base model's)."""
    instance, engine = getattr(serving, "instance", None), getattr(serving, "engine", None)
    if instance is None and engine is None:  # (a front end without an engine: tests' stand-ins)
        return None
    behind = [instance] if instance is not None else engine.sim.instances
    name = serving.base_model(model) or serving.model_name
    for instance in behind:
        if name in instance.served_model_names:
            return instance.deployment.model.model_type
    return behind[0].deployment.model.model_type


def uses_harmony(serving: Serving, model: str | None) -> bool:
    """Whether vLLM renders and reads this model's chats with Harmony (a gpt-oss model)."""
    return model_type(serving, model) == "gpt_oss"


# the classes of the simulated parsers' names (vllm/reasoning/__init__.py), as vLLM's refusal names them
_REASONING_CLASSES = {"deepseek_r1": "DeepSeekR1ReasoningParser", "step5": "DeepSeekR1ReasoningParser",
                      "qwen3": "Qwen3ParserReasoningAdapter"}


def parser_error(reasoning_parser: str | None, tool_parser: str | None, model: str) -> str | None:
    """Why vLLM refuses a server's parsers for a gpt-oss model (None: it takes them): its HarmonyParser takes
    gpt-oss's own only, and vLLM builds it at start-up (ParserManager.validate_parser_tokenizer), stopping there
    with this TypeError. `tool_parser`: the one vLLM loads (only with --enable-auto-tool-choice)."""
    inner = None
    if reasoning_parser is not None and reasoning_parser != "openai_gptoss":
        got = _REASONING_CLASSES.get(reasoning_parser, reasoning_parser)
        inner = f"Harmony requires GptOssReasoningParser, got {got}."
    elif tool_parser is not None and tool_parser != "openai":
        inner = f"Harmony requires GptOssToolParser, got {tool_parser}."
    if inner is None:
        return None
    flags = [f"--tool-call-parser {tool_parser}"] if tool_parser is not None else []
    flags += [f"--reasoning-parser {reasoning_parser}"] if reasoning_parser is not None else []
    return f"{' and '.join(flags)} cannot be used with the tokenizer of {model!r}: {inner}"


def check_effort(effort: str | None, chat: bool) -> None:
    """vLLM's refusals of a reasoning effort Harmony has no setting for (400): chat refuses "none" itself
    (online_renderer._make_request_with_harmony), then the system message builder any other but high, medium
    and low (a Responses request's "none" too)."""
    if effort is None:
        return
    if chat and effort == "none":
        raise validation_error(f"Harmony does not support reasoning_effort={effort!r}", parameter="reasoning_effort")
    if effort not in REASONING_EFFORTS:
        raise validation_error(f"reasoning_effort={effort!r} is not supported by Harmony. Supported values are: "
                               f"{', '.join(REASONING_EFFORTS)}.", parameter="reasoning_effort")


# -- the tokens ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HarmonyTokens:
    """Harmony's markers in one tokenizer (its own ids, else o200k_harmony's) and the tokenizer for the words."""
    tokenizer: Tokenizer
    ids: dict[str, int]
    eos: int  # gpt-oss's EOS, <|return|>, which ends an answer (a call ends in <|call|>)

    @functools.cached_property
    def names(self) -> dict[int, str]:
        return {i: name for name, i in self.ids.items()}

    @functools.cached_property
    def stops(self) -> frozenset[int]:
        """What ends a message: <|end|>, <|return|> (the EOS), <|call|>."""
        return frozenset((self.ids["<|end|>"], self.eos, self.ids["<|call|>"]))

    def is_special(self, token: int) -> bool:
        return token in self.names or token in self.stops

    def marker(self, name: str, show: bool) -> tuple[int, str]:
        """A marker token with the text it adds (none where special tokens are skipped, vLLM's default)."""
        return self.ids[name], name if show else ""

    def words(self, text: str) -> list[tuple[int, str]]:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return [(i, self.tokenizer.decode([i], skip_special_tokens=False)) for i in ids]

    def header_text(self, token: int) -> str:
        """A header token's text (from its id: openai_harmony reads headers by ids, not by the text streamed)."""
        return self.names.get(token) or self.tokenizer.decode([token], skip_special_tokens=False)

    def text_of(self, token: int, piece: str) -> str:
        """A token's text with special tokens shown (a header's, or raw output vLLM recovers)."""
        return self.names.get(token, piece)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """gpt-oss's tokenizer's decode (vLLM's /detokenize: Hugging Face's default, special tokens kept): the
        markers by name (a tokenizer that lacks them has o200k_harmony's ids for them), the rest as the tokenizer
        decodes it, run by run (so a character split over tokens stays whole)."""
        out: list[str] = []
        run: list[int] = []
        for token in ids:
            name = self.names.get(token)
            if name is None:
                run.append(token)
                continue
            if run:
                out.append(self.tokenizer.decode(run, skip_special_tokens=skip_special_tokens))
                run = []
            if not skip_special_tokens:
                out.append(name)
        if run:
            out.append(self.tokenizer.decode(run, skip_special_tokens=skip_special_tokens))
        return "".join(out)


@functools.lru_cache(maxsize=None)
def harmony_tokens(tokenizer: Tokenizer) -> HarmonyTokens:
    ids = {}
    for name, fallback in O200K_HARMONY.items():
        own = tokenizer.encode(name, add_special_tokens=False)
        ids[name] = own[0] if len(own) == 1 else fallback
    return HarmonyTokens(tokenizer, ids, ids["<|return|>"])  # (the config's eos_token_id, whichever tokenizer reads)


@functools.lru_cache(maxsize=None)
def word_planner(tokenizer: Tokenizer) -> OutputPlanner:
    """Draws a reply's words in `tokenizer` (with the caller's rng)."""
    return OutputPlanner(tokenizer.output_pool, None, 0, tokenizer.reply_start_pool)


# -- what the simulated gpt-oss writes ----------------------------------------------------------------------
@dataclass(frozen=True)
class _InMarkup:
    """The planner's view of the reply's constraint: the EOS is Harmony's end of message, not text to keep."""
    in_markup: bool = True


@dataclass(frozen=True)
class HarmonyReply:
    """One request's Harmony reply, planned as a structured output is (generation.py `_structured`: `text` lays
    it out over about `target` tokens, `tokens` hands it over; the planner adds the EOS, or cuts at max_tokens).
    `answer`: a structured output the final message satisfies; `calls`: the tools of a forced call (one is
    called: vLLM's structural tag allows a single call, ended by <|call|>) with each one's arguments' text."""
    tokens: HarmonyTokens
    show_specials: bool = False
    answer: StructuredText | None = None
    calls: tuple[tuple[str, StructuredText], ...] = ()
    constraint: _InMarkup = field(default_factory=_InMarkup)
    ignore_eos: bool = False

    def text(self, target: int, rng: np.random.Generator, max_tokens: int) -> list[tuple[int, str]]:
        t, show = self.tokens, self.show_specials
        opening = [t.marker("<|channel|>", show), *t.words("analysis"), t.marker("<|message|>", show)]
        between = [t.marker("<|end|>", show), t.marker("<|start|>", show), *t.words("assistant"),
                   t.marker("<|channel|>", show)]
        if self.calls:
            name, arguments = self.calls[int(rng.integers(len(self.calls)))]
            header = [*t.words(f"commentary to=functions.{name} "), t.marker("<|constrain|>", show),
                      *t.words("json"), t.marker("<|message|>", show)]
            body = arguments
        else:
            header = [*t.words("final"), t.marker("<|message|>", show)]
            body = self.answer
        words = max(target - len(opening) - len(between) - len(header), 2)
        said = max(1, words // ANSWER_SHARE)
        ending = []
        if body is not None:
            ids, pieces = body.tokens(body.text(said, rng, max_tokens))
            answer = list(zip(ids, pieces))
            if self.ignore_eos:
                # with ignore_eos vLLM stops on neither the EOS nor the generation config's <|call|>
                # (SamplingParams.update_from_generation_config): the grammar still ends the constrained answer
                # or call with its stop token, and the output goes on to max_tokens; the reasoning takes the room
                # (target: max_tokens + 1), so the answer is whole
                end = t.ids["<|call|>"] if self.calls else t.eos
                ending = [(end, t.header_text(end) if show else "")]
                words -= 2
        else:
            answer = self._words(said, rng)
        return [*opening, *self._words(max(words - len(answer), 1), rng), *between, *header, *answer, *ending]

    def _words(self, count: int, rng: np.random.Generator) -> list[tuple[int, str]]:
        words = word_planner(self.tokens.tokenizer).plan(count, StopRules(ignore_eos=True), rng, reply=True)
        return list(zip(words.token_ids.tolist(), words.pieces))


class _PlannerView(NamedTuple):
    """A HarmonyReply as generation.py's planner reads a structure: `text`, `tokens`, `constraint`."""
    reply: HarmonyReply

    @property
    def constraint(self) -> _InMarkup:
        return self.reply.constraint

    end_token = property(lambda view: view.reply.tokens.ids["<|call|>"] if view.reply.calls else None)  # (a call's)

    def text(self, target: int, rng: np.random.Generator, max_tokens: int) -> list[tuple[int, str]]:
        return self.reply.text(target, rng, max_tokens)

    @staticmethod
    def tokens(layout: list[tuple[int, str]]) -> tuple[list[int], list[str]]:
        """The layout is its tokens already."""
        return [i for i, _ in layout], [p for _, p in layout]


def planned(reply: HarmonyReply) -> _PlannerView:
    """The object passed to Serving.generate as `structure`."""
    return _PlannerView(reply)


# -- what vLLM's HarmonyParser reads ------------------------------------------------------------------------
@dataclass
class Message:
    """A message the parser completed (or recovered)."""
    channel: str | None
    recipient: str | None
    content_type: str | None
    text: str


class Segment(NamedTuple):
    """What one token did (vLLM's Segment): the channel and recipient after it, the content it added, the
    message it completed."""
    channel: str | None
    recipient: str | None
    delta: str
    completed: Message | None = None


def _kind(channel: str | None, recipient: str | None) -> str:
    """vLLM's _SegmentType.from_channel_and_recipient (a function recipient: any but a built-in tool's)."""
    if recipient and not recipient.startswith("<|") and recipient != "assistant" and \
            recipient.split(".", 1)[0] not in ("python", "browser", "container") and \
            (not recipient.startswith("functions.") or len(recipient) > len("functions.")):
        return "tool"
    if channel == "analysis":
        return "reasoning"
    if channel == "final" or (channel == "commentary" and recipient is None):
        return "content"
    return "ignore"


def _header(text: str) -> tuple[str | None, str | None, str | None]:
    """A header's (channel, recipient, content type), as openai_harmony parses "ROLE[ to=R]<|channel|>CHANNEL[ to=R]
    [<|constrain|>]TYPE"."""
    text, constrain, constrained = text.partition("<|constrain|>")
    role, _, after = text.partition("<|channel|>")
    words = after.split()
    channel = words[0] if words else None
    recipient = content_type = None
    for word in role.split()[1:] + words[1:]:
        if word.startswith("to="):
            recipient = word[3:]
        else:
            content_type = word
    if constrain:
        content_type = constrained.strip() or content_type
    return channel, recipient, content_type


class HarmonyReader:
    """vLLM's HarmonyParser over one choice's tokens (openai_harmony's StreamableParser for the assistant):
    `feed` a chunk, `finish` at the end, as its process_chunk and flush."""

    def __init__(self, tokens: HarmonyTokens) -> None:
        self.t = tokens
        self.in_header = True  # the parser starts in the assistant's header (the prompt ends in <|start|>assistant)
        self.header: list[str] = []
        self.channel = self.recipient = self.content_type = None
        self.content: list[str] = []
        self.current: list[tuple[int, str]] = []  # the tokens since the last completed message
        self.reasoning_tokens = 0

    def _process(self, token: int, piece: str) -> Segment | None:
        """One token (None: the parser refused it, as a token outside any message)."""
        completed = None
        delta = ""
        if self.in_header is None:  # between messages: only <|start|> opens one
            if token != self.t.ids["<|start|>"]:
                return None
            self.in_header, self.header = True, []
        elif self.in_header:
            if token == self.t.ids["<|message|>"]:
                self.channel, self.recipient, self.content_type = _header("".join(self.header))
                self.recipient = self._normalized(self.recipient)
                self.in_header, self.content = False, []
            else:
                self.header.append(self.t.header_text(token))
        elif token in self.t.stops:
            completed = Message(self.channel, self.recipient, self.content_type, "".join(self.content))
            self.in_header, self.channel, self.recipient, self.content_type = None, None, None, None
        else:
            self.content.append(piece)
            delta = piece
        if completed is not None:
            self.current.clear()
        else:
            self.current.append((token, piece))
        if (self.channel == "analysis" or (self.channel == "commentary" and self.recipient is not None)) \
                and not self.t.is_special(token):
            self.reasoning_tokens += 1
        return Segment(self.channel, self.recipient, delta, completed)

    @staticmethod
    def _normalized(recipient: str | None) -> str | None:
        if recipient is None:
            return None
        at = recipient.find("<|constrain|>")
        return recipient if at == -1 else recipient[:at].rstrip() or None

    def feed(self, ids: list[int], pieces: list[str]) -> list[Segment]:
        return [s for s in map(self._process, ids, pieces) if s is not None]

    def finish(self) -> list[Segment]:
        """The end of the output (vLLM's flush: process_eos): an open message completes; one cut in its header
        cannot be parsed, and vLLM recovers its tokens' text as final content."""
        segments = []
        if self.in_header:
            text = "".join(self.t.text_of(i, p) for i, p in self.current)
            segments.append(Segment("final", None, text))
            segments.append(Segment("final", None, "", Message("final", None, None, text)))
        elif self.in_header is False:
            message = Message(self.channel, self.recipient, self.content_type, "".join(self.content))
            segments.append(Segment(self.channel, self.recipient, "", message))
        self.in_header, self.header, self.current = None, [], []
        self.channel = self.recipient = self.content_type = None
        return segments


@dataclass
class Parsed:
    """A whole output as vLLM's HarmonyParser.parse reads it."""
    reasoning: str | None
    content: str | None
    calls: list[tuple[str, str]]  # (name, arguments)
    reasoning_tokens: int
    messages: list[Message]
    flushed: bool  # the end of the output completed (or recovered) the last message: cut there, not ended


def parse(tokens: HarmonyTokens, ids: list[int], pieces: list[str], reasoning: bool, tools: bool) -> Parsed:
    """A whole output: reasoning (with a reasoning parser), content, and tool calls (with a tool parser)."""
    reader = HarmonyReader(tokens)
    segments = reader.feed(ids, pieces)
    flushed = reader.finish()
    segments += flushed
    messages = [s.completed for s in segments if s.completed is not None]
    thought, said, calls = [], [], []
    for message in messages:
        kind = _kind(message.channel, message.recipient)
        if kind == "reasoning" and reasoning and message.text:
            thought.append(message.text)
        elif kind == "content" and message.text:
            said.append(message.text)
        elif kind == "tool" and tools:
            calls.append((message.recipient.removeprefix("functions."), _arguments(message)))
    return Parsed("\n".join(thought) or None, "\n".join(said) or None, calls, reader.reasoning_tokens, messages,
                  bool(flushed))


def _arguments(message: Message) -> str:
    """A call's arguments as vLLM hands them on: JSON re-serialized (json.dumps), else the text as written."""
    if message.content_type is not None and "json" not in message.content_type:
        return message.text
    try:
        return json.dumps(json.loads(message.text))
    except json.JSONDecodeError:
        return message.text


class HarmonyStream:
    """One choice's stream deltas as vLLM's HarmonyParser.parse_delta makes them."""

    def __init__(self, tokens: HarmonyTokens, reasoning: bool, tools: bool, include_reasoning: bool,
                 new_call_id) -> None:
        self.reader = HarmonyReader(tokens)
        self.reasoning, self.tools, self.include_reasoning = reasoning, tools, include_reasoning
        self.new_call_id = new_call_id
        self.next_call = 0

    def delta(self, ids: list[int], pieces: list[str], finished: bool) -> dict | None:
        """A chunk's delta (`reasoning`, `content`, `tool_calls`), or None where vLLM sends nothing."""
        previous = self.reader.recipient
        segments = self.reader.feed(ids, pieces)
        if finished:
            segments += self.reader.finish()
        content = reasoning = ""
        calls: list[dict] = []
        for segment in segments:
            if segment.completed is not None:
                previous = None
                continue
            kind = _kind(segment.channel, segment.recipient)
            if kind == "reasoning" and self.reasoning:
                reasoning += segment.delta
            elif kind == "content":
                content += segment.delta
            elif kind == "tool" and self.tools:
                if previous != segment.recipient:
                    calls.append({"id": self.new_call_id(), "type": "function", "index": self.next_call,
                                  "function": {"name": segment.recipient.removeprefix("functions."),
                                               "arguments": segment.delta}})
                    self.next_call += 1
                    previous = segment.recipient
                elif segment.delta:
                    if calls:
                        calls[-1]["function"]["arguments"] += segment.delta
                    else:
                        calls.append({"index": self.next_call - 1, "function": {"arguments": segment.delta}})
        if finished:
            self.next_call = 0
        if not content and not reasoning and not calls:
            return None
        out: dict = {}
        if content:
            out["content"] = content
        if reasoning:
            out["reasoning"] = reasoning
        if calls:
            out["tool_calls"] = calls
        if not self.include_reasoning:  # vLLM sets reasoning to None; a delta of reasoning alone is not sent
            out["reasoning"] = None
            if not content and not calls:
                return None
        return out

    @property
    def reasoning_tokens(self) -> int:
        return self.reader.reasoning_tokens


def call_choices(serving: Serving, calling, model: str | None) -> tuple[tuple[str, StructuredText], ...]:
    """The tools a forced call (of a chat request `calling`) may call, each with its arguments' JSON schema as
    the model's tokens write it: the one named, or any of them ("required")."""
    from server.structured import Constraint

    named = calling.named_tool()
    tools = [named] if named is not None else list(calling.tools or ())
    return tuple((tool.function.name, serving.structure_for(
        calling, model, Constraint("json", tool.function.parameters or {"type": "object", "properties": {}})))
        for tool in tools)


# -- one chat or Responses request ---------------------------------------------------------------------------
class HarmonyChat:
    """What a server makes of one request to a gpt-oss model: the reply's plan (`reply`), and how its parsers
    (`parsing`: vLLM has a HarmonyParser with a reasoning parser, or a tool parser with
    --enable-auto-tool-choice) read it back."""

    def __init__(self, serving: Serving, req) -> None:
        options = serving.options
        self.tokens = harmony_tokens(serving.tokenizer_for(req.model))
        self.reasoning = options.reasoning_parser is not None
        self.tools = options.enable_auto_tools and options.tool_call_parser is not None
        self.parsing = self.reasoning or self.tools
        self.include_reasoning = getattr(req, "include_reasoning", True)
        self.show_specials = getattr(req, "skip_special_tokens", True) is False
        self.ignore_eos = bool(getattr(req, "ignore_eos", False))

    def reply(self, answer: StructuredText | None = None,
              calls: tuple[tuple[str, StructuredText], ...] = ()) -> _PlannerView:
        """The plan of a reply: analysis, then a final answer (satisfying `answer`, when given: with a parser,
        vLLM constrains only the final message) or a call of one of `calls`."""
        return planned(HarmonyReply(self.tokens, self.show_specials, answer, calls, ignore_eos=self.ignore_eos))

    def parse(self, ids: list[int], pieces: list[str]) -> Parsed:
        return parse(self.tokens, ids, pieces, self.reasoning, self.tools)

    def stream(self, new_call_id) -> HarmonyStream:
        return HarmonyStream(self.tokens, self.reasoning, self.tools, self.include_reasoning, new_call_id)

    def reasoning_tokens(self, ids: list[int]) -> int:
        """vLLM's count_reasoning_tokens (reported with a reasoning parser)."""
        if not self.parsing:
            return 0
        reader = HarmonyReader(self.tokens)
        reader.feed(ids, [""] * len(ids))
        return reader.reasoning_tokens
