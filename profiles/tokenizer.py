"""Tokenizers: the model family's real one (the default), a fast built-in one, or a Hugging Face tokenizer
from a directory.

Both drivers need a tokenizer: the server for three things: counting prompt tokens (which the
simulated engine prices), token ids for prefix caching, and turning the synthetic
output ids back into text. Every kind answers the same small interface:

- `encode(text, add_special_tokens)` and `decode(ids)`;
- `render_chat(messages, add_generation_prompt, tools, continue_final_message, options, template)`: the
  prompt text of a conversation, as the model's chat template renders it (`tools`: the request's tool
  definitions; `options`: the template's variables, vLLM's `chat_template_kwargs`; `template`: a Jinja
  chat template to use instead, see `chat_template.py`);
- `output_pool`: ids of common words with the text each adds to a stream, from which
  synthetic output is drawn (so it reads as words and re-encodes to the same ids);
  `reply_start_pool`: the same for the first word of a chat reply (no leading space);
- `eos_token_id`, `max_chars_per_token` (vLLM's character pre-check), `name`;
- `hf_config()`: the tokenizer as Hugging Face's transformers would hold it (`HFConfig`: its class and the
  keyword arguments it was built with), which vLLM's /tokenizer_info reports.

The default is the real tokenizer of the default model, Llama 3 (Llama 3.1 shares it): its
BPE ranks ship in `profiles/data/tokenizers/llama3/` (from Meta's `llama-models` package, under
the Llama 3.1 Community License kept beside them), encoded with tiktoken as Meta's reference
code does, so prompt token counts and ids are those vLLM computes for Llama 3 models
(`<|begin_of_text|>` is 128000). Chat is rendered with Llama 3.1 Instruct's template. Qwen2 and Qwen3
models get Qwen's tokenizer instead: its BPE ranks ship in `profiles/data/tokenizers/qwen/` (from
Alibaba's `dashscope` package, Apache 2.0), with Qwen3's added tokens (`<|im_end|>` is 151645) and chat
template. Other families (Mixtral, gpt-oss, MiniMax, Phi) are counted with Llama 3's: `--tokenizer DIR`
gives them their own.

`--tokenizer builtin` needs no files: text is split into pieces of at most three letters, three
digits or one other character (each with an optional leading space), every piece is one token,
and anything else falls back to UTF-8 bytes. It counts about one token per three characters of
English (about twice Llama 3's count), encodes a 1,000-token prompt in ~0.1 ms, and decodes
exactly what it encoded. `--tokenizer DIR` loads a Hugging Face tokenizer (transformers, files
only, no hub), so prompt token counts match another model's.
"""
from __future__ import annotations

import base64
import functools
import itertools
import json
import logging
import re
import string
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from profiles.chat_template import ChatTemplateError, render_template

log = logging.getLogger("vllm_emulator.tokenizer")

# The output vocabulary: frequent short English words and punctuation (listed more than
# once to weigh them). Every entry is one token in the built-in vocabulary; a real
# tokenizer keeps those it encodes as one token.
OUTPUT_WORDS = (
    " the", " of", " and", " to", " in", " is", " it", " you", " for", " on", " are", " as", " was",
    " be", " at", " or", " an", " we", " can", " all", " has", " one", " but", " not", " by", " new",
    " now", " how", " its", " our", " may", " use", " way", " any", " see", " who", " out", " day",
    " get", " set", " run", " end", " top", " yes", " ask", " why", " few", " own", " old", " big",
    " low", " far", " key", " let", " put", " say", " try", " add", " men", " age", " art", " law",
    " air", " car", " sea", " sun", " job", " map", " box", " red", " net", " log", " tag", " row",
    ",", ".", ",", ".", ",",
)

# The first word of a chat reply: as a model begins one, with no space before it.
REPLY_START_WORDS = ("The", "It", "This", "In", "Yes", "We", "You", "There", "A", "I", "That", "Here", "Sure")

