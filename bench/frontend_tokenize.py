"""Time vLLM's API server spends tokenizing an InferenceX random prompt, by prompt length.

    python bench/frontend_tokenize.py TOKENIZER_JSON [--repeats 15]

InferenceX's client (utils/bench_serving/benchmark_serving.py, sample_random_requests)
sends text: a run of consecutive token ids of the model's vocabulary, decoded, then
re-encoded until it has the target length. The server encodes that text again with
the model's Hugging Face fast tokenizer, one prompt at a time on one thread (vLLM
0.10-0.x AsyncMicrobatchTokenizer; see bench/accuracy.py FrontEnd). This builds such
prompts with the given tokenizer (a `tokenizer.json`) and prints the median encode
time per length, the table bench/accuracy.py's TOKENIZE_MS holds.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

LENGTHS = (128, 512, 1024, 2048, 4096, 8192)


def inferencex_prompt(tokenizer, length: int, offset: int) -> str:
    """Decode `length` consecutive ids from `offset`, re-encoded to that length (sample_random_requests)."""
    vocab = tokenizer.get_vocab_size()
    ids = [(offset + j) % vocab for j in range(length)]
    text = tokenizer.decode(ids)
    for _ in range(10):
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if len(ids) == length:
            break
        ids = ids[:length] + [int(x) for x in np.random.randint(0, vocab, size=max(0, length - len(ids)))]
        text = tokenizer.decode(ids)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tokenizer", help="a Hugging Face tokenizer.json")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    try:
        from tokenizers import Tokenizer
    except ImportError:
        print("needs the `tokenizers` package", file=sys.stderr)
        return 2
    tokenizer = Tokenizer.from_file(args.tokenizer)
    rng = np.random.RandomState(0)
    print("prompt tokens  encode ms (median)  us/token")
    for length in LENGTHS:
        times, counts = [], []
        for _ in range(args.repeats):
            text = inferencex_prompt(tokenizer, length, int(rng.randint(0, tokenizer.get_vocab_size())))
            start = time.perf_counter()
            counts.append(len(tokenizer.encode(text, add_special_tokens=False).ids))
            times.append(time.perf_counter() - start)
        ms, n = 1e3 * float(np.median(times)), float(np.median(counts))
        print(f"{n:13.0f}  {ms:18.2f}  {1e3 * ms / n:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
