"""Readers for request traces: one `TraceRecord` per request, lazily, in file order.

Formats (`FORMATS`):
- llmservingsim: JSONL with input_toks, output_toks, arrival_time_ns and optionally
  input_tok_ids / output_tok_ids / request_id / model / lora (the ShareGPT workloads of LLMServingSim);
- azure: Azure LLM inference trace 2023 CSV (TIMESTAMP, ContextTokens, GeneratedTokens);
- mooncake: Mooncake JSONL (timestamp in ms, input_length, output_length, hash_ids of
  512-token blocks; equal leading ids are a shared prefix, and the token ids made for
  them share exactly that prefix; optionally request_id, model and lora);
- vidur: Vidur's repository CSV (arrived_at, num_prefill_tokens, num_decode_tokens);
- vidur-pypi: the CSV that PyPI's vidur 0.0.26 replays (Date, Time in seconds of that
  date, PromptTokenCount, CompletionTokenCount); a later Date adds whole days;
- burstgpt: BurstGPT CSV (Timestamp, Model, Request tokens, Response tokens, ...); its
  failed requests (0 response tokens) are skipped and counted in `Trace.skipped`;
- sharegpt: the raw ShareGPT JSON (a list of {"conversations": [...]}) that `vllm bench
  serve --dataset-name sharegpt` reads: the first turn is the prompt, the second the
  reply, lengths from the tokenizer; no timestamps (every request at 0: give arrivals
  with `loadgen.synthetic.retime`); conversations of fewer than two turns are skipped.

A record's `model` is what the line asked for (a JSONL "model" key, BurstGPT's Model column):
drivers route by it when the target serves several models (`loadgen.trace_models`), and run it
under a LoRA adapter where it names one. A JSONL "lora" key names the adapter explicitly (`lora`:
a multi-LoRA workload whose `model` holds the base model, or nothing).
Arrival times are seconds relative to the first request. Whatever a line holds, reading
it either yields a record of finite arrival and whole token counts, or raises
`TraceError` as `file:line: what is wrong` (never another exception, never a hang).
"""
from __future__ import annotations

import codecs
import csv
import json
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from operator import itemgetter
from pathlib import Path

import numpy as np

from emulator.block_hash import mix64, synthetic_tokens

MOONCAKE_BLOCK = 512
_BLOCK_POSITIONS = np.arange(MOONCAKE_BLOCK, dtype=np.uint64)
_MASK64 = (1 << 64) - 1
FORMATS = ("llmservingsim", "azure", "mooncake", "vidur", "vidur-pypi", "burstgpt", "sharegpt")
# What each format's first line (or header) holds, for the error that cannot tell.
FORMAT_HINTS = {
    "llmservingsim": 'JSONL: {"input_toks", "output_toks", "arrival_time_ns", ...}',
    "azure": "CSV: TIMESTAMP,ContextTokens,GeneratedTokens",
    "mooncake": 'JSONL: {"timestamp", "input_length", "output_length", "hash_ids"}',
    "vidur": "CSV: arrived_at,num_prefill_tokens,num_decode_tokens",
    "vidur-pypi": "CSV: Date,Time,PromptTokenCount,CompletionTokenCount",
    "burstgpt": "CSV: Timestamp,Model,Request tokens,Response tokens,...",
    "sharegpt": 'JSON: [{"conversations": [{"from": ..., "value": ...}, ...]}, ...]',
}
# Bounds that catch a wrong unit or a corrupt number before it costs memory: no model has a
# context of 2^24 tokens, and no trace spans a year.
MAX_TOKENS = 1 << 24
MAX_SPAN_S = 366 * 86400.0
MAX_TOKEN_ID = (1 << 63) - 1


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
    prompt: str | None = None  # the prompt's text, when the trace has it (sharegpt)
    hash_ids: list[int] | None = None  # Mooncake's prefix blocks, for drivers that build text from them
    model: str | None = None  # the model the request asked for, when the trace records it
    lora: str | None = None  # the LoRA adapter it runs with, when the trace names one apart from the model