_DATA = Path(__file__).resolve().parent / "data" / "tokenizers"

BUILTIN_SPECIAL_TOKENS = ("<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                          "<|end_header_id|>", "<|eot_id|>")
_BOS, _EOS = 1, 2


def _builtin_pieces() -> list[str]:
    """Every piece of the built-in vocabulary, after the special and byte tokens."""
    lower = string.ascii_lowercase
    words = [first + "".join(rest) for first in string.ascii_letters
             for size in range(3) for rest in itertools.product(lower, repeat=size)]
    numbers = [str(i) for i in range(10)] + [f"{i:02d}" for i in range(100)] + [f"{i:03d}" for i in range(1000)]
    others = [c for c in string.punctuation]
    pieces = []
    for core in words + numbers + others:
        pieces += [core, " " + core]
    return pieces + ["\n", "\n\n", "\t", " ", "  ", "   ", "    "]


class HFConfig(NamedTuple):
    """A tokenizer as transformers holds it: its class name, whether that class is Rust-backed (transformers'
    TokenizersBackend), and the keyword arguments it was built with (`init_kwargs`). The built-in tokenizer
    has no Hugging Face counterpart: its own class name, `hf` False."""
    class_name: str
    rust_backed: bool
    init_kwargs: dict[str, Any]
    hf: bool = True


class TemplatedChat:
    """`render_chat` of the tokenizers that ship their model's chat template as code (`builtin_chat`):
    a Jinja `template` (a request's, or --chat-template) replaces it, rendered as transformers renders
    it with the tokenizer's special tokens (`special_tokens_map`)."""

    special_tokens_map: dict[str, str]

    def builtin_chat(self, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None,
                     continue_final_message: bool, options: dict | None) -> str:
        raise NotImplementedError

    def render_chat(self, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None = None,
                    continue_final_message: bool = False, options: dict | None = None,
                    template: str | None = None) -> str:
        if template is None:
            return self.builtin_chat(messages, add_generation_prompt, tools, continue_final_message, options)
        return render_template(template, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                               continue_final_message=continue_final_message,
                               special_tokens=self.special_tokens_map, options=options)


class BuiltinTokenizer(TemplatedChat):
    """A deterministic, reversible, file-free tokenizer (see the module docstring)."""

    name = "builtin"
    eos_token_id = _EOS
    developer_role = False  # its template has no "developer" role (vLLM turns one into "system")
    bos_token_id = _BOS
    special_tokens_map = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "unk_token": "<unk>"}

    def __init__(self) -> None:
        specials = list(BUILTIN_SPECIAL_TOKENS)
        byte_names = [f"<0x{b:02X}>" for b in range(256)]
        self._first_byte = len(specials)
        self._first_piece = self._first_byte + 256
        self.vocab: list[str] = specials + byte_names + _builtin_pieces()
        self._ids = {piece: i for i, piece in enumerate(self.vocab) if i >= self._first_piece}
        self._special_ids = {token: i for i, token in enumerate(specials)}
        special = "|".join(re.escape(t) for t in specials[1:])
        self._pattern = re.compile(
            rf"{special}| ?[A-Za-z][a-z]{{0,2}}| ?[0-9]{{1,3}}| ?[^\sA-Za-z0-9]|\n\n?|\t| {{1,4}}|\s")
        self.max_chars_per_token = max(len(p) for p in self.vocab[self._first_piece:])
        self.output_pool = [(self._ids[w], w) for w in OUTPUT_WORDS]
        self.reply_start_pool = [(self._ids[w], w) for w in REPLY_START_WORDS if w in self._ids]

    def __len__(self) -> int:
        return len(self.vocab)

    def hf_config(self) -> HFConfig:
        """Its own class and special tokens (no Hugging Face tokenizer is like it)."""
        added = {i: token for i, token in enumerate(BUILTIN_SPECIAL_TOKENS)}
        return HFConfig(type(self).__name__, False, {**self.special_tokens_map, "added_tokens_decoder": added},
                        hf=False)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        get = self._ids.get
        ids = [_BOS] if add_special_tokens else []
        for piece in self._pattern.findall(text):
            token = get(piece)
            if token is None:
                token = self._special_ids.get(piece)
            if token is not None:
                ids.append(token)
            else:  # a character outside the vocabulary: its UTF-8 bytes
                ids.extend(self._first_byte + b for b in piece.encode())
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out: list[str] = []
        pending = bytearray()
        first_byte, first_piece, vocab = self._first_byte, self._first_piece, self.vocab
        for token in ids:
            if first_byte <= token < first_piece:
                pending.append(token - first_byte)
                continue
            if pending:
                out.append(pending.decode(errors="replace"))
                pending.clear()
            if token >= first_piece and token < len(vocab):
                out.append(vocab[token])
            elif not skip_special_tokens and 0 <= token < first_byte:
                out.append(vocab[token])
        if pending:
            out.append(pending.decode(errors="replace"))
        return "".join(out)

    def convert_ids_to_tokens(self, ids) -> list[str]:
        vocab = self.vocab
        return [vocab[i] if 0 <= i < len(vocab) else "<unk>" for i in ids]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """The text of token names (vLLM's incremental detokenizer joins them): byte tokens as UTF-8."""
        ids = []
        for token in tokens:
            byte = _BYTE_TOKEN.fullmatch(token)
            token_id = self._first_byte + int(byte[1], 16) if byte else self._ids.get(token,
                                                                                      self._special_ids.get(token))
            if token_id is not None:
                ids.append(token_id)
        return self.decode(ids, skip_special_tokens=False)

    def builtin_chat(self, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None,
                     continue_final_message: bool, options: dict | None) -> str:
        """Llama 3's chat layout, with the built-in special tokens (tools and tool calls as JSON turns)."""
        parts = ["<|begin_of_text|>"]
        if tools is not None:
            parts.append(f"<|start_header_id|>tools<|end_header_id|>\n\n{_tojson(tools)}<|eot_id|>")
        for message in messages:
            content = message["content"]
            if message.get("tool_calls"):
                content = _tojson([c.get("function") for c in message["tool_calls"]])
            parts.append(f"<|start_header_id|>{message['role']}<|end_header_id|>\n\n{content}<|eot_id|>")
        if add_generation_prompt:
            parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
        return _continued("".join(parts), messages) if continue_final_message else "".join(parts)


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local directory (never from the hub)."""

    def __init__(self, path: str) -> None:
        if not Path(path).is_dir():
            raise ValueError(f"--tokenizer {path}: not a directory with a Hugging Face tokenizer; {TOKENIZER_OPTIONS}")
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ValueError("--tokenizer needs the transformers package: pip install 'vllm-emulator[hf]'") from None
        try:
            self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as exc:  # transformers raises many kinds; all mean "cannot load"
            raise ValueError(f"--tokenizer {path}: cannot load a tokenizer from it ({exc})") from None
        self.name = path
        # vLLM's test of a template for the role: the word quoted in it
        template = getattr(self._tok, "chat_template", None)
        self.developer_role = isinstance(template, str) and ('"developer"' in template or "'developer'" in template)
        # The Rust tokenizer behind a fast tokenizer is several times quicker to call directly.
        self._fast = getattr(self._tok, "backend_tokenizer", None)
        self.eos_token_id = self._tok.eos_token_id
        self.bos_token_id = self._tok.bos_token_id
        vocab = self._tok.get_vocab()
        self.max_chars_per_token = max((len(t) for t in vocab), default=1)
        self._size = len(self._tok)
        self.output_pool = single_token_words(self, OUTPUT_WORDS, after_a_word=True)
        self.reply_start_pool = single_token_words(self, REPLY_START_WORDS, after_a_word=False)
        if not self.output_pool:
            raise ValueError(f"--tokenizer {path}: none of the common English words is a single token")

    def __len__(self) -> int:
        return self._size

    def hf_config(self) -> HFConfig:
        """The loaded tokenizer's class and init_kwargs, as vLLM loading it would hold them: vLLM does not ask
        for local files only (transformers then records its offline mode, HF_HUB_OFFLINE)."""
        try:
            from transformers.tokenization_utils_tokenizers import TokenizersBackend
        except ImportError:  # transformers 4 has no such class (and vLLM 0.33 needs transformers 5)
            rust_backed = False
        else:
            rust_backed = isinstance(self._tok, TokenizersBackend)
        kwargs = dict(self._tok.init_kwargs)
        if "local_files_only" in kwargs:
            from huggingface_hub import constants
            kwargs["local_files_only"] = bool(constants.HF_HUB_OFFLINE)
        return HFConfig(type(self._tok).__name__, rust_backed, kwargs)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._fast is not None:
            return self._fast.encode(text, add_special_tokens=add_special_tokens).ids
        return self._tok.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids) -> list[str]:
        return self._tok.convert_ids_to_tokens(list(ids))

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._tok.convert_tokens_to_string(list(tokens))

    def render_chat(self, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None = None,
                    continue_final_message: bool = False, options: dict | None = None,
                    template: str | None = None) -> str:
        """The tokenizer's own chat template (or `template`: Jinja text, or the name of one of the
        tokenizer's templates) applied by transformers."""
        if template is not None or getattr(self._tok, "chat_template", None):
            try:
                return self._tok.apply_chat_template(messages, tools=tools, tokenize=False, chat_template=template,
                                                     add_generation_prompt=add_generation_prompt,
                                                     continue_final_message=continue_final_message,
                                                     **(options or {}))
            except Exception as exc:  # the template's raise_exception, or one of jinja2's errors: the request's fault
                raise ChatTemplateError(str(exc)) from exc
        # vLLM refuses chat without a template; a plain layout keeps load tests running.
        bos = self._tok.bos_token or ""
        text = bos + "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        text += "assistant: " if add_generation_prompt else ""
        return _continued(text, messages) if continue_final_message else text


