"""Readers for request traces: one `TraceRecord` per request, lazily, in file order.

Formats (`FORMATS`):
- llmservingsim: JSONL with input_toks, output_toks, arrival_time_ns and optionally
  input_tok_ids / output_tok_ids / request_id (the ShareGPT workloads of LLMServingSim);
- azure: Azure LLM inference trace 2023 CSV (TIMESTAMP, ContextTokens, GeneratedTokens);
- mooncake: Mooncake JSONL (timestamp in ms, input_length, output_length, hash_ids of
  512-token blocks; equal leading ids are a shared prefix, and the token ids made for
  them share exactly that prefix);
- vidur: Vidur CSV (arrived_at, num_prefill_tokens, num_decode_tokens);
- burstgpt: BurstGPT CSV (Timestamp, Model, Request tokens, Response tokens, ...).

Arrival times are seconds relative to the first request. A malformed line raises
`TraceError` naming the file and line.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from emulator.block_hash import synthetic_tokens

MOONCAKE_BLOCK = 512
FORMATS = ("llmservingsim", "azure", "mooncake", "vidur", "burstgpt")


class TraceError(ValueError):
    """A trace that cannot be read, with the file and line that broke."""


@dataclass(slots=True)
class TraceRecord:
    arrival: float
    input_len: int
    output_len: int
    line: int
    token_ids: np.ndarray | None = None
    output_token_ids: np.ndarray | None = None
    request_id: str | None = None


def detect_format(path: Path) -> str:
    with path.open(newline="") as f:
        first = next((line.strip() for line in f if line.strip()), "")
    if not first:
        raise TraceError(f"{path}: the trace is empty")
    if first.startswith("{"):
        try:
            keys = json.loads(first).keys()
        except json.JSONDecodeError as exc:
            raise TraceError(f"{path}:1: not valid JSON ({exc.msg})") from None
        if "hash_ids" in keys or "input_length" in keys:
            return "mooncake"
        if "input_toks" in keys:
            return "llmservingsim"
    header = {h.strip() for h in first.split(",")}
    if {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} <= header:
        return "azure"
    if {"arrived_at", "num_prefill_tokens", "num_decode_tokens"} <= header:
        return "vidur"
    if {"Timestamp", "Request tokens", "Response tokens"} <= header:
        return "burstgpt"
    raise TraceError(f"{path}: cannot tell the trace format from its first line; pass --trace-format "
                     f"(one of {', '.join(FORMATS)})")


def read_trace(path: str | Path, fmt: str | None = None) -> Iterator[TraceRecord]:
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: no such trace file")
    fmt = fmt or detect_format(path)
    reader = _READERS.get(fmt)
    if reader is None:
        raise TraceError(f"unknown trace format {fmt!r}; choose one of {', '.join(FORMATS)}")
    t0 = None
    for record in reader(path):
        if t0 is None:
            t0 = record.arrival
        record.arrival -= t0
        yield record
    if t0 is None:
        raise TraceError(f"{path}: the trace holds no request")


def _int(value, path: Path, line: int, name: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TraceError(f"{path}:{line}: field {name!r} is not a number ({value!r})") from None
    if number != int(number):
        raise TraceError(f"{path}:{line}: field {name!r} must be a whole number ({value!r})")
    return int(number)


def _float(value, path: Path, line: int, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TraceError(f"{path}:{line}: field {name!r} is not a number ({value!r})") from None


def _json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open() as f:
        for line_no, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise TraceError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise TraceError(f"{path}:{line_no}: expected a JSON object")
            yield line_no, obj


def _require(obj: dict, keys: tuple[str, ...], path: Path, line: int) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise TraceError(f"{path}:{line}: missing field {missing[0]!r}")


def _token_array(value, path: Path, line: int, name: str) -> np.ndarray:
    try:
        ids = np.asarray(value, dtype=np.int64)
    except (TypeError, ValueError):
        raise TraceError(f"{path}:{line}: {name!r} must be a list of integers") from None
    if ids.ndim != 1:
        raise TraceError(f"{path}:{line}: {name!r} must be a flat list of integers")
    return ids


def _read_llmservingsim(path: Path) -> Iterator[TraceRecord]:
    for line, obj in _json_lines(path):
        _require(obj, ("input_toks", "output_toks", "arrival_time_ns"), path, line)
        record = TraceRecord(
            arrival=_float(obj["arrival_time_ns"], path, line, "arrival_time_ns") * 1e-9,
            input_len=_int(obj["input_toks"], path, line, "input_toks"),
            output_len=_int(obj["output_toks"], path, line, "output_toks"),
            line=line,
            request_id=None if obj.get("request_id") is None else str(obj["request_id"]),
        )
        if obj.get("input_tok_ids") is not None:
            record.token_ids = _token_array(obj["input_tok_ids"], path, line, "input_tok_ids")
            if len(record.token_ids) != record.input_len:
                raise TraceError(f"{path}:{line}: input_tok_ids has {len(record.token_ids)} ids but "
                                 f"input_toks says {record.input_len}")
        if obj.get("output_tok_ids") is not None:
            record.output_token_ids = _token_array(obj["output_tok_ids"], path, line, "output_tok_ids")
        yield record


def mooncake_tokens(hash_ids: list[int], input_len: int) -> np.ndarray:
    """Token content for a Mooncake prompt: block i is a function of hash_ids[i] alone."""
    parts = []
    remaining = input_len
    for h in hash_ids:
        n = min(MOONCAKE_BLOCK, remaining)
        if n <= 0:
            break
        parts.append(synthetic_tokens(int(h) * 0x9E3779B1 + 0x5BD1E995, 0, n))
        remaining -= n
    if remaining > 0:  # more tokens than the hash blocks cover: the tail is unique to the request
        parts.append(synthetic_tokens(hash((tuple(hash_ids), input_len)) & ((1 << 63) - 1), 0, remaining))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)


def _read_mooncake(path: Path) -> Iterator[TraceRecord]:
    for line, obj in _json_lines(path):
        _require(obj, ("timestamp", "input_length", "output_length"), path, line)
        input_len = _int(obj["input_length"], path, line, "input_length")
        record = TraceRecord(
            arrival=_float(obj["timestamp"], path, line, "timestamp") / 1000.0,
            input_len=input_len,
            output_len=_int(obj["output_length"], path, line, "output_length"),
            line=line,
            request_id=None if obj.get("request_id") is None else str(obj["request_id"]),
        )
        hash_ids = obj.get("hash_ids")
        if hash_ids:
            if not isinstance(hash_ids, list) or not all(isinstance(h, int) for h in hash_ids):
                raise TraceError(f"{path}:{line}: 'hash_ids' must be a list of integers")
            record.token_ids = mooncake_tokens(hash_ids, input_len)
        yield record


def _csv_rows(path: Path, columns: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in columns if c not in header]
        if missing:
            raise TraceError(f"{path}:1: missing column {missing[0]!r}")
        reader.fieldnames = header
        for line, row in enumerate(reader, 2):
            yield line, row


def _read_azure(path: Path) -> Iterator[TraceRecord]:
    for line, row in _csv_rows(path, ("TIMESTAMP", "ContextTokens", "GeneratedTokens")):
        stamp = row["TIMESTAMP"].strip()
        try:  # fractions beyond microseconds (7 digits in the Azure files) are cut
            date, _, frac = stamp.partition(".")
            when = datetime.fromisoformat(date).timestamp() + (float("0." + frac) if frac else 0.0)
        except ValueError:
            raise TraceError(f"{path}:{line}: bad TIMESTAMP {stamp!r}") from None
        yield TraceRecord(when, _int(row["ContextTokens"], path, line, "ContextTokens"),
                          _int(row["GeneratedTokens"], path, line, "GeneratedTokens"), line)


def _read_vidur(path: Path) -> Iterator[TraceRecord]:
    for line, row in _csv_rows(path, ("arrived_at", "num_prefill_tokens", "num_decode_tokens")):
        yield TraceRecord(_float(row["arrived_at"], path, line, "arrived_at"),
                          _int(row["num_prefill_tokens"], path, line, "num_prefill_tokens"),
                          _int(row["num_decode_tokens"], path, line, "num_decode_tokens"), line)


def _read_burstgpt(path: Path) -> Iterator[TraceRecord]:
    for line, row in _csv_rows(path, ("Timestamp", "Request tokens", "Response tokens")):
        yield TraceRecord(_float(row["Timestamp"], path, line, "Timestamp"),
                          _int(row["Request tokens"], path, line, "Request tokens"),
                          _int(row["Response tokens"], path, line, "Response tokens"), line)


_READERS = {
    "llmservingsim": _read_llmservingsim,
    "azure": _read_azure,
    "mooncake": _read_mooncake,
    "vidur": _read_vidur,
    "burstgpt": _read_burstgpt,
}