# Traces are UTF-8; a byte-order mark at the start (Excel's and PowerShell's exports write one) is not text.
TEXT = "utf-8-sig"


def _head(path: Path, size: int = 65536) -> str:
    """The start of the file as text; a binary file is refused here, before any parsing."""
    with path.open("rb") as f:
        raw = f.read(size)
    if b"\0" in raw:
        raise TraceError(f"{path}: not a text trace (a NUL byte at byte {raw.index(0)})")
    try:
        return raw.decode(TEXT)
    except UnicodeDecodeError as exc:
        if exc.start < len(raw) - 4:  # not merely a character cut at the end of the sample
            line = raw.count(b"\n", 0, exc.start) + 1
            raise TraceError(f"{path}:{line}: not UTF-8 text (byte {exc.start})") from None
        return raw[:exc.start].decode(TEXT)


def detect_format(path: Path) -> str:
    head = _head(path)
    first = next((line.strip() for line in head.splitlines() if line.strip()), "")
    if not first:
        raise TraceError(f"{path}: the trace is empty")
    if first.startswith("["):
        if '"conversations"' in head:
            return "sharegpt"
    elif first.startswith("{"):
        try:
            keys = json.loads(first).keys()
        except RecursionError:
            raise TraceError(f"{path}:1: JSON nested too deeply") from None
        except ValueError as exc:
            raise TraceError(f"{path}:1: not valid JSON ({getattr(exc, 'msg', exc)})") from None
        except AttributeError:  # valid JSON, not an object
            keys = ()
        if "hash_ids" in keys or "input_length" in keys:
            return "mooncake"
        if "input_toks" in keys:
            return "llmservingsim"
    header = {h.strip() for h in first.split(",")}
    if {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} <= header:
        return "azure"
    if {"arrived_at", "num_prefill_tokens", "num_decode_tokens"} <= header:
        return "vidur"
    if {"Date", "Time", "PromptTokenCount", "CompletionTokenCount"} <= header:
        return "vidur-pypi"
    if {"Timestamp", "Request tokens", "Response tokens"} <= header:
        return "burstgpt"
    known = "; ".join(f"{name} ({hint})" for name, hint in FORMAT_HINTS.items())
    raise TraceError(f"{path}: cannot tell the trace format from its first line; pass --trace-format with one "
                     f"of: {known}")


class Trace:
    """A trace file to iterate over; `skipped` counts lines its format says to drop, by reason.

    `tokenizer` (anything with `encode`) measures the lengths of a format that has only
    text (sharegpt); by default the shipped tokenizer of `model_type`'s family (profiles.tokenizer),
    loaded when first needed."""

    def __init__(self, path: str | Path, fmt: str | None = None, tokenizer=None,
                 model_type: str | None = None) -> None:
        self.path = Path(path)
        self.fmt = fmt
        self.tokenizer = tokenizer
        self.model_type = model_type
        self.skipped: Counter[str] = Counter()
        self._detected: str | None = None  # the format read from the file's head, once (a bar's count asks too)

    def _format(self) -> str:
        if self.fmt:
            return self.fmt
        if self._detected is None:
            self._detected = detect_format(self.path)
        return self._detected

    def __iter__(self) -> Iterator[TraceRecord]:
        path = self.path
        if not path.is_file():
            raise TraceError(f"{path}: no such trace file")
        fmt = self._format()
        reader = _READERS.get(fmt)
        if reader is None:
            raise TraceError(f"unknown trace format {fmt!r}; choose one of {', '.join(FORMATS)}")
        t0 = None
        try:
            for record in reader(self):
                if t0 is None:
                    t0 = record.arrival
                record.arrival -= t0
                if not record.arrival <= MAX_SPAN_S:
                    raise TraceError(f"{path}:{record.line}: arrives {record.arrival:.6g} s after the first request, "
                                     f"more than a year later: is the time unit right?")
                yield record
        except UnicodeDecodeError as exc:
            raise TraceError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start} of a read)") from None
        if t0 is None:
            raise TraceError(f"{path}: the trace holds no request")

    def expected_count(self) -> int | None:
        """How many requests the file holds at most (its lines less a CSV header), for a progress bar's
        total; read at disk speed (~1 ms for 20,000 lines). None for the JSON document of sharegpt."""
        if not self.path.is_file():
            raise TraceError(f"{self.path}: no such trace file")
        fmt = self._format()
        if fmt == "sharegpt":
            return None
        lines, last = 0, b"\n"
        with self.path.open("rb") as f:
            while chunk := f.read(1 << 20):
                lines += chunk.count(b"\n")
                last = chunk[-1:]
        lines += last != b"\n"
        return max(lines - (fmt not in ("llmservingsim", "mooncake")), 0)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if self.tokenizer is None:
            from profiles.tokenizer import load_tokenizer
            self.tokenizer = load_tokenizer(None, self.model_type)
        return self.tokenizer.encode(text, add_special_tokens)