class TiktokenTokenizer(TemplatedChat):
    """A byte-level BPE tokenizer from ranks shipped with this package, encoded with tiktoken as the
    models' reference code does (the same ids as their Hugging Face tokenizers)."""

    RANKS: Path
    PATTERN: str
    name: str
    HF_CLASS: str  # the class transformers 5 builds from the model's tokenizer_config.json
    MODEL_MAX_LENGTH: int  # that file's model_max_length
    special_tokens_map: dict[str, str]  # the Hugging Face tokenizer's, as chat templates see them
    developer_role = False  # Llama 3.1's and Qwen3's templates have no "developer" role

    def __init__(self, special_tokens: dict[str, int], size: int, skipped: frozenset[int],
                 bos_token_id: int | None, eos_token_id: int, normalization: str | None = None) -> None:
        """`special_tokens`: matched in any text; `skipped`: the ids decode drops with skip_special_tokens
        (the Hugging Face tokenizer's special ones); `bos_token_id`: put first by add_special_tokens (None:
        nothing is); `normalization`: the Unicode form text is put in first (the tokenizer's normalizer)."""
        import tiktoken  # only where a tokenizer is needed: replay of token counts never loads it

        parts = self.RANKS.read_bytes().split()
        ranks = dict(zip(map(base64.b64decode, parts[0::2]), map(int, parts[1::2])))
        self.special_tokens = special_tokens
        self._skipped = skipped
        self._names = {i: t for t, i in special_tokens.items()}
        self._encoding = tiktoken.Encoding(self.name, pat_str=self.PATTERN, mergeable_ranks=ranks,
                                           special_tokens=special_tokens)
        self._size = size
        self._normalization = normalization
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        # vLLM's max_chars_per_token: the longest vocabulary entry (byte-level strings: one character a byte)
        self.max_chars_per_token = max(max(map(len, ranks)), max(map(len, special_tokens)))
        self.output_pool = single_token_words(self, OUTPUT_WORDS, after_a_word=True)
        self.reply_start_pool = single_token_words(self, REPLY_START_WORDS, after_a_word=False)

    def __len__(self) -> int:
        return self._size

    def hf_config(self) -> HFConfig:
        """What is known here of the Hugging Face tokenizer's init_kwargs: its special tokens, its added tokens
        (each id's text), its model_max_length, its Rust backend. The rest of its tokenizer_config.json (the chat
        template's Jinja text, ...) is not shipped and is left out."""
        added = {i: token for token, i in self.special_tokens.items()}
        return HFConfig(self.HF_CLASS, True, {**self.special_tokens_map, "added_tokens_decoder": added,
                                              "model_max_length": self.MODEL_MAX_LENGTH, "backend": "tokenizers"})

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """As the Hugging Face tokenizer encodes: special tokens in the text are special, BOS first."""
        if self._normalization is not None:
            text = unicodedata.normalize(self._normalization, text)
        ids = self._encoding.encode(text, allowed_special="all")
        return [self.bos_token_id, *ids] if add_special_tokens and self.bos_token_id is not None else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids if 0 <= i < self._size]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._skipped]
        return self._encoding.decode_bytes(ids).decode("utf-8", errors="replace")

    def convert_ids_to_tokens(self, ids) -> list[str]:
        """Byte-level strings, as the Hugging Face tokenizer names its tokens ("Ġthe")."""
        out = []
        for i in ids:
            name = self._names.get(i)
            if name is None:
                name = "".join(_BYTE_LEVEL[b] for b in self._encoding.decode_single_token_bytes(i))
            out.append(name)
        return out

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """The text of byte-level token names (a special token's name is its text), as the Hugging Face
        decoder joins them."""
        data = b"".join(token.encode() if token in self.special_tokens
                        else bytes(_BYTE_VALUE.get(c, 0x3F) for c in token) for token in tokens)
        return data.decode("utf-8", errors="replace")


