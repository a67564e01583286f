"""Synthetic log-probabilities in the shapes vLLM returns them.

No model computes them, so each is a stable function of the token id and its
position: the sampled token is the most likely one, its alternatives (other words of
the output pool) follow in decreasing order. Only the shapes are meant to be real:
completions' `{text_offset, token_logprobs, tokens, top_logprobs}` and chat's
`{content: [{token, logprob, bytes, top_logprobs: [...]}]}`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence


def _mix(x: int) -> int:
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def _uniform(token_id: int, position: int, salt: int = 0) -> float:
    return _mix(token_id * 1_000_003 + position * 7919 + salt) / 2.0**64


class LogprobSource:
    """Log-probabilities for tokens, with `decode(id) -> text` for the alternatives' text."""

    def __init__(self, alternatives: Sequence[int], decode: Callable[[int], str]) -> None:
        self.alternatives = list(dict.fromkeys(alternatives))
        self.decode = decode

    def sampled(self, token_id: int, position: int) -> float:
        return round(-1.5 * _uniform(token_id, position), 4)

    def top(self, token_id: int, token_text: str, position: int, k: int) -> list[tuple[str, float]]:
        """The k most likely tokens at `position` (the sampled one first), as (text, logprob)."""
        out = [(token_text, self.sampled(token_id, position))] if k > 0 else []
        logprob = out[0][1] if out else 0.0
        start = int(_uniform(token_id, position, 1) * len(self.alternatives))
        for i in range(len(self.alternatives)):
            if len(out) >= k:
                break
            alt = self.alternatives[(start + i) % len(self.alternatives)]
            if alt == token_id:
                continue
            logprob = round(logprob - 0.25 - 2.0 * _uniform(alt, position, 2), 4)
            out.append((self.decode(alt), logprob))
        return out

    def completion(self, token_ids: Sequence[int], texts: Sequence[str], first_position: int, k: int,
                   text_offset: int, prompt_first: bool = False) -> dict:
        """vLLM's CompletionLogProbs for consecutive tokens (the first of a prompt has none)."""
        offsets, logprobs, tops = [], [], []
        for i, (token_id, text) in enumerate(zip(token_ids, texts)):
            offsets.append(text_offset)
            text_offset += len(text)
            if prompt_first and i == 0:
                logprobs.append(None)
                tops.append(None)
                continue
            position = first_position + i
            logprobs.append(self.sampled(token_id, position))
            tops.append(dict(self.top(token_id, text, position, max(k, 1))))
        return {"text_offset": offsets, "token_logprobs": logprobs, "tokens": list(texts), "top_logprobs": tops}

    def chat(self, token_ids: Sequence[int], texts: Sequence[str], first_position: int, k: int) -> dict:
        """vLLM's ChatCompletionLogProbs for consecutive output tokens."""
        content = []
        for i, (token_id, text) in enumerate(zip(token_ids, texts)):
            position = first_position + i
            top = [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                   for t, lp in self.top(token_id, text, position, k)]
            content.append({"token": text, "logprob": self.sampled(token_id, position),
                            "bytes": list(text.encode()), "top_logprobs": top})
        return {"content": content}