def read_trace(path: str | Path, fmt: str | None = None, tokenizer=None) -> Iterator[TraceRecord]:
    return iter(Trace(path, fmt, tokenizer))


# -- fields -------------------------------------------------------------------------------------------
def _count(value, path: Path, line: int, name: str) -> int:
    """A token count: a whole number in [0, MAX_TOKENS] ("12" and "12.0" are 12)."""
    if type(value) is str and value.isdecimal() and len(value) < 16:  # a CSV's digits: float() would give the same
        value = int(value)
    elif type(value) is not int:
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise TraceError(f"{path}:{line}: field {name!r} is not a number ({value!r})") from None
        if isinstance(value, bool) or not math.isfinite(number):
            raise TraceError(f"{path}:{line}: field {name!r} is not a finite number ({value!r})")
        if number != int(number):
            raise TraceError(f"{path}:{line}: field {name!r} must be a whole number ({value!r})")
        value = int(number)
    if not 0 <= value <= MAX_TOKENS:
        raise TraceError(f"{path}:{line}: field {name!r} is {value}: a token count must lie in [0, {MAX_TOKENS}]")
    return value


def _seconds(value, path: Path, line: int, name: str) -> float:
    """A time: a finite number."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise TraceError(f"{path}:{line}: field {name!r} is not a number ({value!r})") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise TraceError(f"{path}:{line}: field {name!r} is not a finite number ({value!r})")
    return number


def _token_array(value, path: Path, line: int, name: str) -> np.ndarray:
    """Token ids: a flat list of integers in [0, 2^63)."""
    if isinstance(value, np.ndarray):  # _json_lines's array of such a list
        return value
    try:
        ids = np.asarray(value) if isinstance(value, list) else None
    except (TypeError, ValueError, OverflowError):
        ids = None
    if ids is not None and ids.size == 0:
        return np.zeros(0, dtype=np.int64)
    if ids is not None and ids.dtype == object and all(type(v) is int for v in value):  # past 64 bits
        bad = next(v for v in value if not 0 <= v <= MAX_TOKEN_ID)
        raise TraceError(f"{path}:{line}: {name!r} holds {bad}: a token id must lie in [0, 2^63)")
    if ids is None or ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise TraceError(f"{path}:{line}: {name!r} must be a flat list of integers")
    # numpy infers int64 for ids below 2^63 and uint64 for those up to 2^64: one bound to check each
    bad = ids.min() if ids.dtype.kind == "i" else ids.max()
    if (bad < 0) if ids.dtype.kind == "i" else (bad > MAX_TOKEN_ID):
        raise TraceError(f"{path}:{line}: {name!r} holds {bad}: a token id must lie in [0, 2^63)")
    return ids.astype(np.int64, copy=False)


def _require(obj: dict, keys: tuple[str, ...], path: Path, line: int) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise TraceError(f"{path}:{line}: missing field {missing[0]!r}")


def _request_id(obj: dict) -> str | None:
    value = obj.get("request_id")
    return None if value is None else str(value)


def _model(obj: dict, path: Path, line: int, key: str = "model") -> str | None:
    """A JSONL line's model name (or, `key` "lora", its adapter's), if it has one."""
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise TraceError(f"{path}:{line}: {key!r} must be a non-empty string, got {value!r}")
    return value


# -- JSON lines --------------------------------------------------------------------------------------
def _json_lines(path: Path, arrays: tuple[str, ...] = ()) -> Iterator[tuple[int, dict]]:
    """Each line's object; on the msgspec path, the lists of token ids under the keys `arrays` come as the
    int64 arrays _token_array makes of them (read by numpy from their text where they are plain digits)."""
    if not _plain_lines(path):  # \r line ends or bytes that are not UTF-8: read as text, as always
        with path.open(encoding=TEXT) as f:
            for line_no, text in enumerate(f, 1):
                obj = _json_line(text, path, line_no)
                if obj is not None:
                    yield line_no, obj
        return
    # UTF-8 with \n line ends: each line of bytes is a line of the text. msgspec decodes a line to the
    # objects json.loads makes (a third of its time for token-id lists); what it refuses (NaN, lone
    # surrogates, malformed JSON, ...) goes to json.loads, which gives the result or the error as before.
    from msgspec import Raw
    from msgspec import json as fast_json
    decode = fast_json.Decoder().decode
    if arrays:  # each field's JSON text, checked by msgspec: the id lists become arrays without a Python int each
        fields, plain = fast_json.Decoder(dict[str, Raw]).decode, decode

        def decode(raw: bytes) -> dict | None:
            obj = fields(raw)
            # the line's brackets, counted without reading the id lists again: at least as many as its bytes hold
            # (a key's escapes only add), past _FAST_DEPTH json.loads reads it (None)
            brackets = 1
            for key, value in obj.items():
                ids = _id_array(value) if key in arrays else None
                if ids is None:
                    text = bytes(value)
                    brackets += text.count(b"[") + text.count(b"{")
                    obj[key] = plain(text)
                else:
                    brackets += 1
                    obj[key] = ids
                brackets += key.count("[") + key.count("{")
            return obj if brackets < _FAST_DEPTH else None
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            if line_no == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            if raw.isspace():  # (bytes.strip's blanks, without copying the line)
                continue
            obj = None
            # deeper: json.loads's RecursionError decides (decode counts the fields' brackets itself)
            if arrays or raw.count(b"[") + raw.count(b"{") < _FAST_DEPTH:
                try:
                    obj = decode(raw)
                except Exception:  # noqa: BLE001 - json.loads answers for whatever msgspec refuses
                    obj = None
            if obj is None:
                obj = _json_line(raw.decode(), path, line_no)
                if obj is None:
                    continue
            if not isinstance(obj, dict):
                raise TraceError(f"{path}:{line_no}: expected a JSON object")
            yield line_no, obj


def _id_array(raw) -> np.ndarray | None:
    """A JSON list (valid: msgspec read it) of nothing but digits, commas and blanks, i.e. of integers >= 0, as
    the int64 array _token_array makes of it, parsed by numpy from the text; None for any other value."""
    text = bytes(raw).strip(b" \t")
    # valid JSON without strings ("), negatives (-), fractions or exponents (. e E: true and false too), null,
    # objects or inner lists holds only digits, commas and blanks (each test a memchr)
    if text[:1] != b"[" or any(c in text for c in _NOT_IDS) or text.find(b"[", 1) != -1:
        return None
    inner = text[1:-1]
    if not inner.strip(b" \t"):
        return np.zeros(0, dtype=np.int64)
    ids = np.fromstring(inner, dtype=np.int64, sep=",")
    # numpy saturates an id past 2^63 - 1 at that value: such a list is _token_array's to refuse
    if len(ids) != inner.count(b",") + 1 or ids.max() >= MAX_TOKEN_ID:
        return None
    return ids


_NOT_IDS = (b'"', b"-", b".", b"e", b"E", b"n", b"{")
_BOM = "\ufeff".encode()
_FAST_DEPTH = 500  # brackets on a line past which json.loads alone reads it (it counts its nesting against
# Python's recursion limit, a few frames apart from msgspec's)


def _plain_lines(path: Path) -> bool:
    """Whether the file is UTF-8 with no \r: its lines as bytes are then exactly its lines as text."""
    decoder = None
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            if b"\r" in chunk:
                return False
            if decoder is None and not chunk.isascii():
                decoder = codecs.getincrementaldecoder("utf-8")()
            if decoder is not None:
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError:
                    return False
    if decoder is not None:
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return False
    return True


def _json_line(text: str, path: Path, line_no: int) -> dict | None:
    """One line of text as a JSON object (None for a blank line)."""
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise TraceError(f"{path}:{line_no}: JSON nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise TraceError(f"{path}:{line_no}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise TraceError(f"{path}:{line_no}: expected a JSON object")
    return obj


def _read_llmservingsim(trace: Trace) -> Iterator[TraceRecord]:
    path = trace.path
    for line, obj in _json_lines(path, ("input_tok_ids", "output_tok_ids")):
        _require(obj, ("input_toks", "output_toks", "arrival_time_ns"), path, line)
        record = TraceRecord(
            arrival=_seconds(obj["arrival_time_ns"], path, line, "arrival_time_ns") * 1e-9,
            input_len=_count(obj["input_toks"], path, line, "input_toks"),
            output_len=_count(obj["output_toks"], path, line, "output_toks"),
            line=line,
            request_id=_request_id(obj),
            model=_model(obj, path, line),
            lora=_model(obj, path, line, "lora"),
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
    """Token content for a Mooncake prompt: block i is a function of hash_ids[i] alone (the tokens
    `synthetic_tokens(seed_i, 0, 512)` would give, made for all the prompt's blocks in one array op)."""
    used = hash_ids[:-(-input_len // MOONCAKE_BLOCK)]  # the hash blocks the prompt reaches
    seeds = np.array([(int(h) * 0x9E3779B1 + 0x5BD1E995) & _MASK64 for h in used], dtype=np.uint64)
    with np.errstate(over="ignore"):
        blocks = mix64(_BLOCK_POSITIONS ^ seeds[:, None]) | np.uint64(1 << 63)  # one row per hash id
    tokens = blocks.reshape(-1)[:input_len]
    remaining = input_len - len(tokens)
    if remaining > 0:  # more tokens than the hash blocks cover: the tail is unique to the request
        tail = synthetic_tokens(hash((tuple(hash_ids), input_len)) & ((1 << 63) - 1), 0, remaining)
        tokens = np.concatenate([tokens, tail])
    return tokens


def _read_mooncake(trace: Trace) -> Iterator[TraceRecord]:
    path = trace.path
    for line, obj in _json_lines(path):
        _require(obj, ("timestamp", "input_length", "output_length"), path, line)
        input_len = _count(obj["input_length"], path, line, "input_length")
        record = TraceRecord(
            arrival=_seconds(obj["timestamp"], path, line, "timestamp") / 1000.0,
            input_len=input_len,
            output_len=_count(obj["output_length"], path, line, "output_length"),
            line=line,
            request_id=_request_id(obj),
            model=_model(obj, path, line),
            lora=_model(obj, path, line, "lora"),
        )
        hash_ids = obj.get("hash_ids")
        if hash_ids:
            if not isinstance(hash_ids, list) or not all(type(h) is int and 0 <= h <= MAX_TOKEN_ID for h in hash_ids):
                raise TraceError(f"{path}:{line}: 'hash_ids' must be a list of integers in [0, 2^63)")
            record.token_ids = mooncake_tokens(hash_ids, input_len)
            record.hash_ids = hash_ids
        yield record


# -- CSV -----------------------------------------------------------------------------------------------
def _csv_rows(path: Path, columns: tuple[str, ...], optional: tuple[str, ...] = ()) -> Iterator[tuple[int, tuple]]:
    """Each row's line (counted as csv.DictReader counts them: the header is 1, blank rows are skipped) and its
    values of `columns` then of `optional` (None for one the file lacks)."""
    with path.open(newline="", encoding=TEXT) as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in columns if c not in header]
        if missing:
            raise TraceError(f"{path}:1: missing column {missing[0]!r}")
        reader.fieldnames = header
        width = len(header)
        if len(set(header)) < width:  # a column named twice: DictReader's own reading of it
            for line, row in _dict_rows(path, reader, width):
                yield line, tuple(row.get(c) for c in columns + optional)
            return
        # csv.reader's rows picked by position: DictReader's dict per row is most of the reading time
        pick = itemgetter(*(header.index(c) for c in columns + optional if c in header))
        lacks = [c not in header for c in columns + optional]
        if any(lacks) or len(lacks) == 1:  # itemgetter of one position gives the value, not a tuple
            full = pick
            pick = lambda row: _with_gaps(full(row), lacks)  # noqa: E731
        line, at, fresh = 1, reader.line_num, True
        try:
            for row in reader.reader:
                if row or fresh:  # DictReader's line_num (what an error names): a row's, not a blank's after a blank
                    at = reader.reader.line_num
                fresh = bool(row)
                if not row:  # a blank row, skipped
                    continue
                line += 1
                if len(row) != width:
                    raise TraceError(f"{path}:{line}: {len(row)} values for {width} columns")
                yield line, pick(row)
        except csv.Error as exc:
            raise TraceError(f"{path}:{at}: not valid CSV ({exc})") from None


def _with_gaps(values, lacks: list[bool]) -> tuple:
    """The picked values (a tuple, or one value) with None where the file lacks the column."""
    found = iter(values if isinstance(values, tuple) else (values,))
    return tuple(None if lack else next(found) for lack in lacks)


def _dict_rows(path: Path, reader: csv.DictReader, width: int) -> Iterator[tuple[int, dict]]:
    try:
        for line, row in enumerate(reader, 2):
            if len(row) != width or None in row.values():  # DictReader's marks of a short or long row
                values = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None, ()))
                raise TraceError(f"{path}:{line}: {values} values for {width} columns")
            yield line, row
    except csv.Error as exc:
        raise TraceError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from None