class Llama3Tokenizer(TiktokenTokenizer):
    """Llama 3's tokenizer (Llama 3.1's special tokens)."""

    RANKS = _DATA / "llama3" / "tokenizer.model"
    # Meta's pre-tokenization pattern (llama_models/llama3/tokenizer.py; the same in the Hugging Face files)
    PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                      "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                      "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")
    NUM_SPECIAL_TOKENS = 256  # the rest are <|reserved_special_token_3|> ... _247
    FIRST_SPECIAL = 128000
    name = "Llama 3 (shipped)"
    HF_CLASS = "TokenizersBackend"  # Llama 3.1's config names PreTrainedTokenizerFast, which transformers 5 builds so
    MODEL_MAX_LENGTH = 131072  # Llama 3.1's tokenizer_config.json: its 128K context
    special_tokens_map = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}  # Llama 3.1 Instruct's

    def __init__(self) -> None:
        reserved = [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + self.NUM_SPECIAL_TOKENS - 11)]
        special = {t: self.FIRST_SPECIAL + i for i, t in enumerate(self.SPECIAL_TOKENS + tuple(reserved))}
        super().__init__(special, self.FIRST_SPECIAL + self.NUM_SPECIAL_TOKENS, frozenset(special.values()),
                         special["<|begin_of_text|>"], special["<|end_of_text|>"])

    def builtin_chat(self, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None,
                     continue_final_message: bool, options: dict | None) -> str:
        """Llama 3.1 Instruct's chat template: a system turn with the knowledge cut-off and the date
        ("Environment: ipython" first when there are tools), the tools (JSON, indented) in the first user
        turn with the template's instructions, every turn with its content trimmed, an assistant tool
        call as {"name": ..., "parameters": ...}, a tool's answer in an ipython turn as JSON. Options:
        `date_string`, `tools_in_user_message` (the template's variables)."""
        options, conversation = options or {}, messages
        date = options.get("date_string", "26 Jul 2024")
        tools_in_user_message = options.get("tools_in_user_message", True)
        system = ""
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"].strip(), messages[1:]
        parts = ["<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"]
        if tools is not None:
            parts.append("Environment: ipython\n")
        parts.append(f"Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n")
        if tools is not None and not tools_in_user_message:
            parts.append("You have access to the following functions. To call a function, please respond with JSON "
                         "for a function call." + _LLAMA_TOOL_FORMAT + "".join(_tojson(t, 4) + "\n\n" for t in tools))
        parts += [system, "<|eot_id|>"]
        if tools is not None and tools_in_user_message:
            if not messages:
                raise ChatTemplateError("Cannot put tools in the first user message when there's no first user "
                                        "message!")
            first, messages = messages[0]["content"].strip(), messages[1:]
            parts.append("<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please respond "
                         "with a JSON for a function call with its proper arguments that best answers the given "
                         "prompt.\n\n" + _LLAMA_TOOL_FORMAT + "".join(_tojson(t, 4) + "\n\n" for t in tools)
                         + first + "<|eot_id|>")
        for message in messages:
            if "tool_calls" in message:
                if len(message["tool_calls"]) != 1:
                    raise ChatTemplateError("This model only supports single tool-calls at once!")
                call = message["tool_calls"][0]["function"]
                parts.append(f'<|start_header_id|>assistant<|end_header_id|>\n\n{{"name": "{call["name"]}", '
                             f'"parameters": {_tojson(call["arguments"])}}}<|eot_id|>')
            elif message["role"] in ("tool", "ipython"):  # a tool's answer: its content as JSON
                parts.append(f"<|start_header_id|>ipython<|end_header_id|>\n\n{_tojson(message['content'])}"
                             "<|eot_id|>")
            else:
                parts.append(f"<|start_header_id|>{message['role']}<|end_header_id|>\n\n"
                             f"{message['content'].strip()}<|eot_id|>")
        if add_generation_prompt:
            parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
        text = "".join(parts)
        return _continued(text, conversation) if continue_final_message else text


