"""Prompts of an exact token count for the server's tokenizer, built from a trace's lengths.

A trace of lengths only (Azure, BurstGPT, Vidur, synthetic) needs text that the server
will count as exactly `input_len` prompt tokens. The text is a sequence of common English
words, each one token after a space in the tokenizer given (the words that are not are
dropped up front), drawn by a generator seeded per request, so prompts share no prefix
by chance; every prompt is then encoded and trimmed or padded until its count is exact.

Mooncake's `hash_ids` name 512-token blocks: a block's words depend on its hash id
alone, so two prompts with equal leading hash ids begin with identical text and share
exactly those blocks in the server's prefix cache. Chat prompts leave room for the
tokens the chat template adds around the one user message.
"""
from __future__ import annotations

import hashlib

import numpy as np

from loadgen.traces import MOONCAKE_BLOCK, TraceRecord

# Common short English words with their leading space: single tokens in the built-in tokenizer
# and in the BPE vocabularies of the Llama, Qwen and Mistral families.
WORDS = (
    " the", " of", " and", " to", " in", " is", " it", " you", " for", " on", " are", " as", " was", " be",
    " at", " or", " an", " we", " can", " all", " has", " one", " but", " not", " by", " new", " now", " how",
    " its", " our", " may", " use", " way", " any", " see", " who", " out", " day", " get", " set", " run",
    " end", " top", " yes", " ask", " why", " few", " own", " old", " big", " low", " far", " key", " let",
    " put", " say", " try", " add", " men", " age", " art", " law", " air", " car", " sea", " sun", " job",
    " map", " box", " red", " net", " log", " tag", " row", " cat", " dog", " sky", " tea", " egg", " ice",
)


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


class PromptBuilder:
    """Makes the prompt text (or chat messages) for each trace record."""

    def __init__(self, tokenizer, chat: bool = False, seed: int = 0) -> None:
        self.tokenizer = tokenizer
        self.chat = chat
        self.seed = seed
        head = tokenizer.encode("a", False)
        self.words = [w for w in WORDS if len(tokenizer.encode("a" + w, False)) == len(head) + 1]
        if len(self.words) < 16:
            raise ValueError(f"the tokenizer {getattr(tokenizer, 'name', '')} encodes too few common words as one "
                             f"token to build prompts of exact lengths")
        self._blocks: dict[int, list[str]] = {}
        # what the server adds to the text: BOS for a completion; the chat template around one message
        if chat and hasattr(tokenizer, "render_chat"):
            empty = tokenizer.render_chat([{"role": "user", "content": ""}], True)
            self.overhead = len(tokenizer.encode(empty, False))
        else:
            self.overhead = len(tokenizer.encode("", True))

    def count(self, text: str) -> int:
        """Prompt tokens the server counts for this text."""
        if self.chat and hasattr(self.tokenizer, "render_chat"):
            return len(self.tokenizer.encode(self.tokenizer.render_chat([{"role": "user", "content": text}], True),
                                             False))
        return len(self.tokenizer.encode(text, not self.chat))

    def _words(self, seed: int, n: int) -> list[str]:
        picks = np.random.default_rng(seed).integers(0, len(self.words), n)
        words = self.words
        return [words[i] for i in picks]

    def _block(self, hash_id: int) -> list[str]:
        block = self._blocks.get(hash_id)
        if block is None:
            block = self._blocks[hash_id] = self._words(_seed(self.seed, "block", hash_id), MOONCAKE_BLOCK)
        return block

    def text(self, record: TraceRecord, index: int) -> str:
        """Text the server counts as `record.input_len` prompt tokens (at least the template's own)."""
        if record.prompt is not None:
            return record.prompt
        n = max(record.input_len - self.overhead, 0)
        if record.hash_ids:
            words = [w for h in record.hash_ids for w in self._block(h)][:n]
            if len(words) < n:  # tokens past the hash blocks are the request's own
                words += self._words(_seed(self.seed, "tail", index), n - len(words))
        else:
            words = self._words(_seed(self.seed, "request", index), n)
        return self._exact(words, record.input_len, index)

    def _exact(self, words: list[str], target: int, index: int) -> str:
        """Trim or pad the tail until the server's count is `target` (when the words merge across spaces)."""
        text = "".join(words)
        extra = self._words(_seed(self.seed, "pad", index), 64)
        for _ in range(64):
            have = self.count(text)
            if have == target or (have > target and not words):
                return text
            if have > target:
                del words[-min(have - target, len(words)):]
            else:
                words += extra[:target - have]
            text = "".join(words)
        return text  # the closest found; the server's usage reports the count it saw
