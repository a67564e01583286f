"""Token ids back to text as vLLM 0.33's derender does it (`renderers/online_derenderer.py`,
`tokenizers/detokenizer_utils.py`): incrementally, one token at a time over a window of token names.

The window (`Window`: the token names from `prefix_offset` on and the two offsets) is what a streaming
derender client carries between calls as `stream_state`; it starts from the prompt's last tokens, so a
tokenizer that marks a word's leading space (SentencePiece) keeps the first output word's space. A
text is new only once it decodes without a trailing U+FFFD (a character whose bytes are still
arriving). A whole output (`decode_output`) drops the token that stopped it, as the engine's
detokenizer does, and is cut at the stop string that ended it; a streamed one only drops the token.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from profiles.tokenizer import Tokenizer

INITIAL_OFFSET = 5  # vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET


@dataclass
class Window:
    """vLLM's incremental decoding state (the detokenizer fields of its DerenderStreamState)."""
    prev_tokens: list[str] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0


def _token_names(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool) -> list[str]:
    """convert_ids_to_tokens, without the special tokens when they are skipped (an id outside the
    vocabulary is an empty name)."""
    if skip_special_tokens:
        ids = [i for i in ids if not _is_special(tokenizer, i)]
    return [token_name(tokenizer, i) for i in ids]


def token_name(tokenizer: Tokenizer, token_id: int) -> str:
    """A token's name in the vocabulary ("" for an id the tokenizer has none for)."""
    if not 0 <= token_id < len(tokenizer):
        return ""
    try:
        return tokenizer.convert_ids_to_tokens([token_id])[0] or ""
    except (KeyError, ValueError):  # an id inside the size with no entry (a gap before the added tokens)
        return ""


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """vLLM's text of one token (convert_ids_list_to_tokens): its decoded text, with the leading spaces a
    SentencePiece name marks ("▁") and a lone decode drops."""
    name = token_name(tokenizer, token_id)
    if not name:
        return ""
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    markers = len(name) - len(name.lstrip("\u2581"))
    missing = markers - (len(text) - len(text.lstrip(" ")))
    return " " * missing + text if markers and missing > 0 else text


def _is_special(tokenizer: Tokenizer, token_id: int) -> bool:
    return tokenizer.decode([token_id], skip_special_tokens=True) == "" and \
        tokenizer.decode([token_id], skip_special_tokens=False) != ""


def seed(tokenizer: Tokenizer, prompt_token_ids: list[int] | None, skip_special_tokens: bool) -> Window:
    """vLLM's _seed_stream_state: the window primed with the prompt's last tokens (empty without any)."""
    if not prompt_token_ids:
        return Window()
    names = _token_names(tokenizer, list(prompt_token_ids[-INITIAL_OFFSET - 2:]), skip_special_tokens)
    return Window(names, max(len(names) - INITIAL_OFFSET, 0), len(names))


def decode_delta(tokenizer: Tokenizer, token_ids: list[int], window: Window,
                 skip_special_tokens: bool) -> tuple[str, Window]:
    """The text `token_ids` add after `window`, and the window after them (trimmed to what the next
    token can still read, so it never grows with the output)."""
    tokens, prefix, read = list(window.prev_tokens), window.prefix_offset, window.read_offset
    parts = []
    for token_id in token_ids:
        new = _token_names(tokenizer, [token_id], skip_special_tokens)
        start = min(prefix, read, len(tokens))
        visible = tokens[start:] + new
        prefix_text = tokenizer.convert_tokens_to_string(visible[prefix - start:read - start])
        text = tokenizer.convert_tokens_to_string(visible[prefix - start:])
        if len(text) > len(prefix_text) and not text.endswith("\ufffd"):
            parts.append(text[len(prefix_text):])
            prefix, read = read, len(tokens) + len(new)
        tokens = (tokens + new)[prefix:]
        read -= prefix
        prefix = 0
    return "".join(parts), Window(tokens, prefix, read)


def drop_stop_token(token_ids: list[int], finish_reason: str | None, stop_reason: int | str | None, eos_token_id,
                    stop_token_ids: list[int], ignore_eos: bool,
                    include_stop_str_in_output: bool) -> tuple[list[int], int | str | None]:
    """vLLM's _drop_stop_token: the ids to decode (without the token that stopped the output, unless it is
    to be shown) and the stop reason (a stop token other than EOS found here becomes it)."""
    if finish_reason != "stop" or isinstance(stop_reason, str) or not token_ids:
        return token_ids, stop_reason
    last = token_ids[-1]
    if stop_reason is None:
        if not ignore_eos and last == eos_token_id:
            stopped = True
        elif last in stop_token_ids:
            stopped, stop_reason = True, last
        else:
            stopped = False
    else:
        stopped = last == stop_reason
    if not stopped or include_stop_str_in_output:
        return token_ids, stop_reason
    return token_ids[:-1], stop_reason


def decode_output(tokenizer: Tokenizer, token_ids: list[int], window: Window, finish_reason: str | None,
                  stop_reason: int | str | None, request, skip_special_tokens: bool) -> tuple[str, int | str | None]:
    """vLLM's _decode_output: a whole output's text (its stop token dropped, cut at the stop string that
    ended it, which counts only past `min_tokens`) and its stop reason. `request`: the chat or completion
    request it answers, or None."""
    reported = stop_reason
    token_ids, stop_reason = drop_stop_token(
        token_ids, finish_reason, stop_reason, tokenizer.eos_token_id,
        list(request.stop_token_ids or ()) if request is not None else [],
        request is not None and request.ignore_eos, request is not None and request.include_stop_str_in_output)
    if finish_reason != "stop" or isinstance(reported, int):
        stops = []
    elif isinstance(reported, str):
        stops = [reported]
    else:
        stops = [s for s in request.stop_strings() if s] if request is not None else []
    min_tokens = request.min_tokens if request is not None else 0
    head, window = decode_delta(tokenizer, token_ids[:min_tokens], window, skip_special_tokens)
    tail, _ = decode_delta(tokenizer, token_ids[min_tokens:], window, skip_special_tokens)
    text = head + tail
    include = request is not None and request.include_stop_str_in_output
    match = check_stop_strings(text, len(tail), stops, include)
    if match is None:
        return text, stop_reason
    stop, cut = match
    return (text if cut == -1 else text[:cut]), stop


def check_stop_strings(text: str, new_chars: int, stops: list[str], include: bool) -> tuple[str, int] | None:
    """vLLM's check_stop_strings: (the stop string that completes earliest in the new text, the length to
    cut the text to, -1 for none), or None."""
    if not new_chars or not stops:
        return None
    best, best_index, best_end = None, 0, sys.maxsize
    for stop in stops:
        index = text.find(stop, 1 - new_chars - len(stop))
        if index != -1 and index + len(stop) < best_end:
            best, best_index, best_end = stop, index, index + len(stop)
    if best is None:
        return None
    if include:
        return best, (-1 if best_end >= len(text) else best_end)
    return best, best_index
