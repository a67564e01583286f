"""Chained hashes of full KV blocks, the keys of the prefix cache.

vLLM hashes block i as H(hash of block i-1, tokens of block i), so equal hashes
mean equal prefixes. We keep that meaning with a cheaper 64-bit hash computed
for all blocks of a request at once with numpy:

    c_i = mix(tokens of block i, i)          content of one block
    h_i = sum_{j<=i} c_j * P**(i-j) mod 2**64 the chain, a linear recurrence
    key_i = mix(h_i)

The recurrence is evaluated as P**i * cumsum(c_j * P**-j), which numpy does in
wrapping uint64 arithmetic. Tokens past the known ids (synthetic output) get
content unique to the request, so they never match another request's blocks.
A request with no token ids at all (most traces) is unique content from its
first block on: its keys are drawn from its seed and the block index directly,
without making and hashing the tokens (equal keys still mean equal content).
A request's cache_salt is folded into its first block's content, as vLLM puts it
in the first block's extra keys: the whole chain then differs from unsalted ones.
Its LoRA adapter's name and path are folded in there too (vLLM hashes them into
every block of the request, which the chain makes the same thing): requests of
different adapters, or of none, share no block.
"""
from __future__ import annotations

import hashlib

import numpy as np

from emulator.request import Request

_MASK = (1 << 64) - 1
_P = 0x9E3779B97F4A7C15 | 1  # odd, hence invertible mod 2**64
_P_INV = pow(_P, -1, 1 << 64)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_TOKEN_WEIGHTS_CACHE: dict[int, np.ndarray] = {}
# splitmix64's constants as numpy scalars, made once (every arrival hashes its blocks)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_STRIDES = np.arange(4096, dtype=np.uint64) * _GOLDEN  # i * golden for the blocks i of synthetic content


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection on uint64 that spreads every bit."""
    return _mix64_in_place(x.astype(np.uint64, copy=True))


def _mix64_in_place(x: np.ndarray) -> np.ndarray:
    """`mix64` on a uint64 array of the caller's own, in place (array arithmetic on uint64 wraps silently)."""
    x ^= x >> _S30
    x *= _M1
    x ^= x >> _S27
    x *= _M2
    x ^= x >> _S31
    return x


def _token_weights(block_size: int) -> np.ndarray:
    weights = _TOKEN_WEIGHTS_CACHE.get(block_size)
    if weights is None:
        weights = mix64(np.arange(1, block_size + 1, dtype=np.uint64)) | np.uint64(1)
        _TOKEN_WEIGHTS_CACHE[block_size] = weights
    return weights


def _chain(contents: np.ndarray) -> list[int]:
    """Chain per-block contents into prefix hashes (see the module docstring)."""
    n = len(contents)
    if n == 0:
        return []
    with np.errstate(over="ignore"):
        idx = np.arange(n, dtype=np.uint64)
        contents = mix64(contents + idx * _GOLDEN)
        powers = np.empty(n, dtype=np.uint64)
        inverse_powers = np.empty(n, dtype=np.uint64)
        powers[0] = inverse_powers[0] = 1
        if n > 1:
            powers[1:] = _P
            inverse_powers[1:] = _P_INV
            powers = np.cumprod(powers, dtype=np.uint64)
            inverse_powers = np.cumprod(inverse_powers, dtype=np.uint64)
        chained = powers * np.cumsum(contents * inverse_powers, dtype=np.uint64)
    return mix64(chained).tolist()


def token_block_contents(token_ids: np.ndarray, block_size: int) -> np.ndarray:
    """One uint64 per full block of `token_ids`."""
    n_full = len(token_ids) // block_size
    blocks = np.asarray(token_ids[: n_full * block_size], dtype=np.uint64).reshape(n_full, block_size)
    with np.errstate(over="ignore"):
        return (blocks * _token_weights(block_size)).sum(axis=1, dtype=np.uint64)


def synthetic_tokens(seed: int, start: int, count: int) -> np.ndarray:
    """Token content unique to `seed`: what a request generates when no ids are given."""
    with np.errstate(over="ignore"):
        positions = np.arange(start, start + count, dtype=np.uint64)
        return mix64(positions ^ np.uint64(seed & _MASK)) | np.uint64(1 << 63)


def synthetic_block_hashes(seed: int, n_blocks: int) -> list[int]:
    """Keys of the first n blocks of content unique to `seed` (a request given no token ids)."""
    global _STRIDES
    if n_blocks > len(_STRIDES):
        _STRIDES = np.arange(2 * n_blocks, dtype=np.uint64) * _GOLDEN
    # mix64 of i * golden ^ seed, in place on the fresh array (every arrival hashes its blocks)
    return _mix64_in_place(_STRIDES[:n_blocks] ^ np.uint64(seed & _MASK)).tolist()


def request_block_hashes(request: Request, block_size: int) -> list[int]:
    """Hashes of every block the request can fill (prompt plus its whole output)."""
    total = request.num_prompt_tokens + request.output_len
    n_blocks = total // block_size
    if n_blocks == 0:
        return []
    known = request.prompt_token_ids
    if known is None:
        return synthetic_block_hashes(request.content_seed, n_blocks)
    if known is not None and request.output_token_ids is not None:
        known = np.concatenate([np.asarray(known, dtype=np.uint64),
                                np.asarray(request.output_token_ids, dtype=np.uint64)])
    n_known = 0 if known is None else min(len(known), total)
    if n_known < n_blocks * block_size:
        tail = synthetic_tokens(request.content_seed, n_known, n_blocks * block_size - n_known)
        tokens = tail if n_known == 0 else np.concatenate([np.asarray(known[:n_known], dtype=np.uint64), tail])
    else:
        tokens = np.asarray(known[: n_blocks * block_size], dtype=np.uint64)
    contents = token_block_contents(tokens, block_size)
    if request.cache_salt and len(contents):
        contents[0] ^= _salt_content(request.cache_salt)
    if request.lora is not None and len(contents):
        contents[0] ^= _salt_content("\0".join(request.lora.hash_key))
    return _chain(contents)


def _salt_content(salt: str) -> np.uint64:
    return np.uint64(int.from_bytes(hashlib.blake2b(salt.encode(), digest_size=8).digest(), "little"))


def ensure_block_hashes(request: Request, block_size: int) -> list[int]:
    """The request's block hashes for this block size, computed once and kept on the request."""
    if request.block_hashes is None or request.hash_block_size != block_size:
        request.block_hashes = request_block_hashes(request, block_size)
        request.hash_block_size = block_size
    return request.block_hashes