_LLAMA_TOOL_FORMAT = ('Respond in the format {"name": function name, "parameters": dictionary of argument name and '
                      'its value}.Do not use variables.\n\n')


class QwenTokenizer(TiktokenTokenizer):
    """The tokenizer of Qwen2, Qwen2.5 and Qwen3 (one vocabulary; Qwen3's added tokens), NFC first as
    their Hugging Face tokenizer normalizes; no BOS. Chat is rendered with Qwen3's template."""

    RANKS = _DATA / "qwen" / "qwen.tiktoken"
    PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    FIRST_SPECIAL = 151643
    # Qwen3's added tokens in id order; the first 14 are special (decode skips them), the rest are not
    ADDED_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
                    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>")
    NUM_SKIPPED = 14
    name = "Qwen3 (shipped)"
    HF_CLASS = "Qwen2Tokenizer"  # the class Qwen2, Qwen2.5 and Qwen3 name
    MODEL_MAX_LENGTH = 131072  # Qwen3's tokenizer_config.json: the context YaRN extends it to
    special_tokens_map = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}  # Qwen3's (no BOS)

    def __init__(self) -> None:
        added = {t: self.FIRST_SPECIAL + i for i, t in enumerate(self.ADDED_TOKENS)}
        skipped = frozenset(range(self.FIRST_SPECIAL, self.FIRST_SPECIAL + self.NUM_SKIPPED))
        super().__init__(added, self.FIRST_SPECIAL + len(added), skipped, None, added["<|im_end|>"], "NFC")

    def builtin_chat(self, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None,
                     continue_final_message: bool, options: dict | None) -> str:
        """Qwen3's chat template: ChatML turns; with tools, the first system turn lists them (JSON, one a line)
        with the template's instructions; an assistant turn's <think> part is kept only after the last user
        message, its tool calls follow as <tool_call> blocks; tool answers are wrapped in <tool_response> in
        a user turn. Option `enable_thinking` false closes an empty <think> block after the generation prompt."""
        last_query = max((i for i, m in enumerate(messages) if m["role"] == "user"
                          and not _is_tool_response(m["content"])), default=len(messages) - 1)
        first_system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
        parts = []
        if tools:
            parts.append("<|im_start|>system\n" + (first_system + "\n\n" if first_system is not None else "")
                         + "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are "
                         "provided with function signatures within <tools></tools> XML tags:\n<tools>"
                         + "".join("\n" + _tojson(t) for t in tools)
                         + "\n</tools>\n\nFor each function call, return a json object with function name and "
                         "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
                         "\"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n")
        elif first_system is not None:
            parts.append(f"<|im_start|>system\n{first_system}<|im_end|>\n")
        for i, message in enumerate(messages):
            role, content = message["role"], message["content"] if isinstance(message["content"], str) else ""
            if role == "user" or (role == "system" and i > 0):
                parts.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
            elif role == "assistant":
                reasoning = message.get("reasoning_content")
                if not isinstance(reasoning, str):
                    reasoning = ""
                    if "</think>" in content:
                        reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                        content = content.split("</think>")[-1].lstrip("\n")
                if i > last_query and (i == len(messages) - 1 or reasoning):
                    parts.append(f"<|im_start|>assistant\n<think>\n{reasoning.strip(chr(10))}\n</think>\n\n"
                                 f"{content.lstrip(chr(10))}")
                else:
                    parts.append(f"<|im_start|>assistant\n{content}")
                for k, call in enumerate(message.get("tool_calls") or ()):
                    if k or content:
                        parts.append("\n")
                    function = call.get("function") or call
                    arguments = function["arguments"]
                    parts.append(f'<tool_call>\n{{"name": "{function["name"]}", "arguments": '
                                 f'{arguments if isinstance(arguments, str) else _tojson(arguments)}}}\n</tool_call>')
                parts.append("<|im_end|>\n")
            elif role == "tool":
                first = i == 0 or messages[i - 1]["role"] != "tool"
                last = i == len(messages) - 1 or messages[i + 1]["role"] != "tool"
                parts.append(("<|im_start|>user" if first else "") + f"\n<tool_response>\n{content}\n</tool_response>"
                             + ("<|im_end|>\n" if last else ""))
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
            if (options or {}).get("enable_thinking", True) is False:
                parts.append("<think>\n\n</think>\n\n")
        text = "".join(parts)
        return _continued(text, messages) if continue_final_message else text


