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


def token_id_name(token_id: int) -> str:
    """How vLLM names a token with return_tokens_as_token_ids."""
    return f"token_id:{token_id}"


class LogprobSource:
    """Log-probabilities for tokens, with `decode(id) -> text` for the alternatives' text (vLLM's decoded_token:
    the token decoded alone, special tokens kept, convert_ids_list_to_tokens), also a sampled token's where the
    output shows nothing of it (a special token); with `as_token_ids` (vLLM's return_tokens_as_token_ids) tokens
    are named "token_id:<id>"."""

    def __init__(self, alternatives: Sequence[int], decode: Callable[[int], str], as_token_ids: bool = False) -> None:
        self.alternatives = list(dict.fromkeys(alternatives))
        self.decode = decode
        self.as_token_ids = as_token_ids

    def sampled(self, token_id: int, position: int) -> float:
        return round(-1.5 * _uniform(token_id, position), 4)

    def top(self, token_id: int, token_text: str, position: int, k: int) -> list[tuple[str, float]]:
        """The k most likely tokens at `position` (the sampled one first), as (text, logprob)."""
        return [(token_id_name(i) if self.as_token_ids else text, logprob)
                for i, text, logprob in self.top_ids(token_id, token_text, position, k)]

    def top_ids(self, token_id: int, token_text: str, position: int, k: int) -> list[tuple[int, str, float]]:
        """The k most likely tokens at `position` (the sampled one first), as (id, text, logprob)."""
        out = [(token_id, token_text, self.sampled(token_id, position))] if k > 0 else []
        logprob = out[0][2] if out else 0.0
        start = int(_uniform(token_id, position, 1) * len(self.alternatives))
        for i in range(len(self.alternatives)):
            if len(out) >= k:
                break
            alt = self.alternatives[(start + i) % len(self.alternatives)]
            if alt == token_id:
                continue
            logprob = round(logprob - 0.25 - 2.0 * _uniform(alt, position, 2), 4)
            out.append((alt, self.decode(alt), logprob))
        return out

    def completion(self, token_ids: Sequence[int], texts: Sequence[str], first_position: int, k: int,
                   text_offset: int, prompt_first: bool = False) -> dict:
        """vLLM's CompletionLogProbs for consecutive tokens (the first of a prompt has none)."""
        offsets, logprobs, tops, names = [], [], [], []
        for i, (token_id, text) in enumerate(zip(token_ids, texts)):
            text = text or self.decode(token_id)
            name = token_id_name(token_id) if self.as_token_ids else text
            names.append(name)
            offsets.append(text_offset)
            text_offset += len(name)
            if prompt_first and i == 0:
                logprobs.append(None)
                tops.append(None)
                continue
            position = first_position + i
            logprobs.append(self.sampled(token_id, position))
            tops.append(dict(self.top(token_id, text, position, max(k, 1))))
        return {"text_offset": offsets, "token_logprobs": logprobs, "tokens": names, "top_logprobs": tops}

    def chat(self, token_ids: Sequence[int], texts: Sequence[str], first_position: int, k: int) -> dict:
        """vLLM's ChatCompletionLogProbs for consecutive output tokens."""
        content = []
        for i, (token_id, text) in enumerate(zip(token_ids, texts)):
            position = first_position + i
            text = text or self.decode(token_id)
            top = [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                   for t, lp in self.top(token_id, text, position, k)]
            # the token's bytes are its text's, even when it is named by its id (as vLLM's)
            content.append({"token": token_id_name(token_id) if self.as_token_ids else text,
                            "logprob": self.sampled(token_id, position), "bytes": list(text.encode()),
                            "top_logprobs": top})
        return {"content": content}

    def prompt(self, token_ids: Sequence[int], k: int) -> list[dict | None]:
        """vLLM's prompt_logprobs: None for the first token, then each prompt token (rank 1) with the
        next most likely, k in all (the token alone for k = 0)."""
        out: list[dict | None] = [None]
        for position, token in enumerate(token_ids[1:], start=1):
            entries = self.top_ids(token, self.decode(token), position, max(k, 1))
            out.append({str(i): {"logprob": logprob, "rank": rank, "decoded_token": text}
                        for rank, (i, text, logprob) in enumerate(entries, start=1)})
        return out
