"""Multi-turn conversations with real token ids: each turn's prompt is the last one plus new tokens, so a
conversation's next turn shares its whole history with the one before (prefix caching, offload tiers)."""
from __future__ import annotations

import numpy as np

from emulator.request import Request


def multi_turn(conversations: int, turns: int, *, first: int = 2000, added: int = 400, output: int = 20,
               turn_gap: float = 30.0, stagger: float = 0.5, model: str | None = "m") -> list[Request]:
    """Turn t of conversation c (`first` prompt tokens, `added` more each turn, `output` tokens out) arrives
    at t * turn_gap + c * stagger."""
    rng = np.random.default_rng(5)
    chats = []
    for _ in range(conversations):
        tokens, prompts = rng.integers(0, 30000, first), []
        for _ in range(turns):
            prompts.append(tokens)
            tokens = np.concatenate([tokens, rng.integers(0, 30000, added)])
        chats.append(prompts)
    return [Request(f"c{c}t{t}", len(chat[t]), output, arrival_time=t * turn_gap + c * stagger,
                    prompt_token_ids=chat[t], model=model)
            for t in range(turns) for c, chat in enumerate(chats)]