def _read_azure(trace: Trace) -> Iterator[TraceRecord]:
    path = trace.path
    second, start = None, 0.0  # the last whole second read and its time: rows come several to a second
    for line, (stamp, context, generated) in _csv_rows(path, ("TIMESTAMP", "ContextTokens", "GeneratedTokens")):
        stamp = stamp.strip()
        try:  # fractions beyond microseconds (7 digits in the Azure files) are cut
            day, _, frac = stamp.partition(".")
            if day != second:
                start, second = datetime.fromisoformat(day).timestamp(), day
            when = start + (float("0." + frac) if frac else 0.0)
        except ValueError:
            raise TraceError(f"{path}:{line}: bad TIMESTAMP {stamp!r}") from None
        yield TraceRecord(when, _count(context, path, line, "ContextTokens"),
                          _count(generated, path, line, "GeneratedTokens"), line)


def _read_vidur(trace: Trace) -> Iterator[TraceRecord]:
    path = trace.path
    for line, (arrived, prefill, decode) in _csv_rows(path, ("arrived_at", "num_prefill_tokens",
                                                             "num_decode_tokens")):
        yield TraceRecord(_seconds(arrived, path, line, "arrived_at"),
                          _count(prefill, path, line, "num_prefill_tokens"),
                          _count(decode, path, line, "num_decode_tokens"), line)


