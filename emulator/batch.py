"""The shape of one engine step: what its cost depends on."""
from __future__ import annotations


class BatchShape:
    """What a step's cost depends on, folded from the scheduled requests.

    Prefill chunks (more than one new token) are folded into one chunk of all
    their tokens whose history gives the same causal attention work,
    sum c*(h + c/2); decodes (one new token) are counted with the sum and the
    maximum of their context lengths.
    """
    __slots__ = ("num_tokens", "num_reqs", "prefill_tokens", "prefill_work", "num_decode",
                 "decode_context", "decode_context_max")

    def __init__(self, num_tokens=0, num_reqs=0, prefill_tokens=0, prefill_work=0.0, num_decode=0,
                 decode_context=0, decode_context_max=0) -> None:
        self.num_tokens = num_tokens
        self.num_reqs = num_reqs
        self.prefill_tokens = prefill_tokens
        self.prefill_work = prefill_work
        self.num_decode = num_decode
        self.decode_context = decode_context
        self.decode_context_max = decode_context_max

    def add(self, n: int, history: int) -> None:
        """Count one request computing n new tokens after `history` cached ones."""
        self.num_tokens += n
        self.num_reqs += 1
        if n == 1:
            self.num_decode += 1
            self.decode_context += history
            if history > self.decode_context_max:
                self.decode_context_max = history
        else:
            self.prefill_tokens += n
            self.prefill_work += n * (history + n / 2)

    @classmethod
    def decode(cls, num_decode: int, context: int, context_max: int) -> "BatchShape":
        """A step of `num_decode` requests decoding one token each, with these context lengths."""
        return cls(num_decode, num_decode, 0, 0.0, num_decode, context, context_max)

    @classmethod
    def from_chunks(cls, chunks) -> "BatchShape":
        """chunks: iterable of (new tokens, tokens already in the KV cache)."""
        shape = cls()
        for n, history in chunks:
            shape.add(n, history)
        return shape

    @property
    def prefill_history(self) -> float:
        """History of the equivalent single prefill chunk (0 when none)."""
        pc = self.prefill_tokens
        return max(0.0, self.prefill_work / pc - pc / 2) if pc else 0.0

    @property
    def mean_decode_context(self) -> float:
        return self.decode_context // self.num_decode if self.num_decode else 0


# What an idle data-parallel rank runs while the others step (vLLM's dummy batch).
IDLE_RANK = BatchShape.decode(1, 1, 1)