def _tojson(value, indent: int | None = None) -> str:
    """The chat templates' `tojson` filter as transformers defines it (no ASCII escaping)."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _continued(text: str, messages: list[dict]) -> str:
    """continue_final_message, as transformers applies it: the text ends right after the final message's
    content (trimmed, for templates that trim it), with no end-of-turn after it."""
    final = messages[-1]["content"] if messages else ""
    if not isinstance(final, str) or not final:
        return text
    at = text.rfind(final)
    if at < 0:
        final = final.strip()
        at = text.rfind(final)
    return text[:at + len(final)] if at >= 0 else text


def _is_tool_response(content) -> bool:
    """A user message that only carries a tool's answer (Qwen3's template does not count it as a query)."""
    return isinstance(content, str) and content.startswith("<tool_response>") and content.endswith("</tool_response>")


def _byte_level_alphabet() -> list[str]:
    """GPT-2's bytes-to-unicode map: printable bytes stand for themselves, the others from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet, extra = {}, 0
    for b in range(256):
        if b in printable:
            alphabet[b] = chr(b)
        else:
            alphabet[b] = chr(256 + extra)
            extra += 1
    return [alphabet[b] for b in range(256)]


_BYTE_LEVEL = _byte_level_alphabet()
_BYTE_VALUE = {c: b for b, c in enumerate(_BYTE_LEVEL)}
_BYTE_TOKEN = re.compile(r"<0x([0-9A-F]{2})>")  # the built-in vocabulary's name of a byte