def _read_vidur_pypi(trace: Trace) -> Iterator[TraceRecord]:
    path = trace.path
    first_day = None
    days: dict[str, int] = {}
    for line, (stamp, clock, prompt, completion) in _csv_rows(path, ("Date", "Time", "PromptTokenCount",
                                                                     "CompletionTokenCount")):
        stamp = stamp.strip()
        offset = days.get(stamp)
        if offset is None:
            try:
                day = date.fromisoformat(stamp)
            except ValueError:
                raise TraceError(f"{path}:{line}: bad Date {stamp!r} (expected YYYY-MM-DD)") from None
            first_day = first_day or day
            offset = days[stamp] = (day - first_day).days * 86400
        yield TraceRecord(offset + _seconds(clock, path, line, "Time"),
                          _count(prompt, path, line, "PromptTokenCount"),
                          _count(completion, path, line, "CompletionTokenCount"), line)


def _read_burstgpt(trace: Trace) -> Iterator[TraceRecord]:
    path = trace.path
    for line, (stamp, request, response, model) in _csv_rows(path, ("Timestamp", "Request tokens", "Response tokens"),
                                                             ("Model",)):
        arrival = _seconds(stamp, path, line, "Timestamp")
        input_len = _count(request, path, line, "Request tokens")
        output_len = _count(response, path, line, "Response tokens")
        if output_len == 0:  # BurstGPT logs a failed request with no response tokens
            trace.skipped["failed request (0 response tokens)"] += 1
            continue
        yield TraceRecord(arrival, input_len, output_len, line, model=(model or "").strip() or None)


# -- ShareGPT JSON ---------------------------------------------------------------------------------------
def _json_array_items(path: Path) -> Iterator[tuple[int, object]]:
    """The items of a JSON array, each with the line it starts on."""
    text = path.read_text(encoding=TEXT)
    decoder = json.JSONDecoder()
    pos, line = 0, 1

    def skip(pos: int, line: int) -> tuple[int, int]:
        while pos < len(text) and text[pos] in " \t\r\n":
            line += text[pos] == "\n"
            pos += 1
        return pos, line

    pos, line = skip(pos, line)
    if not text.startswith("[", pos):
        raise TraceError(f"{path}:{line}: expected a JSON list of conversations")
    pos, line = skip(pos + 1, line)
    if text.startswith("]", pos):
        return
    while True:
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        except RecursionError:
            raise TraceError(f"{path}:{line}: JSON nested too deeply") from None
        except ValueError as exc:
            raise TraceError(f"{path}:{line}: not valid JSON ({exc})") from None
        yield line, item
        line += text.count("\n", pos, end)
        pos, line = skip(end, line)
        if text.startswith(",", pos):
            pos, line = skip(pos + 1, line)
        elif text.startswith("]", pos):
            return
        else:
            raise TraceError(f"{path}:{line}: expected ',' or ']' after a conversation")


def _read_sharegpt(trace: Trace) -> Iterator[TraceRecord]:
    path = trace.path
    for line, item in _json_array_items(path):
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(turns, list):
            raise TraceError(f"{path}:{line}: expected an object with a 'conversations' list")
        if len(turns) < 2:  # vLLM's ShareGPT sampler skips these too
            trace.skipped["conversation of fewer than two turns"] += 1
            continue
        texts = [t.get("value") if isinstance(t, dict) else None for t in turns[:2]]
        if not all(isinstance(t, str) for t in texts):
            raise TraceError(f"{path}:{line}: a turn must be an object with a 'value' string")
        ids = trace.encode(texts[0], True)
        output_len = len(trace.encode(texts[1], False))
        yield TraceRecord(0.0, len(ids), output_len, line, token_ids=np.asarray(ids, dtype=np.int64),
                          prompt=texts[0])


_READERS = {
    "llmservingsim": _read_llmservingsim,
    "azure": _read_azure,
    "mooncake": _read_mooncake,
    "vidur": _read_vidur,
    "vidur-pypi": _read_vidur_pypi,
    "burstgpt": _read_burstgpt,
    "sharegpt": _read_sharegpt,
}