def single_token_words(tokenizer, words: tuple[str, ...], after_a_word: bool) -> list[tuple[int, str]]:
    """The `words` a tokenizer encodes as one token (after another word, or at the start of a text),
    with their text; such words concatenated re-encode to the same ids."""
    head = tokenizer.encode("a", add_special_tokens=False) if after_a_word else []
    prefix = "a" if after_a_word else ""
    pool = []
    for word in words:
        ids = tokenizer.encode(prefix + word, add_special_tokens=False)
        if len(ids) == len(head) + 1 and ids[:len(head)] == head and tokenizer.decode(ids) == prefix + word:
            pool.append((ids[-1], word))
    return pool


@functools.lru_cache(maxsize=1)
def _llama3() -> Llama3Tokenizer:
    return Llama3Tokenizer()  # immutable once built: one per process


@functools.lru_cache(maxsize=1)
def _qwen() -> QwenTokenizer:
    return QwenTokenizer()


def load_tokenizer(spec: str | None = None, model_type: str | None = None) -> Tokenizer:
    """None: the shipped tokenizer of the model's family (`model_type` of its config.json: Qwen2 and Qwen3
    models get Qwen's, every other model Llama 3's); "builtin": the built-in one; otherwise a Hugging Face
    tokenizer directory."""
    if spec is None:
        return _qwen() if is_qwen(model_type) else _llama3()
    if spec == "builtin":
        return BuiltinTokenizer()
    if re.fullmatch(r"\w[\w.-]*/\w[\w.-]*", spec) and not Path(spec).exists():  # a Hugging Face repo id
        return _shipped_for_repo_id(spec)
    return HFTokenizer(spec)


TOKENIZER_OPTIONS = ("give a local Hugging Face tokenizer directory (no hub access), `builtin`, or a model id of a "
                     "family whose tokenizer ships here: Llama 3 (meta-llama/Llama-3.1-8B-Instruct, ...), Qwen2 and "
                     "Qwen3 (Qwen/Qwen3-8B, ...)")


def _shipped_for_repo_id(repo_id: str) -> Tokenizer:
    """The shipped tokenizer a Hugging Face repo id names by its family (no download; ValueError if none ships)."""
    for pattern, family, shipped in ((r"llama-?3", "Llama 3", _llama3), (r"qwen-?[23]", "Qwen", _qwen)):
        if re.search(pattern, repo_id.rsplit("/", 1)[-1], re.IGNORECASE):
            log.info("--tokenizer %s: not a local directory; using the shipped %s tokenizer, the one that model "
                     "has (no download)", repo_id, family)
            return shipped()
    raise ValueError(f"--tokenizer {repo_id}: not a local directory, and no tokenizer of its family ships here; "
                     f"{TOKENIZER_OPTIONS}")


def load_tokenizers(spec: str | None, model_types: Mapping[str, str | None]) -> dict[str, Tokenizer]:
    """The tokenizer of each served model name (name -> its `model_type`): `spec`'s for all of them,
    else each family's shipped one (one object per family)."""
    if spec is not None:
        return dict.fromkeys(model_types, load_tokenizer(spec))
    return {name: load_tokenizer(None, model_type) for name, model_type in model_types.items()}


def model_type_of(name: str) -> str | None:
    """The `model_type` of a model the catalogue (or a local config) knows by this name; None if none does."""
    from emulator.models import load_model
    try:
        return load_model(name).model_type
    except (ValueError, OSError):
        return None


def is_qwen(model_type: str | None) -> bool:
    """Whether a model of this type uses Qwen's tokenizer (Qwen2, Qwen2.5, Qwen3 and their MoE variants)."""
    return model_type is not None and model_type.startswith(("qwen2", "qwen3"))


Tokenizer = BuiltinTokenizer | HFTokenizer | TiktokenTokenizer
